"""Prometheus metrics.

The request path counts in plain integers (an attribute increment costs nothing); a
publisher copies their growth into prometheus-client metrics once a second and before every
scrape. With several workers, prometheus-client's multiprocess mode adds them up: the CLI
points PROMETHEUS_MULTIPROC_DIR at a fresh directory before the workers start.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from .lookup import TokenLookup
from .refresh import Refresher
from .store import TokenStore

DB_STATEMENTS = Counter("usage_db_statements", "Statements sent to the gateway's database")
CACHE_HITS = Counter("usage_cache_hits", "Lookups answered by a cache layer", ["layer"])
DB_LOOKUPS = Counter("usage_db_lookups", "Lookups that had to read the database (cache misses)")
COALESCED = Counter("usage_coalesced_lookups", "Lookups that waited on another request's database read")
REDIS_ERRORS = Counter("usage_redis_errors", "Redis calls that failed or timed out")
REFRESH_RUNS = Counter("usage_refresh_runs", "Hot-set refreshes performed")
REFRESH_CHANGED = Counter("usage_refresh_changed", "Records the refresher found changed")
REFRESH_TOKENS = Gauge("usage_refresh_tokens", "Tokens re-read by the last refresh", multiprocess_mode="max")
REFRESH_SECONDS = Gauge("usage_refresh_duration_seconds", "Duration of the last refresh", multiprocess_mode="max")

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Publisher:
    """Copy the service's plain counters into the Prometheus metrics."""

    def __init__(self, store: TokenStore, lookup: TokenLookup, refresher: Refresher) -> None:
        stats, refresh = lookup.stats, refresher.stats
        redis = lookup.redis
        self._counters: list[tuple[Counter, Callable[[], int]]] = [
            (DB_STATEMENTS, lambda: store.statements),
            (CACHE_HITS.labels("local"), lambda: stats.local_hits),
            (CACHE_HITS.labels("negative"), lambda: stats.negative_hits),
            (CACHE_HITS.labels("redis"), lambda: stats.redis_hits),
            (DB_LOOKUPS, lambda: stats.db_reads),
            (COALESCED, lambda: stats.coalesced),
            (REDIS_ERRORS, lambda: redis.errors if redis is not None else 0),
            (REFRESH_RUNS, lambda: refresh.runs),
            (REFRESH_CHANGED, lambda: refresh.changed),
        ]
        self._published = [0] * len(self._counters)
        self._refresh = refresh

    def publish(self) -> None:
        for i, (counter, read) in enumerate(self._counters):
            value = read()
            if value > self._published[i]:
                counter.inc(value - self._published[i])
                self._published[i] = value
        REFRESH_TOKENS.set(self._refresh.tokens)
        REFRESH_SECONDS.set(self._refresh.last_duration)

    async def run(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            self.publish()


def render() -> bytes:
    """The metrics of every worker, in the Prometheus text format."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)
