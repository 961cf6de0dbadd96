"""The failed-authentication limiter and the client address it counts by."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import httpx
import pytest
import redis
from conftest import AppClient
from support import Gateway
from test_metrics import grown, scrape

from usage_service.addresses import ClientAddresses
from usage_service.config import ConfigError, load_settings
from usage_service.limiter import address_bucket

URL = "/api/usage/token"
WRONG = {"Authorization": "Bearer sk-" + "w" * 48}
LIMITED = {"auth_fail_limit": 3, "auth_fail_window": 60.0}


def scope(peer: str, forwarded: list[str] | None = None) -> dict[str, Any]:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded or []]
    return {"type": "http", "client": (peer, 5000), "headers": headers}


@pytest.mark.parametrize(
    ("trusted", "peer", "forwarded", "client"),
    [
        pytest.param("", "203.0.113.9", ["198.51.100.1"], "203.0.113.9", id="no-trusted-proxies-ignores-header"),
        pytest.param("10.0.0.0/8", "203.0.113.9", ["198.51.100.1"], "203.0.113.9", id="untrusted-peer"),
        pytest.param("10.0.0.0/8", "10.0.0.2", ["198.51.100.1"], "198.51.100.1", id="trusted-peer"),
        pytest.param("10.0.0.0/8", "10.0.0.2", [], "10.0.0.2", id="trusted-peer-without-header"),
        pytest.param(
            "10.0.0.0/8", "10.0.0.2", ["1.1.1.1, 198.51.100.1, 10.0.0.7"], "198.51.100.1", id="rightmost-untrusted"
        ),
        pytest.param("10.0.0.0/8", "10.0.0.2", ["1.1.1.1", "198.51.100.1"], "198.51.100.1", id="several-headers"),
        pytest.param("10.0.0.0/8", "10.0.0.2", ["10.0.0.5, 10.0.0.6"], "10.0.0.5", id="all-trusted-leftmost"),
        pytest.param("10.0.0.0/8", "10.0.0.2", ["nonsense, 198.51.100.1"], "198.51.100.1", id="garbage-left"),
        pytest.param("10.0.0.0/8", "10.0.0.2", ["198.51.100.1, nonsense"], "10.0.0.2", id="garbage-right"),
        pytest.param("10.0.0.0/8", "10.0.0.2", ["198.51.100.1:4711"], "198.51.100.1", id="v4-with-port"),
        pytest.param("::1/128", "::1", ["[2001:db8::1]:443"], "2001:db8::1", id="v6-with-port"),
        pytest.param("::1/128", "::1", ["2001:DB8:0::1"], "2001:db8::1", id="v6-normalised"),
    ],
)
def test_client_address(trusted: str, peer: str, forwarded: list[str], client: str) -> None:
    settings = load_settings({"USAGE_TRUSTED_PROXIES": trusted})
    assert ClientAddresses(settings.trusted_proxies)(scope(peer, forwarded)) == client


def test_client_address_without_a_peer() -> None:
    assert ClientAddresses()({"type": "http", "client": None, "headers": []}) == "unknown"


@pytest.mark.parametrize(
    ("address", "bucket"),
    [
        pytest.param("198.51.100.7", "198.51.100.7", id="v4"),
        pytest.param("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64", id="v6-by-64"),
        pytest.param("::ffff:198.51.100.7", "198.51.100.7", id="v4-mapped"),
        pytest.param("unknown", "unknown", id="not-an-address"),
    ],
)
def test_address_bucket(address: str, bucket: str) -> None:
    assert address_bucket(address) == bucket


def test_limiter_settings() -> None:
    settings = load_settings({})
    assert (settings.auth_fail_limit, settings.auth_fail_window, settings.trusted_proxies) == (30, 60.0, ())
    settings = load_settings({"USAGE_TRUSTED_PROXIES": " 10.0.0.0/8, ::1 ,192.168.1.7/24"})
    assert settings.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("192.168.1.0/24"),
    )
    with pytest.raises(ConfigError, match="USAGE_TRUSTED_PROXIES: .*'10.0.0.300'"):
        load_settings({"USAGE_TRUSTED_PROXIES": "10.0.0.300"})
    with pytest.raises(ConfigError, match="USAGE_AUTH_FAIL_LIMIT"):
        load_settings({"USAGE_AUTH_FAIL_LIMIT": "-1"})
    with pytest.raises(ConfigError, match="USAGE_AUTH_FAIL_WINDOW"):
        load_settings({"USAGE_AUTH_FAIL_WINDOW": "0"})
    assert load_settings({}).stale_if_error == 300.0
    assert load_settings({"USAGE_STALE_IF_ERROR": "0"}).stale_if_error == 0.0
    with pytest.raises(ConfigError, match="USAGE_STALE_IF_ERROR"):
        load_settings({"USAGE_STALE_IF_ERROR": "-5"})


async def fail(client: httpx.AsyncClient, times: int, headers: dict[str, str] = WRONG) -> list[httpx.Response]:
    return [await client.get(URL, headers=headers) for _ in range(times)]


def assert_throttled(response: httpx.Response, window: float = 60) -> None:
    assert response.status_code == 429
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"success": False, "message": "too many failed authentications, retry later"}
    assert 1 <= int(response.headers["retry-after"]) <= window


# A token polled before its address was blocked stays in-process for the whole test.
HOT = {"local_ttl": 60.0, "cache_ttl": 60.0}


@pytest.mark.parametrize("shared", ["in-process", "redis"])
async def test_an_address_that_keeps_failing_gets_429(
    gateway: Gateway, app_client: AppClient, request: pytest.FixtureRequest, shared: str
) -> None:
    token = gateway.add_token()
    overrides: dict[str, Any] = {"redis_url": request.getfixturevalue("redis_url")} if shared == "redis" else {}
    async with app_client(**LIMITED, **HOT, **overrides) as (app, client):
        assert (await client.get(URL, headers=token.bearer)).status_code == 200
        first = await fail(client, 3)
        assert [r.status_code for r in first] == [401] * 3
        # Malformed credentials and missing headers count as much as unknown keys.
        for rejected in await fail(client, 1, {"Authorization": "Basic abc"}) + await fail(client, 1, {}):
            assert_throttled(rejected)
        # Published as usage_limiter_rejections_total.
        assert app.state.lookup.stats.limited == 2
        # A token this worker is already answering is never throttled, even from the same address.
        for _ in range(5):
            assert (await client.get(URL, headers=token.bearer)).status_code == 200


@pytest.mark.parametrize("shared", ["in-process", "redis"])
async def test_a_blocked_address_costs_no_lookup_and_no_statement(
    gateway: Gateway, app_client: AppClient, request: pytest.FixtureRequest, shared: str
) -> None:
    hot, cold = gateway.add_token(), gateway.add_token()
    overrides: dict[str, Any] = {"redis_url": request.getfixturevalue("redis_url")} if shared == "redis" else {}
    quiet = {"refresh_interval": 0.0, "options_interval": 0.0, "metrics": True}  # no background statements
    async with app_client(**LIMITED, **HOT, **quiet, **overrides) as (app, client):
        assert (await client.get(URL, headers=hot.bearer)).status_code == 200
        await fail(client, 4)  # the fourth is a 429: the address is blocked
        before, statements = await scrape(client), app.state.store.statements
        redis_calls = request.getfixturevalue("redis_client") if shared == "redis" else None
        if redis_calls is not None:
            redis_calls.config_resetstat()
        for i in range(20):
            assert_throttled(await client.get(URL, headers={"Authorization": f"Bearer sk-{i:048d}"}))
        # Even a real token is not looked up from a blocked address (guessing one must not pay)...
        assert_throttled(await client.get(URL, headers=cold.bearer))
        # ...but one already answered in-process is served.
        assert (await client.get(URL, headers=hot.bearer)).status_code == 200
        after = await scrape(client)
        assert app.state.store.statements == statements
        if redis_calls is not None:  # neither a record read nor a failure counted
            assert {"cmdstat_get", "cmdstat_mget", "cmdstat_incrby"}.isdisjoint(redis_calls.info("commandstats"))
    assert grown(before, after, "usage_db_lookups_total") == 0
    assert grown(before, after, "usage_cache_misses_total", layer="local") == 0
    assert grown(before, after, "usage_limiter_rejections_total") == 21


async def test_billing_routes_get_429_in_openais_shape(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client(**LIMITED, **HOT) as (app, client):
        assert (await client.get("/v1/dashboard/billing/usage", headers=token.bearer)).status_code == 200
        for _ in range(3):
            assert (await client.get("/v1/dashboard/billing/usage", headers=WRONG)).status_code == 401
        response = await client.get("/v1/dashboard/billing/subscription", headers=WRONG)
        assert response.status_code == 429
        assert 1 <= int(response.headers["retry-after"]) <= 60
        assert response.json() == {
            "error": {
                "message": "too many failed authentications, retry later",
                "type": "requests",
                "code": "rate_limit_exceeded",
            }
        }
        assert (await client.get("/v1/dashboard/billing/usage", headers=token.bearer)).status_code == 200
        # Published as usage_limiter_rejections_total.
        assert app.state.lookup.stats.limited == 1


async def test_disabled_and_banned_tokens_are_not_failures(gateway: Gateway, app_client: AppClient) -> None:
    disabled = gateway.add_token(status=2)
    banned = gateway.add_token(user_id=gateway.add_user(status=2))
    async with app_client(**LIMITED) as (app, client):
        for _ in range(5):
            assert (await client.get(URL, headers=disabled.bearer)).status_code == 401
            assert (await client.get(URL, headers=banned.bearer)).status_code == 403
        # None of the ten counted: an unknown key is still only the first failure.
        assert [r.status_code for r in await fail(client, 3)] == [401] * 3


async def test_the_window_ends(gateway: Gateway, app_client: AppClient, redis_url: str) -> None:
    async with app_client(redis_url=redis_url, auth_fail_limit=2, auth_fail_window=0.5) as (_, client):
        statuses = [r.status_code for r in await fail(client, 3)]
        assert statuses == [401, 401, 429]
        await asyncio.sleep(0.6)
        assert (await client.get(URL, headers=WRONG)).status_code == 401


async def test_counts_are_shared_between_instances_through_redis(
    gateway: Gateway, app_client: AppClient, redis_url: str, redis_client: redis.Redis
) -> None:
    async with app_client(redis_url=redis_url, **LIMITED) as (first, one):
        async with app_client(redis_url=redis_url, **LIMITED) as (second, other):
            assert [r.status_code for r in await fail(one, 2) + await fail(other, 1)] == [401] * 3
            assert_throttled((await fail(other, 1))[0])
            assert_throttled((await fail(one, 1))[0])
        name = first.state.redis.failures.prefix + "127.0.0.1"
        assert int(redis_client.get(name) or 0) == 5
        assert 0 < redis_client.pttl(name) <= 60_000  # the window expires by itself
        # Only the address is stored: no credential.
        assert b"w" * 48 not in redis_client.get(name) + name.encode()


@pytest.mark.parametrize("shared", ["in-process", "redis"])
async def test_a_burst_of_guesses_from_one_address_costs_about_twice_the_limit_in_lookups(
    gateway: Gateway, app_client: AppClient, request: pytest.FixtureRequest, shared: str
) -> None:
    """300 different unknown keys sent at once from one address: its keys are resolved at most
    `limit` at a time, so once its failures block it the rest are answered 429 unresolved. (Every
    one was looked up before the first failures were counted.)"""
    limit = LIMITED["auth_fail_limit"]
    overrides: dict[str, Any] = {"redis_url": request.getfixturevalue("redis_url")} if shared == "redis" else {}
    async with app_client(**LIMITED, **overrides) as (app, client):
        guesses = [{"Authorization": f"Bearer sk-{i:048d}"} for i in range(300)]
        responses = await asyncio.gather(*(client.get(URL, headers=headers) for headers in guesses))
        assert sorted(r.status_code for r in responses) == [401] * limit + [429] * (300 - limit)
        assert limit < app.state.lookup.stats.db_reads <= 2 * limit
        assert app.state.limiter._turns == {}  # every turn given back
        if shared == "redis":  # counted for every worker and instance (once blocked, no more)
            counted = request.getfixturevalue("redis_client").get(app.state.redis.failures.prefix + "127.0.0.1")
            assert limit < int(counted) <= app.state.lookup.stats.db_reads


async def test_counting_survives_a_redis_that_lost_its_scripts(
    gateway: Gateway, app_client: AppClient, redis_url: str, redis_client: redis.Redis
) -> None:
    async with app_client(redis_url=redis_url, **LIMITED) as (app, client):
        await fail(client, 1)
        redis_client.script_flush()  # as after a Redis restart or failover
        await fail(client, 1)
        assert int(redis_client.get(app.state.redis.failures.prefix + "127.0.0.1") or 0) == 2


async def test_valid_tokens_cost_the_limiter_no_redis_call(
    gateway: Gateway, app_client: AppClient, redis_url: str, redis_client: redis.Redis
) -> None:
    tokens = [gateway.add_token() for _ in range(5)]
    async with app_client(redis_url=redis_url, refresh_interval=0, **LIMITED) as (_, client):
        redis_client.config_resetstat()
        for token in tokens * 4:
            assert (await client.get(URL, headers=token.bearer)).status_code == 200
        calls = redis_client.info("commandstats")
        assert "cmdstat_incrby" not in calls
        await fail(client, 1)
        assert redis_client.info("commandstats")["cmdstat_incrby"]["calls"] == 1


async def test_blocked_addresses_are_answered_without_redis(
    gateway: Gateway, app_client: AppClient, redis_url: str, redis_client: redis.Redis
) -> None:
    async with app_client(redis_url=redis_url, **LIMITED) as (_, client):
        await fail(client, 4)
        redis_client.config_resetstat()
        for response in await fail(client, 20):
            assert_throttled(response)
        assert "cmdstat_incrby" not in redis_client.info("commandstats")


async def test_without_redis_each_worker_counts_alone(gateway: Gateway, app_client: AppClient) -> None:
    # Redis configured but unreachable: the limiter keeps working in-process.
    async with app_client(redis_url="redis://127.0.0.1:1/0", redis_timeout=0.05, **LIMITED) as (_, client):
        statuses = [r.status_code for r in await fail(client, 5)]
        assert statuses == [401, 401, 401, 429, 429]


async def test_trusted_proxy_clients_are_counted_apart(gateway: Gateway, app_client: AppClient) -> None:
    proxies = (ipaddress.ip_network("127.0.0.0/8"),)
    async with app_client(trusted_proxies=proxies, **LIMITED) as (_, client):
        mallory = {**WRONG, "X-Forwarded-For": "198.51.100.1"}
        alice = {**WRONG, "X-Forwarded-For": "198.51.100.2"}
        assert [r.status_code for r in await fail(client, 4, mallory)] == [401, 401, 401, 429]
        assert (await client.get(URL, headers=alice)).status_code == 401
        # A client cannot escape by writing its own X-Forwarded-For entry: the proxy's is last.
        spoof = {**WRONG, "X-Forwarded-For": "192.0.2.1, 198.51.100.1"}
        assert (await client.get(URL, headers=spoof)).status_code == 429


async def test_forwarded_for_is_ignored_from_untrusted_peers(gateway: Gateway, app_client: AppClient) -> None:
    async with app_client(**LIMITED) as (_, client):
        for i in range(4):
            response = await client.get(URL, headers={**WRONG, "X-Forwarded-For": f"198.51.100.{i}"})
        assert response.status_code == 429


async def test_limit_zero_turns_the_limiter_off(gateway: Gateway, app_client: AppClient) -> None:
    async with app_client(auth_fail_limit=0) as (app, client):
        assert {r.status_code for r in await fail(client, 50)} == {401}
        assert app.state.limiter is None


async def test_tracked_addresses_are_bounded(gateway: Gateway, app_client: AppClient) -> None:
    proxies = (ipaddress.ip_network("127.0.0.0/8"),)
    async with app_client(trusted_proxies=proxies, **LIMITED) as (app, client):
        app.state.limiter._counts.max_size = app.state.limiter._blocked.max_size = 50
        for i in range(300):
            forwarded = {"X-Forwarded-For": f"10.1.{i // 250}.{i % 250}"}
            for _ in range(4):
                await client.get(URL, headers={**WRONG, **forwarded})
        assert len(app.state.limiter._counts) == 50 and len(app.state.limiter._blocked) == 50
