"""Rows at the edges: text that is not UTF-8, values no record can hold, numbers past 64 bits,
and a database file replaced by one with other columns."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SQLITE_OLD_SCHEMA, AppClient
from support import Gateway, Token

from usage_service.config import Settings
from usage_service.records import INT64_MAX, INT64_MIN

pytestmark = pytest.mark.asyncio

URL = "/api/usage/token"
SUBSCRIPTION = "/dashboard/billing/subscription"

# model_limits as the gateway could hold it after a client sent Latin-1: 0xff is no UTF-8.
NOT_UTF8 = "CAST(X'6770742d34ff6f2c6f33' AS TEXT)"  # b"gpt-4\xffo,o3"
# A quota no 64-bit integer holds, which the gateway cannot read into a Go int either.
PAST_64_BITS = "CAST('99999999999999999999' AS BLOB)"


def spoil(gateway: Gateway, token: Token, column: str, expression: str) -> None:
    gateway.db.execute(f"UPDATE tokens SET {column} = {expression} WHERE id = ?", (token.id,))


async def test_text_that_is_not_utf8_reads_as_the_gateway_shows_it(gateway: Gateway, app_client: AppClient) -> None:
    """Go's JSON encoder shows bad bytes as U+FFFD; one such row must not fail the 59 read beside it."""
    tokens = [gateway.add_token(used=i) for i in range(60)]
    bad = tokens[5]
    spoil(gateway, bad, "model_limits", NOT_UTF8)
    spoil(gateway, bad, "name", "CAST(X'6ee97700' AS TEXT)")
    async with app_client(db_pool_size=1, refresh_interval=0) as (app, client):
        responses = await asyncio.gather(*(client.get(URL, headers=t.bearer) for t in tokens))
        assert app.state.store.statements < 60 / 4  # the bad row shared its statements
    assert [r.status_code for r in responses] == [200] * 60
    assert [r.json()["data"]["total_used"] for r in responses] == list(range(60))
    data = responses[5].json()["data"]
    assert data["model_limits"] == {"gpt-4\ufffdo": True, "o3": True}
    assert data["name"] == "n\ufffdw\x00"


async def test_text_that_is_not_utf8_in_a_sql_ascii_postgres_database_reads_as_the_gateway_shows_it(
    settings: Settings, request: pytest.FixtureRequest
) -> None:
    """A PostgreSQL database created as SQL_ASCII keeps whatever bytes the gateway wrote, and the
    server refuses to send them to a UTF-8 session: one such row failed each statement reading it
    (the 59 tokens batched beside it, every refresh round, the token's log)."""
    from dbservers import PostgresGateway

    from usage_service.app import create_app

    gateway = PostgresGateway(request.getfixturevalue("postgres_server"), "new-api-sql-ascii", encoding="SQL_ASCII")
    try:
        tokens = [gateway.add_token(used=i) for i in range(60)]
        bad = tokens[5]
        gateway.conn.execute(
            "UPDATE tokens SET model_limits = E'gpt-4\\xffo,o3', name = E'n\\xe9w' WHERE id = %s", (bad.id,)
        )
        gateway.add_log(bad, model_name="gpt-4o", content="fine")
        gateway.conn.execute("UPDATE logs SET model_name = E'gpt-4\\xffo', content = E'caf\\xe9'")
        overrides = {"db_pool_size": 1, "refresh_interval": 0, "sqlite_path": None, "database": gateway.database}
        app = create_app(dataclasses.replace(settings, **overrides))  # type: ignore[arg-type]
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                responses = await asyncio.gather(*(client.get(URL, headers=t.bearer) for t in tokens))
                assert app.state.store.statements < 60 / 4  # the bad row shared its statements
                refreshed = await app.state.store.fetch_many([t.id for t in tokens])  # a refresher's re-read
                log = await client.get("/api/log/token", headers=bad.bearer)
                history = await client.get("/api/usage/token/history?group_by=model", headers=bad.bearer)
    finally:
        gateway.close()
    assert [r.status_code for r in responses] == [200] * 60
    assert [r.json()["data"]["total_used"] for r in responses] == list(range(60))
    data = responses[5].json()["data"]
    assert data["model_limits"] == {"gpt-4\ufffdo": True, "o3": True}
    assert data["name"] == "n\ufffdw"
    assert sorted(refreshed) == sorted(t.id for t in tokens)
    assert refreshed[bad.id][1].model_limits == ("gpt-4\ufffdo", "o3")
    assert log.status_code == 200, log.text
    assert [(row["model_name"], row["content"]) for row in log.json()["data"]] == [("gpt-4\ufffdo", "caf\ufffd")]
    assert history.status_code == 200, history.text
    assert [bucket["model"] for bucket in history.json()["data"]["buckets"]] == ["gpt-4\ufffdo"]


async def test_an_unreadable_row_fails_alone(
    gateway: Gateway, app_client: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = [gateway.add_token(used=i) for i in range(60)]
    bad = tokens[7]
    spoil(gateway, bad, "used_quota", PAST_64_BITS)
    caplog.set_level(logging.WARNING, logger="usage_service")
    async with app_client(db_pool_size=1, refresh_interval=0, negative_ttl=0) as (_, client):
        responses = await asyncio.gather(*(client.get(URL, headers=t.bearer) for t in tokens))
        again = await client.get(URL, headers=bad.bearer)
    statuses = [r.status_code for r in responses]
    assert statuses == [503 if t is bad else 200 for t in tokens]
    assert [r.json()["data"]["total_used"] for t, r in zip(tokens, responses, strict=True) if t is not bad] == [
        i for i in range(60) if i != 7
    ]
    for response in (responses[7], again):
        assert response.json() == {"success": False, "message": "database unavailable, retry later"}
    # Logged once with the token's id, never its key, and without a traceback.
    lines = [r for r in caplog.records if f"token id {bad.id}" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert not any(bad.key[:8] in r.getMessage() for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize("shared", [False, True], ids=["alone", "through-redis"])
async def test_the_refresher_leaves_an_unreadable_row_alone(
    gateway: Gateway,
    app_client: AppClient,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
    shared: bool,
) -> None:
    tokens = [gateway.add_token(used=1) for _ in range(60)]
    bad = tokens[11]
    overrides: dict[str, object] = {"cache_ttl": 60.0, "local_ttl": 60.0, "refresh_interval": 3600.0}
    if shared:
        overrides["redis_url"] = request.getfixturevalue("redis_url")
    caplog.set_level(logging.WARNING, logger="usage_service")
    async with app_client(**overrides) as (app, client):
        refresher = app.state.refresher
        for token in tokens:
            assert (await client.get(URL, headers=token.bearer)).status_code == 200
        await refresher.tick()  # notes the polled tokens and re-reads them (rounds are driven by hand)
        for token in tokens:
            gateway.charge(token, 4)
        spoil(gateway, bad, "used_quota", PAST_64_BITS)
        changed = refresher.stats.changed
        for _ in range(2):
            await refresher.tick()  # must not raise
            assert refresher.stats.tokens == 59
        assert refresher.stats.changed - changed == (59 if shared else 0)
        if not shared:  # a worker refreshing alone takes the records in at once
            for token in tokens:
                if token is not bad:
                    assert (await client.get(URL, headers=token.bearer)).json()["data"]["total_used"] == 5
        # What was cached for the bad token stays as it was, to age out as usual.
        assert (await client.get(URL, headers=bad.bearer)).json()["data"]["total_used"] == 1
    lines = [r for r in caplog.records if f"token id {bad.id}" in r.getMessage()]
    assert len(lines) == 2  # once per round
    assert not any(r.exc_info for r in caplog.records)
    assert not any(bad.key[:8] in r.getMessage() for r in caplog.records)


# --- numbers at the edges --------------------------------------------------------------------

EDGES = [
    # (remain_quota, used_quota, total_granted as the gateway's Go int arithmetic gives it)
    pytest.param(INT64_MIN, 0, INT64_MIN, id="remain-int64-min"),
    pytest.param(INT64_MIN, -1, INT64_MAX, id="wraps-below-int64-min"),
    pytest.param(INT64_MAX, 10, INT64_MIN + 9, id="wraps-past-int64-max"),
    pytest.param(INT64_MAX, INT64_MAX, -2, id="both-int64-max"),
]


@pytest.mark.parametrize(("remain", "used", "granted"), EDGES)
async def test_totals_past_64_bits_are_what_the_gateway_shows(
    gateway: Gateway, app_client: AppClient, remain: int, used: int, granted: int
) -> None:
    token = gateway.add_token(remain=remain, used=used)
    async with app_client(refresh_interval=0) as (_, client):
        response = await client.get(URL, headers=token.bearer)
    assert response.status_code == 200
    data = response.json()["data"]
    assert (data["total_granted"], data["total_available"], data["total_used"]) == (granted, remain, used)


async def test_a_charge_past_64_bits_fails_its_token_alone(gateway: Gateway, app_client: AppClient) -> None:
    """SQLite turns a sum past 64 bits into a REAL: a charge (the gateway's `used_quota + ?`) of
    a token near the edge stores a number no 64-bit integer holds, which the gateway cannot read
    into a Go int. It was read as junk, a used quota of 0; it fails that token alone."""
    from usage_service.store import UnreadableRow
    from usage_service.store.sqlite import SQLiteStore

    good = gateway.add_token(used=1)
    bad = gateway.add_token(remain=100, used=INT64_MAX - 5)
    gateway.charge(bad, 10)
    assert gateway.db.execute("SELECT typeof(used_quota) FROM tokens WHERE id = ?", (bad.id,)).fetchone() == ("real",)
    async with app_client(refresh_interval=0, negative_ttl=0) as (_, client):
        response = await client.get(URL, headers=bad.bearer)
        assert (await client.get(URL, headers=good.bearer)).status_code == 200
    assert response.status_code == 503, response.text
    store = await SQLiteStore.open(gateway.path, timeout=2, pool_size=1)
    try:
        found = await store.fetch_many([good.id, bad.id])
    finally:
        await store.close()
    assert isinstance(found[bad.id], UnreadableRow)
    assert not isinstance(found[good.id], UnreadableRow)


async def test_subscription_amount_follows_the_wrapped_total(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token(remain=INT64_MAX, used=10)
    async with app_client(refresh_interval=0) as (_, client):
        response = await client.get(SUBSCRIPTION, headers=token.bearer)
    assert response.status_code == 200
    # float64(int(remain + used)) / QuotaPerUnit, as the gateway computes it.
    assert response.json()["hard_limit_usd"] == float(INT64_MIN + 9) / 500_000


# --- a database file replaced by one with other columns ---------------------------------------


def one_api_backup(path: Path, key: str, used: int) -> Path:
    """A database as one-api left it: no model-limit columns, no users.used_quota."""
    backup = Gateway(path, schema=SQLITE_OLD_SCHEMA)
    backup.db.execute(
        "INSERT INTO tokens (user_id, `key`, status, name, expired_time, remain_quota, used_quota, unlimited_quota)"
        " VALUES (?, ?, 1, 'old', -1, 100, ?, 0)",
        (backup.add_user(), key, used),
    )
    backup.close()
    return path


NOT_A_GATEWAY = "CREATE TABLE tokens (id integer PRIMARY KEY, `key` text); CREATE TABLE users (id integer);"


async def test_a_restored_file_with_older_columns_is_read_as_it_is(
    gateway: Gateway, app_client: AppClient, tmp_path: Path
) -> None:
    """The query is rebuilt for the new file's columns: uncached tokens are read, not 503."""
    cached = gateway.add_token(used=1)
    async with app_client(refresh_interval=0) as (app, client):
        app.state.store.identity_check_interval = 0  # notice the swap at the next statement
        assert (await client.get(URL, headers=cached.bearer)).status_code == 200
        new_key = "r" * 48
        os.replace(one_api_backup(tmp_path / "restore.db", new_key, used=7), gateway.path)
        response = await client.get(URL, headers={"Authorization": f"Bearer sk-{new_key}"})
        ready = await client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["data"]["total_used"] == 7
    assert response.json()["data"]["model_limits"] == {}
    assert ready.status_code == 200


async def test_a_restored_file_that_is_no_gateway_database_is_not_ready(
    gateway: Gateway, app_client: AppClient, tmp_path: Path
) -> None:
    token = gateway.add_token(used=1)
    good = tmp_path / "good.db"
    async with app_client(refresh_interval=0, cache_ttl=60, local_ttl=60, stale_if_error=0) as (app, client):
        app.state.store.identity_check_interval = 0  # notice the swap at the next statement
        assert (await client.get("/readyz")).status_code == 200
        os.link(gateway.path, good)  # the good file, to put back afterwards
        foreign = Gateway(tmp_path / "foreign.db", schema=NOT_A_GATEWAY)
        foreign.close()
        os.replace(foreign.path, gateway.path)
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["database"] == "unavailable"
        assert "tokens lacks columns" in ready.json()["reason"] and "remain_quota" in ready.json()["reason"]
        other = await client.get(URL, headers={"Authorization": "Bearer sk-" + "o" * 48})
        assert other.status_code == 503
        os.replace(good, gateway.path)  # the operator puts a gateway database back
        assert (await client.get("/readyz")).json() == {"ready": True, "database": "ok", "redis": "disabled"}
        response = await client.get(URL, headers=token.bearer)
    assert response.status_code == 200 and response.json()["data"]["total_used"] == 1


async def test_a_busy_database_gives_no_reason(gateway: Gateway, app_client: AppClient) -> None:
    """Only what an operator must fix is spelled out; a lock passes by itself."""
    async with app_client(refresh_interval=0) as (_, client):
        with gateway.exclusive_lock():
            ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"ready": False, "database": "unavailable", "redis": "disabled"}


async def test_rows_read_as_one_json_value_are_read_as_row_by_row(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """The refresher's statements on SQLite come back as one JSON array each: whatever a row
    holds, the records (or the refusal) are those the row-by-row path makes."""
    from usage_service.store import UnreadableRow
    from usage_service.store.sqlite import SQLiteStore

    tokens = [gateway.add_token(used=i, remain=-i, model_limits_enabled=1, model_limits="a,b") for i in range(12)]
    spoil(gateway, tokens[0], "model_limits", NOT_UTF8)
    spoil(gateway, tokens[1], "used_quota", PAST_64_BITS)  # a BLOB: JSON cannot hold it
    spoil(gateway, tokens[2], "remain_quota", "'123'")  # text where a number belongs
    spoil(gateway, tokens[3], "unlimited_quota", "'true'")
    spoil(gateway, tokens[4], "used_quota", "1.5e19")  # a REAL
    spoil(gateway, tokens[5], "model_limits", "NULL")
    spoil(gateway, tokens[6], "name", "'quote \" and \\\\ and \n newline'")
    spoil(gateway, tokens[7], "expired_time", "NULL")
    gateway.db.execute("UPDATE users SET status = 2 WHERE id = ?", (tokens[8].user_id,))
    ids = [t.id for t in tokens]

    def comparable(found: dict[int, object]) -> dict[int, object]:
        return {k: (v.reason if isinstance(v, UnreadableRow) else v) for k, v in found.items()}

    store = await SQLiteStore.open(gateway.path, timeout=2, pool_size=1)
    try:
        assert store._json_select  # this SQLite has its JSON functions
        by_json = await store.fetch_many(ids)
        statements = store.statements
        store._json_select = ""
        store._rows = type(store._rows)()
        by_row = await store.fetch_many(ids)
    finally:
        await store.close()
    assert comparable(by_json) == comparable(by_row)
    assert by_json[tokens[0].id][1].model_limits == ("gpt-4\ufffdo", "o3")  # type: ignore[index]
    # The JSON statement, read again decoding its text leniently (a row is not UTF-8), then
    # the chunk row by row (another holds a BLOB).
    assert statements == 3
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no database failure


async def test_a_value_json_cannot_hold_fails_no_other_row(gateway: Gateway) -> None:
    """SQLite writes an infinite REAL into JSON as `Inf`, which no JSON reader takes: that
    statement is read row by row, where the value reads as junk does, and every other row of it
    as it is now (a charge included)."""
    from usage_service.store.sqlite import SQLiteStore

    tokens = [gateway.add_token(used=1, remain=100) for _ in range(5)]
    ids = [t.id for t in tokens]
    store = await SQLiteStore.open(gateway.path, timeout=2, pool_size=1)
    try:
        assert store._json_select  # this SQLite has its JSON functions
        await store.fetch_many(ids)
        spoil(gateway, tokens[2], "remain_quota", "9e999")
        gateway.charge(tokens[0], 5)
        found = await store.fetch_many(ids)
    finally:
        await store.close()
    assert sorted(found) == ids
    used = {token_id: pair[1].used_quota for token_id, pair in found.items()}  # type: ignore[union-attr]
    assert used == {**dict.fromkeys(ids, 1), tokens[0].id: 6}
    assert found[tokens[2].id][1].remain_quota == 0  # type: ignore[union-attr]


async def test_a_statement_read_again_gives_each_rows_latest_record(gateway: Gateway) -> None:
    """The refresher reads the same statements every round, most of them unchanged; whatever it
    read before, each read gives the rows as they are now (a change, and a change undone)."""
    from usage_service.store.sqlite import SQLiteStore

    tokens = [gateway.add_token(used=i, remain=100) for i in range(20)]
    ids = [t.id for t in tokens]
    store = await SQLiteStore.open(gateway.path, timeout=2, pool_size=1)
    try:

        async def used() -> dict[int, int]:
            return {token_id: pair[1].used_quota for token_id, pair in (await store.fetch_many(ids)).items()}  # type: ignore[union-attr]

        before = await used()
        assert before == await used() == {t.id: i for i, t in enumerate(tokens)}
        gateway.charge(tokens[7], 5)
        assert await used() == {**before, tokens[7].id: 12}
        gateway.update_token(tokens[7], used_quota=7, remain_quota=100)  # undone: the first text again
        assert await used() == before
        gateway.update_token(tokens[7], name="renamed")
        assert (await store.fetch_many(ids))[tokens[7].id][1].name == "renamed"  # type: ignore[union-attr]
    finally:
        await store.close()


async def test_a_hot_set_larger_than_the_default_memory_is_found_again_every_round(
    gateway: Gateway, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With USAGE_HOT_MAX past what a store remembers by default, a round re-reads more rows than
    that: the store opened for it remembers a whole round, so an unchanged row read again is not
    made into a record again (it was, every round, when the memory was a fixed 50,000 rows)."""
    from usage_service.refresh import REFRESH_CHUNK
    from usage_service.store import _sql, open_store

    hot = _sql.ROW_MEMORY + _sql.ROW_MEMORY // 5
    gateway.add_tokens(hot)
    ids = [row[0] for row in gateway.db.execute("SELECT id FROM tokens ORDER BY id")]
    store = await open_store(dataclasses.replace(settings, hot_max=hot))
    made = 0
    row_record = _sql.row_record

    def counted(values: Sequence[Any]) -> object:
        nonlocal made
        made += 1
        return row_record(values)

    monkeypatch.setattr(_sql, "row_record", counted)
    try:

        async def round_() -> int:  # as the refresher reads: chunk by chunk, in the hot set's order
            nonlocal made
            made = 0
            for start in range(0, len(ids), REFRESH_CHUNK):
                assert len(await store.fetch_many(ids[start : start + REFRESH_CHUNK])) == min(
                    REFRESH_CHUNK, len(ids) - start
                )
            return made

        assert await round_() == hot
        assert await round_() == 0
        gateway.db.execute("UPDATE tokens SET used_quota = 1 WHERE id = ?", (ids[-1],))
        assert await round_() == 1  # and a changed row is read as it is now
    finally:
        await store.close()


async def test_files_a_restore_replaced_are_let_go(tmp_path: Path) -> None:
    """Each file replaced by a restore (a rename over it: rsync, litestream) stayed open, its disk
    space held, until the service stopped: one more per restore. Once no connection reads it, it
    is closed."""
    import shutil

    from usage_service.store.sqlite import SQLiteStore

    gateway = Gateway(tmp_path / "one-api.db")
    token = gateway.add_token(used=1)
    gateway.close()
    backup = tmp_path / "backup.db"
    shutil.copy(gateway.path, backup)

    def replaced_files_open() -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # (the listing's own descriptor is gone)
                link = os.readlink(f"/proc/self/fd/{fd}")
                count += link.startswith(str(gateway.path)) and link.endswith("(deleted)")
        return count

    store = await SQLiteStore.open(gateway.path, timeout=1.0, pool_size=2)
    store.identity_check_interval = 0
    try:
        for _ in range(5):
            shutil.copy(backup, tmp_path / "restore.tmp")
            os.replace(tmp_path / "restore.tmp", gateway.path)
            assert await store.fetch(token.key) is not None
        assert replaced_files_open() <= 1  # at most the one replaced last (5 before)
    finally:
        await store.close()
    assert replaced_files_open() == 0


# --- the columns looked at again (SCHEMA_CHECK_INTERVAL) ---------------------------------------


@pytest.mark.parametrize("due", [False, True], ids=["columns-not-due", "columns-due"])
async def test_an_outage_is_counted_and_said_whether_or_not_the_columns_are_due(
    due: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that stops answering when the columns are due to be looked at again fails that
    look as it fails a statement: counted in usage_db_errors, and said once."""
    from usage_service._dsn import PostgresDSN
    from usage_service.store import StoreUnavailable
    from usage_service.store.postgres import PostgresStore

    store = PostgresStore(PostgresDSN("postgresql://127.0.0.1:1/gateway"), timeout=0.3, pool_size=1)
    store._select = 'SELECT 1 FROM "tokens" AS t'  # as after open()

    async def down(sql: str, params: Sequence[Any], *resent: object, **options: object) -> Sequence[Sequence[Any]]:
        raise StoreUnavailable("connection refused")

    store._query = down  # type: ignore[method-assign]
    store.schema_check_interval = 0 if due else 3600
    with caplog.at_level(logging.WARNING, logger="usage_service.store"):
        for _ in range(3):
            with pytest.raises(StoreUnavailable):
                await store.fetch("k" * 48)
    assert store.errors == 3
    assert [r.message for r in caplog.records] == ["database unavailable: connection refused"]


@pytest.mark.parametrize("due", [False, True], ids=["columns-not-due", "columns-due"])
async def test_a_readiness_probe_is_neither_a_statement_nor_an_error(due: bool) -> None:
    """/readyz's probe of a server that does not answer (nothing listens on its port) fails, but
    counts in neither usage_db_statements nor usage_db_errors, whether or not the columns are due
    to be looked at again; a lookup's statement still counts in both."""
    from support import free_port

    from usage_service._dsn import PostgresDSN
    from usage_service.store import StoreUnavailable
    from usage_service.store.postgres import PostgresStore

    store = PostgresStore(PostgresDSN(f"postgresql://u@127.0.0.1:{free_port()}/gateway"), timeout=0.3, pool_size=1)
    store._select = 'SELECT 1 FROM "tokens" AS t'  # as after open()
    store._pool = await store._create_pool()  # connects on first use, as after open()
    store.schema_check_interval = 0 if due else 3600
    try:
        for _ in range(3):
            with pytest.raises(StoreUnavailable):
                await store.ping()
        assert (store.statements, store.errors) == (0, 0)
        with pytest.raises(StoreUnavailable):
            await store.fetch("k" * 48)
        assert store.errors == 1 and store.statements == (0 if due else 1)  # due: the look at the columns failed
    finally:
        await store.close()


async def test_columns_due_are_read_once_by_the_statements_that_find_them_due(gateway: Gateway) -> None:
    from usage_service.store.sqlite import SQLiteStore

    gateway.add_token()
    store = await SQLiteStore.open(gateway.path, timeout=0.3, pool_size=4)
    try:
        reads = 0
        read_schema = store._read_schema

        async def counted(where: str) -> None:
            nonlocal reads
            reads += 1
            await read_schema(where)

        store._read_schema = counted  # type: ignore[method-assign]
        store.schema_check_interval = 0.5
        await asyncio.sleep(0.5)  # due, for the four statements that start together
        await asyncio.gather(*(store.fetch(f"{i:048d}") for i in range(4)))
        assert reads == 1
    finally:
        await store.close()
