"""The `usage-service` command: check the configuration, then hand over to uvicorn or granian."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import importlib.util
import ipaddress
import logging
import os
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import uvicorn
from redis.exceptions import RedisError
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from . import __version__, logs
from ._http import LimitedHttpToolsProtocol, raise_descriptor_limit
from ._metric_files import worker_files
from .config import (
    DEFAULT_PORT,
    LOG_FORMATS,
    VARIABLES,
    ConfigError,
    Settings,
    check_database_file,
    load_settings,
    read_variable,
)
from .demo import DEMO_DB, ensure_demo_db
from .redis_client import create_client
from .store import SchemaError, open_store

logger = logging.getLogger("usage_service")

# What --demo leaves out of the environment it was started in: the gateway's databases and Redis.
DEMO_IGNORES = (
    "SQL_DSN",
    "LOG_SQL_DSN",
    "REDIS_CONN_STRING",
    "USAGE_REDIS_MODE",
    "USAGE_REDIS_SENTINELS",
    "USAGE_REDIS_MASTER_NAME",
    "USAGE_REDIS_SENTINEL_PASSWORD",
    "USAGE_REDIS_CLUSTER_NODES",
)

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
SERVERS = ("uvicorn", "granian")
APP_FACTORY = "usage_service.app:create_app_from_env"

# Requests in flight per worker (a poll answered in-process takes tens of microseconds: that many
# in flight means the database or Redis is stuck, and waiting longer would not help).
MAX_IN_FLIGHT = 1000

# How uvicorn serves the app (the benchmark serves its peers the same way).
SERVER_OPTIONS: dict[str, Any] = {
    # uvicorn's access line would carry query strings verbatim; keys must never reach a log.
    # Ours (--access-log) never logs a query string.
    "access_log": False,
    "server_header": False,
    # uvicorn would rewrite the client address from X-Forwarded-For for any peer on 127.0.0.1;
    # the service decides whom to believe itself (USAGE_TRUSTED_PROXIES, addresses.py).
    "proxy_headers": False,
    # Bounded request heads, a head-read timeout and JSON for the server's own 400, 431 and 503 (_http.py).
    "http": LimitedHttpToolsProtocol,
    # Past this many requests in flight in a worker, each new one is answered 503 and its
    # connection closed. Connections themselves are bounded by the descriptor limit and by
    # USAGE_HEADER_TIMEOUT, after which one that sends no whole request is closed.
    "limit_concurrency": MAX_IN_FLIGHT,
    # Connections the kernel queues for a worker that is not accepting fast enough (uvicorn's default).
    "backlog": 2048,
    # Seconds the requests in flight have to finish after SIGTERM; then they are cancelled and the
    # worker stops. A response to a client that reads nothing would otherwise hold it for ever.
    "timeout_graceful_shutdown": 10,
}


def build_parser() -> argparse.ArgumentParser:
    variables = "\n".join(f"  {name:<26} default {default}: {text}" for name, default, text in VARIABLES)
    default = {name: shown for name, shown, _ in VARIABLES}
    parser = argparse.ArgumentParser(
        prog="usage-service",
        description="Answer new-api's GET /api/usage/token from the gateway's database, through Redis "
        "and an in-process cache. The database is opened read-only.",
        epilog=f"environment variables:\n{variables}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default=None, help="address to listen on (default: 0.0.0.0; with --demo, 127.0.0.1)")
    parser.add_argument("--port", default=None, help=f"port to listen on (default: $PORT or {DEFAULT_PORT})")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on the one port (default: 1)")
    parser.add_argument(
        "--server",
        default="uvicorn",
        choices=SERVERS,
        help="HTTP server: uvicorn, or granian (faster; pip install 'usage-service[granian]') (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="(default: %(default)s)")
    parser.add_argument(
        "--log-format",
        default=None,
        choices=LOG_FORMATS,
        help=f"log lines as text or one JSON object each (default: $USAGE_LOG_FORMAT or {default['USAGE_LOG_FORMAT']})",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help=f"log one line per request (default: $USAGE_ACCESS_LOG or {default['USAGE_ACCESS_LOG']})",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help=f"serve ./{DEMO_DB} (created in the gateway's schema with one token if missing) "
        "instead of SQLITE_PATH, without the gateway's log database or Redis, and print a curl "
        "line for the demo token",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The workers read the same environment: flags travel to them through it.
    if args.log_format is not None:
        os.environ["USAGE_LOG_FORMAT"] = args.log_format
    if args.access_log:
        os.environ["USAGE_ACCESS_LOG"] = "on"
    try:  # read as the workers read it: the command's own lines are in their format
        log_format = read_variable("USAGE_LOG_FORMAT")
    except ConfigError:
        log_format = "text"  # load_settings, below, says what is wrong with it
    logs.configure(args.log_level, log_format)
    try:
        port = _port(args.port)
        # The demo prints its token and serves /metrics: it stays off the network unless asked.
        host = _host(args.host if args.host is not None else ("127.0.0.1" if args.demo else "0.0.0.0"))
        if args.workers < 1:
            raise ConfigError("--workers: expected 1 or more")
        if args.server == "granian" and importlib.util.find_spec("granian") is None:
            raise ConfigError("--server granian: granian is not installed (pip install 'usage-service[granian]')")
        demo_key = None
        if args.demo:
            demo_key = _demo_db()
            # The workers read the same environment: point them at the demo file, and at
            # nothing of a real deployment's (its request log; its Redis, whose records and
            # spending by token id the demo's tokens would answer from and write over).
            for name in DEMO_IGNORES:
                os.environ.pop(name, None)
            os.environ["SQLITE_PATH"] = str(DEMO_DB.resolve())
        settings = load_settings()
        check_database_file(settings)
        asyncio.run(_check_schema(settings))
        asyncio.run(_check_redis(settings))
        if settings.metrics and settings.metrics_address is not None:
            _check_metrics_address(settings.metrics_address, port)
        _check_metrics_directory()
    except (ConfigError, SchemaError) as exc:
        print(f"usage-service: error: {exc}", file=sys.stderr)
        return 2

    if settings.redis_url is None:
        logger.info("REDIS_CONN_STRING is not set: caching in-process only")
    elif settings.redis_mode == "sentinel":
        sentinels = ", ".join(f"{host}:{port}" for host, port in settings.redis_sentinels)
        logger.info("redis: the master %r named by the sentinels %s", settings.redis_master_name, sentinels)
    elif settings.redis_mode == "cluster":
        logger.info("redis: a cluster, found through %d seed node(s)", 1 + len(settings.redis_cluster_nodes))
    open_files = raise_descriptor_limit()
    logger.info("open files limit %d: about as many connections per worker", open_files)
    if args.workers > 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _share_metrics_between_workers()
    if demo_key is not None:
        print(
            f"usage-service demo: database {DEMO_DB.resolve()}\n"
            f"  curl -s http://127.0.0.1:{port}/api/usage/token -H 'Authorization: Bearer sk-{demo_key}'",
            flush=True,
        )
    log_config = logs.uvicorn_config(args.log_level, settings.log_format)
    if args.server == "granian":
        from . import _granian

        granian = _granian.server(
            APP_FACTORY,
            host=host,
            port=port,
            workers=args.workers,
            log_level=args.log_level,
            log_config=log_config,
            header_timeout=settings.header_timeout,
            open_files=open_files,
        )
        try:
            granian.serve()  # returns once the workers have stopped gracefully
        except RuntimeError as exc:  # from granian's Rust side: the address cannot be had, say
            # (with RUST_BACKTRACE set, the message goes on with a backtrace: its first line says it)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"usage-service: error: cannot serve on {host}:{port}: {reason}", file=sys.stderr)
            return 1
        return 0
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler
    # it found installed. Installing ours first turns a clean shutdown into exit status 0. Only
    # while uvicorn runs: past it, a process that cannot exit (a thread that will not stop) must
    # still be stopped by the signals.
    previous = {signum: signal.signal(signum, _note_shutdown_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    if args.workers == 1:
        # With workers, uvicorn's supervisor (as granian's) restarts them gracefully on SIGHUP.
        # One process has nothing to restart and nothing to read again (settings come from the
        # environment at start), and SIGHUP's default would kill it mid-request: it is ignored.
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, _ignore_hangup)
    options: dict[str, Any] = {
        "factory": True,
        "host": host,
        "port": port,
        "workers": args.workers,
        "log_level": args.log_level,
        "log_config": log_config,
        # Also how long a connection may take to send a request head (_http.py).
        "timeout_keep_alive": settings.header_timeout,
        **SERVER_OPTIONS,
    }
    try:
        if args.workers == 1:
            # As uvicorn.run serves one worker: a start-up that fails exits STARTUP_FAILURE itself,
            # a port that cannot be had returns unstarted.
            server = _Server(uvicorn.Config(APP_FACTORY, **options))
            server.run()
            if not server.started:
                return STARTUP_FAILURE
        elif _supervise(uvicorn.Config(APP_FACTORY, **options)):
            return STARTUP_FAILURE
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    # uvicorn hands the signals on last first: the last noted is the one that began the stop.
    if signal.SIGINT in _STOPPED_BY[:-1]:
        # uvicorn's answer to a SIGINT during a stop: it stopped without waiting for what was in flight.
        logger.warning("forced to stop by a second signal (SIGINT): requests in flight were cut off")
        return 130
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server of one worker, acting as well on a stop signal that came before it listened."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            # Ours only noted a SIGTERM or SIGINT that came before uvicorn's handlers were in
            # (as the app was imported, say), and the service served on as if it had not come.
            # uvicorn acts on it now, as on one that comes while the app starts: it starts, then stops.
            for signum in _signals_before_the_server():
                self.handle_exit(signum, None)
            yield


class _Supervisor(Multiprocess):
    """uvicorn's supervisor of `--workers N`, noting whether it stopped because a worker could not start."""

    worker_failed = False

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)  # puts its own signal handlers in
        # A stop signal ours only noted before then (as the socket was bound) is acted on too.
        self.signal_queue.extend(_signals_before_the_server())

    def keep_subprocess_alive(self) -> None:
        stopping = self.should_exit.is_set()
        super().keep_subprocess_alive()
        # It stops the server, rather than start that worker again, when one fails its start-up
        # (a replacement for a worker that died, finding the database gone): not a stop asked for.
        if not stopping and self.should_exit.is_set():
            self.worker_failed = True


def _supervise(config: uvicorn.Config) -> bool:
    """Serve with `config.workers` workers as uvicorn.run does; return whether a worker's start-up
    failed. uvicorn.run returns as after SIGTERM then, and the command exited 0: a supervisor
    restarting only what fails (systemd's Restart=on-failure) left the service down. (With one
    worker, the server exits STARTUP_FAILURE itself.)"""
    supervisor = _Supervisor(config, sockets=[config.bind_socket()])
    supervisor.run()
    return supervisor.worker_failed


def _check_metrics_directory() -> None:
    """An operator's PROMETHEUS_MULTIPROC_DIR must be a directory the workers can write: each
    worker would otherwise fail as it starts, and be started again, for ever."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory and not (os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK)):
        raise ConfigError(
            f"PROMETHEUS_MULTIPROC_DIR: {directory!r} is not a directory this user can write"
            " (the workers keep their metrics there); create it, or unset it"
        )


def _share_metrics_between_workers() -> None:
    # prometheus-client adds up the workers' metrics through files in this directory; it must
    # be set before the workers import it, and start empty: a previous run's files would be
    # added in.
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        for stale in worker_files(directory):
            stale.unlink(missing_ok=True)
        return
    directory = tempfile.mkdtemp(prefix="usage-service-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    atexit.register(shutil.rmtree, directory, ignore_errors=True)


# The signals uvicorn stopped on, as it hands them on once stopped (and, until the server has
# its own handlers in, the signals that came before it did).
_STOPPED_BY: list[int] = []


def _signals_before_the_server() -> list[int]:
    """The stop signals noted before the server put its own handlers in, forgotten here: the
    server, which has them in now, acts on them and hands them on once stopped, as any other."""
    early = list(_STOPPED_BY)
    _STOPPED_BY.clear()
    return early


def _ignore_hangup(signum: int, frame: object) -> None:
    logger.warning("SIGHUP ignored: one worker has nothing to reload (settings are read at start)")


def _note_shutdown_signal(signum: int, frame: object) -> None:
    _STOPPED_BY.append(signum)
    logger.debug("stopped by signal %d", signum)


def _port(flag: str | None) -> int:
    # A blank PORT is unset, as every other variable is ("An empty variable means its default").
    environ = os.environ.get("PORT", "").strip() or str(DEFAULT_PORT)
    raw, name = (flag, "--port") if flag is not None else (environ, "PORT")
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a port number (got {raw!r})") from None
    if not 0 < port < 65536:
        raise ConfigError(f"{name}: expected a port number between 1 and 65535 (got {port})")
    return port


def _host(name: str) -> str:
    """The address to listen on: `--host` as given if it is an IP address, else the address its
    name resolves to (IPv4 first; granian takes addresses only), or ConfigError."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return str(socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)[0][4][0])
        except (OSError, UnicodeError):
            continue
    raise ConfigError(f"--host: {name!r} is no IP address, nor a name this machine resolves")


async def _check_schema(settings: Settings) -> None:
    # Fail here, with one line, rather than inside every worker's lifespan with a traceback.
    store = await open_store(settings)
    await store.close()


async def _check_redis(settings: Settings) -> None:
    """Build the Redis client as every worker will, so that what redis-py refuses in the URL
    stops start-up here, in one line: in a worker it failed the lifespan, with a traceback.
    Nothing is sent: the client connects on its first command."""
    if settings.redis_url is None:
        return
    try:
        client = create_client(settings)
    except (ValueError, TypeError, RedisError) as exc:  # redis-py's own words name no password
        raise ConfigError(f"REDIS_CONN_STRING: {exc}") from None
    await client.aclose()


def _demo_db() -> str:
    """`ensure_demo_db` in the working directory, or ConfigError when it cannot be written
    there (a read-only directory) or holds something else under the demo's name."""
    try:
        return ensure_demo_db(DEMO_DB)
    except sqlite3.Error as exc:
        raise ConfigError(f"--demo: cannot use {str(DEMO_DB.absolute())!r} as the demo database ({exc})") from None


def _check_metrics_address(address: tuple[str, int], port: int) -> None:
    # A worker binds it later; say now, in one line, if it cannot be had.
    metrics_host, metrics_port = address
    if metrics_port == port:
        raise ConfigError(f"USAGE_METRICS_ADDRESS: port {port} is the service's own port; choose another")
    try:
        family = socket.AF_INET6 if ":" in metrics_host else socket.AF_INET
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((metrics_host, metrics_port))
    except OSError as exc:
        where = f"{metrics_host}:{metrics_port}"
        raise ConfigError(f"USAGE_METRICS_ADDRESS: cannot listen on {where} ({exc.strerror})") from None
