"""Resolve a token key to its record: in-process layer → Redis → the gateway's database.

Also: a negative cache for unknown keys; single flight, so concurrent misses for one key in
one process cost one trip down; and stale-if-error, so a token whose record is still in a
cache layer is answered from it while the database cannot answer.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass

from ._flights import Flights
from ._lru import keep_newest
from .cache import UNCONFIRMED, LocalCache, RedisRecords, key_digest
from .config import Settings
from .records import TokenRecord, encode_cached
from .store import STATEMENT_GUARD, StoreUnavailable, TokenStore


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


class _Unnamed:
    """No round named the token since its last load."""


_UNNAMED = _Unnamed()


class TokenLookup:
    """The cache layers and the database, in that order, for one worker.

    The in-process layer's invariant: an entry read before this worker hears invalidation N of
    its key is never served fresh after N unless it is the very record round N read, and no
    confirmation extends an entry read before the invalidation channel was last lost or
    regained. Enforced by:
    - `invalidate` expiring the entry in place (it stays as a stale copy, so stale-if-error
      holds) unless its fingerprint is the one the round read, and detaching a load of that key
      still in flight: it answers those already waiting and lands expired, and later requests
      start a load of their own;
    - confirmations moving one watermark that covers only entries of the current generation
      (`LocalCache.confirm`), and a new generation whenever the channel is lost or regained;
    - a hard bound besides: no entry is served fresh more than `max_age` after the database
      read it came from, whatever the confirmations say.
    """

    def __init__(self, store: TokenStore, redis: RedisRecords | None, settings: Settings) -> None:
        self.store = store
        self.redis = redis
        self.cache_ttl = settings.cache_ttl
        # 0 turns the in-process layer off: entries are kept as stale copies only, never fresh.
        self.local_ttl = settings.local_ttl
        # The hard bound. Confirmations vouch for tokens in the refresher's hot set, which a token
        # leaves once nobody polled it for USAGE_HOT_WINDOW: past that, an entry is read again
        # (from Redis, which the leader keeps fresh) rather than taken on trust. (An entry's own
        # TTL never reaches past USAGE_CACHE_TTL after its read, should that be longer.)
        self.max_age = max(settings.hot_window, settings.cache_ttl)
        # Whether the refresher's invalidations can reach this worker now (the listener says).
        self.invalidations_live = False
        self.negative_ttl = settings.negative_ttl
        self.stale_if_error = settings.stale_if_error
        # How long a miss waits for the database: USAGE_DB_TIMEOUT on a lock, and the stores'
        # one-second guard on a statement that hangs, counted from the miss, queueing included.
        self.db_deadline = settings.db_timeout + STATEMENT_GUARD
        # Redis keeps records past their freshness so that they can stand in for the database.
        self.redis_ttl = settings.cache_ttl + settings.stale_if_error
        self.local: LocalCache[TokenRecord] = LocalCache(settings.local_cache_size)
        self.negative: LocalCache[_NotFound] = LocalCache(settings.negative_cache_size)
        self.stats = LookupStats()
        # The load each key's requests wait on; a load an invalidation overtook is no longer here.
        self._loads: Flights[bytes, tuple[TokenRecord | None, str]] = Flights(
            (StoreUnavailable,), "a read of a token's record"
        )
        # Loads overtaken by the news that their token is gone: what they read was the token
        # alive, which nothing may stand in for afterwards, not even as a stale copy.
        self._voided: weakref.WeakSet[asyncio.Task[tuple[TokenRecord | None, str]]] = weakref.WeakSet()
        # What the round that last named each token read (its fingerprint; None: no record),
        # until a load of it lands: a record in Redis other than that one is read past to the
        # database (see _load). The newest entries are kept, as many as the in-process layer.
        self._named: dict[bytes, bytes | None] = {}
        self._named_max = max(1, settings.local_cache_size)
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

    def deadline(self) -> float:
        """The latest a miss arriving now is answered (the event loop's clock): USAGE_DB_TIMEOUT
        and the stores' guard, however long it queues on the way."""
        return asyncio.get_running_loop().time() + self.db_deadline

    async def resolve(
        self, key: bytes, note: MutableMapping[str, object] | None = None, deadline: float | None = None
    ) -> TokenRecord | None:
        """Return the record for a key (ASCII, without 'sk-'), or None when no live token has it.

        Notes the layer that answered under LAYER in `note`, when given. Raises StoreUnavailable
        when the answer is in no cache and the database cannot give it, or not by `deadline`
        (from `deadline()`; the trip down goes on for whoever else waits on it).
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

        task = self._loads.get(digest)
        if task is None:
            # The load gives up at this request's deadline itself: the request waits for it to
            # land, so that its turn is not given back while the load still runs.
            task, waits_until = self._loads.start(digest, self._load(key, digest, deadline)), None
        else:
            waits_until = deadline
            self.stats.coalesced += 1
        try:
            record, layer = await self._wait(task, waits_until)
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

    async def _wait(
        self, task: asyncio.Task[tuple[TokenRecord | None, str]], deadline: float | None
    ) -> tuple[TokenRecord | None, str]:
        """Wait for a trip down until `deadline` at most. Shielded: a caller that gives up, or a
        client that goes away, does not cancel the trip others are waiting on."""
        try:
            async with asyncio.timeout_at(deadline):
                return await self._loads.wait(task)
        except TimeoutError:
            raise StoreUnavailable(f"no answer from the database within {self.db_deadline:g} s") from None

    def take_polled(self) -> dict[bytes, int]:
        """Return the tokens answered since the last call, as {digest: token id}."""
        polled, self._polled = self._polled, {}
        return polled

    # --- what the refresher's channel says (the invalidation listener calls these) ---------

    def invalidate(self, changes: Sequence[tuple[bytes, bytes | None]]) -> None:
        """Hear that the leader saw these tokens change, or saw them for the first time, each
        with the fingerprint of the record it read (None: none): what this worker holds of
        them is outdated, unless it is that very record."""
        now = time.monotonic()
        for digest, fingerprint in changes:
            self.negative.discard(digest)
            if fingerprint is None and (load := self._loads.get(digest)) is not None:
                self._voided.add(load)
            self._loads.detach(digest)  # what it reads may predate the change
            self._named.pop(digest, None)  # (a dict keeps a key where it was first put: moved to the newest)
            self._named[digest] = fingerprint
            self._named = keep_newest(self._named, self._named_max)
            held = self.local.peek(digest)
            if fingerprint is None:
                # The round read no record: the token is gone, or its key changed. Nothing held
                # of it may stand in for it, not even while the database cannot answer.
                self.local.discard(digest)
            elif held is None or held[0].fingerprint != fingerprint:
                self.local.expire(digest, now)  # kept, expired, for stale-if-error
            # (else it holds the leader's truth as of its round: the round's confirmation vouches for it)

    def confirm(self, as_of: float) -> None:
        """Hear that a round checked every hot token against the database as of `as_of` (wall
        clock) and published the changes: what this worker holds, unless invalidated since,
        stays good for another cache TTL from then."""
        # Never from later than now by this worker's clock: a leader's clock running ahead
        # would stretch every confirmation by as much.
        self.local.confirm(time.monotonic() + min(as_of, time.time()) + self.cache_ttl - time.time())

    def set_invalidations_live(self, live: bool) -> None:
        """Hear whether invalidations can reach this worker. Either way, what it holds was
        read while some may have been missed: no confirmation vouches for it any more."""
        if live != self.invalidations_live:
            self.invalidations_live = live
            self.local.new_generation(time.monotonic())

    def refreshed(self, digest: bytes, record: TokenRecord | None) -> None:
        """Take a record this worker's own refresh just read from the database (no channel:
        only its own TTL keeps it fresh)."""
        self._remember(digest, record, 0.0, UNCONFIRMED, overtaken=False)

    def stale(self, key: bytes, note: MutableMapping[str, object] | None = None) -> TokenRecord | None:
        """What a miss that cannot wait any longer is answered from: the record kept in-process
        for this key, if it stopped being fresh within USAGE_STALE_IF_ERROR, else None."""
        record = self._stale(key_digest(key))
        if record is not None:
            self.stats.stale_served += 1
            if note is not None:
                note[LAYER] = "stale"
        return record

    def _stale(self, digest: bytes) -> TokenRecord | None:
        """The record kept in-process for this key, if it stopped being fresh within USAGE_STALE_IF_ERROR."""
        held = self.local.peek(digest)
        if held is None or time.monotonic() - held[1] > self.stale_if_error:
            return None
        return held[0]

    async def _load(self, key: bytes, digest: bytes, deadline: float | None) -> tuple[TokenRecord | None, str]:
        generation = self.local.generation  # what the load lands under, unless the channel changes meanwhile
        stale: tuple[TokenRecord, float] | None = None
        named: bytes | None | _Unnamed = self._named.pop(digest, _UNNAMED)
        if self.redis is not None:
            cached = await self.redis.get(digest)
            if cached is not None:
                record, fetched_at = cached
                # Another instance's clock may run ahead: a record is never younger than now.
                age = max(0.0, time.time() - fetched_at)
                # A record other than the one the leader's round named this token with is not
                # taken: Redis keeps a record over another only by the time of their reads, each
                # by its instance's clock, so one read before the round's (the change) by an
                # instance whose clock runs ahead may still be there.
                expected = isinstance(named, _Unnamed) or named == (record.fingerprint if record is not None else None)
                if expected and age < (self.cache_ttl if record is not None else self.negative_ttl):
                    self.stats.redis_hits += 1
                    self._remember(digest, record, age, generation, overtaken=self._overtaken(digest))
                    return record, "redis"
                if record is not None:
                    if named is not None:  # (None: the round said the token is gone)
                        stale = record, age
                else:
                    # The token was gone when this was read: what this worker kept of it (read
                    # before, if the news of it never came) is not to stand in for it.
                    self.local.discard(digest)

        self.stats.db_reads += 1
        fetched_at = time.time()  # before the read: the record is at least this fresh
        try:
            record = await self._fetch(key, deadline)
        except StoreUnavailable:
            if stale is not None and asyncio.current_task() not in self._voided:
                self._keep_stale(digest, *stale)
            if not isinstance(named, _Unnamed):
                self._named.setdefault(digest, named)  # for the next load to check in turn
            raise
        self._remember(digest, record, time.time() - fetched_at, generation, overtaken=self._overtaken(digest))
        if self.redis is not None:
            if record is not None:
                self.redis.write(digest, encode_cached(record, fetched_at), self.redis_ttl)
            elif self.negative_ttl > 0:
                self.redis.write(digest, encode_cached(None, fetched_at), self.negative_ttl)
        return record, "database"

    async def _fetch(self, key: bytes, deadline: float | None) -> TokenRecord | None:
        """The store's read, given up after `db_deadline`, or at the deadline of the request that
        started it: a statement has that long at most, but a miss that waits for a connection
        behind other misses' statements would have it after that wait. So a load never outlives
        the request (and the limiter's turn) it runs for: an address has no more loads running
        than turns."""
        try:
            async with asyncio.timeout_at(deadline) if deadline is not None else asyncio.timeout(self.db_deadline):
                return await self.store.fetch(key.decode("ascii"))
        except TimeoutError:
            raise StoreUnavailable(f"no answer from the database within {self.db_deadline:g} s") from None

    def _keep_stale(self, digest: bytes, record: TokenRecord, age: float) -> None:
        """Keep an expired record from Redis in-process, already expired, for _stale to find."""
        expired_at = time.monotonic() - age + self.cache_ttl
        held = self.local.peek(digest)
        if held is None or held[1] < expired_at:
            self.local.put(digest, record, expired_at)

    def _overtaken(self, digest: bytes) -> bool:
        """Whether an invalidation detached the running load of this key (see invalidate)."""
        return not self._loads.flying(digest)

    def _remember(
        self, digest: bytes, record: TokenRecord | None, age: float, generation: int, *, overtaken: bool
    ) -> None:
        """Keep what was read from the database `age` seconds ago: fresh for the local TTL (never
        beyond its cache TTL), longer while confirmations cover it if it was loaded under the
        current generation, and never more than `max_age` after that read. What an invalidation
        overtook is at most a stale copy (none when the news was that the token is gone), and
        never replaces what a later load may have put."""
        now = time.monotonic()
        read_at = now - age
        if overtaken:
            voided = asyncio.current_task() in self._voided
            if record is not None and not voided and self.local.peek(digest) is None:
                self.local.put(digest, record, now)
            return
        if record is None:
            if age < self.negative_ttl:
                self.negative.put(digest, _NOT_FOUND, read_at + self.negative_ttl)
            self.local.discard(digest)
            return
        self.negative.discard(digest)
        if self.local_ttl <= 0:
            self.local.put(digest, record, now)  # the layer is off: a stale copy only
            return
        self.local.put(
            digest,
            record,
            now + min(self.local_ttl, self.cache_ttl - age),
            hard_deadline=read_at + self.max_age,
            generation=generation if generation == self.local.generation else UNCONFIRMED,
        )
