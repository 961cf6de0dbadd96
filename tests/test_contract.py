"""The HTTP contract of /api/usage/token, in process, on each database engine (and real Redis).

Every test here runs against a SQLite file, a PostgreSQL server and a MariaDB server, each
written by a stand-in gateway in the layout new-api gives it on that engine.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from conftest import ENGINES, AppClient, GatewayFactory
from support import Gateway, Token

pytestmark = [pytest.mark.asyncio, pytest.mark.redis_topologies]

URL = "/api/usage/token"


async def get(client: httpx.AsyncClient, token: Token | None, path: str = URL, **kwargs: Any) -> httpx.Response:
    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers.update(token.bearer)
    return await client.get(path, headers=headers, **kwargs)


def assert_error(response: httpx.Response, status: int, message: str) -> None:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"success": False, "message": message}


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def gateway(engine: str, make_gateway: GatewayFactory) -> Gateway:
    """The gateway's database, on each engine in turn."""
    return make_gateway(engine)


@pytest.fixture(params=["in-process-only", "with-redis"])
def with_redis(request: pytest.FixtureRequest) -> dict[str, object]:
    """Run a test on the in-process layer alone and with Redis behind it."""
    if request.param == "with-redis":
        return {"redis_url": request.getfixturevalue("redis_url")}
    return {}


async def test_success_body_and_headers(gateway: Gateway, app_client: AppClient, with_redis: dict[str, object]) -> None:
    token = gateway.add_token(
        name="ci bot", remain=700, used=300, model_limits_enabled=1, model_limits="gpt-4o, o3,,", expired_time=2e9
    )
    async with app_client(**with_redis) as (_, client):
        response = await get(client, token)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "private, no-cache"
    assert response.headers["etag"].startswith('"')
    assert response.json() == {
        "code": True,
        "message": "ok",
        "data": {
            "object": "token_usage",
            "name": "ci bot",
            "total_granted": 1000,
            "total_used": 300,
            "total_available": 700,
            "unlimited_quota": False,
            "model_limits": {"gpt-4o": True, "o3": True},
            "model_limits_enabled": True,
            "expires_at": 2000000000,
        },
    }


@pytest.mark.parametrize(
    ("path", "credential"),
    [
        pytest.param(URL, "sk-{key}", id="sk-prefix"),
        pytest.param(URL, "{key}", id="no-prefix"),
        pytest.param(URL, "sk-{key}-3", id="channel-suffix"),
        pytest.param(URL + "/", "sk-{key}", id="trailing-slash"),
    ],
)
async def test_accepted_forms(gateway: Gateway, app_client: AppClient, path: str, credential: str) -> None:
    token = gateway.add_token(name="forms")
    async with app_client() as (_, client):
        response = await client.get(path, headers={"Authorization": "Bearer " + credential.format(key=token.key)})
    assert response.status_code == 200
    assert response.json()["data"]["name"] == "forms"


@pytest.mark.parametrize(
    ("token_columns", "user_columns", "status", "message"),
    [
        pytest.param({"deleted": True}, {}, 401, "token not found", id="token-soft-deleted"),
        pytest.param({"status": 2}, {}, 401, "token is disabled", id="token-disabled"),
        pytest.param({"status": 7}, {}, 401, "token status is not usable", id="token-unknown-status"),
        pytest.param({}, {"status": 2}, 403, "user is banned", id="user-banned"),
        pytest.param({}, {"deleted": True}, 401, "token not found", id="user-soft-deleted"),
    ],
)
async def test_rejected_tokens(
    gateway: Gateway,
    app_client: AppClient,
    with_redis: dict[str, object],
    token_columns: dict[str, Any],
    user_columns: dict[str, Any],
    status: int,
    message: str,
) -> None:
    token = gateway.add_token(user_id=gateway.add_user(**user_columns), **token_columns)
    async with app_client(**with_redis) as (_, client):
        response = await get(client, token)
    assert_error(response, status, message)
    assert ("www-authenticate" in response.headers) == (status == 401)


async def test_missing_user_is_token_not_found(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token(user_id=999_999)
    async with app_client() as (_, client):
        assert_error(await get(client, token), 401, "token not found")


async def test_unknown_key(gateway: Gateway, app_client: AppClient) -> None:
    async with app_client() as (_, client):
        response = await client.get(URL, headers={"Authorization": "Bearer sk-" + "x" * 48})
    assert_error(response, 401, "token not found")
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "columns",
    [
        pytest.param({"status": 3}, id="expired-status"),
        pytest.param({"expired_time": int(time.time()) - 60}, id="expired-time-past"),
        pytest.param({"status": 4, "remain": 0}, id="exhausted"),
    ],
)
async def test_expired_and_exhausted_stay_readable(
    gateway: Gateway, app_client: AppClient, columns: dict[str, Any]
) -> None:
    token = gateway.add_token(**columns)
    async with app_client() as (_, client):
        response = await get(client, token)
    assert response.status_code == 200
    assert response.json()["data"]["object"] == "token_usage"


async def test_unlimited_token_reports_negative_available(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token(unlimited=1, remain=-5_000_000_000, used=5_000_000_000)
    async with app_client() as (_, client):
        data = (await get(client, token)).json()["data"]
    assert data["unlimited_quota"] is True
    assert data["total_available"] == -5_000_000_000
    assert data["total_granted"] == 0
    assert data["expires_at"] == 0


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        pytest.param({}, "No Authorization header", id="no-header"),
        pytest.param({"Authorization": "Basic dXNlcjpwdw=="}, "Invalid Bearer token", id="basic"),
        pytest.param({"Authorization": "Bearer"}, "Invalid Bearer token", id="no-credential"),
        pytest.param({"Authorization": "Bearer sk-not/a/key"}, "Invalid Bearer token", id="not-a-key"),
        # The gateway's usage route wants the scheme (its billing and log routes do not).
        pytest.param({"Authorization": "sk-" + "k" * 48}, "Invalid Bearer token", id="no-scheme"),
    ],
)
@pytest.mark.redis_topologies("standalone")  # counts every command one server sees
async def test_header_rejections_touch_neither_redis_nor_database(
    gateway: Gateway, app_client: AppClient, redis_url: str, redis_client: Any, headers: dict[str, str], message: str
) -> None:
    async with app_client(redis_url=redis_url) as (app, client):
        redis_calls = int(redis_client.info("stats")["total_commands_processed"])
        statements = app.state.store.statements
        response = await client.get(URL, headers=headers)
        assert app.state.store.statements == statements
        # The only command Redis sees in between is our own INFO.
        assert int(redis_client.info("stats")["total_commands_processed"]) == redis_calls + 1
    assert_error(response, 401, message)
    assert response.headers["www-authenticate"] == "Bearer"


async def test_auth_runs_before_routing(gateway: Gateway, app_client: AppClient) -> None:
    async with app_client() as (_, client):
        assert_error(await client.get("/api/usage/nothing-here"), 401, "No Authorization header")
        assert_error(await client.post(URL), 401, "No Authorization header")


async def test_head_is_get_without_body(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client() as (_, client):
        full = await get(client, token)
        head = await client.head(URL, headers=token.bearer)
        rejected = await client.head(URL)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(full.content))
    assert head.headers["etag"] == full.headers["etag"]
    assert rejected.status_code == 401 and rejected.content == b""


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_other_methods_are_405_json(gateway: Gateway, app_client: AppClient, method: str) -> None:
    token = gateway.add_token()
    async with app_client() as (_, client):
        response = await client.request(method, URL, headers=token.bearer)
    assert_error(response, 405, "method not allowed")
    assert "GET" in response.headers["allow"]


async def test_unknown_paths_are_404_json(gateway: Gateway, app_client: AppClient) -> None:
    async with app_client() as (_, client):
        assert_error(await client.get("/nope"), 404, "not found")
        assert_error(await client.get("/api/usage/token/extra", headers=gateway.add_token().bearer), 404, "not found")
        for path in ("/healthz/", "/readyz/", "/metrics/", "/openapi.json/"):  # no redirect, to any Host
            assert_error(await client.get(path, headers={"Host": "elsewhere.example"}), 404, "not found")


@pytest.mark.parametrize(
    ("if_none_match", "status"),
    [
        pytest.param("{etag}", 304, id="exact"),
        pytest.param("W/{etag}", 304, id="weak"),
        pytest.param('"other", {etag}', 304, id="in-list"),
        pytest.param("*", 304, id="star"),
        pytest.param('"other"', 200, id="different"),
        pytest.param("garbage", 200, id="garbage"),
    ],
)
async def test_etag_revalidation(gateway: Gateway, app_client: AppClient, if_none_match: str, status: int) -> None:
    token = gateway.add_token()
    async with app_client() as (_, client):
        etag = (await get(client, token)).headers["etag"]
        response = await get(client, token, headers={"If-None-Match": if_none_match.format(etag=etag)})
    assert response.status_code == status
    if status == 304:
        assert response.content == b""
        assert response.headers["etag"] == etag
        assert response.headers["cache-control"] == "private, no-cache"


async def test_if_none_match_over_several_header_lines(gateway: Gateway, app_client: AppClient) -> None:
    """A list-based field may come as several lines, which mean one list (RFC 9110, 5.3): a
    client or proxy that sends its validators one to a line gets its 304 all the same."""
    token = gateway.add_token()
    async with app_client() as (_, client):
        etag = (await get(client, token)).headers["etag"]
        lines = [*token.bearer.items(), ("If-None-Match", '"other"'), ("If-None-Match", etag)]
        response = await client.get(URL, headers=lines)
        unmatched = await client.get(URL, headers=[*token.bearer.items(), *[("If-None-Match", '"a"')] * 2])
    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == etag
    assert unmatched.status_code == 200


async def test_etag_changes_when_usage_changes(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client(cache_ttl=0.05, local_ttl=0.05) as (_, client):
        etag = (await get(client, token)).headers["etag"]
        gateway.charge(token, 10)
        time.sleep(0.1)
        response = await get(client, token, headers={"If-None-Match": etag})
    assert response.status_code == 200
    assert response.headers["etag"] != etag
    assert response.json()["data"]["total_used"] == 10


async def test_health_and_readiness(gateway: Gateway, app_client: AppClient, redis_url: str) -> None:
    async with app_client(redis_url=redis_url) as (_, client):
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "database": "ok", "redis": "ok"}


async def test_readiness_without_redis_configured(gateway: Gateway, app_client: AppClient) -> None:
    async with app_client() as (_, client):
        assert (await client.get("/readyz")).json() == {"ready": True, "database": "ok", "redis": "disabled"}


async def test_readiness_follows_the_database(gateway: Gateway, app_client: AppClient) -> None:
    async with app_client() as (_, client):
        with gateway.exclusive_lock():
            response = await client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["database"] == "unavailable"
        assert (await client.get("/readyz")).status_code == 200


async def test_database_unavailable_is_503_with_retry_after(gateway: Gateway, app_client: AppClient) -> None:
    cached, uncached = gateway.add_token(name="cached"), gateway.add_token(name="uncached")
    async with app_client(retry_after=3) as (_, client):
        assert (await get(client, cached)).status_code == 200
        with gateway.exclusive_lock():
            locked_cached = await get(client, cached)
            locked_uncached = await get(client, uncached)
        recovered = await get(client, uncached)
    assert locked_cached.status_code == 200
    assert_error(locked_uncached, 503, "database unavailable, retry later")
    assert locked_uncached.headers["retry-after"] == "3"
    assert recovered.status_code == 200


async def test_unexpected_error_is_json_500_without_traceback(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client() as (app, client):

        async def broken(key: str) -> None:
            raise RuntimeError("secret internals")

        app.state.lookup.store.fetch = broken
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as quiet:
            response = await get(quiet, token)
    assert_error(response, 500, "internal server error")
    assert "secret" not in response.text and "Traceback" not in response.text


# The model-limit columns as new-api adds them, and a true and a false in each engine's types.
_MODEL_LIMIT_COLUMNS = {
    "sqlite": ("numeric", "text", 1, 0),
    "postgres": ("boolean", "varchar(1024)", True, False),
    "mysql": ("tinyint(1)", "varchar(1024)", 1, 0),
}


async def test_columns_added_in_place_are_read(
    make_gateway: GatewayFactory, engine: str, app_client: AppClient
) -> None:
    """A gateway upgraded while the service runs (one-api's schema to new-api's) adds the
    model-limit columns in place: once the service looks at the columns again (every minute; at
    every statement here), it reads them without a restart, for new tokens and, through the
    refresher's next round, for cached ones."""
    old = make_gateway(engine, old=True)
    user = old.add_user()
    enabled_type, limits_type, true, false = _MODEL_LIMIT_COLUMNS[engine]
    insert = (
        "INSERT INTO tokens (user_id, `key`, name, remain_quota, used_quota, unlimited_quota)"
        " VALUES (?, ?, 'm', 5, 0, ?)"
    )
    cached = {"Authorization": "Bearer sk-" + "c" * 48}
    old._execute(insert, (user, "c" * 48, false))
    async with app_client(sqlite_path=old.path, database=old.database, refresh_interval=0.1) as (app, client):
        assert (await client.get(URL, headers=cached)).json()["data"]["model_limits_enabled"] is False
        app.state.store.schema_check_interval = 0
        old._execute(f"ALTER TABLE tokens ADD COLUMN model_limits_enabled {enabled_type}", ())
        old._execute(f"ALTER TABLE tokens ADD COLUMN model_limits {limits_type}", ())
        old._execute(insert, (user, "n" * 48, false))
        old._execute("UPDATE tokens SET model_limits_enabled = ?, model_limits = 'o3'", (true,))
        new = await client.get(URL, headers={"Authorization": "Bearer sk-" + "n" * 48})

        async def limited() -> bool:
            return (await client.get(URL, headers=cached)).json()["data"]["model_limits"] == {"o3": True}

        started = time.monotonic()
        while not await limited():
            assert time.monotonic() - started < 5, "the refresher did not bring the new columns"
            await asyncio.sleep(0.05)
    assert new.status_code == 200, new.text
    assert new.json()["data"]["model_limits_enabled"] is True
    assert new.json()["data"]["model_limits"] == {"o3": True}


async def test_older_gateway_schema(make_gateway: GatewayFactory, engine: str, app_client: AppClient) -> None:
    """one-api era: key as char(48), no model-limit columns, booleans as 0/1 or text."""
    old = make_gateway(engine, old=True)
    user = old.add_user()
    key = "k" * 48
    true = 1 if engine == "mysql" else "true"  # text in SQLite, a boolean literal on PostgreSQL
    old._execute(
        "INSERT INTO tokens (user_id, `key`, name, remain_quota, used_quota, unlimited_quota)"
        " VALUES (?, ?, 'o', 5, 1, ?)",
        (user, key, true),
    )
    async with app_client(sqlite_path=old.path, database=old.database) as (_, client):
        response = await client.get(URL, headers={"Authorization": f"Bearer sk-{key}"})
    assert response.status_code == 200
    data = response.json()["data"]
    assert data["model_limits"] == {} and data["model_limits_enabled"] is False
    assert data["unlimited_quota"] is True
    assert data["total_granted"] == 6
