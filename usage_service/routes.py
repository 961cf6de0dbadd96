"""Routes: the short path's table and dispatch, the usage answer, health and readiness, JSON errors."""

from __future__ import annotations

import logging

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .auth import SCOPE_KEY, relay_rules, usage_rules
from .billing import billing_subscription, billing_usage
from .metrics import CONTENT_TYPE as METRICS_TYPE
from .metrics import render
from .openapi import DOCUMENT as OPENAPI_DOCUMENT
from .records import TokenRecord
from .responses import NO_CACHE, error_body, send_body
from .routing import ROUTE_KEY, RouteTable, ShortRoute, both_slashes
from .store import StoreMisconfigured, StoreUnavailable

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


USAGE_PATHS = ("/api/usage/token",)
SUBSCRIPTION_PATHS = ("/dashboard/billing/subscription", "/v1/dashboard/billing/subscription")
BILLING_USAGE_PATHS = ("/dashboard/billing/usage", "/v1/dashboard/billing/usage")


def route_table(retry_after: int) -> RouteTable:
    """Every "how much is left" route, with the rules it follows; anything else under the
    prefixes is a 404 in that family's shape (after authentication, like the routes)."""
    usage, relay = usage_rules(retry_after), relay_rules(retry_after)
    return RouteTable(
        {
            **both_slashes(USAGE_PATHS, ShortRoute(token_usage, usage)),
            **both_slashes(SUBSCRIPTION_PATHS, ShortRoute(billing_subscription, relay)),
            **both_slashes(BILLING_USAGE_PATHS, ShortRoute(billing_usage, relay)),
        },
        prefixes={"/api/usage": usage, "/dashboard/billing": relay, "/v1/dashboard/billing": relay},
    )


class ShortRoutes:
    """Dispatch the route the front door matched (in `scope["usage.route"]`): polling skips the
    general router."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route: ShortRoute = scope[ROUTE_KEY]
        endpoint = route.endpoint
        if endpoint is None:
            await route.rules.not_found(scope, receive, send)
        elif scope["method"] in ("GET", "HEAD"):
            await endpoint(scope, receive, send)
        else:
            await route.rules.method_not_allowed(scope, receive, send)


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when the database answers; Redis is reported but never makes the service unready."""
    state = request.app.state
    reason = None
    try:
        await state.store.ping()
        database = "ok"
    except StoreMisconfigured as exc:  # what an operator must fix, in one line
        database, reason = "unavailable", str(exc)
    except StoreUnavailable:
        database = "unavailable"
    if state.redis is None:
        redis = "disabled"
    else:
        redis = "ok" if await state.redis.ping() else "unavailable"
    ready = database == "ok"
    body: dict[str, object] = {"ready": ready, "database": database, "redis": redis}
    if reason is not None:
        body["reason"] = reason
    return json_response(body, status=200 if ready else 503)


async def metrics(request: Request) -> Response:
    """Prometheus metrics of every worker (keep this port off the public load balancer)."""
    return Response(render(request.app.state.metrics), headers={"cache-control": "no-store"}, media_type=METRICS_TYPE)


async def openapi_document(request: Request) -> Response:
    """The OpenAPI 3.1 document of this service."""
    return Response(OPENAPI_DOCUMENT, media_type="application/json")


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


routes = [
    Route("/healthz", healthz, methods=["GET", "HEAD"]),
    Route("/readyz", readyz, methods=["GET", "HEAD"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi_document, methods=["GET"]),
]
