"""End to end: logs, metrics on their own address with several workers, start-up checks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from support import (
    WORKER_STARTED,
    Gateway,
    RedisServer,
    Service,
    environ_without_gateway_settings,
    free_port,
    wait_until,
)

pytestmark = pytest.mark.e2e

URL = "/api/usage/token"


def test_json_access_log(gateway: Gateway, server: str) -> None:
    token = gateway.add_token()
    env = {"SQLITE_PATH": str(gateway.path)}
    with Service(env, "--log-format", "json", "--access-log", server=server) as service:
        # The server does not rewrite the client from X-Forwarded-For: only USAGE_TRUSTED_PROXIES would.
        headers = {**token.bearer, "X-Forwarded-For": "203.0.113.9"}
        assert httpx.get(service.url + URL + f"?k=sk-{token.key}", headers=headers).status_code == 200
        assert httpx.get(service.url + f"/sk-{token.key}").status_code == 404
        assert wait_until(lambda: service.output().count('"usage_service.access"') >= 3)  # with /healthz
    output = service.output()
    entries = [json.loads(line) for line in output.splitlines() if line.strip()]  # every line is JSON
    access = [e for e in entries if e["logger"] == "usage_service.access"]
    usage = next(e for e in access if e["path"] == URL)
    assert usage["method"] == "GET" and usage["status"] == 200 and usage["layer"] == "database"
    assert usage["client"] == "127.0.0.1" and usage["duration_ms"] > 0
    assert any(e["status"] == 404 and e["path"] == "/[redacted]" for e in access)
    assert any(WORKER_STARTED[server] in e.get("message", "") for e in entries)  # the server's own lines too
    assert token.key not in output


def test_the_log_format_in_the_environment_is_read_as_settings_read_it(gateway: Gateway, server: str) -> None:
    # In any case and with spaces, as every setting: the command's own lines (its warnings
    # about Redis and limits come first) are JSON as well as the workers'.
    env = {"SQLITE_PATH": str(gateway.path), "USAGE_LOG_FORMAT": " JSON "}
    with Service(env, server=server) as service:
        assert wait_until(lambda: WORKER_STARTED[server] in service.output())
    lines = [line for line in service.output().splitlines() if line.strip()]
    assert any("REDIS_CONN_STRING is not set" in json.loads(line).get("message", "") for line in lines)
    assert all(line.startswith("{") for line in lines), lines


def test_metrics_address_with_workers(gateway: Gateway, server: str) -> None:
    tokens = [gateway.add_token() for _ in range(20)]
    port = free_port()
    env = {"SQLITE_PATH": str(gateway.path), "USAGE_METRICS_ADDRESS": f"127.0.0.1:{port}"}
    with Service(env, "--workers", "2", server=server) as service:
        for token in tokens:  # new connections: spread over both workers
            assert httpx.get(service.url + URL, headers=token.bearer).status_code == 200
        assert httpx.get(service.url + "/metrics").status_code == 404

        def served(name: str, **labels: str) -> float:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.TransportError:
                return 0
            return sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == name and sample.labels == labels
            )

        # Each worker publishes once a second; whichever worker serves the address shows both.
        assert wait_until(lambda: served("usage_http_requests_total", route=URL, status="200") == len(tokens), 15)
        histogram = "usage_http_request_duration_seconds"
        assert served(histogram + "_count", route=URL) == len(tokens)
        assert served(histogram + "_bucket", route=URL, le="+Inf") == len(tokens)


def _workers(pid: int) -> set[int]:
    """The server's worker processes (not multiprocessing's resource tracker, which uvicorn's
    supervisor also starts)."""
    workers = set()
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            if b"resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.add(int(child))
    return workers


def _listening(port: int) -> set[int]:
    """The processes holding a listening IPv4 socket on `port` (read from /proc)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # 0A: LISTEN
            inodes.add(f"socket:[{fields[9]}]")
    holders = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in inodes for fd in fd_dir.iterdir()):
                holders.add(int(fd_dir.parent.name))
    return holders


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_that_dies_is_replaced_and_its_metrics_address_taken_over(gateway: Gateway, server: str) -> None:
    """operations.md: with --workers N a worker that dies is replaced, and if it served the
    metrics address, another worker takes the address over within 5 seconds."""
    token = gateway.add_token()
    port = free_port()
    env = {"SQLITE_PATH": str(gateway.path), "USAGE_METRICS_ADDRESS": f"127.0.0.1:{port}"}
    with Service(env, "--workers", "2", server=server) as service:

        def metrics_served() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        assert wait_until(metrics_served, 15), service.output()
        assert wait_until(lambda: len(_workers(service.process.pid)) == 2, 15)
        workers = _workers(service.process.pid)
        [holder] = _listening(port) & workers
        os.kill(holder, signal.SIGKILL)
        killed = time.monotonic()
        assert wait_until(metrics_served, 10), service.output()
        assert time.monotonic() - killed < 6

        def replaced() -> bool:
            try:
                answered = httpx.get(service.url + URL, headers=token.bearer, timeout=1).status_code == 200
            except httpx.TransportError:
                return False
            now = _workers(service.process.pid)
            return answered and holder not in now and len(now) == len(workers)

        assert wait_until(replaced, 15), service.output()
        # The replacement has started (one still starting when SIGTERM comes misses it, and is
        # killed later: test_granian_e2e's test_sigterm_while_a_replacement_worker_starts...).
        assert wait_until(lambda: service.output().count(WORKER_STARTED[server]) == 3, 15), service.output()
        assert _listening(port) & _workers(service.process.pid)
        assert service.process.poll() is None
        assert service.stop() == 0, service.output()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_replacement_worker_that_cannot_start_stops_the_server_with_a_failure(tmp_path: Path, server: str) -> None:
    """With --workers N, a worker that dies is replaced; if its replacement cannot start (the
    database file became one that is no gateway database meanwhile), the server stops, and the
    exit status says it failed. uvicorn's supervisor stopped the other workers and returned as
    after SIGTERM: the command exited 0, and a supervisor restarting only what fails (systemd's
    Restart=on-failure) left the service down."""
    gateway = Gateway(tmp_path / "one-api.db")
    gateway.add_token()
    gateway.close()
    with Service({"SQLITE_PATH": str(gateway.path)}, "--workers", "2", server=server) as service:
        assert wait_until(lambda: len(_workers(service.process.pid)) == 2, 15)
        gateway.path.unlink()
        with contextlib.closing(sqlite3.connect(gateway.path)) as other:
            other.execute("CREATE TABLE other (x)")
            other.commit()
        os.kill(min(_workers(service.process.pid)), signal.SIGKILL)
        status = service.process.wait(timeout=30)
    assert status != 0, service.output()


def test_metrics_address_in_use_stops_start_up(gateway: Gateway) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {
            **environ_without_gateway_settings(),
            "SQLITE_PATH": str(gateway.path),
            "USAGE_METRICS_ADDRESS": f"127.0.0.1:{port}",
        }
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "usage_service", "--port", str(free_port())],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2
    assert "USAGE_METRICS_ADDRESS: cannot listen on" in result.stderr
    assert time.monotonic() - started < 30


def test_a_metrics_directory_that_cannot_be_written_stops_start_up(gateway: Gateway, tmp_path: Path) -> None:
    """Each worker failed as it started, and was started again, for ever: the port never answered."""
    env = {
        **environ_without_gateway_settings(),
        "SQLITE_PATH": str(gateway.path),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "missing"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "usage_service", "--port", str(free_port()), "--workers", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"usage-service: error: PROMETHEUS_MULTIPROC_DIR: {str(tmp_path / 'missing')!r} is not a directory this"
        " user can write (the workers keep their metrics there); create it, or unset it"
    ]


def test_an_operators_metrics_directory_starts_empty_with_one_worker(gateway: Gateway) -> None:
    """With one worker the directory was not emptied: the previous run's counts were added in.
    Emptying it takes the workers' files only: a directory shared with the gateway's database
    (which is a .db file too) keeps it."""
    token = gateway.add_token()
    beside = gateway.path.parent
    assert (beside / "one-api.db").exists()
    env = {"SQLITE_PATH": str(gateway.path), "PROMETHEUS_MULTIPROC_DIR": str(beside)}

    def answered_after_three_polls() -> float:
        with Service(env) as service:
            for _ in range(3):
                assert httpx.get(service.url + "/api/usage/token", headers=token.bearer).status_code == 200
            text = httpx.get(service.url + "/metrics").text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "usage_http_requests_total" and sample.labels["route"] == "/api/usage/token"
        )

    assert answered_after_three_polls() == 3
    assert answered_after_three_polls() == 3
    assert gateway.path.exists()


def _start_up(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command to where it serves or stops; bounded, so that a start-up that hangs
    fails the test instead of holding it."""
    return subprocess.run(
        [sys.executable, "-m", "usage_service", "--host", "127.0.0.1", "--port", str(free_port()), *args],
        env={**environ_without_gateway_settings(), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )


SENTINEL = {"USAGE_REDIS_MODE": "sentinel", "USAGE_REDIS_SENTINELS": "127.0.0.1:26379"}


@pytest.mark.parametrize(
    ("env", "words"),
    [
        pytest.param({"REDIS_CONN_STRING": "redis://127.0.0.1:6390/0?db=abc"}, "database is a number", id="db-abc"),
        pytest.param(
            {"REDIS_CONN_STRING": "redis://127.0.0.1:6390/0?socket_timeout=5s"}, "unknown option", id="redis-py-option"
        ),
        pytest.param(
            {"REDIS_CONN_STRING": "redis://127.0.0.1:7000?db=1", "USAGE_REDIS_MODE": "cluster"},
            "only database 0",
            id="cluster-db-option",
        ),
        pytest.param(
            {"REDIS_CONN_STRING": "redis://127.0.0.1:6390?db=abc", **SENTINEL}, "database is a number", id="sentinel"
        ),
    ],
)
def test_a_redis_url_redis_py_would_refuse_stops_start_up_in_one_line(
    gateway: Gateway, server: str, env: dict[str, str], words: str
) -> None:
    """The query string was first read in the worker, by redis-py: a traceback, "Application
    startup failed", and then the process never exited (aiosqlite's thread, left running by the
    failed set-up, is no daemon), not even on SIGTERM."""
    result = _start_up({"SQLITE_PATH": str(gateway.path), **env}, "--server", server)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("usage-service: error: REDIS_CONN_STRING: ") and words in line


def test_a_redis_url_with_the_gateways_options_is_served(gateway: Gateway, redis_server: RedisServer) -> None:
    """go-redis's options, which the gateway takes (redis-py raised TypeError on dial_timeout),
    are taken; the database the query names is the one written to."""
    token = gateway.add_token()
    url = f"redis://127.0.0.1:{redis_server.port}/0?dial_timeout=5s&read_timeout=3s&pool_size=20&db=7"
    database_7 = redis.Redis(port=redis_server.port, db=7)
    database_7.flushdb()
    try:
        env = {"SQLITE_PATH": str(gateway.path), "REDIS_CONN_STRING": url, "USAGE_REFRESH_INTERVAL": "0"}
        with Service(env) as service:
            assert httpx.get(service.url + URL, headers=token.bearer).status_code == 200
            assert wait_until(lambda: any(database_7.scan_iter("usage:tok:*")), 5), service.output()
    finally:
        database_7.flushdb()
        database_7.close()


def test_a_postgres_port_out_of_range_stops_start_up_in_one_line() -> None:
    """asyncpg's OverflowError: 79 lines of traceback and exit status 1."""
    result = _start_up({"SQL_DSN": "postgres://u:s3cret@127.0.0.1:99999/db"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "usage-service: error: SQL_DSN: malformed PostgreSQL URL: the port is not a number between 1 and 65535"
    ]


@pytest.mark.parametrize("where", ["read-only-directory", "not-a-database"])
def test_a_demo_database_that_cannot_be_made_stops_start_up_in_one_line(tmp_path: Path, where: str) -> None:
    """sqlite3's OperationalError or DatabaseError, as a traceback."""
    if where == "read-only-directory":
        cwd = Path("/proc")  # not writable, by root either
    else:
        cwd = tmp_path
        (tmp_path / "usage-service-demo.db").write_text("not a database\n")
    result = _start_up({}, "--demo", cwd=cwd)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"usage-service: error: --demo: cannot use {str(cwd / 'usage-service-demo.db')!r}")
    if where == "not-a-database":
        assert (tmp_path / "usage-service-demo.db").read_text() == "not a database\n"
