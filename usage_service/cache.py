"""The two cache layers in front of the store: in-process (`LocalCache`), then Redis (`RedisRecords`).

Both are keyed by a SHA-256 digest of the token key, never by the key itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Generic, TypeVar

from ._batch import Batcher
from ._redis_guard import RedisGuard, RedisUnavailable, ScriptCall, ms
from .records import CorruptCacheValue, TokenRecord, decode_cached

K = TypeVar("K")
V = TypeVar("V")


def key_digest(key: bytes) -> bytes:
    """Return the digest that stands for a token key in every cache."""
    return hashlib.sha256(key).digest()


def query_digest(query_string: bytes) -> bytes:
    """What stands for a query string in the caches: a client may send anything in it, a key
    included (`?key=sk-…` is some clients' habit), and that is never kept."""
    return hashlib.blake2b(query_string, digest_size=16).digest()


# The generation of an entry that no confirmation may extend: negative entries, expired ones,
# and every entry put without a generation.
UNCONFIRMED = -1

# Past generations whose end LocalCache remembers (a generation ends when the invalidation
# channel is lost or regained: a handful a day at most).
GENERATIONS_KEPT = 16


class LocalCache(Generic[V]):
    """A bounded in-process map whose entries expire; the oldest entry goes first when full.

    An entry is fresh until its own deadline. An entry put under the cache's current generation
    may also be fresh until the confirmation watermark (`confirm`), but never past its own hard
    deadline: moving the watermark is one assignment however many entries it vouches for, and a
    new generation withdraws it from every entry held so far at once.
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        # digest -> (fresh until, value, hard deadline, generation)
        self._entries: OrderedDict[bytes, tuple[float, V, float, int]] = OrderedDict()
        self.generation = 0
        self.confirmed_until = -math.inf
        # When confirmations stopped covering each of the last generations (read only by `peek`,
        # to tell how long ago an entry stopped being fresh; older ones count their own deadline).
        self._ended: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes, now: float) -> V | None:
        """Return the entry's value while it is fresh."""
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if now < entry[0] or (entry[3] == self.generation and now < entry[2] and now < self.confirmed_until):
            return entry[1]
        # An entry that is no longer fresh stays until it is replaced or pushed out by newer
        # ones: it is what stale-if-error serves while the database cannot answer.
        return None

    def peek(self, digest: bytes) -> tuple[V, float] | None:
        """Return (value, when its freshness ends or ended) of the entry, fresh or not."""
        entry = self._entries.get(digest)
        return None if entry is None else (entry[1], self._fresh_until(entry))

    def put(
        self,
        digest: bytes,
        value: V,
        expires_at: float,
        *,
        hard_deadline: float = -math.inf,
        generation: int = UNCONFIRMED,
    ) -> None:
        """Keep a value, fresh until `expires_at`; with the current `generation`, confirmations
        may keep it fresh longer, up to `hard_deadline`."""
        entries = self._entries
        entries[digest] = (expires_at, value, hard_deadline, generation)
        entries.move_to_end(digest)
        while len(entries) > self.max_size:
            entries.popitem(last=False)

    def expire(self, digest: bytes, now: float) -> None:
        """End an entry's freshness now, for good: it stays as a stale copy that no confirmation revives."""
        entry = self._entries.get(digest)
        if entry is not None:
            self._entries[digest] = (min(self._fresh_until(entry), now), entry[1], entry[2], UNCONFIRMED)

    def discard(self, digest: bytes) -> None:
        self._entries.pop(digest, None)

    def confirm(self, until: float) -> None:
        """Let every entry of the current generation be fresh until `until` (within its hard deadline)."""
        if until > self.confirmed_until:
            self.confirmed_until = until

    def new_generation(self, now: float) -> None:
        """Withdraw every confirmation from the entries held so far: each is fresh only until its
        own deadline, and no later confirmation extends it."""
        self._ended[self.generation] = min(self.confirmed_until, now)
        if len(self._ended) > GENERATIONS_KEPT:
            del self._ended[min(self._ended)]
        self.generation += 1
        self.confirmed_until = -math.inf

    def _fresh_until(self, entry: tuple[float, V, float, int]) -> float:
        expires_at, _, hard_deadline, generation = entry
        confirmed = self.confirmed_until if generation == self.generation else self._ended.get(generation, -math.inf)
        return max(expires_at, min(hard_deadline, confirmed))


# Many SETs with one expiry in one command (cheaper for us to send than a pipeline of SETs),
# each only if what is there was read from the database earlier than ours (values start
# "[format,fetched_at,"): no write, a request's or a deposed leader's, undoes a newer read.
# ARGV[2] holds the values one per line (a cached value is JSON: it holds no raw newline),
# so that a thousand records are two arguments to pack and send, not a thousand.
_SET_NEWER_SCRIPT = """
local function stamp(value)
  return value and tonumber(string.match(value, '^%[%d+,([^,]+),'))
end
local values, from = ARGV[2], 1
for _, key in ipairs(KEYS) do
  local to = string.find(values, '\\n', from, true) or #values + 1
  local new = string.sub(values, from, to - 1)
  from = to + 1
  local old = stamp(redis.call('get', key))
  if not old or old < stamp(new) then redis.call('set', key, new, 'PX', ARGV[1]) end
end
return #KEYS
"""


# Records per script call: Redis runs a script to its end before it serves anyone else, so the
# leader's writes of a round (up to USAGE_HOT_MAX records) go out as a pipeline of calls this big.
SET_SLICE = 1000

# The set of requested tokens (see RedisRecords): added to with an expiry, so that without a
# leader to take it (no refresher) it does not outlive a minute of misses.
REQUESTED_TTL_MS = 60_000

_NOTE_REQUESTED_SCRIPT = """
for member in string.gmatch(ARGV[2], '[^,]+') do redis.call('sadd', KEYS[1], member) end
redis.call('pexpire', KEYS[1], ARGV[1])
return 1
"""

_TAKE_REQUESTED_SCRIPT = """
local members = redis.call('smembers', KEYS[1])
redis.call('del', KEYS[1])
return table.concat(members, ',')
"""


class RedisRecords:
    """Token records in Redis (`<prefix><digest hex>`), shared by every worker and instance.

    Reads of a burst of misses go out as a few MGETs; a request's writes go out behind it. Every
    failure reads as a miss (or a write not made): the caller falls back to the database.

    The tokens whose records requests read from the database are also named in one set
    (`requested_key`), which the refresher's leader takes each round (`take_requested`): a
    request may have read a version of the row that the leader's rounds never saw (a charge
    undone between two rounds), which the leader's next round then tells every worker about.
    """

    def __init__(self, guard: RedisGuard, *, prefix: str, requested_key: str) -> None:
        self.guard = guard
        self.prefix = prefix
        self.requested_key = requested_key
        # A burst of misses costs a few MGETs, not one GET each; writes go out behind the
        # request, pipelined.
        self._reads: Batcher[bytes, bytes | str] = Batcher(
            self._read_many, max_batch=256, slots=2, expected=(RedisUnavailable,), what="a read of records from Redis"
        )
        self._writes: dict[bytes, tuple[bytes, float]] = {}
        self._writer: asyncio.Task[None] | None = None
        self._set_newer = guard.script(_SET_NEWER_SCRIPT)
        self._note_requested = guard.script(_NOTE_REQUESTED_SCRIPT)
        self._take_requested = guard.script(_TAKE_REQUESTED_SCRIPT)
        self.corrupt = 0  # values found that this version cannot read

    def key(self, digest: bytes) -> str:
        """The Redis key of a token's record."""
        return self.prefix + digest.hex()

    async def get(self, digest: bytes) -> tuple[TokenRecord | None, float] | None:
        """Return (record or None for a known-unknown key, fetched_at), or None on a miss."""
        raw = await self._reads.load(digest)
        if raw is None:
            return None
        try:
            return decode_cached(raw)
        except CorruptCacheValue:
            # Foreign or damaged: a miss; the fresh record read from the database overwrites it.
            self.corrupt += 1
            return None

    async def _read_many(self, digests: Sequence[bytes]) -> dict[bytes, bytes]:
        return await self.guard.found(digests, self.key)

    def write(self, digest: bytes, value: bytes, ttl: float) -> None:
        """Store a value soon, without making the caller wait for Redis."""
        self._writes[digest] = (value, ttl)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_pending())

    async def _write_pending(self) -> None:
        try:
            while self._writes:
                batch, self._writes = self._writes, {}
                with contextlib.suppress(RedisUnavailable):
                    await self.guard.run(functools.partial(self._set_requested, batch), self.guard.batch_timeout)
        finally:
            self._writer = None

    async def _set_requested(self, values: Mapping[bytes, tuple[bytes, float]]) -> None:
        await self._set_many(values)
        members = ",".join(digest.hex() for digest in values)
        await self._note_requested(keys=[self.requested_key], args=[REQUESTED_TTL_MS, members])

    async def take_requested(self) -> set[bytes]:
        """The tokens requests read from the database since the last call (the leader's, once a
        round), as digests; the set is emptied."""
        joined = await self.guard.run(lambda: self._take_requested(keys=[self.requested_key]), self.guard.batch_timeout)
        taken = set()
        for member in bytes(joined).split(b",") if joined else []:
            with contextlib.suppress(ValueError):  # only ours are there; anything else is skipped
                taken.add(bytes.fromhex(member.decode("ascii")))
        return taken

    async def store_many(self, values: Mapping[bytes, bytes], ttl: float) -> None:
        """Write many cached values in one round trip, each only over a value read earlier than it."""
        await self.guard.run(lambda: self._set_many({d: (v, ttl) for d, v in values.items()}), self.guard.batch_timeout)

    async def _set_many(self, values: Mapping[bytes, tuple[bytes, float]]) -> None:
        """One script call per expiry (and SET_SLICE records), all in one pipeline; on Cluster, one
        per expiry and hash slot.

        Record keys carry no hash tag, so they spread over every slot and node like any keys and
        the cluster can rebalance them slot by slot. The price is that a batch of N records is
        about N script calls instead of one; they still travel as one pipeline per node, so the
        round trips do not grow. Tagging keys into a few shared slots would cut the calls but pin
        the records (and their load) to those slots' nodes.
        """
        by_ttl: dict[float, tuple[list[str], list[bytes]]] = {}
        for digest, (value, ttl) in values.items():
            keys, payloads = by_ttl.setdefault(ttl, ([], []))
            keys.append(self.key(digest))
            payloads.append(value)
        calls: list[ScriptCall] = [
            (slot_keys[i : i + SET_SLICE], [ms(ttl), b"\n".join(slot_payloads[i : i + SET_SLICE])])
            for ttl, (keys, payloads) in by_ttl.items()
            for slot_keys, slot_payloads in self.guard.by_slot(keys, payloads)
            for i in range(0, len(slot_keys), SET_SLICE)
        ]
        await self.guard.eval_each(self._set_newer, calls)

    async def close(self) -> None:
        """Wait (up to a batch timeout) for the write in flight, if any."""
        if self._writer is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.guard.batch_timeout):
                    await asyncio.shield(self._writer)


class AnswerCache(Generic[K, V]):
    """Answers rendered from the log, kept per worker for `ttl` seconds after rendering.

    Bounded by count and by bytes (an answer over a long range by day and model can be large):
    the least recently used go first. A copy past its freshness stays until pushed out (the
    history route reuses it while the rounds vouch for what it was made from), and is served
    for `stale_if_error` more seconds while the log's database cannot answer.
    """

    def __init__(self, max_size: int, max_bytes: int, ttl: float, stale_if_error: float) -> None:
        self.max_size = max_size
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.stale_if_error = stale_if_error
        self.bytes = 0
        # key -> (fresh until, answer, its size in bytes)
        self._answers: OrderedDict[K, tuple[float, V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._answers)

    def fresh(self, key: K, now: float) -> V | None:
        entry = self._answers.get(key)
        if entry is None:
            return None
        if now < entry[0]:
            self._answers.move_to_end(key)
            return entry[1]
        return None

    def peek(self, key: K) -> V | None:
        """The last answer for `key`, however old."""
        entry = self._answers.get(key)
        return None if entry is None else entry[1]

    def stale(self, key: K, now: float) -> V | None:
        """The last answer for `key` if its freshness ended at most `stale_if_error` seconds ago."""
        entry = self._answers.get(key)
        if entry is None or now - entry[0] > self.stale_if_error:
            return None
        return entry[1]

    def put(self, key: K, answer: V, size: int, now: float) -> None:
        answers = self._answers
        old = answers.pop(key, None)
        if old is not None:
            self.bytes -= old[2]
        answers[key] = (now + self.ttl, answer, size)
        self.bytes += size
        while len(answers) > self.max_size or self.bytes > self.max_bytes:
            _, (_, _, dropped) = answers.popitem(last=False)
            self.bytes -= dropped
