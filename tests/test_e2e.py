"""End to end: the real `usage-service` process, a real redis-server, a gateway writing its file."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from conftest import GatewayFactory
from support import (
    WORKER_STARTED,
    Gateway,
    RedisServer,
    Service,
    Token,
    environ_without_gateway_settings,
    free_port,
)

pytestmark = pytest.mark.e2e

URL = "/api/usage/token"


class GatewayWriter:
    """Charges a token continuously from another thread, as the gateway does on every relay."""

    def __init__(self, gateway: Gateway, token: Token, interval: float = 0.005) -> None:
        self.gateway = gateway
        self.token = token
        self.interval = interval
        self.charged = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.gateway.charge(self.token, 7)
            self.charged += 7
            time.sleep(self.interval)

    def __enter__(self) -> GatewayWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_serves_a_database_the_gateway_is_writing(
    tmp_path: Path, redis_url: str, journal_mode: str, server: str
) -> None:
    gateway = Gateway(tmp_path / "one-api.db", journal_mode=journal_mode)
    token = gateway.add_token(remain=1_000_000, used=0)
    env = {"SQLITE_PATH": f"{gateway.path}?_busy_timeout=30000", "REDIS_CONN_STRING": redis_url, "USAGE_CACHE_TTL": "1"}
    with Service(env, server=server) as service, httpx.Client(base_url=service.url, headers=token.bearer) as client:
        with GatewayWriter(gateway, token) as writer:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                response = client.get(URL)
                assert response.status_code == 200
                data = response.json()["data"]
                # Every answer is one consistent row: whatever was charged moved from remain to used.
                assert data["total_granted"] == 1_000_000
                assert 0 <= data["total_used"] <= writer.charged
                time.sleep(0.01)
        stopped = time.monotonic()
        final = writer.charged
        assert final > 0
        while client.get(URL).json()["data"]["total_used"] != final:
            assert time.monotonic() - stopped < 1 + 1, "a charge was not served within USAGE_CACHE_TTL + 1 s"
            time.sleep(0.02)
    gateway.close()


@pytest.mark.parametrize("engine", ["postgres", "mysql"])
def test_serves_a_database_server_the_gateway_is_writing(
    make_gateway: GatewayFactory, redis_url: str, engine: str, server: str
) -> None:
    """SQL_DSN in the gateway's own form, two workers, a gateway charging the token meanwhile."""
    gateway = make_gateway(engine)
    token = gateway.add_token(remain=1_000_000, used=0)
    env = {"SQL_DSN": gateway.dsn, "REDIS_CONN_STRING": redis_url, "USAGE_CACHE_TTL": "1"}  # type: ignore[attr-defined]
    service = Service(env, "--workers", "2", server=server)
    with service, httpx.Client(base_url=service.url, headers=token.bearer) as client:
        with GatewayWriter(gateway, token) as writer:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                response = client.get(URL)
                assert response.status_code == 200
                assert response.json()["data"]["total_granted"] == 1_000_000
                time.sleep(0.01)
        stopped, final = time.monotonic(), writer.charged
        assert final > 0
        while client.get(URL).json()["data"]["total_used"] != final:
            assert time.monotonic() - stopped < 1 + 1, "a charge was not served within USAGE_CACHE_TTL + 1 s"
            time.sleep(0.02)
        assert client.get("/readyz").json()["database"] == "ok"
    assert "r3ad-only" not in service.output()  # the password, in any form


def test_redis_killed_mid_run(tmp_path: Path, server: str) -> None:
    gateway = Gateway(tmp_path / "one-api.db")
    tokens = [gateway.add_token(used=i) for i in range(20)]
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    env = {
        "SQLITE_PATH": str(gateway.path),
        "REDIS_CONN_STRING": redis_server.url,
        "USAGE_REDIS_TIMEOUT": "0.2",
        "USAGE_REDIS_COOLDOWN": "0.5",
        "USAGE_LOCAL_TTL": "0.05",
        "USAGE_CACHE_TTL": "5",
    }
    try:
        with Service(env, server=server) as service, httpx.Client(base_url=service.url) as client:

            def poll_all() -> float:
                slowest = 0.0
                for i, token in enumerate(tokens):
                    started = time.monotonic()
                    response = client.get(URL, headers=token.bearer)
                    slowest = max(slowest, time.monotonic() - started)
                    assert response.status_code == 200, response.text
                    assert response.json()["data"]["total_used"] == i
                return slowest

            poll_all()
            redis_server.stop()
            deadline = time.monotonic() + 1.5
            slowest = 0.0
            while time.monotonic() < deadline:
                slowest = max(slowest, poll_all())
            assert slowest < 1.0, f"a request waited {slowest:.2f}s on the dead Redis"

            gateway.charge(tokens[0], 0)
            redis_server.start()
            probe = redis.Redis.from_url(redis_server.url)
            deadline = time.monotonic() + 10
            while probe.dbsize() < len(tokens):
                assert time.monotonic() < deadline, "the service did not return to Redis"
                time.sleep(0.1)
                poll_all()
            probe.close()
            assert "redis is back" in service.output()
    finally:
        redis_server.stop()
        gateway.close()


def _read_only_descriptors(pid: int, path: Path) -> list[int]:
    """Return the access-mode flags of every descriptor the process holds on `path` (or its journals)."""
    modes = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                flags = int(re.search(r"flags:\s+(\d+)", info.read()).group(1), 8)  # type: ignore[union-attr]
            if target == str(path):
                modes.append(flags & os.O_ACCMODE)
    return modes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_database_is_opened_read_only_and_left_untouched(tmp_path: Path, redis_url: str) -> None:
    gateway = Gateway(tmp_path / "one-api.db")
    token = gateway.add_token()
    gateway.close()
    before = hashlib.sha256(gateway.path.read_bytes()).hexdigest()
    env = {"SQLITE_PATH": str(gateway.path), "REDIS_CONN_STRING": redis_url}
    with Service(env) as service:
        for _ in range(5):
            assert httpx.get(service.url + URL, headers=token.bearer).status_code == 200
            assert httpx.get(service.url + URL, headers={"Authorization": "Bearer sk-nope"}).status_code == 401
        modes = _read_only_descriptors(service.process.pid, gateway.path)
        assert modes, "the service holds no descriptor on the database"
        assert set(modes) == {os.O_RDONLY}
    assert hashlib.sha256(gateway.path.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one-api.db"]


def test_sigterm_exits_cleanly(gateway: Gateway, server: str) -> None:
    with Service({"SQLITE_PATH": str(gateway.path)}, server=server) as service:
        assert service.stop() == 0
        assert service.output().count("in-process only") == 1  # said once at start without Redis


def test_several_workers_share_the_port(gateway: Gateway, server: str) -> None:
    token = gateway.add_token(name="w")
    with Service({"SQLITE_PATH": str(gateway.path)}, "--workers", "2", server=server) as service:
        for _ in range(20):
            assert httpx.get(service.url + URL, headers=token.bearer).json()["data"]["name"] == "w"
    assert service.output().count(WORKER_STARTED[server]) == 2  # each worker ran the lifespan


def _run_printed_curl_line(process: subprocess.Popen[bytes]) -> str:
    assert process.stdout is not None
    curl_line = ""
    for line in process.stdout:
        if line.strip().startswith(b"curl "):
            curl_line = line.decode().strip()
            break
    assert curl_line, "no curl line printed"
    args = shlex.split(curl_line)
    deadline = time.monotonic() + 15
    while True:
        if shutil.which("curl"):
            body = subprocess.run(args, capture_output=True, text=True).stdout
        else:  # the same request without curl
            body = httpx.get(args[2], headers=dict([args[4].split(": ", 1)])).text
        if '"token_usage"' in body or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


@pytest.fixture
def demo_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def test_demo_prints_a_working_curl_line(demo_dir: Path) -> None:
    port = free_port()
    script = Path(sys.executable).parent / "usage-service"
    command = [str(script), "--demo", "--host", "127.0.0.1", "--port", str(port)]
    with subprocess.Popen(
        command, cwd=demo_dir, env=environ_without_gateway_settings(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as process:
        try:
            body = _run_printed_curl_line(process)
        finally:
            process.terminate()
            process.wait(timeout=15)
    assert '"name":"demo"' in body
    assert '"code":true' in body
    assert (demo_dir / "usage-service-demo.db").exists()


def test_demo_uses_nothing_of_the_deployment_it_is_started_in(
    demo_dir: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    """Started with a gateway's environment, the demo reads its own file and nothing else: not
    the gateway's log database (it would show that log's rows to the demo's key), nor its
    Redis (where the demo's tokens would be answered from, and written over, by token id)."""
    port = free_port()
    script = Path(sys.executable).parent / "usage-service"
    env = {
        **environ_without_gateway_settings(),
        "SQL_DSN": "postgres://gateway:pw@127.0.0.1:1/new-api",
        "LOG_SQL_DSN": "postgres://gateway:pw@127.0.0.1:1/new-api-logs",
        "REDIS_CONN_STRING": redis_url,
    }
    command = [str(script), "--demo", "--port", str(port)]
    with subprocess.Popen(command, cwd=demo_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
        try:
            _run_printed_curl_line(process)
            with sqlite3.connect(f"file:{demo_dir / 'usage-service-demo.db'}?mode=ro", uri=True) as db:
                (key,) = db.execute("SELECT key FROM tokens LIMIT 1").fetchone()
            bearer = {"Authorization": f"Bearer sk-{key}"}
            base = f"http://127.0.0.1:{port}"
            assert httpx.get(base + "/api/log/token", headers=bearer).json()["data"]  # the demo's own log
            assert httpx.get(base + "/api/usage/token/history", headers=bearer).status_code == 200
        finally:
            process.terminate()
            process.wait(timeout=15)
    assert redis_client.dbsize() == 0


@pytest.mark.parametrize(
    ("env", "words"),
    [
        pytest.param({"SQLITE_PATH": "{tmp}/missing.db"}, "SQLITE_PATH: database file", id="missing-file"),
        pytest.param({"SQL_DSN": "postgres://u:p@127.0.0.1:1/x"}, "SQL_DSN: PostgreSQL database 'x'", id="pg-down"),
        pytest.param(
            {"SQL_DSN": "u:p@tcp(127.0.0.1:1)/x"}, "SQL_DSN: MySQL database 'x' on 127.0.0.1:1", id="mysql-down"
        ),
        pytest.param({"SQL_DSN": "u:p@tcp(db:3306/x"}, "SQL_DSN: malformed MySQL DSN", id="mysql-malformed"),
        pytest.param({"SQLITE_PATH": "{tmp}/other.db"}, "has no tokens table", id="not-a-gateway-db"),
        pytest.param({"SQLITE_PATH": "{tmp}/garbage.db"}, "SQLITE_PATH: cannot read", id="not-sqlite"),
        pytest.param({"USAGE_CACHE_TTL": "soon"}, "USAGE_CACHE_TTL:", id="bad-ttl"),
        pytest.param({"PORT": "http"}, "PORT: expected a port number", id="bad-port"),
    ],
)
def test_bad_configuration_stops_start_up_with_one_line(tmp_path: Path, env: dict[str, str], words: str) -> None:
    import sqlite3

    with sqlite3.connect(tmp_path / "other.db") as db:
        db.execute("CREATE TABLE notes (x)")
    (tmp_path / "garbage.db").write_bytes(b"this is not a database" * 100)
    gateway = Gateway(tmp_path / "one-api.db")
    gateway.close()
    env = {"SQLITE_PATH": str(gateway.path), **{k: v.format(tmp=tmp_path) for k, v in env.items()}}
    command = [sys.executable, "-m", "usage_service"] + ([] if "PORT" in env else ["--port", str(free_port())])
    result = subprocess.run(
        command, env={**environ_without_gateway_settings(), **env}, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "missing.db").exists()


def test_help_documents_every_flag_and_variable() -> None:
    from usage_service.config import VARIABLES

    result = subprocess.run([sys.executable, "-m", "usage_service", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ("--host", "--port", "--workers", "--server", "--log-level", "--demo"):
        assert flag in result.stdout
    for name, _, _ in VARIABLES:
        assert name in result.stdout


def _metric(text: str, name: str) -> float:
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


def test_metrics_add_up_across_workers(gateway: Gateway, redis_url: str, server: str) -> None:
    tokens = [gateway.add_token() for _ in range(30)]
    env = {"SQLITE_PATH": str(gateway.path), "REDIS_CONN_STRING": redis_url, "USAGE_REFRESH_INTERVAL": "0"}
    with Service(env, "--workers", "2", server=server) as service, httpx.Client(base_url=service.url) as client:
        for token in tokens:  # new connections: spread over both workers
            assert httpx.get(service.url + URL, headers=token.bearer).status_code == 200
        # Each worker publishes once a second (and the one scraped, at the scrape): on a loaded
        # machine the other's may come later than a fixed wait, so wait for the lookups to show.
        deadline = time.monotonic() + 15
        while _metric(text := client.get("/metrics").text, "usage_db_lookups_total") < len(tokens):
            assert time.monotonic() < deadline, "the workers' lookups were not all published"
            time.sleep(0.1)
    assert _metric(text, "usage_db_statements_total") == len(tokens)
    assert _metric(text, "usage_db_lookups_total") == len(tokens)
    for line in text.splitlines():
        for token in tokens:
            assert token.key not in line
