"""Coalesce concurrent lookups into batched calls.

A lookup that finds a free slot goes out at once, alone: no added latency when traffic is
light. Lookups that arrive while every slot is busy wait together and go out as one batch
when a slot frees up, so a burst of misses costs a few round trips instead of one each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from typing import Generic, TypeVar

from ._flights import Waiters

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Batcher(Generic[K, V]):
    def __init__(
        self,
        load_many: Callable[[Sequence[K]], Awaitable[Mapping[K, V]]],
        *,
        max_batch: int,
        slots: int,
        expected: tuple[type[BaseException], ...],
        what: str,
    ) -> None:
        """`expected`: the errors of `load_many` its callers handle (an outage); any other that
        fails a batch nobody waits for any more is logged, as `what` failing."""
        self._load_many = load_many
        self._waiters = Waiters(expected, what)
        self.max_batch = max_batch
        self.slots = slots
        self._busy = 0
        self._pending: dict[K, asyncio.Future[V | None]] = {}
        # The batches running: the event loop holds its tasks only weakly.
        self._running: set[asyncio.Task[None]] = set()
        self.batches = 0  # calls made (what the tests count batching by)

    async def load(self, key: K) -> V | None:
        """Return the value for `key` (None when `load_many` did not return it)."""
        future = self._pending.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._pending[key] = future
            self._dispatch()
        # Shielded: one caller giving up must not cancel the answer others wait on.
        with self._waiters.on(future):
            return await asyncio.shield(future)

    async def load_many(self, keys: Sequence[K]) -> dict[K, V]:
        """The values of many keys, those `load_many` returned, batched like `load`'s."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[V | None]] = []
        for key in keys:
            future = self._pending.get(key)
            if future is None:
                future = self._pending[key] = loop.create_future()
            futures.append(future)
        self._dispatch()
        # Shielded, as in `load`: the futures may be other callers' too.
        with self._waiters.on(*futures):
            values = await asyncio.shield(asyncio.gather(*futures))
        return {key: value for key, value in zip(keys, values, strict=True) if value is not None}

    def _dispatch(self) -> None:
        while self._pending and self._busy < self.slots:
            keys = list(self._pending)[: self.max_batch]
            batch = {key: self._pending.pop(key) for key in keys}
            self._busy += 1
            self.batches += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: dict[K, asyncio.Future[V | None]]) -> None:
        try:
            values = await self._load_many(list(batch))
        except asyncio.CancelledError:
            for future in batch.values():
                future.cancel()
            raise
        except Exception as exc:
            # Broad on purpose: not handled here but handed on, whatever it is, to every caller
            # waiting on this batch, as if each had made the call itself.
            failed = [future for future in batch.values() if not future.done()]
            for future in failed:
                future.set_exception(exc)
            self._waiters.landed(*failed)
        else:
            for key, future in batch.items():
                if not future.done():
                    future.set_result(values.get(key))
        finally:
            self._busy -= 1
            self._dispatch()
