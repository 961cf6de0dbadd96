"""Routes: the polled routes' table and the usage answer; health, readiness, metrics and JSON errors."""

from __future__ import annotations

import logging

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .auth import relay_rules, usage_rules
from .billing import BillingEndpoint, BillingUsageEndpoint, subscription_data
from .budget import per_second
from .cache import AnswerCache
from .config import Settings
from .metrics import CONTENT_TYPE as METRICS_TYPE
from .metrics import render
from .openapi import DOCUMENT as OPENAPI_DOCUMENT
from .records import TokenRecord
from .responses import JSONError, error_body, send_revalidated
from .routing import SCOPE_KEY, RouteTable, ShortRoute, both_slashes
from .services import Services
from .store import StoreMisconfigured, StoreUnavailable
from .tokenlog import Answers, TokenLogEndpoint
from .usage_history import HistoryEndpoint

logger = logging.getLogger("usage_service.routes")


async def token_usage(scope: Scope, receive: Receive, send: Send) -> None:
    """GET /api/usage/token: the record the auth middleware admitted, with ETag revalidation."""
    record: TokenRecord = scope[SCOPE_KEY]
    await send_revalidated(scope, send, record.usage)


USAGE_PATHS = ("/api/usage/token",)
HISTORY_PATHS = ("/api/usage/token/history",)
SUBSCRIPTION_PATHS = ("/dashboard/billing/subscription", "/v1/dashboard/billing/subscription")
BILLING_USAGE_PATHS = ("/dashboard/billing/usage", "/v1/dashboard/billing/usage")
LOG_PATHS = ("/api/log/token",)

# Bytes of rendered history answers (and of dated billing ones) a worker keeps: a 30-day
# history by day is about 4 KB, so the answers of USAGE_HOT_MAX (20,000) polled tokens fit. They
# must: tokens polled in turn that do not all fit push each other out, and every poll renders
# again. A burst of 100-day answers by day and model pushes out the oldest instead of growing
# the worker.
ANSWER_BYTES = 80 * 1024 * 1024


def route_table(settings: Settings, services: Services) -> RouteTable:
    """Every "how much is left" route, with the rules it follows; anything else under the
    prefixes is a 404 in that family's shape (after authentication, like the routes)."""
    usage, relay = usage_rules(settings.retry_after), relay_rules(settings.retry_after)
    subscription = BillingEndpoint("subscription", subscription_data, services)
    # Answers rendered from the log are kept as long as a record in the in-process layer, for
    # as many polled tokens as the refresher keeps fresh, within ANSWER_BYTES each.
    limits = (settings.hot_max, ANSWER_BYTES, settings.local_ttl, settings.stale_if_error)
    billing_usage = BillingUsageEndpoint(
        services,
        unavailable=relay.unavailable,
        max_days=settings.history_max_days,
        total=settings.billing_total,
        answers=AnswerCache(*limits),
    )
    history = HistoryEndpoint(
        services, unavailable=usage.unavailable, max_days=settings.history_max_days, answers=AnswerCache(*limits)
    )
    # The usage route's rules, plus the legacy `?key=` credential older gateways took here, and
    # a credential without the Bearer scheme, which the gateway's middleware for this route takes.
    log = usage_rules(settings.retry_after, query_key=True, bare_key=True)
    budget = per_second(settings.log_reads_per_token)
    token_log = TokenLogEndpoint(lambda: services.logs, log.unavailable, Answers(budget=budget))
    return RouteTable(
        {
            **both_slashes(USAGE_PATHS, ShortRoute(token_usage, usage)),
            **both_slashes(HISTORY_PATHS, ShortRoute(history, usage)),
            **both_slashes(SUBSCRIPTION_PATHS, ShortRoute(subscription, relay)),
            **both_slashes(BILLING_USAGE_PATHS, ShortRoute(billing_usage, relay)),
            **both_slashes(LOG_PATHS, ShortRoute(token_log, log)),
        },
        prefixes={"/api/usage": usage, "/dashboard/billing": relay, "/v1/dashboard/billing": relay},
    )


def routes(services: Services, *, metrics: bool) -> list[Route]:
    """Starlette's routes: health, readiness, the OpenAPI document and (when `metrics`) /metrics."""

    async def readyz(request: Request) -> Response:
        """Ready when the database answers; Redis (and a log database of its own) are reported
        but never make the service unready."""
        reason = None
        try:
            await services.store.ping()
            database = "ok"
        except StoreMisconfigured as exc:  # what an operator must fix, in one line
            database, reason = "unavailable", str(exc)
        except StoreUnavailable:
            database = "unavailable"
        if services.redis is None:
            redis = "disabled"
        else:
            redis = "ok" if await services.redis.ping() else "unavailable"
        ready = database == "ok"
        body: dict[str, object] = {"ready": ready, "database": database, "redis": redis}
        if reason is not None:
            body["reason"] = reason
        if services.logs.separate:
            # Reported, never required: the balance routes do not need the log.
            try:
                await services.logs.ping()
                body["log_database"] = "ok"
            except StoreMisconfigured as exc:
                body["log_database"], body["log_reason"] = "unavailable", str(exc)
            except StoreUnavailable:
                body["log_database"] = "unavailable"
        return json_response(body, status=200 if ready else 503)

    async def metrics_endpoint(request: Request) -> Response:
        """Prometheus metrics of every worker (keep this port off the public load balancer)."""
        assert services.metrics is not None  # the route exists only with metrics on
        return Response(render(services.metrics), headers={"cache-control": "no-store"}, media_type=METRICS_TYPE)

    served = [
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/readyz", readyz, methods=["GET", "HEAD"]),
        Route("/openapi.json", openapi_document, methods=["GET"]),
    ]
    if metrics:
        served.append(Route("/metrics", metrics_endpoint, methods=["GET"]))
    return served


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


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


# What an unexpected error answers on a path that is not a polled route (those have their own).
INTERNAL_ERROR = JSONError(500, "internal server error")
