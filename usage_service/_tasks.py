"""Background tasks that outlive a failure: each runs under a supervisor that logs and restarts it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

logger = logging.getLogger("usage_service.tasks")

# Pause before the first restart, doubled after each failure up to the cap: a task that fails
# at once every time (a bug, a dependency gone) logs a few lines a minute, not thousands.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0


async def supervise(
    name: str,
    run: Callable[[], Awaitable[None]],
    backoff: float = FIRST_BACKOFF,
    max_backoff: float = MAX_BACKOFF,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Await `run()` until it returns; each time it raises, log why and start it again after a pause."""
    delay = backoff
    while True:
        started = clock()
        try:
            await run()
            return
        except Exception:  # any failure: the point is that no task dies silently
            # A task that ran well for a while before failing is restarted after the shortest pause.
            if clock() - started > max_backoff:
                delay = backoff
            logger.exception("background task %r failed; restarting it in %.1f s", name, delay)
        await sleep(delay)
        delay = min(delay * 2, max_backoff)


class BackgroundTasks:
    """The lifespan's background tasks: started supervised, stopped together within a grace period."""

    def __init__(self, backoff: float = FIRST_BACKOFF) -> None:
        self.backoff = backoff
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        self.tasks.append(asyncio.create_task(supervise(name, run, self.backoff), name=name))

    async def stop(self, grace: float) -> None:
        """Cancel every task and wait up to `grace` seconds for them to finish."""
        if not self.tasks:
            return
        for task in self.tasks:
            task.cancel()
        # Bounded: a client library that swallows a cancellation must not hang shutdown.
        _, stuck = await asyncio.wait(self.tasks, timeout=grace)
        if stuck:
            logger.warning("background tasks did not stop in time: %s", ", ".join(t.get_name() for t in stuck))
