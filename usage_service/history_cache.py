"""What the spending engine keeps in Redis, keyed by token id (never by key material).

    hist:day:<token id>:<day>   one token's closed UTC day       RedisDays

A value is compact JSON: `[format, guard, [[slot in the day, model, quota, prompt, completion,
requests], ...]]`. Writes are plain SETs: a closed day read twice reads the same, and a value
written from before a clean-up carries its guard, by which every reader tells it is outdated
(see `history.Day`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ._redis_guard import RedisGuard, RedisUnavailable, ms

# Seconds a closed day stays in Redis: a month's history polled daily is read from the
# database about once a week per day, and days nobody asks for again go away.
DAY_TTL = 7 * 86_400


class RedisDays:
    """Closed days of tokens' spending (encoded by history.py), shared by every worker and
    instance, and across restarts."""

    def __init__(self, guard: RedisGuard, *, prefix: str) -> None:
        self.guard = guard
        self.prefix = prefix

    def key(self, token_id: int, day: int) -> str:
        return f"{self.prefix}{token_id}:{day}"

    async def get_many(self, token_id: int, days: Sequence[int]) -> dict[int, bytes]:
        """The days Redis holds among these; any failure reads as a miss."""
        if not days:
            return {}
        try:
            values = await self.guard.run(lambda: self.guard.mget([self.key(token_id, day) for day in days]))
        except RedisUnavailable:
            return {}
        return {day: bytes(value) for day, value in zip(days, values, strict=False) if value is not None}

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
