"""Single flight: one read per key at a time, shared by every request that wants it.

The lookup of a token's record, the read of a token's spending and the read of a page of its
log each run as one task per key. Requests that want the same key wait on that task, shielded:
a request that stops waiting (its client went away, its deadline passed) does not cancel the
read the others wait on. A flight leaves the table when it lands, and can be detached earlier
(an invalidation: what it reads may predate the change), so that later requests start their own.
A flight that fails once all its waiters have gone is logged, unless its error is one of those
the waiters would have handled (an outage): a defect is never lost for want of someone to hear it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

K = TypeVar("K")
T = TypeVar("T")

logger = logging.getLogger("usage_service.flights")


class Waiters:
    """How many callers wait on each shared awaitable (a flight's task, a batch's future)."""

    def __init__(self) -> None:
        self._counts: dict[Awaitable[Any], int] = {}

    @contextmanager
    def on(self, *shared: Awaitable[Any]) -> Iterator[None]:
        """Count the caller among the waiters of `shared` while it waits."""
        for each in shared:
            self._counts[each] = self._counts.get(each, 0) + 1
        try:
            yield
        finally:
            for each in shared:
                left = self._counts.pop(each) - 1
                if left:
                    self._counts[each] = left

    def any(self, shared: Awaitable[Any]) -> bool:
        return shared in self._counts


def unheard(error: BaseException, expected: tuple[type[BaseException], ...], what: str) -> None:
    """Log `error`, which failed `what` once nobody waited for it, unless it is `expected`."""
    if not isinstance(error, expected):
        logger.error("%s failed after every request waiting for it had gone", what, exc_info=error)


class Flights(Generic[K, T]):
    """The running read of each key; `expected`: the errors its waiters handle (not logged)."""

    def __init__(self, expected: tuple[type[BaseException], ...], what: str) -> None:
        self._tasks: dict[K, asyncio.Task[T]] = {}
        self._waiters = Waiters()
        self._expected = expected
        self._what = what

    def __len__(self) -> int:
        return len(self._tasks)

    def get(self, key: K) -> asyncio.Task[T] | None:
        """The read of `key` running now, if any, to `wait` on."""
        return self._tasks.get(key)

    def start(self, key: K, read: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run `read` as the flight of `key`."""
        task = asyncio.create_task(read)
        self._tasks[key] = task
        task.add_done_callback(functools.partial(self._landed, key))
        return task

    async def wait(self, task: asyncio.Task[T]) -> T:
        """Wait for a flight, shielded: a caller that stops waiting does not cancel it."""
        with self._waiters.on(task):
            return await asyncio.shield(task)

    def detach(self, key: K) -> None:
        """Let the running read of `key` finish for those who wait on it; later requests start their own."""
        self._tasks.pop(key, None)

    def flying(self, key: K) -> bool:
        """Whether the task running this is still the flight of `key` (not detached)."""
        return self._tasks.get(key) is asyncio.current_task()

    def _landed(self, key: K, task: asyncio.Task[T]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if task.cancelled():
            return
        # Retrieved here, so that asyncio does not report an error its waiters handled as lost.
        error = task.exception()
        if error is not None and not self._waiters.any(task):
            unheard(error, self._expected, self._what)
