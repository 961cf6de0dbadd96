"""GET /api/log/token: the gateway's contract, the owner's view of each row, paging, filters,
the legacy `?key=`, the short in-process layer, the query plans, and LOG_SQL_DSN, on each engine."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import AppClient, GatewayFactory
from support import Gateway, Token

from usage_service import budget as budget_module
from usage_service import tokenlog
from usage_service.app import create_app
from usage_service.config import Settings, load_settings
from usage_service.routing import ShortRoute
from usage_service.store import StoreUnavailable
from usage_service.store import logs as store_logs
from usage_service.store.logs import LogReader, open_log_reader
from usage_service.tokenlog import Answers, LogQuery, owner_other, select_sql

pytestmark = pytest.mark.asyncio

URL = "/api/log/token"
ENGINES = ["sqlite", "postgres", "mysql"]


@pytest.fixture(params=ENGINES)
def gateway(request: pytest.FixtureRequest, make_gateway: GatewayFactory) -> Gateway:
    return make_gateway(request.param)


@pytest.fixture(params=ENGINES)
def altered_gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Gateway]:
    """An empty gateway database whose tables the test may alter: a database of its own on a
    server (the others' tables are made once per session)."""
    from dbservers import MySQLGateway, PostgresGateway

    name = f"altered-{request.node.name.split('[')[0][-40:]}"
    gateway: Gateway
    if request.param == "sqlite":
        gateway = Gateway(tmp_path / "altered.db")
    elif request.param == "postgres":
        gateway = PostgresGateway(request.getfixturevalue("postgres_server"), name)
    else:
        gateway = MySQLGateway(request.getfixturevalue("mariadb_server"), name)
    yield gateway
    gateway.close()


sqlite_only = pytest.mark.parametrize("gateway", ["sqlite"], indirect=True)


def engine_of(gateway: Gateway) -> str:
    database = gateway.database
    return "sqlite" if database is None else "postgres" if hasattr(database, "url") else "mysql"


def row(position: int, token: Token, **values: Any) -> dict[str, Any]:
    """A row as the route shows it, with add_log's defaults."""
    shown = {
        "id": position,
        "user_id": token.user_id,
        "created_at": 0,
        "type": 2,
        "content": "",
        "username": "someone",
        "token_name": "my token",
        "model_name": "gpt-4o-mini",
        "quota": 100,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "use_time": 1,
        "is_stream": False,
        "channel": 0,
        "channel_name": "",
        "token_id": token.id,
        "group": "default",
        "ip": "",
        "other": "{}",
    }
    return {**shown, **values}


def page(items: list[dict[str, Any]], total: int, p: int, size: int) -> dict[str, Any]:
    return {"success": True, "message": "", "data": {"items": items, "total": total, "page": p, "page_size": size}}


# --- the contract --------------------------------------------------------------------------------


async def test_rows_as_the_gateway_shows_them_to_the_owner(gateway: Gateway, app_client: AppClient) -> None:
    """Newest first, id replaced by the position, no channel, `other` without the admins' members;
    rows of the user's other token, of other users and of no token never appear."""
    token = gateway.add_token()
    sibling = gateway.add_token(user_id=token.user_id)
    stranger = gateway.add_token()
    gateway.add_log(
        token,
        created_at=1_700_000_000,
        content="first",
        model_name="gpt-4o",
        quota=1234,
        prompt_tokens=100,
        completion_tokens=20,
        use_time=3,
        is_stream=1,
        channel_id=7,
        ip="203.0.113.9",
        group="vip",
        other='{"model_ratio":2.5,"admin_info":{"use_channel":["7"]},"audit_info":{"x":1},"cache_tokens":0}',
    )
    gateway.add_log(sibling, created_at=1_700_000_001, content="sibling's")
    gateway.add_log(stranger, created_at=1_700_000_002, content="stranger's")
    gateway.add_log(None, created_at=1_700_000_003, type=3, content="made by no token", user_id=token.user_id)
    gateway.add_log(token, created_at=1_700_000_004, type=5, quota=0, content="an error", other="")
    async with app_client() as (_, client):
        response = await client.get(URL, headers=token.bearer)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "private, no-cache"
    assert response.json() == {
        "success": True,
        "message": "",
        "data": [
            row(1, token, created_at=1_700_000_004, type=5, quota=0, content="an error", other="null"),
            row(
                2,
                token,
                created_at=1_700_000_000,
                content="first",
                model_name="gpt-4o",
                quota=1234,
                prompt_tokens=100,
                completion_tokens=20,
                use_time=3,
                is_stream=True,
                ip="203.0.113.9",
                group="vip",
                other='{"cache_tokens":0,"model_ratio":2.5}',
            ),
        ],
    }
    assert list(response.json()["data"][0]) == list(row(1, token))  # the gateway's member order


@asynccontextmanager
async def served(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    """The app on `gateway`'s database (without Redis), talked to in process."""
    app = create_app(Settings(sqlite_path=gateway.path, database=gateway.database, db_timeout=0.3))  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
            yield client


def drop_log_columns(gateway: Gateway, *columns: str) -> None:
    """As a gateway older than these columns has its log (SQLite drops a column's index first)."""
    for column in columns:
        if engine_of(gateway) == "sqlite":
            gateway._execute(f"DROP INDEX IF EXISTS idx_logs_{column}", ())
        gateway._execute(f"ALTER TABLE logs DROP COLUMN `{column}`", ())


async def test_columns_the_log_lacks_read_as_the_gateways_zero_values(
    altered_gateway: Gateway,
) -> None:
    """A log without some of the columns the route shows (a gateway older than them): those read
    as empty, as the gateway shows a zero value. (SQLite read a quoted name the table lacks as
    that name, as text: "ip":"ip".)"""
    gateway = altered_gateway
    token = gateway.add_token()
    gateway.add_log(token, created_at=1_700_000_000, content="x", use_time=3, group="vip", ip="203.0.113.9", other="{}")
    drop_log_columns(gateway, "content", "use_time", "group", "ip", "other")
    async with served(gateway) as client:
        response = await client.get(URL, headers=token.bearer)
    assert response.status_code == 200, response.text
    expected = row(1, token, created_at=1_700_000_000, content="", use_time=0, group="", ip="", other="null")
    assert response.json()["data"] == [expected]


async def test_a_log_without_a_column_everything_reads_is_a_503_said_at_start(
    altered_gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = altered_gateway
    token = gateway.add_token()
    gateway.add_log(token, created_at=1_700_000_000)
    drop_log_columns(gateway, "token_id")  # one-api's log had no token_id
    async with served(gateway) as client:
        log = await client.get(URL, headers=token.bearer)
        history = await client.get("/api/usage/token/history", headers=token.bearer)
        balance = await client.get("/api/usage/token", headers=token.bearer)
    assert log.status_code == 503 and history.status_code == 503
    assert balance.status_code == 200  # the balance does not need the log
    said = [r.getMessage() for r in caplog.records if "logs table lacks columns token_id" in r.getMessage()]
    assert len(said) == 1 and "answer 503" in said[0], said


@pytest.mark.parametrize(
    ("stored", "shown"),
    [
        pytest.param("{}", "{}", id="empty-object"),
        pytest.param('{"b":1,"a":{"d":1,"c":2}}', '{"a":{"c":2,"d":1},"b":1}', id="keys-sorted-like-go"),
        pytest.param('{"admin_info":{"use_channel":["3"]},"x":1}', '{"x":1}', id="admin-info-removed"),
        pytest.param('{"audit_info":"who","x":"<b>"}', '{"x":"<b>"}', id="audit-info-removed"),
        pytest.param(
            # What newer gateways keep under admin_info, older ones kept at the top level.
            '{"channel_id":3,"channel_name":"azure-east","channel_type":14,"reject_reason":"r","x":1}',
            '{"x":1}',
            id="legacy-channel-members-removed",
        ),
        pytest.param('{"root_info":{"a":1},"stream_status":{"b":2},"x":1}', '{"x":1}', id="root-and-stream-removed"),
        pytest.param('{"a":{"admin_info":1}}', '{"a":{"admin_info":1}}', id="only-top-level-members"),
        pytest.param("", "null", id="empty-text"),
        pytest.param("null", "null", id="json-null"),
        pytest.param("[1,2]", "null", id="array"),
        pytest.param('"text"', "null", id="string"),
        pytest.param("{not json", "null", id="junk"),
        pytest.param('{"a":1e400}', "null", id="beyond-float64"),
        pytest.param('{"r":2.5,"n":"\\ud800x\\uDC00"}', '{"n":"\ufffdx\ufffd","r":2.5}', id="unpaired-surrogates"),
        pytest.param('{"n":"\\ud83d\\ude00"}', '{"n":"\U0001f600"}', id="surrogate-pair"),
        pytest.param(
            '{"n":"\\\\ud800\\ud83d\\ude00\\ud800"}',
            '{"n":"\\\\ud800\U0001f600\ufffd"}',
            id="escaped-backslash-pair-unpaired",
        ),
        pytest.param('{"n":"\\ud800", "x": 1e400}', "null", id="unpaired-and-junk"),
    ],
)
async def test_other_is_reserialised_as_the_gateway_does(stored: str, shown: str) -> None:
    """The gateway decodes `other` into a Go map and encodes it again: what is no JSON object is `null`."""
    assert owner_other(stored) == shown


@sqlite_only
async def test_text_that_is_not_utf8_shows_replacement_characters(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    log_id = gateway.add_log(token, content="x")
    gateway.db.execute("UPDATE logs SET content = CAST(? AS TEXT), other = ? WHERE id = ?", (b"ok\xff", "{}", log_id))
    async with app_client() as (_, client):
        response = await client.get(URL, headers=token.bearer)
    assert response.status_code == 200
    assert response.json()["data"][0]["content"] == "ok\ufffd"


@sqlite_only
async def test_a_read_sent_again_for_text_that_is_not_utf8_is_the_logs_statement(
    gateway: Gateway, app_client: AppClient
) -> None:
    """SQLite reads a statement again when some text is not UTF-8: a log read's second statement
    is the log's (usage_log_db_statements), not a token statement (usage_db_statements)."""
    clean, damaged = gateway.add_token(), gateway.add_token()
    gateway.add_log(clean, model_name="gpt-4o")
    bad = gateway.add_log(damaged, model_name="x")
    gateway.db.execute("UPDATE logs SET model_name = CAST(? AS TEXT) WHERE id = ?", (b"gpt\xff", bad))
    async with app_client(refresh_interval=0) as (app, client):
        for token in (clean, damaged):  # their token statements, before counting
            assert (await client.get("/api/usage/token", headers=token.bearer)).status_code == 200

        async def cost(token: Token) -> tuple[int, int]:
            before = app.state.store.statements, app.state.logs.statements
            assert (await client.get(URL, headers=token.bearer)).status_code == 200
            return app.state.store.statements - before[0], app.state.logs.statements - before[1]

        assert await cost(clean) == (0, 1)
        assert await cost(damaged) == (0, 2)  # the read, and the read again: both the log's
        shown = (await client.get(URL, headers=damaged.bearer)).json()["data"][0]["model_name"]
    assert shown == "gpt\ufffd"


async def test_the_plain_list_is_the_newest_thousand(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    _add_many(gateway, token, 1005)
    async with app_client() as (_, client):
        data = (await client.get(URL, headers=token.bearer)).json()["data"]
    assert len(data) == 1000
    assert [r["id"] for r in data] == list(range(1, 1001))
    assert [r["created_at"] for r in data] == list(range(1005, 5, -1))


async def test_positions_count_across_pages(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    for i in range(1, 26):
        gateway.add_log(token, created_at=i)
    async with app_client() as (_, client):
        everything = (await client.get(URL, headers=token.bearer)).json()["data"]
        pages = [(await client.get(f"{URL}?p={p}&page_size=10", headers=token.bearer)).json() for p in (1, 2, 3, 4)]
    assert pages[0] == page(everything[:10], 25, 1, 10)
    assert pages[1] == page(everything[10:20], 25, 2, 10)
    assert pages[2] == page(everything[20:], 25, 3, 10)
    assert [r["id"] for r in pages[2]["data"]["items"]] == [21, 22, 23, 24, 25]
    assert pages[3] == page([], 25, 4, 10)


@sqlite_only
@pytest.mark.parametrize(
    ("query", "p", "size"),
    [
        pytest.param("p=2", 2, 10, id="page-size-defaults-to-10"),
        pytest.param("page_size=3", 1, 3, id="page-defaults-to-1"),
        pytest.param("p=0&page_size=3", 1, 3, id="page-0-is-page-1"),
        pytest.param("p=&page_size=", 1, 10, id="empty-values-are-defaults"),
        pytest.param("page_size=0", 1, 10, id="page-size-0-is-10"),
        pytest.param("page_size=500", 1, 100, id="page-size-capped-at-100"),
    ],
)
async def test_paging_parameters_as_the_gateway_reads_them(
    gateway: Gateway, app_client: AppClient, query: str, p: int, size: int
) -> None:
    token = gateway.add_token()
    for i in range(1, 131):
        gateway.add_log(token, created_at=i)
    async with app_client() as (_, client):
        data = (await client.get(f"{URL}?{query}", headers=token.bearer)).json()["data"]
    assert (data["page"], data["page_size"], data["total"]) == (p, size, 130)
    start = (p - 1) * size
    assert [r["id"] for r in data["items"]] == list(range(start + 1, start + size + 1))
    assert [r["created_at"] for r in data["items"]] == list(range(130 - start, 130 - start - size, -1))


@sqlite_only
async def test_paging_counts_and_reaches_the_newest_rows_only(
    gateway: Gateway, app_client: AppClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The count and OFFSET never walk past TOTAL_CAP rows (10,000; 5 here)."""
    monkeypatch.setattr(tokenlog, "TOTAL_CAP", 5)
    token = gateway.add_token()
    for i in range(1, 9):
        gateway.add_log(token, created_at=i)
    async with app_client() as (_, client):
        second = (await client.get(f"{URL}?p=2&page_size=3", headers=token.bearer)).json()["data"]
        third = (await client.get(f"{URL}?p=3&page_size=3", headers=token.bearer)).json()["data"]
        older = (await client.get(f"{URL}?p=1&page_size=3&end_timestamp=3", headers=token.bearer)).json()["data"]
    assert second["total"] == 5
    assert [(r["id"], r["created_at"]) for r in second["items"]] == [(4, 5), (5, 4)]
    assert third == {"items": [], "total": 5, "page": 3, "page_size": 3}
    assert [r["created_at"] for r in older["items"]] == [3, 2, 1]  # older rows: by time


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        pytest.param("start_timestamp=20", ["e", "d", "c", "b"], id="start"),
        pytest.param("end_timestamp=20", ["b", "a"], id="end"),
        pytest.param("start_timestamp=15&end_timestamp=35", ["d", "c", "b"], id="range"),
        pytest.param("type=5", ["d"], id="type"),
        pytest.param("type=0", ["e", "d", "c", "b", "a"], id="type-0-is-all"),
        pytest.param("model_name=gpt-4o", ["c", "a"], id="model-exact"),
        pytest.param("model_name=gpt-4", [], id="model-no-prefix-match"),
        pytest.param("model_name=gpt-4%25", [], id="model-percent-is-literal"),
        pytest.param("model_name=gpt_4o", [], id="model-underscore-is-literal"),
        pytest.param("model_name=claude%2B3", ["e"], id="model-encoded"),
        pytest.param("model_name=gpt-4o&type=2&start_timestamp=25", ["c"], id="combined"),
    ],
)
async def test_filters(gateway: Gateway, app_client: AppClient, query: str, expected: list[str]) -> None:
    token = gateway.add_token()
    rows = [("a", 10, 2, "gpt-4o"), ("b", 20, 2, "gpt-4o-mini"), ("c", 30, 2, "gpt-4o"), ("d", 30, 5, "x")]
    for content, created_at, type_, model in [*rows, ("e", 40, 2, "claude+3")]:
        gateway.add_log(token, content=content, created_at=created_at, type=type_, model_name=model)
    gateway.add_log(gateway.add_token(), content="other token", created_at=30, model_name="gpt-4o")
    async with app_client() as (_, client):
        plain = await client.get(f"{URL}?{query}", headers=token.bearer)
        paged = await client.get(f"{URL}?{query}&p=1&page_size=100", headers=token.bearer)
    assert [r["content"] for r in plain.json()["data"]] == expected
    assert [r["content"] for r in paged.json()["data"]["items"]] == expected
    assert paged.json()["data"]["total"] == len(expected)


@sqlite_only
@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        pytest.param("p=two", "p", id="page-not-a-number"),
        pytest.param("p=-1", "p", id="page-negative"),
        pytest.param("p=1.5", "p", id="page-fraction"),
        pytest.param("page_size=-10", "page_size", id="size-negative"),
        pytest.param("page_size=1e2", "page_size", id="size-exponent"),
        pytest.param("start_timestamp=yesterday", "start_timestamp", id="start-not-a-number"),
        pytest.param("end_timestamp=-5", "end_timestamp", id="end-negative"),
        pytest.param("type=-2", "type", id="type-negative"),
        pytest.param("type=1_0", "type", id="type-underscore"),
        pytest.param("p=99999999999999999999", "p", id="page-beyond-int64"),
        pytest.param("model_name=" + "m" * 256, "model_name", id="model-too-long"),
        # No stored name holds one (PostgreSQL's text cannot): it was a 503 there, as if the database were down.
        pytest.param("model_name=gpt%00x", "model_name", id="model-with-a-nul"),
    ],
)
async def test_bad_parameters_are_a_clear_400(
    gateway: Gateway, app_client: AppClient, query: str, parameter: str
) -> None:
    token = gateway.add_token()
    async with app_client() as (app, client):
        response = await client.get(f"{URL}?{query}", headers=token.bearer)
        statements = app.state.logs.statements
    assert response.status_code == 400
    body = response.json()
    assert body["success"] is False and body["message"].startswith(f"{parameter}: ")
    assert query.split("=", 1)[1] not in body["message"]  # the value is never echoed
    assert statements == 0


@sqlite_only
async def test_a_query_string_holds_at_most_64_parameters_on_every_route_that_reads_one(
    gateway: Gateway, app_client: AppClient
) -> None:
    """Parsing every parameter of a 32 KiB query string (15,000 of them) cost 21 ms of CPU a
    request, the legacy `?key=` lookup included: before authentication, even from a blocked
    address. The routes read at most seven."""
    token = gateway.add_token()
    gateway.add_log(token)
    routes = [
        (URL, "p=1", {"success": False, "message": "too many query parameters (at most 64)"}),
        ("/api/usage/token/history", "tz=UTC", {"success": False, "message": "too many query parameters (at most 64)"}),
        (
            "/v1/dashboard/billing/usage",
            "start_date=2026-01-01&end_date=2026-01-02",
            {
                "error": {
                    "message": "too many query parameters (at most 64)",
                    "type": "invalid_request_error",
                    "code": "invalid_request",
                }
            },
        ),
    ]
    async with app_client() as (app, client):
        for path, parameters, error in routes:
            most = "a&" * (64 - parameters.count("&") - 1)  # with the route's own: 64 in all
            refused = await client.get(f"{path}?a&{most}{parameters}", headers=token.bearer)
            assert (refused.status_code, refused.json()) == (400, error)
            assert (await client.get(f"{path}?{most}{parameters}", headers=token.bearer)).status_code == 200
        # The key in the query, without an Authorization header: looked for among 64 at most.
        most = "a&" * 63
        assert (await client.get(f"{URL}?{most}key=sk-{token.key}")).status_code == 200
        refused = await client.get(f"{URL}?a&{most}key=sk-{token.key}")
        assert (refused.status_code, refused.json()["message"]) == (401, "No Authorization header")
        assert app.state.lookup.stats.db_reads == 1  # the 64 the route's read, once


# --- authentication ------------------------------------------------------------------------------


@sqlite_only
@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"status": 2}, id="disabled-token"),
        pytest.param({"status": 3}, id="expired-token-readable"),
        pytest.param({"status": 4}, id="exhausted-token-readable"),
        pytest.param({"deleted": True}, id="deleted-token"),
        pytest.param({"user": {"status": 2}}, id="banned-user"),
    ],
)
async def test_tokens_are_admitted_exactly_as_on_the_usage_route(
    gateway: Gateway, app_client: AppClient, change: dict[str, Any]
) -> None:
    user = gateway.add_user(**change.pop("user", {}))
    token = gateway.add_token(user_id=user, **change)
    gateway.add_log(token)
    async with app_client() as (_, client):
        usage = await client.get("/api/usage/token", headers=token.bearer)
        log = await client.get(URL, headers=token.bearer)
    assert log.status_code == usage.status_code
    if usage.status_code == 200:
        assert len(log.json()["data"]) == 1
    else:
        assert log.json() == usage.json()
        assert log.headers.get("www-authenticate") == usage.headers.get("www-authenticate")


@sqlite_only
@pytest.mark.parametrize(
    ("query", "headers", "status", "message"),
    [
        pytest.param("key=sk-{key}", {}, 200, None, id="sk-key"),
        pytest.param("key={key}", {}, 200, None, id="bare-key"),
        pytest.param("key=sk-{key}-3", {}, 200, None, id="with-channel-suffix"),
        pytest.param("p=1&key=sk-{key}&page_size=5", {}, 200, None, id="among-other-parameters"),
        pytest.param("key=sk-{key}", {"Authorization": "Bearer sk-{other}"}, 200, "other", id="header-wins"),
        pytest.param("key=sk-{other}", {"Authorization": "Bearer sk-{key}"}, 200, None, id="header-wins-again"),
        pytest.param("key=sk-{key}", {"Authorization": "Basic abc"}, 401, "Invalid Bearer token", id="bad-header"),
        # The gateway's middleware for this route takes a value without the scheme as the key.
        pytest.param("", {"Authorization": "sk-{key}"}, 200, None, id="header-without-scheme"),
        pytest.param("key=sk-{key}", {"Authorization": "sk-{other}"}, 200, "other", id="schemeless-header-wins"),
        pytest.param("key=", {}, 401, "No Authorization header", id="empty-key"),
        pytest.param("", {}, 401, "No Authorization header", id="no-credential"),
        pytest.param("key=sk-{key}!", {}, 401, "Invalid Bearer token", id="malformed-key"),
        pytest.param("key=sk-unknownkey12345", {}, 401, "token not found", id="unknown-key"),
    ],
)
async def test_the_legacy_key_parameter(
    gateway: Gateway,
    app_client: AppClient,
    query: str,
    headers: dict[str, str],
    status: int,
    message: str | None,
) -> None:
    token, other = gateway.add_token(), gateway.add_token()
    gateway.add_log(token, content="mine")
    gateway.add_log(other, content="other")
    fill = {"key": token.key, "other": other.key}
    async with app_client() as (_, client):
        response = await client.get(
            f"{URL}?{query.format(**fill)}", headers={k: v.format(**fill) for k, v in headers.items()}
        )
    assert response.status_code == status
    body = response.json()
    if status == 200:
        rows = body["data"]["items"] if "p=" in query else body["data"]
        assert [r["content"] for r in rows] == [message or "mine"]
    else:
        assert body == {"success": False, "message": message}


@sqlite_only
async def test_the_key_parameter_is_for_the_log_route_only(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client() as (_, client):
        response = await client.get(f"/api/usage/token?key=sk-{token.key}")
    assert response.status_code == 401
    assert response.json()["message"] == "No Authorization header"


@sqlite_only
async def test_a_key_in_the_query_reaches_no_log_metric_or_body(
    gateway: Gateway, app_client: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    token = gateway.add_token()
    gateway.add_log(token)
    unknown = "sk-" + "Q" * 48
    queries = [
        f"key=sk-{token.key}",
        f"key={token.key}&p=x",
        f"key={unknown}",
        f"key={unknown}!",
        f"key=sk-{token.key}&page_size=-1",
        f"key=sk-{token.key}&type=1_0",
    ]
    caplog.set_level(logging.DEBUG, logger="usage_service")
    async with app_client(access_log=True, metrics=True) as (app, client):
        bodies = [(await client.get(f"{URL}?{query}")).text for query in queries]
        bodies.append((await client.get(f"{URL}/nothing?key=sk-{token.key}")).text)
        with gateway.exclusive_lock():  # the database down: the 503 path too
            bodies.append((await client.get(f"{URL}?key=sk-{token.key}&p=9")).text)
        metrics = (await client.get("/metrics")).text
        log_statements = app.state.logs.statements
    # The service's own lines (the test client's and the drivers' debug lines are not the service's).
    logged = "\n".join(
        f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records if r.name.startswith("usage_service")
    )
    assert f'"GET {URL}" 200' in logged and f'"GET {URL}" 503' in logged  # the access log logged them
    for secret in (token.key, unknown.removeprefix("sk-")):
        assert secret not in logged
        assert secret not in metrics
        assert all(secret not in body for body in bodies)
    assert 'route="/api/log/token"' in metrics
    # Counted apart from the token statements. (The counter is the process's: other apps in this
    # test process count into it too, and the history's rounds may have read since the scrape.)
    scraped = re.search(r"^usage_log_db_statements_total (\S+)$", metrics, re.MULTILINE)
    assert scraped is not None and float(scraped.group(1)) >= 1 and log_statements >= 1


# --- the database ----------------------------------------------------------------------------------


@sqlite_only
async def test_database_down_is_503_in_the_routes_shape(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    gateway.add_log(token)
    async with app_client(cache_ttl=60.0, local_ttl=60.0, refresh_interval=0) as (_, client):
        assert (await client.get("/api/usage/token", headers=token.bearer)).status_code == 200  # record cached
        with gateway.exclusive_lock():
            response = await client.get(URL, headers=token.bearer)
        after = await client.get(URL, headers=token.bearer)
    assert response.status_code == 503
    assert response.json() == {"success": False, "message": "database unavailable, retry later"}
    assert response.headers["retry-after"] == "1"
    assert after.status_code == 200  # a failed read is not kept


async def test_log_sessions_refuse_writes(gateway: Gateway, settings: Settings) -> None:
    """Even with the gateway's own credentials as LOG_SQL_DSN, the log's sessions cannot write."""
    token = gateway.add_token()
    gateway.add_log(token, quota=7)
    target = getattr(gateway, "owner_database", None) or gateway.path
    own = dataclasses.replace(settings, database=None, sqlite_path=Path("/nonexistent"), log_database=target)
    reader = await open_log_reader(own, _NoStore())  # type: ignore[arg-type]
    try:
        assert reader.separate
        with pytest.raises(StoreUnavailable, match=r"(?i)read.only|readonly"):
            await reader.query(f"UPDATE {reader.q('logs')} SET {reader.q('quota')} = 0")
        assert [tuple(r) for r in await reader.query(f"SELECT {reader.q('quota')} FROM {reader.q('logs')}")] == [(7,)]
    finally:
        await reader.close()


class _NoStore:
    def log_reader(self) -> LogReader:
        raise AssertionError("LOG_SQL_DSN names another database: the main store's connections are not used")


# --- query plans ------------------------------------------------------------------------------------

PLAN_QUERIES = [
    pytest.param(LogQuery(), id="first-page"),
    pytest.param(LogQuery(page=3, page_size=20), id="third-page"),
    pytest.param(LogQuery(start=1_000, end=2_000_000), id="time-range"),
    pytest.param(LogQuery(type=2, model_name="gpt-4o"), id="type-and-model"),
]


@pytest.mark.parametrize("gateway", ["sqlite", "mysql"], indirect=True)
@pytest.mark.parametrize("query", PLAN_QUERIES)
async def test_each_read_is_a_range_of_the_tokens_index(gateway: Gateway, query: LogQuery) -> None:
    """The rows walk idx_logs_token_id backwards, in id order, and the count stops at the cap: no
    scan of the log, no sort. (SQLite and InnoDB indexes carry the row id; PostgreSQL's do not:
    see the next test.)"""
    engine = engine_of(gateway)
    token = gateway.add_token()
    _fill_log(gateway, token)
    for plan in _plans(gateway, engine, token, query):
        assert "idx_logs_token_id" in plan, plan
        if engine == "sqlite":
            assert not any(line.startswith("SCAN logs") for line in plan.splitlines()), plan
            assert "TEMP B-TREE" not in plan, plan
        else:
            # (The count's derived table is read whole: it holds at most the cap's rows.)
            log_lines = [line for line in plan.splitlines() if " table=logs " in line]
            assert log_lines and not any("type=ALL" in line for line in log_lines), plan
            assert "filesort" not in plan, plan


@pytest.mark.parametrize("gateway", ["postgres"], indirect=True)
@pytest.mark.parametrize("query", PLAN_QUERIES)
async def test_postgres_plans(gateway: Gateway, query: LogQuery) -> None:
    """PostgreSQL's idx_logs_token_id does not keep a token's rows in id order (its entries are
    in heap order): by its statistics the planner reads the token's rows through it and keeps the
    newest (a top-N sort over the token's rows), or walks the primary key backwards keeping the
    token's rows. Never a sequential scan; but the backward walk is long for a token whose rows
    are all old, which an index on logs (token_id, id) avoids (see the report of issue 13)."""
    token = gateway.add_token()
    _fill_log(gateway, token)
    for plan in _plans(gateway, "postgres", token, query):
        assert "Seq Scan" not in plan, plan
        assert "idx_logs_token_id" in plan or "Index Scan Backward using logs_pkey" in plan, plan


def _plans(gateway: Gateway, engine: str, token: Token, query: LogQuery) -> list[str]:
    """The plans of the page's SELECT and of the count, for this token and query."""
    reader = LogReader(_never, engine)  # type: ignore[arg-type]
    select, params, count = select_sql(reader, frozenset(tokenlog.COLUMNS), token.id, query)
    statements = ((select, [*params, query.limit, query.offset]), (count, [*params, 10_000]))
    return [_explain(gateway, engine, _inline(sql, values)) for sql, values in statements]


async def _never(sql: str, params: Any) -> Any:
    raise AssertionError("not run")


def _inline(sql: str, values: list[Any]) -> str:
    """The statement with its parameters written in, for EXPLAIN."""
    parts = sql.split("?")
    assert len(parts) == len(values) + 1
    literal = [str(v) if isinstance(v, int) else "'" + str(v).replace("'", "''") + "'" for v in values]
    return "".join(part + (literal[i] if i < len(literal) else "") for i, part in enumerate(parts))


def _explain(gateway: Gateway, engine: str, sql: str) -> str:
    if engine == "sqlite":
        return "\n".join(str(r[-1]) for r in gateway.db.execute("EXPLAIN QUERY PLAN " + sql).fetchall())
    if engine == "postgres":
        rows = gateway.conn.execute("EXPLAIN " + sql.replace("`", '"')).fetchall()  # type: ignore[attr-defined]
        return "\n".join(r[0] for r in rows)
    with gateway.conn.cursor() as cursor:  # type: ignore[attr-defined]
        cursor.execute("EXPLAIN " + sql)
        names = [d[0] for d in cursor.description]
        return "\n".join(" ".join(f"{n}={v}" for n, v in zip(names, r, strict=True)) for r in cursor.fetchall())


def _fill_log(gateway: Gateway, token: Token) -> None:
    """Enough rows, over enough tokens, that a server's planner prefers an index to a scan."""
    others = [gateway.add_token(user_id=token.user_id).id for _ in range(3)]
    rows = [
        (token.id if i % 50 == 0 else others[i % 3], 1_000 + i, 2, "gpt-4o" if i % 2 else "x") for i in range(20_000)
    ]
    _insert(gateway, rows)
    engine = engine_of(gateway)
    if engine == "postgres":
        gateway.conn.execute("ANALYZE logs")  # type: ignore[attr-defined]
    elif engine == "mysql":
        gateway._execute("ANALYZE TABLE logs", ())


def _add_many(gateway: Gateway, token: Token, count: int) -> None:
    _insert(gateway, [(token.id, i, 2, "gpt-4o-mini") for i in range(1, count + 1)])


def _insert(gateway: Gateway, rows: list[tuple[int, int, int, str]]) -> None:
    """Append (token_id, created_at, type, model_name) rows in one transaction."""
    sql = "INSERT INTO logs (token_id, created_at, type, model_name, user_id, quota) VALUES (?, ?, ?, ?, 1, 1)"
    engine = engine_of(gateway)
    if engine == "sqlite":
        with gateway.db:
            gateway.db.execute("BEGIN")
            gateway.db.executemany(sql, rows)
        return
    with gateway.conn.cursor() as cursor:  # type: ignore[attr-defined]
        cursor.executemany(sql.replace("?", "%s"), rows)


# --- LOG_SQL_DSN ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("", None, id="empty-main-database"),
        pytest.param("local", Path("one-api.db"), id="local-is-sqlite-path"),
        pytest.param("postgres://u:pw@db:5432/logs", "postgres", id="postgres"),
        pytest.param("u:pw@tcp(db:3306)/logs?charset=utf8mb4", "mysql", id="mysql"),
    ],
)
async def test_log_sql_dsn_in_the_gateways_forms(value: str, expected: object) -> None:
    settings = load_settings({"LOG_SQL_DSN": value})
    if isinstance(expected, str):
        assert type(settings.log_database).__name__.lower().startswith(expected)
        assert "pw" not in repr(settings)
    else:
        assert settings.log_database == expected


async def test_a_malformed_log_sql_dsn_names_the_variable_not_the_password() -> None:
    with pytest.raises(Exception, match=r"^LOG_SQL_DSN: ") as info:
        load_settings({"LOG_SQL_DSN": "root:s3cret@tcp(db:3306"})
    assert "s3cret" not in str(info.value)


async def test_the_log_in_a_database_of_its_own(
    gateway: Gateway, make_log_gateway: GatewayFactory, app_client: AppClient
) -> None:
    """With LOG_SQL_DSN the rows come from that database; the token still from the main one."""
    log = make_log_gateway(engine_of(gateway))
    token = gateway.add_token()
    gateway.add_log(token, content="in the main database")
    log.add_log(token, content="in the log database", created_at=5)
    log.add_log(token, content="newer", created_at=6)
    log.add_log(Token(token.id + 1, "x", token.user_id), content="another token's")
    async with app_client(log_database=log.log_database) as (app, client):
        response = await client.get(URL, headers=token.bearer)
        paged = await client.get(f"{URL}?p=1&page_size=1", headers=token.bearer)
        token_statements = app.state.store.statements
        log_statements = app.state.logs.statements
        ready = await client.get("/readyz")
        assert app.state.logs.separate and app.state.logs.engine == engine_of(gateway)
    assert [r["content"] for r in response.json()["data"]] == ["newer", "in the log database"]
    assert paged.json()["data"]["total"] == 2
    assert ready.json() == {"ready": True, "database": "ok", "redis": "disabled", "log_database": "ok"}
    assert (token_statements, log_statements) == (1, 3)  # counted apart: the token once, the log thrice


@pytest.mark.parametrize("gateway", ["postgres", "mysql"], indirect=True)
async def test_local_log_with_a_database_server(
    gateway: Gateway, make_log_gateway: GatewayFactory, app_client: AppClient
) -> None:
    """LOG_SQL_DSN=local beside a server SQL_DSN: the log is the SQLite file at SQLITE_PATH."""
    log = make_log_gateway("sqlite")
    token = gateway.add_token()
    log.add_log(token, content="from the file")
    settings = load_settings({"LOG_SQL_DSN": "local", "SQLITE_PATH": str(log.path)})
    async with app_client(log_database=settings.log_database, sqlite_path=log.path) as (app, client):
        response = await client.get(URL, headers=token.bearer)
        assert app.state.logs.engine == "sqlite"
    assert [r["content"] for r in response.json()["data"]] == ["from the file"]


@pytest.mark.parametrize(
    ("make_target", "words"),
    [
        pytest.param(lambda tmp: tmp / "missing.db", "cannot read it", id="sqlite-missing-file"),
        pytest.param(lambda tmp: _no_logs_file(tmp), "has no logs table", id="sqlite-no-logs-table"),
        pytest.param(lambda tmp: _unreachable_postgres(), "cannot read it", id="postgres-unreachable"),
    ],
)
@sqlite_only
async def test_an_unreadable_log_database_leaves_the_balance_up(
    gateway: Gateway,
    app_client: AppClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    make_target: Any,
    words: str,
) -> None:
    target = make_target(tmp_path)
    token = gateway.add_token()
    caplog.set_level(logging.INFO, logger="usage_service")
    async with app_client(log_database=target) as (_, client):
        usage = await client.get("/api/usage/token", headers=token.bearer)
        log = await client.get(URL, headers=token.bearer)
        again = await client.get(URL, headers=token.bearer)
        ready = await client.get("/readyz")
    assert usage.status_code == 200
    assert log.status_code == again.status_code == 503
    assert log.json() == {"success": False, "message": "database unavailable, retry later"}
    body = ready.json()
    assert ready.status_code == 200 and body["ready"] is True and body["log_database"] == "unavailable"
    assert body["log_reason"].startswith("LOG_SQL_DSN: ") and words in body["log_reason"]
    errors = [r.getMessage() for r in caplog.records if r.name == "usage_service.store.logs" and r.levelno >= 40]
    assert len(errors) == 1 and errors[0].startswith("LOG_SQL_DSN: ") and words in errors[0]
    assert "pw" not in errors[0]  # no password
    if isinstance(target, Path):
        assert not target.exists() or target.stat().st_size > 0  # nothing created
        assert not Path(f"{target}-wal").exists() and not Path(f"{target}-journal").exists()


@sqlite_only
async def test_a_log_database_that_comes_up_later_is_read(
    gateway: Gateway, app_client: AppClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_logs, "REOPEN_INTERVAL", 0.0)
    target = _no_logs_file(tmp_path)
    token = gateway.add_token()
    async with app_client(log_database=target) as (_, client):
        assert (await client.get(URL, headers=token.bearer)).status_code == 503
        late = Gateway(target)  # the gateway creates its log tables
        late.add_log(token, content="late")
        late.close()
        response = await client.get(URL, headers=token.bearer)
        ready = await client.get("/readyz")
    assert [r["content"] for r in response.json()["data"]] == ["late"]
    assert ready.json()["log_database"] == "ok" and "log_reason" not in ready.json()


def _no_logs_file(tmp: Path) -> Path:
    path = tmp / "not-a-log.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE something (x)")
    db.close()
    return path


def _unreachable_postgres() -> object:
    from support import free_port

    from usage_service._dsn import parse_sql_dsn

    return parse_sql_dsn(f"postgres://u:pw@127.0.0.1:{free_port()}/logs")


# --- the short in-process layer ------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_answers_are_kept_for_the_ttl_and_misses_share_one_read() -> None:
    clock = Clock()
    answers = Answers(1.0, clock=clock)
    gate = asyncio.Event()
    reads: list[int] = []

    async def read() -> bytes:
        reads.append(1)
        await gate.wait()
        return b"answer %d" % len(reads)

    key = (1, LogQuery())
    waiting = [asyncio.create_task(answers.get(key, read)) for _ in range(5)]
    await asyncio.sleep(0)  # every request is now waiting on the one read
    assert answers.reads == 1 and answers.coalesced == 4
    gate.set()
    assert await asyncio.gather(*waiting) == [b"answer 1"] * 5
    assert len(reads) == 1
    clock.now += 0.999  # within a second of the read's start: served again
    assert await answers.get(key, read) == b"answer 1"
    assert await answers.get((1, LogQuery(page=1)), read) == b"answer 2"  # other parameters: their own
    assert await answers.get((2, LogQuery()), read) == b"answer 3"  # another token: its own
    clock.now += 0.001
    assert await answers.get(key, read) == b"answer 4"  # a second after the read began: read again


async def test_a_failed_read_is_not_kept_and_fails_every_waiter() -> None:
    answers = Answers(1.0, clock=Clock())
    gate = asyncio.Event()

    async def failing() -> bytes:
        await gate.wait()
        raise StoreUnavailable("down")

    key = (1, LogQuery())
    waiting = [asyncio.create_task(answers.get(key, failing)) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results)

    async def working() -> bytes:
        return b"ok"

    assert await answers.get(key, working) == b"ok"


async def test_a_waiter_that_goes_away_does_not_cancel_the_read() -> None:
    answers = Answers(1.0, clock=Clock())
    gate = asyncio.Event()

    async def read() -> bytes:
        await gate.wait()
        return b"ok"

    key = (1, LogQuery())
    first = asyncio.create_task(answers.get(key, read))
    second = asyncio.create_task(answers.get(key, read))
    await asyncio.sleep(0)
    first.cancel()  # its client disconnected
    gate.set()
    assert await second == b"ok"
    assert answers.reads == 1


async def test_one_tokens_reads_run_one_at_a_time_and_no_other_token_waits_for_them() -> None:
    # A key asking for many pages or filters at once must not take every connection to the
    # gateway's database: its reads queue; another token's read is not held behind them.
    answers = Answers(1.0, clock=Clock())
    gates = {name: asyncio.Event() for name in ("first", "second", "other")}
    running: list[str] = []

    def read(name: str) -> Any:
        async def run() -> bytes:
            running.append(name)
            await gates[name].wait()
            running.remove(name)
            return name.encode()

        return run

    first = asyncio.create_task(answers.get((1, LogQuery(page=1)), read("first")))
    second = asyncio.create_task(answers.get((1, LogQuery(page=2)), read("second")))
    other = asyncio.create_task(answers.get((2, LogQuery(page=1)), read("other")))
    for _ in range(5):
        await asyncio.sleep(0)
    assert running == ["first", "other"]  # token 1's second read waits for its first
    gates["other"].set()
    assert await other == b"other"
    assert running == ["first"]
    gates["first"].set()
    assert await first == b"first"
    for _ in range(5):
        await asyncio.sleep(0)
    assert running == ["second"]
    gates["second"].set()
    assert await second == b"second"
    assert answers.reads == 3 and not answers._turns  # nothing kept once no read runs


async def test_answers_are_bounded_by_entries_and_bytes() -> None:
    answers = Answers(1.0, max_entries=3, max_bytes=25, clock=Clock())

    def body(size: int) -> Any:
        async def read() -> bytes:
            return b"x" * size

        return read

    def kept() -> list[int]:
        return [token_id for token_id in (*range(5), 9) if answers.kept.peek((token_id, LogQuery())) is not None]

    for token_id in range(5):
        await answers.get((token_id, LogQuery()), body(5))
    assert kept() == [2, 3, 4]  # the least recently used went first
    await answers.get((2, LogQuery()), body(5))  # a hit: 2 is the most recently used now
    await answers.get((9, LogQuery()), body(20))
    assert kept() == [2, 9] and answers.kept.bytes == 25


@sqlite_only
async def test_polling_costs_one_read_per_token_and_parameters_per_second(
    gateway: Gateway, app_client: AppClient
) -> None:
    token = gateway.add_token()
    gateway.add_log(token)
    async with app_client() as (app, client):
        route: ShortRoute = app.exact[URL]
        clock = Clock()
        route.endpoint.answers._clock = clock  # type: ignore[union-attr]
        for _ in range(10):
            assert (await client.get(URL, headers=token.bearer)).status_code == 200
            assert (await client.get(f"{URL}/?p=1", headers=token.bearer)).status_code == 200
        assert app.state.logs.statements == 1 + 2  # the list; the page and its count
        gateway.add_log(token, content="new")
        clock.now += 1.0
        response = await client.get(URL, headers=token.bearer)
        assert app.state.logs.statements == 4
    assert [r["content"] for r in response.json()["data"]] == ["new", ""]


# --- a gateway writing while the route answers ---------------------------------------------------


async def test_answers_match_the_log_while_a_gateway_appends(
    gateway: Gateway, app_client: AppClient, tmp_path: Path
) -> None:
    """Every answer is exactly the token's newest rows as a direct SELECT reads them: the log is
    append-only, so the rows up to an answer's newest one never change afterwards."""
    overrides: dict[str, Any] = {"log_reads_per_token": 0}  # every request reads, as often as it can
    if engine_of(gateway) == "sqlite":
        # A busy SQLite gateway runs in WAL mode: in rollback mode a writer that never pauses
        # keeps readers out (its pending lock), and reads would time out rather than be tested.
        gateway = Gateway(tmp_path / "wal.db", journal_mode="wal")
        overrides["sqlite_path"] = gateway.path
    token, other = gateway.add_token(), gateway.add_token()
    for n in range(30):
        gateway.add_log(token, content=f"row {n}", created_at=n)
    stop = threading.Event()
    written = [0]

    def write() -> None:  # the gateway: a request's row, now and then another token's
        n = 30
        while not stop.is_set():
            gateway.add_log(token, content=f"row {n}", created_at=n, quota=n)
            if n % 3 == 0:
                gateway.add_log(other, content=f"other {n}", created_at=n)
            n += 1
            written[0] += 1

    writer = threading.Thread(target=write)
    writer.start()
    answers: list[list[str]] = []
    try:
        async with app_client(**overrides) as (app, client):
            route: ShortRoute = app.exact[URL]
            route.endpoint.answers.kept.ttl = 0.0  # type: ignore[union-attr]  # every request reads
            while len(answers) < 30 or written[0] < 20:
                plain = await client.get(URL, headers=token.bearer)
                answers.append([r["content"] for r in plain.json()["data"]])
                paged = await client.get(f"{URL}?p=2&page_size=7", headers=token.bearer)
                answers.append([r["content"] for r in paged.json()["data"]["items"]])
    finally:
        stop.set()
        writer.join()
    newest_first = _direct_contents(gateway, token)
    if "sqlite_path" in overrides:
        gateway.close()
    assert len(newest_first) >= 50
    for answer in answers:
        assert answer, "every answer has rows"
        start = newest_first.index(answer[0])
        assert answer == newest_first[start : start + len(answer)]
    assert any(len(a) == 7 for a in answers)
    assert not any("other" in content for answer in answers for content in answer)


def _direct_contents(gateway: Gateway, token: Token) -> list[str]:
    """A direct SELECT of the token's rows, newest first, on a connection of its own."""
    sql = "SELECT content FROM logs WHERE token_id = %s ORDER BY id DESC"
    engine = engine_of(gateway)
    if engine == "sqlite":
        with sqlite3.connect(gateway.path) as db:
            rows = db.execute(sql.replace("%s", "?"), (token.id,)).fetchall()
        db.close()
    elif engine == "postgres":
        import psycopg

        with psycopg.connect(gateway.server.url(gateway.name)) as conn:  # type: ignore[attr-defined]
            rows = conn.execute(sql, (token.id,)).fetchall()
    else:
        import pymysql

        conn = pymysql.connect(unix_socket=str(gateway.server.socket), user="root", database=gateway.name)  # type: ignore[attr-defined]
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql, (token.id,))
                rows = cursor.fetchall()
        finally:
            conn.close()
    return [str(r[0]) for r in rows]


@sqlite_only
async def test_browser_calls_of_the_key_checking_apps(gateway: Gateway, app_client: AppClient) -> None:
    """new-api-key-tool sends the Bearer header, neko-api-key-tool `?key=`; both from another origin."""
    token = gateway.add_token()
    gateway.add_log(token, content="seen")
    origin = {"Origin": "https://keys.example.com"}
    async with app_client(cors_origins=("https://keys.example.com",)) as (_, client):
        preflight = await client.options(
            URL,
            headers={
                **origin,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        bearer = await client.get(URL, headers={**token.bearer, **origin})
        legacy = await client.get(f"{URL}?key=sk-{token.key}", headers=origin)
        head = await client.head(URL, headers={**token.bearer, **origin})
    assert preflight.status_code == 204
    for response in (bearer, legacy):
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://keys.example.com"
        assert [r["content"] for r in response.json()["data"]] == ["seen"]
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == bearer.headers["content-length"]


async def test_log_sql_dsn_naming_the_main_database_shares_its_connections(
    gateway: Gateway, app_client: AppClient
) -> None:
    token = gateway.add_token()
    gateway.add_log(token, content="one")
    async with app_client(log_database=gateway.log_database) as (app, client):
        response = await client.get(URL, headers=token.bearer)
        ready = (await client.get("/readyz")).json()
        assert not app.state.logs.separate
    assert [r["content"] for r in response.json()["data"]] == ["one"]
    assert "log_database" not in ready


@sqlite_only
async def test_odd_values_read_as_the_gateways_zero_values(gateway: Gateway, app_client: AppClient) -> None:
    """An odd row does not fail the answer: what no number can be read from shows as 0, and so
    does text of more digits than a 64-bit number holds, and a boolean that is no UTF-8 (both
    were a 500 for the whole answer)."""
    token = gateway.add_token()
    gateway.add_log(token, content="fine", created_at=7)
    odd = gateway.add_log(token, is_stream="true")
    gateway.db.execute(
        "UPDATE logs SET created_at = 'soon', quota = NULL, username = NULL, other = NULL, `group` = 12 WHERE id = ?",
        (odd,),
    )
    huge = gateway.add_log(token, created_at=8)
    gateway.db.execute(
        "UPDATE logs SET quota = CAST('99999999999999999999999' AS BLOB), use_time = '99999999999999999999',"
        " is_stream = X'FF' WHERE id = ?",
        (huge,),
    )
    async with app_client() as (_, client):
        response = await client.get(URL, headers=token.bearer)
    assert response.status_code == 200
    past_64_bits, junk, fine = response.json()["data"]  # newest first
    assert (junk["created_at"], junk["quota"], junk["username"], junk["other"]) == (0, 0, "", "null")
    assert junk["is_stream"] is True and junk["group"] == "12"
    assert (fine["content"], fine["created_at"]) == ("fine", 7)
    assert (past_64_bits["quota"], past_64_bits["use_time"], past_64_bits["is_stream"]) == (0, 0, False)


async def test_an_other_nested_deeper_than_orjson_writes_fails_its_row_alone(
    gateway: Gateway, app_client: AppClient
) -> None:
    """orjson reads JSON nested up to 1,024 levels deep but writes only 254: a row whose `other`
    was nested between the two read as an object and then failed to render, a 500 for every
    answer holding the row. It shows `null`, as an `other` that cannot be read does."""
    token = gateway.add_token()
    gateway.add_log(token, content="fine", created_at=7)
    gateway.add_log(token, content="deep", created_at=8, other='{"a":' * 300 + "1" + "}" * 300)
    async with app_client() as (_, client):
        response = await client.get(URL, headers=token.bearer)
    assert response.status_code == 200, response.text
    deep, fine = response.json()["data"]  # newest first
    assert (deep["content"], deep["other"]) == ("deep", "null")
    assert (fine["content"], fine["other"]) == ("fine", "{}")


@pytest.mark.parametrize("gateway", ["postgres"], indirect=True)
async def test_postgres_start_up_advises_an_index_in_token_order(
    gateway: Gateway, app_client: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="usage_service")

    def advised() -> int:
        return sum("no index on (token_id, id)" in r.getMessage() for r in caplog.records)

    async with app_client():
        pass
    assert advised() == 1
    gateway.conn.execute("CREATE INDEX idx_logs_token_id_id ON logs (token_id, id)")  # type: ignore[attr-defined]
    try:
        async with app_client():
            pass
    finally:
        gateway.conn.execute("DROP INDEX idx_logs_token_id_id")  # type: ignore[attr-defined]
    assert advised() == 1  # not again


# --- the per-token read budget -------------------------------------------------------------------


async def test_a_tokens_reads_are_budgeted_after_a_burst() -> None:
    clock = Clock()
    budget = budget_module.TokenBudget(2.0, burst=8.0, clock=clock)
    for _ in range(8):
        budget.spend(1)
    with pytest.raises(budget_module.Spent) as spent:
        budget.spend(1)
    assert spent.value.retry_after == pytest.approx(0.5)
    budget.spend(2)  # another token's budget is its own
    clock.now += 0.5
    budget.spend(1)  # one more, earned back at 2 a second
    with pytest.raises(budget_module.Spent):
        budget.spend(1)
    clock.now += 100
    for _ in range(8):  # whole again, never more than the burst
        budget.spend(1)
    with pytest.raises(budget_module.Spent):
        budget.spend(1)


async def test_the_budgets_kept_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """One entry per token that read lately: tokens whose budget is whole again are forgotten
    (as good as new), and past the bound the oldest go."""
    monkeypatch.setattr(budget_module, "BUDGETS_KEPT", 100)
    clock = Clock()
    budget = budget_module.TokenBudget(1.0, burst=4.0, clock=clock)
    for token_id in range(1000):
        budget.spend(token_id)
        clock.now += 0.001
        assert len(budget._left) <= 100
    for token_id in range(995, 1000):  # the newest are still counted
        budget.spend(token_id)
        budget.spend(token_id)
        budget.spend(token_id)
        with pytest.raises(budget_module.Spent):
            budget.spend(token_id)


@sqlite_only
async def test_a_key_asking_for_new_parameters_each_time_is_refused_past_its_budget(
    gateway: Gateway, app_client: AppClient
) -> None:
    """Each parameter set not asked for within the last second is a read of the gateway's
    database: one key asking for a new one each time made a worker read for it about 85 times a
    second. Past its budget (USAGE_LOG_READS_PER_TOKEN a second after a burst of four times as
    many), a 429; answers served again cost none, and other tokens have budgets of their own."""
    token, other = gateway.add_token(), gateway.add_token()
    gateway.add_log(token)
    async with app_client(log_reads_per_token=1) as (app, client):
        statements = app.state.logs.statements
        answers = [await client.get(f"{URL}?start_timestamp={n}", headers=token.bearer) for n in range(5)]
        again = await client.get(f"{URL}?start_timestamp=0", headers=token.bearer)  # answered a moment ago
        others = await client.get(URL, headers=other.bearer)
        read = app.state.logs.statements - statements
    assert [a.status_code for a in answers] == [200] * 4 + [429]
    assert answers[4].json() == {"success": False, "message": "too many reads of this token's log, retry later"}
    assert answers[4].headers["retry-after"] == "1"
    assert (again.status_code, others.status_code) == (200, 200)
    assert read == 5  # four of the token's, one of the other's


@sqlite_only
async def test_no_read_budget_when_turned_off(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client(log_reads_per_token=0) as (_, client):
        answers = [await client.get(f"{URL}?start_timestamp={n}", headers=token.bearer) for n in range(30)]
    assert [a.status_code for a in answers] == [200] * 30


async def test_a_budget_spent_by_cost_never_refuses_for_ever() -> None:
    """Work is charged by its cost (days summed); a cost past the burst takes a whole burst, so
    that it can still be done once the budget is whole again."""
    clock = Clock()
    budget = budget_module.TokenBudget(10.0, burst=40.0, clock=clock)
    budget.spend(1, 30)
    with pytest.raises(budget_module.Spent) as spent:
        budget.spend(1, 30)
    assert spent.value.retry_after == pytest.approx(2.0) and spent.value.header == (b"retry-after", b"2")
    clock.now += 4
    budget.spend(1, 3650)  # capped at the burst: the budget is whole, so it is taken
    with pytest.raises(budget_module.Spent):
        budget.spend(1, 1)
