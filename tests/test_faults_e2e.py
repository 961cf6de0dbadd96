"""Faults and hostile input against the real `usage-service` process: SIGTERM under load, Redis
black-holed, WAL files left untouched, hostile requests, and no key material anywhere."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
from support import (
    Gateway,
    RedisServer,
    Service,
    Token,
    environ_without_gateway_settings,
    free_port,
    redis_contents,
    wait_until,
)
from tcpproxy import TCPProxy

pytestmark = pytest.mark.e2e

URL = "/api/usage/token"


def test_sigterm_under_load(tmp_path: Path, server: str) -> None:
    """Requests in flight complete, new connections are refused, the exit status is 0."""
    gateway = Gateway(tmp_path / "one-api.db")
    warm = [gateway.add_token(used=i) for i in range(5)]
    slow = [gateway.add_token(used=100 + i) for i in range(8)]
    env = {"SQLITE_PATH": str(gateway.path), "USAGE_DB_TIMEOUT": "20", "USAGE_REFRESH_INTERVAL": "0"}
    env |= {"USAGE_CACHE_TTL": "60", "USAGE_LOCAL_TTL": "60"}
    with Service(env, server=server) as service:
        for token in warm:
            assert httpx.get(service.url + URL, headers=token.bearer).status_code == 200
        outcomes: list[tuple[bool, str]] = []  # (after SIGTERM, status or error)
        stop, terminated = threading.Event(), threading.Event()

        def load(token: Token) -> None:
            while not stop.is_set():
                try:  # a new connection each time: after SIGTERM, each one must be refused cleanly
                    outcome = str(httpx.get(service.url + URL, headers=token.bearer, timeout=20).status_code)
                except httpx.TransportError as exc:
                    outcome = type(exc).__name__
                outcomes.append((terminated.is_set(), outcome))

        loaders = [threading.Thread(target=load, args=(t,), daemon=True) for t in warm[:3]]
        for thread in loaders:
            thread.start()
        try:
            read_before = _db_lookups(service)
            with ThreadPoolExecutor(len(slow)) as pool:
                with gateway.exclusive_lock():
                    # Misses wait on the lock: these requests are in flight when the signal lands.
                    in_flight = [pool.submit(httpx.get, service.url + URL, headers=t.bearer, timeout=30) for t in slow]
                    # In flight: the service has begun each of their database reads (a sleep could end,
                    # on a loaded machine, before the requests have even connected).
                    assert wait_until(lambda: _db_lookups(service) >= read_before + len(slow), timeout=20), (
                        "requests not in flight"
                    )
                    assert not any(f.done() for f in in_flight)
                    terminated.set()
                    service.process.send_signal(signal.SIGTERM)
                    assert wait_until(lambda: _refused(service.port), timeout=10), "still accepting after SIGTERM"
                answers = [f.result() for f in in_flight]
            assert [r.status_code for r in answers] == [200] * len(slow)
            assert [r.json()["data"]["total_used"] for r in answers] == [100 + i for i in range(len(slow))]
            assert service.process.wait(timeout=20) == 0
        finally:  # however the test ends, the loaders stop (else pytest would wait on them for ever)
            stop.set()
            for thread in loaders:
                thread.join()
        before = {o for after, o in outcomes if not after}
        after = {o for after, o in outcomes if after}
        assert before == {"200"}, outcomes
        # After the signal: answered in full, or refused before any byte of a response.
        assert after <= {"200", "ConnectError", "RemoteProtocolError", "ReadError"}, after
        assert "ConnectError" in after
        assert "Traceback" not in service.output()
    gateway.close()


def _db_lookups(service: Service) -> float:
    """The service's usage_db_lookups_total, as /metrics last published it."""
    text = httpx.get(service.url + "/metrics", timeout=5).text
    found = re.search(r"^usage_db_lookups_total (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        # Caught in the listener's backlog as it closed: ask again, the next try is refused.
        return False
    return False


def test_sigterm_with_a_head_half_sent_runs_the_shutdown(tmp_path: Path, server: str) -> None:
    """granian's graceful stop waits for a connection part-way through a head until its header
    timeout; the worker was killed first (10 s), and its shutdown (the leader lock handed over,
    its metrics' live gauges removed) never ran."""
    gateway = Gateway(tmp_path / "one-api.db")
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    # A header timeout (the default is 10 s) just past the 10 s granian gave a worker to stop.
    env = {"SQLITE_PATH": str(gateway.path), "USAGE_HEADER_TIMEOUT": "11", "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    with Service(env, server=server) as service, socket.create_connection(("127.0.0.1", service.port)) as client:
        assert list(metrics_dir.glob("gauge_live*.db"))  # what only the worker's shutdown removes
        client.sendall(b"G")
        time.sleep(0.2)  # (not synchronisation: whether or not the byte has been read, the stop must hold)
        started = time.monotonic()
        assert service.stop() == 0, service.output()
        # Well before granian's kill (11 + 10 s). (Its "Killing worker-1" line alone proves
        # nothing: it may come just after the worker exited, when the process still looks alive
        # 1 ms after its join returned, as on a loaded machine.)
        assert time.monotonic() - started < 11 + 3
    assert not list(metrics_dir.glob("gauge_live*.db")), service.output()  # the shutdown ran
    gateway.close()


def test_sigterm_with_a_client_that_reads_nothing_still_stops(tmp_path: Path, server: str) -> None:
    """An answer waiting to be written to a client that reads nothing held uvicorn's graceful
    stop for ever; it is cancelled 10 s after SIGTERM (granian kills the worker
    USAGE_HEADER_TIMEOUT + 10 s after it), and the command exits 0."""
    gateway = Gateway(tmp_path / "one-api.db")
    env = {"SQLITE_PATH": str(gateway.path), "USAGE_HEADER_TIMEOUT": "2"}
    with Service(env, server=server) as service, socket.create_connection(("127.0.0.1", service.port)) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.settimeout(1)
        with contextlib.suppress(TimeoutError):  # until the server stops reading
            for _ in range(20):
                client.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 1000)
        started = time.monotonic()
        assert service.stop() == 0, service.output()
        assert time.monotonic() - started < 2 + 10 + 3
    gateway.close()


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_second_sigint_forces_the_stop_and_says_so(tmp_path: Path, first: signal.Signals) -> None:
    """uvicorn answers a SIGINT during a stop by stopping at once, cutting off what is in flight:
    the command said nothing of it and exited 0, as after a graceful stop. It now says so, and
    exits 130 (as after Ctrl-C)."""
    gateway = Gateway(tmp_path / "one-api.db")
    token = gateway.add_token()
    env = {"SQLITE_PATH": str(gateway.path), "USAGE_DB_TIMEOUT": "4"}
    with Service(env) as service, gateway.exclusive_lock(), ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(httpx.get, service.url + URL, headers=token.bearer, timeout=30)  # on the lock
        time.sleep(0.5)  # (not synchronisation: in flight or not yet, the second SIGINT must force the stop)
        service.process.send_signal(first)
        assert wait_until(lambda: "Shutting down" in service.output(), timeout=5), service.output()
        service.process.send_signal(signal.SIGINT)
        assert service.process.wait(timeout=10) == 130, service.output()
        with contextlib.suppress(httpx.HTTPError):
            waiting.result()
    assert "forced to stop by a second signal (SIGINT)" in service.output()
    gateway.close()


# The command, with SIGTERM delivered as uvicorn's Config is made: after the command has put
# its own handlers in, before uvicorn (or its --workers supervisor) has put in its own.
_SIGTERM_BEFORE_UVICORN_LISTENS = """
import signal, sys
import uvicorn
made = uvicorn.Config.__init__
def terminated_first(self, *args, **kwargs):
    signal.raise_signal(signal.SIGTERM)
    made(self, *args, **kwargs)
uvicorn.Config.__init__ = terminated_first
from usage_service.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_sigterm_before_uvicorn_listens_for_signals_still_stops_it(tmp_path: Path, workers: str) -> None:
    """The command puts its own handlers in before handing over to uvicorn (for exit status 0);
    a SIGTERM that came before uvicorn put in its own was only noted: the service started and
    served on, as if it had never come, until another one."""
    gateway = Gateway(tmp_path / "one-api.db")
    command = [sys.executable, "-c", _SIGTERM_BEFORE_UVICORN_LISTENS, "--host", "127.0.0.1"]
    command += ["--port", str(free_port()), "--workers", workers]
    env = {**environ_without_gateway_settings(), "SQLITE_PATH": str(gateway.path)}
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.terminate()  # a second SIGTERM, which it does act on
            output, _ = process.communicate()
            pytest.fail(f"still serving 30 s after SIGTERM:\n{output}")
    assert process.returncode == 0, output
    assert "Traceback" not in output
    gateway.close()


def test_sighup_stops_nothing(tmp_path: Path, server: str) -> None:
    """SIGHUP (a logrotate script, a closed terminal) leaves the service answering: granian
    respawns its worker gracefully, and one uvicorn process ignores it, saying so. (Its default
    action killed the process mid-request, exit 129.) SIGTERM still stops it cleanly."""
    gateway = Gateway(tmp_path / "one-api.db")
    token = gateway.add_token(used=3)
    with Service({"SQLITE_PATH": str(gateway.path)}, server=server) as service:
        service.process.send_signal(signal.SIGHUP)
        said = "SIGHUP ignored" if server == "uvicorn" else "HUP signal received"
        assert wait_until(lambda: said in service.output(), timeout=10), service.output()
        response = httpx.get(service.url + URL, headers=token.bearer, timeout=10)
        assert response.status_code == 200 and response.json()["data"]["total_used"] == 3
        assert service.process.poll() is None
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(timeout=30) == 0, service.output()
    gateway.close()


def test_redis_black_holed_under_the_real_process(
    tmp_path: Path, redis_server: RedisServer, redis_url: str, server: str
) -> None:
    gateway = Gateway(tmp_path / "one-api.db")
    tokens = [gateway.add_token(used=i) for i in range(10)]
    with TCPProxy(("127.0.0.1", redis_server.port)) as proxy:
        env = {"SQLITE_PATH": str(gateway.path), "REDIS_CONN_STRING": proxy.url, "USAGE_REDIS_TIMEOUT": "0.25"}
        env |= {"USAGE_REDIS_COOLDOWN": "1", "USAGE_LOCAL_TTL": "0", "USAGE_REFRESH_INTERVAL": "0"}
        with Service(env, server=server) as service, httpx.Client(base_url=service.url) as client:

            def poll() -> float:
                slowest = 0.0
                for i, token in enumerate(tokens):
                    started = time.monotonic()
                    response = client.get(URL, headers=token.bearer)
                    slowest = max(slowest, time.monotonic() - started)
                    assert response.status_code == 200 and response.json()["data"]["total_used"] == i
                return slowest

            poll()
            proxy.black_hole()
            slowest, deadline = 0.0, time.monotonic() + 3
            while time.monotonic() < deadline:
                slowest = max(slowest, poll())
            assert slowest < 0.25 + 1.0, f"a request waited {slowest:.2f}s on a black-holed Redis"
            assert wait_until(lambda: "redis unavailable" in service.output(), timeout=5)  # the circuit opened
            proxy.heal()
            assert wait_until(lambda: poll() >= 0 and "redis is back" in service.output(), timeout=15)
    gateway.close()


def _digests(*paths: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.exists()}


def _open_modes(pid: int, paths: list[Path]) -> dict[str, set[int]]:
    """Access modes of the descriptors the process holds on each of `paths`."""
    modes: dict[str, set[int]] = {}
    names = {str(p): p.name for p in paths}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                flags = int(info.read().split("flags:")[1].split()[0], 8)
        except (OSError, IndexError):
            continue
        if target in names:
            modes.setdefault(names[target], set()).add(flags & os.O_ACCMODE)
    return modes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_wal_database_and_its_wal_are_left_byte_identical(tmp_path: Path, redis_url: str) -> None:
    gateway = Gateway(tmp_path / "one-api.db", journal_mode="wal")
    gateway.db.execute("PRAGMA wal_autocheckpoint = 0")  # keep the changes in the -wal file
    token = gateway.add_token()
    for _ in range(20):
        gateway.charge(token, 3)
    db, wal = gateway.path, Path(f"{gateway.path}-wal")
    assert wal.stat().st_size > 0
    before = _digests(db, wal)
    env = {"SQLITE_PATH": str(db), "REDIS_CONN_STRING": redis_url, "USAGE_REFRESH_INTERVAL": "0.2"}
    with Service(env) as service:
        for _ in range(5):
            assert httpx.get(service.url + URL, headers=token.bearer).json()["data"]["total_used"] == 60
            assert httpx.get(service.url + URL, headers={"Authorization": "Bearer sk-nope"}).status_code == 401
        time.sleep(0.5)  # a few refresher rounds read the WAL too
        modes = _open_modes(service.process.pid, [db, wal])
    # SQLite's WAL code opens the -wal read-write whatever the connection's mode; a read-only
    # connection never writes to it, which the checksum below is there to prove.
    assert modes.get("one-api.db") == {os.O_RDONLY} and "one-api.db-wal" in modes, modes
    assert _digests(db, wal) == before
    gateway.close()

    # With the gateway stopped SQLite folds the WAL back; a reader then needs an (empty) -wal and
    # an -shm beside the file, which SQLite creates. The database itself stays byte-identical.
    before = _digests(db)
    with Service(env) as service:
        assert httpx.get(service.url + URL, headers=token.bearer).json()["data"]["total_used"] == 60
    assert _digests(db) == before
    assert not wal.exists() or wal.stat().st_size == 0
    check = sqlite3.connect(db)  # and the gateway opens it normally afterwards
    assert check.execute("SELECT used_quota FROM tokens").fetchone() == (60,)
    check.close()


HOSTILE = [
    pytest.param(
        b"GET " + URL.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n",
        431,
        id="1MiB-header",
    ),
    pytest.param(
        b"GET "
        + URL.encode()
        + b" HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: 1\r\n" % i for i in range(5000))
        + b"\r\n",
        431,
        id="5000-headers",
    ),
    pytest.param(b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431, id="100k-path"),
    pytest.param(b"GARBAGE\r\n\r\n", 400, id="not-http"),
    pytest.param(b"GET " + URL.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400, id="bad-length"),
    pytest.param(b"GET " + URL.encode() + b" HTTP/1.1\r\nBad Header\r\n\r\n", 400, id="header-without-colon"),
    pytest.param(
        b"GET " + URL.encode() + b" HTTP/1.1\r\nAuthorization: Bearer \xff\xfe\r\n\r\n", 401, id="binary-credential"
    ),
    pytest.param(b"GET " + URL.encode() + b" HTTP/1.1\r\nAuthorization: Bearer \x00\r\n\r\n", 400, id="nul-in-header"),
    pytest.param(
        b"POST " + URL.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100_000,
        401,  # refused by the auth middleware; the body is never read
        id="unread-body",
    ),
]


@pytest.fixture(scope="module")
def hostile_target(tmp_path_factory: pytest.TempPathFactory, server: str) -> Iterator[tuple[Service, Token]]:
    gateway = Gateway(tmp_path_factory.mktemp("hostile") / "one-api.db")
    token = gateway.add_token()
    gateway.close()
    with Service({"SQLITE_PATH": str(gateway.path)}, server=server) as service:
        yield service, token
        assert service.stop() == 0
    assert "Traceback" not in service.output()


@pytest.mark.parametrize(("request_bytes", "status"), HOSTILE)
def test_oversized_or_malformed_requests_are_refused_by_the_server(
    hostile_target: tuple[Service, Token], request_bytes: bytes, status: int
) -> None:
    service, token = hostile_target
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        try:
            sock.sendall(request_bytes)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before we finished sending: the answer is still there to read
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and b'"message"' in answer:
                    break
        except ConnectionResetError:
            pass
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    if service.server == "granian" and status in (400, 431):
        # Refused by hyper, inside granian, before the app: its answers have no body and no hook.
        assert b"content-length: 0" in head.lower() and body == b"", answer[:200]
    else:
        assert b"content-type: application/json" in head.lower()
        assert body.startswith(b'{"success":false,"message":')
    # And the process goes on serving.
    assert httpx.get(service.url + URL, headers=token.bearer).status_code == 200


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param(["--log-level", "debug"], id="debug"),
        pytest.param(["--log-level", "debug", "--access-log", "--log-format", "json"], id="debug-access-json"),
    ],
)
def test_no_key_material_in_logs_redis_metrics_or_answers(
    tmp_path: Path, redis_url: str, flags: list[str], server: str
) -> None:
    """Run the real process at debug level through every path that sees a key, then look for
    the raw keys of the run everywhere they could leak."""
    gateway = Gateway(tmp_path / "one-api.db")
    valid = [gateway.add_token() for _ in range(3)]
    disabled = gateway.add_token(status=2)
    banned = gateway.add_token(user_id=gateway.add_user(status=2))
    unknown = ["U" * 48, "u" * 32 + "0" * 16]
    secrets = [t.key for t in [*valid, disabled, banned]] + unknown
    env = {"SQLITE_PATH": str(gateway.path), "REDIS_CONN_STRING": redis_url, "USAGE_AUTH_FAIL_LIMIT": "3"}
    env |= {"USAGE_DB_TIMEOUT": "0.2", "USAGE_REFRESH_INTERVAL": "0.2", "USAGE_CACHE_TTL": "0.5"}
    seen: list[bytes] = []
    with Service(env, *flags, server=server) as service, httpx.Client(base_url=service.url) as client:

        def send(method: str, path: str, **headers: str) -> None:
            response = client.request(method, path, headers=headers)
            seen.append(str(response.headers).encode() + response.content)

        for key in secrets:
            for credential in (f"Bearer sk-{key}", f"bearer {key}-3", f"Bearer sk-{key}!", f"Basic {key}"):
                send("GET", URL, Authorization=credential)
            send("HEAD", URL, Authorization=f"Bearer sk-{key}")
            send("POST", URL, Authorization=f"Bearer sk-{key}")
            send("GET", f"{URL}?key=sk-{key}", Authorization=f"Bearer sk-{key}")
            send("GET", f"/api/usage/token/sk-{key}", Authorization=f"Bearer sk-{key}")
            send("GET", f"/sk-{key}")
            send("GET", URL, **{"X-Api-Key": key, "Authorization": f"Bearer {key}", "If-None-Match": key})
            send("GET", URL, Authorization=f"Bearer sk-{key}" + "x" * 40_000)
        time.sleep(1.0)  # the refresher runs; records expire
        with gateway.exclusive_lock():  # 503s and stale answers
            for key in secrets:
                send("GET", URL, Authorization=f"Bearer sk-{key}")
        time.sleep(1.2)  # metrics are published once a second
        send("GET", "/metrics")
        send("GET", "/readyz")
        metrics = client.get("/metrics").text
        with redis.Redis.from_url(redis_url) as probe:
            stored = redis_contents(probe)
        log = service.output()
    assert "DEBUG" in log or "debug" in log.lower()
    if "--access-log" in flags:
        # Every request was logged but the oversized ones, refused before the app (one per key).
        assert log.count("usage_service.access") >= len(seen) - len(secrets)
    assert any(b"429" in s or b"too many" in s for s in seen)  # the limiter's path was taken too
    places = {
        "log": log.encode(),
        "metrics": metrics.encode(),
        "redis": b" ".join(k + b" " + v for k, v in stored.items()),
        "answers": b"\n".join(seen),
    }
    assert stored and metrics
    for key in secrets:
        for place, text in places.items():
            assert key.encode() not in text, f"a raw key leaked into {place}"
            assert key.lower().encode() not in text.lower(), f"a raw key leaked into {place} (case folded)"
    gateway.close()
