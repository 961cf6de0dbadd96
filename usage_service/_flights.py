"""Single flight: one read per key at a time, shared by every request that wants it.

The lookup of a token's record, the read of a token's spending and the read of a page of its
log each run as one task per key. Requests that want the same key wait on that task, shielded:
a request that stops waiting (its client went away, its deadline passed) does not cancel the
read the others wait on. A flight leaves the table when it lands, and can be detached earlier
(an invalidation: what it reads may predate the change), so that later requests start their own.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Coroutine
from typing import Any, Generic, TypeVar

K = TypeVar("K")
T = TypeVar("T")


class Flights(Generic[K, T]):
    """The running read of each key."""

    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Task[T]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def get(self, key: K) -> asyncio.Task[T] | None:
        """The read of `key` running now, if any, to wait on (shielded)."""
        return self._tasks.get(key)

    def start(self, key: K, read: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run `read` as the flight of `key`."""
        task = asyncio.create_task(read)
        self._tasks[key] = task
        task.add_done_callback(functools.partial(self._landed, key))
        return task

    def detach(self, key: K) -> None:
        """Let the running read of `key` finish for those who wait on it; later requests start their own."""
        self._tasks.pop(key, None)

    def flying(self, key: K) -> bool:
        """Whether the task running this is still the flight of `key` (not detached)."""
        return self._tasks.get(key) is asyncio.current_task()

    def _landed(self, key: K, task: asyncio.Task[T]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # retrieved here so an error nobody awaited is not reported as lost
