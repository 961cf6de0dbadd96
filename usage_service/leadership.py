"""The refresher's leader lock: one instance at a time re-reads the hot set.

Modelled on redis-py's `Lock`: a key `<prefix>leader` holding the holder's random token, with an
expiry; every change to it checks the token first, in a script, so an instance only ever
extends or releases a lock it still holds.

When the lock is lost (it expired while the holder was stalled, and maybe another instance took
it), `extend` says so and the holder must stop acting as leader at once: write and publish
nothing more of the round under way, and forget what it saw as leader. What it may still have in
flight is harmless: every record write is only-if-newer (see `RedisRecords`).
"""

from __future__ import annotations

import enum
import uuid

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

    def __init__(self, guard: RedisGuard, *, name: str) -> None:
        self.guard = guard
        self.name = name
        self.token = uuid.uuid4().hex
        self._lead = guard.script(_LEAD_SCRIPT)
        self._extend = guard.script(_EXTEND_SCRIPT)
        self._release = guard.script(_RELEASE_SCRIPT)

    async def lead(self, ttl: float) -> Leadership:
        """Take the lock if it is free, or extend it if we hold it, for `ttl` seconds."""
        held = await self.guard.run(lambda: self._lead(keys=[self.name], args=[self.token, ms(ttl)]))
        return Leadership(int(held))

    async def extend(self, ttl: float) -> bool:
        """Extend the lock to `ttl` seconds if we still hold it; False: it is lost (see the module)."""
        held = await self.guard.run(lambda: self._extend(keys=[self.name], args=[self.token, ms(ttl)]))
        return bool(held)

    async def release(self) -> None:
        """Give the lock up if we hold it, so another instance takes over at once."""
        await self.guard.run(lambda: self._release(keys=[self.name], args=[self.token]))
