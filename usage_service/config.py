"""Configuration, read from the environment in one place.

The gateway's own variables (``SQL_DSN``, ``SQLITE_PATH``, ``REDIS_CONN_STRING``) locate its
database and Redis, so the sidecar drops in beside an existing deployment; everything of our
own is prefixed ``USAGE_``.

Every variable is one row of TABLE: its Settings field, default, parser and line of doc. The
Settings defaults, load_settings, ``--help`` and the docs' table (``python -m
usage_service.config --markdown``) are all read from it, and a test holds
config/usage-service.env to it. A new setting is a new row (and its Settings field).
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypeVar
from urllib.parse import urlsplit

from ._dsn import MySQLDSN, PostgresDSN, parse_sql_dsn
from ._redis_url import parse_redis_url

T = TypeVar("T")
Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

RedisMode = Literal["standalone", "sentinel", "cluster"]
REDIS_MODES: tuple[RedisMode, ...] = ("standalone", "sentinel", "cluster")
LOG_FORMATS = ("text", "json")


class ConfigError(Exception):
    """A bad setting; the message names the variable and is meant for the operator."""


# --- parsers: each takes the stripped, non-empty value and raises ValueError saying what it expected


# Seconds past which no setting is taken: about 31 years, whatever the setting means. Expiries
# derived from them (sums of a few, in milliseconds) must still be integers Redis takes; past
# about 9e15 s every such write failed, and silently.
MAX_SECONDS = 1e9


def _seconds(minimum: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("expected a number of seconds") from None
        if not math.isfinite(value) or not minimum <= value <= MAX_SECONDS:
            raise ValueError(f"expected a finite number of seconds from {minimum:g} to {MAX_SECONDS:g}")
        return value

    return parse


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


def _text(raw: str) -> str:
    return raw


def _sqlite_path(raw: str) -> Path:
    # The gateway's driver takes connection options after '?', e.g. one-api.db?_busy_timeout=30000.
    # They tune the gateway's writers; we open our own read-only connections and ignore them.
    path = raw.split("?", 1)[0].strip()
    if path.startswith("file:"):
        path = path[len("file:") :]
    if not path:
        raise ValueError("names no file")
    return Path(path)


def _redis_prefix(raw: str) -> str:
    if any(c.isspace() for c in raw):
        raise ValueError("must be non-empty and contain no spaces")
    return raw


def _redis_mode(raw: str) -> RedisMode:
    mode = next((m for m in REDIS_MODES if m == raw.lower()), None)
    if mode is None:
        raise ValueError(f"expected one of {', '.join(REDIS_MODES)}")
    return mode


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
            if not host or port == 0 or parts.path or parts.username or parts.password:
                raise ValueError(f"expected comma-separated host:port addresses, {item!r} is not one")
            addresses.append((host, default_port if port is None else port))
        if not addresses:
            raise ValueError("expected at least one host:port address")
        return tuple(addresses)

    return parse


def _address(raw: str) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:9100
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected host:port, e.g. 127.0.0.1:9100")
    return host, int(port)


# IPv4 addresses in IPv6's mapped form (::ffff:a.b.c.d), which addresses.py reads as IPv4.
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _networks(raw: str) -> tuple[Network, ...]:
    networks: list[Network] = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            network = ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise ValueError(f"expected comma-separated addresses or CIDRs such as 10.0.0.0/8, not {part!r}") from None
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
            # Written as mapped (::ffff:127.0.0.1): the IPv4 network it names.
            mapped = network.network_address.ipv4_mapped
            assert mapped is not None
            network = ipaddress.IPv4Network((mapped, network.prefixlen - 96))
        elif isinstance(network, ipaddress.IPv6Network) and network.supernet_of(_MAPPED):
            networks.append(ipaddress.IPv4Network("0.0.0.0/0"))  # (::/0): every IPv4 address too
        networks.append(network)
    return tuple(networks)


def _log_format(raw: str) -> str:
    log_format = next((f for f in LOG_FORMATS if f == raw.lower()), None)
    if log_format is None:
        raise ValueError(f"expected one of {', '.join(LOG_FORMATS)}")
    return log_format


def _cors_origins(raw: str) -> tuple[str, ...]:
    """'*', 'off' (no CORS headers), or a list of origins as browsers send them."""
    if raw.lower() in ("off", "none"):
        return ()
    origins = tuple(dict.fromkeys(part.strip().rstrip("/").lower() for part in raw.split(",") if part.strip()))
    if "*" in origins:
        return ("*",)
    for origin in origins:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
            raise ValueError(f"expected origins like https://dash.example.com, or '*', not {origin!r}")
    return origins


BillingTotal = Literal["lifetime", "range"]
BILLING_TOTALS: tuple[BillingTotal, ...] = ("lifetime", "range")


def _billing_total(raw: str) -> BillingTotal:
    total = next((t for t in BILLING_TOTALS if t == raw.lower()), None)
    if total is None:
        raise ValueError(f"expected one of {', '.join(BILLING_TOTALS)}")
    return total


# --- the table --------------------------------------------------------------------------------


# The listen port when neither --port nor PORT says (the gateway's own is 3000).
DEFAULT_PORT = 3001


@dataclass(frozen=True)
class Variable:
    """One environment variable: the setting it fills, its default, how it is read, what it does."""

    name: str
    field: str | None  # the Settings field; None: read by the command line (PORT)
    default: Any  # in force when the variable is unset or empty
    # None: read by load_settings' own code (a secret that must not be echoed, a cross-check).
    parse: Callable[[str], Any] | None
    doc: str
    shown: str | None = None  # the default as the docs write it, when str(default) would not do

    @property
    def shown_default(self) -> str:
        """The default as `--help`, the docs and config/usage-service.env write it."""
        if self.shown is not None:
            return self.shown
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        if isinstance(self.default, float):
            return f"{self.default:g}"
        if isinstance(self.default, tuple):
            return ",".join(map(str, self.default)) or "(empty)"
        return "(unset)" if self.default is None else str(self.default)


TABLE: tuple[Variable, ...] = (
    Variable(
        "SQL_DSN",
        "database",
        None,
        None,
        "gateway database: postgres(ql)://… is PostgreSQL, user:pass@tcp(host:3306)/db MySQL; empty or 'local…' SQLite",
        shown="(empty)",
    ),
    Variable(
        "SQLITE_PATH",
        "sqlite_path",
        Path("one-api.db"),
        _sqlite_path,
        "gateway SQLite file, opened read-only; a '?query' suffix is accepted and ignored",
    ),
    Variable(
        "LOG_SQL_DSN",
        "log_database",
        None,
        None,
        "database holding the gateway's request log, in SQL_DSN's forms ('local…': SQLite at SQLITE_PATH);"
        " empty: the log is in the gateway database",
        shown="(empty)",
    ),
    Variable(
        "REDIS_CONN_STRING",
        "redis_url",
        None,
        None,
        "redis:// or rediss:// URL, with the options the gateway's go-redis takes (?db=, ?dial_timeout=, ...);"
        " unset runs on the in-process cache alone",
    ),
    Variable("PORT", None, DEFAULT_PORT, None, "listen port (same as --port)"),
    Variable(
        "USAGE_CACHE_TTL",
        "cache_ttl",
        5.0,
        _seconds(minimum=0.001),
        "seconds a token record may be served from cache (Redis and in-process)",
    ),
    Variable(
        "USAGE_LOCAL_TTL",
        "local_ttl",
        1.0,
        _seconds(minimum=0.0),
        "seconds a worker answers a record from its in-process layer after taking it in (<= USAGE_CACHE_TTL);"
        " longer while the refresher's rounds confirm it, never past USAGE_HOT_WINDOW (or USAGE_CACHE_TTL"
        " if longer) after its database read;"
        " 0: never (expired copies stay for USAGE_STALE_IF_ERROR)",
    ),
    Variable(
        "USAGE_LOCAL_CACHE_SIZE",
        "local_cache_size",
        100_000,
        _count(minimum=1),
        "max records in the in-process layer per worker",
    ),
    Variable(
        "USAGE_NEGATIVE_TTL",
        "negative_ttl",
        5.0,
        _seconds(minimum=0.0),
        "seconds an unknown key is remembered as unknown (0 disables)",
    ),
    Variable(
        "USAGE_NEGATIVE_CACHE_SIZE",
        "negative_cache_size",
        20_000,
        _count(minimum=1),
        "max unknown keys remembered in-process per worker",
    ),
    Variable(
        "USAGE_REDIS_TIMEOUT",
        "redis_timeout",
        0.25,
        _seconds(minimum=0.001),
        "seconds a request's Redis call may take before the database is asked instead (background: 4x, >= 1)",
    ),
    Variable(
        "USAGE_REDIS_COOLDOWN",
        "redis_cooldown",
        5.0,
        _seconds(minimum=0.0),
        "seconds Redis is left alone after it failed, before one probe",
    ),
    Variable(
        "USAGE_REDIS_PREFIX", "redis_prefix", "usage:", _redis_prefix, "prefix of every key the service writes to Redis"
    ),
    Variable(
        "USAGE_REDIS_MODE", "redis_mode", "standalone", _redis_mode, "Redis topology: standalone, sentinel or cluster"
    ),
    Variable(
        "USAGE_REDIS_SENTINELS",
        "redis_sentinels",
        (),
        _addresses(26379),
        "sentinel mode: comma-separated host:port of the sentinels (port 26379)",
    ),
    Variable(
        "USAGE_REDIS_MASTER_NAME",
        "redis_master_name",
        "mymaster",
        _text,
        "sentinel mode: the master's name in the sentinels' configuration",
    ),
    Variable(
        "USAGE_REDIS_SENTINEL_PASSWORD",
        "redis_sentinel_password",
        None,
        None,
        "sentinel mode: password of the sentinels themselves, if any",
        shown="(empty)",
    ),
    Variable(
        "USAGE_REDIS_CLUSTER_NODES",
        "redis_cluster_nodes",
        (),
        _addresses(6379),
        "cluster mode: more host:port seed nodes besides REDIS_CONN_STRING's",
    ),
    Variable(
        "USAGE_DB_TIMEOUT",
        "db_timeout",
        2.0,
        # Not 0: PostgreSQL's statement_timeout and MariaDB's max_statement_time read 0 as "no
        # limit", and MySQL's takes milliseconds; no engine reads it as "do not wait".
        _seconds(minimum=0.1),
        "seconds a query waits on a locked database before answering 503",
    ),
    Variable(
        "USAGE_DB_POOL_SIZE",
        "db_pool_size",
        4,
        _count(minimum=1, maximum=64),
        "read-only database connections per worker",
    ),
    Variable(
        "USAGE_RETRY_AFTER",
        "retry_after",
        1,
        _count(minimum=0, maximum=int(MAX_SECONDS)),
        'Retry-After seconds sent with 503 answers (a worker\'s own "server busy" 503 says 1)',
    ),
    Variable(
        "USAGE_REFRESH_INTERVAL",
        "refresh_interval",
        1.0,
        _seconds(minimum=0.0),
        "seconds between re-reads of the recently polled tokens (0 turns the refresher off)",
    ),
    Variable(
        "USAGE_HOT_WINDOW",
        "hot_window",
        60.0,
        _seconds(minimum=0.001),
        "a token polled within this many seconds is kept fresh by the refresher",
    ),
    Variable(
        "USAGE_HOT_MAX",
        "hot_max",
        20_000,
        _count(minimum=1),
        "most tokens the refresher keeps fresh (the most recently polled win)",
    ),
    Variable(
        "USAGE_OPTIONS_INTERVAL",
        "options_interval",
        10.0,
        _seconds(minimum=0.0),
        "seconds between re-reads of the gateway's billing options (0: at start only)",
    ),
    Variable(
        "USAGE_HISTORY_MAX_DAYS",
        "history_max_days",
        100,
        _count(minimum=1, maximum=3650),
        "longest date range, in days, of /api/usage/token/history (end_date included; a dated"
        " /dashboard/billing/usage may span one day more); 400 beyond",
    ),
    Variable(
        "USAGE_LOG_READS_PER_TOKEN",
        "log_reads_per_token",
        5,
        _count(minimum=0),
        "reads of one token's request log per second a worker makes for /api/log/token, after a burst of four"
        " times as many (an answer served again is no read); 429 beyond; 0: no limit",
    ),
    Variable(
        "USAGE_HISTORY_DAYS_PER_TOKEN",
        "history_days_per_token",
        400,
        _count(minimum=0),
        "days of one token's spending per second a worker sums anew for /api/usage/token/history and a dated"
        " /dashboard/billing/usage, after a burst of four times as many (a range asked for again costs none); 429"
        " beyond; 0: no limit",
    ),
    Variable(
        "USAGE_BILLING_TOTAL",
        "billing_total",
        "lifetime",
        _billing_total,
        "total_usage of /dashboard/billing/usage with start_date and end_date: 'lifetime' (the gateway's"
        " meaning) or 'range' (OpenAI's: the range's total)",
    ),
    Variable("USAGE_METRICS", "metrics", True, _switch, "serve Prometheus metrics at /metrics (on/off)"),
    Variable(
        "USAGE_METRICS_ADDRESS",
        "metrics_address",
        None,
        _address,
        "host:port serving /metrics instead of the main port",
    ),
    Variable(
        "USAGE_LOG_FORMAT", "log_format", "text", _log_format, "log lines as 'text' or 'json' (same as --log-format)"
    ),
    Variable(
        "USAGE_ACCESS_LOG", "access_log", False, _switch, "one log line per request (on/off; same as --access-log)"
    ),
    Variable(
        "USAGE_CORS_ORIGINS",
        "cors_origins",
        ("*",),
        _cors_origins,
        "origins whose browsers may read the API, comma-separated; '*' any, 'off' none",
    ),
    Variable(
        "USAGE_STALE_IF_ERROR",
        "stale_if_error",
        300.0,
        _seconds(minimum=0.0),
        "seconds past its freshness a cached record is served while the database is down",
    ),
    Variable(
        "USAGE_AUTH_FAIL_LIMIT",
        "auth_fail_limit",
        30,
        _count(minimum=0),
        "failed authentications per client address per window before 429 (0 disables)",
    ),
    Variable(
        "USAGE_AUTH_FAIL_WINDOW",
        "auth_fail_window",
        60.0,
        _seconds(minimum=0.001),
        "seconds of the failed-authentication window (the longest Retry-After)",
    ),
    Variable(
        "USAGE_TRUSTED_PROXIES",
        "trusted_proxies",
        (),
        _networks,
        "CIDRs of proxies whose X-Forwarded-For names the client, comma-separated",
    ),
    Variable(
        "USAGE_HEADER_TIMEOUT",
        "header_timeout",
        10,
        _count(minimum=1, maximum=300),
        "seconds a connection has to send a whole request head, from its opening or its last answer (1-300)",
    ),
)

# (variable, default as written, description) for every variable: what `--help` prints.
VARIABLES: tuple[tuple[str, str, str], ...] = tuple((v.name, v.shown_default, v.doc) for v in TABLE)

_DEFAULTS: dict[str, Any] = {v.field: v.default for v in TABLE if v.field is not None}


@dataclass(frozen=True)
class Settings:
    """Every setting, typed; each default is its variable's in TABLE."""

    sqlite_path: Path = _DEFAULTS["sqlite_path"]
    # From SQL_DSN: the PostgreSQL or MySQL database, or None for SQLite at sqlite_path.
    database: PostgresDSN | MySQLDSN | None = _DEFAULTS["database"]
    # From LOG_SQL_DSN: where the request log lives when not in `database` (None): a server, or
    # the SQLite file at sqlite_path ('local…', the gateway's own reading of that form).
    log_database: PostgresDSN | MySQLDSN | Path | None = _DEFAULTS["log_database"]
    # Secret (may carry a password): kept out of repr.
    redis_url: str | None = field(default=_DEFAULTS["redis_url"], repr=False)
    cache_ttl: float = _DEFAULTS["cache_ttl"]
    local_ttl: float = _DEFAULTS["local_ttl"]
    local_cache_size: int = _DEFAULTS["local_cache_size"]
    negative_ttl: float = _DEFAULTS["negative_ttl"]
    negative_cache_size: int = _DEFAULTS["negative_cache_size"]
    redis_timeout: float = _DEFAULTS["redis_timeout"]
    redis_cooldown: float = _DEFAULTS["redis_cooldown"]
    redis_prefix: str = _DEFAULTS["redis_prefix"]
    # Redis topology (USAGE_REDIS_MODE): REDIS_CONN_STRING still carries the credentials, TLS and
    # database; Sentinel names the master, Cluster seeds from its host plus `redis_cluster_nodes`.
    redis_mode: RedisMode = _DEFAULTS["redis_mode"]
    redis_sentinels: tuple[tuple[str, int], ...] = _DEFAULTS["redis_sentinels"]
    redis_master_name: str = _DEFAULTS["redis_master_name"]
    redis_sentinel_password: str | None = field(default=_DEFAULTS["redis_sentinel_password"], repr=False)
    redis_cluster_nodes: tuple[tuple[str, int], ...] = _DEFAULTS["redis_cluster_nodes"]
    db_timeout: float = _DEFAULTS["db_timeout"]
    db_pool_size: int = _DEFAULTS["db_pool_size"]
    retry_after: int = _DEFAULTS["retry_after"]
    refresh_interval: float = _DEFAULTS["refresh_interval"]
    hot_window: float = _DEFAULTS["hot_window"]
    hot_max: int = _DEFAULTS["hot_max"]
    options_interval: float = _DEFAULTS["options_interval"]
    history_max_days: int = _DEFAULTS["history_max_days"]
    log_reads_per_token: int = _DEFAULTS["log_reads_per_token"]
    history_days_per_token: int = _DEFAULTS["history_days_per_token"]
    billing_total: BillingTotal = _DEFAULTS["billing_total"]
    # Operators' and integrators' features (metrics, logs, CORS).
    metrics: bool = _DEFAULTS["metrics"]
    metrics_address: tuple[str, int] | None = _DEFAULTS["metrics_address"]  # /metrics there, not on the main port
    log_format: str = _DEFAULTS["log_format"]
    access_log: bool = _DEFAULTS["access_log"]
    cors_origins: tuple[str, ...] = _DEFAULTS["cors_origins"]  # empty: no CORS headers at all
    stale_if_error: float = _DEFAULTS["stale_if_error"]
    auth_fail_limit: int = _DEFAULTS["auth_fail_limit"]
    auth_fail_window: float = _DEFAULTS["auth_fail_window"]
    trusted_proxies: tuple[Network, ...] = _DEFAULTS["trusted_proxies"]
    header_timeout: int = _DEFAULTS["header_timeout"]


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build validated settings from the environment; raise ConfigError naming the bad variable."""
    env = os.environ if environ is None else environ
    values = {v.field: _read(env, v) for v in TABLE if v.field is not None and v.parse is not None}

    # Read by hand: their values may carry passwords, which an error message must not repeat.
    try:
        values["database"] = parse_sql_dsn(env.get("SQL_DSN", ""))
    except ValueError as exc:
        raise ConfigError(f"SQL_DSN: {exc}") from None
    log_dsn = env.get("LOG_SQL_DSN", "").strip()
    try:
        log_database = parse_sql_dsn(log_dsn)
    except ValueError as exc:
        raise ConfigError(f"LOG_SQL_DSN: {exc}") from None
    values["log_database"] = values["sqlite_path"] if log_dsn and log_database is None else log_database
    values["redis_url"] = redis_url = _redis_url(env.get("REDIS_CONN_STRING", "").strip())
    # Blank is unset, as for every variable; a password that is not blank is taken as it is, spaces included.
    sentinel_password = env.get("USAGE_REDIS_SENTINEL_PASSWORD", "")
    values["redis_sentinel_password"] = sentinel_password if sentinel_password.strip() else None

    values["local_ttl"] = min(values["local_ttl"], values["cache_ttl"])
    if values["metrics_address"] is not None and not values["metrics"]:
        raise ConfigError("USAGE_METRICS_ADDRESS: set, but USAGE_METRICS is off (metrics would be served nowhere)")
    _check_redis_topology(values["redis_mode"], values["redis_sentinels"], values["redis_cluster_nodes"], redis_url)
    return Settings(**values)


def read_variable(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """One variable of the table as load_settings reads it (ConfigError if its value is bad)."""
    (variable,) = (v for v in TABLE if v.name == name)
    return _read(os.environ if environ is None else environ, variable)


def _read(env: Mapping[str, str], variable: Variable) -> Any:
    assert variable.parse is not None
    raw = env.get(variable.name, "").strip()
    if not raw:
        return variable.default
    try:
        return variable.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{variable.name}: {exc} (got {raw!r})") from None


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


def _redis_url(value: str) -> str | None:
    try:
        return parse_redis_url(value)
    except ValueError as exc:
        raise ConfigError(f"REDIS_CONN_STRING: {exc}") from None


def _check_redis_topology(
    mode: RedisMode,
    sentinels: tuple[tuple[str, int], ...],
    cluster_nodes: tuple[tuple[str, int], ...],
    redis_url: str | None,
) -> None:
    # A list set for another mode is a mistake worth stopping for: it would be silently ignored.
    if sentinels and mode != "sentinel":
        raise ConfigError(f"USAGE_REDIS_SENTINELS: set, but USAGE_REDIS_MODE is {mode!r} (set it to 'sentinel')")
    if cluster_nodes and mode != "cluster":
        raise ConfigError(f"USAGE_REDIS_CLUSTER_NODES: set, but USAGE_REDIS_MODE is {mode!r} (set it to 'cluster')")
    if mode == "standalone":
        return
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


def markdown_table() -> str:
    """Every variable as a Markdown table (variable, default, meaning), for the docs."""
    rows = [
        "| Variable | Default | Meaning |",
        "|---|---|---|",
        *(f"| `{v.name}` | `{v.shown_default}` | {_escape_cells(v.doc)} |" for v in TABLE),
    ]
    return "\n".join(rows)


def _escape_cells(text: str) -> str:
    return text.replace("|", "\\|")


def main(argv: list[str] | None = None) -> None:
    """Print the environment variables the service reads, with their defaults."""
    parser = argparse.ArgumentParser(prog="python -m usage_service.config", description=main.__doc__)
    parser.add_argument("--markdown", action="store_true", help="as a Markdown table, for the docs")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table())
    else:
        print("\n".join(f"{name:<30} default {default}: {doc}" for name, default, doc in VARIABLES))


if __name__ == "__main__":
    main()
