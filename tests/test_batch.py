"""The batcher that coalesces concurrent lookups."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from usage_service._batch import Batcher

pytestmark = pytest.mark.asyncio


class Source:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[int]] = []
        self.fail = fail
        self.release = asyncio.Event()

    async def load_many(self, keys: Sequence[int]) -> dict[int, str]:
        self.calls.append(list(keys))
        await self.release.wait()
        if self.fail:
            raise RuntimeError("down")
        return {k: f"v{k}" for k in keys if k % 2 == 0}


async def test_first_goes_alone_the_rest_wait_together() -> None:
    source = Source()
    batcher: Batcher[int, str] = Batcher(source.load_many, max_batch=100, slots=1)
    waiting = [asyncio.create_task(batcher.load(k)) for k in range(10)]
    await asyncio.sleep(0)
    source.release.set()
    assert await asyncio.gather(*waiting) == [f"v{k}" if k % 2 == 0 else None for k in range(10)]
    assert source.calls == [[0], list(range(1, 10))]


async def test_batches_are_bounded_and_waiting_keys_are_asked_once() -> None:
    source = Source()
    batcher: Batcher[int, str] = Batcher(source.load_many, max_batch=3, slots=1)
    waiting = asyncio.gather(batcher.load(99), *(batcher.load(k % 7) for k in range(20)))
    await asyncio.sleep(0)
    source.release.set()
    await waiting
    assert source.calls[0] == [99]
    assert all(len(call) <= 3 for call in source.calls)
    assert sorted(k for call in source.calls[1:] for k in call) == list(range(7))


async def test_failure_reaches_every_waiter() -> None:
    source = Source(fail=True)
    batcher: Batcher[int, str] = Batcher(source.load_many, max_batch=10, slots=1)
    waiting = [asyncio.create_task(batcher.load(k)) for k in range(3)]
    await asyncio.sleep(0)
    source.release.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_a_waiter_giving_up_does_not_cancel_the_others() -> None:
    source = Source()
    batcher: Batcher[int, str] = Batcher(source.load_many, max_batch=10, slots=1)
    impatient = asyncio.create_task(batcher.load(2))
    patient = asyncio.create_task(batcher.load(2))
    await asyncio.sleep(0)
    impatient.cancel()
    source.release.set()
    assert await patient == "v2"


async def test_many_keys_go_out_with_the_others_waiting_and_a_failure_reaches_every_caller() -> None:
    source = Source()
    batcher: Batcher[int, str] = Batcher(source.load_many, max_batch=100, slots=1)
    first = asyncio.create_task(batcher.load(0))  # takes the slot
    await asyncio.sleep(0)
    one = asyncio.create_task(batcher.load(3))
    many = asyncio.create_task(batcher.load_many([2, 3, 4, 5]))
    await asyncio.sleep(0)
    source.release.set()
    assert await many == {2: "v2", 4: "v4"}  # what the source did not return is left out
    assert await one is None and await first == "v0"
    assert source.calls == [[0], [3, 2, 4, 5]]  # 3 asked for once, for both callers

    down = Source(fail=True)
    down.release.set()
    failing: Batcher[int, str] = Batcher(down.load_many, max_batch=100, slots=1)
    with pytest.raises(RuntimeError, match="down"):
        await failing.load_many([1, 2])
