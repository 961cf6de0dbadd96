"""The one guard every Redis call goes through: circuit breaker, timeout, cancellation, scripts.

Each concern kept in Redis (records, the hot set, the leader lock, the invalidation channel,
the limiter's counts) is a small class over the same `RedisGuard`, so they share one breaker
and one error count: a Redis that fails for one fails for all, and is left alone by all.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

from redis.asyncio import RedisCluster
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from ._circuit import CircuitBreaker
from .looplag import LoopLag
from .redis_client import RedisClient

logger = logging.getLogger("usage_service.cache")

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

# What a Redis call may raise when Redis is down, slow or (on Cluster) has no node for a slot.
REDIS_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)


# Failed calls `eval_each` makes once more: the server lacked the script, or (Cluster) the node
# went away or no longer serves the slot.
_MADE_AGAIN = (NoScriptError, *RedisCluster.ERRORS_ALLOW_RETRY)


# One call of a script: its keys and its other arguments.
ScriptCall = tuple[Sequence[str], Sequence[EncodableT]]


class RedisUnavailable(Exception):
    """Redis failed, timed out, or is being left alone by the circuit breaker."""


class RedisGuard:
    """A Redis client, and the bounds every call to it keeps.

    Redis is optional at run time: every call is bounded by a timeout, failures open a circuit
    breaker so a dead Redis is not waited on request after request, and every failure reaches
    the caller as RedisUnavailable, which the request path reads as a miss.

    A timeout while this worker's event loop ran late by half the timeout or more (`lag`, or
    the timeout itself firing that late) is the worker's own overload, not Redis's: the call
    still fails, but the breaker does not count it. Opening it then would send every lookup to
    the gateway's database when the worker is busiest, and keep it there.
    """

    def __init__(
        self, client: RedisClient, *, timeout: float, breaker: CircuitBreaker, lag: LoopLag | None = None
    ) -> None:
        self.client = client
        # On Cluster, a command's keys must all be in one hash slot: `by_slot` and `mget` split
        # by slot for whoever handles many records at once. Every other key is used alone.
        self.cluster = client if isinstance(client, RedisCluster) else None
        self.timeout = timeout
        # Background batches (a whole hot set) may take longer than one request's lookup.
        self.batch_timeout = max(1.0, 4 * timeout)
        self.breaker = breaker
        self.lag = lag
        self.errors = 0
        self.overloaded = 0  # timeouts not counted against Redis: this worker's loop ran late
        self._overload_logged = -math.inf
        self.closed = False

    async def run(self, call: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
        """Run one Redis call under the breaker and a timeout; raise RedisUnavailable on any failure."""
        if self.closed:
            raise RedisUnavailable("closed")  # a straggler must not open a connection after close()
        if not self.breaker.allow():
            raise RedisUnavailable("circuit open")
        timeout = timeout or self.timeout
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                result = await call()
        except REDIS_FAILURES as exc:
            reraise_cancellation()
            if isinstance(exc, TimeoutError | RedisTimeoutError) and self._ran_late(deadline, timeout):
                raise RedisUnavailable("timed out while this worker was overloaded") from None
            self._failed(exc)
            raise RedisUnavailable(type(exc).__name__) from None
        except Exception as exc:
            # The last resort, kept on purpose: an error redis-py does not document (a client bug
            # in some failover corner, a reply that does not parse) still must not fail a
            # request. Logged in full, counted like any Redis failure.
            reraise_cancellation()
            logger.warning("unexpected error from the redis client; treated as redis unavailable", exc_info=True)
            self._failed(exc)
            raise RedisUnavailable(type(exc).__name__) from None
        # redis-py can swallow a cancellation that lands while it connects, or turn it into an
        # error: honour it either way, or a background task would outlive shutdown.
        reraise_cancellation()
        self._succeeded()
        return result

    def script(self, source: str) -> AsyncScript:
        """Register a Lua script; calling it loads it first wherever a server lacks it (NOSCRIPT)."""
        return self.client.register_script(source)

    async def eval_each(self, script: AsyncScript, calls: Sequence[ScriptCall]) -> list[Any]:
        """Run `script` once per (keys, args), all in one pipeline (one per node on Cluster,
        which routes each call by its keys); return the replies in order.

        A server or node that never saw the script (new, restarted, promoted) answers NOSCRIPT:
        the script is loaded everywhere (on Cluster, SCRIPT LOAD goes to every primary) and only
        the calls refused are made again, so that a call that ran (counted a failure) is not run
        twice. Calls a Cluster node failed (it went away, the slot moved) are made again too,
        where the cluster client retries them as it would any: after re-reading the slot map.
        """
        replies: list[Any] = [None] * len(calls)
        results = await self._pipeline(script, calls).execute(raise_on_error=False)
        again, reload = [], False
        for i, result in enumerate(results):
            if isinstance(result, _MADE_AGAIN):
                again.append(i)
                reload = reload or isinstance(result, NoScriptError)
            elif isinstance(result, Exception):
                raise result
            else:
                replies[i] = result
        if again:
            if reload:
                await self.client.script_load(script.script)
            # Raising this time: whatever still fails is a Redis failure.
            results = await self._pipeline(script, [calls[i] for i in again]).execute()
            for i, result in zip(again, results, strict=True):
                replies[i] = result
        return replies

    def _pipeline(self, script: AsyncScript, calls: Sequence[ScriptCall]) -> Pipeline | ClusterPipeline:
        # Not a transaction: each call stands alone (and Cluster pipelines have none).
        pipe = self.client.pipeline(transaction=False)
        for keys, args in calls:
            # (A pipeline's evalsha() is refused on Cluster; the command itself routes by key.)
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        return pipe

    def by_slot(self, keys: Sequence[str], values: Sequence[V]) -> list[tuple[list[str], list[V]]]:
        """Group keys, each with its value, so that each group may go in one multi-key command:
        one group on a single server, one per hash slot on Cluster."""
        if self.cluster is None:
            return [(list(keys), list(values))]
        by_slot: dict[int, tuple[list[str], list[V]]] = {}
        for key, value in zip(keys, values, strict=True):
            slot_keys, slot_values = by_slot.setdefault(self.cluster.keyslot(key), ([], []))
            slot_keys.append(key)
            slot_values.append(value)
        return list(by_slot.values())

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of many keys, in order (one MGET per hash slot on Cluster, pipelined)."""
        # Replies are bytes: the clients are made without decode_responses (redis_client.py).
        if self.cluster is None:
            return cast(list[bytes | None], await self.client.mget(keys))
        return cast(list[bytes | None], await self.cluster.mget_nonatomic(keys))

    async def found(self, keys: Sequence[K], name: Callable[[K], str]) -> dict[K, bytes]:
        """The values Redis holds for these keys (`name` gives each one's Redis key), read as
        `mget` does under `run`; any failure reads as a miss."""

        async def read() -> dict[K, bytes]:
            values = await self.mget([name(key) for key in keys])
            # Inside run(): a reply that does not match the request is a Redis failure, not a 500.
            return {key: value for key, value in zip(keys, values, strict=True) if value is not None}

        try:
            return await self.run(read)
        except RedisUnavailable:
            return {}

    async def ping(self) -> bool:
        """Say whether Redis answers now (bypasses the breaker: this is what readiness reports)."""
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.ping()
        except REDIS_FAILURES:
            return False
        return True

    async def aclose(self) -> None:
        """Refuse every later call and close the client's connections."""
        self.closed = True
        await self.client.aclose()

    def _ran_late(self, deadline: float, timeout: float) -> bool:
        """Whether the event loop ran late by half `timeout` or more while the call waited
        (counted, and logged at most once a breaker cooldown)."""
        now = asyncio.get_running_loop().time()
        late = max(now - deadline, self.lag.recent() if self.lag is not None else 0.0)
        if late < timeout / 2:
            return False
        self.errors += 1
        self.overloaded += 1
        if now - self._overload_logged >= max(self.breaker.cooldown, 1.0):
            self._overload_logged = now
            logger.warning(
                "redis call timed out while this worker's event loop ran %.0f ms late: the worker is"
                " overloaded; not counted against redis",
                late * 1000,
            )
        return True

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        if self.breaker.failure():
            logger.warning(
                "redis unavailable (%s); answering from the database, next try in %.1fs",
                type(exc).__name__,
                self.breaker.cooldown,
            )

    def _succeeded(self) -> None:
        if self.breaker.success():
            logger.warning("redis is back; caching through it again")


def reraise_cancellation() -> None:
    """Honour a cancellation that a client library turned into an ordinary error."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def ms(seconds: float) -> int:
    """Seconds as the whole milliseconds Redis expiries take (at least 1)."""
    return max(1, int(seconds * 1000))
