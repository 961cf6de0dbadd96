"""The shared hot set: which tokens were polled lately, by every worker of every instance.

A sorted set `<prefix>hot` whose members are 'id:digest' (never a key), scored by when they
were last noted. Workers note what they answered; the refresher's leader reads it back.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterable, Mapping
from typing import Generic, TypeVar

from ._redis_guard import RedisGuard, ScriptCall

K = TypeVar("K")
V = TypeVar("V")

# A worker notes a token in the shared hot set again once this part of USAGE_HOT_WINDOW has
# passed since it last did (at most every RENOTE_MAX seconds), not on every poll: tokens polled
# without pause stay in the set, and noting costs a fraction of what it would.
RENOTE_FRACTION = 0.25
RENOTE_MAX = 5.0


def renote_interval(window: float) -> float:
    """How long a worker goes without noting a token it goes on answering: a token it asked for
    stays in the shared set for at least `window` less this."""
    return min(window * RENOTE_FRACTION, RENOTE_MAX)


class Polled(Generic[K, V]):
    """One worker's side of a hot set: what it answered within the window (key -> value, and
    when), and when it last noted each key in the shared set.

    Pruned to the window once a window, and to the `hot_max` most recently polled whenever a
    sweep of distinct tokens outgrows that sooner (what was noted goes with what was polled):
    bounded in time and in size.
    """

    def __init__(self, window: float, hot_max: int) -> None:
        self.window = window
        self.hot_max = hot_max
        self.renote = renote_interval(window)
        self._polled: dict[K, tuple[V, float]] = {}
        self._noted: dict[K, float] = {}
        self._pruned_at = 0.0

    def take(self, answered: Mapping[K, V], now: float) -> dict[K, V]:
        """Add what was answered at `now`; return those to note in the shared set (not noted
        within the re-note interval), to be passed to `noted` once they are."""
        renote_before = now - self.renote
        unnoted: dict[K, V] = {}
        for key, value in answered.items():
            self._polled[key] = (value, now)
            if self._noted.get(key, 0.0) <= renote_before:
                unnoted[key] = value
        if now - self._pruned_at >= self.window or len(self._polled) > self.hot_max:
            self.prune(now)
        return unnoted

    def noted(self, keys: Iterable[K], now: float) -> None:
        """Say these keys were noted in the shared set at `now`."""
        self._noted.update(dict.fromkeys(keys, now))

    def forget_noted(self) -> None:
        """Redis failed, and may come back empty: note every polled key again once it answers."""
        self._noted.clear()

    def prune(self, now: float) -> None:
        since = now - self.window
        self._pruned_at = now
        self._polled = {key: entry for key, entry in self._polled.items() if entry[1] >= since}
        if len(self._polled) > self.hot_max:  # the most recently polled win
            recent = sorted(self._polled.items(), key=lambda item: item[1][1], reverse=True)[: self.hot_max]
            self._polled = dict(recent)
        self._noted = {key: at for key, at in self._noted.items() if at >= since and key in self._polled}

    def current(self) -> dict[K, V]:
        """What was polled: within the window as of the last `prune`, and whatever came since."""
        return {key: value for key, (value, _) in self._polled.items()}

    def discard(self, key: K) -> None:
        self._polled.pop(key, None)

    def __len__(self) -> int:
        return len(self._polled)


# Hot-set members per command, both ways: bounded work between two awaits of the event loop.
HOT_SLICE = 1000

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


class HotSet:
    """The tokens polled lately, in one sorted set (one key: Cluster-safe)."""

    def __init__(self, guard: RedisGuard, *, key: str) -> None:
        self.guard = guard
        self.key = key
        self._note = guard.script(_NOTE_SCRIPT)
        self._trim_and_read = guard.script(_HOT_SCRIPT)

    async def note(self, polled: Mapping[bytes, int], now: float) -> None:
        """Mark tokens ({digest: id}) as polled at `now`."""
        items = list(polled.items())
        # In slices, each one string that Redis splits (packing a ZADD of 10,000 members, two
        # arguments each, would hold up the event loop), all in one pipeline: on a saturated
        # worker each round trip waits out a whole pass of the event loop.
        calls: list[ScriptCall] = [
            ([self.key], [now, ",".join([f"{t}:{digest.hex()}" for digest, t in items[start : start + HOT_SLICE]])])
            for start in range(0, len(items), HOT_SLICE)
        ]
        if calls:
            await self.guard.run(lambda: self.guard.eval_each(self._note, calls), self.guard.batch_timeout)

    async def members(self, since: float, limit: int) -> list[bytes]:
        """Forget tokens not polled since `since`; return the most recent others, unparsed (see
        `parse_hot`: the caller reads them a slice at a time, between its own awaits)."""
        # One bulk string instead of thousands of replies: far cheaper for us to read.
        joined = await self.guard.run(
            lambda: self._trim_and_read(keys=[self.key], args=[f"({since}", since, limit]), self.guard.batch_timeout
        )
        return bytes(joined).split(b",") if joined else []


def parse_hot(members: Iterable[bytes], memory: dict[bytes, tuple[bytes, int]] | None = None) -> dict[bytes, int]:
    """Read hot-set members ('id:digest') as {digest: id}, skipping any that are malformed.

    `memory` keeps what each member read as: the leader reads nearly the same members every
    round, and looking one up costs a fraction of parsing it.
    """
    hot: dict[bytes, int] = {}
    for member in members:
        parsed = memory.get(member) if memory is not None else None
        if parsed is None:
            parsed = _parse_member(member)
            if parsed is None:
                continue
            if memory is not None:
                memory[member] = parsed
        hot[parsed[0]] = parsed[1]
    return hot


def _parse_member(member: bytes) -> tuple[bytes, int] | None:
    token_id, _, digest = member.partition(b":")
    if len(digest) != 64:
        return None
    try:
        return binascii.unhexlify(digest), int(token_id)
    except ValueError:  # binascii.Error is one
        return None
