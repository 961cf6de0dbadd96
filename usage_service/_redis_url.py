"""The gateway's REDIS_CONN_STRING, read with the gateway's own conventions.

The gateway reads it with go-redis v8's `ParseURL`, which takes a few options in the query
string (`?dial_timeout=5s&pool_size=20`) and refuses the URL over any other. redis-py reads a
query string its own way: it took go-redis's options as keyword arguments and failed in every
worker as it started, and read a database it could not parse (`?db=abc`) nowhere earlier. So
the query is read here, as go-redis reads it: its options are checked as it checks them and
left out of redis-py's URL (the service's own timeouts and pool apply), `db` moves to where
redis-py and the topology checks read it, and a URL the gateway refuses is refused.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus, urlsplit

# go-redis v8's options (options.go, setupConnParams) by the kind of value each takes.
_INTEGERS = ("max_retries", "pool_size", "min_idle_conns")
_DURATIONS = (
    "min_retry_backoff",
    "max_retry_backoff",
    "dial_timeout",
    "read_timeout",
    "write_timeout",
    "max_conn_age",
    "pool_timeout",
    "idle_timeout",
    "idle_check_frequency",
)
_BOOLEANS = ("pool_fifo",)
GATEWAY_OPTIONS = ("db", *_INTEGERS, *_DURATIONS, *_BOOLEANS)

_GO_INT = re.compile(r"[+-]?[0-9]+")
_GO_DURATION = re.compile(r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ns|us|µs|μs|ms|s|m|h))+")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_INT64 = 2**63


def parse_redis_url(value: str) -> str | None:
    """Return the URL to hand redis-py for REDIS_CONN_STRING (None when it is unset); raise
    ValueError, with a message that does not echo the URL (it may carry a password)."""
    if not value:
        return None
    try:
        parts = urlsplit(value)
    except ValueError:
        raise ValueError("malformed URL") from None
    # A password with / ? or # in it ends the URL's host part early: its rest, up to the '@',
    # would be read as a port, a path or a query, and quoted in the messages below.
    if "@" in parts.query + parts.fragment + ("" if parts.scheme == "unix" else parts.path):
        raise ValueError("malformed URL: in a password, / ? and # are written %2F, %3F and %23")
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ValueError(f"malformed URL ({exc})") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got scheme {parts.scheme!r}")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError("the URL names no host")
    database = parts.path.lstrip("/")
    if parts.scheme != "unix" and database and not _is_database(database):
        # redis-py would quietly take database 0; the gateway refuses the URL.
        raise ValueError(f"the database is a number, as in redis://host:6379/0 (got {database!r})")
    options = _query(parts.query)
    query_database = options.pop("db", "")
    if query_database and not _is_database(query_database):
        raise ValueError(f"the database is a number, as in ?db=0 (got {query_database!r})")
    unknown = sorted(name for name in options if name not in GATEWAY_OPTIONS)
    if unknown:
        raise ValueError(
            f"unknown option {', '.join(map(repr, unknown))} (the gateway's go-redis refuses it too; it takes"
            f" {', '.join(GATEWAY_OPTIONS)})"
        )
    for name, option in options.items():
        _check_option(name, option)
    without_query = value.partition("#")[0].partition("?")[0]
    if not query_database:
        return without_query
    if parts.scheme == "unix":  # the path is the socket's: redis-py reads the database from the query
        return f"{without_query}?db={int(query_database)}"
    # The query's database wins over the path's, as in go-redis; the topology checks read the path.
    return f"{parts.scheme}://{parts.netloc}/{int(query_database)}"


def _is_database(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _query(query: str) -> dict[str, str]:
    """The query's options as Go's `url.Query` reads them (the last of a repeated one wins)."""
    options: dict[str, str] = {}
    for pair in query.split("&"):
        # Go drops a pair with ';' in it, or with a bad escape, and one without a name.
        if not pair or ";" in pair or _BAD_ESCAPE.search(pair):
            continue
        name, _, option = pair.partition("=")
        name = unquote_plus(name)
        if name:
            options[name] = unquote_plus(option)
    return options


def _check_option(name: str, option: str) -> None:
    # Checked as go-redis checks them; an empty value is its default.
    if not option:
        return
    if name in _INTEGERS and not _is_go_int(option):
        raise ValueError(f"option {name} is not a whole number (got {option!r})")
    if name in _DURATIONS and not (_is_go_int(option) or _GO_DURATION.fullmatch(option)):
        raise ValueError(f"option {name} is not a duration such as 5s or 500ms (got {option!r})")
    if name in _BOOLEANS and option not in ("true", "false", "1", "0"):
        raise ValueError(f"option {name} is not true, false, 1 or 0 (got {option!r})")


def _is_go_int(text: str) -> bool:
    return _GO_INT.fullmatch(text) is not None and -_INT64 <= int(text) < _INT64
