"""An overloaded worker's Redis timeouts are its own: they fail the call, not Redis.

Under overload the event loop runs late: Redis has answered, but nobody reads the answer before
the timeout fires. Counted against Redis, three such timeouts open the circuit breaker, and then
every lookup goes to the gateway's database for the cooldown, when the worker is busiest. These
tests block a real worker's loop while real Redis calls are in flight (the answers arrive and
wait, unread), and hold a real Redis silent behind a proxy while the loop keeps time.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio
from support import RedisServer
from tcpproxy import TCPProxy

from usage_service._circuit import CircuitBreaker
from usage_service._redis_guard import RedisGuard, RedisUnavailable
from usage_service.looplag import FLOOR, LoopLag

TIMEOUT = 0.1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_loop_lag_keeps_the_worst_lateness_for_its_window() -> None:
    clock = Clock()
    lag = LoopLag(window=1.0, clock=clock)
    assert lag.recent() == 0.0
    lag.note(FLOOR / 2, clock.now)  # jitter: not kept
    assert lag.recent() == 0.0
    lag.note(0.30, clock.now)
    clock.now += 0.5
    lag.note(0.10, clock.now)
    assert lag.recent() == pytest.approx(0.30)
    clock.now += 0.6  # the 300 ms look is past the window; the 100 ms one is not
    assert lag.recent() == pytest.approx(0.10)
    clock.now += 0.5
    assert lag.recent() == 0.0


async def test_loop_lag_sees_a_blocked_loop() -> None:
    lag = LoopLag(interval=0.01)
    task = asyncio.create_task(lag.run())
    try:
        await asyncio.sleep(0.05)
        assert lag.recent() < 0.2
        time.sleep(0.3)  # the loop is busy: nothing else runs
        await asyncio.sleep(0.05)  # the look that was due during it comes in late
        assert lag.recent() >= 0.2
    finally:
        task.cancel()


async def _in_flight_while_blocked(guard: RedisGuard, client: redis.asyncio.Redis, block: float) -> list[object]:
    """Send a few GETs, block the loop past their timeout while their answers arrive, and
    return what each call gave."""
    calls = [asyncio.create_task(guard.run(lambda: client.get("k"))) for _ in range(5)]
    await asyncio.sleep(0)  # each sends its command
    await asyncio.sleep(0)
    time.sleep(block)  # Redis answers meanwhile; nobody reads it before the timeouts fire
    return await asyncio.gather(*calls, return_exceptions=True)


async def test_timeouts_while_the_worker_was_overloaded_do_not_open_the_breaker(redis_server: RedisServer) -> None:
    client = redis.asyncio.Redis.from_url(redis_server.url)
    guard = RedisGuard(client, timeout=TIMEOUT, breaker=CircuitBreaker(3, 60.0), lag=LoopLag())
    try:
        await guard.run(client.ping)  # connected: the calls below only wait for their answers
        timed_out = 0
        for _ in range(4):  # more than the breaker's threshold, in a row
            results = await _in_flight_while_blocked(guard, client, 4 * TIMEOUT)
            timed_out += sum(isinstance(r, RedisUnavailable) for r in results)
        assert timed_out >= 3  # the overload did cost those calls...
        assert guard.overloaded == timed_out  # ...counted as the worker's, not Redis's
        assert not guard.breaker.is_open
        assert await guard.run(lambda: client.get("k")) is None  # Redis still in use
    finally:
        await client.aclose()


async def test_a_timeout_that_fired_late_is_the_overload_even_without_a_lag_reading(redis_server: RedisServer) -> None:
    """Without a LoopLag, only the timeout's own lateness is left to tell, and a loop blocked
    past the deadline shows it too."""
    client = redis.asyncio.Redis.from_url(redis_server.url)
    guard = RedisGuard(client, timeout=TIMEOUT, breaker=CircuitBreaker(3, 60.0))
    try:
        await guard.run(client.ping)
        for _ in range(4):
            await _in_flight_while_blocked(guard, client, 4 * TIMEOUT)
        # The timeouts fired late by the block: still the worker's overload.
        assert not guard.breaker.is_open
        assert guard.overloaded >= 3
    finally:
        await client.aclose()


async def test_a_silent_redis_still_opens_the_breaker_while_the_loop_keeps_time(redis_server: RedisServer) -> None:
    with TCPProxy(("127.0.0.1", redis_server.port)) as proxy:
        client = redis.asyncio.Redis.from_url(proxy.url)
        lag = LoopLag(interval=0.01)
        sampler = asyncio.create_task(lag.run())
        guard = RedisGuard(client, timeout=TIMEOUT, breaker=CircuitBreaker(3, 60.0), lag=lag)
        try:
            await guard.run(client.ping)
            proxy.black_hole()
            for _ in range(3):
                with pytest.raises(RedisUnavailable):
                    await guard.run(lambda: client.get("k"))
            assert guard.breaker.is_open
            assert guard.overloaded == 0
            with pytest.raises(RedisUnavailable, match="circuit open"):
                await guard.run(lambda: client.get("k"))
        finally:
            sampler.cancel()
            await client.aclose()


async def test_a_silent_redis_during_an_overload_is_still_found_out_once_the_loop_keeps_time(
    redis_server: RedisServer,
) -> None:
    """Excusing timeouts while the loop runs late only delays the breaker: once the worker
    keeps time again, a Redis that does not answer opens it as before."""
    clock = Clock()
    lag = LoopLag(window=1.0, clock=clock)
    with TCPProxy(("127.0.0.1", redis_server.port)) as proxy:
        client = redis.asyncio.Redis.from_url(proxy.url)
        guard = RedisGuard(client, timeout=TIMEOUT, breaker=CircuitBreaker(3, 60.0), lag=lag)
        try:
            await guard.run(client.ping)
            proxy.black_hole()
            lag.note(1.0, clock.now)  # the loop ran a second late just now
            for _ in range(3):
                with pytest.raises(RedisUnavailable, match="overloaded"):
                    await guard.run(lambda: client.get("k"))
            assert not guard.breaker.is_open and guard.overloaded == 3
            clock.now += 2.0  # the loop has kept time for a while
            for _ in range(3):
                with pytest.raises(RedisUnavailable):
                    await guard.run(lambda: client.get("k"))
            assert guard.breaker.is_open
        finally:
            await client.aclose()
