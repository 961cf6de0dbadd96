"""How late this worker's event loop runs: the sign that the worker itself is overloaded.

A call that times out while the loop runs late may have had its answer waiting all along: the
worker was too busy to read it. Such a timeout says nothing about the dependency. Counted
against Redis, a few of them open the circuit breaker, and then every lookup goes to the
gateway's database exactly when the worker is busiest (RedisGuard).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

# Seconds between looks at the loop.
SAMPLE_INTERVAL = 0.05

# Seconds a late look counts for.
WINDOW = 1.0

# Lateness below this (seconds) is the loop's ordinary jitter, not kept.
FLOOR = 0.005


class LoopLag:
    """The worst lateness of the event loop within the last WINDOW seconds.

    `run` sleeps SAMPLE_INTERVAL at a time and notes how much later than asked it woke up: a
    loop busy for 300 ms shows a look 300 ms late. Callers read `recent()`.
    """

    def __init__(
        self, *, interval: float = SAMPLE_INTERVAL, window: float = WINDOW, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self.window = window
        self.clock = clock
        self._late: deque[tuple[float, float]] = deque()  # (noted at, seconds late), oldest first

    def note(self, late: float, now: float) -> None:
        """Take one look's lateness, seen at `now`."""
        if late >= FLOOR:
            self._late.append((now, late))
        while self._late and self._late[0][0] < now - self.window:
            self._late.popleft()

    def recent(self) -> float:
        """Seconds the loop ran late at worst within the last window (0.0 when it kept time)."""
        since = self.clock() - self.window
        return max((late for at, late in self._late if at >= since), default=0.0)

    async def run(self) -> None:
        """Look every `interval` until cancelled."""
        while True:
            asked = self.clock() + self.interval
            await asyncio.sleep(self.interval)
            now = self.clock()
            self.note(max(0.0, now - asked), now)
