"""A gateway-like writer appends to the log and charges tokens while the service answers.

On each engine: a thread writes as the gateway does (a token's quota charged, then its log row;
now and then a refund or an error row; halfway, the periodic clean-up of rows older than a
cut-off) while the history, the log and the balance of the same tokens are polled. Every answer
along the way holds the asking token's rows only. Once the writer has stopped and the caches
have caught up (waited for with a predicate, within the freshness bound), the history's sums
(over the last 30 days, and over a range the clean-up reached into), the log's newest rows and
the balance equal a direct SELECT.
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from conftest import AppClient, GatewayFactory
from support import Gateway, Token
from test_refresh import eventually

pytestmark = pytest.mark.asyncio

DAY = 86400
LOG = "/api/log/token"
HISTORY = "/api/usage/token/history"
BALANCE = "/api/usage/token"
WRITES = 300
# Seconds the answers may take to show what was written: the cache's TTL, and some.
FRESHNESS = 6.0


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def gateway(request: pytest.FixtureRequest, make_gateway: GatewayFactory) -> Gateway:
    return make_gateway(request.param)


def select(gateway: Gateway, sql: str, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
    """Read the gateway's database directly, on its own connection (`?` placeholders)."""
    conn = getattr(gateway, "conn", None)
    if conn is None:
        return [tuple(row) for row in gateway.db.execute(sql, params)]
    with conn.cursor() as cursor:
        cursor.execute(sql.replace("?", "%s"), params)
        return [tuple(row) for row in cursor.fetchall()]


def spent(gateway: Gateway, token: Token, start: int) -> int:
    rows = select(
        gateway,
        "SELECT COALESCE(SUM(CASE WHEN type = 2 THEN quota ELSE -quota END), 0) FROM logs"
        " WHERE token_id = ? AND type IN (2, 6) AND created_at >= ?",
        (token.id, start),
    )
    return int(rows[0][0])


def newest(gateway: Gateway, token: Token) -> list[tuple[Any, ...]]:
    return select(
        gateway,
        "SELECT created_at, type, model_name, quota FROM logs WHERE token_id = ? ORDER BY id DESC",
        (token.id,),
    )


def shown(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["created_at"], row["type"], row["model_name"], row["quota"])


def history_quota(body: dict[str, Any]) -> int:
    return int(body["data"]["total"]["quota"])


def mark(token: Token, tokens: list[Token]) -> int:
    """Every quota a token's rows carry is this modulo 10: a row shown to another token stands out."""
    return tokens.index(token) + 1


def write(gateway: Gateway, tokens: list[Token], cut_off: int, halfway: threading.Event) -> None:
    """The gateway at work: charge, then log; errors and refunds now and then; the clean-up halfway."""
    for i in range(WRITES):
        token = tokens[i % len(tokens)]
        quota = 10 * (i + 1) + mark(token, tokens)
        kind = 5 if i % 13 == 0 else 6 if i % 29 == 0 else 2
        if kind == 2:
            gateway.charge(token, quota)
        elif kind == 6:
            gateway.charge(token, -quota)
        gateway.add_log(
            token, type=kind, quota=0 if kind == 5 else quota, model_name=("gpt-4o", "o3")[i % 2], prompt_tokens=i
        )
        if i == WRITES // 2:
            gateway.clean_logs(before=cut_off)
            halfway.set()


async def test_history_and_log_follow_a_writer(gateway: Gateway, app_client: AppClient, redis_url: str) -> None:
    now = int(time.time())
    users = [gateway.add_user(), gateway.add_user()]
    tokens = [gateway.add_token(user_id=users[i % 2], remain=10**9) for i in range(3)]
    # The past, written in time order as the gateway wrote it (ids ascending with created_at).
    for at, kind, quota in (
        (now - 40 * DAY, 2, 7000),  # gone with the clean-up
        (now - 10 * DAY, 2, 900),  # a closed day, cached
        (now - 10 * DAY + 60, 6, 50),
        (now - 3600, 2, 40),
    ):
        for token in tokens:
            gateway.add_log(token, created_at=at, type=kind, quota=quota + mark(token, tokens))
    cut_off = now - 35 * DAY
    # A range reaching back before the cut-off: its days were read (and cached) before the clean-up.
    since = (now - 45 * DAY) // DAY * DAY
    back = {"start_date": datetime.fromtimestamp(since, UTC).date().isoformat()}
    halfway = threading.Event()
    # A SQLite file is locked while the writer commits: a read that waits longer than
    # USAGE_DB_TIMEOUT is answered 503, in the route's shape, to be retried. Servers never lock readers out.
    may_lock = not hasattr(gateway, "conn")
    locked = answered = 0

    async with app_client(redis_url=redis_url) as (_, client):

        async def poll(token: Token) -> int:
            nonlocal locked, answered
            answers = await asyncio.gather(
                client.get(HISTORY, headers=token.bearer),
                client.get(LOG, headers=token.bearer),
                client.get(BALANCE, headers=token.bearer),
                client.get(HISTORY, params=back, headers=token.bearer),
            )
            answered += len(answers)
            for answer in answers:
                if may_lock and answer.status_code == 503:
                    assert answer.headers["retry-after"] and answer.json()["success"] is False
                    locked += 1
                    continue
                assert answer.status_code == 200, answer.text
            if answers[1].status_code == 200:
                for row in answers[1].json()["data"]:
                    assert row["type"] == 5 or row["quota"] % 10 == mark(token, tokens), row
            return 1

        for token in tokens:  # polled before the writer starts: the closed days are cached
            await poll(token)
        writer = asyncio.create_task(asyncio.to_thread(write, gateway, tokens, cut_off, halfway))
        polls = 0
        while not writer.done():
            polls += sum(await asyncio.gather(*(poll(token) for token in tokens)))
        await writer
        assert halfway.is_set() and polls > len(tokens)
        assert locked < answered / 2  # most answers came through

        for token in tokens:
            await eventually(history_is(client, token, spent(gateway, token, now - 30 * DAY)), within=FRESHNESS)
            # What the clean-up deleted is gone from the history too, cached or not.
            await eventually(history_is(client, token, spent(gateway, token, since), back), within=FRESHNESS)
            await eventually(log_is(client, token, newest(gateway, token)), within=FRESHNESS)
            (remain, used), *_ = select(
                gateway, "SELECT remain_quota, used_quota FROM tokens WHERE id = ?", (token.id,)
            )
            await eventually(balance_is(client, token, remain, used), within=FRESHNESS)
        # The clean-up took the old rows out of every token's log.
        assert not select(gateway, "SELECT id FROM logs WHERE created_at < ?", (cut_off,))


def history_is(client: httpx.AsyncClient, token: Token, quota: int, params: dict[str, str] | None = None) -> Any:
    async def check() -> bool:
        answer = await client.get(HISTORY, params=params, headers=token.bearer)
        return answer.status_code == 200 and history_quota(answer.json()) == quota

    return check


def log_is(client: httpx.AsyncClient, token: Token, rows: list[tuple[Any, ...]]) -> Any:
    async def check() -> bool:
        answer = await client.get(LOG, headers=token.bearer)
        if answer.status_code != 200:
            return False
        # The newest rows, at most 1,000 (this test writes fewer).
        return [shown(row) for row in answer.json()["data"]] == rows[:1000]

    return check


def balance_is(client: httpx.AsyncClient, token: Token, remain: int, used: int) -> Any:
    async def check() -> bool:
        answer = await client.get(BALANCE, headers=token.bearer)
        data = answer.json().get("data") or {}
        return answer.status_code == 200 and (data["total_available"], data["total_used"]) == (remain, used)

    return check
