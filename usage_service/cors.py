"""CORS for browser dashboards that poll the API from another origin with a Bearer header.

Pure ASGI and outside the auth middleware: a preflight carries no credential, so it is answered
here, and the headers reach every answer, 401/403/304/503 included. A request without an
Origin header (every non-browser client) costs one scan of its headers.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .responses import STATUS_KEY, JSONError, send_body
from .routing import ROUTE_KEY, ShortRoute

ALLOW_METHODS = (b"GET", b"HEAD")
ALLOW_HEADERS = frozenset({b"authorization", b"if-none-match", b"cache-control"})
EXPOSE_HEADERS = b"ETag, Retry-After, WWW-Authenticate"
MAX_AGE = 600  # seconds a browser may reuse a preflight (Chromium caps it at 7200)

ORIGIN_REFUSED = JSONError(403, "origin not allowed")
METHOD_REFUSED = JSONError(403, "CORS method not allowed")
HEADERS_REFUSED = JSONError(403, "CORS request headers not allowed")


class CORSMiddleware:
    """Answer preflights and add Access-Control-* headers, on `paths` only."""

    def __init__(self, app: ASGIApp, *, origins: Iterable[str], paths: Collection[str]) -> None:
        self.app = app
        self.paths = paths
        origins = tuple(origins)
        self.any_origin = "*" in origins
        self.origins = frozenset(origin.encode() for origin in origins)
        self.preflight_headers = [
            (b"access-control-allow-methods", b", ".join(ALLOW_METHODS)),
            (b"access-control-allow-headers", b"Authorization, If-None-Match, Cache-Control"),
            (b"access-control-max-age", str(MAX_AGE).encode()),
            (b"cache-control", b"no-store"),
        ]
        self.simple_headers = [(b"access-control-expose-headers", EXPOSE_HEADERS)]
        if self.any_origin:
            self.simple_headers.append((b"access-control-allow-origin", b"*"))
        else:
            # The answer depends on the Origin header: caches must keep one per origin.
            self.simple_headers.append((b"vary", b"Origin"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            for name, value in scope["headers"]:
                if name == b"origin":  # only browsers send one
                    await self.cross_origin(value, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def cross_origin(self, origin: bytes, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a request that came with an Origin header: a preflight here, anything else with
        the Access-Control-* headers added to the app's answer."""
        if scope["method"] == "OPTIONS":
            request_method = request_headers = None
            for name, value in scope["headers"]:
                if name == b"access-control-request-method":
                    request_method = value
                elif name == b"access-control-request-headers":
                    request_headers = value
            if request_method is not None:
                await self.preflight(origin, request_method, request_headers, scope, receive, send)
                return

        allowed = self.any_origin or origin in self.origins
        headers = self.response_headers(origin) if allowed else [(b"vary", b"Origin")]

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                # A fresh list: prepared answers share theirs between requests.
                message = {**message, "headers": [*message.get("headers", ()), *headers]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_cors)
        except Exception:
            # The front door logs an unexpected error and answers it with a 500, but through
            # the server's own `send`: answered here first, the 500 carries the headers as well
            # (a page reads it rather than a CORS failure), and the front door sends no other.
            if STATUS_KEY not in scope:
                route: ShortRoute = scope[ROUTE_KEY]
                await route.rules.internal_error(scope, receive, send_with_cors)
            raise

    def response_headers(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        if self.any_origin:
            return self.simple_headers
        return [(b"access-control-allow-origin", origin), *self.simple_headers]

    async def preflight(
        self,
        origin: bytes,
        method: bytes,
        request_headers: bytes | None,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        # A refusal carries no Access-Control-Allow-Origin: the browser blocks the real request.
        if not (self.any_origin or origin in self.origins):
            refusal = ORIGIN_REFUSED
        elif method.strip() not in ALLOW_METHODS:
            refusal = METHOD_REFUSED
        elif request_headers and not _headers_allowed(request_headers):
            refusal = HEADERS_REFUSED
        else:
            await send_body(scope, send, 204, [*self.preflight_headers, *self.response_headers(origin)], b"")
            return
        await refusal(scope, receive, send)


def _headers_allowed(value: bytes) -> bool:
    return all(not name or name in ALLOW_HEADERS for name in (part.strip().lower() for part in value.split(b",")))
