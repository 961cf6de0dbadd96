"""The HTTP edge of the real server: bounded request heads (pipelined ones too), slow and idle
connections closed, and JSON for the server's own answers.

Every test here talks to the server through raw sockets on 127.0.0.1. The server is one
parameter (conftest's `server`), so the same tests hold for every server the command can run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import selectors
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send
from support import Gateway, Service, Token, free_port, wait_until

from usage_service._http import MAX_PIPELINED, MAX_REQUEST_HEAD, LimitedHttpToolsProtocol

pytestmark = pytest.mark.e2e

URL = "/api/usage/token"
# USAGE_HEADER_TIMEOUT of the server under test, in seconds: long enough that opening the slowloris
# test's 50 connections on a loaded machine does not outlast it.
HEAD_TIMEOUT = 3


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, server: str) -> Iterator[tuple[Service, Token]]:
    gateway = Gateway(tmp_path_factory.mktemp("edge") / "one-api.db")
    token = gateway.add_token()
    gateway.close()
    env = {"SQLITE_PATH": str(gateway.path), "USAGE_HEADER_TIMEOUT": str(HEAD_TIMEOUT)}
    with Service(env, server=server) as service:
        yield service, token
        assert service.stop() == 0
    assert "Traceback" not in service.output()


def get(token: Token, *extra: bytes) -> bytes:
    return b"".join(
        [b"GET " + URL.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-" + token.key.encode() + b"\r\n"]
        + [header + b"\r\n" for header in extra]
        + [b"\r\n"]
    )


def read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, dict[bytes, bytes], bytes]:
    """Read one response (status, headers, body) from `sock`, keeping what follows it in `buffer`."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a whole response; got {bytes(buffer[:200])!r}")
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(b": ") for line in lines)}
    length = int(headers.get(b"content-length", b"0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the middle of a body")
        rest += chunk
    buffer[:] = rest[length:]
    return int(status_line.split()[1]), headers, rest[:length]


def is_closed(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` (without sending anything more)."""
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        return True
    assert data == b"", f"the server answered a connection it should have closed: {data[:200]!r}"
    return True


def descriptors(pid: int) -> int:
    """Descriptors the server holds: the process's and its workers' (granian always has one)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sum(len(os.listdir(f"/proc/{p}/fd")) for p in [pid, *map(int, children)])


def test_pipelined_requests_under_the_bound_are_all_answered(edge: tuple[Service, Token]) -> None:
    service, token = edge
    padding = b"X-Pad: " + b"p" * 20_000  # each head well under the bound, together well over it
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(get(token, padding) * 3)
        buffer = bytearray()
        statuses = [read_response(sock, buffer)[0] for _ in range(3)]
    assert statuses == [200, 200, 200]


def rss(pid: int) -> int:
    """Resident bytes of the server: the process's and its workers'."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    pages = sum(int(Path(f"/proc/{p}/statm").read_text().split()[1]) for p in [pid, *map(int, children)])
    return pages * os.sysconf("SC_PAGE_SIZE")


def test_a_client_that_pipelines_and_reads_nothing_holds_bounded_memory(edge: tuple[Service, Token]) -> None:
    """httptools parsed every request a read held, and uvicorn queued them all: 100,000 small
    requests sent without reading an answer grew a worker by 230 MiB. Now a client that reads
    nothing holds 16 requests' worth; one that reads gets every answer, in order."""
    service, token = edge
    request = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n"  # a large answer: the socket fills soon
    before = rss(service.process.pid)
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the answers back up soon
        sock.settimeout(1)
        sent, deadline = 0, time.monotonic() + 5
        with contextlib.suppress(TimeoutError):
            while sent < 50_000 and time.monotonic() < deadline:
                sock.sendall(request * 1000)
                sent += 1000
        # The server goes on reading while it has answers to write: watch it for a while.
        grown = 0
        for _ in range(30):
            grown = max(grown, rss(service.process.pid) - before)
            time.sleep(0.1)
    assert sent >= 2000, "the server read too little for the test to say anything"
    assert grown < 20 * 2**20, f"{sent} requests sent, unread: the server grew by {grown / 2**20:.0f} MiB"
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(get(token) * 200)
        buffer = bytearray()
        assert [read_response(sock, buffer)[0] for _ in range(200)] == [200] * 200


def test_a_request_with_a_body_then_a_pipelined_request(edge: tuple[Service, Token]) -> None:
    service, token = edge
    body = b"b" * 50_000  # a body is not a head: it does not count against the bound
    post = b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    chunked = b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked += b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(post + chunked + get(token))
        buffer = bytearray()
        if service.server == "granian":
            # granian does not read through a large body the app left unread: it answers, then
            # closes the connection (the client opens another), rather than refusing the head.
            assert read_response(sock, buffer)[0] == 405
            assert is_closed(sock)
            return
        statuses = [read_response(sock, buffer)[0] for _ in range(3)]
    assert statuses == [405, 405, 200]


@pytest.mark.parametrize(
    "split",
    [
        pytest.param(False, id="same-read"),
        pytest.param(True, id="across-reads"),
    ],
)
def test_a_pipelined_oversized_head_is_refused(edge: tuple[Service, Token], split: bool) -> None:
    """The bound holds for every request of a connection, not only the first of a read."""
    service, token = edge
    # Over the 32 KiB bound, but under it in what follows the first read (the old check's blind spot).
    oversized = get(token, b"X-Big: " + b"a" * 50_000)
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        buffer = bytearray()
        if split:
            # The first request and the start of the second; the server answers the first
            # before the rest of the second arrives, in reads each under the bound.
            sock.sendall(get(token) + oversized[:20_000])
            assert read_response(sock, buffer)[0] == 200
            try:
                for start in range(20_000, len(oversized), 20_000):
                    sock.sendall(oversized[start : start + 20_000])
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before we finished sending: the answer is there to read
        else:
            sock.sendall(get(token) + oversized)
            assert read_response(sock, buffer)[0] == 200
        status, headers, body = read_response(sock, buffer)
        assert status == 431
        if service.server == "granian":
            assert body == b""  # hyper's own answer: no hook makes it JSON (usage_service/_granian.py)
        else:
            assert headers[b"content-type"] == b"application/json"
            assert orjson.loads(body)["success"] is False
        assert is_closed(sock)
    assert httpx.get(service.url + URL, headers=token.bearer).status_code == 200


def test_an_unparsable_request_is_answered_after_the_requests_before_it(edge: tuple[Service, Token]) -> None:
    """uvicorn wrote its 400 as soon as it failed to parse a request, ahead of the answers of the
    requests pipelined before it; it comes after them now, as the 431 does."""
    service, token = edge
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(get(token) * 20 + b"NOT HTTP AT ALL\r\n\r\n")
        buffer = bytearray()
        answers = [read_response(sock, buffer) for _ in range(21)]
        assert [status for status, _, _ in answers] == [200] * 20 + [400]
        if service.server == "uvicorn":
            assert orjson.loads(answers[-1][2])["success"] is False
        assert is_closed(sock)


def test_slow_and_idle_connections_are_closed(edge: tuple[Service, Token]) -> None:
    """Slowloris: connections that never finish a head, or go quiet after an answer, are closed
    after the head timeout, and the descriptors they held come back."""
    service, token = edge
    pid = service.process.pid
    assert httpx.get(service.url + URL, headers=token.bearer).status_code == 200  # the database is open
    before = descriptors(pid)
    opened = time.monotonic()
    slow = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(30)]
    idle = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(10)]
    kept_alive = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(10)]
    for sock in kept_alive:
        sock.sendall(get(token))
        assert read_response(sock, bytearray())[0] == 200
    slow += kept_alive[5:]  # answered once, then trickling their next head
    trickle = get(token)[:-2] + b"X-Slow: " + b"s" * 10_000  # a head that never ends
    everyone = slow + idle + kept_alive[:5]
    try:
        # (Less one: the server may still hold the first request's connection in `before`.)
        assert wait_until(lambda: descriptors(pid) >= before + len(everyone) - 1, timeout=5)
        selector = selectors.DefaultSelector()
        for sock in everyone:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        open_ = set(everyone)
        closed_after: list[float] = []
        sent = 0
        # The server's own timer closes them; bounded by a few times its timeout.
        deadline = time.monotonic() + 5 * HEAD_TIMEOUT + 5
        while open_ and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.1):
                sock = key.fileobj  # type: ignore[assignment]
                if is_closed(sock):  # type: ignore[arg-type]
                    selector.unregister(sock)
                    open_.discard(sock)  # type: ignore[arg-type]
                    closed_after.append(time.monotonic() - opened)
            if sent < len(trickle):  # one more byte of each slow head per round
                for sock in slow:
                    if sock in open_:
                        try:
                            sock.send(trickle[sent : sent + 1])
                        except OSError:
                            pass  # closed: the selector reports it
                sent += 1
        selector.close()
        assert not open_, f"{len(open_)} of {len(everyone)} slow or idle connections still open"
        assert sent < len(trickle)  # the slow heads were cut off while still trickling
        # By USAGE_HEADER_TIMEOUT (not the servers' own defaults of 5 to 10 s), and not before:
        # the last were answered, or opened, a moment after `opened`.
        assert HEAD_TIMEOUT - 0.5 <= min(closed_after) and max(closed_after) <= 2 * HEAD_TIMEOUT + 1, closed_after
    finally:
        for sock in everyone:
            sock.close()
    assert wait_until(lambda: descriptors(pid) <= before, timeout=5), (before, descriptors(pid))
    assert httpx.get(service.url + URL, headers=token.bearer).status_code == 200


def test_a_connection_that_keeps_asking_stays_open(edge: tuple[Service, Token]) -> None:
    """The timeout bounds each head, not the connection's life."""
    service, token = edge
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        buffer = bytearray()
        deadline = time.monotonic() + 3 * HEAD_TIMEOUT
        answered = 0
        while time.monotonic() < deadline:
            sock.sendall(get(token))
            assert read_response(sock, buffer)[0] == 200
            answered += 1
        assert answered > 3


def test_the_header_timeout_is_checked() -> None:
    from usage_service.config import ConfigError, load_settings

    assert load_settings({}).header_timeout == 10
    assert load_settings({"USAGE_HEADER_TIMEOUT": "30"}).header_timeout == 30
    for bad in ("0", "1.5", "301", "soon"):
        with pytest.raises(ConfigError, match="USAGE_HEADER_TIMEOUT"):
            load_settings({"USAGE_HEADER_TIMEOUT": bad})


@contextlib.contextmanager
def soft_descriptor_limit(limit: int) -> Iterator[None]:
    """Lower this process's soft open-files limit, which a process started meanwhile inherits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 2048, reason="needs a hard limit of 2048 files")
def test_idle_connections_past_the_soft_descriptor_limit(tmp_path: Path, server: str) -> None:
    """Started with 256 descriptors (as under a default systemd or shell limit), the service
    raises its own limit to the hard one: 1,100 idle connections from one client do not make a
    real request fail (granian counted connections against its 1,000 requests in flight: the
    1,001st connection, anyone's, waited)."""
    gateway = Gateway(tmp_path / "one-api.db")
    token = gateway.add_token()
    gateway.close()
    with soft_descriptor_limit(256):
        service = Service({"SQLITE_PATH": str(gateway.path)}, server=server)
    with service:
        idle = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(1100)]
        try:
            assert httpx.get(service.url + URL, headers=token.bearer).status_code == 200
        finally:
            for sock in idle:
                sock.close()


@pytest.mark.asyncio
async def test_past_the_in_flight_limit_requests_are_answered_503_in_json() -> None:
    """uvicorn's `limit_concurrency` counts requests in flight, not idle connections, and its
    503 is JSON like the service's own."""
    release = asyncio.Event()
    async with in_process_server(release, limit_concurrency=2) as port:

        async def ask(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            return reader, writer

        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
        slow = [await ask("/slow") for _ in range(2)]
        reader, writer = await ask("/fast")  # the third in flight
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ")
        assert b"content-type: application/json" in head and b"retry-after: 1" in head
        body = await reader.read()  # then the connection is closed
        assert orjson.loads(body)["success"] is False
        writer.close()
        release.set()
        for reader, writer in slow:
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
            writer.close()
        reader, writer = await ask("/fast")  # idle connections are not requests in flight
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        writer.close()
        for _, idle_writer in idle:
            idle_writer.close()


def test_the_access_log_keeps_one_request_to_a_line(tmp_path: Path, server: str) -> None:
    """Text access lines from the real process: a decoded %0a, %0d or %22 forges no line and
    breaks no quotes, and a key in a long path is redacted wherever the path is cut."""
    key = "Q7w" * 16
    paths = [
        b"/a%0aINFO:%20%20%20%20%20forged",
        b"/a%0d%0aINFO:%20forged",
        b"/a%22%20200%200.1ms%20local%22",
        b"/a%1b[2J%e2%80%a8",
        b"/" + b"a/" * 92 + b"-" + key.encode(),
    ]
    gateway = Gateway(tmp_path / "one-api.db")
    gateway.close()
    with Service({"SQLITE_PATH": str(gateway.path)}, "--access-log", server=server) as service:
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
            sock.sendall(b"".join(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n" for path in paths))
            buffer = bytearray()
            assert [read_response(sock, buffer)[0] for _ in paths] == [404] * len(paths)
        service.stop()
        output = service.output()
    lines = [line for line in output.splitlines() if ' - "GET /a' in line]
    assert len(lines) == len(paths), output
    for line in lines:
        assert re.fullmatch(r'INFO:     127\.0\.0\.1 - "GET \S+" 404 \d+\.\d{3}ms -', line), line
    assert all(line in lines for line in output.splitlines() if "forged" in line)
    assert key[:12] not in output


@pytest.mark.asyncio
async def test_a_body_length_with_trailing_whitespace_does_not_hide_the_next_head() -> None:
    """httptools takes `Content-Length: 1 ` (whitespace after the digits) as a length, but the
    bound read it as no length and fed everything after that head to the parser, uncounted,
    until a blank line: a pipelined head behind it, twice the bound, was parsed and answered 200.

    In-process, so that the bytes reach the parser in one read: a held request keeps the
    pipeline full, the rest waits unread, and is parsed at once when it is released."""
    release = asyncio.Event()
    async with in_process_server(release) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        small = b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n"
        post = b"POST /fast HTTP/1.1\r\nHost: x\r\nContent-Length: 1 \r\n\r\nx"
        oversized = b"GET /fast HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (2 * MAX_REQUEST_HEAD) + b"\r\n\r\n"
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n" + small * MAX_PIPELINED + post + oversized)
        await writer.drain()
        release.set()
        statuses = []
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            status = int(head.split()[1])
            length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE)[1])  # type: ignore[index]
            await reader.readexactly(length)
            statuses.append(status)
            if status != 200:
                break
        writer.close()
        assert statuses == [200] * (MAX_PIPELINED + 2) + [431]


@contextlib.asynccontextmanager
async def in_process_server(release: asyncio.Event, **options: Any) -> AsyncIterator[int]:
    """uvicorn with the service's protocol in this process, serving an app that answers 200 `ok`,
    `/slow` once `release` is set; yields its port."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/slow":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    config = uvicorn.Config(app, port=port, lifespan="off", log_level="critical", **options)
    config.http = LimitedHttpToolsProtocol  # type: ignore[assignment]
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        for _ in range(500):  # uvicorn's own start-up, at most 5 s
            if server.started:
                break
            await asyncio.sleep(0.01)
        assert server.started
        yield port
    finally:
        server.should_exit = True
        await serving
