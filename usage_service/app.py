"""The ASGI application: middleware, routes, and the lifespan that owns the connections."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from time import perf_counter
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from . import metrics, openapi
from ._circuit import CircuitBreaker
from .access import AccessLog, AccessMiddleware, RequestStats
from .addresses import ClientAddresses
from .auth import TokenAuthMiddleware
from .billing import GatewayOptions
from .cache import RedisCache
from .config import Settings, load_settings
from .cors import CORSMiddleware, request_origin
from .limiter import AuthFailureLimiter
from .lookup import TokenLookup
from .redis_client import create_client
from .refresh import Refresher
from .responses import STATUS_KEY
from .routes import ShortRoutes, http_error, route_table, routes, server_error
from .routing import ROUTE_KEY
from .store import open_store

logger = logging.getLogger("usage_service")

# Consecutive Redis failures that open the circuit: one stale connection after a Redis restart
# must not, three refused connections in a row should.
REDIS_FAILURE_THRESHOLD = 3
# Seconds the lifespan waits for background tasks and Redis to stop.
SHUTDOWN_GRACE = 2.0


class UsageService(Starlette):
    """The front door: the polled routes go down a short path, everything else through Starlette.

    Polling is the whole workload, so the usage and billing routes skip Starlette's middleware
    and router: one table lookup, then CORS when a browser asks, then the auth middleware and
    the endpoint. Starlette serves the lifespan, the health routes and the errors.
    """

    def __init__(self, settings: Settings, request_stats: RequestStats | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.request_stats = request_stats
        # What the short path reads on every request, set by the lifespan. Plain attributes:
        # `app.state` resolves each name through a Python-level __getattr__ (a tenth of the cost
        # of a polled request). `state` holds them too, with everything else.
        self.lookup: TokenLookup | None = None
        self.limiter: AuthFailureLimiter | None = None
        self.options: GatewayOptions | None = None
        table = route_table(settings.retry_after)
        self.short_routes, self.match = table.routes, table.match
        self.short: ASGIApp = TokenAuthMiddleware(ShortRoutes())
        # Outside authentication: a preflight carries no credential, and rejections need the headers too.
        self.cors = (
            CORSMiddleware(self.short, origins=settings.cors_origins, paths=openapi.BROWSER_PATHS)
            if settings.cors_origins
            else None
        )
        self.access = (
            AccessLog(
                routes=openapi.ROUTE_LABELS,
                stats=request_stats,
                log=settings.access_log,
                client=ClientAddresses(settings.trusted_proxies),  # the client the limiter counts
            )
            if request_stats is not None or settings.access_log
            else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The polled paths are one dict lookup; only the rest scan the table's prefixes.
        route = (self.short_routes.get(scope["path"]) or self.match(scope["path"])) if scope["type"] == "http" else None
        if route is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        scope[ROUTE_KEY] = route
        started = perf_counter()
        try:
            cors = self.cors
            if cors is not None and scope["path"] in cors.paths and (origin := request_origin(scope)) is not None:
                await cors.cross_origin(origin, scope, receive, send)
            else:
                await self.short(scope, receive, send)
        except Exception:
            logger.exception("unexpected error answering %s", scope["path"])
            try:
                await route.rules.internal_error(scope, receive, send)
            except Exception:  # the response had already started: nothing more to tell the client
                pass
        finally:
            if self.access is not None:
                # The short path's senders note the status (a failure before any answer is a 500).
                self.access.record(scope, scope.get(STATUS_KEY, 500), started)

    def build_middleware_stack(self) -> ASGIApp:
        app = super().build_middleware_stack()
        return app if self.access is None else AccessMiddleware(app, self.access)


def create_app(settings: Settings) -> UsageService:
    """Build the application; connections are opened by its lifespan, not here."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        assert isinstance(app, UsageService)
        store = await open_store(settings)
        redis = _open_redis(settings)
        if redis is not None and not await redis.ping():
            logger.warning("redis does not answer at start; serving from the database until it does")
        lookup = TokenLookup(store, redis, settings)
        app.state.limiter = app.limiter = AuthFailureLimiter.from_settings(settings, redis)
        refresher = Refresher(lookup, store, redis, settings)
        app.state.store = store
        app.state.redis = redis
        app.state.lookup = app.lookup = lookup
        app.state.refresher = refresher
        app.state.options = app.options = options = GatewayOptions(store, settings.options_interval)
        await options.refresh()
        tasks = [asyncio.create_task(options.run(), name="options")]
        if settings.metrics:
            publisher = metrics.Publisher(store, lookup, refresher, request_stats)
            app.state.metrics = registry = metrics.scrape_registry(publisher)
            tasks.append(asyncio.create_task(publisher.run(), name="metrics"))
            if settings.metrics_address is not None:
                host, port = settings.metrics_address
                tasks.append(asyncio.create_task(metrics.serve_separately(registry, host, port), name="metrics server"))
        if settings.refresh_interval > 0:
            tasks.append(asyncio.create_task(refresher.run(), name="refresher"))
            if redis is not None:
                listener = redis.listen_invalidations(lookup.invalidate, lookup.confirm, lookup.set_invalidations_live)
                tasks.append(asyncio.create_task(listener, name="invalidations"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            # Bounded: a client library that swallows a cancellation must not hang shutdown.
            _, stuck = await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE) if tasks else (set(), set())
            if stuck:
                logger.warning("background tasks did not stop in time: %s", ", ".join(t.get_name() for t in stuck))
            if redis is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(SHUTDOWN_GRACE):
                        await redis.close()
            await store.close()
            metrics.worker_exited()

    request_stats = RequestStats(openapi.ROUTE_LABELS) if settings.metrics else None
    # /metrics is served here unless it is off or has an address of its own.
    served = [r for r in routes if r.path != "/metrics" or (settings.metrics and settings.metrics_address is None)]
    return UsageService(
        settings,
        request_stats,
        routes=served,
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )


def create_app_from_env() -> UsageService:
    """Factory for uvicorn workers: each process reads the same environment."""
    return create_app(load_settings())


def _open_redis(settings: Settings) -> RedisCache | None:
    if settings.redis_url is None:
        return None
    breaker = CircuitBreaker(REDIS_FAILURE_THRESHOLD, settings.redis_cooldown)
    client = create_client(settings)
    return RedisCache(client, prefix=settings.redis_prefix, timeout=settings.redis_timeout, breaker=breaker)
