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
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

K = TypeVar("K")
T = TypeVar("T")

logger = logging.getLogger("usage_service.flights")


class Waiters:
    """Who waits on each shared read (a flight's task, a batch's futures), and whether anyone
    heard how it failed: a failure nobody heard is logged, unless it is `expected` (an outage
    its waiters would have handled), as `what` failing.

    Heard is decided by the outcome, not by the count: a waiter cancelled in the very pass of the
    loop in which the read fails is still counted when the read lands, and hears nothing. A
    batch fails all its futures with one error: heard by a waiter of any of them, it is heard."""

    def __init__(self, expected: tuple[type[BaseException], ...], what: str) -> None:
        self.expected = expected
        self.what = what
        self._counts: dict[asyncio.Future[Any], int] = {}
        self._heard: set[BaseException] = set()  # failures that reached a waiter still being waited on

    @contextmanager
    def on(self, *shared: asyncio.Future[Any]) -> Iterator[None]:
        """Count the caller among the waiters of `shared` while it waits."""
        for each in shared:
            self._counts[each] = self._counts.get(each, 0) + 1
        try:
            yield
        except BaseException as exc:
            if any(_failed_with(each) is exc for each in shared):
                self._heard.add(exc)  # the error the read failed with reached this waiter
            raise
        finally:
            for each in shared:
                left = self._counts.pop(each) - 1
                if left:
                    self._counts[each] = left
                elif (error := _failed_with(each)) is not None:
                    self._left(error)

    def landed(self, *shared: asyncio.Future[Any]) -> None:
        """Say that these futures are done (a batch's, with one error): a failure with nobody
        waiting is unheard at once; waiters say whether they heard it as they leave. Retrieves
        the error, so that asyncio does not report as lost an error the waiters handled."""
        errors = [error for each in shared if (error := _failed_with(each)) is not None]
        if errors and not any(each in self._counts for each in shared):
            self.unheard(errors[0])

    def _left(self, error: BaseException) -> None:
        """The last waiter of a future that failed with `error` has gone."""
        if any(_failed_with(each) is error for each in self._counts):
            return  # others still wait for it (a batch's other futures)
        if error in self._heard:
            self._heard.discard(error)
        else:
            self.unheard(error)

    def unheard(self, error: BaseException) -> None:
        if not isinstance(error, self.expected):
            logger.error("%s failed after every request waiting for it had gone", self.what, exc_info=error)


def _failed_with(shared: asyncio.Future[Any]) -> BaseException | None:
    return shared.exception() if shared.done() and not shared.cancelled() else None


class Flights(Generic[K, T]):
    """The running read of each key; `expected`: the errors its waiters handle (not logged)."""

    def __init__(self, expected: tuple[type[BaseException], ...], what: str) -> None:
        self._tasks: dict[K, asyncio.Task[T]] = {}
        self._waiters = Waiters(expected, what)

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
        self._waiters.landed(task)
