"""The data path: in-process layer, Redis, negative cache, single flight, Redis outages."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import AppClient
from support import Gateway, RedisServer, Token, redis_contents

pytestmark = [pytest.mark.asyncio, pytest.mark.redis_topologies]

URL = "/api/usage/token"


async def used(client: httpx.AsyncClient, token: Token) -> int:
    response = await client.get(URL, headers=token.bearer)
    assert response.status_code == 200, response.text
    return int(response.json()["data"]["total_used"])


async def test_polling_is_answered_in_process(gateway: Gateway, app_client: AppClient, redis_url: str) -> None:
    token = gateway.add_token()
    async with app_client(redis_url=redis_url, local_ttl=60, cache_ttl=60) as (app, client):
        for _ in range(20):
            await used(client, token)
        stats = app.state.lookup.stats
        assert app.state.store.statements == 1
        assert stats.db_reads == 1 and stats.redis_hits == 0 and stats.local_hits == 19


async def test_redis_is_shared_between_instances(gateway: Gateway, app_client: AppClient, redis_url: str) -> None:
    token = gateway.add_token()
    async with app_client(redis_url=redis_url) as (first, client):
        await used(client, token)
        assert first.state.store.statements == 1
    async with app_client(redis_url=redis_url) as (second, client):
        await used(client, token)
        assert second.state.lookup.stats.redis_hits == 1
        assert second.state.store.statements == 0


@pytest.mark.parametrize("layers", ["in-process", "redis"])
async def test_unknown_keys_are_remembered(
    gateway: Gateway, app_client: AppClient, request: pytest.FixtureRequest, layers: str
) -> None:
    overrides: dict[str, Any] = {"redis_url": request.getfixturevalue("redis_url")} if layers == "redis" else {}
    wrong = {"Authorization": "Bearer sk-" + "w" * 48}
    async with app_client(**overrides) as (app, client):
        for _ in range(10):
            assert (await client.get(URL, headers=wrong)).status_code == 401
        assert app.state.store.statements == 1
    if layers == "redis":
        async with app_client(**overrides) as (app, client):
            assert (await client.get(URL, headers=wrong)).status_code == 401
            assert app.state.store.statements == 0


async def test_negative_cache_can_be_turned_off(gateway: Gateway, app_client: AppClient) -> None:
    wrong = {"Authorization": "Bearer sk-" + "w" * 48}
    async with app_client(negative_ttl=0) as (app, client):
        for _ in range(5):
            await client.get(URL, headers=wrong)
        assert app.state.store.statements == 5


async def test_new_token_appears_after_negative_ttl(gateway: Gateway, app_client: AppClient) -> None:
    key = "n" * 48
    async with app_client(negative_ttl=0.2) as (_, client):
        assert (await client.get(URL, headers={"Authorization": f"Bearer {key}"})).status_code == 401
        gateway.add_token(key=key)
        assert (await client.get(URL, headers={"Authorization": f"Bearer {key}"})).status_code == 401
        await asyncio.sleep(0.3)
        assert (await client.get(URL, headers={"Authorization": f"Bearer {key}"})).status_code == 200


async def test_concurrent_misses_cost_one_query(gateway: Gateway, app_client: AppClient, redis_url: str) -> None:
    token = gateway.add_token()
    unknown = {"Authorization": "Bearer sk-" + "u" * 48}
    async with app_client(redis_url=redis_url) as (app, client):
        found = await asyncio.gather(*(client.get(URL, headers=token.bearer) for _ in range(50)))
        missing = await asyncio.gather(*(client.get(URL, headers=unknown) for _ in range(50)))
        assert {r.status_code for r in found} == {200}
        assert {r.status_code for r in missing} == {401}
        assert app.state.store.statements == 2
        assert app.state.lookup.stats.coalesced > 0


async def test_redis_holds_hashes_and_records_never_keys(
    gateway: Gateway, app_client: AppClient, redis_url: str, redis_client: redis.Redis
) -> None:
    tokens = [gateway.add_token(name=f"t{i}") for i in range(3)]
    unknown = "Q" * 48
    async with app_client(redis_url=redis_url, cache_ttl=30) as (app, client):
        for token in tokens:
            await used(client, token)
        await client.get(URL, headers={"Authorization": f"Bearer sk-{unknown}-7"})
        prefix = app.state.redis.records.prefix
        await app.state.refresher.tick()  # the hot set and the leader lock are in Redis too
    stored = redis_contents(redis_client)
    records = [name for name in stored if name.startswith(prefix.encode())]
    assert len(records) == 4
    assert len(stored) > len(records)
    everything = b"".join(k + v for k, v in stored.items())
    for key in [t.key for t in tokens] + [unknown]:
        assert key.encode() not in everything
        assert (prefix + hashlib.sha256(key.encode()).hexdigest()).encode() in stored
    for name in records:
        # Kept past their freshness for stale-if-error, but never forever.
        assert 0 < redis_client.pttl(name) <= (30 + app.state.lookup.stale_if_error) * 1000


async def test_corrupt_cache_value_is_a_miss(
    gateway: Gateway, app_client: AppClient, redis_url: str, redis_client: redis.Redis
) -> None:
    token = gateway.add_token(used=5)
    async with app_client(redis_url=redis_url) as (app, client):
        name = app.state.redis.records.prefix + hashlib.sha256(token.key.encode()).hexdigest()

        async def corrupt_values() -> float:  # (the counter is the process's: other tests' count too)
            lines = (await client.get("/metrics")).text.splitlines()
            return sum(float(line.split()[1]) for line in lines if line.startswith("usage_redis_corrupt_values_total "))

        before = await corrupt_values()
        redis_client.set(name, b"\x00not json at all")
        assert await used(client, token) == 5
        assert await corrupt_values() == before + 1
    assert redis_client.get(name) != b"\x00not json at all"  # overwritten by the fresh record


async def test_quota_change_is_served_within_the_ttl(gateway: Gateway, app_client: AppClient, redis_url: str) -> None:
    token = gateway.add_token()
    async with app_client(redis_url=redis_url, cache_ttl=0.5, local_ttl=0.5) as (_, client):
        assert await used(client, token) == 0
        gateway.charge(token, 42)
        charged = time.monotonic()
        while await used(client, token) != 42:
            assert time.monotonic() - charged < 0.5 + 1.0
            await asyncio.sleep(0.02)


async def test_in_process_layer_never_outlives_the_redis_record(
    gateway: Gateway, app_client: AppClient, redis_url: str
) -> None:
    """A record taken from Redis late in its life expires in-process when it would have in Redis."""
    token = gateway.add_token()
    # A TTL of 3 s leaves starting the second app (a Redis Cluster client, on a loaded machine) 2 s;
    # no refresher, which would write the charge to Redis meanwhile.
    slow = {"cache_ttl": 3.0, "local_ttl": 3.0, "refresh_interval": 0.0}
    async with app_client(redis_url=redis_url, **slow) as (_, first):
        assert await used(first, token) == 0
        written = time.monotonic()
        gateway.charge(token, 1)
        async with app_client(redis_url=redis_url, **slow) as (_, second):
            await asyncio.sleep(2.0 - (time.monotonic() - written))
            assert await used(second, token) == 0  # from Redis, 1 s of its TTL left
            await asyncio.sleep(3.3 - (time.monotonic() - written))
            assert await used(second, token) == 1


class BlackHole:
    """A TCP port that accepts connections and never answers, like a hung Redis."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole()
    yield hole
    hole.close()


async def test_hung_redis_is_not_waited_on(gateway: Gateway, app_client: AppClient, black_hole: BlackHole) -> None:
    tokens = [gateway.add_token() for _ in range(10)]
    url = f"redis://127.0.0.1:{black_hole.port}/0"
    async with app_client(redis_url=url, redis_timeout=0.1, redis_cooldown=60) as (app, client):
        slowest = 0.0
        for token in tokens:
            started = time.monotonic()
            await used(client, token)
            slowest = max(slowest, time.monotonic() - started)
        assert app.state.redis.guard.breaker.state == "open"
        # Before the circuit opened, a request paid at most a read and a write timeout.
        assert slowest < 1.0
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["redis"] == "unavailable"


async def test_concurrent_misses_wait_at_most_twice_the_redis_timeout(
    gateway: Gateway, app_client: AppClient, black_hole: BlackHole
) -> None:
    """Record reads are batched, two batches in flight: a miss behind them waits for one to give
    up, then for its own; no miss waits on a hung Redis longer than twice USAGE_REDIS_TIMEOUT."""
    tokens = [gateway.add_token() for _ in range(6)]
    timeout = 0.3
    url = f"redis://127.0.0.1:{black_hole.port}/0"
    async with app_client(redis_url=url, redis_timeout=timeout, redis_cooldown=60, refresh_interval=0) as (app, client):
        reached: list[float] = []
        fetch = app.state.store.fetch

        async def timed_fetch(key: str) -> Any:  # when each miss turns to the database
            reached.append(time.monotonic() - started)
            return await fetch(key)

        app.state.store.fetch = timed_fetch
        started = time.monotonic()
        answers = await asyncio.gather(*(client.get(URL, headers=t.bearer) for t in tokens))
    assert [a.status_code for a in answers] == [200] * len(tokens)
    assert len(reached) == len(tokens)
    assert max(reached) < 2 * timeout + 0.25, reached


async def test_redis_down_at_start(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token(used=3)
    async with app_client(redis_url="redis://127.0.0.1:1/0") as (_, client):
        assert await used(client, token) == 3
        assert (await client.get("/readyz")).json()["redis"] == "unavailable"


async def test_redis_killed_and_restarted(gateway: Gateway, app_client: AppClient, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    tokens = [gateway.add_token() for _ in range(30)]
    try:
        async with app_client(redis_url=server.url, redis_timeout=0.2, redis_cooldown=0.3, local_ttl=0) as (app, c):
            for token in tokens[:10]:
                assert await used(c, token) == 0
            server.stop()
            slowest = 0.0
            for token in tokens:  # all of them, cached in Redis or not: answered from the database
                started = time.monotonic()
                assert await used(c, token) == 0
                slowest = max(slowest, time.monotonic() - started)
            assert slowest < 1.0
            assert app.state.redis.guard.breaker.state in ("open", "half-open")

            server.start()
            client = redis.Redis.from_url(server.url)
            deadline = time.monotonic() + 5
            while client.dbsize() == 0:
                assert time.monotonic() < deadline, "the service did not return to Redis"
                await used(c, tokens[0])
                await asyncio.sleep(0.05)
            client.close()
            assert app.state.redis.guard.breaker.state == "closed"
    finally:
        server.stop()


async def test_replaced_database_file_is_followed(gateway: Gateway, app_client: AppClient, tmp_path: Path) -> None:
    """A gateway restore swaps the file: the service reads the new one without a restart."""
    token = gateway.add_token(used=1)
    async with app_client(cache_ttl=0.1, local_ttl=0.1) as (_, client):
        assert await used(client, token) == 1
        restored = Gateway(tmp_path / "restore.db")
        restored.add_token(key=token.key, user_id=restored.add_user(), used=2)
        restored.close()
        os.replace(restored.path, gateway.path)
        deadline = time.monotonic() + 5
        while await used(client, token) != 2:
            assert time.monotonic() < deadline, "still reading the replaced file"
            await asyncio.sleep(0.05)


async def test_briefly_missing_database_file(gateway: Gateway, app_client: AppClient, tmp_path: Path) -> None:
    token, other = gateway.add_token(used=1), gateway.add_token(used=5)
    async with app_client(cache_ttl=0.1, local_ttl=0.1) as (_, client):
        assert await used(client, token) == 1
        aside = tmp_path / "aside.db"
        os.replace(gateway.path, aside)
        await asyncio.sleep(1.2)  # long enough for the service to notice the file is gone
        response = await client.get(URL, headers=other.bearer)
        # Open connections hold the file itself, not its name: they go on reading it meanwhile.
        assert response.status_code == 200
        os.replace(aside, gateway.path)
        deadline = time.monotonic() + 5
        while (await client.get(URL, headers=other.bearer)).status_code != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert await used(client, other) == 5


@pytest.mark.redis_topologies("standalone", "sentinel")  # counts one server's commands; Cluster's own test splits them
async def test_a_burst_of_misses_is_batched(
    gateway: Gateway, app_client: AppClient, redis_url: str, redis_client: redis.Redis
) -> None:
    """Concurrent misses for different keys share statements and Redis round trips."""
    tokens = [gateway.add_token(used=i) for i in range(60)]
    unknown = [{"Authorization": f"Bearer sk-{i:048d}"} for i in range(60)]
    async with app_client(redis_url=redis_url, db_pool_size=1, refresh_interval=0) as (app, client):
        redis_client.config_resetstat()
        found, missing = await asyncio.gather(
            asyncio.gather(*(client.get(URL, headers=t.bearer) for t in tokens)),
            asyncio.gather(*(client.get(URL, headers=h) for h in unknown)),
        )
        assert [r.json()["data"]["total_used"] for r in found] == list(range(60))
        assert {r.status_code for r in missing} == {401}
        assert app.state.lookup.stats.db_reads == 120
        assert app.state.store.statements < 120 / 4
        # Written behind the answers.
        deadline = time.monotonic() + 5
        while redis_client.dbsize() < 120:
            assert time.monotonic() < deadline, "the cache was not written behind the answers"
            await asyncio.sleep(0.02)
        calls = {name: stat["calls"] for name, stat in redis_client.info("commandstats").items()}
        # Reads went out as a few MGETs, writes as a few script calls (their GETs and SETs run
        # inside Redis): a handful of round trips for 120 misses.
        assert calls["cmdstat_mget"] < 120 / 4
        assert calls["cmdstat_evalsha"] < 120 / 4
