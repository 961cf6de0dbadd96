"""What the spending engine keeps in Redis, keyed by token id (never by key material).

    hist:day:<token id>:<day>   one token's closed UTC day              RedisDays
    hist:tail:<token id>        a polled token's open days (the leader)  RedisTails
    hist:hot                    tokens whose history was polled lately   HistoryHot

Values are compact JSON, encoded and read by history.py. Closed days are plain SETs: a closed
day read twice reads the same, and a value written from before a clean-up carries its guard, by
which every reader tells it is outdated (see `history.Day`). Tails are written by the leader only,
each round's before that round's announcement (see tails.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ._batch import Batcher
from ._redis_guard import RedisGuard, RedisUnavailable, ScriptCall, ms
from .hotset import HOT_SLICE

# Seconds a closed day stays in Redis: a month's history polled daily is read from the
# database about once a week per day, and days nobody asks for again go away.
DAY_TTL = 7 * 86_400


class RedisDays:
    """Closed days of tokens' spending (encoded by history.py), shared by every worker and
    instance, and across restarts."""

    def __init__(self, guard: RedisGuard, *, prefix: str) -> None:
        self.guard = guard
        self.prefix = prefix
        # Tokens read at once (a started worker's first polls: a month each) share MGETs:
        # hundreds of concurrent ones would wait for the pool's connections past the timeout.
        self._reads: Batcher[tuple[int, int], bytes] = Batcher(
            self._read_many, max_batch=1024, slots=2, expected=(RedisUnavailable,), what="a read of days from Redis"
        )

    def key(self, token_id: int, day: int) -> str:
        return f"{self.prefix}{token_id}:{day}"

    async def get_many(self, token_id: int, days: Sequence[int]) -> dict[int, bytes]:
        """The days Redis holds among these; any failure reads as a miss."""
        if not days:
            return {}
        found = await self._reads.load_many([(token_id, day) for day in days])
        return {day: value for (_, day), value in found.items()}

    async def _read_many(self, keys: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        found = await self.guard.found(keys, lambda key: self.key(*key))
        return {key: bytes(value) for key, value in found.items()}

    async def put_many(self, token_id: int, days: Mapping[int, bytes]) -> None:
        """Store days in one pipeline; a failure only means they are read again elsewhere."""
        if not days:
            return

        async def write() -> None:
            pipe = self.guard.client.pipeline(transaction=False)
            for day, value in days.items():
                pipe.set(self.key(token_id, day), value, px=ms(DAY_TTL))
            await pipe.execute()

        try:
            await self.guard.run(write, self.guard.batch_timeout)
        except RedisUnavailable:
            pass

    async def put_all(self, days: Mapping[tuple[int, int], bytes]) -> None:
        """Store days of many tokens ({(token id, day): value}) in one pipeline (the leader's
        writes when a day closes: a failure is the caller's to see)."""

        async def write() -> None:
            pipe = self.guard.client.pipeline(transaction=False)
            for (token_id, day), value in days.items():
                pipe.set(self.key(token_id, day), value, px=ms(DAY_TTL))
            await pipe.execute()

        await self.guard.run(write, self.guard.batch_timeout)


# Many SETs with one expiry, each only over a tail read earlier than it (values start
# "[format,start day,read at,"): a deposed leader's late write never undoes a newer round's.
_SET_NEWER_TAIL_SCRIPT = """
local function stamp(value)
  return value and tonumber(string.match(value, '^%[%d+,%d+,([^,]+),'))
end
for i, key in ipairs(KEYS) do
  local new = ARGV[i + 1]
  local old = stamp(redis.call('get', key))
  if not old or old <= stamp(new) then redis.call('set', key, new, 'PX', ARGV[1]) end
end
return #KEYS
"""


# Delete each tail that leadership ARGV[1] kept (its encoding ends with that epoch).
_FORGET_TAIL_SCRIPT = """
local mark = ',"' .. ARGV[1] .. '"]'
for _, key in ipairs(KEYS) do
  local value = redis.call('get', key)
  if value and string.sub(value, -#mark) == mark then redis.call('del', key) end
end
return #KEYS
"""


class RedisTails:
    """Polled tokens' open days as the refresher's leader last read them (`<prefix><token id>`)."""

    def __init__(self, guard: RedisGuard, *, prefix: str) -> None:
        self.guard = guard
        self.prefix = prefix
        self._set_newer = guard.script(_SET_NEWER_TAIL_SCRIPT)
        self._forget = guard.script(_FORGET_TAIL_SCRIPT)
        # Tokens asked for at once (a worker taking up the leader's tails, a started worker)
        # cost a few MGETs, not one GET each, as the balance's records do.
        self._reads: Batcher[int, bytes] = Batcher(
            self._read_many, max_batch=256, slots=2, expected=(RedisUnavailable,), what="a read of tails from Redis"
        )

    def key(self, token_id: int) -> str:
        return f"{self.prefix}{token_id}"

    async def get(self, token_id: int) -> bytes | None:
        """The token's open days, or None (not kept, or Redis failed)."""
        return await self._reads.load(token_id)

    async def _read_many(self, token_ids: Sequence[int]) -> dict[int, bytes]:
        found = await self.guard.found(token_ids, self.key)
        return {t: value if isinstance(value, bytes) else str(value).encode() for t, value in found.items()}

    async def put_many(self, tails: Mapping[int, bytes], ttl: float) -> None:
        """Store many tails, each only over an older one, in one pipeline (one script call per
        hash slot on Cluster); the leader's writes: a failure is the caller's to see."""
        keys = [self.key(token_id) for token_id in tails]
        calls: list[ScriptCall] = [
            (slot_keys, [ms(ttl), *values]) for slot_keys, values in self.guard.by_slot(keys, list(tails.values()))
        ]
        await self.guard.run(lambda: self.guard.eval_each(self._set_newer, calls), self.guard.batch_timeout)

    async def forget(self, token_ids: Sequence[int], epoch: str) -> None:
        """Remove these tokens' tails where leadership `epoch` kept them, in one pipeline (one
        script call per hash slot on Cluster); the leader's: a failure is the caller's to see."""
        keys = [self.key(token_id) for token_id in token_ids]
        calls: list[ScriptCall] = [(slot_keys, [epoch]) for slot_keys, _ in self.guard.by_slot(keys, keys)]
        await self.guard.run(lambda: self.guard.eval_each(self._forget, calls), self.guard.batch_timeout)


class HistoryHot:
    """The tokens whose history was polled lately, by every worker: a sorted set of token ids
    scored by when they were last noted (one key: Cluster-safe)."""

    def __init__(self, guard: RedisGuard, *, key: str) -> None:
        self.guard = guard
        self.key = key

    async def note(self, token_ids: Sequence[int], now: float) -> None:
        for start in range(0, len(token_ids), HOT_SLICE):
            mapping: dict[str | bytes, float] = {str(t): now for t in token_ids[start : start + HOT_SLICE]}
            await self.guard.run(lambda m=mapping: self.guard.client.zadd(self.key, m), self.guard.batch_timeout)  # type: ignore[misc]

    async def members(self, since: float, limit: int) -> list[int]:
        """Forget tokens not noted since `since`; return the most recently noted others."""

        async def trim_and_read() -> list[bytes]:
            pipe = self.guard.client.pipeline(transaction=False)
            pipe.zremrangebyscore(self.key, "-inf", f"({since}")
            pipe.zrevrangebyscore(self.key, "+inf", since, start=0, num=limit)
            return (await pipe.execute())[1]  # type: ignore[no-any-return]

        members = await self.guard.run(trim_and_read, self.guard.batch_timeout)
        found = []
        for member in members:
            try:
                found.append(int(member))
            except ValueError:
                continue
        return found
