"""Per-token budgets: how much of a costly kind of work a worker does for one token.

A key holder may ask for as many distinct parameter sets as they like; where each costs a read
of the gateway's log or a computation over a range of days, a budget per token (a token bucket
by token id) bounds what one key can make a worker do. Answers served again cost nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

# How many tokens a budget remembers: past it, those whose budget is whole again go.
BUDGETS_KEPT = 10_000

# The history's and the dated billing route's answer past a token's budget of days summed anew.
TOO_MANY_DAYS = "too many new date ranges for this token, retry later"


class Spent(Exception):
    """The token's budget is spent for now; `retry_after` seconds until enough is back."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after

    @property
    def header(self) -> tuple[bytes, bytes]:
        """Retry-After, in whole seconds (at least 1)."""
        return (b"retry-after", str(max(1, math.ceil(self.retry_after))).encode())


class TokenBudget:
    """`rate` units of work a second per token, after a burst of `burst`."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst = rate, burst
        self._clock = clock
        self._left: dict[int, tuple[float, float]] = {}  # token id -> (units left, as of when)

    def spend(self, token_id: int, cost: float = 1.0) -> None:
        """Take `cost` units (at most a whole burst) of the token's budget, or raise Spent."""
        cost = min(cost, self.burst)
        now = self._clock()
        left, then = self._left.get(token_id, (self.burst, now))
        left = min(self.burst, left + (now - then) * self.rate)
        if left < cost:
            raise Spent((cost - left) / self.rate)
        if len(self._left) >= BUDGETS_KEPT and token_id not in self._left:
            self._forget_whole(now)
        self._left[token_id] = (left - cost, now)

    def _forget_whole(self, now: float) -> None:
        whole = self.burst / self.rate  # seconds for an empty budget to be whole again
        self._left = {t: held for t, held in self._left.items() if now - held[1] < whole}
        if len(self._left) >= BUDGETS_KEPT:  # all spent lately: the oldest half go
            self._left = dict(sorted(self._left.items(), key=lambda item: item[1][1])[BUDGETS_KEPT // 2 :])


def per_second(rate: int) -> TokenBudget | None:
    """The budget a setting names: `rate` units a second, after a burst of four times as many;
    None for 0 (no budget)."""
    return TokenBudget(rate, burst=4 * rate) if rate else None
