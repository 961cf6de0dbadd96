"""The batcher that coalesces concurrent lookups, and the single flights of reads."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import pytest

from usage_service._batch import Batcher
from usage_service._flights import Flights

pytestmark = pytest.mark.asyncio

# What the batchers' callers here handle: an outage, as each of the service's own handles its own.
HANDLED = {"expected": (ConnectionError,), "what": "a test read"}


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
    batcher: Batcher[int, str] = Batcher(source.load_many, max_batch=100, slots=1, **HANDLED)
    waiting = [asyncio.create_task(batcher.load(k)) for k in range(10)]
    await asyncio.sleep(0)
    source.release.set()
    assert await asyncio.gather(*waiting) == [f"v{k}" if k % 2 == 0 else None for k in range(10)]
    assert source.calls == [[0], list(range(1, 10))]


async def test_batches_are_bounded_and_waiting_keys_are_asked_once() -> None:
    source = Source()
    batcher: Batcher[int, str] = Batcher(source.load_many, max_batch=3, slots=1, **HANDLED)
    waiting = asyncio.gather(batcher.load(99), *(batcher.load(k % 7) for k in range(20)))
    await asyncio.sleep(0)
    source.release.set()
    await waiting
    assert source.calls[0] == [99]
    assert all(len(call) <= 3 for call in source.calls)
    assert sorted(k for call in source.calls[1:] for k in call) == list(range(7))


async def test_failure_reaches_every_waiter() -> None:
    source = Source(fail=True)
    batcher: Batcher[int, str] = Batcher(source.load_many, max_batch=10, slots=1, **HANDLED)
    waiting = [asyncio.create_task(batcher.load(k)) for k in range(3)]
    await asyncio.sleep(0)
    source.release.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_a_waiter_giving_up_does_not_cancel_the_others() -> None:
    source = Source()
    batcher: Batcher[int, str] = Batcher(source.load_many, max_batch=10, slots=1, **HANDLED)
    impatient = asyncio.create_task(batcher.load(2))
    patient = asyncio.create_task(batcher.load(2))
    await asyncio.sleep(0)
    impatient.cancel()
    source.release.set()
    assert await patient == "v2"


async def test_many_keys_go_out_with_the_others_waiting_and_a_failure_reaches_every_caller() -> None:
    source = Source()
    batcher: Batcher[int, str] = Batcher(source.load_many, max_batch=100, slots=1, **HANDLED)
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
    failing: Batcher[int, str] = Batcher(down.load_many, max_batch=100, slots=1, **HANDLED)
    with pytest.raises(RuntimeError, match="down"):
        await failing.load_many([1, 2])


async def fails_after_its_waiter_went(gone: asyncio.Task[str | None], release: asyncio.Event) -> None:
    """The read gets under way, its one waiter goes, then the read fails."""
    await settle()
    gone.cancel()
    await settle()
    release.set()
    await settle()


def unheard(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "a test read failed after every request waiting for it had gone" in r.message]


async def settle() -> None:
    """Let every task ready to run take its steps."""
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize("error", [RuntimeError("a defect"), ConnectionError("an outage")], ids=["defect", "outage"])
async def test_a_batch_that_fails_once_its_waiters_have_gone_is_logged_unless_they_would_have_handled_it(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    release = asyncio.Event()

    async def load_many(keys: Sequence[int]) -> dict[int, str]:
        await release.wait()
        raise error

    batcher: Batcher[int, str] = Batcher(load_many, max_batch=10, slots=1, **HANDLED)
    first = asyncio.create_task(batcher.load(0))  # takes the slot: the next two wait together
    await settle()
    gone = asyncio.create_task(batcher.load(1))
    heard = asyncio.create_task(batcher.load(2))
    await settle()
    gone.cancel()
    await settle()  # one of the batch's waiters has gone
    release.set()
    for waiter in (first, heard):
        with pytest.raises(type(error)):
            await waiter  # a waiter left: the error is its to handle, and nothing is logged
    assert not caplog.records

    release.clear()
    gone = asyncio.create_task(batcher.load(3))
    await fails_after_its_waiter_went(gone, release)
    logged = unheard(caplog)
    assert len(logged) == (1 if isinstance(error, RuntimeError) else 0)
    assert not logged or logged[0].exc_info[1] is error


@pytest.mark.parametrize("error", [RuntimeError("a defect"), ConnectionError("an outage")], ids=["defect", "outage"])
async def test_a_flight_that_fails_once_its_waiters_have_gone_is_logged_unless_they_would_have_handled_it(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    flights: Flights[str, str] = Flights((ConnectionError,), "a test read")
    release = asyncio.Event()

    async def read() -> str:
        await release.wait()
        raise error

    task = flights.start("k", read())
    gone = asyncio.create_task(flights.wait(task))
    heard = asyncio.create_task(flights.wait(task))
    await settle()  # the read is under way, its waiters waiting
    gone.cancel()
    await settle()  # and one has gone
    release.set()
    with pytest.raises(type(error)):
        await heard
    assert not caplog.records

    release.clear()
    task = flights.start("k", read())
    gone = asyncio.create_task(flights.wait(task))
    await fails_after_its_waiter_went(gone, release)
    logged = unheard(caplog)
    assert len(logged) == (1 if isinstance(error, RuntimeError) else 0)
    assert not logged or logged[0].exc_info[1] is error


async def test_a_waiter_cancelled_as_the_read_fails_leaves_the_failure_unheard_and_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The waiter's deadline passes in the very pass of the loop in which the read fails: it is
    still counted when the read lands, yet hears nothing; the failure is said as it leaves."""
    release = asyncio.Event()

    async def read() -> str:
        await release.wait()
        raise RuntimeError("a defect")

    async def load_many(keys: Sequence[int]) -> dict[int, str]:
        return {int(key): await read() for key in keys}

    flights: Flights[str, str] = Flights((ConnectionError,), "a test read")
    batcher: Batcher[int, str] = Batcher(load_many, max_batch=10, slots=1, **HANDLED)
    waiters = [asyncio.create_task(flights.wait(flights.start("k", read()))), asyncio.create_task(batcher.load(1))]
    await settle()
    release.set()  # the reads fail in the next pass...
    for waiter in waiters:
        asyncio.get_running_loop().call_soon(waiter.cancel)  # ...and their waiters are cancelled in it
    for waiter in waiters:
        with pytest.raises(asyncio.CancelledError):
            await waiter
    await settle()
    assert len(unheard(caplog)) == 2, caplog.records
