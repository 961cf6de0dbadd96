"""Faults injected for real, in process: the database locked while records are stale, Redis
slow or black-holed behind a proxy we control."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis
from conftest import AppClient
from support import Gateway, RedisServer, Token, sample_value
from tcpproxy import TCPProxy

import usage_service.app
from usage_service.app import create_app
from usage_service.config import Settings
from usage_service.store import STATEMENT_GUARD, StoreNotReady

URL = "/api/usage/token"


async def used(client: httpx.AsyncClient, token: Token) -> int:
    response = await client.get(URL, headers=token.bearer)
    assert response.status_code == 200, response.text
    return int(response.json()["data"]["total_used"])


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503
    assert response.json() == {"success": False, "message": "database unavailable, retry later"}
    assert response.headers["retry-after"] == "1"


async def test_stale_in_process_record_is_served_while_the_database_is_locked(
    gateway: Gateway, app_client: AppClient
) -> None:
    cached, never = gateway.add_token(used=4), gateway.add_token()
    async with app_client(cache_ttl=0.1, local_ttl=0.1, refresh_interval=0) as (app, client):
        assert await used(client, cached) == 4
        served_before = sample_value((await client.get("/metrics")).text, "usage_stale_served_total")
        await asyncio.sleep(0.2)  # past its freshness
        with gateway.exclusive_lock():
            assert await used(client, cached) == 4
            assert_unavailable(await client.get(URL, headers=never.bearer))
            metrics = (await client.get("/metrics")).text
        stats = app.state.lookup.stats
        assert stats.stale_served == 1
        assert sample_value(metrics, "usage_stale_served_total") == served_before + 1
        gateway.charge(cached, 1)
        assert await used(client, cached) == 5  # the database answers again: fresh records
        assert stats.stale_served == 1


async def test_stale_redis_record_is_served_while_the_database_is_locked(
    gateway: Gateway, app_client: AppClient, redis_url: str
) -> None:
    token = gateway.add_token(used=9)
    fast = {"redis_url": redis_url, "cache_ttl": 0.1, "local_ttl": 0.1, "refresh_interval": 0}
    async with app_client(**fast) as (_, first):
        assert await used(first, token) == 9
        await asyncio.sleep(0.3)  # written behind the answer, then past its freshness
    async with app_client(**fast) as (second, client):  # a worker that never saw the token
        with gateway.exclusive_lock():
            assert await used(client, token) == 9
            assert await used(client, token) == 9
        assert second.state.lookup.stats.stale_served == 2


async def test_stale_if_error_is_bounded(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client(cache_ttl=0.1, local_ttl=0.1, refresh_interval=0, stale_if_error=0.2) as (app, client):
        await used(client, token)
        await asyncio.sleep(0.4)  # expired 0.3 s ago, more than USAGE_STALE_IF_ERROR
        with gateway.exclusive_lock():
            assert_unavailable(await client.get(URL, headers=token.bearer))
        assert app.state.lookup.stats.stale_served == 0


async def test_locked_database_misses_wait_at_most_the_busy_timeout(gateway: Gateway, app_client: AppClient) -> None:
    """However many misses queue for the pool's connections: the first ones wait out the busy
    timeout, and those queued behind them give up with them, not a busy timeout later."""
    tokens = [gateway.add_token() for _ in range(6)]
    async with app_client(db_timeout=1.5, db_pool_size=1) as (_, client):
        with gateway.exclusive_lock():
            started = time.monotonic()
            responses = await asyncio.gather(*(client.get(URL, headers=t.bearer) for t in tokens))
            waited = time.monotonic() - started
        for response in responses:
            assert_unavailable(response)
        # The busy timeout plus the stores' one-second guard, with room for a loaded machine
        # (queued behind the first statement, the others waited two busy timeouts: 3 s).
        assert waited < 1.5 + STATEMENT_GUARD + 0.4


async def test_a_worker_starting_while_the_database_is_locked_waits_for_it(
    gateway: Gateway, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that started during a migration's lock (a replacement for one that died) failed
    its start-up, and uvicorn then stopped the whole service, healthy workers included, with
    exit status 0. It now tries again, for up to START_PATIENCE seconds."""
    token = gateway.add_token(used=3)
    app = create_app(dataclasses.replace(settings, db_timeout=0.2))
    caplog.set_level(logging.WARNING, logger="usage_service")
    async with contextlib.AsyncExitStack() as stack:
        with gateway.exclusive_lock():
            starting = asyncio.ensure_future(stack.enter_async_context(app.router.lifespan_context(app)))
            await until(lambda: any("trying again" in r.getMessage() for r in caplog.records))
            assert not starting.done()
        await asyncio.wait_for(starting, timeout=10)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            assert await used(client, token) == 3
    said = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
    assert said[0].startswith("SQLITE_PATH: cannot read") and "locked" in said[0]


async def test_a_worker_stops_trying_after_start_patience(
    gateway: Gateway, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(usage_service.app, "START_PATIENCE", 0.5)
    app = create_app(dataclasses.replace(settings, db_timeout=0.2))
    with gateway.exclusive_lock(), pytest.raises(StoreNotReady, match="locked"):
        async with app.router.lifespan_context(app):
            pass


async def test_a_worker_trying_its_database_again_stops_trying_on_sigterm(
    gateway: Gateway, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The server acts on SIGTERM only once start-up is over: a worker still trying its database
    held up the stop by up to START_PATIENCE. Its start-up now fails at the signal, and the
    server's own handler is still called (and put back afterwards)."""
    heard: list[int] = []

    def the_servers(signum: int, frame: object) -> None:
        heard.append(signum)

    previous = signal.signal(signal.SIGTERM, the_servers)
    app = create_app(dataclasses.replace(settings, db_timeout=0.2))
    caplog.set_level(logging.WARNING, logger="usage_service")
    try:
        with gateway.exclusive_lock():
            starting = asyncio.ensure_future(app.router.lifespan_context(app).__aenter__())
            await until(lambda: any("trying again" in r.getMessage() for r in caplog.records))
            signal.raise_signal(signal.SIGTERM)
            with pytest.raises(StoreNotReady, match="locked"):
                await asyncio.wait_for(starting, timeout=5)
        assert heard == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is the_servers  # put back
    finally:
        signal.signal(signal.SIGTERM, previous)


async def until(condition: Callable[[], object], within: float = 10.0) -> None:
    """Wait for a condition another task brings about (never for time itself to pass)."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come about"
        await asyncio.sleep(0.01)


@pytest.fixture
def proxied_redis(redis_server: RedisServer, redis_url: str) -> Iterator[TCPProxy]:
    with TCPProxy(("127.0.0.1", redis_server.port)) as proxy:
        yield proxy


@pytest.mark.parametrize("fault", ["black-hole", "slow"])
async def test_redis_slow_or_black_holed(
    gateway: Gateway, app_client: AppClient, proxied_redis: TCPProxy, redis_client: redis.Redis, fault: str
) -> None:
    """No request waits longer than the Redis timeout (plus the database read); the circuit opens
    and closes again when Redis answers."""
    tokens = [gateway.add_token(used=i) for i in range(20)]
    timeout = 0.2
    # Every request asks Redis: no in-process layer, no refresher keeping records there.
    overrides = {"redis_url": proxied_redis.url, "redis_timeout": timeout, "redis_cooldown": 0.5}
    overrides |= {"local_ttl": 0, "refresh_interval": 0}
    async with app_client(**overrides) as (app, client):
        for i, token in enumerate(tokens):
            assert await used(client, token) == i
        breaker = app.state.redis.guard.breaker
        if fault == "black-hole":
            proxied_redis.black_hole()
        else:
            proxied_redis.delay(timeout * 3)
        slowest = 0.0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            for i, token in enumerate(tokens):
                started = time.monotonic()
                assert await used(client, token) == i
                slowest = max(slowest, time.monotonic() - started)
        assert breaker.state in ("open", "half-open")
        # One Redis read bounded by the timeout, then the database; generous for a loaded machine.
        assert slowest < timeout + 0.8, f"a request waited {slowest:.2f}s"

        proxied_redis.heal()
        redis_client.flushall()
        deadline = time.monotonic() + 10
        while redis_client.dbsize() == 0 or breaker.state != "closed":
            assert time.monotonic() < deadline, "the circuit did not close again"
            await used(client, tokens[0])
            await asyncio.sleep(0.05)


async def test_misses_queued_for_their_addresss_turns_are_answered_within_the_deadline(
    gateway: Gateway, app_client: AppClient
) -> None:
    """The failed-authentication limiter lets 3 misses of one address resolve at once here, and
    the others wait for a turn: that wait counts against the database's deadline, so every miss
    is answered within USAGE_DB_TIMEOUT and the stores' guard, however many queue (not a deadline
    per batch of turns), and a token with a stale record in-process is answered from it."""
    stale, misses = gateway.add_token(used=6), [gateway.add_token() for _ in range(24)]
    settings = {"cache_ttl": 0.1, "local_ttl": 0.1, "refresh_interval": 0, "db_timeout": 0.5, "auth_fail_limit": 3}
    async with app_client(**settings) as (app, client):
        assert await used(client, stale) == 6
        await asyncio.sleep(0.2)  # past its freshness
        with gateway.exclusive_lock():
            started = time.monotonic()
            answers = await asyncio.gather(*(client.get(URL, headers=t.bearer) for t in [*misses, stale]))
            waited = time.monotonic() - started
    for response in answers[:-1]:
        assert_unavailable(response)
    assert answers[-1].status_code == 200
    assert answers[-1].json()["data"]["total_used"] == 6
    assert app.state.lookup.stats.stale_served == 1
    # One deadline (1.5 s) and scheduling slack; a lock timeout (0.5 s) per batch of 3 turns: 4 s.
    assert waited < 0.5 + STATEMENT_GUARD + 1.0, waited


async def test_an_address_has_no_more_loads_running_than_turns(gateway: Gateway, app_client: AppClient) -> None:
    """A miss's load gives up at the deadline of the request that started it, and that request
    keeps its limiter turn until the load has landed: with a database that hangs, an address's
    burst never has more loads running than USAGE_AUTH_FAIL_LIMIT turns, however its requests
    time out."""
    tokens = [gateway.add_token() for _ in range(6)]
    settings = {"refresh_interval": 0, "db_timeout": 0.3, "auth_fail_limit": 1}
    async with app_client(**settings) as (app, client):
        running = most = 0
        release = asyncio.Event()

        async def hung(key: str) -> None:
            nonlocal running, most
            running += 1
            most = max(most, running)
            try:
                await release.wait()
            finally:
                running -= 1

        app.state.lookup.store.fetch = hung

        async def ask(i: int, token: Token) -> httpx.Response:
            await asyncio.sleep(0.05 * i)  # arriving one after another, while the first still waits
            return await client.get(URL, headers=token.bearer)

        answers = await asyncio.gather(*(ask(i, t) for i, t in enumerate(tokens)))
        release.set()
    for response in answers:
        assert_unavailable(response)
    assert most == 1


async def test_a_store_closed_while_reads_its_callers_left_run_leaves_no_connection_behind(
    gateway: Gateway, settings: Settings
) -> None:
    """A read whose callers were cancelled goes on (a batch shared with others, as a round stopped
    at shutdown leaves one), here held on the gateway's lock: the store's close waits for it and
    closes its connection, so that no connection's thread outlives the event loop. (It closed
    only the idle ones: a thread left behind wrote "Event loop is closed" from itself once the
    loop was gone, a failure of whichever test came next.)"""
    import threading

    from usage_service.store import open_store

    key = gateway.add_token().key
    store = await open_store(settings)
    before = set(threading.enumerate())
    try:
        with gateway.exclusive_lock():
            sent = store.statements
            reads = [asyncio.create_task(store.fetch(key)) for _ in range(4)]
            async with asyncio.timeout(5):
                while store.statements == sent:  # the batch's statement is on its way
                    await asyncio.sleep(0.01)
            for read in reads:
                read.cancel()
            await asyncio.gather(*reads, return_exceptions=True)
            await store.close()
    finally:
        await store.close()
    left = [t for t in threading.enumerate() if "_connection_worker_thread" in t.name and t not in before]
    for thread in left:  # (blocking the loop: a connection closed only by a task never is)
        thread.join(timeout=5)
    assert not [t for t in left if t.is_alive()]
