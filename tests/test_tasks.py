"""Background tasks are supervised: one that dies is logged and restarted, not silently lost."""

from __future__ import annotations

import asyncio
import logging

import pytest
from conftest import AppClient
from support import Gateway

from usage_service._tasks import BackgroundTasks, supervise

pytestmark = pytest.mark.asyncio


async def test_a_task_that_dies_is_logged_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    runs = 0
    restarted = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("injected failure")
        restarted.set()
        await asyncio.Event().wait()  # runs until cancelled

    tasks = BackgroundTasks(backoff=0.0)
    with caplog.at_level(logging.ERROR, logger="usage_service.tasks"):
        tasks.start("flaky", flaky)
        await asyncio.wait_for(restarted.wait(), timeout=10)
    await tasks.stop(grace=1.0)
    assert runs == 2
    assert "'flaky' failed" in caplog.text and "injected failure" in caplog.text
    assert all(task.done() for task in tasks.tasks)


async def test_restarts_pause_twice_as_long_each_time_up_to_the_cap_and_anew_after_a_long_run() -> None:
    """0.5 s, then doubled after each failure up to 30 s; a run longer than the cap before it
    failed starts the pauses over. (Clock and sleep injected: no time passes.)"""
    now = 0.0
    pauses: list[float] = []
    run_lengths = iter([0.0] * 8 + [31.0, 0.0])  # eight quick failures, a long run, one more

    async def sleep(seconds: float) -> None:
        nonlocal now
        pauses.append(seconds)
        now += seconds

    async def failing() -> None:
        nonlocal now
        length = next(run_lengths, None)
        if length is None:
            return  # done: the supervisor returns
        now += length
        raise RuntimeError("injected failure")

    await supervise("failing", failing, clock=lambda: now, sleep=sleep)
    assert pauses == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 0.5, 1.0]


async def test_a_task_that_returns_is_not_restarted() -> None:
    runs = 0

    async def once() -> None:
        nonlocal runs
        runs += 1

    tasks = BackgroundTasks(backoff=0.0)
    tasks.start("once", once)
    await asyncio.wait(tasks.tasks, timeout=10)
    assert runs == 1 and tasks.tasks[0].done()


async def test_the_lifespan_restarts_a_task_killed_by_an_unexpected_error(
    gateway: Gateway, app_client: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    async with app_client(options_interval=0.01) as (app, _):
        store = app.state.store
        real = store.fetch_options
        calls = 0
        read_again = asyncio.Event()

        async def fails_once(keys: object) -> object:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("injected failure")
            read_again.set()
            return await real(keys)

        with caplog.at_level(logging.ERROR, logger="usage_service.tasks"):
            store.fetch_options = fails_once
            await asyncio.wait_for(read_again.wait(), timeout=10)
    assert "'options' failed" in caplog.text and "injected failure" in caplog.text


async def test_a_round_whose_halves_both_fail_raises_the_first_and_logs_a_defect_of_the_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A round's two halves run side by side: when the first fails, the second is cancelled and
    the first's error raised; a defect of the second is logged, never swallowed."""
    from usage_service.refresh import _side_by_side
    from usage_service.store import StoreUnavailable

    second_started = asyncio.Event()

    async def first() -> None:
        await second_started.wait()
        raise StoreUnavailable("injected")

    async def defective() -> None:
        second_started.set()
        try:
            await asyncio.Event().wait()
        finally:
            raise ValueError("a defect in the second half")  # noqa: B012 - what a defect looks like

    async def expected_outage() -> None:
        second_started.set()
        await asyncio.Event().wait()

    with caplog.at_level(logging.ERROR, logger="usage_service.refresh"):
        with pytest.raises(StoreUnavailable):
            await _side_by_side(first(), defective())
        assert [r.message for r in caplog.records] == ["the round's other half failed as well"]
        caplog.clear()
        second_started.clear()
        with pytest.raises(StoreUnavailable):
            await _side_by_side(first(), expected_outage())  # cancelled as it should be: nothing said
        assert caplog.records == []
