"""What only `usage-service --server granian`'s setup decides (usage_service/_granian.py).

The contract, fault, shutdown, hostile-input and HTTP-edge suites run on both servers (conftest's
`server` fixture); these are what only granian's setup decides: the exact head bound hyper keeps,
start-up errors from its Rust side, and replacing a worker that dies.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from support import Gateway, Service, environ_without_gateway_settings, wait_until

from usage_service._granian import STOP_MARGIN
from usage_service._http import MAX_REQUEST_HEAD

pytestmark = pytest.mark.e2e

URL = "/api/usage/token"


def _exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes the connection or goes quiet for a second."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(1)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return answer


@pytest.fixture(scope="module")
def granian_service(tmp_path_factory: pytest.TempPathFactory) -> Service:
    gateway = Gateway(tmp_path_factory.mktemp("granian") / "one-api.db")
    gateway.close()
    with Service({"SQLITE_PATH": str(gateway.path)}, server="granian") as service:
        yield service  # type: ignore[misc]
    assert "Traceback" not in service.output()


@pytest.mark.parametrize(
    ("header_bytes", "status"),
    [
        pytest.param(MAX_REQUEST_HEAD - 1024, b"404", id="under-the-bound"),
        # hyper may read once more before it checks: at most twice the bound (see _granian.py).
        pytest.param(2 * MAX_REQUEST_HEAD + 1024, b"431", id="over-twice-the-bound"),
    ],
)
def test_a_request_head_is_bounded_at_max_request_head(
    granian_service: Service, header_bytes: int, status: bytes
) -> None:
    """Heads up to the bound uvicorn has are read, none over twice it (granian's default takes 400 KiB)."""
    request = b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + b"a" * header_bytes + b"\r\n\r\n"
    answer = _exchange(granian_service.port, request)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]


@pytest.mark.parametrize(("fields", "status"), [(100, b"404"), (101, b"431")])
def test_more_than_100_header_fields_are_refused(granian_service: Service, fields: int, status: bytes) -> None:
    """hyper's bound on a head's fields (docs/operations.md): 100, each short here."""
    head = b"".join(b"X-F%d: v\r\n" % i for i in range(fields - 2))  # with Host and Connection
    answer = _exchange(granian_service.port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + head + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]


def test_a_port_in_use_stops_start_up_with_one_line(gateway: Gateway) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        command = [sys.executable, "-m", "usage_service", "--server", "granian", "--host", "127.0.0.1"]
        # With RUST_BACKTRACE set, granian's error carries a Rust backtrace: still one line.
        env = {**environ_without_gateway_settings(), "SQLITE_PATH": str(gateway.path), "RUST_BACKTRACE": "1"}
        result = subprocess.run([*command, "--port", str(port)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"usage-service: error: cannot serve on 127.0.0.1:{port}: Address already in use (os error 98)"]
    assert "Traceback" not in result.stderr and "backtrace" not in result.stderr.lower()


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_that_dies_is_replaced(gateway: Gateway) -> None:
    token = gateway.add_token()
    with Service({"SQLITE_PATH": str(gateway.path)}, server="granian") as service:
        [worker] = _children(service.process.pid)
        os.kill(worker, signal.SIGKILL)

        def replaced() -> bool:
            try:
                answered = httpx.get(service.url + URL, headers=token.bearer, timeout=1).status_code == 200
            except httpx.TransportError:
                return False
            return answered and worker not in _children(service.process.pid)

        assert wait_until(replaced, timeout=15), service.output()
        assert service.process.poll() is None
        assert service.stop() == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_while_a_replacement_worker_starts_still_stops_the_server(gateway: Gateway) -> None:
    """A worker just spawned to replace one that died misses a SIGTERM that comes before it has
    started, and serves on: granian kills it USAGE_HEADER_TIMEOUT + STOP_MARGIN seconds later
    (it waited for ever), and the command exits 0."""
    with Service({"SQLITE_PATH": str(gateway.path), "USAGE_HEADER_TIMEOUT": "2"}, server="granian") as service:
        [worker] = _children(service.process.pid)
        os.kill(worker, signal.SIGKILL)
        assert wait_until(lambda: service.output().count("Spawning worker-1") == 2, timeout=15), service.output()
        started = time.monotonic()
        assert service.stop() == 0, service.output()
        assert time.monotonic() - started < 2 + STOP_MARGIN + 3
