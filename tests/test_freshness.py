"""Freshness you can prove: invalidations against in-flight reads, the confirmation watermark and
its hard bound, fenced leadership, and stale-if-error with the refresher on.

Every interleaving is injected: a gate in a wrapper around the real store holds a read where the
test wants it, and the invalidation channel is real Redis pub/sub, whose order tells when a
worker has heard what was published before (`heard_so_far`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio
from conftest import AppClient
from starlette.applications import Starlette
from support import Gateway, RedisServer, Token
from tcpproxy import TCPProxy

import usage_service.lookup
import usage_service.refresh
from usage_service._circuit import CircuitBreaker
from usage_service._redis_guard import RedisGuard
from usage_service.cache import key_digest
from usage_service.config import Settings
from usage_service.demo import new_key
from usage_service.invalidation import _parse_digests, _parse_history
from usage_service.leadership import Leadership
from usage_service.records import TokenRecord, decode_cached, encode_cached
from usage_service.refresh import Refresher
from usage_service.shared import SharedRedis
from usage_service.store import STATEMENT_GUARD, StoreUnavailable

pytestmark = pytest.mark.asyncio

URL = "/api/usage/token"
# A refresher whose loop runs once, at start: rounds happen when a test calls tick(). Its
# invalidation listener runs all along.
MANUAL_ROUNDS: dict[str, Any] = {"refresh_interval": 3600.0}


async def until(condition: Callable[[], object], within: float = 5.0) -> None:
    """Wait for a condition another task brings about (never for time itself to pass)."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come about"
        await asyncio.sleep(0.01)


def fresh_in_process(app: Starlette, token: Token) -> TokenRecord | None:
    """The record this worker would serve without a trip down, without counting it as served."""
    now = usage_service.lookup.time.monotonic()  # the lookup's clock, which a test may have moved
    return app.state.lookup.local.get(key_digest(token.key.encode()), now)  # type: ignore[no-any-return]


async def used(client: httpx.AsyncClient, token: Token) -> int:
    response = await client.get(URL, headers=token.bearer)
    assert response.status_code == 200, response.text
    return int(response.json()["data"]["total_used"])


async def asked_in_an_outage(
    client: httpx.AsyncClient, token: Token, gateway: Gateway, proxied_redis: TCPProxy
) -> httpx.Response:
    """Ask for a token while Redis answers nothing and the database is locked (what stale-if-error is for)."""
    proxied_redis.black_hole()
    try:
        with gateway.exclusive_lock():
            return await client.get(URL, headers=token.bearer)
    finally:
        proxied_redis.heal()


async def heard_so_far(app: Starlette, client: httpx.AsyncClient, sentinel: Token) -> None:
    """Return once this worker's listener has handled everything published so far: one more
    message on the same channel, an invalidation of a sentinel token, has reached it."""
    await used(client, sentinel)
    assert fresh_in_process(app, sentinel) is not None
    await app.state.redis.channel.publish_invalidation(*changed(sentinel))
    await until(lambda: fresh_in_process(app, sentinel) is None)


def changed(token: Token) -> tuple[list[bytes], dict[bytes, bytes]]:
    """What the leader publishes for a token whose record changed: its digest, with the
    fingerprint of a record other than the one held. (A digest alone says it is gone.)"""
    digest = key_digest(token.key.encode())
    return [digest], {digest: b"\xff" * 8}


async def started(app: Starlette) -> None:
    """Wait until the invalidations reach this worker and the refresher's first round is over."""
    await until(lambda: app.state.lookup.invalidations_live and app.state.refresher.stats.runs >= 1)


class Gate:
    """Hold a real read after it has read, until the test lets it return."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def hold(self) -> None:
        self.reached.set()
        await self.release.wait()


@pytest.mark.parametrize("asked_meanwhile", [False, True], ids=["alone", "asked-meanwhile"])
async def test_a_read_that_an_invalidation_overtakes_lands_expired(
    gateway: Gateway, app_client: AppClient, redis_url: str, asked_meanwhile: bool
) -> None:
    """The lost invalidation: a miss reads the row, the row changes, the leader publishes the
    change and confirms its round, and only then does the miss land. What it read must not be
    served as fresh afterwards, whatever later confirmations say; and a request that comes after
    the invalidation does not wait for that read, it makes its own."""
    token, sentinel = gateway.add_token(used=1), gateway.add_token()
    async with app_client(redis_url=redis_url, cache_ttl=60.0, local_ttl=60.0, **MANUAL_ROUNDS) as (app, client):
        await started(app)
        store, gate = app.state.store, Gate()
        fetch = store.fetch

        async def gated_fetch(key: str) -> TokenRecord | None:
            record = await fetch(key)
            if key == token.key and not gate.reached.is_set():  # the first read of the token only
                await gate.hold()
            return record

        store.fetch = gated_fetch
        request = asyncio.create_task(client.get(URL, headers=token.bearer))
        await gate.reached.wait()  # the miss has read used=1

        gateway.charge(token, 5)
        await app.state.redis.hot_set.note({key_digest(token.key.encode()): token.id}, time.time())
        await app.state.refresher.tick()  # the leader reads used=6, writes it, invalidates, confirms
        assert app.state.refresher.stats.leader
        await heard_so_far(app, client, sentinel)
        if asked_meanwhile:
            assert await asyncio.wait_for(used(client, token), timeout=5) == 6

        gate.release.set()
        assert (await request).status_code == 200  # those waiting may be answered with what it read
        await app.state.redis.channel.publish_confirmation(time.time() + 3600)  # however far ahead it vouches
        await heard_so_far(app, client, sentinel)
        held = fresh_in_process(app, token)
        if asked_meanwhile:  # what the later request read, not replaced by the overtaken read
            assert held is not None and held.used_quota == 6
        else:
            assert held is None
        assert await used(client, token) == 6


@pytest.mark.parametrize(("hot_max", "confirmed"), [(2, False), (4, True)], ids=["cut", "whole"])
async def test_a_round_cut_at_hot_max_confirms_nothing(
    gateway: Gateway, app_client: AppClient, redis_url: str, hot_max: int, confirmed: bool
) -> None:
    """Past USAGE_HOT_MAX the round reads only some of the polled tokens: it may not vouch for
    what workers hold of the others, so it publishes no confirmation (changes still go out)."""
    tokens, sentinel = [gateway.add_token(used=1) for _ in range(3)], gateway.add_token()
    settings = {"cache_ttl": 60.0, "local_ttl": 60.0, "hot_max": hot_max, **MANUAL_ROUNDS}
    async with app_client(redis_url=redis_url, **settings) as (app, client):
        await started(app)
        for token in tokens:
            assert await used(client, token) == 1
        await app.state.redis.hot_set.note({key_digest(t.key.encode()): t.id for t in tokens}, time.time())
        gateway.charge(tokens[0], 5)
        before = app.state.lookup.local.confirmed_until
        await app.state.refresher.tick()
        await heard_so_far(app, client, sentinel)
        assert app.state.refresher.stats.tokens == min(hot_max, 3)
        assert (app.state.lookup.local.confirmed_until > before) is confirmed


class Clock:
    """The lookup's clock (usage_service.lookup's `time`), which a test moves on."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead

    def time(self) -> float:
        return time.time() + self.ahead


async def test_confirmations_keep_an_entry_fresh_up_to_its_hard_bound(
    gateway: Gateway, app_client: AppClient, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Confirmations let an entry outlive its own TTL, but never past max(USAGE_HOT_WINDOW,
    USAGE_CACHE_TTL) after the database read it came from: then it is read again."""
    clock = Clock()
    monkeypatch.setattr(usage_service.lookup, "time", clock)
    token, sentinel = gateway.add_token(used=2), gateway.add_token()
    settings = {"redis_url": redis_url, "cache_ttl": 1.0, "local_ttl": 1.0, "hot_window": 5.0, **MANUAL_ROUNDS}
    async with app_client(**settings) as (app, client):
        await started(app)
        lookup = app.state.lookup
        assert await used(client, token) == 2
        for ahead in (0.9, 1.8, 2.7, 3.6):  # a round's confirmation every 0.9 s
            clock.ahead = ahead
            await app.state.redis.channel.publish_confirmation(clock.time())
            await heard_so_far(app, client, sentinel)

        clock.ahead = 4.0  # past its own TTL, within the hard bound: the confirmations hold it
        assert fresh_in_process(app, token) is not None
        clock.ahead = 5.5  # past the hard bound: read again, though a confirmation came just now
        await app.state.redis.channel.publish_confirmation(clock.time())
        await heard_so_far(app, client, sentinel)
        assert fresh_in_process(app, token) is None
        reads = lookup.stats.redis_hits + lookup.stats.db_reads
        assert await used(client, token) == 2
        assert lookup.stats.redis_hits + lookup.stats.db_reads == reads + 1


async def test_a_subscription_redis_py_restores_by_itself_is_heard_as_a_loss(
    gateway: Gateway, app_client: AppClient, redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis drops the subscriber's connection (a failover, a subscriber past its output buffer
    limit) and redis-py connects and subscribes again by itself, without an error: what was
    published in between is lost. No confirmation heard after it vouches for an entry held
    before it, which an invalidation lost in between may have been meant for."""
    clock = Clock()
    monkeypatch.setattr(usage_service.lookup, "time", clock)
    token, sentinel = gateway.add_token(used=2), gateway.add_token()
    settings = {"redis_url": redis_url, "cache_ttl": 1.0, "local_ttl": 1.0, "hot_window": 60.0, **MANUAL_ROUNDS}
    async with app_client(**settings) as (app, client):
        await started(app)
        channel = app.state.redis.channel
        assert await used(client, token) == 2
        generation = app.state.lookup.local.generation

        assert redis_client.client_kill_filter(_type="pubsub") == 1
        await until(lambda: redis_client.pubsub_numsub(channel.name) == [(channel.name.encode(), 1)])
        await channel.publish_confirmation(clock.time() + 3600)
        await heard_so_far(app, client, sentinel)
        assert app.state.lookup.local.generation > generation and channel.losses == 1

        clock.ahead = 4.0  # past its own TTL: only a confirmation could keep it
        assert fresh_in_process(app, token) is None


async def test_a_subscription_gone_silent_is_heard_as_a_loss_and_the_channel_comes_back(
    gateway: Gateway, app_client: AppClient, redis_server: RedisServer, redis_url: str, redis_client: redis.Redis
) -> None:
    """The subscriber's connection goes silent without closing (Redis's host vanished, a network
    partition, a failed master powered off): nothing is read from it again, and nothing said.
    The listener pings a quiet channel, takes a ping left unanswered as a loss, and subscribes
    again once Redis answers: it was deaf for good, and still said it was listening."""
    with TCPProxy(("127.0.0.1", redis_server.port)) as proxy:
        async with app_client(redis_url=proxy.url, **MANUAL_ROUNDS) as (app, client):
            await started(app)
            channel, lookup = app.state.redis.channel, app.state.lookup
            proxy.black_hole()
            await until(lambda: not lookup.invalidations_live, within=15)
            assert channel.losses >= 1
            proxy.heal()
            await until(lambda: lookup.invalidations_live, within=15)
            token = gateway.add_token(used=3)
            assert await used(client, token) == 3
            redis_client.publish(channel.name, ",".join(d.hex() for d in changed(token)[0]))
            await until(lambda: fresh_in_process(app, token) is None)


async def test_an_error_redis_py_does_not_document_is_a_loss_and_the_channel_comes_back(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """On Cluster with its seed node down, redis-py's subscription raised a KeyError: the
    listener took it as a loss (said once, with its traceback), not as its own death, and
    subscribed again a moment later."""
    client = redis.asyncio.Redis.from_url(redis_url)
    guard = RedisGuard(client, timeout=1.0, breaker=CircuitBreaker(3, 0.05))
    channel = SharedRedis(guard, prefix="t:").channel
    pubsub, failures = client.pubsub, [KeyError(2917), KeyError(2917)]

    def failing_pubsub() -> Any:
        subscription = pubsub()
        if failures:
            failure = failures.pop()

            async def subscribe(*channels: str) -> None:
                raise failure

            subscription.subscribe = subscribe
        return subscription

    client.pubsub = failing_pubsub  # type: ignore[method-assign]
    live: list[bool] = []
    with caplog.at_level(logging.WARNING, logger="usage_service.invalidation"):
        listener = asyncio.create_task(channel.listen(lambda _: None, lambda _: None, live.append))
        await until(lambda: True in live)
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
    await guard.aclose()
    assert channel.losses == 2
    said = [r for r in caplog.records if "invalidation channel lost (KeyError)" in r.getMessage()]
    assert len(said) == 1 and said[0].exc_info is not None


async def served_per_round(
    app: Starlette, client: httpx.AsyncClient, clock: Clock, seconds: range, token: Token, sentinel: Token
) -> list[int]:
    """At each of these seconds (the lookup's and refresher's clock moved there), a round of the
    refresher, heard by the worker; then what the worker serves of the token."""
    served = []
    for second in seconds:
        clock.ahead = float(second)
        await app.state.refresher.tick()
        await heard_so_far(app, client, sentinel)
        served.append(await used(client, token))
    return served


class WrappedStore:
    """The real store, for a test to alter its fetch_many: everything else is the store's."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


class FailsOnce(WrappedStore):
    """The real store, whose next fetch_many fails (a locked database) once `armed`."""

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.armed = False

    async def fetch_many(self, ids: Sequence[int]) -> dict[int, tuple[bytes, TokenRecord]]:
        if self.armed:
            self.armed = False
            raise StoreUnavailable("database is locked")
        found: dict[int, tuple[bytes, TokenRecord]] = await self.store.fetch_many(ids)
        return found


@pytest.mark.parametrize("a_round_fails", [False, True])
async def test_a_version_the_leader_never_saw_is_not_confirmed(
    gateway: Gateway,
    app_client: AppClient,
    redis_url: str,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    a_round_fails: bool,
) -> None:
    """A row changes and changes back between two rounds (the gateway's pre-consume, then the
    refund of a failed relay request), and meanwhile a worker reads the in-between version from
    the database (its record had gone from Redis). The leader's rounds see the row unchanged,
    yet the worker's version must not be confirmed as theirs: the leader hears which tokens
    requests read, and its next round names them, with what it read. (Confirmed, the in-between
    balance was served for a minute.) Also when the round that takes the requested tokens fails
    before it publishes (its statement finds the database locked): the next round names them."""
    clock = Clock()
    monkeypatch.setattr(usage_service.lookup, "time", clock)
    monkeypatch.setattr(usage_service.refresh, "time", clock)
    token, sentinel = gateway.add_token(used=1, remain=1000), gateway.add_token()
    digest = key_digest(token.key.encode())
    async with app_client(redis_url=redis_url, **MANUAL_ROUNDS) as (app, client):
        await started(app)
        refresher, records = app.state.refresher, app.state.redis.records
        store = refresher.store = FailsOnce(refresher.store)
        await app.state.redis.hot_set.note({digest: token.id}, time.time())
        await refresher.tick()  # the leader sees used=1
        await heard_so_far(app, client, sentinel)
        assert refresher.stats.leader

        gateway.charge(token, 5)  # used=6
        redis_client.delete(records.key(digest))  # the record is gone from Redis: a miss
        assert await used(client, token) == 6  # read from the database
        gateway.charge(token, -5)  # used=1 again: what the leader saw
        await until(lambda: redis_client.sismember(records.requested_key, digest.hex()))
        if a_round_fails:
            store.armed = True
            with pytest.raises(StoreUnavailable):
                await refresher.tick()  # takes the requested tokens, then its statement fails
            assert refresher.stats.leader

        served = await served_per_round(app, client, clock, range(1, 6), token, sentinel)
        assert served == [1] * 5
        assert not redis_client.exists(records.requested_key)  # taken by the rounds


async def test_an_invalidated_entry_stays_expired_through_later_confirmations(
    gateway: Gateway, app_client: AppClient, redis_url: str
) -> None:
    token, sentinel = gateway.add_token(used=3), gateway.add_token()
    async with app_client(redis_url=redis_url, cache_ttl=60.0, local_ttl=60.0, **MANUAL_ROUNDS) as (app, client):
        await started(app)
        assert await used(client, token) == 3
        await app.state.redis.channel.publish_invalidation(*changed(token))
        for _ in range(3):
            await app.state.redis.channel.publish_confirmation(time.time() + 3600)
        await heard_so_far(app, client, sentinel)
        assert fresh_in_process(app, token) is None
        assert len(app.state.lookup.local) == 2  # expired in place, not dropped: a stale copy


async def test_a_leaders_first_sight_keeps_the_records_workers_hold_only_if_they_are_its_own(
    gateway: Gateway, app_client: AppClient, redis_url: str
) -> None:
    """A leader that sees tokens for the first time (a new hot token, a new leader) cannot know
    what workers hold, so it names them all, each with the fingerprint of what it read: a worker
    keeps a record that is that very record, and expires one that is not."""
    same, charged, sentinel = gateway.add_token(used=3), gateway.add_token(used=4), gateway.add_token()
    async with app_client(redis_url=redis_url, cache_ttl=60.0, local_ttl=60.0, **MANUAL_ROUNDS) as (app, client):
        await started(app)
        assert await used(client, same) == 3 and await used(client, charged) == 4
        gateway.charge(charged, 5)  # the worker still holds used=4
        digests = {key_digest(t.key.encode()): t.id for t in (same, charged)}
        await app.state.redis.hot_set.note(digests, time.time())
        await app.state.refresher.tick()  # the first round that sees them: both named
        assert app.state.refresher.stats.changed >= 2
        await heard_so_far(app, client, sentinel)
        held = fresh_in_process(app, same)
        assert held is not None and held.used_quota == 3  # its own read: kept
        assert fresh_in_process(app, charged) is None  # older than the round's read: expired
        lookup = app.state.lookup
        trips = lookup.stats.redis_hits + lookup.stats.db_reads
        assert await used(client, same) == 3
        assert lookup.stats.redis_hits + lookup.stats.db_reads == trips
        assert await used(client, charged) == 9


async def test_local_ttl_zero_serves_nothing_fresh_in_process(
    gateway: Gateway, app_client: AppClient, redis_url: str
) -> None:
    """USAGE_LOCAL_TTL=0 turns the in-process layer off, with the refresher confirming or not."""
    token = gateway.add_token()
    async with app_client(redis_url=redis_url, local_ttl=0.0, refresh_interval=0.1) as (app, client):
        await started(app)
        for _ in range(5):
            await used(client, token)
        await until(lambda: app.state.refresher.stats.runs >= 3)  # confirmed rounds since
        for _ in range(5):
            await used(client, token)
        stats = app.state.lookup.stats
        assert stats.local_hits == 0
        assert stats.db_reads + stats.redis_hits == 10


# --- stale-if-error with the refresher and its listener on --------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Any:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


async def test_stale_if_error_survives_losing_the_invalidation_channel(
    gateway: Gateway, app_client: AppClient, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis down and the database locked, in the default deployment (Redis, refresher on): the
    record a worker held is served stale. (It used to be cleared with the channel: 503.) The
    loss of the channel is said once, however often subscribing again fails."""
    token = gateway.add_token(used=4)
    settings = {"redis_url": own_redis.url, "cache_ttl": 0.5, "local_ttl": 0.1, "redis_cooldown": 60.0}
    async with app_client(**settings, **MANUAL_ROUNDS) as (app, client):
        await started(app)
        assert await used(client, token) == 4
        with gateway.exclusive_lock():
            own_redis.stop()
            await until(lambda: not app.state.lookup.invalidations_live)
            await until(lambda: fresh_in_process(app, token) is None)  # past its own TTL
            assert await used(client, token) == 4
            await until(lambda: app.state.redis.channel.losses >= 2)
        assert app.state.lookup.stats.stale_served == 1
    said = [r.getMessage() for r in caplog.records if r.name == "usage_service.invalidation"]
    assert len(said) == 1 and said[0].startswith("invalidation channel lost (") and "1 time(s)" in said[0]


@pytest.fixture
def proxied_redis(redis_server: RedisServer, redis_url: str) -> Any:
    with TCPProxy(("127.0.0.1", redis_server.port)) as proxy:
        yield proxy


@pytest.mark.parametrize("local_ttl", [pytest.param(1.0, id="invalidated"), pytest.param(0.0, id="local-ttl-0")])
async def test_stale_if_error_survives_an_invalidation(
    gateway: Gateway, app_client: AppClient, proxied_redis: TCPProxy, redis_client: redis.Redis, local_ttl: float
) -> None:
    """An invalidation expires the entry in place: with Redis silent and the database locked, the
    record is still served stale (it used to be deleted: 503). With USAGE_LOCAL_TTL=0 the layer
    serves nothing fresh, yet keeps its stale copies."""
    token = gateway.add_token(used=7)
    settings = {"redis_url": proxied_redis.url, "redis_timeout": 0.1, "redis_cooldown": 60.0, "local_ttl": local_ttl}
    async with app_client(**settings, **MANUAL_ROUNDS) as (app, client):
        await started(app)
        assert await used(client, token) == 7
        if local_ttl:
            assert fresh_in_process(app, token) is not None
            # The token changed: named with the fingerprint of another record.
            changed = f"{key_digest(token.key.encode()).hex()}={'ff' * 8}"
            redis_client.publish(app.state.redis.channel.name, changed)
            await until(lambda: fresh_in_process(app, token) is None)
        response = await asked_in_an_outage(client, token, gateway, proxied_redis)
        assert response.status_code == 200 and response.json()["data"]["total_used"] == 7
        assert app.state.lookup.stats.stale_served == 1


@pytest.mark.parametrize("change", ["deleted", "key-changed"])
async def test_a_token_gone_is_never_served_stale(
    gateway: Gateway, app_client: AppClient, proxied_redis: TCPProxy, change: str
) -> None:
    """A round that finds a polled token deleted, or its key changed, names it with no record:
    each worker lets go of what it holds of it, rather than keep it for stale-if-error. (The
    revoked key was answered 200, balance and spending, for as long as the database could not.)"""
    token = gateway.add_token(used=7)
    settings = {"redis_url": proxied_redis.url, "redis_timeout": 0.1, "redis_cooldown": 60.0}
    async with app_client(**settings, **MANUAL_ROUNDS) as (app, client):
        await started(app)
        assert await used(client, token) == 7
        await app.state.redis.hot_set.note({key_digest(token.key.encode()): token.id}, time.time())
        await app.state.refresher.tick()  # the leader sees the token
        if change == "deleted":
            gateway.update_token(token, deleted_at="2026-01-01 00:00:00")
        else:
            gateway.update_token(token, key=new_key())
        await app.state.refresher.tick()  # ...and names it with no record
        await until(lambda: fresh_in_process(app, token) is None)
        response = await asked_in_an_outage(client, token, gateway, proxied_redis)
    assert response.status_code == 503, response.text
    assert app.state.lookup.stats.stale_served == 0


@pytest.mark.parametrize("how", ["alone", "asked-meanwhile", "failing"])
async def test_a_read_that_the_news_of_a_token_gone_overtakes_leaves_no_stale_copy(
    gateway: Gateway, app_client: AppClient, proxied_redis: TCPProxy, how: str
) -> None:
    """A miss reads the row, the token is deleted, the leader names it gone, and only then does
    the miss land: it answers those already waiting, but leaves nothing behind that stale-if-error
    could serve for the revoked key later, whether or not a request came between (and found the
    token gone) before it landed; and a miss that fails keeps no expired record it found in Redis."""
    token, sentinel = gateway.add_token(used=7), gateway.add_token()
    digest = key_digest(token.key.encode())
    settings = {"redis_url": proxied_redis.url, "redis_timeout": 0.1, "redis_cooldown": 60.0, "negative_ttl": 0.0}
    async with app_client(**settings, **MANUAL_ROUNDS) as (app, client):
        await started(app)
        await app.state.redis.hot_set.note({digest: token.id}, time.time())
        await app.state.refresher.tick()  # the leader sees the token (and writes its record to Redis)
        records = app.state.redis.records
        held = await records.get(digest)
        await app.state.redis.guard.client.delete(records.key(digest))  # the miss reads the row
        if how == "failing":  # ...past a record in Redis too old to be taken, but not to stand in
            await records.store_many({digest: encode_cached(held[0], time.time() - 100)}, 300)
        store, gate = app.state.store, Gate()
        fetch = store.fetch

        async def gated_fetch(key: str) -> TokenRecord | None:
            if key != token.key or gate.reached.is_set():  # the first read of the token only
                return await fetch(key)
            record = await fetch(key)
            await gate.hold()
            if how == "failing":
                raise StoreUnavailable("the database stopped answering")
            return record

        store.fetch = gated_fetch
        request = asyncio.create_task(client.get(URL, headers=token.bearer))
        await gate.reached.wait()  # the miss has read the live token

        gateway.update_token(token, deleted_at="2026-01-01 00:00:00")
        await app.state.refresher.tick()  # the leader names it with no record
        await heard_so_far(app, client, sentinel)
        if how == "asked-meanwhile":
            response = await client.get(URL, headers=token.bearer)
            assert response.status_code == 401, response.text

        gate.release.set()
        # Those waiting may be answered with what it read; a failed read has nothing to give them.
        assert (await request).status_code == (503 if how == "failing" else 200)
        response = await asked_in_an_outage(client, token, gateway, proxied_redis)
    assert response.status_code == 503, response.text
    assert app.state.lookup.stats.stale_served == 0


async def test_a_token_named_gone_is_not_served_stale_from_a_record_redis_kept(
    gateway: Gateway, app_client: AppClient, redis_url: str
) -> None:
    """Redis keeps a record over another by the time of their reads, each by its instance's
    clock: the record an instance whose clock runs ahead read just before the deletion outlives
    the leader's tombstone there. A worker that heard the token named gone does not take it back
    as a stale copy while the database cannot answer."""
    token = gateway.add_token(used=7)
    digest = key_digest(token.key.encode())
    async with app_client(redis_url=redis_url, **MANUAL_ROUNDS) as (app, client):
        await started(app)
        assert await used(client, token) == 7
        record = app.state.lookup.local.peek(digest)[0]
        records = app.state.redis.records
        await records.store_many({digest: encode_cached(record, time.time() + 3)}, 300)  # a clock 3 s ahead
        await app.state.redis.hot_set.note({digest: token.id}, time.time())
        await app.state.refresher.tick()  # the leader sees the token
        gateway.update_token(token, deleted_at="2026-01-01 00:00:00")
        await app.state.refresher.tick()  # ...and names it with no record; its tombstone is refused
        await until(lambda: app.state.lookup.local.peek(digest) is None)
        assert (await records.get(digest))[0] is not None  # the record from ahead is still there
        with gateway.exclusive_lock():
            response = await client.get(URL, headers=token.bearer)
    assert response.status_code == 503, response.text
    assert app.state.lookup.stats.stale_served == 0


async def test_a_tombstone_in_redis_outweighs_what_a_worker_kept(
    gateway: Gateway, app_client: AppClient, redis_url: str
) -> None:
    """A worker that missed the news of a token gone (its channel down) finds the leader's
    tombstone in Redis, past USAGE_NEGATIVE_TTL: it lets go of what it kept, rather than serve it
    stale while the database cannot answer."""
    token = gateway.add_token(used=7)
    digest = key_digest(token.key.encode())
    settings = {"redis_url": redis_url, "cache_ttl": 0.5, "local_ttl": 0.1, "negative_ttl": 0.1}
    async with app_client(**settings, **MANUAL_ROUNDS) as (app, client):
        await started(app)
        assert await used(client, token) == 7
        records = app.state.redis.records

        async def written() -> None:  # the miss's write-behind has landed (the tombstone is newer)
            while await records.get(digest) is None:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(written(), 5)
        await records.store_many({digest: encode_cached(None, time.time())}, 60)
        await until(lambda: fresh_in_process(app, token) is None)  # past its TTL, and the tombstone's
        with gateway.exclusive_lock():
            response = await client.get(URL, headers=token.bearer)
    assert response.status_code == 503, response.text
    assert app.state.lookup.stats.stale_served == 0


async def test_a_gone_tokens_tombstone_is_written_once(gateway: Gateway, app_client: AppClient, redis_url: str) -> None:
    """Rounds rewrite unchanged records before they age out of Redis, but not a gone token's
    tombstone: renewed, it refused the key to a new token for as long as the old one stayed in
    the hot set (USAGE_HOT_WINDOW, 60 s), not USAGE_NEGATIVE_TTL."""
    token = gateway.add_token()
    digest = key_digest(token.key.encode())
    async with app_client(redis_url=redis_url, cache_ttl=0.2, **MANUAL_ROUNDS) as (app, client):
        await started(app)
        await app.state.redis.hot_set.note({digest: token.id}, time.time())
        await app.state.refresher.tick()  # the leader sees the token
        gateway.update_token(token, deleted_at="2026-01-01 00:00:00")
        await app.state.refresher.tick()  # ...gone: its tombstone written
        records = app.state.redis.records
        written = await records.get(digest)
        assert written is not None and written[0] is None
        await asyncio.sleep(0.2)  # every record the leader wrote is due to be written again
        await app.state.refresher.tick()
        assert await records.get(digest) == written


# --- leadership ---------------------------------------------------------------------------


class GatedStore(WrappedStore):
    """The real store, whose fetch_many holds its result at a gate."""

    def __init__(self, store: Any, gate: Gate) -> None:
        super().__init__(store)
        self.gate = gate

    async def fetch_many(self, ids: Sequence[int]) -> dict[int, tuple[bytes, TokenRecord]]:
        found: dict[int, tuple[bytes, TokenRecord]] = await self.store.fetch_many(ids)
        await self.gate.hold()
        return found


def published(client: redis.Redis, pubsub: Any, channel: str, marker: str) -> list[bytes]:
    """Every message on the channel since the last call: those before a marker published now."""
    client.publish(channel, marker)
    messages = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        # None for the subscription's own confirmation, which this skips.
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if message is None:
            continue
        if message["data"] == marker.encode():
            return messages
        messages.append(message["data"])
    raise AssertionError("the marker did not arrive")


def lock_runs_out(refresher: Refresher, redis_client: redis.Redis) -> None:
    """The refresher's lock runs out under it: its time passes (its event loop stalled past the
    lock's expiry) and Redis lets the key go."""
    lock = refresher.lock
    assert lock is not None
    lock.clock = lambda: time.monotonic() + refresher.round_lock_ttl
    redis_client.delete(lock.name)


async def test_a_deposed_leader_abandons_its_round(
    gateway: Gateway, app_client: AppClient, settings: Settings, redis_url: str, redis_client: redis.Redis
) -> None:
    """Leader A reads a chunk slowly; meanwhile its lock expires and B leads a round with newer
    data. A must notice before acting: no write, no publish, and B's record stays."""
    token = gateway.add_token(used=1)
    async with app_client(redis_url=redis_url, refresh_interval=0) as (app, _):
        lookup, store, cache = app.state.lookup, app.state.store, app.state.redis
        fenced = dataclasses.replace(settings, redis_url=redis_url, refresh_interval=1.0)
        gate = Gate()
        a = Refresher(lookup, GatedStore(store, gate), cache, fenced)
        b = Refresher(lookup, store, cache, fenced)
        digest = key_digest(token.key.encode())
        await cache.hot_set.note({digest: token.id}, time.time())
        pubsub = redis_client.pubsub()
        pubsub.subscribe(cache.channel.name)

        a_round = asyncio.create_task(a.tick())
        await gate.reached.wait()  # A leads and has read used=1
        lock_runs_out(a, redis_client)  # A stalls, and its lock runs out...
        gateway.charge(token, 5)
        await b.tick()  # ...and B takes over, reads used=6 and publishes it
        assert b.stats.leader
        newer = redis_client.get(cache.records.key(digest))
        assert decode_cached(newer)[0].used_quota == 6
        assert published(redis_client, pubsub, cache.channel.name, "before") != []

        gate.release.set()
        await a_round
        assert not a.stats.leader
        assert published(redis_client, pubsub, cache.channel.name, "after") == []  # A published nothing
        assert redis_client.get(cache.records.key(digest)) == newer  # nor wrote
        assert redis_client.get(cache.leader_key) == b.lock.token.encode()
        pubsub.close()


class HeldStore(WrappedStore):
    """The real store, whose statements are counted as they are sent and held, once read, until
    the test lets them return; `full` is set once `wanted` are held at once."""

    def __init__(self, store: Any, wanted: int) -> None:
        super().__init__(store)
        self.wanted = wanted
        self.sent = self.held = 0
        self.full, self.release = asyncio.Event(), asyncio.Event()

    async def fetch_many(self, ids: Sequence[int]) -> dict[int, tuple[bytes, TokenRecord]]:
        self.sent += 1
        found: dict[int, tuple[bytes, TokenRecord]] = await self.store.fetch_many(ids)
        self.held += 1
        if self.held == self.wanted:
            self.full.set()
        await self.release.wait()
        return found


def note_every_token(gateway: Gateway) -> dict[bytes, int]:
    """{digest: id} of every token of the gateway, as polls would note them."""
    return {key_digest(str(key).encode()): int(i) for i, key in gateway.db.execute("SELECT id, `key` FROM tokens")}


@pytest.mark.parametrize(
    ("pool", "others", "ahead"),
    [(4, 0, 3), (8, 0, 4), (1, 0, 1), (2, 0, 1), (4, 2, 1)],
    ids=["default-pool", "large-pool", "one-connection", "two-connections", "two-held-by-others"],
)
async def test_a_round_sends_statements_ahead_while_two_connections_are_spare_and_its_lock_holds(
    gateway: Gateway,
    app_client: AppClient,
    settings: Settings,
    redis_url: str,
    redis_client: redis.Redis,
    pool: int,
    others: int,
    ahead: int,
) -> None:
    """On a saturated worker every await of a round waits out a whole pass of the event loop, so
    a round keeps up to READ_AHEAD statements in flight rather than one, but sends one ahead of
    its others only while the store has two connections spare: it never waits for a connection
    behind its own round (where its time would run out), and the requests' misses keep one.
    Each is sent only while the lock is ours: once the round finds it lost, it sends no
    statement more, writes and publishes nothing."""
    gateway.add_tokens((usage_service.refresh.READ_AHEAD + 2) * usage_service.refresh.REFRESH_CHUNK)
    async with app_client(redis_url=redis_url, refresh_interval=0, db_pool_size=pool) as (app, _):
        cache, store = app.state.redis, app.state.store
        held = HeldStore(store, wanted=ahead)
        a = Refresher(app.state.lookup, held, cache, dataclasses.replace(settings, redis_url=redis_url))  # type: ignore[arg-type]
        await cache.hot_set.note(note_every_token(gateway), time.time())
        pubsub = redis_client.pubsub()
        pubsub.subscribe(cache.channel.name)
        published(redis_client, pubsub, cache.channel.name, "subscribed")

        store._in_flight += others  # statements of others (request misses, the log's) under way
        a_round = asyncio.create_task(a.tick())
        async with asyncio.timeout(10):
            await held.full.wait()
        for _ in range(20):  # the round's turns: no statement more while these are held
            await asyncio.sleep(0)
        assert held.sent == ahead
        lock_runs_out(a, redis_client)
        held.release.set()
        await a_round
        store._in_flight -= others
        assert held.sent == ahead  # none sent once the lock was found lost
        assert not a.stats.leader
        assert published(redis_client, pubsub, cache.channel.name, "after") == []
        assert redis_client.keys(cache.records.prefix + "*") == []
        pubsub.close()


async def test_a_round_publishes_its_news_before_it_renews_unchanged_records(
    gateway: Gateway, app_client: AppClient, settings: Settings, redis_url: str, redis_client: redis.Redis
) -> None:
    """Renewing 10,000 unchanged records in Redis takes a saturated worker a good part of a
    second, and nobody waits for it: a change is published (and the round confirmed) first."""
    gateway.add_tokens(50)
    token = gateway.add_token(used=1)
    async with app_client(redis_url=redis_url, refresh_interval=0) as (app, _):
        cache = app.state.redis
        a = Refresher(app.state.lookup, app.state.store, cache, dataclasses.replace(settings, redis_url=redis_url))
        await cache.hot_set.note(note_every_token(gateway), time.time())
        await a.tick()  # first sight: every record written and published
        assert a.stats.leader
        a.cache_ttl = 0.0  # every record written so far is due for renewal
        pubsub = redis_client.pubsub()
        pubsub.subscribe(cache.channel.name)
        published(redis_client, pubsub, cache.channel.name, "subscribed")

        store_many, renewal = cache.records.store_many, Gate()

        async def held_renewal(values: dict[bytes, bytes], ttl: float) -> None:
            if len(values) > 1:
                await renewal.hold()
            await store_many(values, ttl)

        cache.records.store_many = held_renewal
        gateway.charge(token, 5)
        a_round = asyncio.create_task(a.tick())
        async with asyncio.timeout(10):
            await renewal.reached.wait()
        news = published(redis_client, pubsub, cache.channel.name, "renewing")
        digest = key_digest(token.key.encode())
        assert len(news) == 2 and digest.hex().encode() in news[0] and news[1].startswith(b"@")  # change, confirmation
        assert decode_cached(redis_client.get(cache.records.key(digest)))[0].used_quota == 6
        renewal.release.set()
        await a_round
        assert a.stats.leader
        pubsub.close()


async def test_a_deposed_leader_whose_round_found_nothing_new_confirms_nothing(
    gateway: Gateway, app_client: AppClient, settings: Settings, redis_url: str, redis_client: redis.Redis
) -> None:
    """A chunk that read nothing new sends nothing and is not checked after its read; the round's
    confirmation still is: leader A, deposed while it read, must not vouch for a round B led."""
    token = gateway.add_token(used=1)
    async with app_client(redis_url=redis_url, refresh_interval=0) as (app, _):
        lookup, store, cache = app.state.lookup, app.state.store, app.state.redis
        fenced = dataclasses.replace(settings, redis_url=redis_url, refresh_interval=1.0)
        a = Refresher(lookup, store, cache, fenced)
        b = Refresher(lookup, store, cache, fenced)
        await cache.hot_set.note({key_digest(token.key.encode()): token.id}, time.time())
        await a.tick()  # A leads, and has seen the token
        assert a.stats.leader
        pubsub = redis_client.pubsub()
        pubsub.subscribe(cache.channel.name)
        published(redis_client, pubsub, cache.channel.name, "subscribed")

        gate = Gate()
        a.store = GatedStore(store, gate)  # type: ignore[assignment]
        a_round = asyncio.create_task(a.tick())
        await gate.reached.wait()  # A has read the token again, unchanged
        lock_runs_out(a, redis_client)  # A stalls, its lock runs out, and B leads a round
        await b.tick()
        assert b.stats.leader
        assert published(redis_client, pubsub, cache.channel.name, "before") != []

        gate.release.set()
        await a_round
        assert not a.stats.leader
        assert published(redis_client, pubsub, cache.channel.name, "after") == []  # no confirmation
        pubsub.close()


async def test_the_lock_is_long_only_while_a_round_runs(
    gateway: Gateway, app_client: AppClient, settings: Settings, redis_url: str, redis_client: redis.Redis
) -> None:
    """During a statement the lock outlives it; between rounds it is short again, so a leader
    that dies there is replaced within max(3 intervals, 1 s)."""
    token = gateway.add_token()
    async with app_client(redis_url=redis_url, refresh_interval=0) as (app, _):
        cache, gate = app.state.redis, Gate()
        refresher = Refresher(
            app.state.lookup,
            GatedStore(app.state.store, gate),
            cache,
            dataclasses.replace(settings, redis_url=redis_url, refresh_interval=0.1, db_timeout=2.0),
        )
        assert refresher.round_lock_ttl > refresher.lock_ttl == 1.0
        await cache.hot_set.note({key_digest(token.key.encode()): token.id}, time.time())
        round_ = asyncio.create_task(refresher.tick())
        await gate.reached.wait()
        assert redis_client.pttl(cache.leader_key) > refresher.lock_ttl * 1000
        gate.release.set()
        await round_
        assert refresher.stats.leader and refresher.stats.tokens == 1
        assert 0 < redis_client.pttl(cache.leader_key) <= refresher.lock_ttl * 1000


async def test_a_late_write_never_replaces_a_newer_record(
    gateway: Gateway, app_client: AppClient, redis_url: str, redis_client: redis.Redis
) -> None:
    """Every record write is only-if-newer: the refresher's bulk write as well as a request's."""
    token = gateway.add_token(used=1)
    async with app_client(redis_url=redis_url, refresh_interval=0) as (app, client):
        assert await used(client, token) == 1
        digest = key_digest(token.key.encode())
        record = app.state.lookup.local.get(digest, 0.0)
        cache, now = app.state.redis, time.time()  # later than the request's own write-behind
        await cache.records.store_many({digest: encode_cached(record, now + 20)}, 60)
        await cache.records.store_many({digest: encode_cached(record, now + 10)}, 60)  # a deposed leader's
        assert decode_cached(redis_client.get(cache.records.key(digest)))[1] == now + 20
        await cache.records.store_many({digest: encode_cached(record, now + 30)}, 60)
        assert decode_cached(redis_client.get(cache.records.key(digest)))[1] == now + 30
        # A request's write-behind of what it read earlier than that: left alone as well.
        cache.records.write(digest, encode_cached(record, now + 25), 60)
        await cache.records._writer
        assert decode_cached(redis_client.get(cache.records.key(digest)))[1] == now + 30
        cache.records.write(digest, encode_cached(record, now + 35), 60)
        await cache.records._writer
        assert decode_cached(redis_client.get(cache.records.key(digest)))[1] == now + 35


class StoreGatedBefore(WrappedStore):
    """The real store, whose fetch_many waits at a gate before it reads: a statement that waits
    for a connection, a lock or the network after the round took its turn."""

    def __init__(self, store: Any, gate: Gate) -> None:
        super().__init__(store)
        self.gate = gate

    async def fetch_many(self, ids: Sequence[int]) -> dict[int, tuple[bytes, TokenRecord]]:
        await self.gate.hold()
        found: dict[int, tuple[bytes, TokenRecord]] = await self.store.fetch_many(ids)
        return found


async def test_a_request_that_read_before_the_leader_does_not_replace_what_it_read(
    gateway: Gateway, app_client: AppClient, redis_url: str, redis_client: redis.Redis
) -> None:
    """The leader's round starts, its statement waits; meanwhile a request reads the row and
    writes it behind; the gateway charges; then the leader's statement reads the charge. Redis
    must hold what the leader read, which its invalidation and confirmations vouch for: had the
    request's older record stayed there (it was stamped later, when its read began), every
    worker would take it back after the invalidation and have it confirmed round after round."""
    token, sentinel = gateway.add_token(used=1), gateway.add_token()
    digest = key_digest(token.key.encode())
    async with app_client(redis_url=redis_url, **MANUAL_ROUNDS) as (app, client):
        await started(app)
        refresher, records = app.state.refresher, app.state.redis.records
        gate = Gate()
        refresher.store = StoreGatedBefore(app.state.store, gate)
        await app.state.redis.hot_set.note({digest: token.id}, time.time())

        round_ = asyncio.create_task(refresher.tick())
        await gate.reached.wait()  # the leader's round is under way, its statement not yet run
        assert await used(client, token) == 1  # a request reads the row and writes it behind
        await until(lambda: redis_client.get(records.key(digest)) is not None)
        gateway.charge(token, 5)
        gate.release.set()
        await round_  # the leader reads used=6, writes it, invalidates and confirms
        assert refresher.stats.leader
        assert decode_cached(redis_client.get(records.key(digest)))[0].used_quota == 6
        await heard_so_far(app, client, sentinel)
        assert await used(client, token) == 6
        await refresher.tick()  # a round that finds nothing new vouches for what is held
        await heard_so_far(app, client, sentinel)
        assert await used(client, token) == 6


async def test_a_polled_token_deleted_is_let_go_with_no_negative_cache(
    gateway: Gateway, app_client: AppClient, redis_url: str
) -> None:
    """With USAGE_NEGATIVE_TTL=0 the leader that finds a polled token deleted still writes over
    its record in Redis: a worker the invalidation reaches goes to the database (401), rather
    than take the old record back from Redis and have later rounds vouch for it."""
    token, sentinel = gateway.add_token(used=1), gateway.add_token()
    digest = key_digest(token.key.encode())
    async with app_client(redis_url=redis_url, negative_ttl=0.0, **MANUAL_ROUNDS) as (app, client):
        await started(app)
        refresher = app.state.refresher
        assert await used(client, token) == 1
        await app.state.redis.hot_set.note({digest: token.id}, time.time())
        await refresher.tick()  # the leader sees it: writes it to Redis, names it, confirms
        await heard_so_far(app, client, sentinel)

        gateway.update_token(token, deleted_at="2026-01-01 00:00:00")
        for _ in range(2):  # the round that sees it gone, and one that finds nothing new
            await refresher.tick()
            await heard_so_far(app, client, sentinel)
            assert (await client.get(URL, headers=token.bearer)).status_code == 401


async def test_many_records_go_out_in_one_call_each_only_over_an_older_one(
    gateway: Gateway, app_client: AppClient, redis_url: str, redis_client: redis.Redis
) -> None:
    """The leader's bulk write sends a chunk's records as one argument: each lands on its own
    key, whole (a name with a newline, commas and brackets included), only over an older one."""
    tokens = [gateway.add_token(used=i, name=name) for i, name in enumerate(["a\nb", "[x,y]", "plain"])]
    async with app_client(redis_url=redis_url, refresh_interval=0) as (app, client):
        cache, now = app.state.redis, time.time() + 10  # later than the requests' own write-behinds
        records = {}
        for i, token in enumerate(tokens):
            assert await used(client, token) == i
            digest = key_digest(token.key.encode())
            records[digest] = app.state.lookup.local.get(digest, 0.0)
        first, second, third = records
        await cache.records.store_many({second: encode_cached(records[second], now + 5)}, 60)  # newer already
        sent: list[int] = []
        eval_each = cache.guard.eval_each

        async def counted(script: Any, calls: Sequence[Any]) -> list[Any]:
            sent.append(len(calls))
            return await eval_each(script, calls)

        cache.guard.eval_each = counted
        await cache.records.store_many({d: encode_cached(r, now) for d, r in records.items()}, 60)
        del cache.guard.eval_each
        assert sent == [1]  # one pipeline of one script call
        stored = {d: decode_cached(redis_client.get(cache.records.key(d))) for d in records}
        assert stored == {
            first: (records[first], now),
            second: (records[second], now + 5),
            third: (records[third], now),
        }
        assert stored[first][0].name == "a\nb"
        assert 0 < redis_client.pttl(cache.records.key(first)) <= 60_000


@pytest.mark.parametrize("redis_timeout", [0.25, 2.0])
@pytest.mark.parametrize("db_timeout", [0.3, 2.0, 10.0])
@pytest.mark.parametrize("interval", [0.1, 1.0])
async def test_the_leader_lock_outlives_a_statement_and_a_chunks_writes_twice(
    settings: Settings, db_timeout: float, interval: float, redis_timeout: float
) -> None:
    """A lock extended before a statement is still held after it, and one checked before a
    chunk's writes (two bulk calls and the check or confirmation after) still held after them."""
    settings = dataclasses.replace(settings, db_timeout=db_timeout, refresh_interval=interval)
    guard = RedisGuard(redis.asyncio.Redis(), timeout=redis_timeout, breaker=CircuitBreaker(3, 1.0))
    refresher = Refresher(None, None, SharedRedis(guard, prefix="p:"), settings)  # type: ignore[arg-type]
    assert refresher.round_lock_ttl >= 2 * (db_timeout + STATEMENT_GUARD)
    assert refresher.round_lock_ttl >= 2 * 3 * guard.batch_timeout
    # Between rounds, a leader that died is replaced as soon as it stops renewing.
    assert refresher.lock_ttl == max(3 * interval, 1.0)


async def test_the_lock_is_checked_by_its_lease_and_extended_before_it_runs_short(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """A round's check (`hold`) needs no round trip while the holder's last extension, counted
    from when it was sent, has the step's time left: the lock can only expire with time. Once
    less is left it is extended, and a lock that is gone by then is found lost."""
    now = [100.0]
    guard = RedisGuard(redis.asyncio.Redis.from_url(redis_url), timeout=2.0, breaker=CircuitBreaker(3, 1.0))
    lock = SharedRedis(guard, prefix=f"lease{time.time_ns()}:").leader_lock()
    lock.clock = lambda: now[0]
    try:
        assert not await lock.hold(1.0, 10.0)  # never taken: extending finds nothing to extend
        assert await lock.lead(10.0) is Leadership.TOOK
        now[0] += 8.0  # 2 s of the lease left (less the clock drift allowed): a 1 s step fits
        redis_client.pexpire(lock.name, 60_000)  # (seen below if it is extended)
        assert await lock.hold(1.0, 10.0)
        assert redis_client.pttl(lock.name) > 10_000  # not extended: no round trip
        now[0] += 0.95  # not any more: extended, to 10 s from now
        assert await lock.hold(1.0, 10.0)
        assert 0 < redis_client.pttl(lock.name) <= 10_000
        assert await lock.hold(9.0, 10.0)  # 9.9 s of the new lease left: no round trip
        redis_client.delete(lock.name)  # gone before its time (a failover that lost it)...
        assert await lock.hold(1.0, 10.0)  # ...goes unseen for the rest of the lease...
        now[0] += 9.5
        assert not await lock.hold(1.0, 10.0)  # ...and is found lost at the next extension
        assert not await lock.hold(1.0, 10.0)  # and stays lost
        assert redis_client.get(lock.name) is None
    finally:
        await guard.aclose()


async def test_the_channel_reads_fingerprints_and_takes_an_unreadable_one_as_none() -> None:
    """A part whose fingerprint cannot be read keeps nothing a worker holds (None): the safe reading."""
    a, b, c = bytes(range(32)), bytes(range(1, 33)), bytes(range(2, 34))
    message = f"{a.hex()}={'ab' * 8},{b.hex()},{c.hex()}=zz".encode()
    assert _parse_digests(message) == [(a, bytes.fromhex("ab" * 8)), (b, None), (c, None)]
    history = _parse_history(b"#1.5:7:90:1:0a1b:12=" + b"cd" * 8 + b",13")
    assert history == (1.5, 7, True, [(12, bytes.fromhex("cd" * 8)), (13, None)], "0a1b", 90)
    # A leader of the version before sends no largest id.
    history = _parse_history(b"#1.5:7:1:0a1b:12=" + b"cd" * 8 + b",13")
    assert history == (1.5, 7, True, [(12, bytes.fromhex("cd" * 8)), (13, None)], "0a1b", None)


class WallClock:
    """A `time` module for one instance: its wall clock set by hand (`wall`), its monotonic
    clock `mono` (both as the test moves them)."""

    def __init__(self, wall: float, mono: float) -> None:
        self.wall, self.mono = wall, mono

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono


async def test_a_confirmation_from_a_leader_whose_clock_runs_ahead_holds_a_cache_ttl_at_most(
    gateway: Gateway, app_client: AppClient, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader's wall clock 30 s ahead of a worker's: its confirmations keep what the worker
    holds fresh for USAGE_CACHE_TTL from now at most, not 30 s more (it showed a charge made
    once the rounds stopped, a stalled leader, 35 s late)."""
    clock = Clock()
    monkeypatch.setattr(usage_service.lookup, "time", clock)
    ahead = WallClock(time.time() + 30.0, time.monotonic())
    monkeypatch.setattr(usage_service.refresh, "time", ahead)
    token, sentinel = gateway.add_token(used=1), gateway.add_token()
    async with app_client(redis_url=redis_url, **MANUAL_ROUNDS) as (app, client):  # USAGE_CACHE_TTL 5 s
        await started(app)
        assert await used(client, token) == 1
        ahead.wall, ahead.mono = time.time() + 30.0, time.monotonic()
        await app.state.refresher.tick()  # the leader reads it, names it, confirms
        await heard_so_far(app, client, sentinel)
        gateway.charge(token, 5)  # and then no round is heard
        clock.ahead = 10.0  # twice USAGE_CACHE_TTL after the round, by the worker's clock
        assert fresh_in_process(app, token) is None


def clocks_a_second_apart(monkeypatch: pytest.MonkeyPatch) -> tuple[WallClock, WallClock, float]:
    """Two instances' clocks, set on the lookup (the requests' instance, a second ahead) and on
    the refresher (the leader's): (the requests' clock, the leader's, the monotonic start)."""
    base, mono = float(int(time.time())), time.monotonic()
    worker, leader = WallClock(base + 1.0, mono), WallClock(base, mono)
    monkeypatch.setattr(usage_service.lookup, "time", worker)
    monkeypatch.setattr(usage_service.refresh, "time", leader)
    return worker, leader, mono


async def test_a_record_read_before_the_leaders_by_a_clock_ahead_is_not_taken_back(
    gateway: Gateway, app_client: AppClient, redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two instances whose wall clocks are a second apart share Redis. A request on the one
    ahead reads a token and writes it behind; the gateway charges; the leader, on the other,
    reads the charge 100 ms later, but its read is stamped earlier, so Redis keeps the
    request's record over it. Workers its invalidation sends to Redis must not take that record
    back (they did, and later rounds, finding the token unchanged, confirmed it for a minute):
    what they take must be the record the round named, else they read the database."""
    worker, leader, mono = clocks_a_second_apart(monkeypatch)
    token, sentinel = gateway.add_token(used=1), gateway.add_token()
    digest = key_digest(token.key.encode())
    async with app_client(redis_url=redis_url, **MANUAL_ROUNDS) as (app, client):
        await started(app)
        refresher, records = app.state.refresher, app.state.redis.records
        assert await used(client, token) == 1  # a miss: read from the database, written behind
        await until(lambda: redis_client.get(records.key(digest)) is not None)

        worker.wall += 0.1
        leader.wall += 0.1
        gateway.charge(token, 5)
        await app.state.redis.hot_set.note({digest: token.id}, leader.wall)
        await refresher.tick()  # reads used=6; its write is refused; it names the token
        await heard_so_far(app, client, sentinel)
        assert decode_cached(redis_client.get(records.key(digest)))[0].used_quota == 1  # (the refused write)
        served = [await used(client, token)]
        for second in range(1, 8):  # rounds a second apart, finding the token unchanged
            worker.wall += 1.0
            leader.wall += 1.0
            worker.mono = leader.mono = mono + second
            await refresher.tick()
            await heard_so_far(app, client, sentinel)
            served.append(await used(client, token))
        assert served == [6] * 8


async def test_a_token_named_again_is_the_newest_naming_a_worker_keeps(
    gateway: Gateway, app_client: AppClient, redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker keeps as many namings as its in-process layer holds records, the newest: a token
    the leader named long ago (its first sight) and names again now is among the newest. (Its
    naming kept the place of the first one and went first: the record from a clock ahead that
    the round's naming is there to refuse was taken back, and confirmed.)"""
    worker, leader, _ = clocks_a_second_apart(monkeypatch)
    token, sentinel = gateway.add_token(used=1), gateway.add_token()
    digest = key_digest(token.key.encode())
    others = [bytes([i]) * 32 for i in range(1, 5)]  # tokens this worker holds nothing of
    async with app_client(redis_url=redis_url, local_cache_size=5, **MANUAL_ROUNDS) as (app, client):
        await started(app)
        refresher, records, lookup = app.state.refresher, app.state.redis.records, app.state.lookup
        assert await used(client, token) == 1  # a miss: read from the database, written behind
        await until(lambda: redis_client.get(records.key(digest)) is not None)
        await app.state.redis.hot_set.note({digest: token.id}, leader.wall)
        await refresher.tick()  # the leader's first sight: the token named with what the worker holds
        await heard_so_far(app, client, sentinel)
        lookup.invalidate([(other, b"\xff" * 8) for other in others[:2]])

        worker.wall += 0.1
        leader.wall += 0.1
        gateway.charge(token, 5)
        await refresher.tick()  # reads used=6; its write is refused; it names the token again
        await heard_so_far(app, client, sentinel)
        assert decode_cached(redis_client.get(records.key(digest)))[0].used_quota == 1  # (the refused write)
        lookup.invalidate([(other, b"\xff" * 8) for other in others[2:]])  # a few namings more
        assert await used(client, token) == 6


async def test_a_charge_after_redis_restarted_empty_is_served_within_a_round(
    gateway: Gateway, app_client: AppClient, own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis restarts without persistence between two rounds: the hot set is gone, and the
    refresher's next call succeeds on a new connection, so it never fails. The worker, whose
    channel was lost and regained, notes its polled tokens again in its next round: a record it
    read after the restart is not confirmed by rounds that did not read it (until it noted them
    again of its own accord, 5 s later, a charge went unseen)."""
    clock = Clock()
    monkeypatch.setattr(usage_service.lookup, "time", clock)
    monkeypatch.setattr(usage_service.refresh, "time", clock)
    token, sentinel = gateway.add_token(used=1), gateway.add_token()
    async with app_client(redis_url=own_redis.url, **MANUAL_ROUNDS) as (app, client):
        await started(app)
        refresher, lookup = app.state.refresher, app.state.lookup
        assert await used(client, token) == 1
        await refresher.tick()
        await heard_so_far(app, client, sentinel)
        assert refresher.stats.leader

        own_redis.stop()
        own_redis.start()  # the same port, empty
        await until(lambda: app.state.redis.channel.losses >= 1 and lookup.invalidations_live, within=10)
        clock.ahead = 1.5  # past the entry's own TTL (its generation is over: not confirmed)
        assert await used(client, token) == 1  # read again from the database
        gateway.charge(token, 5)  # used=6

        served = await served_per_round(app, client, clock, range(2, 5), token, sentinel)
        assert served == [6, 6, 6]
