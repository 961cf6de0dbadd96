"""Everything the service keeps in Redis: one small object per concern, over one guarded client.

The keys, all under USAGE_REDIS_PREFIX:

    tok:<digest hex>    a token's record              RedisRecords         (cache.py)
    hot                 the tokens polled lately      HotSet               (hotset.py)
    leader              the refresher's leader lock   LeaderLock           (leadership.py)
    invalidate:v2       the invalidation channel      InvalidationChannel  (invalidation.py)
    authfail:<address>  failed authentications        FailureCounter       (failure_counter.py)
    hist:day:<id>:<day> a token's closed day of spending  RedisDays            (history_cache.py)
    hist:tail:<id>      a polled token's open days        RedisTails           (history_cache.py)
    hist:hot            tokens whose history was polled   HistoryHot           (history_cache.py)

Each is used alone by its owner (the lookup, the refresher, the listener, the limiter); all go
through one RedisGuard (_redis_guard.py): one breaker, one timeout, one error count.
"""

from __future__ import annotations

from ._redis_guard import RedisGuard
from .cache import RedisRecords
from .failure_counter import FailureCounter
from .history_cache import HistoryHot, RedisDays, RedisTails
from .hotset import HotSet
from .invalidation import InvalidationChannel
from .leadership import LeaderLock


class SharedRedis:
    def __init__(self, guard: RedisGuard, *, prefix: str) -> None:
        self.guard = guard
        self.records = RedisRecords(guard, prefix=prefix + "tok:", requested_key=prefix + "requested")
        self.hot_set = HotSet(guard, key=prefix + "hot")
        self.channel = InvalidationChannel(guard, name=prefix + "invalidate:v2")
        self.failures = FailureCounter(guard, prefix=prefix + "authfail:")
        self.leader_key = prefix + "leader"
        self.history_days = RedisDays(guard, prefix=prefix + "hist:day:")
        self.history_tails = RedisTails(guard, prefix=prefix + "hist:tail:")
        self.history_hot = HistoryHot(guard, key=prefix + "hist:hot")

    def leader_lock(self) -> LeaderLock:
        """A handle on the leader lock with a token of its own (like redis-py's `Redis.lock`)."""
        return LeaderLock(self.guard, name=self.leader_key)

    async def ping(self) -> bool:
        """Say whether Redis answers now (bypasses the breaker: this is what readiness reports)."""
        return await self.guard.ping()

    async def close(self) -> None:
        """Refuse new calls, let the write in flight finish, then close the client."""
        self.guard.closed = True  # a straggler must not open a connection after close()
        await self.records.close()
        await self.guard.aclose()
