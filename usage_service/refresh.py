"""The hot-set refresher: fresh numbers for polled tokens at a database cost that does not grow.

Every worker notes which tokens it answered (by id and digest, never by key). Every
USAGE_REFRESH_INTERVAL one leader, elected through a Redis lock, re-reads exactly the tokens
polled within USAGE_HOT_WINDOW in batched `WHERE id IN (...)` statements, writes them through to
Redis, tells every worker (pub/sub) which ones changed, and then that all were checked: workers
expire the changed ones in their in-process layer and may keep the rest (see TokenLookup).
Without Redis, or while Redis is down, each worker refreshes its own hot set instead.

The same rounds, under the same lock and side by side with the records, keep the open days of
the tokens whose spending history is polled (tails.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ._redis_guard import RedisUnavailable
from .config import Settings
from .hotset import HOT_SLICE, Polled, parse_hot
from .leadership import LeaderLock, Leadership
from .records import TokenRecord, encode_cached
from .shared import SharedRedis
from .store import STATEMENT_GUARD, StoreUnavailable, TokenStore, UnreadableRow
from .tails import TailKeeper

logger = logging.getLogger("usage_service.refresh")

T = TypeVar("T")
U = TypeVar("U")

# Tokens re-read, written and compared at a time: one statement each, and short enough not to
# hold up requests waiting on the same event loop.
REFRESH_CHUNK = HOT_SLICE
# A round's statements in flight at once, at most (see Refresher._read_ahead).
READ_AHEAD = 4


@dataclass
class RefreshStats:
    runs: int = 0  # refreshes this worker performed (as leader, or on its own)
    tokens: int = 0  # tokens re-read by the last refresh
    changed: int = 0  # records that changed, since start
    last_duration: float = 0.0
    finished_at: float = 0.0  # wall clock at the end of the last refresh
    tokens_read: int = 0  # tokens re-read, since start
    leader: bool = False


class PolledTokens(Protocol):
    """What the refresher needs of the lookup (TokenLookup), and nothing more."""

    @property
    def redis_ttl(self) -> float:
        """How long a record written to Redis is kept there."""

    def take_polled(self) -> dict[bytes, int]:
        """The tokens answered since the last call, as {digest: token id}."""

    def refreshed(self, digest: bytes, record: TokenRecord | None) -> None:
        """Take a record this worker's own round read (rounds without Redis only)."""


class Refresher:
    def __init__(
        self,
        lookup: PolledTokens,
        store: TokenStore,
        redis: SharedRedis | None,
        settings: Settings,
        *,
        tails: TailKeeper | None = None,
    ) -> None:
        self.lookup = lookup
        # Polled tokens' spending history, kept by the same rounds under the same lock (tails.py).
        self.tails = tails
        self.store = store
        self.redis = redis
        # This refresher's own handle on the leader lock (its token tells it from other workers').
        self.lock = redis.leader_lock() if redis is not None else None
        self.interval = settings.refresh_interval
        self.window = settings.hot_window
        self.hot_max = settings.hot_max
        self.cache_ttl = settings.cache_ttl
        # Between rounds the lock outlives a couple of missed renewals, so leadership does not
        # flap, and a leader that dies is replaced within seconds.
        self.lock_ttl = max(3 * self.interval, 1.0)
        # A round checks the lock before each statement, again before its writes and
        # publications, and again before it renews unchanged records (see _shared_round). During
        # a round the lock is extended to twice the longest any of these may take, so that a
        # check that passed still holds when its work is done.
        writes = 3 * redis.guard.batch_timeout if redis is not None else 0.0
        self.statement_time = settings.db_timeout + STATEMENT_GUARD
        self.round_lock_ttl = max(self.lock_ttl, 2 * max(self.statement_time, writes))
        self.stats = RefreshStats()
        self.polled: Polled[bytes, int] = Polled(self.window, self.hot_max)  # this worker's own: digest -> id
        self._last_seen: dict[bytes, TokenRecord | None] = {}  # the leader's view after its last refresh
        self._written: dict[bytes, float] = {}  # when the leader last wrote each hot record to Redis
        self._members: dict[bytes, tuple[bytes, int]] = {}  # what each hot-set member read as
        self._requested: set[bytes] = set()  # taken from Redis, not yet published (see _refresh_records)
        self._reading = 0  # the round's reads under way (see _read_ahead)

    async def run(self) -> None:
        """Refresh every interval until cancelled; on the way out, hand leadership over."""
        try:
            while True:
                started = time.monotonic()
                try:
                    await self.tick()
                except StoreUnavailable as exc:
                    logger.debug("refresh skipped: %s", exc)
                except Exception:
                    # Kept broad on purpose: Redis and database failures are handled above and in
                    # tick(), so this is a defect, logged in full. The next round still runs on
                    # time: left to the task's supervisor, every hot token would wait out its
                    # backoff (up to 30 s) for fresh numbers.
                    logger.exception("refresh failed")
                await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))
        finally:
            if self.stats.leader and self.lock is not None:
                with contextlib.suppress(RedisUnavailable):
                    await self.lock.release()

    async def tick(self) -> None:
        """Do one round: share what was polled, then refresh as leader or on our own."""
        if self.tails is None:
            await self._tick()
            return
        # The last round's leader is about to vouch for the polled history again: polls that
        # find the last word lapsed meanwhile wait for it (History.round_began).
        self.tails.round_began(leading=self.stats.leader)
        try:
            await self._tick()
        finally:
            self.tails.round_ended()

    async def _tick(self) -> None:
        now = time.time()
        unnoted = self.polled.take(self.lookup.take_polled(), now)  # not noted in the shared set lately
        history_unnoted = self.tails.take_polled() if self.tails is not None else []

        if self.redis is not None and self.lock is not None:
            try:
                if history_unnoted and self.tails is not None:
                    await self.tails.note(self.redis, history_unnoted)
                await self._shared_round(self.redis, self.lock, unnoted, now)
                return
            except RedisUnavailable:
                self._step_down()
                self.note_again()
        await self._own_round()

    def note_again(self) -> None:
        """Redis failed, or this worker lost its connection to it: it may come back empty (a
        restart without persistence), without the hot sets. Note every polled token again in
        the next round, or rounds would confirm the tokens of this worker without reading them
        until it noted them again of its own accord (up to a quarter of USAGE_HOT_WINDOW)."""
        self.polled.forget_noted()
        if self.tails is not None:
            self.tails.forget_noted()

    async def _shared_round(self, redis: SharedRedis, lock: LeaderLock, unnoted: dict[bytes, int], now: float) -> None:
        """Refresh the shared hot set, and the polled history beside it, if this instance leads.

        Leadership follows redis-py's Lock: the lock is checked before each statement (by its
        lease, `LeaderLock.hold`: extended to `round_lock_ttl` only when less than a statement's
        time of it is left) and extended again before what the round found is written and
        published, and a leader that finds it lost abandons the round there, writing and
        publishing nothing more, and forgets what it saw. A check that passed still holds when
        its work is done; and the writes are only-if-newer besides, so even a leader deposed in
        between (an event loop stalled for seconds) never replaces a newer record.

        The round reads every chunk before it writes and publishes anything: on a saturated
        worker each await waits out a whole pass of the event loop over every connection, and
        a write and a publication per chunk made a round of 10,000 tokens take seconds.

        The records and the history's open days are refreshed side by side, each part checking
        the lock for itself: a charge reaches the history without waiting out the records' round.
        """
        if unnoted:
            await redis.hot_set.note(unnoted, now)
            self.polled.noted(unnoted, now)
        leadership = await lock.lead(self.lock_ttl)
        if leadership is not Leadership.KEPT:
            # Not leading, or leading afresh: another leader may have come and gone since our
            # last round, so what we saw then is no base to tell changes from.
            self._step_down()
        if leadership is Leadership.FOLLOWER:
            return
        self.stats.leader = True
        if self.tails is None:
            refreshed, history_kept = await self._refresh_records(redis, lock, now), True
        else:
            await self.tails.announce(redis)
            refreshed, history_kept = await _side_by_side(
                self._refresh_records(redis, lock, now),
                self.tails.lead(redis, lambda: self._before_statement(lock), lambda: self._before_writes(lock)),
            )
        if refreshed is None or not history_kept:
            self._deposed()
            return
        if (refreshed or self.tails is not None) and not await lock.extend(self.lock_ttl):  # back to the short expiry
            self._step_down()

    async def _refresh_records(self, redis: SharedRedis, lock: LeaderLock, now: float) -> int | None:
        """Re-read the shared hot set's records, write and publish what changed, and confirm the
        rest; return how many tokens were read, or None once the lock was found lost."""
        members = await redis.hot_set.members(now - self.window, self.hot_max)
        # Tokens whose rows requests read meanwhile: what they read may be a version this
        # leader never saw (changed and changed back between two rounds), so each is published
        # as changed, with the fingerprint of what this round reads. Kept until a round has
        # published them: taking them empties the set in Redis, and this round may fail first.
        self._requested |= await redis.records.take_requested()
        requested = self._requested
        # In a fixed order (Redis gives the most recently noted first, and noting moves tokens to
        # the front): each token is then re-read at the same point of every round, one interval apart.
        members.sort()
        started = time.monotonic()
        as_of = time.time()
        # What members read as last round, kept while they still are members.
        known = self._members
        self._members = {member: known[member] for member in members if member in known}
        last_seen, written = self._last_seen, self._written
        seen: dict[bytes, TokenRecord | None] = {}
        values: dict[bytes, bytes] = {}  # changed records, to write to Redis before they are published
        renewed: dict[bytes, bytes] = {}  # unchanged ones, rewritten after (see below)
        fetched: dict[bytes, float] = {}  # when each of them was read
        changed: list[bytes] = []
        fingerprints: dict[bytes, bytes] = {}
        chunks = self._read_ahead(lock, members)
        try:
            # Each chunk stamped when its read ended (a request's read is stamped when it
            # begins): a request's record replaces these in Redis only if its read began after
            # this one ended, so Redis never holds a record older than what this round saw,
            # which its invalidations and confirmation vouch for.
            async for fresh, fetched_at in chunks:
                # Changed records are written; unchanged ones once half their TTL has gone, which
                # keeps them from ageing out of the cache.
                due = fetched_at - self.cache_ttl / 2
                for digest, record in fresh.items():
                    if last_seen.get(digest, _UNSEEN) is not record or digest in requested:
                        changed.append(digest)
                        if record is not None:
                            # With what was read: a worker that holds that very record keeps it
                            # (a first sight of 10,000 tokens need not reload them all in every
                            # worker).
                            fingerprints[digest] = record.fingerprint
                        # A token gone is written too, whatever USAGE_NEGATIVE_TTL: left in
                        # Redis, its old record would be taken back by every worker the
                        # invalidation reaches (with the setting at 0 a tombstone is never
                        # served, only read past to the database).
                        values[digest] = encode_cached(record, fetched_at)
                    elif record is not None and written.get(digest, 0.0) <= due:
                        # (A gone token's tombstone is written once: kept fresh in Redis, it
                        # would refuse its key to a new token for as long as the old one is
                        # hot, not USAGE_NEGATIVE_TTL.)
                        renewed[digest] = encode_cached(record, fetched_at)
                    else:
                        continue
                    fetched[digest] = fetched_at
                seen.update(fresh)
        except _LockLost:
            return None
        finally:
            await chunks.aclose()
        # Every token polled lately was checked: workers may keep what they hold. (With the hot
        # set cut at USAGE_HOT_MAX, some were not, and entries age out as usual.)
        confirm = len(members) < self.hot_max
        if values or renewed or confirm:
            if not await self._before_writes(lock):
                return None
            if values:
                await redis.records.store_many(values, self.lookup.redis_ttl)
            if changed:
                await redis.channel.publish_invalidation(changed, fingerprints)
            self._requested = set()
            if confirm:
                await redis.channel.publish_confirmation(as_of)
            # Unchanged records are only renewed, which nobody waits for: after the news, under
            # an extension of the lock of their own.
            if renewed:
                if not await self._before_writes(lock):
                    return None
                await redis.records.store_many(renewed, self.lookup.redis_ttl)
            written.update(fetched)
        self._last_seen = seen
        self._written = {d: at for d, at in written.items() if d in seen}
        self._finish(seen, len(changed), started)
        return len(members)

    async def _read_ahead(
        self, lock: LeaderLock, members: list[bytes]
    ) -> AsyncGenerator[tuple[dict[bytes, TokenRecord | None], float]]:
        """The members' records a chunk at a time, each with when its read ended, up to
        READ_AHEAD statements in flight: on a saturated worker every await waits out a whole
        pass of the event loop, and the next statements run while the round waits for this one.
        A statement goes ahead of the round's others only while the store has two connections
        spare: it never waits for one behind its own round (its time would run out there, and
        the round fail), and requests' misses keep one. The lock is checked before each
        statement is sent; _LockLost when it is found lost."""
        starts = iter(range(0, len(members), REFRESH_CHUNK))
        reads: deque[asyncio.Task[tuple[dict[bytes, TokenRecord | None], float]]] = deque()
        try:
            while True:
                while (not reads or (len(reads) < READ_AHEAD and self._spare_for_us(len(reads)) >= 2)) and (
                    start := next(starts, None)
                ) is not None:
                    if not await self._before_statement(lock):
                        raise _LockLost
                    chunk = parse_hot(members[start : start + REFRESH_CHUNK], self._members)
                    reads.append(asyncio.ensure_future(self._timed_read(chunk)))
                if not reads:
                    return
                yield await reads.popleft()
        finally:
            for read in reads:
                read.cancel()
            if reads:
                await asyncio.gather(*reads, return_exceptions=True)

    def _spare_for_us(self, sent: int) -> int:
        """The store's connections neither others' statements nor the round's `sent` reads hold
        (those of them that have started are among the store's own count already)."""
        return self.store.spare_connections + self._reading - sent

    async def _timed_read(self, hot: dict[bytes, int]) -> tuple[dict[bytes, TokenRecord | None], float]:
        self._reading += 1
        try:
            fresh = await self._read(hot)
        finally:
            self._reading -= 1
        return fresh, time.time()

    async def _before_statement(self, lock: LeaderLock) -> bool:
        """Whether the lock is ours for a statement more (no round trip while its lease lasts)."""
        return await lock.hold(self.statement_time, self.round_lock_ttl)

    async def _before_writes(self, lock: LeaderLock) -> bool:
        """Whether the lock is still ours, extended to outlive the round's writes and publications."""
        return await lock.extend(self.round_lock_ttl)

    def _deposed(self) -> None:
        logger.warning("the refresher lost its leader lock during a round; abandoned the round, wrote nothing more")
        self._step_down()

    def _step_down(self) -> None:
        # What this worker knew as leader may be outdated by the time it leads again.
        self.stats.leader = False
        self._last_seen.clear()
        self._written.clear()
        self._requested.clear()  # (leading again, it names every token as changed)
        if self.tails is not None:
            self.tails.step_down()

    async def _own_round(self) -> None:
        if self.tails is None:
            await self._refresh_own()
        else:
            await _side_by_side(self._refresh_own(), self.tails.own_round())

    async def _refresh_own(self) -> None:
        self.polled.prune(time.time())
        started = time.monotonic()
        seen: dict[bytes, TokenRecord | None] = {}
        for chunk in _chunks(self.polled.current()):
            fresh = await self._read(chunk)
            for digest, record in fresh.items():
                self.lookup.refreshed(digest, record)
            seen.update(fresh)
        self._finish(seen, 0, started)

    async def _read(self, hot: dict[bytes, int]) -> dict[bytes, TokenRecord | None]:
        """Re-read hot tokens by id; a token that vanished, or whose key changed, reads as None."""
        if not hot:
            return {}
        found = await self.store.fetch_many(sorted(set(hot.values())))
        fresh: dict[bytes, TokenRecord | None] = {}
        last_seen = self._last_seen
        for digest, token_id in hot.items():
            row = found.get(token_id)
            if row is None:
                fresh[digest] = None
                continue
            if isinstance(row, UnreadableRow):
                # Left out of this round: whatever is cached for it stays as it is, and ages out.
                logger.warning("%s; not refreshed", row)
                continue
            row_digest, record = row
            seen = last_seen.get(digest, _UNSEEN)
            # A store hands back the very record it gave last time only for an identical row,
            # key included.
            if seen is record:
                fresh[digest] = record
            elif row_digest != digest:  # the token's key changed: the old one is let go
                fresh[digest] = None
            else:  # an equal record keeps its old object, and with it its encoded form
                fresh[digest] = seen if isinstance(seen, TokenRecord) and seen == record else record
        return fresh

    def _finish(self, fresh: dict[bytes, TokenRecord | None], changed: int, started: float) -> None:
        self.stats.runs += 1
        self.stats.tokens = len(fresh)
        self.stats.changed += changed
        self.stats.last_duration = time.monotonic() - started
        self.stats.finished_at = time.time()
        self.stats.tokens_read += len(fresh)
        # Vanished tokens leave this worker's hot set; clients polling them get "token not found".
        for digest, record in fresh.items():
            if record is None:
                self.polled.discard(digest)


async def _side_by_side(first: Awaitable[T], second: Coroutine[Any, Any, U]) -> tuple[T, U]:
    """Run both at once and return both results; if `first` fails, `second` is cancelled first.
    (`second` runs as a task of its own: a failure of its own is raised when it is awaited.)"""
    other = asyncio.ensure_future(second)
    try:
        result = await first
    except BaseException:
        other.cancel()
        try:
            await other
        except (asyncio.CancelledError, RedisUnavailable, StoreUnavailable):
            pass  # ours is the error to raise
        except Exception:  # a defect of its own: said, then ours is raised
            logger.exception("the round's other half failed as well")
        raise
    return result, await other


def _chunks(hot: dict[bytes, int]) -> Iterator[dict[bytes, int]]:
    """Split a hot set so each piece is one statement and the event loop breathes in between."""
    items = list(hot.items())
    for start in range(0, len(items), REFRESH_CHUNK):
        yield dict(items[start : start + REFRESH_CHUNK])


class _LockLost(Exception):
    """The leader lock was found lost before a statement of the round."""


class _Unseen:
    pass


_UNSEEN = _Unseen()
