"""The hot-set refresher: changes reach every instance within an interval, at a bounded DB cost."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import redis
from conftest import AppClient
from support import Gateway, Token, redis_contents

import usage_service.refresh
from usage_service.hotset import HOT_SLICE, parse_hot

pytestmark = [pytest.mark.asyncio, pytest.mark.redis_topologies]

URL = "/api/usage/token"
# Long cache TTLs: a test that sees a change in time can only have seen it through the refresher.
SLOW_CACHE: dict[str, Any] = {"cache_ttl": 60.0, "local_ttl": 60.0, "refresh_interval": 0.1}


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 3.0) -> float:
    """Wait until `check` passes; return how long it took."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < within, "not within the deadline"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def answer_is(client: httpx.AsyncClient, token: Token, status: int, **data: Any) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        response = await client.get(URL, headers=token.bearer)
        if response.status_code != status:
            return False
        return all(response.json()["data"][k] == v for k, v in data.items())

    return check


CHANGES = [
    pytest.param(lambda gw, t: gw.charge(t, 25), 200, {"total_used": 25}, id="charge"),
    pytest.param(lambda gw, t: gw.update_token(t, status=2), 401, {}, id="token-disabled"),
    pytest.param(lambda gw, t: gw.update_user(t.user_id, status=2), 403, {}, id="user-banned"),
    pytest.param(lambda gw, t: gw.update_token(t, deleted_at="2025-01-01"), 401, {}, id="token-deleted"),
    pytest.param(lambda gw, t: gw.update_user(t.user_id, deleted_at="2025-01-01"), 401, {}, id="user-deleted"),
]


@pytest.mark.parametrize(("change", "status", "data"), CHANGES)
async def test_changes_reach_every_instance_through_redis(
    gateway: Gateway, app_client: AppClient, redis_url: str, change: Any, status: int, data: dict[str, Any]
) -> None:
    token = gateway.add_token()
    async with app_client(redis_url=redis_url, **SLOW_CACHE) as (a, first):
        async with app_client(redis_url=redis_url, **SLOW_CACHE) as (b, second):
            for client in (first, second):
                assert (await client.get(URL, headers=token.bearer)).status_code == 200
            await eventually(lambda: _true(a.state.refresher.stats.leader or b.state.refresher.stats.leader))
            change(gateway, token)
            for client in (first, second):
                await eventually(answer_is(client, token, status, **data), within=2.0)


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize(("change", "status", "data"), CHANGES)
async def test_changes_are_refreshed_without_redis(
    gateway: Gateway, app_client: AppClient, change: Any, status: int, data: dict[str, Any]
) -> None:
    token = gateway.add_token()
    async with app_client(**SLOW_CACHE) as (app, client):
        assert (await client.get(URL, headers=token.bearer)).status_code == 200
        await eventually(lambda: _true(app.state.refresher.stats.tokens == 1))  # a round re-read it
        change(gateway, token)
        await eventually(answer_is(client, token, status, **data), within=2.0)


async def test_falls_back_to_refreshing_alone_while_redis_is_down(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client(redis_url="redis://127.0.0.1:1/0", redis_cooldown=60, **SLOW_CACHE) as (app, client):
        assert (await client.get(URL, headers=token.bearer)).status_code == 200
        await eventually(lambda: _true(app.state.refresher.stats.tokens == 1))  # a round of its own re-read it
        gateway.charge(token, 9)
        await eventually(answer_is(client, token, 200, total_used=9), within=2.0)
        assert not app.state.refresher.stats.leader


async def test_one_leader_and_a_successor(
    gateway: Gateway, app_client: AppClient, redis_url: str, redis_client: redis.Redis
) -> None:
    # A generous Redis timeout: on a loaded machine the hand-over must not time out.
    settings = {"redis_url": redis_url, "redis_timeout": 1.0, **SLOW_CACHE}
    first, second = contextlib.AsyncExitStack(), contextlib.AsyncExitStack()
    a, _ = await first.enter_async_context(app_client(**settings))
    b, _ = await second.enter_async_context(app_client(**settings))
    try:
        await eventually(lambda: _true(a.state.refresher.stats.leader or b.state.refresher.stats.leader))
        await asyncio.sleep(0.3)
        leaders = [app.state.refresher.stats.leader for app in (a, b)]
        assert leaders.count(True) == 1
        # A leader that dies without a word loses the lock when it expires...
        lock_ttl = redis_client.pttl(a.state.redis.leader_key)
        assert 0 < lock_ttl <= a.state.refresher.round_lock_ttl * 1000
        # ...one that shuts down hands it over at once.
        leader_stack, leader, follower = (first, a, b) if leaders[0] else (second, b, a)
        await leader_stack.aclose()
        # Released, not left to expire (the follower may already have taken it over).
        assert redis_client.get(a.state.redis.leader_key) != leader.state.refresher.lock.token.encode()
        await eventually(lambda: _true(follower.state.refresher.stats.leader), within=3.0)
    finally:
        await first.aclose()
        await second.aclose()


async def test_database_cost_follows_the_hot_set_not_the_polling(
    gateway: Gateway, app_client: AppClient, redis_url: str
) -> None:
    tokens = [gateway.add_token() for _ in range(120)]
    async with app_client(redis_url=redis_url, cache_ttl=60.0, local_ttl=60.0, refresh_interval=0.2) as (app, c):
        for token in tokens:
            await c.get(URL, headers=token.bearer)
        await eventually(lambda: _true(app.state.refresher.stats.tokens == len(tokens)))
        statements, runs = app.state.store.statements, app.state.refresher.stats.runs
        for _ in range(5):  # lots of polling...
            await asyncio.gather(*(c.get(URL, headers=t.bearer) for t in tokens))
        await eventually(lambda: _true(app.state.refresher.stats.runs >= runs + 2))
        statements = app.state.store.statements - statements
        runs = app.state.refresher.stats.runs - runs
        # ...costs nothing: each token was read once on first sight, and each refresh reads all
        # 120 in one statement (give or take the refresh in progress when we looked).
        assert app.state.lookup.stats.db_reads == len(tokens)
        assert runs >= 2
        assert runs - 1 <= statements <= runs + 1


async def test_only_the_leader_reads_the_database(gateway: Gateway, app_client: AppClient, redis_url: str) -> None:
    tokens = [gateway.add_token() for _ in range(10)]
    settings = {"redis_url": redis_url, **SLOW_CACHE}
    async with app_client(**settings) as (a, first), app_client(**settings) as (b, second):
        for token in tokens:
            await first.get(URL, headers=token.bearer)
            await second.get(URL, headers=token.bearer)  # from Redis
        before = {app: app.state.store.statements for app in (a, b)}
        # Until the leader has re-read them (in one round or more); the follower had as long to do so.
        await eventually(
            lambda: _true(
                any(app.state.refresher.stats.leader and app.state.store.statements > before[app] for app in (a, b))
            )
        )
        grew = [app.state.store.statements > before[app] for app in (a, b)]
        leaders = [app.state.refresher.stats.leader for app in (a, b)]
        assert grew == leaders and leaders.count(True) == 1


async def test_hot_set_holds_ids_and_digests_never_keys(
    gateway: Gateway, app_client: AppClient, redis_url: str, redis_client: redis.Redis
) -> None:
    tokens = [gateway.add_token() for _ in range(5)]
    async with app_client(redis_url=redis_url, **SLOW_CACHE) as (app, client):
        for token in tokens:
            await client.get(URL, headers=token.bearer)
        await eventually(lambda: _true(app.state.refresher.stats.tokens == len(tokens)))
        hot = redis_client.zrange(app.state.redis.hot_set.key, 0, -1)
    assert sorted(int(member.split(b":")[0]) for member in hot) == sorted(t.id for t in tokens)
    everything = b"".join(k + v for k, v in redis_contents(redis_client).items())
    for token in tokens:
        assert token.key.encode() not in everything


async def test_tokens_leave_the_hot_set_when_nobody_polls(
    gateway: Gateway, app_client: AppClient, redis_url: str
) -> None:
    token = gateway.add_token()
    async with app_client(redis_url=redis_url, hot_window=0.3, **SLOW_CACHE) as (app, client):
        await client.get(URL, headers=token.bearer)
        await eventually(lambda: _true(app.state.refresher.stats.tokens == 1))
        await eventually(lambda: _true(app.state.refresher.stats.tokens == 0))


class Clock:
    """The refresher's clock (usage_service.refresh's `time`), moved on by the test alone."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))  # a whole second: the steps below add up exactly

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


async def test_a_token_polled_without_pause_is_noted_once_per_renote_period(
    gateway: Gateway, app_client: AppClient, redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Noting every polled token every interval cost the workers more than the refresh itself:
    a token is noted again once a quarter of the hot window has passed (here 1 s), not every round.
    Rounds are run by hand, a quarter of a second apart on the refresher's own clock."""
    token = gateway.add_token()
    settings = {"redis_url": redis_url, "hot_window": 4.0, "cache_ttl": 60.0, "local_ttl": 60.0}
    async with app_client(**settings, refresh_interval=3600.0) as (app, client):
        refresher = app.state.refresher
        assert refresher.polled.renote == 1.0
        await eventually(
            lambda: _true(refresher.stats.runs >= 1)
        )  # the loop's own round, at start; the next in an hour
        clock = Clock()
        monkeypatch.setattr(usage_service.refresh, "time", clock)
        hot_key = app.state.redis.hot_set.key

        async def poll_every_round(rounds: int) -> set[float]:
            """Poll, run a round, read the token's score in the hot set; then a quarter second passes."""
            scores = set()
            for _ in range(rounds):
                assert (await client.get(URL, headers=token.bearer)).status_code == 200
                await refresher.tick()
                scores.update(score for _, score in redis_client.zrange(hot_key, 0, -1, withscores=True))
                clock.now += 0.25
            return scores

        started = clock.now
        # Seven rounds over 1.5 s: noted in the first, and again once 1 s had passed, never in between.
        assert sorted(await poll_every_round(7)) == [started, started + 1.0]
        # A Redis that lost the set (a restart without persistence) has it back within the period.
        redis_client.delete(hot_key)
        assert await poll_every_round(1) == set()  # not noted again before the period is over...
        assert await poll_every_round(1) == {started + 2.0}  # ...and noted again once it is


async def test_each_token_is_read_at_the_same_point_of_every_round(
    gateway: Gateway, app_client: AppClient, redis_url: str
) -> None:
    """Redis returns the most recently noted first, and noting moves a token to the front; yet
    a token is re-read in the same statement of every round (one interval apart), whatever was
    noted in between."""
    gateway.add_tokens(2 * HOT_SLICE + 100)
    tokens = {int(row[0]): str(row[1]) for row in gateway.db.execute("SELECT id, `key` FROM tokens")}
    async with app_client(redis_url=redis_url, refresh_interval=3600.0) as (app, _):
        store, redis = app.state.store, app.state.redis
        polled = list(tokens.items())
        statements: list[set[int]] = []
        fetch_many = store.fetch_many

        async def recording(ids: list[int]) -> dict[int, Any]:
            statements.append(set(ids))
            return await fetch_many(ids)

        store.fetch_many = recording

        async def round_noted_in(order: list[tuple[int, str]]) -> dict[int, int]:
            """Note the tokens one by one in this order, run a round: {token id: its statement}."""
            now = time.time()
            for offset, (token_id, key) in enumerate(order):
                await redis.hot_set.note({hashlib.sha256(key.encode()).digest(): token_id}, now - 5 + offset * 1e-3)
            statements.clear()
            await app.state.refresher.tick()
            assert app.state.refresher.stats.leader
            return {token_id: n for n, ids in enumerate(statements) for token_id in ids}

        first = await round_noted_in(polled)
        assert len(set(first.values())) == 3 and len(first) == len(tokens)
        assert await round_noted_in(polled[::-1]) == first


@pytest.mark.parametrize(("refresh_interval", "kept_in_process"), [(0.1, True), (0, False)], ids=["pushed", "not"])
async def test_pushed_invalidations_let_records_stay_in_process(
    gateway: Gateway, app_client: AppClient, redis_url: str, refresh_interval: float, kept_in_process: bool
) -> None:
    """With the refresher's rounds confirming what workers hold, records outlive USAGE_LOCAL_TTL."""
    token = gateway.add_token()
    settings = {"redis_url": redis_url, "cache_ttl": 5.0, "local_ttl": 0.1, "refresh_interval": refresh_interval}
    async with app_client(**settings) as (app, client):
        if refresh_interval:
            await eventually(lambda: _true(app.state.lookup.invalidations_live))
        await client.get(URL, headers=token.bearer)
        await asyncio.sleep(0.3)  # the leader's first sight of a token counts as a change
        await client.get(URL, headers=token.bearer)
        stats = app.state.lookup.stats
        local, redis_hits = stats.local_hits, stats.redis_hits
        await asyncio.sleep(0.3)
        await client.get(URL, headers=token.bearer)
        # Unchanged for 0.3 s, three times USAGE_LOCAL_TTL: still in-process only if changes are pushed.
        assert (stats.local_hits - local, stats.redis_hits - redis_hits) == ((1, 0) if kept_in_process else (0, 1))


async def test_confirmed_rounds_keep_records_in_process(
    gateway: Gateway, app_client: AppClient, redis_url: str
) -> None:
    """Each complete round vouches for what workers hold: hot records need no trip to Redis."""
    token = gateway.add_token()
    settings = {"redis_url": redis_url, "cache_ttl": 0.5, "local_ttl": 0.1, "refresh_interval": 0.1}
    async with app_client(**settings) as (app, client):
        await eventually(lambda: _true(app.state.lookup.invalidations_live))
        await client.get(URL, headers=token.bearer)
        await asyncio.sleep(0.4)  # past the leader's first sight of the token
        await client.get(URL, headers=token.bearer)
        stats = app.state.lookup.stats
        local, redis_hits, reads = stats.local_hits, stats.redis_hits, stats.db_reads
        for _ in range(4):  # 1.2 s, more than twice USAGE_CACHE_TTL
            await asyncio.sleep(0.3)
            assert (await client.get(URL, headers=token.bearer)).status_code == 200
        assert (stats.local_hits - local, stats.redis_hits - redis_hits, stats.db_reads - reads) == (4, 0, 0)
        gateway.charge(token, 3)  # and a change still gets through
        await eventually(answer_is(client, token, 200, total_used=3), within=2.0)


async def test_a_request_never_overwrites_a_newer_refresh(
    gateway: Gateway, app_client: AppClient, redis_url: str, redis_client: redis.Redis
) -> None:
    from usage_service.cache import key_digest
    from usage_service.records import decode_cached, encode_cached

    token = gateway.add_token(used=1)
    async with app_client(redis_url=redis_url, refresh_interval=0) as (app, client):
        await client.get(URL, headers=token.bearer)
        digest = key_digest(token.key.encode())
        record = app.state.lookup.local.get(digest, 0.0)
        cache, now = app.state.redis.records, time.time()  # later than the request's own write-behind

        async def written_behind(fetched_at: float) -> float:
            cache.write(digest, encode_cached(record, fetched_at), 60)
            await cache._writer  # the write-behind task, done once Redis answered
            return float(decode_cached(redis_client.get(cache.key(digest)))[1])

        await cache.store_many({digest: encode_cached(record, now + 20)}, 60)  # the refresher's
        assert await written_behind(now + 10) == now + 20  # a request's, read earlier
        assert await written_behind(now + 30) == now + 30  # a newer read does replace it


async def test_without_a_refresher_polls_are_not_noted(gateway: Gateway, app_client: AppClient) -> None:
    tokens = [gateway.add_token() for _ in range(3)]
    async with app_client(refresh_interval=0) as (app, client):
        for token in tokens * 2:
            assert (await client.get(URL, headers=token.bearer)).status_code == 200
        assert app.state.lookup.take_polled() == {}


async def test_hot_set_larger_than_a_slice_round_trips_through_redis(app_client: AppClient, redis_url: str) -> None:
    polled = {hashlib.sha256(str(i).encode()).digest(): i for i in range(1, 2 * HOT_SLICE + 500)}
    async with app_client(redis_url=redis_url, refresh_interval=0) as (app, _):
        now = time.time()
        await app.state.redis.hot_set.note(polled, now)
        members = await app.state.redis.hot_set.members(now - 10, limit=10 * HOT_SLICE)
        assert parse_hot(members) == polled
        assert len(await app.state.redis.hot_set.members(now - 10, limit=HOT_SLICE)) == HOT_SLICE
