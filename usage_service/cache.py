"""The two cache layers in front of the store: in-process, then Redis.

Both are keyed by a SHA-256 digest of the token key, never by the key itself.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import enum
import functools
import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Generic, TypeVar

from redis.asyncio import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from ._batch import Batcher
from ._circuit import CircuitBreaker
from .records import CorruptCacheValue, TokenRecord, decode_cached
from .redis_client import RedisClient

logger = logging.getLogger("usage_service.cache")

V = TypeVar("V")
T = TypeVar("T")


def key_digest(key: bytes) -> bytes:
    """Return the digest that stands for a token key in every cache."""
    return hashlib.sha256(key).digest()


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


# Hot-set members per command, both ways: bounded work between two awaits of the event loop.
HOT_SLICE = 1000

# What a Redis call may raise when Redis is down, slow or (on Cluster) has no node for a slot.
REDIS_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)


class RedisUnavailable(Exception):
    """Redis failed, timed out, or is being left alone by the circuit breaker."""


class Leadership(enum.IntEnum):
    """Where `RedisCache.lead` left this instance."""

    FOLLOWER = 0  # another instance holds the lock
    TOOK = 1  # the lock was free and is ours now: whatever we knew as leader before may be outdated
    KEPT = 2  # we held it, and hold it for another lock TTL


# Extend the leader lock if we hold it (2), else take it if it is free (1), else 0: one key,
# so Cluster-safe. redis-py's Lock.reacquire and acquire in one round trip.
_LEAD_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return 2
end
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

# Extend the leader lock only if we still hold it (redis-py's Lock.reacquire): never take it.
_KEEP_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


# Add comma-separated members to the hot set, all scored ARGV[1] (unpack takes so many at a time).
_NOTE_SCRIPT = """
local args = {}
for member in string.gmatch(ARGV[2], '[^,]+') do
  args[#args + 1] = ARGV[1]
  args[#args + 1] = member
  if #args == 1000 then redis.call('zadd', KEYS[1], unpack(args)); args = {} end
end
if #args > 0 then redis.call('zadd', KEYS[1], unpack(args)) end
return 1
"""

# Trim the hot set and return the most recently polled members joined into one string.
_HOT_SCRIPT = """
redis.call('zremrangebyscore', KEYS[1], '-inf', ARGV[1])
return table.concat(redis.call('zrevrangebyscore', KEYS[1], '+inf', ARGV[2], 'LIMIT', 0, ARGV[3]), ',')
"""

# Many SETs with one expiry in one command (cheaper for us to send than a pipeline of SETs),
# each only if what is there was read from the database earlier than ours (values start
# "[format,fetched_at,"): no write, a request's or a deposed leader's, undoes a newer read.
_SET_NEWER_SCRIPT = """
local function stamp(value)
  return value and tonumber(string.match(value, '^%[%d+,([^,]+),'))
end
for i, key in ipairs(KEYS) do
  local new = ARGV[i + 1]
  local old = stamp(redis.call('get', key))
  if not old or old < stamp(new) then redis.call('set', key, new, 'PX', ARGV[1]) end
end
return #KEYS
"""

# Count failures in a window that the first failure opens; return the count and what is left
# of the window. One key (Cluster-safe); a key found without an expiry gets one.
_COUNT_FAILURE_SCRIPT = """
local n = redis.call('incrby', KEYS[1], ARGV[2])
local ttl = redis.call('pttl', KEYS[1])
if ttl < 0 then
  redis.call('pexpire', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
"""

_RESIGN_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class RedisCache:
    """Token records in Redis, shared by every worker and instance, and the refresher's state.

    Redis is optional at run time: every call is bounded by a timeout, failures open a circuit
    breaker so a dead Redis is not waited on request after request, and the request path reads
    every failure as a miss so the caller falls back to the database.
    """

    def __init__(self, client: RedisClient, *, prefix: str, timeout: float, breaker: CircuitBreaker) -> None:
        self.client = client
        # On Cluster, multi-key commands must stay within one hash slot: reads and writes of many
        # records are split by slot (see _set_many). Every other key is used alone: the hot set,
        # the leader lock, the channel (pub/sub reaches every node).
        self._cluster = client if isinstance(client, RedisCluster) else None
        self._mget = client.mget if self._cluster is None else self._cluster.mget_nonatomic
        self.timeout = timeout
        # Background batches (a whole hot set) may take longer than one request's lookup.
        self.batch_timeout = max(1.0, 4 * timeout)
        self.breaker = breaker
        self._prefix = prefix + "tok:"
        self.hot_key = prefix + "hot"
        self.leader_key = prefix + "leader"
        self.channel = prefix + "invalidate"
        self.auth_fail_prefix = prefix + "authfail:"
        # A burst of misses costs a few MGETs, not one GET each; writes go out behind the
        # request, pipelined.
        self._reads: Batcher[bytes, bytes | str] = Batcher(self._read_many, max_batch=256, slots=2)
        self._writes: dict[bytes, tuple[bytes, float]] = {}
        self._writer: asyncio.Task[None] | None = None
        self._lead = client.register_script(_LEAD_SCRIPT)
        self._keep = client.register_script(_KEEP_SCRIPT)
        self._resign = client.register_script(_RESIGN_SCRIPT)
        self._set_newer_script = client.register_script(_SET_NEWER_SCRIPT)
        self._hot_script = client.register_script(_HOT_SCRIPT)
        self._note_script = client.register_script(_NOTE_SCRIPT)
        self._count_failure = client.register_script(_COUNT_FAILURE_SCRIPT)
        self.errors = 0
        self.corrupt = 0
        self._closed = False

    def _key(self, digest: bytes) -> str:
        return self._prefix + digest.hex()

    async def _run(self, call: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
        """Run one Redis call under the breaker and a timeout; raise RedisUnavailable on any failure."""
        if self._closed:
            raise RedisUnavailable("closed")  # a straggler must not open a connection after close()
        if not self.breaker.allow():
            raise RedisUnavailable("circuit open")
        try:
            async with asyncio.timeout(timeout or self.timeout):
                result = await call()
        except REDIS_FAILURES as exc:
            _reraise_cancellation()
            self._failed(exc)
            raise RedisUnavailable(type(exc).__name__) from None
        except Exception as exc:
            # Not an error redis-py documents (a client bug in some failover corner, a reply
            # that does not parse): Redis still must not fail a request. Logged in full.
            _reraise_cancellation()
            logger.warning("unexpected error from the redis client; treated as redis unavailable", exc_info=True)
            self._failed(exc)
            raise RedisUnavailable(type(exc).__name__) from None
        # redis-py can swallow a cancellation that lands while it connects, or turn it into an
        # error: honour it either way, or a background task would outlive shutdown.
        _reraise_cancellation()
        self._succeeded()
        return result

    # --- the request path ------------------------------------------------------------------

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

    async def _read_many(self, digests: Sequence[bytes]) -> dict[bytes, bytes | str]:
        async def read() -> dict[bytes, bytes | str]:
            values = await self._mget([self._key(d) for d in digests])
            # Inside _run: a reply that does not match the request is a Redis failure, not a 500.
            return {digest: value for digest, value in zip(digests, values, strict=True) if value is not None}

        try:
            return await self._run(read)
        except RedisUnavailable:
            return {}

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
                    await self._run(functools.partial(self._set_many, batch), self.batch_timeout)
        finally:
            self._writer = None

    async def _set_many(self, values: Mapping[bytes, tuple[bytes, float]]) -> None:
        by_ttl: dict[int, tuple[list[str], list[bytes]]] = {}
        for digest, (value, ttl) in values.items():
            keys, payloads = by_ttl.setdefault(_ms(ttl), ([], []))
            keys.append(self._key(digest))
            payloads.append(value)
        script = self._set_newer_script
        for ttl_ms, (keys, payloads) in by_ttl.items():
            if self._cluster is None:
                await script(keys=keys, args=[ttl_ms, *payloads])
            else:
                await self._set_by_slot(self._cluster, script, ttl_ms, keys, payloads)

    async def _set_by_slot(
        self, cluster: RedisCluster, script: AsyncScript, ttl_ms: int, keys: list[str], payloads: list[bytes]
    ) -> None:
        """Run a many-key SET script once per hash slot, all slots in one pipeline per node.

        Record keys carry no hash tag, so they spread over every slot and node like any keys and
        the cluster can rebalance them slot by slot. The price is that a batch of N records is
        about N script calls instead of one; they still travel as one pipeline per node, so the
        round trips do not grow. Tagging keys into a few shared slots would cut the calls but pin
        the records (and their load) to those slots' nodes.
        """
        by_slot: dict[int, tuple[list[str], list[bytes]]] = {}
        for key, payload in zip(keys, payloads, strict=True):
            slot_keys, slot_payloads = by_slot.setdefault(cluster.keyslot(key), ([], []))
            slot_keys.append(key)
            slot_payloads.append(payload)
        for attempt in range(2):
            pipe = cluster.pipeline()
            for slot_keys, slot_payloads in by_slot.values():
                # (The pipeline's evalsha() is refused on Cluster; the command itself routes by key.)
                pipe.execute_command("EVALSHA", script.sha, len(slot_keys), *slot_keys, ttl_ms, *slot_payloads)
            try:
                await pipe.execute()
                return
            except NoScriptError:
                # A node that never saw the script (new, restarted, promoted): load it everywhere.
                if attempt:
                    raise
                await cluster.script_load(script.script)

    # --- the refresher ---------------------------------------------------------------------

    async def note_polled(self, polled: Mapping[bytes, int], now: float) -> None:
        """Mark tokens as polled now in the shared hot set (members are 'id:digest', never keys)."""
        items = list(polled.items())
        # In slices, each one string that Redis splits: packing a ZADD of 10,000 members, two
        # arguments each, would hold up the event loop.
        for start in range(0, len(items), HOT_SLICE):
            members = ",".join([f"{token_id}:{digest.hex()}" for digest, token_id in items[start : start + HOT_SLICE]])
            await self._run(
                functools.partial(self._note_script, keys=[self.hot_key], args=[now, members]), self.batch_timeout
            )

    async def lead(self, instance: str, ttl: float) -> Leadership:
        """Take or keep the refresher's leader lock for `ttl` seconds; say how this instance stands."""
        held = await self._run(lambda: self._lead(keys=[self.leader_key], args=[instance, _ms(ttl)]))
        return Leadership(int(held))

    async def keep_lead(self, instance: str, ttl: float) -> bool:
        """Extend the leader lock to `ttl` seconds if this instance still holds it; say whether it does."""
        held = await self._run(lambda: self._keep(keys=[self.leader_key], args=[instance, _ms(ttl)]))
        return bool(held)

    async def resign(self, instance: str) -> None:
        """Give up the leader lock if this instance holds it, so another takes over at once."""
        await self._run(lambda: self._resign(keys=[self.leader_key], args=[instance]))

    async def hot_members(self, since: float, limit: int) -> list[bytes]:
        """Forget tokens not polled since `since`; return the most recent others, unparsed (see
        `parse_hot`: the caller reads them a slice at a time, between its own awaits)."""
        # One bulk string instead of thousands of replies: far cheaper for us to read.
        joined = await self._run(
            lambda: self._hot_script(keys=[self.hot_key], args=[f"({since}", since, limit]), self.batch_timeout
        )
        return bytes(joined).split(b",") if joined else []

    async def store_many(self, values: Mapping[bytes, bytes], ttl: float) -> None:
        """Write many cached values in one round trip, each only over a value read earlier than it."""
        await self._run(lambda: self._set_many({d: (v, ttl) for d, v in values.items()}), self.batch_timeout)

    async def publish_invalidation(self, digests: Iterable[bytes]) -> None:
        """Tell every worker to drop these tokens from its in-process layer."""
        message = ",".join(d.hex() for d in digests)
        await self._run(lambda: self.client.publish(self.channel, message))

    async def publish_confirmation(self, as_of: float) -> None:
        """Tell every worker that all hot records were checked against the database as of `as_of`."""
        await self._run(lambda: self.client.publish(self.channel, f"@{as_of!r}"))

    async def listen_invalidations(
        self,
        on_digests: Callable[[list[bytes]], None],
        on_confirm: Callable[[float], None],
        on_live: Callable[[bool], None],
    ) -> None:
        """Deliver invalidations and confirmations until cancelled, subscribing again after a failure.

        Both travel on one channel, so a worker that hears a round's confirmation has heard its
        invalidations. `on_live` hears whether messages can currently arrive.
        """
        while not self._closed:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                on_live(True)
                while True:
                    # redis-py can turn a cancellation that lands as its read times out into an
                    # ordinary empty read; without this check the listener would outlive shutdown.
                    _reraise_cancellation()
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is None:
                        continue
                    data = message["data"]
                    if isinstance(data, bytes) and data.startswith(b"@"):
                        with contextlib.suppress(ValueError):
                            on_confirm(float(data[1:]))
                    else:
                        on_digests(_parse_digests(data))
            except REDIS_FAILURES:
                on_live(False)
                _reraise_cancellation()
                await asyncio.sleep(min(1.0, self.breaker.cooldown) or 0.1)
            finally:
                on_live(False)
                with contextlib.suppress(*REDIS_FAILURES):
                    async with asyncio.timeout(self.timeout):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]

    # --- the failed-authentication limiter -------------------------------------------------

    async def count_failures(self, failures: Mapping[str, int], window: float) -> dict[str, tuple[int, float]]:
        """Add failures per bucket (a client address); return {bucket: (failures, seconds left in its window)}.

        One script call per bucket, each on its own key (Cluster routes each by its slot), in one
        pipeline: one round trip for a burst.
        """
        script = self._count_failure

        async def count() -> list[tuple[int, int]]:
            for attempt in range(2):
                pipe = self.client.pipeline() if self._cluster is None else self._cluster.pipeline()
                for bucket, n in failures.items():
                    pipe.execute_command("EVALSHA", script.sha, 1, self.auth_fail_prefix + bucket, _ms(window), n)
                try:
                    return list(await pipe.execute())
                except NoScriptError:
                    # A server or node that never saw the script (new, restarted, promoted).
                    if attempt:
                        raise
                    await self.client.script_load(script.script)
            raise AssertionError("unreachable")

        replies = await self._run(count)
        return {bucket: (int(n), int(ttl) / 1000) for bucket, (n, ttl) in zip(failures, replies, strict=True)}

    # --- health ----------------------------------------------------------------------------

    async def ping(self) -> bool:
        """Say whether Redis answers now (bypasses the breaker: this is what readiness reports)."""
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.ping()
        except REDIS_FAILURES:
            return False
        return True

    async def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.batch_timeout):
                    await asyncio.shield(self._writer)
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


def _reraise_cancellation() -> None:
    """Honour a cancellation that a client library turned into an ordinary error."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def parse_hot(members: Iterable[bytes]) -> dict[bytes, int]:
    """Read hot-set members ('id:digest') as {digest: id}, skipping any that are malformed."""
    hot: dict[bytes, int] = {}
    for member in members:
        token_id, _, digest = member.partition(b":")
        if len(digest) != 64:
            continue
        try:
            hot[binascii.unhexlify(digest)] = int(token_id)
        except ValueError:  # binascii.Error is one
            pass
    return hot


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _parse_digests(data: object) -> list[bytes]:
    if not isinstance(data, bytes | str):
        return []
    text = data.decode("ascii", "replace") if isinstance(data, bytes) else data
    digests = []
    for part in text.split(","):
        with contextlib.suppress(ValueError):
            digest = bytes.fromhex(part)
            if len(digest) == 32:
                digests.append(digest)
    return digests
