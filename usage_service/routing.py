"""The polled routes' table and dispatch: the paths answered without Starlette, and their rules.

Built once when the app is created. A path is looked up exactly first (the polled routes, with
and without a trailing slash); only a miss scans the few prefixes, whose other paths are 404s
once the credential has been checked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

from .records import TokenRecord

# Parameters a query string may hold: the routes read at most seven, and parsing 15,000 of them
# (what a 32 KiB request head holds) cost a worker 21 ms of CPU per request.
MAX_PARAMETERS = 64


class TooManyParameters(ValueError):
    def __init__(self) -> None:
        super().__init__(f"too many query parameters (at most {MAX_PARAMETERS})")


def query_pairs(query_string: bytes) -> list[tuple[str, str]]:
    """A query string's (name, value) pairs, percent-decoded, as the gateway reads them; text
    that is not UTF-8 is read with replacement characters. Raises TooManyParameters past
    MAX_PARAMETERS, before parsing any."""
    try:
        return parse_qsl(query_string.decode(errors="replace"), keep_blank_values=True, max_num_fields=MAX_PARAMETERS)
    except ValueError:  # (the only one parse_qsl raises unless parsing strictly)
        raise TooManyParameters from None


def query_values(query_string: bytes) -> dict[str, str]:
    """A query string's parameters, the first value of each, as the gateway reads them (gin's
    `c.Query`). Raises TooManyParameters."""
    values: dict[str, str] = {}
    for name, value in query_pairs(query_string):
        values.setdefault(name, value)
    return values


# Where the front door leaves the matched route for the auth middleware and the dispatcher.
ROUTE_KEY = "usage.route"
# Where the auth middleware leaves the admitted token's record for the endpoint.
SCOPE_KEY = "usage.token"


@dataclass(frozen=True, slots=True)
class Rules:
    """How a family of routes admits a token and what its prepared error answers look like."""

    verdict: Callable[[TokenRecord], ASGIApp | None]  # None admits the token, else the rejection to send
    no_header: ASGIApp
    invalid_bearer: ASGIApp
    unknown_key: ASGIApp
    unavailable: ASGIApp
    not_found: ASGIApp
    method_not_allowed: ASGIApp
    internal_error: ASGIApp
    # Without an Authorization header, take the credential from `?key=` (the log route's legacy form).
    query_key: bool = False
    # Also take an Authorization value without the Bearer scheme as the credential itself, as the
    # gateway's token middleware does (`Authorization: sk-KEY`); its usage route does not.
    bare_key: bool = False


@dataclass(frozen=True, slots=True)
class ShortRoute:
    endpoint: ASGIApp | None  # None: a path under a prefix that names no route
    rules: Rules


class RouteTable:
    """Exact paths first, then prefixes; `match` returns None for paths the short path does not own."""

    def __init__(self, routes: Mapping[str, ShortRoute], prefixes: Mapping[str, Rules]) -> None:
        self.routes = dict(routes)
        self._prefixes = tuple((prefix, prefix + "/", ShortRoute(None, rules)) for prefix, rules in prefixes.items())

    def match(self, path: str) -> ShortRoute | None:
        route = self.routes.get(path)
        if route is not None:
            return route
        for prefix, prefix_slash, unknown in self._prefixes:
            if path == prefix or path.startswith(prefix_slash):
                return unknown
        return None


def both_slashes(paths: Iterable[str], route: ShortRoute) -> dict[str, ShortRoute]:
    """Map each path, with and without a trailing slash, to `route` (some clients add one, none redirect)."""
    return {form: route for path in paths for form in (path, path + "/")}


async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
    """Hand an admitted request to the endpoint of the route the front door matched."""
    route: ShortRoute = scope[ROUTE_KEY]
    endpoint = route.endpoint
    if endpoint is None:
        await route.rules.not_found(scope, receive, send)
    elif scope["method"] in ("GET", "HEAD"):
        await endpoint(scope, receive, send)
    else:
        await route.rules.method_not_allowed(scope, receive, send)
