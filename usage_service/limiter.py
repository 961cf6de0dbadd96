"""The failed-authentication limiter: an address that keeps failing gets 429 instead of 401.

Failures are counted; a token answered in-process is never throttled and polling costs no
extra round trip. Once this worker knows an address is over the limit, any other credential
from it is answered 429 before its key is resolved: a blocked address costs no cache or
database lookup, and is not counted again. Before that, an address has at most `limit` keys
resolved at once in a worker, the others waiting their turn: a burst of guesses sent all at
once costs about twice the limit in lookups, not one per guess, before the rest are 429.

Each address (an IPv6 client by its /64, which one machine usually holds whole) has a fixed
window that starts with its first failure. Counts live in Redis, one key per address with an
expiry, so every worker and instance shares them; each Redis operation touches that one key,
which keeps it Cluster-safe. Without Redis, or while it is down, each worker counts alone.
Once an address is over the limit the worker remembers it until its window ends and answers
its further requests without asking Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from starlette.types import Scope

from ._batch import Batcher
from ._redis_guard import RedisUnavailable
from .addresses import ClientAddresses
from .cache import LocalCache
from .config import Settings
from .failure_counter import FailureCounter

# Addresses each worker tracks in-process (counts while Redis is away, and known-blocked ones);
# the oldest are forgotten first, so a flood of distinct addresses cannot grow memory.
MAX_TRACKED_ADDRESSES = 100_000


class AuthFailureLimiter:
    def __init__(
        self,
        limit: int,
        window: float,
        shared: FailureCounter | None,
        addresses: ClientAddresses,
        max_tracked: int = MAX_TRACKED_ADDRESSES,
    ) -> None:
        self.limit = limit
        self.window = window
        self.shared = shared  # None: each worker counts alone
        self.addresses = addresses
        self._counts: LocalCache[list[float]] = LocalCache(max_tracked)  # bucket -> [count, window end]
        self._blocked: LocalCache[float] = LocalCache(max_tracked)  # bucket -> window end (monotonic)
        # Failures that arrive together go to Redis as one pipeline. Each call is its own batch
        # entry (bucket, sequence number), so concurrent failures from one address all count.
        self._batches: Batcher[tuple[str, int], tuple[int, float]] = Batcher(
            self._count_shared,
            max_batch=256,
            slots=2,
            expected=(RedisUnavailable,),
            what="a count of failures in Redis",
        )
        self._sequence = itertools.count()
        # The turns of the addresses that have keys being resolved now (bounded by the requests in flight).
        self._turns: dict[bytes, _Turns] = {}

    @classmethod
    def from_settings(cls, settings: Settings, shared: FailureCounter | None) -> AuthFailureLimiter | None:
        """The configured limiter, or None when USAGE_AUTH_FAIL_LIMIT is 0."""
        if settings.auth_fail_limit <= 0:
            return None
        addresses = ClientAddresses(settings.trusted_proxies)
        return cls(settings.auth_fail_limit, settings.auth_fail_window, shared, addresses)

    @contextlib.asynccontextmanager
    async def turn(self, scope: Scope, deadline: float | None = None) -> AsyncIterator[int | None]:
        """Hold one of the client's address's turns to resolve a key (waiting for one while
        `limit` are taken); give the Retry-After seconds of a 429 instead when this worker knows
        the address is over the limit, and then no key is to be resolved. Costs no Redis call.

        A failure is counted (`failed`) before the turn is given up, so that the turns waiting
        learn of the block. Raises NoTurn when none is free by `deadline` (the event loop's
        clock): a wait for a turn counts against the request's own wait for the database.
        """
        name = address_bucket(self.addresses(scope)).encode()
        retry_after = self._retry_after(name)
        if retry_after is not None:
            yield retry_after
            return
        turns = self._turns.get(name)
        if turns is None:
            turns = self._turns[name] = _Turns(asyncio.Semaphore(self.limit))
        turns.holders += 1
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    await turns.free.acquire()
            except TimeoutError:
                raise NoTurn from None
            try:
                yield self._retry_after(name)
            finally:
                turns.free.release()
        finally:
            turns.holders -= 1
            if not turns.holders:
                del self._turns[name]

    def _retry_after(self, name: bytes) -> int | None:
        if not self._blocked:
            return None
        now = time.monotonic()
        blocked_until = self._blocked.get(name, now)
        return None if blocked_until is None else max(1, math.ceil(blocked_until - now))

    async def failed(self, scope: Scope) -> int | None:
        """Count a failed authentication; once over the limit, return the Retry-After seconds of a 429."""
        bucket = address_bucket(self.addresses(scope))
        name = bucket.encode()
        now = time.monotonic()
        # Blocked meanwhile (a concurrent failure went over the limit): not counted again.
        blocked_until = self._blocked.get(name, now)
        if blocked_until is None:
            count, remaining = await self._count(bucket, name, now)
            if count <= self.limit:
                return None
            blocked_until = now + remaining
            self._blocked.put(name, blocked_until, blocked_until)
        return max(1, math.ceil(blocked_until - now))

    async def _count(self, bucket: str, name: bytes, now: float) -> tuple[int, float]:
        if self.shared is not None:
            shared = await self._batches.load((bucket, next(self._sequence)))
            if shared is not None:
                return shared
        entry = self._counts.get(name, now)
        if entry is None:
            entry = [0, now + self.window]
            self._counts.put(name, entry, entry[1])
        entry[0] += 1
        return int(entry[0]), entry[1] - now

    async def _count_shared(self, calls: Sequence[tuple[str, int]]) -> dict[tuple[str, int], tuple[int, float]]:
        assert self.shared is not None
        failures: dict[str, int] = {}
        for bucket, _ in calls:
            failures[bucket] = failures.get(bucket, 0) + 1
        try:
            counts = await self.shared.add(failures, self.window)
        except RedisUnavailable:
            return {}  # each caller counts in-process instead
        # Hand each caller its own place in the count, as if they had come one by one.
        results = {}
        for call in reversed(calls):
            bucket = call[0]
            total, remaining = counts[bucket]
            results[call] = (total - failures[bucket] + 1, remaining)
            failures[bucket] -= 1
        return results


class NoTurn(Exception):
    """No turn to resolve a key came free before the request's deadline."""


@dataclass(slots=True)
class _Turns:
    free: asyncio.Semaphore
    holders: int = 0  # requests holding or waiting for one


def address_bucket(address: str) -> str:
    """The unit counted: an IPv4 address, an IPv6 /64, or whatever the server called the peer."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip)
