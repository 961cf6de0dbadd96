"""Per-request accounting: counts and latencies for the metrics, and the optional access log.

The front door (app.py) records every request here once it is answered. The request path only
increments plain integers here; metrics.py publishes them to prometheus-client once a second
and at scrape time.
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_left
from collections.abc import Callable, Mapping
from time import perf_counter

from starlette.types import Scope

from .logs import escape_char
from .lookup import LAYER

access_logger = logging.getLogger("usage_service.access")

# Upper bounds (seconds) of the latency histogram: a poll answered in-process takes tens of
# microseconds, a database read milliseconds, a locked database up to USAGE_DB_TIMEOUT.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# The route label of a path no route serves: paths are client input, labels must stay few.
OTHER = "other"

# A path no route serves (or a method HTTP has not) is logged with anything that could be a key
# blanked out, then cut short, then escaped: one request is one line, whatever the client sent.
# Could be a key: a long run of letters and digits, and any run after `sk-` or `key=` (a key is
# 1 to 128 of them).
_KEYLIKE = re.compile(r"(?:sk-|(?<=[Kk][Ee][Yy]=))[0-9A-Za-z]+|[0-9A-Za-z]{16,}")
_MAX_LOGGED_PATH = 200
# Printable ASCII but space, '"' and backslash stays as is; anything else is written \xHH, \uHHHH
# or \UHHHHHHHH (a decoded %0a would start a forged line; %22 would end the quoted path early).
_UNSAFE = re.compile(r"[^\x21\x23-\x5b\x5d-\x7e]")

ACCESS_FORMAT = '%(client)s - "%(method)s %(path)s" %(status)d %(duration_ms).3fms %(layer)s'


class RouteStats:
    """One route's responses by status and its latency histogram, in plain numbers."""

    __slots__ = ("statuses", "buckets", "seconds")

    def __init__(self) -> None:
        self.statuses: dict[int, int] = {}
        self.buckets = [0] * (len(BUCKETS) + 1)  # count per bucket of BUCKETS, then +Inf
        self.seconds = 0.0  # sum of durations


class RequestStats:
    """Every route's RouteStats, reachable from the request path in one dict lookup."""

    def __init__(self, routes: Mapping[str, str]) -> None:
        self.routes: dict[str, RouteStats] = {label: RouteStats() for label in {*routes.values(), OTHER}}
        self.by_path = {path: self.routes[label] for path, label in routes.items()}
        self.other = self.routes[OTHER]

    def note(self, path: str, status: int, elapsed: float) -> None:
        route = self.by_path.get(path, self.other)
        statuses = route.statuses
        statuses[status] = statuses.get(status, 0) + 1
        route.buckets[bisect_left(BUCKETS, elapsed)] += 1
        route.seconds += elapsed


def client_address(scope: Scope) -> str:
    """The address the request came from, as logged. (One place to teach about trusted proxies.)"""
    client = scope.get("client")
    return str(client[0]) if client else "-"


def logged_path(path: str, routes: Mapping[str, str]) -> str:
    """The path as it may appear in a log: a route's own path as is, any other without key material."""
    return path if path in routes else _loggable(path)


def logged_method(method: str) -> str:
    """The method as it may appear in a log: HTTP's own as is, anything else (granian passes any
    token on) as an unknown path is."""
    return method if method in _METHODS else _loggable(method)


_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "TRACE"})


def _loggable(text: str) -> str:
    # Redacted whole before it is cut: cutting first could leave a key's first 15 characters,
    # too short a run to look like one.
    text = _KEYLIKE.sub("[redacted]", text)[:_MAX_LOGGED_PATH]
    return _UNSAFE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    return escape_char(match.group())


class AccessLog:
    """What happens once a request has been answered: its count, its latency, its log line."""

    def __init__(
        self,
        *,
        routes: Mapping[str, str],
        stats: RequestStats | None,
        log: bool,
        client: Callable[[Scope], str] = client_address,
    ) -> None:
        self.routes = routes  # path -> route label
        self.stats = stats
        self.log = log
        self.client = client

    def record(self, scope: Scope, status: int, started: float) -> None:
        """Account for a request answered with `status` that came in at `started` (perf_counter)."""
        elapsed = perf_counter() - started
        path: str = scope["path"]
        if self.stats is not None:
            self.stats.note(path, status, elapsed)
        if self.log:
            self._log(scope, path, status, elapsed)

    def _log(self, scope: Scope, path: str, status: int, elapsed: float) -> None:
        # The query string is never logged: a client may have put its key there.
        fields = {
            "client": self.client(scope),
            "method": logged_method(scope["method"]),
            "path": logged_path(path, self.routes),
            "status": status,
            "duration_ms": round(elapsed * 1000, 3),
            "layer": scope.get(LAYER, "-"),
        }
        access_logger.info(ACCESS_FORMAT, fields)
