"""Background tasks are supervised: one that dies is logged and restarted, not silently lost."""

from __future__ import annotations

import asyncio
import logging

import pytest
from conftest import AppClient
from support import Gateway

from usage_service._tasks import BackgroundTasks

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
