"""Configuration, read from the environment in one place.

The gateway's own variables (``SQL_DSN``, ``SQLITE_PATH``, ``REDIS_CONN_STRING``) locate its
database and Redis, so the sidecar drops in beside an existing deployment; everything of our
own is prefixed ``USAGE_``.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeAlias, TypeVar
from urllib.parse import urlsplit

from ._dsn import MySQLDSN, PostgresDSN, parse_sql_dsn

T = TypeVar("T")
Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

RedisMode = Literal["standalone", "sentinel", "cluster"]
REDIS_MODES: tuple[RedisMode, ...] = ("standalone", "sentinel", "cluster")


class ConfigError(Exception):
    """A bad setting; the message names the variable and is meant for the operator."""


@dataclass(frozen=True)
class Settings:
    sqlite_path: Path = Path("one-api.db")
    # From SQL_DSN: the PostgreSQL or MySQL database, or None for SQLite at sqlite_path.
    database: PostgresDSN | MySQLDSN | None = None
    # Secret (may carry a password): kept out of repr.
    redis_url: str | None = field(default=None, repr=False)
    cache_ttl: float = 5.0
    local_ttl: float = 1.0
    local_cache_size: int = 100_000
    negative_ttl: float = 5.0
    negative_cache_size: int = 20_000
    redis_timeout: float = 0.25
    redis_cooldown: float = 5.0
    redis_prefix: str = "usage:"
    # Redis topology (USAGE_REDIS_MODE): REDIS_CONN_STRING still carries the credentials, TLS and
    # database; Sentinel names the master, Cluster seeds from its host plus `redis_cluster_nodes`.
    redis_mode: RedisMode = "standalone"
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_master_name: str = "mymaster"
    redis_sentinel_password: str | None = field(default=None, repr=False)
    redis_cluster_nodes: tuple[tuple[str, int], ...] = ()
    db_timeout: float = 2.0
    db_pool_size: int = 4
    retry_after: int = 1
    refresh_interval: float = 1.0
    hot_window: float = 60.0
    hot_max: int = 20_000
    options_interval: float = 10.0
    # Operators' and integrators' features (metrics, logs, CORS).
    metrics: bool = True
    metrics_address: tuple[str, int] | None = None  # serve /metrics there instead of on the main port
    log_format: str = "text"
    access_log: bool = False
    cors_origins: tuple[str, ...] = ("*",)  # empty: no CORS headers at all (USAGE_CORS_ORIGINS=off)
    stale_if_error: float = 300.0
    auth_fail_limit: int = 30
    auth_fail_window: float = 60.0
    trusted_proxies: tuple[Network, ...] = ()
    header_timeout: int = 10


# (variable, default, description) for every variable; `--help` and the README print this.
VARIABLES: tuple[tuple[str, str, str], ...] = (
    (
        "SQL_DSN",
        "(empty)",
        "gateway database: postgres(ql)://… is PostgreSQL, user:pass@tcp(host:3306)/db MySQL; empty or 'local…' SQLite",
    ),
    ("SQLITE_PATH", "one-api.db", "gateway SQLite file, opened read-only; a '?query' suffix is accepted and ignored"),
    ("REDIS_CONN_STRING", "(unset)", "redis:// or rediss:// URL; unset runs on the in-process cache alone"),
    ("PORT", "3001", "listen port (same as --port)"),
    ("USAGE_CACHE_TTL", "5", "seconds a token record may be served from cache (Redis and in-process)"),
    (
        "USAGE_LOCAL_TTL",
        "1",
        "seconds a worker answers a record from its in-process layer after taking it in (<= USAGE_CACHE_TTL);"
        " longer while the refresher's rounds confirm it, never past USAGE_HOT_WINDOW (or USAGE_CACHE_TTL"
        " if longer) after its database read;"
        " 0: never (expired copies stay for USAGE_STALE_IF_ERROR)",
    ),
    ("USAGE_LOCAL_CACHE_SIZE", "100000", "max records in the in-process layer per worker"),
    ("USAGE_NEGATIVE_TTL", "5", "seconds an unknown key is remembered as unknown (0 disables)"),
    ("USAGE_NEGATIVE_CACHE_SIZE", "20000", "max unknown keys remembered in-process per worker"),
    ("USAGE_REDIS_TIMEOUT", "0.25", "seconds any Redis call may take before the database is asked instead"),
    ("USAGE_REDIS_COOLDOWN", "5", "seconds Redis is left alone after it failed, before one probe"),
    ("USAGE_REDIS_PREFIX", "usage:", "prefix of every key the service writes to Redis"),
    ("USAGE_REDIS_MODE", "standalone", "Redis topology: standalone, sentinel or cluster"),
    ("USAGE_REDIS_SENTINELS", "(empty)", "sentinel mode: comma-separated host:port of the sentinels (port 26379)"),
    ("USAGE_REDIS_MASTER_NAME", "mymaster", "sentinel mode: the master's name in the sentinels' configuration"),
    ("USAGE_REDIS_SENTINEL_PASSWORD", "(empty)", "sentinel mode: password of the sentinels themselves, if any"),
    ("USAGE_REDIS_CLUSTER_NODES", "(empty)", "cluster mode: more host:port seed nodes besides REDIS_CONN_STRING's"),
    ("USAGE_DB_TIMEOUT", "2", "seconds a query waits on a locked database before answering 503"),
    ("USAGE_DB_POOL_SIZE", "4", "read-only database connections per worker"),
    ("USAGE_RETRY_AFTER", "1", "Retry-After seconds sent with 503 answers"),
    (
        "USAGE_REFRESH_INTERVAL",
        "1",
        "seconds between re-reads of the recently polled tokens (0 turns the refresher off)",
    ),
    ("USAGE_HOT_WINDOW", "60", "a token polled within this many seconds is kept fresh by the refresher"),
    ("USAGE_HOT_MAX", "20000", "most tokens the refresher keeps fresh (the most recently polled win)"),
    ("USAGE_OPTIONS_INTERVAL", "10", "seconds between re-reads of the gateway's billing options (0: at start only)"),
    ("USAGE_METRICS", "on", "serve Prometheus metrics at /metrics (on/off)"),
    ("USAGE_METRICS_ADDRESS", "(unset)", "host:port serving /metrics instead of the main port"),
    ("USAGE_LOG_FORMAT", "text", "log lines as 'text' or 'json' (same as --log-format)"),
    ("USAGE_ACCESS_LOG", "off", "one log line per request (on/off; same as --access-log)"),
    ("USAGE_CORS_ORIGINS", "*", "origins whose browsers may read the API, comma-separated; '*' any, 'off' none"),
    ("USAGE_STALE_IF_ERROR", "300", "seconds past its freshness a cached record is served while the database is down"),
    ("USAGE_AUTH_FAIL_LIMIT", "30", "failed authentications per client address per window before 429 (0 disables)"),
    ("USAGE_AUTH_FAIL_WINDOW", "60", "seconds of the failed-authentication window (the longest Retry-After)"),
    ("USAGE_TRUSTED_PROXIES", "(empty)", "CIDRs of proxies whose X-Forwarded-For names the client, comma-separated"),
    (
        "USAGE_HEADER_TIMEOUT",
        "10",
        "seconds a connection has to send a whole request head, from its opening or its last answer (1-300)",
    ),
)

LOG_FORMATS = ("text", "json")


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build validated settings from the environment; raise ConfigError naming the bad variable."""
    env = os.environ if environ is None else environ

    try:
        database = parse_sql_dsn(env.get("SQL_DSN", ""))
    except ValueError as exc:
        raise ConfigError(f"SQL_DSN: {exc}") from None
    sqlite_path = _sqlite_path(env.get("SQLITE_PATH", "") or "one-api.db")
    redis_url = _redis_url(env.get("REDIS_CONN_STRING", "").strip())

    cache_ttl = _read(env, "USAGE_CACHE_TTL", 5.0, _seconds(minimum=0.001))
    local_ttl = min(_read(env, "USAGE_LOCAL_TTL", 1.0, _seconds(minimum=0.0)), cache_ttl)
    prefix = env.get("USAGE_REDIS_PREFIX", "usage:")
    if not prefix or any(c.isspace() for c in prefix):
        raise ConfigError("USAGE_REDIS_PREFIX: must be non-empty and contain no spaces")

    mode, sentinels, cluster_nodes = _redis_topology(env, redis_url)

    return Settings(
        sqlite_path=sqlite_path,
        database=database,
        redis_url=redis_url,
        redis_mode=mode,
        redis_sentinels=sentinels,
        redis_master_name=env.get("USAGE_REDIS_MASTER_NAME", "").strip() or "mymaster",
        redis_sentinel_password=env.get("USAGE_REDIS_SENTINEL_PASSWORD") or None,
        redis_cluster_nodes=cluster_nodes,
        cache_ttl=cache_ttl,
        local_ttl=local_ttl,
        local_cache_size=_read(env, "USAGE_LOCAL_CACHE_SIZE", 100_000, _count(minimum=1)),
        negative_ttl=_read(env, "USAGE_NEGATIVE_TTL", 5.0, _seconds(minimum=0.0)),
        negative_cache_size=_read(env, "USAGE_NEGATIVE_CACHE_SIZE", 20_000, _count(minimum=1)),
        redis_timeout=_read(env, "USAGE_REDIS_TIMEOUT", 0.25, _seconds(minimum=0.001)),
        redis_cooldown=_read(env, "USAGE_REDIS_COOLDOWN", 5.0, _seconds(minimum=0.0)),
        redis_prefix=prefix,
        db_timeout=_read(env, "USAGE_DB_TIMEOUT", 2.0, _seconds(minimum=0.0)),
        db_pool_size=_read(env, "USAGE_DB_POOL_SIZE", 4, _count(minimum=1, maximum=64)),
        retry_after=_read(env, "USAGE_RETRY_AFTER", 1, _count(minimum=0)),
        refresh_interval=_read(env, "USAGE_REFRESH_INTERVAL", 1.0, _seconds(minimum=0.0)),
        hot_window=_read(env, "USAGE_HOT_WINDOW", 60.0, _seconds(minimum=0.001)),
        hot_max=_read(env, "USAGE_HOT_MAX", 20_000, _count(minimum=1)),
        options_interval=_read(env, "USAGE_OPTIONS_INTERVAL", 10.0, _seconds(minimum=0.0)),
        metrics=_read(env, "USAGE_METRICS", True, _switch),
        metrics_address=_read(env, "USAGE_METRICS_ADDRESS", None, _address),
        log_format=_read(env, "USAGE_LOG_FORMAT", "text", _log_format),
        access_log=_read(env, "USAGE_ACCESS_LOG", False, _switch),
        cors_origins=_cors_origins(env.get("USAGE_CORS_ORIGINS")),
        stale_if_error=_read(env, "USAGE_STALE_IF_ERROR", 300.0, _seconds(minimum=0.0)),
        auth_fail_limit=_read(env, "USAGE_AUTH_FAIL_LIMIT", 30, _count(minimum=0)),
        auth_fail_window=_read(env, "USAGE_AUTH_FAIL_WINDOW", 60.0, _seconds(minimum=0.001)),
        trusted_proxies=_read(env, "USAGE_TRUSTED_PROXIES", (), _networks),
        header_timeout=_read(env, "USAGE_HEADER_TIMEOUT", 10, _count(minimum=1, maximum=300)),
    )


def check_database_file(settings: Settings) -> None:
    """Fail start-up when the database file is missing: never let SQLite create an empty one."""
    if settings.database is not None:
        return  # SQL_DSN names a database server; SQLITE_PATH is not read
    path = settings.sqlite_path
    if not path.exists():
        raise ConfigError(f"SQLITE_PATH: database file {str(path)!r} does not exist")
    if not path.is_file():
        raise ConfigError(f"SQLITE_PATH: {str(path)!r} is not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"SQLITE_PATH: database file {str(path)!r} is not readable")


def _sqlite_path(value: str) -> Path:
    # The gateway's driver takes connection options after '?', e.g. one-api.db?_busy_timeout=30000.
    # They tune the gateway's writers; we open our own read-only connections and ignore them.
    path = value.split("?", 1)[0].strip()
    if path.startswith("file:"):
        path = path[len("file:") :]
    if not path:
        raise ConfigError(f"SQLITE_PATH: {value!r} names no file")
    return Path(path)


def _redis_url(value: str) -> str | None:
    if not value:
        return None
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ConfigError(f"REDIS_CONN_STRING: malformed URL ({exc})") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"REDIS_CONN_STRING: expected a redis://, rediss:// or unix:// URL, got scheme {parts.scheme!r}"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError("REDIS_CONN_STRING: the URL names no host")
    return value


def _redis_topology(
    env: Mapping[str, str], redis_url: str | None
) -> tuple[RedisMode, tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]:
    raw = env.get("USAGE_REDIS_MODE", "").strip().lower() or "standalone"
    mode = next((m for m in REDIS_MODES if m == raw), None)
    if mode is None:
        raise ConfigError(f"USAGE_REDIS_MODE: expected one of {', '.join(REDIS_MODES)} (got {raw!r})")
    none: tuple[tuple[str, int], ...] = ()
    sentinels = _read(env, "USAGE_REDIS_SENTINELS", none, _addresses(26379))
    cluster_nodes = _read(env, "USAGE_REDIS_CLUSTER_NODES", none, _addresses(6379))
    # A list set for another mode is a mistake worth stopping for: it would be silently ignored.
    if sentinels and mode != "sentinel":
        raise ConfigError(f"USAGE_REDIS_SENTINELS: set, but USAGE_REDIS_MODE is {mode!r} (set it to 'sentinel')")
    if cluster_nodes and mode != "cluster":
        raise ConfigError(f"USAGE_REDIS_CLUSTER_NODES: set, but USAGE_REDIS_MODE is {mode!r} (set it to 'cluster')")
    if mode == "standalone":
        return mode, sentinels, cluster_nodes
    if redis_url is None:
        raise ConfigError(
            f"USAGE_REDIS_MODE: {mode} needs REDIS_CONN_STRING too (it carries the password, TLS and database)"
        )
    parts = urlsplit(redis_url)
    if parts.scheme == "unix":
        raise ConfigError(f"REDIS_CONN_STRING: a unix:// socket cannot be used with USAGE_REDIS_MODE={mode}")
    if mode == "sentinel" and not sentinels:
        raise ConfigError("USAGE_REDIS_SENTINELS: sentinel mode needs the sentinels' host:port list")
    if mode == "cluster" and parts.path.strip("/") not in ("", "0"):
        raise ConfigError("REDIS_CONN_STRING: Redis Cluster has only database 0; drop the database number")
    return mode, sentinels, cluster_nodes


def _addresses(default_port: int) -> Callable[[str], tuple[tuple[str, int], ...]]:
    """Parse 'host:port, host, [::1]:port' into (host, port) pairs."""

    def parse(raw: str) -> tuple[tuple[str, int], ...]:
        addresses = []
        for item in raw.split(","):
            item = item.strip()
            if not item:
                continue
            try:
                parts = urlsplit("//" + item)
                host, port = parts.hostname, parts.port
            except ValueError:
                host = port = None
            if not host or parts.path or parts.username or parts.password:
                raise ValueError(f"expected comma-separated host:port addresses, {item!r} is not one")
            addresses.append((host, port or default_port))
        if not addresses:
            raise ValueError("expected at least one host:port address")
        return tuple(addresses)

    return parse


def _read(env: Mapping[str, str], name: str, default: T, parse: Callable[[str], T]) -> T:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc} (got {raw!r})") from None


def _seconds(minimum: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("expected a number of seconds") from None
        if not math.isfinite(value) or value < minimum:
            raise ValueError(f"expected a finite number of seconds >= {minimum:g}")
        return value

    return parse


def _networks(raw: str) -> tuple[Network, ...]:
    networks = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"expected comma-separated addresses or CIDRs such as 10.0.0.0/8, not {part!r}") from None
    return tuple(networks)


def _count(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("expected a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"expected a whole number {bound}")
        return value

    return parse


def _switch(raw: str) -> bool:
    value = raw.lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise ValueError("expected on or off")


def _address(raw: str) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:9100
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected host:port, e.g. 127.0.0.1:9100")
    return host, int(port)


def _log_format(raw: str) -> str:
    if raw not in LOG_FORMATS:
        raise ValueError(f"expected one of {', '.join(LOG_FORMATS)}")
    return raw


def _cors_origins(raw: str | None) -> tuple[str, ...]:
    """'*' (the default), 'off' (no CORS headers), or a list of origins as browsers send them."""
    if raw is None or not raw.strip():
        return ("*",)
    if raw.strip().lower() in ("off", "none"):
        return ()
    origins = tuple(dict.fromkeys(part.strip().rstrip("/").lower() for part in raw.split(",") if part.strip()))
    if "*" in origins:
        return ("*",)
    for origin in origins:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
            raise ConfigError(
                f"USAGE_CORS_ORIGINS: expected origins like https://dash.example.com, or '*' (got {origin!r})"
            )
    return origins
