"""The redis-py client for the configured Redis topology: standalone, Sentinel or Cluster.

Every topology gets the same bounds: connections per worker (per node on Cluster), a socket
timeout of USAGE_REDIS_TIMEOUT and one immediate retry, so a connection that died with a
restart or a failover is replaced at once while the caller's timeout still bounds the call.
`RedisGuard` wraps the result.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from .config import Settings

RedisClient: TypeAlias = "Redis | RedisCluster"

# Connections per worker (per node on Cluster); a burst of misses waits for one rather than
# opening hundreds.
REDIS_MAX_CONNECTIONS = 32


def create_client(settings: Settings) -> RedisClient:
    """Build a client for `settings.redis_url` in `settings.redis_mode`; it connects lazily."""
    if settings.redis_url is None:
        raise ValueError("Redis is not configured (REDIS_CONN_STRING is unset)")
    timeouts: dict[str, Any] = {
        "socket_timeout": settings.redis_timeout,
        "socket_connect_timeout": settings.redis_timeout,
    }
    if settings.redis_mode == "sentinel":
        return _sentinel_master(settings, settings.redis_url, timeouts)
    if settings.redis_mode == "cluster":
        return RedisCluster.from_url(
            settings.redis_url,
            startup_nodes=[ClusterNode(host, port) for host, port in settings.redis_cluster_nodes] or None,
            max_connections=REDIS_MAX_CONNECTIONS,
            # Cluster's own retries follow MOVED/ASK redirects and re-read the slot map after a
            # node failure; one is enough, the caller's timeout bounds the rest.
            retry=Retry(NoBackoff(), 1),
            **timeouts,
        )
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=REDIS_MAX_CONNECTIONS,
        timeout=settings.redis_timeout,  # waiting for a free connection
        retry=Retry(NoBackoff(), 1),
        **timeouts,
    )
    return Redis.from_pool(pool)


def _sentinel_master(settings: Settings, url: str, timeouts: dict[str, Any]) -> Redis:
    # REDIS_CONN_STRING supplies what a connection to the master needs (credentials, database,
    # TLS); where the master is comes from the sentinels, asked again on every new connection.
    options = {k: v for k, v in parse_url(url).items() if k not in ("host", "port", "connection_class")}
    if parse_url(url).get("connection_class") is SSLConnection:
        options["ssl"] = True  # Sentinel's pool picks its own TLS connection class from this
    # (redis-py types this from 8.2; untyped before)
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        settings.redis_sentinels,
        sentinel_kwargs={"password": settings.redis_sentinel_password, **timeouts},
        retry=Retry(NoBackoff(), 1),
        **timeouts,
    )
    master: Redis = sentinel.master_for(
        settings.redis_master_name,
        redis_class=_SentinelMaster,
        connection_pool_class=_BlockingSentinelPool,
        max_connections=REDIS_MAX_CONNECTIONS,
        timeout=settings.redis_timeout,  # waiting for a free connection
        **options,
    )
    return master


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (finds the master, drops connections to a demoted one) that waits for a
    free connection like the standalone pool, instead of failing when `max_connections` are busy."""


class _SentinelMaster(Redis):
    """The master's client; closing it also closes its connections to the sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            await self.connection_pool.sentinel_manager.aclose()  # type: ignore[attr-defined]
