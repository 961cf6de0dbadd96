"""Routes: the usage answer for an authenticated token, health and readiness, JSON errors."""

from __future__ import annotations

import logging

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .auth import SCOPE_KEY
from .metrics import CONTENT_TYPE as METRICS_TYPE
from .metrics import render
from .records import TokenRecord
from .responses import NO_CACHE, JSONError, error_body, send_body
from .store import StoreUnavailable

logger = logging.getLogger("usage_service.routes")


async def token_usage(scope: Scope, receive: Receive, send: Send) -> None:
    """GET /api/usage/token: the record the auth middleware admitted, with ETag revalidation."""
    record: TokenRecord = scope[SCOPE_KEY]
    etag = record.usage_etag
    for name, value in scope["headers"]:
        if name == b"if-none-match":
            if etag_matches(value, etag):
                await send_body(scope, send, 304, [NO_CACHE, (b"etag", etag)], b"")
                return
            break
    # A fresh list: the server or a middleware may add to the headers it is given.
    await send_body(scope, send, 200, [*record.usage_headers], record.usage_body)


def etag_matches(if_none_match: bytes, etag: bytes) -> bool:
    """RFC 9110 weak comparison of an If-None-Match list against our (strong) ETag."""
    if if_none_match == etag:
        return True
    for candidate in if_none_match.split(b","):
        candidate = candidate.strip()
        if candidate == b"*" or candidate.removeprefix(b"W/") == etag:
            return True
    return False


class UsageRoutes:
    """The /api/usage routes, dispatched by exact path: polling skips the general router.

    Everything else under the prefix (404s) goes on to `fallback`, the Starlette app's stack.
    """

    def __init__(self, fallback: ASGIApp) -> None:
        self.fallback = fallback
        self.endpoints = {"/api/usage/token": token_usage, "/api/usage/token/": token_usage}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.endpoints.get(scope["path"])
        if endpoint is None:
            await self.fallback(scope, receive, send)
        elif scope["method"] in ("GET", "HEAD"):
            await endpoint(scope, receive, send)
        else:
            await METHOD_NOT_ALLOWED(scope, receive, send)


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when the database answers; Redis is reported but never makes the service unready."""
    state = request.app.state
    try:
        await state.store.ping()
        database = "ok"
    except StoreUnavailable:
        database = "unavailable"
    if state.redis is None:
        redis = "disabled"
    else:
        redis = "ok" if await state.redis.ping() else "unavailable"
    ready = database == "ok"
    return json_response({"ready": ready, "database": database, "redis": redis}, status=200 if ready else 503)


async def metrics(request: Request) -> Response:
    """Prometheus metrics of every worker (keep this port off the public load balancer)."""
    request.app.state.publisher.publish()
    return Response(render(), headers={"cache-control": "no-store"}, media_type=METRICS_TYPE)


def json_response(content: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(content),
        status,
        headers={"cache-control": "no-store", **(headers or {})},
        media_type="application/json",
    )


async def http_error(request: Request, exc: Exception) -> Response:
    """404, 405 and any other HTTP error as the gateway's JSON error shape."""
    assert isinstance(exc, HTTPException)
    messages = {404: "not found", 405: "method not allowed"}
    message = messages.get(exc.status_code, exc.detail)
    return Response(error_body(message), exc.status_code, headers=exc.headers, media_type="application/json")


async def server_error(request: Request, exc: Exception) -> Response:
    """Last resort: log the traceback here, tell the client nothing about it."""
    return Response(error_body("internal server error"), 500, media_type="application/json")


METHOD_NOT_ALLOWED = JSONError(405, "method not allowed", [(b"allow", b"GET, HEAD")])

routes = [
    Route("/healthz", healthz, methods=["GET", "HEAD"]),
    Route("/readyz", readyz, methods=["GET", "HEAD"]),
    Route("/metrics", metrics, methods=["GET"]),
]
