"""Prometheus metrics.

The request path counts in plain integers (an attribute increment costs nothing); a
publisher copies their growth into prometheus-client metrics once a second and before every
scrape. With several workers, prometheus-client's multiprocess mode adds them up: the CLI
points PROMETHEUS_MULTIPROC_DIR at a fresh directory before the workers start, and any worker
can render everyone's metrics. No label ever carries a token or a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from ._metric_files import worker_files
from ._redis_guard import RedisGuard
from .access import BUCKETS, RequestStats
from .history import History
from .lookup import TokenLookup
from .looplag import LoopLag
from .refresh import Refresher
from .store import TokenStore
from .store.logs import LogReader

logger = logging.getLogger("usage_service.metrics")

REQUESTS = Counter("usage_http_requests", "HTTP requests answered, by route and status", ["route", "status"])
REQUEST_SECONDS = Histogram(
    "usage_http_request_duration_seconds", "Time from request to last byte, by route", ["route"], buckets=BUCKETS
)
DB_STATEMENTS = Counter("usage_db_statements", "Statements sent to the gateway's database")
LOG_DB_STATEMENTS = Counter("usage_log_db_statements", "Statements sent to read the gateway's request log")
LOG_DB_BUSY = Counter(
    "usage_log_db_busy", "Log statements not sent: the log's share of the token database's connections stayed busy"
)
DB_ERRORS = Counter("usage_db_errors", "Database statements that failed or timed out")
CACHE_HITS = Counter("usage_cache_hits", "Lookups answered by a cache layer", ["layer"])
CACHE_MISSES = Counter("usage_cache_misses", "Lookups a cache layer could not answer", ["layer"])
DB_LOOKUPS = Counter("usage_db_lookups", "Lookups that had to read the database (cache misses)")
COALESCED = Counter("usage_coalesced_lookups", "Lookups that waited on another request's database read")
STALE_SERVED = Counter("usage_stale_served", "Answers served from an expired record while the database was unavailable")
REDIS_ERRORS = Counter("usage_redis_errors", "Redis calls that failed or timed out")
REDIS_CIRCUIT_OPEN = Gauge(
    "usage_redis_circuit_open", "1 while a worker leaves Redis alone after failures", multiprocess_mode="livemax"
)
REDIS_OVERLOADED = Counter(
    "usage_redis_overloaded_timeouts",
    "Redis calls that timed out while the worker's event loop ran late: its own overload, not counted against Redis",
)
REDIS_CORRUPT = Counter(
    "usage_redis_corrupt_values",
    "Records read from Redis that were no record of ours (another writer under the prefix, a damaged value)",
)
LOOP_LAG = Gauge(
    "usage_event_loop_lag_seconds",
    "How late a worker's event loop ran at worst within the last second (a loaded worker)",
    multiprocess_mode="max",
)
LIMITER_REJECTIONS = Counter("usage_limiter_rejections", "Requests a rate limiter turned away")
REFRESH_RUNS = Counter("usage_refresh_runs", "Hot-set refreshes performed")
REFRESH_CHANGED = Counter("usage_refresh_changed", "Records the refresher found changed")
REFRESH_READ = Counter("usage_refresh_tokens_read", "Tokens re-read by refreshes")
REFRESH_TOKENS = Gauge("usage_refresh_tokens", "Tokens re-read by the last refresh", multiprocess_mode="max")
REFRESH_SECONDS = Gauge("usage_refresh_duration_seconds", "Duration of the last refresh", multiprocess_mode="max")
REFRESH_LAST = Gauge(
    "usage_refresh_last_run_timestamp_seconds", "Unix time the last refresh finished", multiprocess_mode="max"
)
HISTORY_DAYS = Counter(
    "usage_history_days", "Closed days of spending answered, by where from (local, redis, database)", ["layer"]
)
HISTORY_TAILS = Counter(
    "usage_history_tails", "Open days of spending answered, by where from (local, redis, database)", ["layer"]
)
HISTORY_COALESCED = Counter("usage_history_coalesced", "History requests that waited on another request's read")
HISTORY_ROUND_WAITS = Counter(
    "usage_history_round_waits",
    "History requests that waited for the leader's late round instead of reading the log (History.round_began)",
)
HISTORY_CLEANED = Counter(
    "usage_history_cleaned", "Cached days of spending dropped because the gateway's clean-up reached them"
)
HISTORY_STALE = Counter(
    "usage_history_stale_served", "History answers whose open days were stale while the database was unavailable"
)
HISTORY_ROUND_STATEMENTS = Counter(
    "usage_history_round_statements", "Statements the history rounds sent (tails.py), as leader or on their own"
)
REFRESH_LEADER = Gauge("usage_refresh_leader", "1 while a worker leads the refresher", multiprocess_mode="livemax")

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Publisher:
    """Copy the service's plain counters into the Prometheus metrics."""

    def __init__(
        self,
        store: TokenStore,
        lookup: TokenLookup,
        refresher: Refresher,
        requests: RequestStats | None = None,
        redis: RedisGuard | None = None,
        logs: LogReader | None = None,
        history: History | None = None,
        lag: LoopLag | None = None,
    ) -> None:
        stats, refresh = lookup.stats, refresher.stats
        self._counters: list[tuple[Counter, Callable[[], int]]] = [
            (DB_STATEMENTS, lambda: store.statements),
            (DB_ERRORS, lambda: store.errors),
            (CACHE_HITS.labels("local"), lambda: stats.local_hits),
            (CACHE_HITS.labels("negative"), lambda: stats.negative_hits),
            # Found in neither in-process layer: the trip down, or a wait on another request's.
            (CACHE_MISSES.labels("local"), lambda: stats.coalesced + stats.redis_hits + stats.db_reads),
            (DB_LOOKUPS, lambda: stats.db_reads),
            (COALESCED, lambda: stats.coalesced),
            (LIMITER_REJECTIONS, lambda: stats.limited),
            (STALE_SERVED, lambda: stats.stale_served),
            (REFRESH_RUNS, lambda: refresh.runs),
            (REFRESH_CHANGED, lambda: refresh.changed),
            (REFRESH_READ, lambda: refresh.tokens_read),
        ]
        if history is not None:
            spent = history.stats
            self._counters += [
                (HISTORY_DAYS.labels("local"), lambda: spent.days_local),
                (HISTORY_DAYS.labels("redis"), lambda: spent.days_redis),
                (HISTORY_DAYS.labels("database"), lambda: spent.days_read),
                (HISTORY_TAILS.labels("local"), lambda: spent.tails_local),
                (HISTORY_TAILS.labels("redis"), lambda: spent.tails_redis),
                (HISTORY_TAILS.labels("database"), lambda: spent.tails_read),
                (HISTORY_COALESCED, lambda: spent.coalesced),
                (HISTORY_ROUND_WAITS, lambda: spent.waited_round),
                (HISTORY_CLEANED, lambda: spent.cleaned),
                (HISTORY_STALE, lambda: spent.stale_served),
            ]
            if refresher.tails is not None:
                rounds = refresher.tails.stats
                self._counters.append((HISTORY_ROUND_STATEMENTS, lambda: rounds.statements))
        if redis is not None:
            self._counters += [
                (CACHE_HITS.labels("redis"), lambda: stats.redis_hits),
                (CACHE_MISSES.labels("redis"), lambda: stats.db_reads),
                (REDIS_ERRORS, lambda: redis.errors),
                (REDIS_OVERLOADED, lambda: redis.overloaded),
            ]
        if lookup.redis is not None:
            records = lookup.redis
            self._counters.append((REDIS_CORRUPT, lambda: records.corrupt))
        if logs is not None:
            self._counters += [(LOG_DB_STATEMENTS, lambda: logs.statements), (LOG_DB_BUSY, lambda: logs.busy)]
        self._published = [0] * len(self._counters)
        self._redis = redis
        self._lag = lag
        self._refresh = refresh
        self._requests = requests
        self._responses: dict[tuple[str, int], int] = {}
        self._durations: dict[str, tuple[list[int], float]] = {}
        # A scrape on the separate metrics address publishes from its own thread.
        self._lock = threading.Lock()

    def publish(self) -> None:
        with self._lock:
            for i, (counter, read) in enumerate(self._counters):
                value = read()
                if value > self._published[i]:
                    counter.inc(value - self._published[i])
                    self._published[i] = value
            REFRESH_TOKENS.set(self._refresh.tokens)
            REFRESH_SECONDS.set(self._refresh.last_duration)
            REFRESH_LAST.set(self._refresh.finished_at)
            REFRESH_LEADER.set(self._refresh.leader)
            REDIS_CIRCUIT_OPEN.set(self._redis is not None and self._redis.breaker.is_open)
            if self._lag is not None:
                LOOP_LAG.set(self._lag.recent())
            if self._requests is not None:
                self._publish_requests(self._requests)

    def _publish_requests(self, requests: RequestStats) -> None:
        for route, stats in requests.routes.items():
            # list(): the event loop may add a status meanwhile when this runs in the scrape thread.
            for status, count in list(stats.statuses.items()):
                done = self._responses.get((route, status), 0)
                if count > done:
                    REQUESTS.labels(route, str(status)).inc(count - done)
                    self._responses[route, status] = count
            counts, seconds = list(stats.buckets), stats.seconds
            done_counts, done_seconds = self._durations.get(route, ([0] * len(counts), 0.0))
            if counts == done_counts:
                continue
            # prometheus-client observes one value at a time; adding a bucket's growth in one step
            # goes through the histogram's per-bucket values (non-cumulative, +Inf last).
            child = REQUEST_SECONDS.labels(route)
            for i, bucket in enumerate(child._buckets):
                if counts[i] > done_counts[i]:
                    bucket.inc(counts[i] - done_counts[i])
            child._sum.inc(seconds - done_seconds)
            self._durations[route] = (counts, seconds)

    async def run(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            self.publish()


class _Scrape(Collector):
    """Everything there is to expose, published fresh first."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    def collect(self) -> Iterator[Metric]:
        self.publisher.publish()
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not directory:
            yield from REGISTRY.collect()
            return
        forget_dead_workers(directory)
        yield from every_worker(directory)


def every_worker(directory: str, attempts: int = 5) -> Iterable[Metric]:
    """The metrics of every worker, merged from their files in `directory`.

    prometheus-client's own collector fails the scrape (500) on a file that is gone by the time
    it reads it (another worker's scrape forgot a dead worker's gauges, forget_dead_workers) or
    that a new worker has created but not yet sized (empty). Neither holds anything to count:
    an empty file is left out, and the files are listed again if one went meanwhile.
    """
    while True:
        files = []
        for path in worker_files(directory):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_size >= _FILE_HEADER:
                    files.append(str(path))
        try:
            return MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-any-return, no-untyped-call]
        except FileNotFoundError:
            attempts -= 1
            if not attempts:
                raise


# A worker's metrics file begins with 8 bytes saying how much of it is used.
_FILE_HEADER = 8


def scrape_registry(publisher: Publisher) -> CollectorRegistry:
    """A registry whose every collection renders the metrics of every worker, fresh."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Scrape(publisher))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The metrics in the Prometheus text format."""
    return generate_latest(registry)


async def serve_separately(registry: CollectorRegistry, host: str, port: int, retry: float = 5.0) -> None:
    """Serve the metrics on their own address until cancelled.

    With several workers each tries to bind it; one succeeds, and the others keep trying, so a
    worker that takes over from one that died serves them again within `retry` seconds. Any
    other failure to bind (an address not yet assigned, a name not yet resolvable) is said
    once, and tried again as well: given up, the metrics would be gone until a restart.
    """
    server: WSGIServer | None = None
    said = None
    try:
        while server is None:
            try:
                server, _ = start_http_server(port, host, registry)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE and str(exc) != said:
                    said = str(exc)
                    logger.error("cannot serve metrics on %s:%d: %s; trying again every %g s", host, port, exc, retry)
                await asyncio.sleep(retry)
        logger.info("serving metrics on http://%s:%d/metrics", host, port)
        await asyncio.Event().wait()
    finally:
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()


def forget_dead_workers(directory: str) -> None:
    """Drop the gauges of workers that died without running their shutdown (killed, crashed):
    every scrape would read them for ever (a dead worker's open circuit or leadership, say).
    Their counters stay, so that totals never go back."""
    for path in worker_files(directory):
        kind, _, pid = path.stem.rpartition("_")
        if kind.startswith("gauge_") and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: alive
        return True
    return True


def worker_exited() -> None:
    """Drop this worker's gauges that only count while it lives (multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        with contextlib.suppress(OSError):
            mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
