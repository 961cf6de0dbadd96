"""The refresher's leader lock: one instance at a time re-reads the hot set.

Modelled on redis-py's `Lock`: a key `<prefix>leader` holding the holder's random token, with an
expiry; every change to it checks the token first, in a script, so an instance only ever
extends or releases a lock it still holds.

When the lock is lost (it expired while the holder was stalled, and maybe another instance took
it), `extend` says so and the holder must stop acting as leader at once: write and publish
nothing more of the round under way, and forget what it saw as leader. What it may still have in
flight is harmless: every record write is only-if-newer (see `RedisRecords`).

`hold` is how a round checks the lock before each statement: a lock only ever expires with time, so
while the holder's own clock says its last extension (counted from when it was sent) has a
statement's time left, the lock is still its own and needs no round trip. (A round trip per check costs
little on an idle worker but a whole pass of the event loop on a saturated one, where it made a
round of 10,000 tokens take seconds.) Only a lock removed before its time (a Redis failover that
lost it, an eviction, a FLUSHALL) escapes this: its holder finds it gone at its next `extend`
(the refresher extends it before a round's writes), and until then reads at most.
"""

from __future__ import annotations

import enum
import math
import time
import uuid
from collections.abc import Callable

from ._redis_guard import RedisGuard, ms

# Extend the lock if we hold it (2), else take it if it is free (1), else 0: one key, so
# Cluster-safe. redis-py's Lock.reacquire and acquire in one round trip.
_LEAD_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return 2
end
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

# Extend the lock only if we still hold it (redis-py's Lock.reacquire): never take it.
_EXTEND_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# The share of a lease the holder counts on: Redis expires the key by its own clock, which may run
# a little faster than ours (Redlock allows for the same drift).
_CLOCK_DRIFT = 0.01

_RELEASE_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class Leadership(enum.IntEnum):
    """Where `LeaderLock.lead` left this instance."""

    FOLLOWER = 0  # another instance holds the lock
    TOOK = 1  # the lock was free and is ours now: whatever we knew as leader before may be outdated
    KEPT = 2  # we held it, and hold it for another TTL


class LeaderLock:
    """One holder's handle on the leader lock; its token tells it apart from every other holder."""

    def __init__(self, guard: RedisGuard, *, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.guard = guard
        self.name = name
        self.token = uuid.uuid4().hex
        self.clock = clock
        # By our clock, the lock is ours at least until then (its last extension's time, from
        # when it was sent, less the drift allowed): -inf while we do not hold it.
        self._held_until = -math.inf
        self._lead = guard.script(_LEAD_SCRIPT)
        self._extend = guard.script(_EXTEND_SCRIPT)
        self._release = guard.script(_RELEASE_SCRIPT)

    async def lead(self, ttl: float) -> Leadership:
        """Take the lock if it is free, or extend it if we hold it, for `ttl` seconds."""
        sent = self.clock()
        self._held_until = -math.inf  # (a call that fails leaves us holding nothing we count on)
        held = Leadership(int(await self.guard.run(lambda: self._lead(keys=[self.name], args=[self.token, ms(ttl)]))))
        if held is not Leadership.FOLLOWER:
            self._held_until = sent + ttl * (1 - _CLOCK_DRIFT)
        return held

    async def extend(self, ttl: float) -> bool:
        """Extend the lock to `ttl` seconds if we still hold it; False: it is lost (see the module)."""
        sent = self.clock()
        self._held_until = -math.inf
        held = bool(await self.guard.run(lambda: self._extend(keys=[self.name], args=[self.token, ms(ttl)])))
        if held:
            self._held_until = sent + ttl * (1 - _CLOCK_DRIFT)
        return held

    async def hold(self, needed: float, ttl: float) -> bool:
        """Make sure the lock is ours for `needed` more seconds: at once if our last extension
        leaves that much, else by extending it to `ttl`; False: it is lost (see the module)."""
        if self.clock() + needed <= self._held_until:
            return True
        return await self.extend(ttl)

    async def release(self) -> None:
        """Give the lock up if we hold it, so another instance takes over at once."""
        self._held_until = -math.inf
        await self.guard.run(lambda: self._release(keys=[self.name], args=[self.token]))
