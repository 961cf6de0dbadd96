"""The two cache layers in front of the store: in-process, then Redis.

Both are keyed by a SHA-256 digest of the token key, never by the key itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from typing import Generic, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ._circuit import CircuitBreaker
from .records import CorruptCacheValue, TokenRecord, decode_cached

logger = logging.getLogger("usage_service.cache")

V = TypeVar("V")


def key_digest(key: bytes) -> bytes:
    """Return the digest that stands for a token key in every cache."""
    return hashlib.sha256(key).digest()


class LocalCache(Generic[V]):
    """A bounded in-process map whose entries expire; the oldest entry goes first when full."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._entries: OrderedDict[bytes, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes, now: float) -> V | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._entries[digest]
            return None
        return entry[1]

    def put(self, digest: bytes, value: V, expires_at: float) -> None:
        entries = self._entries
        entries[digest] = (expires_at, value)
        entries.move_to_end(digest)
        while len(entries) > self.max_size:
            entries.popitem(last=False)

    def discard(self, digest: bytes) -> None:
        self._entries.pop(digest, None)

    def clear(self) -> None:
        self._entries.clear()


class RedisCache:
    """Token records in Redis, shared by every worker and instance.

    Redis is optional at run time: every call is bounded by `timeout`, failures open a circuit
    breaker so a dead Redis is not waited on request after request, and every failure reads as
    a miss so the caller falls back to the database.
    """

    def __init__(self, client: Redis, *, prefix: str, timeout: float, breaker: CircuitBreaker) -> None:
        self.client = client
        self.timeout = timeout
        self.breaker = breaker
        self._prefix = prefix + "tok:"
        self.errors = 0
        self.corrupt = 0

    def _key(self, digest: bytes) -> str:
        return self._prefix + digest.hex()

    async def get(self, digest: bytes) -> tuple[TokenRecord | None, float] | None:
        """Return (record or None for a known-unknown key, fetched_at), or None on a miss."""
        if not self.breaker.allow():
            return None
        try:
            async with asyncio.timeout(self.timeout):
                raw = await self.client.get(self._key(digest))
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return None
        self._succeeded()
        if raw is None:
            return None
        try:
            return decode_cached(raw)
        except CorruptCacheValue:
            # Foreign or damaged: a miss; the fresh record read from the database overwrites it.
            self.corrupt += 1
            return None

    async def set(self, digest: bytes, value: bytes, ttl: float) -> None:
        if not self.breaker.allow():
            return
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.set(self._key(digest), value, px=max(1, int(ttl * 1000)))
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
        else:
            self._succeeded()

    async def ping(self) -> bool:
        """Say whether Redis answers now (bypasses the breaker: this is what readiness reports)."""
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.ping()
        except (RedisError, OSError, TimeoutError):
            return False
        return True

    async def close(self) -> None:
        await self.client.aclose()

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
