"""/dashboard/billing/usage with start_date and end_date: OpenAI's daily_costs from the request log."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from conftest import AppClient
from support import Gateway, Token

pytestmark = pytest.mark.asyncio

USAGE = "/v1/dashboard/billing/usage"
DAY = 86400


def utc(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())  # type: ignore[misc]


async def usage(client: httpx.AsyncClient, token: Token, path: str = USAGE, **params: str) -> dict[str, Any]:
    response = await client.get(path, params=params, headers=token.bearer)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    return response.json()  # type: ignore[no-any-return]


def assert_bad_range(response: httpx.Response, message: str) -> None:
    assert response.status_code == 400, response.text
    assert response.json() == {
        "error": {"message": message, "type": "invalid_request_error", "code": "invalid_date_range"}
    }


async def test_daily_costs_per_utc_day_and_model(gateway: Gateway, app_client: AppClient) -> None:
    # 1,000,000 quota used in its lifetime: 200 hundredths of a dollar at 500,000 quota per dollar.
    token = gateway.add_token(remain=1_000_000, used=1_000_000)
    other = gateway.add_token(user_id=token.user_id)
    # In time order, as the gateway appends them.
    gateway.add_log(token, created_at=utc(2026, 8, 31, 23, 59, 59), quota=888_888)  # before start_date
    gateway.add_log(token, created_at=utc(2026, 9, 1, 0, 0), quota=50_000, model_name="o3")
    gateway.add_log(token, created_at=utc(2026, 9, 1, 12), type=6, quota=1_000, model_name="gpt-4o")  # a refund
    gateway.add_log(token, created_at=utc(2026, 9, 1, 23, 59, 59), quota=5_000, model_name="gpt-4o")
    gateway.add_log(other, created_at=utc(2026, 9, 2, 8), quota=999_999)  # the owner's other token
    gateway.add_log(token, created_at=utc(2026, 9, 3, 8), quota=250_000, model_name="gpt-4o")
    gateway.add_log(token, created_at=utc(2026, 9, 4, 0, 0), quota=777_777)  # end_date's day: excluded
    async with app_client() as (_, client):
        body = await usage(client, token, start_date="2026-09-01", end_date="2026-09-04")
    async with app_client(billing_total="range") as (_, client):
        ranged = await usage(client, token, "/dashboard/billing/usage/", start_date="2026-09-01", end_date="2026-09-04")
    daily = [
        {"timestamp": utc(2026, 9, 1), "line_items": [{"name": "gpt-4o", "cost": 0.8}, {"name": "o3", "cost": 10}]},
        {"timestamp": utc(2026, 9, 2), "line_items": []},
        {"timestamp": utc(2026, 9, 3), "line_items": [{"name": "gpt-4o", "cost": 50}]},
    ]
    assert body == {"object": "list", "daily_costs": daily, "total_usage": 200}
    # The range's total, exactly as a direct SELECT over the same rows gives it.
    (net,) = gateway.db.execute(
        "SELECT SUM(CASE type WHEN 2 THEN quota ELSE -quota END) FROM logs"
        " WHERE token_id = ? AND type IN (2, 6) AND created_at >= ? AND created_at < ?",
        (token.id, utc(2026, 9, 1), utc(2026, 9, 4)),
    ).fetchone()
    assert ranged == {"object": "list", "daily_costs": daily, "total_usage": net / 500_000 * 100}


async def test_without_dates_the_gateways_answer_is_unchanged(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token(remain=700_000, used=300_000)
    gateway.add_log(token, created_at=utc(2026, 9, 1), quota=50_000)
    async with app_client(billing_total="range") as (_, client):
        for query in ("", "?start_date=&end_date=", "?foo=bar"):
            response = await client.get(USAGE + query, headers=token.bearer)
            assert response.content == b'{"object":"list","total_usage":60}'


async def test_owner_totals_keep_the_tokens_own_daily_costs(gateway: Gateway, app_client: AppClient) -> None:
    gateway.set_option("DisplayTokenStatEnabled", "false")
    token = gateway.add_token(user_id=gateway.add_user(used_quota=5_000_000), used=100)
    other = gateway.add_token(user_id=token.user_id)
    gateway.add_log(token, created_at=utc(2026, 9, 1, 1), quota=500_000)
    gateway.add_log(other, created_at=utc(2026, 9, 1, 1), quota=4_000_000)
    async with app_client() as (_, client):
        body = await usage(client, token, start_date="2026-09-01", end_date="2026-09-02")
    assert body["total_usage"] == 1000  # the owner's lifetime use, as the gateway shows it
    assert body["daily_costs"] == [{"timestamp": utc(2026, 9, 1), "line_items": [{"name": "gpt-4o-mini", "cost": 100}]}]


async def test_neko_api_key_tools_range_is_accepted(gateway: Gateway, app_client: AppClient) -> None:
    """It asks from now - 100 x 24 h to today, month and day unpadded, in the browser's zone:
    100 days apart, or 101 during an hour of the night after a DST change."""
    token = gateway.add_token()
    today = datetime.now(UTC).date()
    async with app_client() as (_, client):
        for days in (100, 101):
            start = today - timedelta(days=days)
            body = await usage(
                client,
                token,
                start_date=f"{start.year}-{start.month}-{start.day}",
                end_date=f"{today.year}-{today.month}-{today.day}",
            )
            assert len(body["daily_costs"]) == days
            assert body["daily_costs"][0]["timestamp"] == utc(start.year, start.month, start.day)
        too_long = await client.get(
            USAGE, params={"start_date": str(today - timedelta(days=102)), "end_date": str(today)}, headers=token.bearer
        )
    assert_bad_range(too_long, "start_date, end_date: at most 101 days apart")


async def test_empty_and_future_ranges(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token(remain=700_000, used=300_000)
    async with app_client(billing_total="range") as (_, client):
        empty = await usage(client, token, start_date="2026-09-01", end_date="2026-09-01")
        future = await usage(client, token, start_date="2999-01-01", end_date="2999-01-03")
    assert empty == {"object": "list", "daily_costs": [], "total_usage": 0}
    assert future["daily_costs"] == [
        {"timestamp": utc(2999, 1, 1), "line_items": []},
        {"timestamp": utc(2999, 1, 2), "line_items": []},
    ]
    assert future["total_usage"] == 0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        pytest.param(
            {"start_date": "2026-09-01"},
            "start_date, end_date: give both (or neither, for the lifetime total alone)",
            id="only-start",
        ),
        pytest.param(
            {"end_date": "2026-09-01"},
            "start_date, end_date: give both (or neither, for the lifetime total alone)",
            id="only-end",
        ),
        pytest.param(
            {"start_date": "junk", "end_date": "2026-09-01"}, "start_date: expected a date as YYYY-MM-DD", id="junk"
        ),
        pytest.param(
            {"start_date": "2026-09-01", "end_date": "2026-02-30"},
            "end_date: expected a date as YYYY-MM-DD",
            id="no-such-day",
        ),
        pytest.param(
            {"start_date": "2026-09-02", "end_date": "2026-09-01"}, "end_date: before start_date", id="reversed"
        ),
    ],
)
async def test_bad_ranges_are_openai_400s(
    gateway: Gateway, app_client: AppClient, params: dict[str, str], message: str
) -> None:
    token = gateway.add_token()
    async with app_client() as (_, client):
        response = await client.get(USAGE, params=params, headers=token.bearer)
    assert_bad_range(response, message)


async def test_the_relay_rules_still_apply(gateway: Gateway, app_client: AppClient) -> None:
    exhausted = gateway.add_token(status=4, remain=0)
    async with app_client() as (_, client):
        response = await client.get(USAGE, params={"start_date": "junk", "end_date": "junk"}, headers=exhausted.bearer)
    assert response.status_code == 401
    assert response.json()["error"]["message"] == "token quota is exhausted"


async def test_a_dated_answer_is_kept_for_the_local_ttl_until_a_round_changes_the_token(
    gateway: Gateway, app_client: AppClient
) -> None:
    token = gateway.add_token(remain=700_000, used=0)
    today = datetime.now(UTC).date()
    dates = {"start_date": str(today), "end_date": str(today + timedelta(days=1))}
    gateway.add_log(token, quota=500_000)
    async with app_client(local_ttl=3600, cache_ttl=3600, refresh_interval=0) as (app, client):
        first = await usage(client, token, **dates)
        gateway.add_log(token, quota=500_000)
        kept = await usage(client, token, **dates)  # within USAGE_LOCAL_TTL: the answer rendered first
        # The refresher's round says the token's open days changed: the kept answer is out of date.
        app.state.history.hear_round(time.time(), 1, True, [(token.id, None)])
        heard = await usage(client, token, **dates)
    async with app_client() as (_, client):
        other = await usage(client, token, **dates)  # another worker
    assert first == kept and first["daily_costs"][0]["line_items"] == [{"name": "gpt-4o-mini", "cost": 100}]
    assert heard == other and other["daily_costs"][0]["line_items"] == [{"name": "gpt-4o-mini", "cost": 200}]


async def test_database_down_is_an_openai_503(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client(local_ttl=3600, cache_ttl=3600, refresh_interval=0) as (_, client):
        await usage(client, token)  # the token's record is now held in-process
        with gateway.exclusive_lock():
            response = await client.get(
                USAGE, params={"start_date": "2026-09-01", "end_date": "2026-09-02"}, headers=token.bearer
            )
            lifetime = await client.get(USAGE, headers=token.bearer)
    assert response.status_code == 503
    assert response.json() == {
        "error": {"message": "database unavailable, retry later", "type": "server_error", "code": "service_unavailable"}
    }
    assert lifetime.status_code == 200  # the lifetime answer needs no log
