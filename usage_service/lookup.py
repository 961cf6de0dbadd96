"""Resolve a token key to its record: in-process layer → Redis → the gateway's database.

Also: a negative cache for unknown keys; single flight, so concurrent misses for one key in
one process cost one trip down; and stale-if-error, so a token whose record is still in a
cache layer is answered from it while the database cannot answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import MutableMapping
from dataclasses import dataclass

from .cache import LocalCache, RedisCache, key_digest
from .config import Settings
from .records import TokenRecord, encode_cached
from .store import StoreUnavailable, TokenStore


@dataclass
class LookupStats:
    """Where answers came from since start (read by tests, benchmarks and later metrics)."""

    local_hits: int = 0
    negative_hits: int = 0
    redis_hits: int = 0
    db_reads: int = 0
    coalesced: int = 0  # requests that waited on another request's trip down
    # Requests a rate limiter turned away; a limiter counts them here and /metrics publishes
    # them as usage_limiter_rejections_total.
    limited: int = 0
    stale_served: int = 0  # answered from an expired record because the database could not answer


# Where resolve() notes the layer that answered, in the mapping it is given (the ASGI scope):
# "local", "negative", "redis", "database" or "stale". The access log reports it.
LAYER = "usage.layer"


class _NotFound:
    """The negative cache's value: this key is known not to exist."""


_NOT_FOUND = _NotFound()


class TokenLookup:
    def __init__(self, store: TokenStore, redis: RedisCache | None, settings: Settings) -> None:
        self.store = store
        self.redis = redis
        self.cache_ttl = settings.cache_ttl
        self.local_ttl = settings.local_ttl
        # While the refresher's invalidations reach this worker, a change is pushed here within
        # an interval, so records may stay in-process for as long as Redis keeps them.
        self.invalidations_live = False
        self.negative_ttl = settings.negative_ttl
        self.stale_if_error = settings.stale_if_error
        # Redis keeps records past their freshness so that they can stand in for the database.
        self.redis_ttl = settings.cache_ttl + settings.stale_if_error
        self.local: LocalCache[TokenRecord] = LocalCache(settings.local_cache_size)
        self.negative: LocalCache[_NotFound] = LocalCache(settings.negative_cache_size)
        self.stats = LookupStats()
        self._inflight: dict[bytes, asyncio.Task[tuple[TokenRecord | None, str]]] = {}
        # Tokens answered since the refresher last asked: digest -> token id (never the key).
        # Without a refresher nobody asks, so nothing is noted.
        self._polled: dict[bytes, int] = {}
        self._note_polls = settings.refresh_interval > 0

    def cached(self, key: bytes, note: MutableMapping[str, object] | None = None) -> TokenRecord | None:
        """Return the record when the in-process layer has it, else None: resolve() without a
        coroutine, for the polling path, where nearly every request is answered here."""
        digest = key_digest(key)
        record = self.local.get(digest, time.monotonic())
        if record is not None:
            self.stats.local_hits += 1
            if note is not None:
                note[LAYER] = "local"
            if self._note_polls:
                self._polled[digest] = record.id
        return record

    async def resolve(self, key: bytes, note: MutableMapping[str, object] | None = None) -> TokenRecord | None:
        """Return the record for a key (ASCII, without 'sk-'), or None when no live token has it.

        Notes the layer that answered under LAYER in `note`, when given. Raises StoreUnavailable
        when the answer is in no cache and the database cannot give it.
        """
        record = self.cached(key, note)
        if record is not None:
            return record
        digest = key_digest(key)
        if self.negative.get(digest, time.monotonic()) is not None:
            self.stats.negative_hits += 1
            if note is not None:
                note[LAYER] = "negative"
            return None

        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.create_task(self._load(key, digest))
            self._inflight[digest] = task
            task.add_done_callback(lambda t: self._finished(digest, t))
        else:
            self.stats.coalesced += 1
        try:
            # Shielded: a client that goes away must not cancel the trip others are waiting on.
            record, layer = await asyncio.shield(task)
        except StoreUnavailable:
            record, layer = self._stale(digest), "stale"
            if record is None:
                raise
            self.stats.stale_served += 1
        if note is not None:
            note[LAYER] = layer
        if record is not None and self._note_polls:
            self._polled[digest] = record.id
        return record

    def take_polled(self) -> dict[bytes, int]:
        """Return the tokens answered since the last call, as {digest: token id}."""
        polled, self._polled = self._polled, {}
        return polled

    def forget(self, digest: bytes) -> None:
        """Drop a key's in-process entries, so the next request reads a lower layer."""
        self.local.discard(digest)
        self.negative.discard(digest)

    def confirm(self, as_of: float) -> None:
        """Every hot record was checked against the database as of `as_of` (wall clock), and the
        changed ones were dropped from here: what is left stays good for another cache TTL."""
        if not self.invalidations_live:
            return
        remaining = as_of + self.cache_ttl - time.time()
        if remaining > 0:
            now = time.monotonic()
            self.local.extend(now + remaining, now)

    def refreshed(self, digest: bytes, record: TokenRecord | None) -> None:
        """Take a record the refresher just read from the database into the in-process layer."""
        self._remember(digest, record, self.cache_ttl if record is not None else self.negative_ttl)

    def _finished(self, digest: bytes, task: asyncio.Task[tuple[TokenRecord | None, str]]) -> None:
        if self._inflight.get(digest) is task:
            del self._inflight[digest]
        if not task.cancelled():
            task.exception()  # retrieved here so an error nobody awaited is not reported as lost

    def _stale(self, digest: bytes) -> TokenRecord | None:
        """The expired record kept in-process for this key, if it expired within USAGE_STALE_IF_ERROR."""
        entry = self.local.peek(digest)
        if entry is None or time.monotonic() - entry[0] > self.stale_if_error:
            return None
        return entry[1]

    async def _load(self, key: bytes, digest: bytes) -> tuple[TokenRecord | None, str]:
        stale: tuple[TokenRecord, float] | None = None
        if self.redis is not None:
            cached = await self.redis.get(digest)
            if cached is not None:
                record, fetched_at = cached
                ttl = self.cache_ttl if record is not None else self.negative_ttl
                remaining = fetched_at + ttl - time.time()
                # Another instance's clock may run ahead; an entry already past its TTL is a miss.
                if remaining > 0:
                    self.stats.redis_hits += 1
                    self._remember(digest, record, remaining)
                    return record, "redis"
                if record is not None:
                    stale = record, remaining

        self.stats.db_reads += 1
        fetched_at = time.time()  # before the read: the record is at least this fresh
        try:
            record = await self.store.fetch(key.decode("ascii"))
        except StoreUnavailable:
            if stale is not None:
                self._keep_stale(digest, *stale)
            raise
        ttl = self.cache_ttl if record is not None else self.negative_ttl
        self._remember(digest, record, fetched_at + ttl - time.time())
        if self.redis is not None:
            if record is not None:
                self.redis.write(digest, encode_cached(record, fetched_at), self.redis_ttl)
            elif self.negative_ttl > 0:
                self.redis.write(digest, encode_cached(None, fetched_at), self.negative_ttl)
        return record, "database"

    def _keep_stale(self, digest: bytes, record: TokenRecord, remaining: float) -> None:
        """Keep an expired record from Redis in-process, already expired, for _stale to find."""
        expired_at = time.monotonic() + remaining
        held = self.local.peek(digest)
        if held is None or held[0] < expired_at:
            self.local.put(digest, record, expired_at)

    def _remember(self, digest: bytes, record: TokenRecord | None, remaining: float) -> None:
        """Keep a record in-process for the local TTL, never beyond what is left of its cache TTL."""
        now = time.monotonic()
        if record is not None:
            ttl = min(self.cache_ttl if self.invalidations_live else self.local_ttl, remaining)
            if ttl > 0:
                self.local.put(digest, record, now + ttl)
            self.negative.discard(digest)
        elif remaining > 0:
            self.negative.put(digest, _NOT_FOUND, now + remaining)
            self.local.discard(digest)
