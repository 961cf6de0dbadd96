"""The ASGI application: the front door, its two pipelines, and the lifespan that owns the connections.

    UsageService (route table lookup; errors and accounting, once, for every request)
    ├── a polled route → [CORSMiddleware] → TokenAuthMiddleware → dispatch → endpoint
    │                     (when configured, for requests with an Origin header: browsers')
    └── anything else  → Starlette: lifespan, /healthz, /readyz, /metrics, /openapi.json, 404s

Polling is the whole workload, so the polled routes skip Starlette's middleware and router: it
was worth about a quarter of a hot poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from time import perf_counter
from types import FrameType
from typing import Any, NoReturn, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics, openapi
from ._circuit import CircuitBreaker
from ._redis_guard import RedisGuard
from ._tasks import BackgroundTasks
from .access import OTHER, AccessLog, RequestStats
from .addresses import ClientAddresses
from .auth import TokenAuthMiddleware
from .billing import GatewayOptions
from .budget import per_second
from .config import Settings, load_settings
from .cors import CORSMiddleware
from .days import DaySums
from .history import History
from .hotset import renote_interval
from .limiter import AuthFailureLimiter
from .lookup import TokenLookup
from .looplag import LoopLag
from .redis_client import create_client
from .refresh import Refresher
from .responses import STATUS_KEY
from .routes import INTERNAL_ERROR, http_error, route_table, routes
from .routing import ROUTE_KEY, RouteTable, dispatch
from .services import Services
from .shared import SharedRedis
from .store import StoreNotReady, open_store
from .store.logs import open_log_reader
from .tails import TailKeeper

logger = logging.getLogger("usage_service")

# Consecutive Redis failures that open the circuit: one stale connection after a Redis restart
# must not, three refused connections in a row should.
T = TypeVar("T")

REDIS_FAILURE_THRESHOLD = 3
# Seconds the lifespan waits for background tasks and Redis to stop.
SHUTDOWN_GRACE = 2.0


class UsageService:
    """The front door: hands each request to its pipeline, answers what fails, accounts for all.

    The status of every answer is noted in `scope["usage.status"]`: by the polled routes' senders
    themselves (no `send` wrapper on the hot path), and on Starlette's side as its answer starts.
    """

    def __init__(
        self,
        *,
        table: RouteTable,
        polled: ASGIApp,
        cross_origin: ASGIApp | None,
        starlette: Starlette,
        services: Services,
        access: AccessLog | None,
    ) -> None:
        self.exact, self.match = table.routes, table.match
        self.polled = polled
        self.cross_origin = cross_origin  # the polled pipeline behind CORS (None: CORS is off)
        self.starlette = starlette
        self.access = access
        self.state = services  # what the lifespan opened (tests and benchmarks look at it)
        self.router = starlette.router  # its lifespan_context runs the lifespan without a server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # the lifespan (and websockets, which Starlette refuses)
            await self.starlette(scope, receive, send)
            return
        path = scope["path"]
        # The polled paths are one dict lookup; only the rest scan the table's prefixes.
        route = self.exact.get(path) or self.match(path)
        started = perf_counter()
        try:
            if route is not None:
                scope[ROUTE_KEY] = route
                pipeline = self.polled
                if self.cross_origin is not None:
                    # Only browsers send an Origin header: everyone else skips CORS altogether.
                    for name, _ in scope["headers"]:
                        if name == b"origin":
                            pipeline = self.cross_origin
                            break
                await pipeline(scope, receive, send)
            else:
                await self.starlette(scope, receive, _noting_status(scope, send))
        except Exception:
            logger.exception("unexpected error answering %s", openapi.ROUTE_LABELS.get(path, OTHER))
            if STATUS_KEY not in scope:  # nothing sent yet: a JSON 500 in the route's shape
                await (INTERNAL_ERROR if route is None else route.rules.internal_error)(scope, receive, send)
        finally:
            if self.access is not None:
                # No status noted: the request failed before any answer, and the server answers 500.
                self.access.record(scope, scope.get(STATUS_KEY, 500), started)


# How long a worker keeps trying to open a database it cannot read yet (locked by a migration,
# a server restarting, a file being restored) before its start-up fails. The command's own
# checks stop the first start at once; this is for a worker starting later (a replacement for
# one that died), which failing would stop the whole service with it.
START_PATIENCE = 30.0


async def _patiently(open_: Callable[[], Awaitable[T]]) -> T:
    """`open_()`, tried again while it raises StoreNotReady, for up to START_PATIENCE seconds,
    and not after a SIGTERM or SIGINT: the server acts on those only once start-up is over, so a
    worker still trying would hold up the stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    deadline, pause = loop.time() + START_PATIENCE, 0.5
    with _setting_on_stop_signals(loop, stop):
        while True:
            try:
                return await open_()
            except StoreNotReady as exc:
                left = deadline - loop.time()
                if left <= 0 or stop.is_set():
                    raise
                logger.warning("%s; trying again in %g s", exc, min(pause, left))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), min(pause, left))
                if stop.is_set():
                    raise
                pause = min(2 * pause, 5.0)


@contextlib.contextmanager
def _setting_on_stop_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> Iterator[None]:
    """Set `stop` on SIGTERM and SIGINT as well as calling their handlers (the server's): in the
    main thread, where a handler is installed; elsewhere nothing."""
    chained: dict[int, Callable[[int, FrameType | None], Any]] = {}

    def chain(handler: Callable[[int, FrameType | None], Any]) -> Callable[[int, FrameType | None], None]:
        def handle(signum: int, frame: FrameType | None) -> None:
            loop.call_soon_threadsafe(stop.set)
            handler(signum, frame)

        return handle

    with contextlib.suppress(ValueError):  # not the main thread
        for signum in (signal.SIGTERM, signal.SIGINT):
            handler = signal.getsignal(signum)
            if callable(handler):
                signal.signal(signum, chain(handler))
                chained[signum] = handler
    try:
        yield
    finally:
        for chained_signum, handler in chained.items():
            signal.signal(chained_signum, handler)


def _noting_status(scope: Scope, send: Send) -> Send:
    async def send_noting_status(message: Message) -> None:
        if message["type"] == "http.response.start":
            scope[STATUS_KEY] = message["status"]
        await send(message)

    return send_noting_status


async def _to_the_front_door(request: Request, exc: Exception) -> NoReturn:
    """Starlette's last-resort handler: send nothing, hand the error to the front door, which
    answers unexpected errors for both pipelines."""
    raise exc


def create_app(settings: Settings) -> UsageService:
    """Build the application; connections are opened by its lifespan, not here."""
    services = Services()
    request_stats = RequestStats(openapi.ROUTE_LABELS) if settings.metrics else None

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        # What is opened is closed in reverse order, at shutdown and as well when a later step of
        # the set-up fails: a store left open keeps aiosqlite's thread, which is no daemon, and
        # the worker could then never exit.
        async with contextlib.AsyncExitStack() as opened:
            opened.callback(metrics.worker_exited)
            store = services.store = await _patiently(lambda: open_store(settings))
            opened.push_async_callback(store.close)
            logs = services.logs = await open_log_reader(settings, store)
            opened.push_async_callback(logs.close)
            lag = LoopLag()  # an overloaded worker's timeouts are not Redis's fault (RedisGuard)
            redis = services.redis = _open_redis(settings, lag)
            if redis is not None:
                opened.push_async_callback(_close_redis, redis)
                if not await redis.ping():
                    logger.warning("redis does not answer at start; serving from the database until it does")
            lookup = services.lookup = TokenLookup(store, redis.records if redis else None, settings)
            services.limiter = AuthFailureLimiter.from_settings(settings, redis.failures if redis else None)
            history = services.history = History(
                logs,
                days=redis.history_days if redis else None,
                tails=redis.history_tails if redis else None,
                # A round's confirmation holds until the next one is due and a second more, or, when
                # rounds run late (a loaded leader), as long as a record in Redis is fresh: the bound
                # the balance keeps when invalidations are late.
                confirmed_for=max(settings.refresh_interval + 1.0, settings.cache_ttl),
                note_polls=settings.refresh_interval > 0,
                stale_if_error=settings.stale_if_error,
                kept_while_asked=settings.hot_window - renote_interval(settings.hot_window),
            )
            opened.push_async_callback(history.close)
            services.day_sums = DaySums(history, budget=per_second(settings.history_days_per_token))
            keeper = TailKeeper(history, settings) if settings.refresh_interval > 0 else None
            refresher = services.refresher = Refresher(lookup, store, redis, settings, tails=keeper)
            options = services.options = GatewayOptions(store, settings.options_interval)
            services.metrics = None
            await options.refresh()
            tasks = BackgroundTasks()
            opened.push_async_callback(tasks.stop, SHUTDOWN_GRACE)
            tasks.start("options", options.run)
            tasks.start("loop lag", lag.run)
            if settings.metrics:
                guard = redis.guard if redis else None
                publisher = metrics.Publisher(
                    store, lookup, refresher, request_stats, guard, logs=logs, history=history, lag=lag
                )
                registry = services.metrics = metrics.scrape_registry(publisher)
                tasks.start("metrics", publisher.run)
                if settings.metrics_address is not None:
                    host, port = settings.metrics_address
                    tasks.start("metrics server", lambda: metrics.serve_separately(registry, host, port))
            if settings.refresh_interval > 0:
                tasks.start("refresher", refresher.run)
                if redis is not None:
                    channel = redis.channel

                    def live(up: bool) -> None:
                        lookup.set_invalidations_live(up)
                        history.set_live(up)
                        if up:
                            refresher.note_again()

                    tasks.start(
                        "invalidations",
                        lambda: channel.listen(
                            lookup.invalidate, lookup.confirm, live, history.hear_round, history.hear_round_began
                        ),
                    )
            yield

    polled = TokenAuthMiddleware(dispatch, services=services)
    # Outside authentication: a preflight carries no credential, and rejections need the headers too.
    cross_origin = (
        CORSMiddleware(polled, origins=settings.cors_origins, paths=openapi.BROWSER_PATHS)
        if settings.cors_origins
        else None
    )
    starlette = Starlette(
        # /metrics is served here unless it is off or has an address of its own.
        routes=routes(services, metrics=settings.metrics and settings.metrics_address is None),
        exception_handlers={HTTPException: http_error, Exception: _to_the_front_door},
        lifespan=lifespan,
    )
    # Every other path is 404: Starlette's default 307 to the path without its trailing slash
    # would build its Location from the request's Host header (an open redirect).
    starlette.router.redirect_slashes = False
    access = (
        AccessLog(
            routes=openapi.ROUTE_LABELS,
            stats=request_stats,
            log=settings.access_log,
            client=ClientAddresses(settings.trusted_proxies),  # the client the limiter counts
        )
        if request_stats is not None or settings.access_log
        else None
    )
    return UsageService(
        table=route_table(settings, services),
        polled=polled,
        cross_origin=cross_origin,
        starlette=starlette,
        services=services,
        access=access,
    )


def create_app_from_env() -> UsageService:
    """Factory for the server's workers: each process reads the same environment."""
    app = create_app(load_settings())
    # What is alive now (modules, the app) lives as long as the worker: kept out of the garbage
    # collector's full collections, which would otherwise walk it again every time.
    gc.freeze()
    return app


def _open_redis(settings: Settings, lag: LoopLag | None = None) -> SharedRedis | None:
    if settings.redis_url is None:
        return None
    breaker = CircuitBreaker(REDIS_FAILURE_THRESHOLD, settings.redis_cooldown)
    guard = RedisGuard(create_client(settings), timeout=settings.redis_timeout, breaker=breaker, lag=lag)
    return SharedRedis(guard, prefix=settings.redis_prefix)


async def _close_redis(redis: SharedRedis) -> None:
    # Bounded: a Redis that does not answer must not hold the worker's shutdown.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(SHUTDOWN_GRACE):
            await redis.close()
