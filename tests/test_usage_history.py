"""GET /api/usage/token/history through the real app, on a real SQLite gateway with its request log."""

from __future__ import annotations

import time
import tracemalloc
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from conftest import AppClient
from support import Gateway, Token
from test_metrics import grown, scrape

from usage_service.openapi import BROWSER_PATHS

pytestmark = pytest.mark.asyncio

URL = "/api/usage/token/history"
QUOTA_PER_USD = 500_000


def utc(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())  # type: ignore[misc]


def direct_sum(gateway: Gateway, token: Token, start: int, end: int) -> tuple[int, int, int, int]:
    """(quota net of refunds, prompt tokens, completion tokens, requests) by a plain SELECT."""
    row = gateway.db.execute(
        "SELECT COALESCE(SUM(CASE type WHEN 2 THEN quota ELSE -quota END), 0),"
        " COALESCE(SUM(CASE type WHEN 2 THEN prompt_tokens ELSE 0 END), 0),"
        " COALESCE(SUM(CASE type WHEN 2 THEN completion_tokens ELSE 0 END), 0),"
        " COALESCE(SUM(type = 2), 0)"
        " FROM logs WHERE token_id = ? AND type IN (2, 6) AND created_at >= ? AND created_at < ?",
        (token.id, start, end),
    ).fetchone()
    return tuple(row)  # type: ignore[return-value]


async def history(client: httpx.AsyncClient, token: Token, **params: str) -> dict[str, Any]:
    response = await client.get(URL, params=params, headers=token.bearer)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "private, no-cache"
    body: dict[str, Any] = response.json()
    assert body["success"] is True and body["message"] == ""
    return body["data"]  # type: ignore[no-any-return]


def quotas(data: dict[str, Any]) -> list[tuple[Any, ...]]:
    keys = [{"day": "date", "model": "model"}[g] for g in data["group_by"]]
    return [(*(b[k] for k in keys), b["quota"]) for b in data["buckets"]]


async def test_default_is_the_last_30_days_by_day_in_utc(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    now = int(time.time())
    # In time order, as the gateway appends them.
    gateway.add_log(token, created_at=now - 40 * 86400, quota=100_000)  # outside
    gateway.add_log(token, created_at=now - 29 * 86400, quota=5)  # 29 days ago: the range's first day (or just before)
    gateway.add_log(token, created_at=now, quota=700, prompt_tokens=11, completion_tokens=3)
    before = datetime.now(UTC).date()
    async with app_client() as (_, client):
        data = await history(client, token)
    after = datetime.now(UTC).date()
    end = date.fromisoformat(data["end_date"])
    assert end in (before, after)  # today, read on either side of a midnight
    start = date.fromisoformat(data["start_date"])
    assert (end - start).days == 29
    assert (data["object"], data["tz"], data["group_by"], data["unit"]) == (
        "token_usage_history",
        "UTC",
        ["day"],
        "USD",
    )
    assert [b["date"] for b in data["buckets"]] == [(start + timedelta(days=n)).isoformat() for n in range(30)]
    assert data["buckets"][-1] == {
        "date": end.isoformat(),
        "quota": 700,
        "amount": 700 / QUOTA_PER_USD,
        "prompt_tokens": 11,
        "completion_tokens": 3,
        "requests": 1,
    }
    first, last = utc(start.year, start.month, start.day), utc(end.year, end.month, end.day) + 86400
    quota, prompt, completion, requests = direct_sum(gateway, token, first, last)
    assert data["total"] == {
        "quota": quota,
        "amount": quota / QUOTA_PER_USD,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "requests": requests,
    }
    assert sum(b["quota"] for b in data["buckets"]) == quota


@pytest.fixture(params=["in-process-only", "with-redis"])
def with_redis(request: pytest.FixtureRequest) -> dict[str, object]:
    """Run a test without Redis and with it (the history engine shares closed days there)."""
    if request.param == "with-redis":
        return {"redis_url": request.getfixturevalue("redis_url")}
    return {}


async def test_sums_equal_a_direct_select_and_count_only_this_token(
    gateway: Gateway, app_client: AppClient, with_redis: dict[str, object]
) -> None:
    token = gateway.add_token()
    sibling = gateway.add_token(user_id=token.user_id)  # same owner, another token
    stranger = gateway.add_token()
    day = utc(2026, 5, 10)
    rows: list[tuple[int, Token | None, dict[str, Any]]] = [
        (day + n * 1800, token, {"quota": 100 + n, "model_name": ("gpt-4o", "o3")[n % 2]})
        for n in range(48)  # every half hour of the day, two models
    ]
    rows.append((day + 3600, token, {"type": 6, "quota": 250, "model_name": "gpt-4o"}))  # a refund
    for kind in (1, 3, 4, 5):  # top-up, management, system, error rows are no spending
        rows.append((day + 60, token, {"type": kind, "quota": 9_999}))
    rows.append((day + 60, sibling, {"quota": 50_000}))
    rows.append((day + 60, stranger, {"quota": 60_000}))
    rows.append((day + 60, None, {"quota": 70_000, "user_id": token.user_id}))  # made by no token
    for created_at, author, columns in sorted(rows, key=lambda row: row[0]):  # in time order, as the gateway appends
        gateway.add_log(author, created_at=created_at, **columns)
    async with app_client(**with_redis) as (_, client):
        data = await history(client, token, start_date="2026-05-09", end_date="2026-05-11", group_by="day,model")
        by_model = await history(client, token, start_date="2026-05-09", end_date="2026-05-11", group_by="model")
    async with app_client(**with_redis) as (_, client):  # another worker: the closed days from Redis, if any
        again = await history(client, token, start_date="2026-05-09", end_date="2026-05-11", group_by="day,model")
    assert again == data
    quota, prompt, completion, requests = direct_sum(gateway, token, day, day + 86400)
    assert data["total"]["quota"] == quota == sum(100 + n for n in range(48)) - 250
    assert (data["total"]["prompt_tokens"], data["total"]["completion_tokens"]) == (prompt, completion)
    assert data["total"]["requests"] == requests == 48
    assert quotas(data) == [
        ("2026-05-10", "gpt-4o", sum(100 + n for n in range(0, 48, 2)) - 250),
        ("2026-05-10", "o3", sum(100 + n for n in range(1, 48, 2))),
    ]
    assert quotas(by_model) == [(model, q) for _, model, q in quotas(data)]
    assert by_model["total"] == data["total"]


@pytest.mark.parametrize(
    ("tz", "start", "end", "rows", "expected"),
    [
        pytest.param(
            "Europe/Berlin",
            "2026-03-28",
            "2026-03-30",
            # The 29th is 23 h long: 2026-03-28T23:00Z to 2026-03-29T22:00Z.
            [utc(2026, 3, 28, 22, 59, 59), utc(2026, 3, 28, 23), utc(2026, 3, 29, 21, 59, 59), utc(2026, 3, 29, 22)],
            [("2026-03-28", 1), ("2026-03-29", 2 + 4), ("2026-03-30", 8)],
            id="berlin-23h-day",
        ),
        pytest.param(
            "Europe/Berlin",
            "2026-10-24",
            "2026-10-26",
            # The 25th is 25 h long: 2026-10-24T22:00Z to 2026-10-25T23:00Z.
            [utc(2026, 10, 24, 21, 59), utc(2026, 10, 24, 22), utc(2026, 10, 25, 22, 59), utc(2026, 10, 25, 23)],
            [("2026-10-24", 1), ("2026-10-25", 2 + 4), ("2026-10-26", 8)],
            id="berlin-25h-day",
        ),
        pytest.param(
            "America/New_York",
            "2026-03-07",
            "2026-03-08",
            [utc(2026, 3, 7, 4, 59), utc(2026, 3, 7, 5), utc(2026, 3, 8, 4, 59), utc(2026, 3, 8, 5)],
            [("2026-03-07", 2 + 4), ("2026-03-08", 8)],
            id="new-york-before-and-on-dst",
        ),
        pytest.param(
            "Asia/Kolkata",
            "2026-06-01",
            "2026-06-01",
            [
                utc(2026, 5, 31, 18, 29, 59),
                utc(2026, 5, 31, 18, 30),
                utc(2026, 6, 1, 18, 29, 59),
                utc(2026, 6, 1, 18, 30),
            ],
            [("2026-06-01", 2 + 4)],
            id="kolkata-half-hour",
        ),
        pytest.param(
            "Asia/Kathmandu",
            "2026-06-01",
            "2026-06-02",
            [
                utc(2026, 5, 31, 18, 14, 59),
                utc(2026, 5, 31, 18, 15),
                utc(2026, 6, 1, 18, 14, 59),
                utc(2026, 6, 1, 18, 15),
            ],
            [("2026-06-01", 2 + 4), ("2026-06-02", 8)],
            id="kathmandu-quarter-hour",
        ),
    ],
)
async def test_days_follow_the_clients_zone(
    gateway: Gateway,
    app_client: AppClient,
    tz: str,
    start: str,
    end: str,
    rows: list[int],
    expected: list[tuple[str, int]],
) -> None:
    token = gateway.add_token()
    for n, created_at in enumerate(rows):
        gateway.add_log(token, created_at=created_at, quota=2**n)
    async with app_client() as (_, client):
        data = await history(client, token, start_date=start, end_date=end, tz=tz)
    assert data["tz"] == tz
    assert quotas(data) == expected
    zone = ZoneInfo(tz)
    first = int(datetime.combine(date.fromisoformat(start), datetime.min.time(), zone).timestamp())
    last = int(datetime.combine(date.fromisoformat(end) + timedelta(days=1), datetime.min.time(), zone).timestamp())
    assert data["total"]["quota"] == direct_sum(gateway, token, first, last)[0]


async def test_amounts_follow_the_gateways_display_unit(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    gateway.add_log(token, created_at=utc(2026, 1, 5, 12), quota=1_000_000)
    gateway.set_option("general_setting.quota_display_type", "CNY")
    gateway.set_option("USDExchangeRate", "7")
    params = {"start_date": "2026-01-05", "end_date": "2026-01-05"}
    async with app_client() as (_, client):
        cny = await history(client, token, **params)
    gateway.set_option("general_setting.quota_display_type", "TOKENS")
    async with app_client() as (_, client):
        tokens = await history(client, token, **params)
    assert (cny["unit"], cny["total"]["amount"], cny["buckets"][0]["amount"]) == ("CNY", 14, 14)
    assert (tokens["unit"], tokens["total"]["amount"]) == ("TOKENS", 1_000_000)


async def test_empty_and_future_ranges_are_zeros(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    zero = {"quota": 0, "amount": 0, "prompt_tokens": 0, "completion_tokens": 0, "requests": 0}
    async with app_client() as (_, client):
        past = await history(client, token, start_date="2001-01-01", end_date="2001-01-03")
        future = await history(client, token, start_date="2999-12-30", end_date="2999-12-31", group_by="day,model")
        only_start = await history(client, token, start_date="2999-01-01")  # end_date: start_date, later than today
    assert past["buckets"] == [{"date": f"2001-01-0{n}", **zero} for n in (1, 2, 3)]
    assert (future["buckets"], future["total"]) == ([], zero)
    assert (only_start["start_date"], only_start["end_date"]) == ("2999-01-01", "2999-01-01")


async def test_range_limit(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client() as (_, client):
        longest = await history(client, token, start_date="2026-01-01", end_date="2026-04-10")  # 100 days
        over = await client.get(
            URL, params={"start_date": "2026-01-01", "end_date": "2026-04-11"}, headers=token.bearer
        )
    async with app_client(history_max_days=7) as (_, client):
        week = await client.get(
            URL, params={"start_date": "2026-01-01", "end_date": "2026-01-08"}, headers=token.bearer
        )
        # Without a start, the range is the last 30 days, or as many as the setting allows.
        default = await client.get(URL, headers=token.bearer)
        ended = await client.get(URL, params={"end_date": "2026-01-08"}, headers=token.bearer)
    assert len(longest["buckets"]) == 100
    message = "start_date, end_date: at most {} days at once (end_date is included)"
    assert over.status_code == 400 and over.json() == {"success": False, "message": message.format(100)}
    assert week.status_code == 400 and week.json()["message"] == message.format(7)
    assert default.status_code == 200 and len(default.json()["data"]["buckets"]) == 7
    assert ended.status_code == 200
    assert [b["date"] for b in ended.json()["data"]["buckets"]][::6] == ["2026-01-02", "2026-01-08"]


async def test_a_default_start_never_falls_before_the_first_date(gateway: Gateway, app_client: AppClient) -> None:
    """An end date in the first days of 1970 alone: the default range is cut at 1970-01-01 (the
    first date a start may name), not 30 days back into 1969."""
    token = gateway.add_token()
    gateway.add_log(token, created_at=3 * 86400 + 60, quota=7)  # 1970-01-04
    async with app_client() as (_, client):
        data = await history(client, token, end_date="1970-01-05")
    assert (data["start_date"], data["end_date"]) == ("1970-01-01", "1970-01-05")
    assert quotas(data) == [(f"1970-01-0{day}", 7 if day == 4 else 0) for day in range(1, 6)]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        pytest.param({"start_date": "2026-02-30"}, "start_date: expected a date as YYYY-MM-DD", id="no-such-day"),
        pytest.param({"end_date": "yesterday"}, "end_date: expected a date as YYYY-MM-DD", id="words"),
        pytest.param({"start_date": ""}, "start_date: expected a date as YYYY-MM-DD", id="empty-date"),
        pytest.param(
            {"start_date": "1969-12-31"},
            "start_date: expected a date between 1970-01-01 and 9999-12-30",
            id="before-1970",
        ),
        pytest.param(
            {"start_date": "2026-03-02", "end_date": "2026-03-01"}, "end_date: before start_date", id="reversed"
        ),
        pytest.param({"tz": "Mars/Olympus"}, "tz: expected an IANA time zone name such as Europe/Berlin", id="tz"),
        pytest.param(
            {"tz": "../../../etc/passwd"}, "tz: expected an IANA time zone name such as Europe/Berlin", id="path"
        ),
        pytest.param({"tz": ""}, "tz: expected an IANA time zone name such as Europe/Berlin", id="empty-tz"),
        pytest.param({"group_by": "week"}, "group_by: expected day, model or day,model", id="group-by"),
        pytest.param({"group_by": "model,day"}, "group_by: expected day, model or day,model", id="group-by-order"),
    ],
)
async def test_bad_parameters_are_400s_naming_them(
    gateway: Gateway, app_client: AppClient, params: dict[str, str], message: str
) -> None:
    token = gateway.add_token()
    async with app_client() as (_, client):
        response = await client.get(URL, params=params, headers=token.bearer)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"success": False, "message": message}


@pytest.mark.parametrize(
    "path",
    [
        URL + "?start_date=2026-01-01&start_date=junk&end_date=2026-01-03&end_date=x&tz=UTC&tz=Mars/Olympus",
        "/v1/dashboard/billing/usage?start_date=2026-01-01&start_date=junk&end_date=2026-01-03&end_date=x",
        "/api/log/token?p=1&p=junk&page_size=5&page_size=-1&type=2&type=x",
    ],
    ids=["history", "billing", "log"],
)
async def test_a_repeated_parameter_is_read_as_its_first_value(
    gateway: Gateway, app_client: AppClient, path: str
) -> None:
    """As the gateway reads its query (gin's c.Query), on every route: the later copies, bad as
    they are here, are ignored."""
    token = gateway.add_token()
    async with app_client() as (_, client):
        response = await client.get(path, headers=token.bearer)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("headers", "columns", "status", "message"),
    [
        pytest.param({}, {}, 401, "No Authorization header", id="no-header"),
        pytest.param({"Authorization": "Bearer sk-" + "x" * 48}, {}, 401, "token not found", id="unknown-key"),
        pytest.param(None, {"status": 2}, 401, "token is disabled", id="disabled"),
        pytest.param(None, {"status": 3}, 200, None, id="expired-stays-readable"),
    ],
)
async def test_authentication_follows_the_usage_route(
    gateway: Gateway,
    app_client: AppClient,
    headers: dict[str, str] | None,
    columns: dict[str, Any],
    status: int,
    message: str | None,
) -> None:
    token = gateway.add_token(**columns)
    async with app_client() as (_, client):
        response = await client.get(URL + "/", headers=token.bearer if headers is None else headers)
    assert response.status_code == status
    if message is not None:
        assert response.json() == {"success": False, "message": message}
        assert response.headers["www-authenticate"] == "Bearer"


async def test_etag_revalidation_and_head(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    gateway.add_log(token, created_at=utc(2026, 2, 1, 8), quota=42)
    params = {"start_date": "2026-02-01", "end_date": "2026-02-02"}
    async with app_client() as (_, client):
        full = await client.get(URL, params=params, headers=token.bearer)
        etag = full.headers["etag"]
        revalidated = await client.get(URL, params=params, headers={**token.bearer, "If-None-Match": etag})
        head = await client.head(URL, params=params, headers=token.bearer)
        changed = await client.get(
            URL, params={**params, "tz": "Asia/Tokyo"}, headers={**token.bearer, "If-None-Match": etag}
        )
    assert revalidated.status_code == 304 and revalidated.content == b"" and revalidated.headers["etag"] == etag
    assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(len(full.content))
    assert changed.status_code == 200 and changed.headers["etag"] != etag


async def test_a_rendered_answer_is_kept_for_the_local_ttl_until_a_round_changes_the_token(
    gateway: Gateway, app_client: AppClient
) -> None:
    token = gateway.add_token()
    today = datetime.now(UTC).date().isoformat()
    params = {"start_date": today, "end_date": today}
    gateway.add_log(token, quota=1)
    async with app_client(local_ttl=3600, cache_ttl=3600) as (app, client):
        first = await history(client, token, **params)
        gateway.add_log(token, quota=2)
        kept = await history(client, token, **params)  # within USAGE_LOCAL_TTL: the answer rendered first
        # The refresher's round says the token's open days changed: the kept answer is out of
        # date, however young (the next request reads them again).
        app.state.history.hear_round(time.time(), 1, True, [(token.id, None)])
        heard = await history(client, token, **params)
    async with app_client() as (_, client):
        other = await history(client, token, **params)  # another worker
    assert first == kept and first["total"]["quota"] == 1
    assert heard == other and other["total"]["quota"] == 3


async def test_a_key_sent_in_the_query_string_is_not_kept(gateway: Gateway, app_client: AppClient) -> None:
    """Some clients add `?key=sk-…` to every call: the history's and the dated billing answers
    are kept by a digest of the query string, and nothing the app keeps holds the key."""
    from test_engines import texts_reachable_from

    token = gateway.add_token()
    gateway.add_log(token, quota=1)
    today = datetime.now(UTC).date().isoformat()
    query = f"key=sk-{token.key}&start_date={today}&end_date={today}"
    async with app_client() as (app, client):
        for path in (URL, "/v1/dashboard/billing/usage"):
            for _ in range(2):
                assert (await client.get(f"{path}?{query}", headers=token.bearer)).status_code == 200
        held = list(texts_reachable_from(app))
    assert any('"token_usage_history"' in text for text in held)  # the walk reached the kept answers
    fragments = {token.key[i : i + 16] for i in range(len(token.key) - 15)}
    assert not [text for text in held if any(fragment in text for fragment in fragments)]


async def test_database_down_is_503_or_the_last_answer(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    gateway.add_log(token, created_at=utc(2026, 2, 1, 8), quota=5)
    params = {"start_date": "2026-02-01", "end_date": "2026-02-01"}
    # Answers never fresh (USAGE_LOCAL_TTL 0), kept as stale copies for USAGE_STALE_IF_ERROR.
    async with app_client(local_ttl=0, refresh_interval=0) as (_, client):
        assert (await history(client, token, **params))["total"]["quota"] == 5
        with gateway.exclusive_lock():
            auth = {"headers": token.bearer}
            again = await client.get(URL, params=params, **auth)
            never = await client.get(URL, params={"start_date": "2026-03-01", "end_date": "2026-03-01"}, **auth)
    assert again.status_code == 200 and again.json()["data"]["total"]["quota"] == 5
    assert never.status_code == 503
    assert never.json() == {"success": False, "message": "database unavailable, retry later"}
    assert never.headers["retry-after"] == "1"


async def test_sums_past_64_bits_fail_their_tokens_history_alone(gateway: Gateway, app_client: AppClient) -> None:
    """Three days whose sums each fit in 64 bits and whose total does not, or a REAL quota past
    64 bits: the token's history is 503, as a day's sum past 64 bits already was (it was a 500),
    and another token's is answered."""
    params = {"start_date": "2026-02-01", "end_date": "2026-02-03"}
    over, real, other = gateway.add_token(), gateway.add_token(), gateway.add_token()
    for day in (1, 2, 3):
        gateway.add_log(over, created_at=utc(2026, 2, day, 8), quota=2**63 - 1)
    odd = gateway.add_log(real, created_at=utc(2026, 2, 2, 8), quota=1)
    gateway.db.execute("UPDATE logs SET quota = 1e20 WHERE id = ?", (odd,))
    gateway.add_log(other, created_at=utc(2026, 2, 2, 8), quota=7)
    async with app_client() as (_, client):
        for token in (over, real):
            response = await client.get(URL, params=params, headers=token.bearer)
            assert response.status_code == 503
            assert response.json() == {"success": False, "message": "database unavailable, retry later"}
        assert (await history(client, other, **params))["total"]["quota"] == 7


async def test_cors_and_metrics_labels(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client() as (_, client):
        before = await scrape(client)
        preflight = await client.options(
            URL, headers={"Origin": "https://dash.example.com", "Access-Control-Request-Method": "GET"}
        )
        answer = await client.get(URL + "/?tz=UTC", headers={**token.bearer, "Origin": "https://dash.example.com"})
        assert (await client.get(URL + "?tz=UTC", headers=token.bearer)).status_code == 200
        after = await scrape(client)
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert answer.headers["access-control-allow-origin"] == "*"
    # Requests are counted under the route's path, both spellings as one (never the query string).
    assert grown(before, after, "usage_http_requests_total", route=URL, status="200") == 2
    assert not [labels for _, labels in after if any("?" in v or v.startswith(URL + "/") for _, v in labels)]
    assert URL in BROWSER_PATHS and URL + "/" in BROWSER_PATHS


@pytest.mark.parametrize(
    "zone", ["UTC", "Asia/Kathmandu", "Australia/Eucla", "Pacific/Chatham", "America/St_Johns", "Europe/Berlin"]
)
async def test_a_query_parsed_once_per_slot_is_what_parsing_it_at_that_moment_gives(zone: str) -> None:
    """Which date is today changes only at a 15-minute bound, in every zone (quarter-hour
    offsets, DST changes included): a query parsed once per slot is the same at each moment."""
    from starlette.datastructures import QueryParams

    from usage_service.cache import query_digest
    from usage_service.history import SLOT
    from usage_service.usage_history import ParsedQueries, parse_history_query

    query_string = f"tz={zone}".encode()
    queries = ParsedQueries(366)
    moments = []
    for day in (date(2026, 3, 8), date(2026, 3, 29), date(2026, 10, 25), date(2026, 11, 1), date(2026, 12, 31)):
        midnight = datetime.combine(day, datetime.min.time(), ZoneInfo(zone)).timestamp()
        moments += [midnight + offset for offset in (-SLOT, -1, -0.5, 0, 0.5, 1, SLOT - 1, SLOT)]
    for now in moments:
        parsed = queries.get(query_string, query_digest(query_string), now)
        assert parsed == parse_history_query(QueryParams(query_string), now, 366), (zone, now)
    bad = b"start_date=2026-13-01"
    for _ in range(2):
        error = queries.get(bad, query_digest(bad), moments[0])
        assert isinstance(error, ValueError) and str(error) == "start_date: expected a date as YYYY-MM-DD"


async def test_a_kept_answer_holds_its_body_not_the_sums_it_was_made_from(
    gateway: Gateway, app_client: AppClient
) -> None:
    """Each query string has an answer of its own, and each answer kept the (day, model) sums it
    was made from, to compare the next computation with: 100 days of 20 models held about 75 KB
    per answer beside a body of 3 KB, unseen by the answers' byte bound (one key sending distinct
    query strings grew a worker by 1.5 GiB). An answer now keeps a digest of its sums."""
    token = gateway.add_token()
    now = int(time.time())
    for day in reversed(range(100)):  # in time order, as the gateway appends them
        for model in range(20):
            gateway.add_log(token, created_at=now - day * 86_400, model_name=f"model-{model}", quota=day + 1)
    async with app_client(refresh_interval=0) as (_, client):
        start = (datetime.now(UTC).date() - timedelta(days=99)).isoformat()

        async def ask(n: int) -> int:
            answer = await client.get(f"{URL}?group_by=model&start_date={start}&n={n}", headers=token.bearer)
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["data"]["buckets"]) == 20
            return len(answer.content)

        for n in range(20):  # the days read and kept, the allocator warmed up
            await ask(n)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            body = max([await ask(n) for n in range(20, 220)])
            grown = (tracemalloc.get_traced_memory()[0] - before) / 200
        finally:
            tracemalloc.stop()
    assert body < 4_000
    assert grown < body + 3_000, f"{grown:.0f} bytes kept per answer"


async def test_a_key_asking_for_new_ranges_each_time_is_refused_past_its_budget_of_days(
    gateway: Gateway, app_client: AppClient
) -> None:
    """Each range whose closed days a worker does not hold summed is summed slot by slot (for a
    busy token's 100 days, tens of thousands): one key asking for a new range each time could
    keep a worker's core busy for itself. Past its budget of days (USAGE_HISTORY_DAYS_PER_TOKEN
    a second after a burst of four times as many), a 429 in each route's shape; a range asked for
    again costs none, and other tokens have budgets of their own."""
    token, other = gateway.add_token(), gateway.add_token()
    today = datetime.now(UTC).date()

    def dates(back: int) -> str:  # 60 days ending `back` days ago: closed days only
        return f"start_date={today - timedelta(days=back + 59)}&end_date={today - timedelta(days=back)}"

    async with app_client(history_days_per_token=30) as (_, client):  # a burst of 120 days
        answers = [await client.get(f"{URL}?{dates(back)}", headers=token.bearer) for back in (1, 2, 3)]
        again = await client.get(f"{URL}?{dates(1)}&tz=UTC", headers=token.bearer)  # its days are held
        others = await client.get(f"{URL}?{dates(3)}", headers=other.bearer)
        billing = await client.get(
            f"/v1/dashboard/billing/usage?start_date={today - timedelta(days=90)}&end_date={today - timedelta(days=4)}",
            headers=token.bearer,
        )
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[2].json() == {"success": False, "message": "too many new date ranges for this token, retry later"}
    assert 1 <= int(answers[2].headers["retry-after"]) <= 2
    assert (again.status_code, others.status_code) == (200, 200)
    assert billing.status_code == 429
    assert billing.json()["error"]["code"] == "rate_limit_exceeded"


async def test_no_budget_of_days_when_turned_off(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    today = datetime.now(UTC).date()
    async with app_client(history_days_per_token=0) as (_, client):
        for back in range(1, 21):
            start, end = today - timedelta(days=back + 99), today - timedelta(days=back)
            answer = await client.get(f"{URL}?start_date={start}&end_date={end}", headers=token.bearer)
            assert answer.status_code == 200
