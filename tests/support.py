"""Test helpers: a stand-in gateway that writes its database, and a real redis-server."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from usage_service.demo import GATEWAY_SCHEMA, new_key

# The request log alone, for a log database of its own (LOG_SQL_DSN): the demo schema ends with it.
SQLITE_LOGS_SCHEMA = GATEWAY_SCHEMA[GATEWAY_SCHEMA.index("CREATE TABLE `logs`") :]


# Every port free_port has handed out in this session.
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on now, and one not handed out before in this session.

    The port is free only until someone binds it, and a Sentinel group or a Cluster takes all
    of its ports before its first server starts; the kernel may give the same free port to two
    binds in a row, which would put two of those servers on one port.
    """
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no loopback port left that this session has not handed out")


@dataclass(frozen=True)
class Token:
    id: int
    key: str  # as stored, without "sk-"
    user_id: int

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer sk-{self.key}"}


class Gateway:
    """Writes a new-api database the way the gateway does: short autocommit transactions.

    This one writes a SQLite file; tests/dbservers.py has the PostgreSQL and MySQL ones.
    """

    database: object = None  # what Settings.database is for this gateway (None: SQLite at `path`)

    def __init__(self, path: Path, *, schema: str = GATEWAY_SCHEMA, journal_mode: str = "delete") -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        self.db.execute(f"PRAGMA journal_mode={journal_mode}")
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name IN ('tokens', 'logs')").fetchone():
            self.db.executescript(schema)

    @property
    def log_database(self) -> object:
        """What Settings.log_database is to read the log this gateway writes (LOG_SQL_DSN)."""
        return self.path if self.database is None else self.database

    def close(self) -> None:
        self.db.close()

    def _execute(self, sql: str, params: Sequence[object]) -> int:
        """Run one statement written for SQLite (`?`, backticks); return the new row's id."""
        return int(self.db.execute(sql, params).lastrowid or 0)

    def add_user(self, *, status: int = 1, deleted: bool = False, quota: int = 0, used_quota: int = 0) -> int:
        user_id = self._execute(
            "INSERT INTO users (username, password, status, quota, deleted_at) VALUES (?, '!', ?, ?, ?)",
            (f"user{time.monotonic_ns()}", status, quota, "2024-01-01 00:00:00" if deleted else None),
        )
        if used_quota:  # one-api era schemas lack the column
            self.update_user(user_id, used_quota=used_quota)
        return user_id

    def add_tokens(self, count: int) -> list[str]:
        """Insert many usable tokens of one new user in one transaction (SQLite); return their keys."""
        user = self.add_user()
        keys = [new_key() for _ in range(count)]
        self.db.execute("BEGIN")
        self.db.executemany(
            "INSERT INTO tokens (user_id, `key`, status, name, created_time, accessed_time, expired_time, remain_quota,"
            " used_quota, unlimited_quota) VALUES (?, ?, 1, 'sweep', 0, 0, -1, 1000, 0, 0)",
            [(user, key) for key in keys],
        )
        self.db.execute("COMMIT")
        return keys

    def set_option(self, key: str, value: str | None) -> None:
        """Write one of the gateway's settings as its admin page does (None deletes the row)."""
        if value is None:
            self.db.execute("DELETE FROM options WHERE `key` = ?", (key,))
        else:
            self.db.execute("INSERT OR REPLACE INTO options (`key`, `value`) VALUES (?, ?)", (key, value))

    def add_token(
        self,
        *,
        user_id: int | None = None,
        key: str | None = None,
        name: str = "my token",
        status: int = 1,
        remain: int = 1000,
        used: int = 0,
        unlimited: object = 0,
        model_limits_enabled: object = 0,
        model_limits: str | None = "",
        expired_time: int | None = -1,
        deleted: bool = False,
    ) -> Token:
        if user_id is None:
            user_id = self.add_user()
        key = key or new_key()
        token_id = self._execute(
            "INSERT INTO tokens (user_id, `key`, status, name, created_time, accessed_time, expired_time, remain_quota,"
            " used_quota, unlimited_quota, model_limits_enabled, model_limits, deleted_at)"
            " VALUES (?, ?, ?, ?, 0, 0, ?, ?, ?, ?, ?, ?, ?)",
            (
                user_id,
                key,
                status,
                name,
                expired_time,
                remain,
                used,
                unlimited,
                model_limits_enabled,
                model_limits,
                "2024-01-01 00:00:00" if deleted else None,
            ),
        )
        return Token(token_id, key, user_id)

    def update_token(self, token: Token, **columns: object) -> None:
        sets = ", ".join(f"`{name}` = ?" for name in columns)
        self._execute(f"UPDATE tokens SET {sets} WHERE id = ?", (*columns.values(), token.id))

    def update_user(self, user_id: int, **columns: object) -> None:
        sets = ", ".join(f"`{name}` = ?" for name in columns)
        self._execute(f"UPDATE users SET {sets} WHERE id = ?", (*columns.values(), user_id))

    def charge(self, token: Token, amount: int) -> None:
        """Bill a relay request against a token, as the gateway does."""
        self._execute(
            "UPDATE tokens SET remain_quota = remain_quota - ?, used_quota = used_quota + ?, accessed_time = ?"
            " WHERE id = ?",
            (amount, amount, int(time.time()), token.id),
        )

    def add_log(
        self,
        token: Token | None,
        *,
        created_at: int | None = None,
        type: int = 2,
        model_name: str = "gpt-4o-mini",
        quota: int = 100,
        prompt_tokens: int = 10,
        completion_tokens: int = 5,
        content: str = "",
        user_id: int | None = None,
        channel_id: int = 1,
        ip: str = "",
        other: str = "{}",
        use_time: int = 1,
        is_stream: object = 0,
        group: str = "default",
        token_name: str = "my token",
        username: str = "someone",
    ) -> int:
        """Append one row to the gateway's request log as it does after a relay request (type 2:
        consume); return its id. `token=None` writes a row made by no token (token_id 0)."""
        return self._execute(
            "INSERT INTO logs (user_id, created_at, type, content, username, token_name, model_name, quota,"
            " prompt_tokens, completion_tokens, use_time, is_stream, channel_id, token_id, `group`, ip, other)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                user_id if user_id is not None else (token.user_id if token else 0),
                int(time.time()) if created_at is None else created_at,
                type,
                content,
                username,
                token_name,
                model_name,
                quota,
                prompt_tokens,
                completion_tokens,
                use_time,
                is_stream,
                channel_id,
                token.id if token else 0,
                group,
                ip,
                other,
            ),
        )

    def clean_logs(self, *, before: int) -> None:
        """Delete the log rows older than a cut-off, as the gateway's periodic clean-up does."""
        self._execute("DELETE FROM logs WHERE created_at < ?", (before,))

    @contextlib.contextmanager
    def exclusive_lock(self) -> Iterator[None]:
        """Hold an exclusive write transaction, as a gateway migration would."""
        lock = sqlite3.connect(self.path, isolation_level=None, timeout=10)
        try:
            lock.execute("BEGIN EXCLUSIVE")
            lock.execute("UPDATE tokens SET accessed_time = accessed_time")
            yield
        finally:
            lock.execute("ROLLBACK")
            lock.close()


class RedisServer:
    """A real redis-server on a free loopback port, which tests may stop and start again."""

    def __init__(self, workdir: Path, *extra_args: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; run scripts/test, which installs it")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [*args, "--dir", str(self.workdir), *self.extra_args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


def sample_value(metrics: str, sample: str) -> float:
    """One sample's value (its name and labels as exposed) in a /metrics text, 0 if absent. The
    counters are the process's: a test compares the values before and after what it does."""
    for line in metrics.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def environ_without_gateway_settings() -> dict[str, str]:
    env = dict(os.environ)
    for name in list(env):
        if name.startswith("USAGE_") or name in ("SQL_DSN", "SQLITE_PATH", "REDIS_CONN_STRING", "PORT"):
            del env[name]
    return env


# A line each server logs once per worker, when the worker has run the lifespan's start-up.
WORKER_STARTED = {"uvicorn": "Application startup complete", "granian": "Started worker-"}


class Service:
    """The real `usage-service` process on a free loopback port, served by `server`."""

    def __init__(self, env: dict[str, str], *args: str, cwd: Path | None = None, server: str = "uvicorn") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = server
        command = [sys.executable, "-m", "usage_service", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--server", server, *args]
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            command,
            env={**environ_without_gateway_settings(), **env},
            cwd=cwd,
            stdout=self.log,
            stderr=self.log,
            start_new_session=True,  # its own process group: a kill takes its workers too
        )

    def wait_ready(self, timeout: float = 15.0) -> Service:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"usage-service exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=0.5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"usage-service did not become healthy:\n{self.output()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def output(self) -> str:
        if self.log.closed:
            return self._final_output
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def __enter__(self) -> Service:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._final_output = self.output()
        self.log.close()


def redis_contents(client: redis.Redis) -> dict[bytes, bytes]:
    """Every key in Redis with its value flattened to bytes, whatever its type."""
    contents = {}
    for name in client.scan_iter("*"):
        kind = client.type(name)
        if kind == b"string":
            value = client.get(name) or b""
        elif kind == b"zset":
            value = b" ".join(client.zrange(name, 0, -1))
        elif kind == b"hash":
            value = b" ".join(k + b"=" + v for k, v in client.hgetall(name).items())
        else:
            value = b" ".join(client.lrange(name, 0, -1) if kind == b"list" else client.smembers(name))
        contents[name] = value
    return contents
