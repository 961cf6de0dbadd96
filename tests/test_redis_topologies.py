"""Redis topologies: settings, Cluster's hash slots, the real process on each topology, and a
Sentinel failover under load. (The data-path, refresher and contract tests also run on every
topology: see `redis_topologies` in conftest.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio
from conftest import AppClient
from redis_topologies import RedisClusterNodes, RedisTopology, SentinelGroup
from support import Gateway, Service, free_port

from usage_service._circuit import CircuitBreaker
from usage_service._redis_guard import RedisGuard, RedisUnavailable
from usage_service.config import ConfigError, load_settings
from usage_service.failure_counter import FailureCounter
from usage_service.history import Tail
from usage_service.hotset import parse_hot
from usage_service.invalidation import MESSAGE_DIGESTS, _parse_digests
from usage_service.leadership import Leadership
from usage_service.records import decode_cached, encode_cached
from usage_service.redis_client import create_client
from usage_service.shared import SharedRedis

URL = "/api/usage/token"


# --- the servers' ports -----------------------------------------------------------------------


def test_free_ports_are_never_handed_out_twice() -> None:
    """A Sentinel group or a Cluster takes all its ports (the Cluster's bus ports too) before the
    first of its servers starts. The kernel may hand the same free port to two binds in a row:
    two servers of one group on one port, and the session's fixture failed to start (about one
    session in a few hundred). Enough picks here that such a repeat is all but certain."""
    ports = [free_port() for _ in range(1000)]
    assert len(set(ports)) == len(ports)


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({"REDIS_CONN_STRING": "redis://cache:6379/0"}, {"redis_mode": "standalone"}, id="default"),
        pytest.param(
            {
                "REDIS_CONN_STRING": "redis://:pw@ignored:6379/2",
                "USAGE_REDIS_MODE": "Sentinel",
                "USAGE_REDIS_SENTINELS": "s1:26379, s2 ,[::1]:5000",
                "USAGE_REDIS_MASTER_NAME": "gateway",
                "USAGE_REDIS_SENTINEL_PASSWORD": "sentinel-secret",
            },
            {
                "redis_mode": "sentinel",
                "redis_sentinels": (("s1", 26379), ("s2", 26379), ("::1", 5000)),
                "redis_master_name": "gateway",
                "redis_sentinel_password": "sentinel-secret",
            },
            id="sentinel",
        ),
        pytest.param(
            {
                "REDIS_CONN_STRING": "redis://n1:7000",
                "USAGE_REDIS_MODE": "cluster",
                "USAGE_REDIS_CLUSTER_NODES": "n2:7001",
            },
            {"redis_mode": "cluster", "redis_cluster_nodes": (("n2", 7001),)},
            id="cluster",
        ),
    ],
)
def test_reads_the_topology(env: dict[str, str], expected: dict[str, object]) -> None:
    settings = load_settings(env)
    assert {name: getattr(settings, name) for name in expected} == expected
    assert "sentinel-secret" not in repr(settings)


@pytest.mark.parametrize(
    ("env", "variable", "words"),
    [
        pytest.param({"USAGE_REDIS_MODE": "ring"}, "USAGE_REDIS_MODE", "standalone, sentinel, cluster", id="bad-mode"),
        pytest.param({"USAGE_REDIS_MODE": "cluster"}, "USAGE_REDIS_MODE", "REDIS_CONN_STRING", id="no-url"),
        pytest.param(
            {"REDIS_CONN_STRING": "redis://x", "USAGE_REDIS_MODE": "sentinel"},
            "USAGE_REDIS_SENTINELS",
            "host:port",
            id="sentinel-without-sentinels",
        ),
        pytest.param(
            {"REDIS_CONN_STRING": "redis://x", "USAGE_REDIS_SENTINELS": "s1"},
            "USAGE_REDIS_SENTINELS",
            "USAGE_REDIS_MODE",
            id="sentinels-without-sentinel-mode",
        ),
        pytest.param(
            {"REDIS_CONN_STRING": "redis://x", "USAGE_REDIS_MODE": "sentinel", "USAGE_REDIS_SENTINELS": "s1:port"},
            "USAGE_REDIS_SENTINELS",
            "'s1:port' is not one",
            id="bad-sentinel-port",
        ),
        pytest.param(
            {"REDIS_CONN_STRING": "redis://x", "USAGE_REDIS_MODE": "sentinel", "USAGE_REDIS_SENTINELS": " , "},
            "USAGE_REDIS_SENTINELS",
            "at least one",
            id="empty-sentinel-list",
        ),
        pytest.param(
            {"REDIS_CONN_STRING": "redis://x:6379/3", "USAGE_REDIS_MODE": "cluster"},
            "REDIS_CONN_STRING",
            "database 0",
            id="cluster-database",
        ),
        pytest.param(
            {"REDIS_CONN_STRING": "unix:///run/redis.sock", "USAGE_REDIS_MODE": "cluster"},
            "REDIS_CONN_STRING",
            "unix://",
            id="cluster-unix-socket",
        ),
        pytest.param(
            {"REDIS_CONN_STRING": "redis://x", "USAGE_REDIS_CLUSTER_NODES": "n2:7001"},
            "USAGE_REDIS_CLUSTER_NODES",
            "USAGE_REDIS_MODE",
            id="cluster-nodes-without-cluster-mode",
        ),
    ],
)
def test_bad_topology_settings_name_the_variable(env: dict[str, str], variable: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert str(info.value).startswith(f"{variable}: ")
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("env", "client_class"),
    [
        pytest.param({"REDIS_CONN_STRING": "redis://127.0.0.1:1/0"}, redis.asyncio.Redis, id="standalone"),
        pytest.param(
            {"REDIS_CONN_STRING": "rediss://:pw@x/1", "USAGE_REDIS_MODE": "sentinel", "USAGE_REDIS_SENTINELS": "s:1"},
            redis.asyncio.Redis,
            id="sentinel",
        ),
        pytest.param(
            {"REDIS_CONN_STRING": "redis://127.0.0.1:1", "USAGE_REDIS_MODE": "cluster"},
            redis.asyncio.RedisCluster,
            id="cluster",
        ),
    ],
)
async def test_one_function_builds_the_client_for_each_topology(env: dict[str, str], client_class: type) -> None:
    settings = load_settings(env)
    client = create_client(settings)  # connects lazily: nothing needs to listen
    try:
        assert isinstance(client, client_class)
        if settings.redis_mode == "sentinel":
            pool = client.connection_pool
            assert pool.service_name == "mymaster"  # type: ignore[attr-defined]
            assert pool.connection_kwargs["password"] == "pw" and pool.connection_kwargs["db"] == 1
            assert "SSL" in pool.connection_class.__name__  # rediss:// means TLS to the master
            assert pool.max_connections == 32
    finally:
        await client.aclose()


async def test_an_unexpected_client_error_is_redis_unavailable(redis_url: str) -> None:
    """Whatever a client raises in a failover corner, the request path sees a miss, never a 500."""
    guard = RedisGuard(
        create_client(load_settings({"REDIS_CONN_STRING": redis_url})), timeout=1.0, breaker=CircuitBreaker(3, 60)
    )

    async def surprise() -> None:
        await guard.client.ping()
        raise KeyError("a reply that does not parse")

    try:
        for _ in range(3):
            with pytest.raises(RedisUnavailable):
                await guard.run(surprise)
        assert guard.errors == 3 and guard.breaker.is_open
    finally:
        await guard.aclose()


# --- Cluster: keys spread over slots and nodes -----------------------------------------------


async def test_records_spread_over_every_cluster_node(
    gateway: Gateway, app_client: AppClient, redis_cluster: RedisClusterNodes
) -> None:
    """A burst of misses reads and writes across many slots in one go, and the keys land on every node."""
    topology = redis_cluster.topology()
    tokens = [gateway.add_token(used=i) for i in range(90)]
    unknown = [{"Authorization": f"Bearer sk-{i:048d}"} for i in range(30)]
    # A generous Redis timeout: this is about where the keys land, and a burst of 120 misses
    # through a cluster pipeline can take longer than the default 0.25 s on a loaded machine.
    settings = {"redis_timeout": 2.0, **topology.mode_settings}
    async with app_client(redis_url=topology.url, db_pool_size=1, **settings) as (app, client):
        prefix = app.state.redis.records.prefix
        found, missing = await asyncio.gather(
            asyncio.gather(*(client.get(URL, headers=t.bearer) for t in tokens)),
            asyncio.gather(*(client.get(URL, headers=h) for h in unknown)),
        )
        assert [r.json()["data"]["total_used"] for r in found] == list(range(90))
        assert {r.status_code for r in missing} == {401}
        deadline = time.monotonic() + 10
        while sum(per_node := redis_cluster.keys_per_node(prefix + "*")) < 120:
            assert time.monotonic() < deadline, f"records and negative entries not all written: {per_node}"
            await asyncio.sleep(0.05)
        assert all(count > 0 for count in per_node), per_node
        assert app.state.redis.guard.errors == 0
        # A second instance reads them all back through Redis (MGET split by slot), not the database.
        async with app_client(redis_url=topology.url, **topology.mode_settings) as (second, other):
            again = await asyncio.gather(*(other.get(URL, headers=t.bearer) for t in tokens))
            assert [r.json()["data"]["total_used"] for r in again] == list(range(90))
            assert second.state.lookup.stats.db_reads == 0
            assert second.state.lookup.stats.redis_hits == 90


async def test_a_node_that_lost_its_scripts_runs_them_again_and_nothing_counts_twice(
    redis_cluster: RedisClusterNodes,
) -> None:
    """One node without the script (restarted, promoted) while the others have it: the script is
    loaded again and only the calls that node refused are made again. (Making every call again
    counted the failures on the other nodes twice.)"""
    guard = RedisGuard(
        create_client(load_settings(redis_cluster.topology().env)), timeout=5.0, breaker=CircuitBreaker(3, 60)
    )
    counter = FailureCounter(guard, prefix=f"t{time.time_ns()}:authfail:")
    buckets = {f"10.0.0.{i}": 1 for i in range(30)}
    try:
        await counter.add(buckets, 60)
        assert all(count > 0 for count in redis_cluster.keys_per_node(counter.prefix + "*"))  # on every node
        with redis.Redis(port=redis_cluster.nodes[0].port) as node:
            node.script_flush()
        counts = await counter.add(buckets, 60)
        assert {bucket: n for bucket, (n, _) in counts.items()} == dict.fromkeys(buckets, 2)
        assert guard.errors == 0
    finally:
        await guard.aclose()


@pytest.mark.redis_topologies
async def test_every_script_survives_a_redis_that_lost_its_scripts(redis_topology: RedisTopology) -> None:
    """Each concern's scripts are loaded on first use, and again wherever Redis forgot them (a
    restart, a failover, a new Cluster node): records, hot set, leader lock, failure counts."""
    guard = RedisGuard(create_client(load_settings(redis_topology.env)), timeout=5.0, breaker=CircuitBreaker(3, 60))
    shared = SharedRedis(guard, prefix=f"t{time.time_ns()}:")
    lock = shared.leader_lock()
    polled = {hashlib.sha256(str(i).encode()).digest(): i for i in range(50)}  # over many slots
    client = redis_topology.client()
    try:
        for round_ in range(2):
            client.script_flush()  # on Cluster, on every node
            now = time.time()
            await shared.records.store_many(dict.fromkeys(polled, encode_cached(None, now)), 60)
            assert [decode_cached(v) for v in await guard.mget([shared.records.key(d) for d in polled])] == [
                (None, now)
            ] * len(polled)
            await shared.hot_set.note(polled, now)
            assert parse_hot(await shared.hot_set.members(now - 60, 100)) == polled
            assert await lock.lead(5) is (Leadership.KEPT if round_ else Leadership.TOOK)
            assert await lock.extend(5)
            assert (await shared.failures.add({"10.0.0.1": 1}, 60))["10.0.0.1"][0] == round_ + 1
        await lock.release()
        assert client.get(lock.name) is None
        assert guard.errors == 0
    finally:
        client.close()
        await shared.close()


@pytest.mark.redis_topologies
async def test_the_history_tails_are_kept_and_forgotten_on_each_topology(redis_topology: RedisTopology) -> None:
    """The leader's tails go to Redis in one pipeline and leave it with their tokens, those of
    its own leadership only (over many hash slots on Cluster)."""
    guard = RedisGuard(create_client(load_settings(redis_topology.env)), timeout=5.0, breaker=CircuitBreaker(3, 60))
    shared = SharedRedis(guard, prefix=f"t{time.time_ns()}:")
    tails = shared.history_tails
    tokens = list(range(1, 51))
    values = {t: Tail(20_000, {}, time.time(), None, epoch="ours" if t <= 45 else "another").encode() for t in tokens}
    try:
        await tails.put_many(values, 60)
        assert [await tails.get(t) for t in tokens] == [values[t] for t in tokens]
        await tails.forget(tokens[:40] + tokens[45:], "ours")
        assert [await tails.get(t) for t in tokens] == [None] * 40 + [values[t] for t in tokens[40:]]
        assert guard.errors == 0
    finally:
        await shared.close()


@pytest.mark.redis_topologies
async def test_a_round_naming_many_tokens_is_heard_whole_on_each_topology(redis_topology: RedisTopology) -> None:
    """A round that names more tokens than a message holds (a new leader's first sight) sends
    several (in one pipeline; on Cluster, whose pipelines refuse PUBLISH, one after another); a
    worker hears each token once, with its fingerprint."""
    guard = RedisGuard(create_client(load_settings(redis_topology.env)), timeout=5.0, breaker=CircuitBreaker(3, 60))
    shared = SharedRedis(guard, prefix=f"t{time.time_ns()}:")
    digests = [hashlib.sha256(str(i).encode()).digest() for i in range(2 * MESSAGE_DIGESTS + 500)]
    fingerprints = {d: d[:8] for d in digests[::2]}
    client = redis_topology.client()
    pubsub = client.pubsub()
    try:
        pubsub.subscribe(shared.channel.name)
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        await shared.channel.publish_invalidation(digests, fingerprints)
        heard: list[tuple[bytes, bytes | None]] = []
        while len(heard) < len(digests):
            message = pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
            assert message is not None, f"heard {len(heard)} of {len(digests)}"
            heard += _parse_digests(message["data"])
        assert heard == [(d, fingerprints.get(d)) for d in digests]
        assert guard.errors == 0
    finally:
        pubsub.close()
        client.close()
        await shared.close()


# --- the real process on each topology --------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.redis_topologies
def test_the_service_process_on_each_topology(tmp_path: Path, redis_url: str, redis_topology: RedisTopology) -> None:
    """Configured from the environment alone, as an operator would, the process caches through Redis."""
    gateway = Gateway(tmp_path / "one-api.db")
    token = gateway.add_token(used=7)
    env = {"SQLITE_PATH": str(gateway.path), **redis_topology.env}
    with Service(env) as service:
        response = httpx.get(service.url + URL, headers=token.bearer)
        assert response.status_code == 200 and response.json()["data"]["total_used"] == 7
        assert httpx.get(service.url + "/readyz").json()["redis"] == "ok"
        if redis_topology.name != "standalone":
            assert f"redis: {'the master' if redis_topology.name == 'sentinel' else 'a cluster'}" in service.output()
        name = "usage:tok:" + hashlib.sha256(token.key.encode()).hexdigest()
        client = redis_topology.client()
        try:
            deadline = time.monotonic() + 5
            while not client.exists(name):
                assert time.monotonic() < deadline, service.output()
                time.sleep(0.05)
        finally:
            client.close()
    gateway.close()


# --- Sentinel failover under load -------------------------------------------------------------

CONCURRENCY = 8
WARM_UP = 2.0  # seconds of load before the master is killed
FOLLOW_DEADLINE = 30.0  # seconds after the kill within which the service must use the new master
COOL_DOWN = 1.0  # seconds of load after it did


@pytest.mark.e2e
@pytest.mark.slow_topology
def test_sentinel_failover_under_load(tmp_path: Path) -> None:
    """Kill the Sentinel master under load: no valid request fails, and the service follows the new master."""
    group = SentinelGroup(tmp_path / "sentinel", down_after_ms=1000)
    group.start()
    gateway = Gateway(tmp_path / "one-api.db")
    try:
        polled = [gateway.add_token(used=i) for i in range(200)]
        probes = [gateway.add_token(used=1_000_000 + i) for i in range(400)]  # each asked for once, after the kill
        env = {
            "SQLITE_PATH": str(gateway.path),
            **group.topology().env,
            "USAGE_REDIS_TIMEOUT": "0.2",
            "USAGE_REDIS_COOLDOWN": "0.5",
            "USAGE_LOCAL_TTL": "0",  # every request goes to Redis (or the database): no shelter in-process
            "USAGE_REFRESH_INTERVAL": "0.5",
        }
        with Service(env) as service:
            figures = asyncio.run(_failover_under_load(service, group, polled, probes))
            output = service.output()
    finally:
        gateway.close()
        group.stop()
    print(
        f"\nsentinel failover: {figures['requests']} requests, {figures['failures']} failed, "
        f"new master named by the sentinels {figures['promoted']:.2f} s after the kill, "
        f"followed by the service (a fresh record written there) {figures['followed']:.2f} s after the kill, "
        f"slowest answer {figures['slowest'] * 1000:.0f} ms"
    )
    if figures["failures"] or "Traceback" in output:
        print(output)  # the service's log, with the traceback of any 500
    assert figures["failures"] == 0, figures["failed"][:5]
    assert figures["requests"] > 100
    assert figures["followed"] < FOLLOW_DEADLINE, output
    assert figures["leader_on_new_master"], "the refresher's leader lock was not renewed on the new master"


async def _failover_under_load(
    service: Service, group: SentinelGroup, polled: list[Any], probes: list[Any]
) -> dict[str, Any]:
    old_master = group.master.port
    new_master = redis.asyncio.Redis(port=group.replica.port)
    stats: dict[str, Any] = {"requests": 0, "failures": 0, "failed": [], "slowest": 0.0, "leader_on_new_master": False}
    stop = asyncio.Event()

    async def ask(client: httpx.AsyncClient, token: Any) -> None:
        started = time.monotonic()
        try:
            response = await client.get(URL, headers=token.bearer)
            ok = response.status_code == 200 and response.json()["data"]["total_used"] == token_used[token.id]
            detail: object = (response.status_code, response.text[:200])
        except httpx.HTTPError as exc:
            ok, detail = False, repr(exc)
        stats["requests"] += 1
        stats["slowest"] = max(stats["slowest"], time.monotonic() - started)
        if not ok:
            stats["failures"] += 1
            stats["failed"].append(detail)

    token_used = {t.id: i for i, t in enumerate(polled)} | {t.id: 1_000_000 + i for i, t in enumerate(probes)}

    async def poll(client: httpx.AsyncClient, offset: int) -> None:
        i = offset
        while not stop.is_set():
            await ask(client, polled[i % len(polled)])
            i += CONCURRENCY

    async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
        workers = [asyncio.create_task(poll(client, n)) for n in range(CONCURRENCY)]
        await asyncio.sleep(WARM_UP)
        assert stats["requests"] > 0 and stats["failures"] == 0, stats["failed"][:5]

        group.master.stop()  # SIGKILL: no goodbye to the sentinels or the clients
        killed = time.monotonic()

        async def promotion() -> float | None:
            while time.monotonic() - killed < FOLLOW_DEADLINE:
                if await asyncio.to_thread(group.master_address) != ("127.0.0.1", old_master):
                    return time.monotonic() - killed
                await asyncio.sleep(0.05)
            return None

        watch = asyncio.create_task(promotion())
        followed = None
        probe_iter = iter(probes)
        while followed is None and time.monotonic() - killed < FOLLOW_DEADLINE:
            # A token never asked for before: its record can only reach the new master by a write
            # the service made after the kill.
            probe = next(probe_iter)
            await ask(client, probe)
            name = "usage:tok:" + hashlib.sha256(probe.key.encode()).hexdigest()
            for _ in range(10):
                with contextlib.suppress(redis.RedisError):  # while the replica is being promoted
                    if await new_master.exists(name):
                        followed = time.monotonic() - killed
                        break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
        promoted = await watch
        await asyncio.sleep(COOL_DOWN)
        stop.set()
        await asyncio.gather(*workers)
    with contextlib.suppress(redis.RedisError):  # while the replica is being promoted
        stats["leader_on_new_master"] = bool(await new_master.exists("usage:leader"))
    await new_master.aclose()
    stats["promoted"] = promoted if promoted is not None else float("inf")
    stats["followed"] = followed if followed is not None else float("inf")
    return stats
