"""A token's log and spending are shown to that token's holder only.

Several users with several tokens each, their log rows interleaved (same token names, same
models, rows of no token among them): each token's `/api/log/token`, history and `daily_costs`
hold its own rows and nothing else, checked against a direct SELECT. Tokens the usage route
refuses are refused on every one of these routes; the legacy `?key=` form never leaves the key
in a log line, a metric or an error body.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from conftest import AppClient
from support import Gateway, Service, Token

DAY = 86400
LOG = "/api/log/token"
HISTORY = "/api/usage/token/history"
BALANCE = "/api/usage/token"
BILLING_USAGE = "/v1/dashboard/billing/usage"
MODELS = ("gpt-4o-mini", "gpt-4o", "deepseek-chat")


def owned_rows(gateway: Gateway, token: Token) -> list[tuple[int, int, str, int, int, int]]:
    """The token's rows, newest first: (created_at, type, model_name, quota, prompt, completion)."""
    return [
        tuple(row)  # type: ignore[misc]
        for row in gateway.db.execute(
            "SELECT created_at, type, model_name, quota, prompt_tokens, completion_tokens FROM logs"
            " WHERE token_id = ? ORDER BY id DESC",
            (token.id,),
        )
    ]


def spent(gateway: Gateway, token: Token, start: int, end: int) -> dict[str, int]:
    """What the history must add up to over [start, end): consumes minus refunds, consumes' tokens and count."""
    quota, prompt, completion, requests = gateway.db.execute(
        "SELECT COALESCE(SUM(CASE type WHEN 2 THEN quota ELSE -quota END), 0),"
        " COALESCE(SUM(CASE type WHEN 2 THEN prompt_tokens ELSE 0 END), 0),"
        " COALESCE(SUM(CASE type WHEN 2 THEN completion_tokens ELSE 0 END), 0),"
        " COALESCE(SUM(CASE type WHEN 2 THEN 1 ELSE 0 END), 0)"
        " FROM logs WHERE token_id = ? AND type IN (2, 6) AND created_at >= ? AND created_at < ?",
        (token.id, start, end),
    ).fetchone()
    return {"quota": quota, "prompt_tokens": prompt, "completion_tokens": completion, "requests": requests}


def shown(row: dict[str, object]) -> tuple[object, ...]:
    return (
        row["created_at"],
        row["type"],
        row["model_name"],
        row["quota"],
        row["prompt_tokens"],
        row["completion_tokens"],
    )


def history_totals(body: dict[str, object]) -> dict[str, int]:
    """The totals of a history answer."""
    data = body["data"]
    assert isinstance(data, dict)
    totals = data["total"]
    assert isinstance(totals, dict)
    return {name: int(totals[name]) for name in ("quota", "prompt_tokens", "completion_tokens", "requests")}


def daily_cost_total(body: dict[str, object]) -> float:
    """The sum of every line item of a billing usage answer's daily_costs (OpenAI's cents)."""
    costs = body["daily_costs"]
    assert isinstance(costs, list)
    return sum(float(item["cost"]) for day in costs for item in day["line_items"])


@pytest.fixture
def population(gateway: Gateway) -> Iterator[dict[str, Token]]:
    """Three users, two tokens each (all named alike), rows interleaved over four days; rows of no token too."""
    now = int(time.time())
    tokens: dict[str, Token] = {}
    for user in ("a", "b", "c"):
        user_id = gateway.add_user()
        for n in (1, 2):
            tokens[f"{user}{n}"] = gateway.add_token(user_id=user_id, name="my token", remain=10**9)
    ordered = list(tokens.values())
    for i in range(240):
        token = ordered[(i * 7) % len(ordered)]
        kind = 5 if i % 11 == 0 else 6 if i % 17 == 0 else 2
        gateway.add_log(
            token,
            created_at=now - 4 * DAY + i * 1400,
            type=kind,
            model_name=MODELS[i % 3],
            quota=0 if kind == 5 else 100 + i,
            prompt_tokens=0 if kind != 2 else 10 + i,
            completion_tokens=0 if kind != 2 else i,
            token_name="my token",  # the gateway copies the name: every token's rows look alike by name
            channel_id=3,
            ip="203.0.113.9",
            other='{"model_ratio":2,"admin_info":{"use_channel":["3"]}}',
        )
        if i % 20 == 0:  # a top-up of the same user, made by no token
            gateway.add_log(None, user_id=token.user_id, created_at=now - 4 * DAY + i * 1400, type=1, quota=5000)
    yield tokens


@pytest.mark.asyncio
async def test_each_token_sees_its_own_rows_only(
    gateway: Gateway, population: dict[str, Token], app_client: AppClient, redis_url: str
) -> None:
    now = int(time.time())
    async with app_client(redis_url=redis_url) as (_, client):
        for name, token in population.items():
            rows = owned_rows(gateway, token)
            assert rows, name
            for form in ({"headers": token.bearer}, {"params": {"key": f"sk-{token.key}"}}):
                answer = await client.get(LOG, **form)  # type: ignore[arg-type]
                assert answer.status_code == 200, (name, answer.text)
                body = answer.json()
                assert body["success"] is True
                assert [shown(row) for row in body["data"]] == rows, name
                for row in body["data"]:
                    assert row["token_id"] == token.id and "channel_id" not in row and not row.get("channel")
                    assert "admin_info" not in row["other"] and "model_ratio" in row["other"]
            paged = (await client.get(LOG, params={"p": 1, "page_size": 100}, headers=token.bearer)).json()
            assert [shown(row) for row in paged["data"]["items"]] == rows[:100]
            assert paged["data"]["total"] == len(rows)

            answer = await client.get(HISTORY, headers=token.bearer)
            assert answer.status_code == 200, (name, answer.text)
            # The default range is the last 30 days: all of this token's rows, none of the others'.
            assert history_totals(answer.json()) == spent(gateway, token, now - 30 * DAY, now + DAY), name

            start = datetime.fromtimestamp(now - 5 * DAY, UTC).date()
            end = datetime.fromtimestamp(now, UTC).date() + timedelta(days=1)
            answer = await client.get(
                BILLING_USAGE,
                params={"start_date": start.isoformat(), "end_date": end.isoformat()},
                headers=token.bearer,
            )
            assert answer.status_code == 200, (name, answer.text)
            quota = spent(gateway, token, 0, now + DAY)["quota"]  # the range holds every row
            # daily_costs are in cents of the display unit: QuotaPerUnit (500,000) quota to the dollar.
            assert daily_cost_total(answer.json()) == pytest.approx(quota / 500_000 * 100)


REFUSALS = [
    pytest.param("disabled", 401, 401, id="disabled-token"),
    pytest.param("banned", 403, 403, id="banned-user"),
    pytest.param("unknown", 401, 401, id="unknown-key"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("case", "usage_status", "billing_status"), REFUSALS)
async def test_refused_tokens_see_nothing(
    gateway: Gateway,
    population: dict[str, Token],
    app_client: AppClient,
    redis_url: str,
    case: str,
    usage_status: int,
    billing_status: int,
) -> None:
    token = population["b1"]
    if case == "disabled":
        gateway.update_token(token, status=2)
    elif case == "banned":
        gateway.update_user(token.user_id, status=2)
    else:
        token = Token(0, "Zz9" * 16, 0)
    async with app_client(redis_url=redis_url) as (_, client):
        balance = await client.get(BALANCE, headers=token.bearer)
        assert balance.status_code == usage_status
        for path in (LOG, HISTORY):
            answer = await client.get(path, headers=token.bearer)
            assert (answer.status_code, answer.json()) == (usage_status, balance.json()), path
        legacy = await client.get(LOG, params={"key": f"sk-{token.key}"})
        assert (legacy.status_code, legacy.json()) == (usage_status, balance.json())
        dates = {"start_date": "2025-01-01", "end_date": "2025-01-31"}
        billing = await client.get(BILLING_USAGE, params=dates, headers=token.bearer)
        assert billing.status_code == billing_status
        assert "error" in billing.json() and "daily_costs" not in billing.json()
        for answer in (balance, billing, legacy):
            assert token.key not in answer.text


@pytest.mark.asyncio
async def test_key_in_the_query_reaches_no_log_metric_or_body(
    gateway: Gateway,
    population: dict[str, Token],
    app_client: AppClient,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = population["a2"]
    unknown = "Qq1" * 16
    caplog.set_level(logging.DEBUG)
    async with app_client(redis_url=redis_url, access_log=True) as (_, client):
        answers = [
            await client.get(LOG, params={"key": f"sk-{token.key}"}),
            await client.get(LOG, params={"key": f"sk-{unknown}"}),
            await client.get(LOG, params={"key": f"sk-{token.key}", "p": "x"}),  # a bad parameter beside it
            await client.get(LOG, params={"key": f"sk-{token.key}!"}),  # not a key's shape
            await client.get(LOG + "/", params={"key": f"sk-{token.key}"}),
        ]
        metrics = (await client.get("/metrics")).text
    assert answers[0].status_code == 200 and answers[1].status_code == 401
    for answer in answers:
        for secret in (token.key, unknown):
            assert secret not in answer.text
            assert secret[:12] not in answer.text and secret[-12:] not in answer.text
    # The service's own lines (the test's client and the database driver log what they were given).
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("usage_service", "uvicorn")))
    for secret in (token.key, unknown):
        assert secret[:12] not in ours and secret[-12:] not in ours
        assert secret[:12] not in metrics and secret[-12:] not in metrics
    assert any(r.name == "usage_service.access" for r in caplog.records)  # the access log was on


def test_key_in_the_query_stays_out_of_the_servers_output(gateway: Gateway, population: dict[str, Token]) -> None:
    """The real server at debug level with the access log on: its whole output, not only our loggers."""
    token = population["c1"]
    env = {"SQLITE_PATH": str(gateway.path), "USAGE_ACCESS_LOG": "on"}
    with Service(env, "--log-level", "debug") as service:
        with httpx.Client(base_url=service.url) as client:
            assert client.get(LOG, params={"key": f"sk-{token.key}"}).status_code == 200
            assert client.get(LOG, params={"key": "sk-" + "Ww2" * 16}).status_code == 401
            metrics = client.get("/metrics").text
    output = service.output()
    assert LOG in output  # the requests were logged
    for secret in (token.key, "Ww2" * 16):
        assert secret[:12] not in output and secret[:12] not in metrics
