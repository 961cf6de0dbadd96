"""The OpenAI-style billing routes: paths, relay rules, bodies under the gateway's settings, data path."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import AppClient
from support import Gateway, Service, Token

from usage_service.auth import relay_verdict, usage_verdict
from usage_service.billing import BillingOptions
from usage_service.demo import GATEWAY_SCHEMA
from usage_service.records import TokenRecord
from usage_service.store import StoreUnavailable

SUBSCRIPTION = "/v1/dashboard/billing/subscription"
USAGE = "/v1/dashboard/billing/usage"
NEVER = -1
FUTURE = 2_000_000_000


def assert_openai_error(response: httpx.Response, status: int, message: str, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": {"message": message, "type": "invalid_request_error", "code": code}}


def subscription(limit: float, access_until: int = 0) -> dict[str, Any]:
    return {
        "object": "billing_subscription",
        "has_payment_method": True,
        "soft_limit_usd": limit,
        "hard_limit_usd": limit,
        "system_hard_limit_usd": limit,
        "access_until": access_until,
    }


async def billing(client: httpx.AsyncClient, token: Token) -> tuple[dict[str, Any], dict[str, Any]]:
    sub = await client.get(SUBSCRIPTION, headers=token.bearer)
    use = await client.get(USAGE, headers=token.bearer)
    assert sub.status_code == 200 and use.status_code == 200, (sub.text, use.text)
    return sub.json(), use.json()


# --- paths -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "obj"),
    [
        pytest.param("/dashboard/billing/subscription", "billing_subscription", id="subscription"),
        pytest.param("/dashboard/billing/subscription/", "billing_subscription", id="subscription-slash"),
        pytest.param("/v1/dashboard/billing/subscription", "billing_subscription", id="v1-subscription"),
        pytest.param("/v1/dashboard/billing/subscription/", "billing_subscription", id="v1-subscription-slash"),
        pytest.param("/dashboard/billing/usage", "list", id="usage"),
        pytest.param("/dashboard/billing/usage/", "list", id="usage-slash"),
        pytest.param("/v1/dashboard/billing/usage", "list", id="v1-usage"),
        pytest.param("/v1/dashboard/billing/usage/", "list", id="v1-usage-slash"),
        pytest.param(
            "/v1/dashboard/billing/usage?start_date=2024-01-01&end_date=2024-02-01", "list", id="v1-usage-dates"
        ),
        pytest.param("/dashboard/billing/usage?start_date=&end_date=", "list", id="usage-empty-dates"),
        pytest.param("/dashboard/billing/subscription?x=1", "billing_subscription", id="subscription-query"),
    ],
)
async def test_every_route_form(gateway: Gateway, app_client: AppClient, path: str, obj: str) -> None:
    token = gateway.add_token(remain=700_000, used=300_000)
    async with app_client() as (_, client):
        response = await client.get(path, headers=token.bearer)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "private, no-cache"
    assert response.json()["object"] == obj
    assert int(response.headers["content-length"]) == len(response.content)


async def test_head_is_get_without_body(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client() as (_, client):
        full = await client.get(SUBSCRIPTION, headers=token.bearer)
        head = await client.head(SUBSCRIPTION, headers=token.bearer)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(full.content))


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_other_methods_are_openai_405(gateway: Gateway, app_client: AppClient, method: str) -> None:
    token = gateway.add_token()
    async with app_client() as (_, client):
        response = await client.request(method, USAGE, headers=token.bearer)
    assert_openai_error(response, 405, "method not allowed", "method_not_allowed")
    assert response.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    "path", ["/v1/dashboard/billing/credit_grants", "/dashboard/billing", "/dashboard/billing/usage/extra"]
)
async def test_unknown_billing_paths_authenticate_then_404(gateway: Gateway, app_client: AppClient, path: str) -> None:
    token = gateway.add_token()
    async with app_client() as (_, client):
        anonymous = await client.get(path)
        known = await client.get(path, headers=token.bearer)
    assert_openai_error(anonymous, 401, "No Authorization header", "invalid_api_key")
    assert_openai_error(known, 404, "not found", "not_found")


async def test_other_paths_are_untouched(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client() as (_, client):
        response = await client.get("/dashboard/billingx/usage", headers=token.bearer)
    assert response.status_code == 404
    assert response.json() == {"success": False, "message": "not found"}


# --- the relay rules -------------------------------------------------------------------------

PAST = 1_600_000_000

RULES = [
    pytest.param({}, {}, None, 200, "", "", id="usable"),
    pytest.param({"expired_time": FUTURE}, {}, None, 200, "", "", id="expires-later"),
    pytest.param({"unlimited": 1, "remain": -5}, {}, None, 200, "", "", id="unlimited-below-zero"),
    pytest.param({"status": 2}, {}, None, 401, "token is disabled", "invalid_api_key", id="disabled"),
    pytest.param({"status": 3}, {}, None, 401, "token has expired", "invalid_api_key", id="expired-status"),
    pytest.param({"expired_time": PAST}, {}, None, 401, "token has expired", "invalid_api_key", id="expired-time"),
    pytest.param({"status": 4}, {}, None, 401, "token quota is exhausted", "invalid_api_key", id="exhausted-status"),
    pytest.param({"remain": 0}, {}, None, 401, "token quota is exhausted", "invalid_api_key", id="no-quota-left"),
    pytest.param({"remain": -3}, {}, None, 401, "token quota is exhausted", "invalid_api_key", id="overdrawn"),
    pytest.param({"status": 7}, {}, None, 401, "token status is not usable", "invalid_api_key", id="unknown-status"),
    pytest.param({}, {"status": 2}, None, 403, "user is banned", "account_deactivated", id="banned-user"),
    pytest.param({"status": 2}, {"status": 2}, None, 401, "token is disabled", "invalid_api_key", id="token-first"),
    pytest.param({}, {"deleted": True}, None, 401, "token not found", "invalid_api_key", id="user-deleted"),
    pytest.param({"deleted": True}, {}, None, 401, "token not found", "invalid_api_key", id="token-deleted"),
    pytest.param({}, {}, "Bearer sk-" + "x" * 48, 401, "token not found", "invalid_api_key", id="unknown-key"),
    pytest.param({}, {}, "", 401, "No Authorization header", "invalid_api_key", id="missing-header"),
    pytest.param({}, {}, "Basic dXNlcjpwdw==", 401, "Invalid Bearer token", "invalid_api_key", id="basic-scheme"),
    pytest.param({}, {}, "Bearer sk-not/a/key", 401, "Invalid Bearer token", "invalid_api_key", id="not-a-key"),
]


@pytest.mark.parametrize("path", ["/dashboard/billing/subscription", USAGE])
@pytest.mark.parametrize(("token_columns", "user_columns", "header", "status", "message", "code"), RULES)
async def test_relay_rules(
    gateway: Gateway,
    app_client: AppClient,
    path: str,
    token_columns: dict[str, Any],
    user_columns: dict[str, Any],
    header: str | None,
    status: int,
    message: str,
    code: str,
) -> None:
    token = gateway.add_token(user_id=gateway.add_user(**user_columns), **token_columns)
    headers = token.bearer if header is None else ({"Authorization": header} if header else {})
    async with app_client() as (_, client):
        response = await client.get(path, headers=headers)
    if status == 200:
        assert response.status_code == 200, response.text
        return
    assert_openai_error(response, status, message, code)
    assert ("www-authenticate" in response.headers) == (status == 401)


@pytest.mark.parametrize("path", ["/dashboard/billing/subscription", USAGE])
@pytest.mark.parametrize("form", ["sk-{key}", "{key}", "sk-{key}-3"])
async def test_a_credential_without_the_bearer_scheme(
    gateway: Gateway, app_client: AppClient, path: str, form: str
) -> None:
    """The gateway's token middleware takes `Authorization: sk-KEY` as the key itself; so do these routes."""
    token = gateway.add_token()
    async with app_client() as (_, client):
        response = await client.get(path, headers={"Authorization": form.format(key=token.key)})
        unknown = await client.get(path, headers={"Authorization": "sk-" + "x" * 48})
    assert response.status_code == 200, response.text
    assert_openai_error(unknown, 401, "token not found", "invalid_api_key")


async def test_usage_route_keeps_its_own_rules(gateway: Gateway, app_client: AppClient) -> None:
    """The same expired token: readable on /api/usage/token, refused on the relay-ruled billing routes."""
    token = gateway.add_token(expired_time=PAST)
    async with app_client() as (_, client):
        usage = await client.get("/api/usage/token", headers=token.bearer)
        billed = await client.get(USAGE, headers=token.bearer)
    assert usage.status_code == 200
    assert_openai_error(billed, 401, "token has expired", "invalid_api_key")


async def test_database_unavailable_is_openai_503(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client(retry_after=4) as (_, client):
        with gateway.exclusive_lock():
            response = await client.get(USAGE, headers=token.bearer)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "4"
    assert response.json()["error"]["type"] == "server_error"
    assert response.json()["error"]["message"] == "database unavailable, retry later"


async def test_unexpected_error_is_openai_500(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client() as (app, client):

        async def broken(key: str) -> None:
            raise RuntimeError("secret internals")

        app.state.lookup.store.fetch = broken
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as quiet:
            response = await quiet.get(SUBSCRIPTION, headers=token.bearer)
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "internal server error"
    assert "secret" not in response.text


# --- bodies under the gateway's settings -----------------------------------------------------

TOKEN = {"remain": 700_000, "used": 300_000, "expired_time": FUTURE}
USER = {"quota": 4_000_000, "used_quota": 1_000_000}

SETTINGS = [
    pytest.param({}, {}, subscription(2, FUTURE), 60, id="defaults"),
    pytest.param({"DisplayTokenStatEnabled": "true"}, {}, subscription(2, FUTURE), 60, id="token-stat-true"),
    pytest.param({"DisplayTokenStatEnabled": "false"}, {}, subscription(10), 200, id="token-stat-false-owner"),
    pytest.param({"DisplayTokenStatEnabled": "1"}, {}, subscription(10), 200, id="token-stat-only-true-is-true"),
    pytest.param({"general_setting.quota_display_type": "USD"}, {}, subscription(2, FUTURE), 60, id="usd"),
    pytest.param({"general_setting.quota_display_type": "CUSTOM"}, {}, subscription(2, FUTURE), 60, id="custom"),
    pytest.param({"general_setting.quota_display_type": "CNY"}, {}, subscription(14.6, FUTURE), 438, id="cny"),
    pytest.param(
        {"general_setting.quota_display_type": "TOKENS"}, {}, subscription(1_000_000, FUTURE), 30_000_000, id="tokens"
    ),
    pytest.param(
        {"DisplayInCurrencyEnabled": "false"}, {}, subscription(1_000_000, FUTURE), 30_000_000, id="legacy-raw-quota"
    ),
    pytest.param({"DisplayInCurrencyEnabled": "true"}, {}, subscription(2, FUTURE), 60, id="legacy-currency"),
    pytest.param(
        {"DisplayInCurrencyEnabled": "false", "general_setting.quota_display_type": "CNY"},
        {},
        subscription(14.6, FUTURE),
        438,
        id="display-type-wins-over-legacy",
    ),
    pytest.param({"QuotaPerUnit": "250000"}, {}, subscription(4, FUTURE), 120, id="custom-quota-per-unit"),
    pytest.param(
        {"QuotaPerUnit": "1000", "USDExchangeRate": "6.5", "general_setting.quota_display_type": "CNY"},
        {},
        subscription(6500, FUTURE),
        195_000,
        id="custom-rate-cny",
    ),
    pytest.param({"QuotaPerUnit": "junk"}, {}, subscription(2, FUTURE), 60, id="junk-quota-per-unit-is-default"),
    pytest.param({"QuotaPerUnit": "0"}, {}, subscription(2, FUTURE), 60, id="zero-quota-per-unit-is-default"),
    pytest.param({}, {"remain": 734_567, "used": 500_000}, subscription(2.469134, FUTURE), 100, id="fraction"),
    pytest.param({}, {"expired_time": NEVER}, subscription(2), 60, id="never-expires-is-zero"),
    pytest.param({}, {"unlimited": 1}, subscription(100_000_000, FUTURE), 60, id="unlimited"),
    pytest.param(
        {"general_setting.quota_display_type": "TOKENS"},
        {"unlimited": 1},
        subscription(100_000_000, FUTURE),
        30_000_000,
        id="unlimited-tokens",
    ),
    pytest.param({"DisplayTokenStatEnabled": "false"}, {"unlimited": 1}, subscription(10), 200, id="unlimited-owner"),
]


# Every case against a database with an options table; those without settings also without one.
SETTINGS_BY_SCHEMA = [pytest.param(True, *case.values, id=case.id) for case in SETTINGS] + [
    pytest.param(False, *case.values, id=f"{case.id}-no-options-table") for case in SETTINGS if not case.values[0]
]


@pytest.mark.parametrize(
    ("with_options_table", "options", "token_changes", "expected_subscription", "expected_usage"), SETTINGS_BY_SCHEMA
)
async def test_bodies_follow_the_gateways_settings(
    tmp_path: Path,
    app_client: AppClient,
    with_options_table: bool,
    options: dict[str, str],
    token_changes: dict[str, Any],
    expected_subscription: dict[str, Any],
    expected_usage: float,
) -> None:
    schema = GATEWAY_SCHEMA if with_options_table else GATEWAY_SCHEMA.split("CREATE TABLE `options`")[0]
    gateway = Gateway(tmp_path / "gw.db", schema=schema)
    for key, value in options.items():
        gateway.set_option(key, value)
    token = gateway.add_token(user_id=gateway.add_user(**USER), **{**TOKEN, **token_changes})
    try:
        async with app_client(sqlite_path=gateway.path) as (_, client):
            sub, use = await billing(client, token)
            again = await billing(client, token)  # served from the rendered answers
    finally:
        gateway.close()
    assert sub == expected_subscription
    assert use == {"object": "list", "total_usage": expected_usage}
    assert again == (sub, use)


async def test_whole_amounts_are_rendered_like_the_gateway(gateway: Gateway, app_client: AppClient) -> None:
    """Go's encoder writes 2, not 2.0; fractions keep their shortest form."""
    whole = gateway.add_token(remain=700_000, used=300_000, expired_time=NEVER)
    async with app_client() as (_, client):
        body = (await client.get(SUBSCRIPTION, headers=whole.bearer)).content
        usage = (await client.get(USAGE, headers=whole.bearer)).content
    assert b'"hard_limit_usd":2,' in body
    assert usage == b'{"object":"list","total_usage":60}'


async def test_whole_amounts_past_64_bits_are_answered(gateway: Gateway, app_client: AppClient) -> None:
    """A whole amount no 64-bit integer holds (a used quota of 2**62 shown in TOKENS is 100 times
    that in hundredths; a QuotaPerUnit below 1 multiplies too) is still a number the gateway
    writes (its float64): it was rendered as a Python int orjson refuses, a 500 on every route."""
    gateway.set_option("general_setting.quota_display_type", "TOKENS")
    token = gateway.add_token(remain=1, used=2**62, expired_time=NEVER)
    gateway.add_log(token, created_at=1_700_000_000, quota=2**62)
    dated = {"start_date": "2023-11-14", "end_date": "2023-11-15"}
    async with app_client() as (_, client):
        sub, use = await billing(client, token)
        ranged = await client.get(USAGE, params=dated, headers=token.bearer)
        history = await client.get("/api/usage/token/history", params=dated, headers=token.bearer)
    gateway.set_option("general_setting.quota_display_type", "USD")
    gateway.set_option("QuotaPerUnit", "0.01")
    async with app_client() as (_, client):
        tiny_sub, tiny_use = await billing(client, token)
    assert sub["hard_limit_usd"] == 2**62 and use["total_usage"] == float(2**62) * 100
    assert ranged.status_code == 200, ranged.text
    assert ranged.json()["daily_costs"][0]["line_items"] == [{"name": "gpt-4o-mini", "cost": float(2**62) * 100}]
    assert history.status_code == 200 and history.json()["data"]["total"]["amount"] == 2**62
    assert tiny_sub["hard_limit_usd"] == float(2**62 + 1) / 0.01
    assert tiny_use["total_usage"] == float(2**62) / 0.01 * 100


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        pytest.param({}, BillingOptions(), id="defaults"),
        pytest.param({"general_setting.quota_display_type": " "}, BillingOptions(), id="blank-display-type"),
        pytest.param({"USDExchangeRate": "-1"}, BillingOptions(), id="negative-rate-is-default"),
        pytest.param({"USDExchangeRate": "nan"}, BillingOptions(), id="nan-rate-is-default"),
        pytest.param({"USDExchangeRate": "7.1"}, BillingOptions(usd_exchange_rate=7.1), id="rate"),
        # Numbers as Go's strconv.ParseFloat takes them: no spaces, no underscores, hex with an exponent.
        pytest.param({"QuotaPerUnit": " 1000"}, BillingOptions(), id="spaced-number-is-junk"),
        pytest.param({"QuotaPerUnit": "1_000"}, BillingOptions(), id="underscored-number-is-junk"),
        pytest.param({"QuotaPerUnit": "0x1p10"}, BillingOptions(quota_per_unit=1024.0), id="hex-number"),
        pytest.param({"USDExchangeRate": "0x10"}, BillingOptions(), id="hex-without-exponent-is-junk"),
        pytest.param({"USDExchangeRate": "0x1p99999"}, BillingOptions(), id="hex-past-float64-is-default"),
        pytest.param({"QuotaPerUnit": "5e5", "USDExchangeRate": ".5"}, BillingOptions(usd_exchange_rate=0.5), id="e"),
        pytest.param({"DisplayTokenStatEnabled": "false"}, BillingOptions(token_stat=False), id="owner-totals"),
        pytest.param({"DisplayTokenStatEnabled": "TRUE"}, BillingOptions(token_stat=False), id="only-lowercase-true"),
        pytest.param(
            {"general_setting.quota_display_type": "EUR"}, BillingOptions(display_type="EUR"), id="unknown-type-kept"
        ),
        # Any value but "true" turns the legacy switch off, as for every *Enabled option.
        pytest.param({"DisplayInCurrencyEnabled": "False"}, BillingOptions(display_type="TOKENS"), id="legacy-text"),
        pytest.param({"DisplayInCurrencyEnabled": "0"}, BillingOptions(display_type="TOKENS"), id="legacy-zero"),
    ],
)
def test_options_are_read_like_the_gateway(rows: dict[str, str], expected: BillingOptions) -> None:
    assert BillingOptions.from_rows(rows) == expected


def test_unknown_display_type_counts_like_usd() -> None:
    assert BillingOptions(display_type="EUR").amount(1_000_000) == BillingOptions().amount(1_000_000) == 2.0


def test_a_display_type_is_compared_as_stored() -> None:
    """The gateway compares the stored text as it is: " CNY" is no type it knows, and counts like USD."""
    options = BillingOptions.from_rows({"general_setting.quota_display_type": " CNY"})
    assert options.amount(1_000_000) == BillingOptions().amount(1_000_000) == 2.0


# --- options refresh --------------------------------------------------------------------------


async def test_option_changes_are_picked_up_after_the_interval(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token(remain=700_000, used=300_000, expired_time=NEVER)
    async with app_client(options_interval=0.2) as (app, client):
        assert (await billing(client, token))[0] == subscription(2)
        gateway.set_option("general_setting.quota_display_type", "TOKENS")
        gateway.set_option("DisplayTokenStatEnabled", "true")
        deadline = time.monotonic() + 10
        while (await billing(client, token))[0] != subscription(1_000_000):
            assert time.monotonic() < deadline, "option change not picked up"
            await asyncio.sleep(0.05)
        assert app.state.options.current.display_type == "TOKENS"
        gateway.set_option("general_setting.quota_display_type", None)  # back to the default
        while (await billing(client, token))[0] != subscription(2):
            assert time.monotonic() < deadline, "option removal not picked up"
            await asyncio.sleep(0.05)


async def test_options_are_read_at_start_only_with_interval_zero(gateway: Gateway, app_client: AppClient) -> None:
    gateway.set_option("QuotaPerUnit", "250000")
    token = gateway.add_token(remain=700_000, used=300_000, expired_time=NEVER)
    async with app_client(options_interval=0) as (app, client):
        gateway.set_option("QuotaPerUnit", "1000000")
        await asyncio.sleep(0.3)
        assert (await billing(client, token))[0] == subscription(4)
        assert app.state.store.option_statements == 1


async def test_a_failed_read_of_the_options_is_no_statement_error(gateway: Gateway, app_client: AppClient) -> None:
    """The billing settings' read is counted apart from the token statements, and so are its
    failures: usage_db_errors_total counts failures of the statements usage_db_statements_total
    counts (an error ratio past 100 %, an alert with no polling at all, otherwise)."""
    async with app_client(options_interval=0) as (app, _):
        store = app.state.store
        statements, errors = store.statements, store.errors
        with gateway.exclusive_lock(), pytest.raises(StoreUnavailable):
            await store.fetch_options(["QuotaPerUnit"])
        assert (store.statements, store.errors) == (statements, errors)


async def test_without_an_options_table_the_defaults_are_used_and_said_once(
    gateway: Gateway, app_client: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway database without `options` (a gateway not started yet): the billing routes
    answer with the gateway's defaults, and the log says so once, not at every look."""
    sqlite3.connect(gateway.path, isolation_level=None).execute("DROP TABLE options")
    token = gateway.add_token(remain=700_000, used=300_000, expired_time=NEVER)
    with caplog.at_level(logging.WARNING, logger="usage_service"):
        async with app_client(options_interval=0) as (app, client):
            assert (await billing(client, token))[0] == subscription(2)  # 500,000 quota per unit
            await app.state.options.refresh()
    said = [r for r in caplog.records if "no options table" in r.getMessage()]
    assert len(said) == 1


async def test_an_outage_keeps_the_last_known_options(gateway: Gateway, app_client: AppClient) -> None:
    gateway.set_option("general_setting.quota_display_type", "CNY")
    token = gateway.add_token(remain=700_000, used=300_000, expired_time=NEVER)
    async with app_client(options_interval=0) as (app, client):
        options = app.state.options
        before = options.current
        with gateway.exclusive_lock():
            assert await options.refresh() is before
        assert (await billing(client, token))[0] == subscription(14.6)
        assert await options.refresh() is before  # unchanged rows keep the same object (and rendered answers)


# --- the shared data path -------------------------------------------------------------------


async def test_polling_billing_routes_does_not_reach_the_database(
    gateway: Gateway, app_client: AppClient, redis_url: str
) -> None:
    token = gateway.add_token()
    async with app_client(redis_url=redis_url, local_ttl=60, cache_ttl=60) as (app, client):
        for _ in range(10):
            for path in ("/dashboard/billing/subscription", USAGE, "/api/usage/token", "/dashboard/billing/usage/"):
                assert (await client.get(path, headers=token.bearer)).status_code == 200
        assert app.state.store.statements == 1
        assert app.state.lookup.stats.db_reads == 1
    async with app_client(redis_url=redis_url) as (other, client):  # another instance: from Redis
        assert (await client.get(SUBSCRIPTION, headers=token.bearer)).status_code == 200
        assert other.state.store.statements == 0
        assert other.state.lookup.stats.redis_hits == 1


async def test_unknown_keys_are_remembered_on_billing_routes(gateway: Gateway, app_client: AppClient) -> None:
    wrong = {"Authorization": "Bearer sk-" + "w" * 48}
    async with app_client() as (app, client):
        for _ in range(10):
            assert (await client.get(USAGE, headers=wrong)).status_code == 401
        assert app.state.store.statements == 1


@pytest.mark.parametrize("layers", ["in-process", "redis"])
async def test_the_refresher_keeps_billing_answers_fresh(
    gateway: Gateway, app_client: AppClient, request: pytest.FixtureRequest, layers: str
) -> None:
    """Polled only through a billing route, a token is kept fresh by the refresher: a charge to it
    and to its owner shows without a restart, and stops it when the quota runs out."""
    gateway.set_option("DisplayTokenStatEnabled", "false")
    user = gateway.add_user(**USER)
    token = gateway.add_token(user_id=user, remain=500_000, used=0)
    overrides: dict[str, Any] = {"refresh_interval": 0.2, "cache_ttl": 60.0, "local_ttl": 60.0}
    if layers == "redis":
        overrides["redis_url"] = request.getfixturevalue("redis_url")
    async with app_client(**overrides) as (app, client):
        assert (await billing(client, token))[1]["total_usage"] == 200
        gateway.charge(token, 500_000)
        gateway.update_user(user, used_quota=1_500_000, quota=3_500_000)
        deadline = time.monotonic() + 10
        while True:
            response = await client.get(USAGE, headers=token.bearer)
            if response.status_code == 401:
                break
            assert time.monotonic() < deadline, "charge not picked up"
            await asyncio.sleep(0.05)
        assert_openai_error(response, 401, "token quota is exhausted", "invalid_api_key")
        usage = await client.get("/api/usage/token", headers=token.bearer)
        assert usage.json()["data"]["total_available"] == 0
        assert app.state.lookup.stats.db_reads == 1  # the rest came from the refresher


async def test_older_gateway_without_user_used_quota(tmp_path: Path, app_client: AppClient) -> None:
    from conftest import SQLITE_OLD_SCHEMA as OLD_GATEWAY_SCHEMA

    old = Gateway(tmp_path / "old.db", schema=OLD_GATEWAY_SCHEMA)
    # Written by hand: this users table has no used_quota column.
    old.db.execute("INSERT INTO users (username, password, quota) VALUES ('u', '!', 1000000)")
    user = int(old.db.execute("SELECT id FROM users WHERE username = 'u'").fetchone()[0])
    old.db.execute(
        "INSERT INTO tokens (user_id, `key`, name, remain_quota, used_quota, unlimited_quota)"
        " VALUES (?, ?, 'o', 5, 1, 0)",
        (user, "k" * 48),
    )
    token = Token(0, "k" * 48, user)
    try:
        async with app_client(sqlite_path=old.path) as (_, client):
            sub, use = await billing(client, token)
    finally:
        old.close()
    assert sub == subscription(6 / 500_000)
    assert use == {"object": "list", "total_usage": 1 / 500_000 * 100}


# --- the real process -----------------------------------------------------------------------


@pytest.mark.e2e
def test_real_process_serves_billing_routes(gateway: Gateway, redis_url: str) -> None:
    gateway.set_option("general_setting.quota_display_type", "CNY")
    token = gateway.add_token(remain=700_000, used=300_000, expired_time=NEVER)
    env = {"SQLITE_PATH": str(gateway.path), "REDIS_CONN_STRING": redis_url, "USAGE_OPTIONS_INTERVAL": "0.2"}
    with Service(env) as service, httpx.Client(base_url=service.url, headers=token.bearer) as client:
        assert client.get("/dashboard/billing/subscription").json() == subscription(14.6)
        assert (
            client.get("/v1/dashboard/billing/usage/?start_date=2024-01-01&end_date=2024-02-01").json()["total_usage"]
            == 438
        )
        gateway.set_option("general_setting.quota_display_type", "USD")
        deadline = time.monotonic() + 10
        while client.get(SUBSCRIPTION).json()["hard_limit_usd"] != 2:
            assert time.monotonic() < deadline, "option change not picked up"
            time.sleep(0.05)
        assert client.get(SUBSCRIPTION, headers={"Authorization": "Bearer nope"}).status_code == 401


@pytest.mark.parametrize(
    ("offset", "admitted"),
    [pytest.param(60, True, id="a-minute-left"), pytest.param(-60, False, id="a-minute-ago")],
)
def test_relay_expiry_is_against_the_clock(offset: int, admitted: bool) -> None:
    record = TokenRecord(1, 1, "t", 1, int(time.time()) + offset, 10, 0, False, False, (), 1)
    assert (relay_verdict(record) is None) is admitted
    assert usage_verdict(record) is None  # the usage route reads expired tokens all the same


async def test_answers_are_rendered_once_per_record_and_options(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client(local_ttl=60, cache_ttl=60, options_interval=0) as (app, client):
        await billing(client, token)
        record = app.state.lookup.cached(token.key.encode())
        first = dict(record.rendered)
        assert set(first) == {"subscription", "usage"}
        assert all(entry[0] is app.state.options.current for entry in first.values())
        await billing(client, token)
        assert all(record.rendered[name] is first[name] for name in first)  # reused, not rendered again
        gateway.set_option("general_setting.quota_display_type", "TOKENS")
        await app.state.options.refresh()
        await billing(client, token)
        assert all(record.rendered[name] is not first[name] for name in first)  # new options: rendered anew
