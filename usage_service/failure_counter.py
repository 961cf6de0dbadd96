"""The failed-authentication limiter's counts in Redis, shared by every worker and instance.

One key per client address, `<prefix>authfail:<address>`, counting failures in a window that
the first failure opens (the key's expiry). Only the address is stored, never a credential.
"""

from __future__ import annotations

from collections.abc import Mapping

from ._redis_guard import RedisGuard, ScriptCall, ms

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


class FailureCounter:
    def __init__(self, guard: RedisGuard, *, prefix: str) -> None:
        self.guard = guard
        self.prefix = prefix
        self._count = guard.script(_COUNT_FAILURE_SCRIPT)

    async def add(self, failures: Mapping[str, int], window: float) -> dict[str, tuple[int, float]]:
        """Add failures per bucket (a client address); return {bucket: (failures, seconds left in its window)}.

        One script call per bucket, each on its own key (Cluster routes each by its slot), in one
        pipeline: one round trip for a burst.
        """
        calls: list[ScriptCall] = [([self.prefix + bucket], [ms(window), n]) for bucket, n in failures.items()]
        replies = await self.guard.run(lambda: self.guard.eval_each(self._count, calls))
        return {bucket: (int(n), int(ttl) / 1000) for bucket, (n, ttl) in zip(failures, replies, strict=True)}
