"""What each database engine must get right beyond the contract: read-only sessions, start-up
checks, dropped connections, batching, and the refresher's re-reads."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import AppClient, GatewayFactory
from dbservers import READER, READER_PASSWORD, PostgresGateway
from support import Gateway
from tcpproxy import TCPProxy
from test_billing import FUTURE, SUBSCRIPTION, TOKEN, USAGE, USER, subscription
from test_refresh import CHANGES, SLOW_CACHE, answer_is, eventually

from usage_service._dsn import MySQLDSN, parse_sql_dsn
from usage_service.app import create_app
from usage_service.cache import key_digest
from usage_service.config import Settings
from usage_service.store import STATEMENT_GUARD, SchemaError, StoreUnavailable, open_store
from usage_service.store._sql import SQLStore

pytestmark = pytest.mark.asyncio

URL = "/api/usage/token"
SERVERS = ["postgres", "mysql"]


@pytest.fixture(params=["sqlite", *SERVERS])
def gateway(request: pytest.FixtureRequest, make_gateway: GatewayFactory) -> Gateway:
    return make_gateway(request.param)


# For the tests that only a database server can fail.
on_servers = pytest.mark.parametrize("gateway", SERVERS, indirect=True)


async def test_store_sessions_refuse_writes(gateway: Gateway, settings: Settings) -> None:
    """Even with the gateway's own all-powerful credentials, the store's sessions cannot write."""
    token = gateway.add_token(name="before")
    owner = dataclasses.replace(settings, database=getattr(gateway, "owner_database", None))
    store = await open_store(owner)
    assert isinstance(store, SQLStore)
    try:
        with pytest.raises(StoreUnavailable, match=r"(?i)read.only|readonly"):
            await store._query("UPDATE tokens SET name = 'after'", ())
        record = await store.fetch(token.key)
        assert record is not None and record.name == "before"
    finally:
        await store.close()


@pytest.mark.parametrize("gateway", ["mysql"], indirect=True)
async def test_mysql_sessions_are_read_only_and_bounded_by_the_db_timeout(gateway: Gateway, settings: Settings) -> None:
    """Every MariaDB session: read-only transactions, and table-lock waits and statements cut
    at USAGE_DB_TIMEOUT (MariaDB's max_statement_time counts seconds)."""
    store = await open_store(dataclasses.replace(settings, db_timeout=2.5))
    assert isinstance(store, SQLStore)
    try:
        rows = await store._query("SELECT @@session.tx_read_only, @@lock_wait_timeout, @@max_statement_time", ())
        assert [tuple(int(float(v)) if i < 2 else float(v) for i, v in enumerate(row)) for row in rows] == [(1, 3, 2.5)]
    finally:
        await store.close()


@pytest.mark.parametrize("gateway", ["postgres"], indirect=True)
async def test_postgres_sessions_compile_nothing_and_take_no_parallel_workers(
    gateway: Gateway, settings: Settings
) -> None:
    """The history's month reads cost enough for PostgreSQL's JIT, whose compiling cost more
    than it saved, and for parallel workers, which the server has few of for the gateway's own
    queries: the service's sessions run without either, whatever the server's default."""
    store = await open_store(settings)
    assert isinstance(store, SQLStore)
    try:
        for setting, value in (("jit", "off"), ("max_parallel_workers_per_gather", "0")):
            assert await store._query(f"SHOW {setting}", ()) == [(value,)]
            assert [tuple(row) for row in await store.log_reader().query(f"SHOW {setting}")] == [(value,)]
    finally:
        await store.close()


@pytest.mark.parametrize("gateway", ["postgres"], indirect=True)
async def test_postgres_sessions_send_the_server_our_statements_only(gateway: Gateway, settings: Settings) -> None:
    """The driver's pool used to send a statement of its own after each of ours (`RESET ALL`,
    `UNLISTEN *` ...), doubling what the gateway's server answered for us; and a session still
    reads as it was set up after a statement that set something for its transaction only."""
    token = gateway.add_token(used=2)
    store = await open_store(dataclasses.replace(settings, db_pool_size=1))
    assert isinstance(store, SQLStore)
    try:
        assert (await store.fetch_many([token.id]))[token.id][1].used_quota == 2  # type: ignore[index]
        (last,) = gateway.conn.execute(  # type: ignore[attr-defined]
            "SELECT query FROM pg_stat_activity WHERE application_name = 'usage-service'"
        ).fetchall()
        assert "RESET" not in last[0] and '"tokens"' in last[0]
        await store.log_reader().query("SELECT 1", hash_groups=True)  # SET LOCAL enable_sort = off
        assert await store._query("SHOW enable_sort", ()) == [("on",)]
    finally:
        await store.close()


@pytest.mark.parametrize("gateway", ["postgres"], indirect=True)
@pytest.mark.parametrize("table", ["tokens", "users"])
async def test_readiness_follows_either_table_the_token_route_reads(
    gateway: Gateway, app_client: AppClient, table: str
) -> None:
    """A migration holding users locked turns every miss into a 503: /readyz says so too (it
    read only tokens, and said ready)."""
    token = gateway.add_token()
    async with app_client(db_timeout=0.5) as (_, client):
        assert (await client.get("/readyz")).status_code == 200
        with gateway.exclusive_lock(table):  # type: ignore[call-arg]
            assert (await client.get(URL, headers=token.bearer)).status_code == 503
            assert (await client.get("/readyz")).status_code == 503
        assert (await client.get("/readyz")).status_code == 200


@pytest.mark.parametrize("gateway", ["mysql"], indirect=True)
@pytest.mark.parametrize(
    ("user", "identified", "password"),
    [
        pytest.param("u_latin", "BY 'caf\u00e9-pw'", "caf\u00e9-pw", id="password-with-e-acute"),
        pytest.param("u_cjk", "BY 'pw-\u20ac-\u5bc6\u7801'", "pw-\u20ac-\u5bc6\u7801", id="password-past-latin1"),
        pytest.param("u_ed", "VIA ed25519 USING PASSWORD('ed-pw')", "ed-pw", id="ed25519-user"),
    ],
)
async def test_users_the_gateways_driver_logs_in_as_can_read(
    gateway: Gateway, settings: Settings, user: str, identified: str, password: str
) -> None:
    """The gateway's driver sends a password as UTF-8 and speaks every authentication method;
    so must the store (a Latin-1 password failed, one past Latin-1 and an ed25519 user raised
    errors no handler knew: 500s, and a start-up traceback)."""
    import pymysql

    server = gateway.server  # type: ignore[attr-defined]
    with pymysql.connect(unix_socket=str(server.socket), user="root", autocommit=True, charset="utf8mb4") as root:
        with root.cursor() as cursor:
            if identified.startswith("VIA ed25519"):
                cursor.execute("SELECT COUNT(*) FROM information_schema.PLUGINS WHERE PLUGIN_NAME = 'ed25519'")
                if not cursor.fetchone()[0]:
                    cursor.execute("INSTALL SONAME 'auth_ed25519'")
            cursor.execute(f"DROP USER IF EXISTS '{user}'@'%'")
            cursor.execute(f"CREATE USER '{user}'@'%' IDENTIFIED {identified}")
            cursor.execute(f"GRANT SELECT ON `{gateway.name}`.* TO '{user}'@'%'")  # type: ignore[attr-defined]
    token = gateway.add_token(used=4)
    dsn = f"{user}:{password}@tcp(127.0.0.1:{server.port})/{gateway.name}"  # type: ignore[attr-defined]
    await assert_read_through(settings, dsn, token, used=4)


@pytest.mark.parametrize("gateway", ["mysql"], indirect=True)
async def test_a_driver_failure_while_connecting_is_one_line(gateway: Gateway, settings: Settings) -> None:
    """A charset the server takes and the driver does not know failed inside the driver with an
    AttributeError: a traceback at start, a 500 later. It is the database that cannot be read."""
    database = dataclasses.replace(gateway.database, charset="utf8mb3")  # type: ignore[type-var]
    with pytest.raises(SchemaError, match=r"^SQL_DSN: .*cannot connect \(AttributeError"):
        await open_store(dataclasses.replace(settings, database=database))


async def test_keys_match_exactly(gateway: Gateway, app_client: AppClient) -> None:
    """MySQL compares text case-insensitively by default: a key differing in case is not the key."""
    token = gateway.add_token(key="AbCdEf" + "x" * 42)
    async with app_client() as (_, client):
        assert (await client.get(URL, headers=token.bearer)).status_code == 200
        response = await client.get(URL, headers={"Authorization": f"Bearer sk-{token.key.lower()}"})
    assert response.status_code == 401
    assert response.json()["message"] == "token not found"


@on_servers
async def test_numbers_in_decimal_columns_are_read_as_numbers(gateway: Gateway, app_client: AppClient) -> None:
    """A NUMERIC (PostgreSQL) or DECIMAL (MySQL) column arrives as a Decimal, which was read as
    the column's default: a disabled token was served, an expired one never expired, an
    unlimited one was limited, and a quota past 64 bits read as 0 instead of failing alone."""
    disabled = gateway.add_token(status=2)
    expired = gateway.add_token(expired_time=1000)
    unlimited = gateway.add_token(unlimited=1, remain=500_000)
    plain = gateway.add_token(remain=500_000)
    huge = gateway.add_token()
    # (The server's database is the next test's too: its columns are put back as they were.)
    postgres = isinstance(gateway, PostgresGateway)
    columns = {"status": "bigint DEFAULT 1", "expired_time": "bigint DEFAULT -1", "remain_quota": "bigint DEFAULT 0"}
    for column in [*columns, "unlimited_quota"]:
        if postgres:
            cast = f"{column}::int" if column == "unlimited_quota" else column
            gateway._execute(f"ALTER TABLE tokens ALTER COLUMN {column} TYPE numeric(30, 0) USING {cast}", ())
        else:
            gateway._execute(f"ALTER TABLE tokens MODIFY {column} DECIMAL(30, 0)", ())
    try:
        gateway._execute("UPDATE tokens SET remain_quota = 100000000000000000000000 WHERE id = ?", (huge.id,))
        async with app_client() as (_, client):
            assert (await client.get(URL, headers=disabled.bearer)).status_code == 401
            assert (await client.get(URL, headers=expired.bearer)).json()["data"]["expires_at"] == 1000
            assert (await client.get(URL, headers=unlimited.bearer)).json()["data"]["unlimited_quota"] is True
            assert (await client.get(URL, headers=plain.bearer)).json()["data"]["total_available"] == 500_000
            assert (await client.get(URL, headers=huge.bearer)).status_code == 503  # that token alone
    finally:
        gateway._execute("UPDATE tokens SET remain_quota = 0 WHERE id = ?", (huge.id,))
        for column, declared in columns.items():
            if postgres:
                gateway._execute(f"ALTER TABLE tokens ALTER COLUMN {column} TYPE bigint USING {column}::bigint", ())
            else:
                gateway._execute(f"ALTER TABLE tokens MODIFY {column} {declared}", ())
        if postgres:
            boolean = "TYPE boolean USING unlimited_quota <> 0"
            gateway._execute(f"ALTER TABLE tokens ALTER COLUMN unlimited_quota {boolean}", ())
        else:
            gateway._execute("ALTER TABLE tokens MODIFY unlimited_quota boolean", ())


@pytest.mark.parametrize("gateway", ["postgres"], indirect=True)
async def test_a_url_the_gateways_driver_takes_is_taken(gateway: Gateway, settings: Settings) -> None:
    """Several hosts (the first down, as in a failover) and pgx's own parameters stopped start-up:
    a malformed port, and `unrecognized configuration parameter "connect_timeout"`."""
    database = gateway.database  # type: ignore[attr-defined]
    parts = urlsplit(database.url)
    credentials, _, address = parts.netloc.rpartition("@")
    netloc = f"{credentials}@127.0.0.1:1,{address}"
    query = "connect_timeout=10&statement_cache_capacity=0&default_query_exec_mode=simple_protocol"
    url = parts._replace(netloc=netloc, query=f"{parts.query}&{query}" if parts.query else query).geturl()
    store = await open_store(dataclasses.replace(settings, database=parse_sql_dsn(url)))
    try:
        token = gateway.add_token()
        found = await store.fetch_many([token.id])
        assert found[token.id][0] == key_digest(token.key.encode())  # type: ignore[index]
    finally:
        await store.close()


@pytest.mark.parametrize("gateway", ["postgres"], indirect=True)
async def test_a_password_with_an_unencoded_at_sign_is_taken(gateway: Gateway, settings: Settings) -> None:
    """The gateway's URL parser ends the password at the last '@'; asyncpg, handed the URL as
    written, ended it at the first and looked up the rest as the host name."""
    # The service's role, whose password holds an '@' (and a ':'), which the gateway's DSN encodes.
    address = urlsplit(gateway.dsn).netloc.rpartition("@")[2]  # type: ignore[attr-defined]
    dsn = f"postgres://{READER}:{READER_PASSWORD}@{address}/{gateway.name}"  # type: ignore[attr-defined]
    assert "@" in READER_PASSWORD
    token = gateway.add_token(used=4)
    await assert_read_through(settings, dsn, token, used=4)


@pytest.mark.parametrize("gateway", ["mysql"], indirect=True)
@pytest.mark.parametrize("over", ["tcp", "unix"])
async def test_tls_preferred_on_a_server_without_tls_connects_in_plain_text(
    gateway: Gateway, settings: Settings, caplog: pytest.LogCaptureFixture, over: str
) -> None:
    """As the gateway's driver does (the test's MariaDB offers no TLS): `tls=preferred` stopped
    start-up with the TLS handshake's error (over a unix socket, a broken pipe); `tls=skip-verify`
    still insists on TLS."""
    database: MySQLDSN = gateway.database  # type: ignore[attr-defined]
    if over == "unix":  # (as the gateway's own user: the service's may log in over TCP only)
        owner: MySQLDSN = gateway.owner_database  # type: ignore[attr-defined]
        database = dataclasses.replace(owner, unix_socket=str(gateway.server.socket))  # type: ignore[attr-defined]
    token = gateway.add_token(used=3)
    with pytest.raises(SchemaError, match="cannot read it"):
        await open_store(dataclasses.replace(settings, database=dataclasses.replace(database, tls="skip-verify")))
    caplog.set_level(logging.WARNING, logger="usage_service")
    store = await open_store(dataclasses.replace(settings, database=dataclasses.replace(database, tls="preferred")))
    try:
        for _ in range(2):
            gateway.drop_reader_sessions()  # type: ignore[attr-defined]
            found = await store.fetch_many([token.id])
            assert found[token.id][1].used_quota == 3  # type: ignore[index]
    finally:
        await store.close()
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        "tls=preferred and the server offers no TLS: connecting without it, as the gateway's driver does"
    ]


async def test_tls_preferred_on_a_server_that_offers_tls_never_goes_without() -> None:
    """A server whose greeting offers TLS but whose handshake fails (a cipher the client refuses,
    a reset mid-handshake) is an error: the service once took any failed handshake as a server
    without TLS, and logged in in plain text from then on."""
    from usage_service.store.mysql import MySQLStore

    caps = 0x1 | 0x4 | 0x8 | 0x200 | 0x800 | 0x8000 | 0x80000  # CLIENT_SSL (0x800) among them
    salt = b"abcdefghijklmnopqrst"
    body = (
        b"\x0a8.0.36\x00" + struct.pack("<I", 7) + salt[:8] + b"\x00" + struct.pack("<H", caps & 0xFFFF)
        + b"\x21" + struct.pack("<H", 2) + struct.pack("<H", caps >> 16) + bytes([21]) + b"\x00" * 10
        + salt[8:] + b"\x00mysql_native_password\x00"
    )  # fmt: skip
    greeting = struct.pack("<I", len(body))[:3] + b"\x00" + body
    seen: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await writer.drain()
            head = await reader.readexactly(4)
            packet = await reader.readexactly(int.from_bytes(head[:3], "little"))
            seen.append("TLS asked" if len(packet) == 32 else "plain-text login")
            await reader.read(4096)  # the ClientHello, answered with an alert: protocol_version
            writer.write(b"\x15\x03\x01\x00\x02\x02\x46")
            await writer.drain()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = MySQLStore(
        MySQLDSN(user="u", host="127.0.0.1", port=port, database="d", tls="preferred"), timeout=1.0, pool_size=1
    )
    try:
        for _ in range(2):
            with pytest.raises(Exception, match="PROTOCOL_VERSION"):
                await store._connect()
    finally:
        server.close()
        await server.wait_closed()
    assert seen == ["TLS asked", "TLS asked"]


async def test_a_set_up_that_fails_closes_what_it_opened(gateway: Gateway, settings: Settings) -> None:
    """A Redis URL redis-py refuses (one the start-up checks once let through) failed the
    lifespan after the database was opened, and left it open: on SQLite, aiosqlite's thread,
    which is no daemon, then kept the worker from ever exiting."""
    threads = set(threading.enumerate())
    app = create_app(dataclasses.replace(settings, redis_url="redis://127.0.0.1:1/0?db=abc"))
    with pytest.raises(ValueError, match="'db'"):
        async with app.router.lifespan_context(app):  # type: ignore[attr-defined]
            pass
    store = app.state.store
    assert store is not None
    with pytest.raises(StoreUnavailable):
        await store.fetch("k" * 48)

    def left() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in threads and not t.daemon]

    deadline = time.monotonic() + 5
    while left() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not left()


async def test_fetch_many_batches_and_reuses_unchanged_records(gateway: Gateway, app_client: AppClient) -> None:
    tokens = [gateway.add_token(used=i) for i in range(25)]
    deleted = gateway.add_token(deleted=True)
    async with app_client(refresh_interval=0) as (app, _):
        store = app.state.store
        store.fetch_batch = 10
        before = store.statements
        ids = [t.id for t in tokens] + [deleted.id, 999_999]
        first = await store.fetch_many(ids)
        assert store.statements - before == 3
        assert sorted(first) == [t.id for t in tokens]
        digests = [key_digest(t.key.encode()) for t in tokens]
        assert all(first[t.id] == (digests[i], first[t.id][1]) for i, t in enumerate(tokens))
        assert all(first[t.id][1].used_quota == i for i, t in enumerate(tokens))
        gateway.charge(tokens[0], 5)
        second = await store.fetch_many(ids)
    assert second[tokens[0].id][1].used_quota == 5
    assert second[tokens[1].id][1] is first[tokens[1].id][1]  # unchanged row, same record object


async def test_the_rows_the_refresher_reads_leave_no_key_behind(gateway: Gateway, app_client: AppClient) -> None:
    """The rows a refresh reads hold the tokens' keys: what the store keeps of them holds none,
    nor any 16 characters of one."""
    tokens = [gateway.add_token(used=i) for i in range(20)]
    async with app_client(refresh_interval=0) as (app, _):
        store = app.state.store
        await store.fetch_many([t.id for t in tokens])
        gateway.charge(tokens[0], 5)
        await store.fetch_many([t.id for t in tokens])
        fragments = {t.key[i : i + 16] for t in tokens for i in range(0, len(t.key) - 15, 4)}
        held = list(texts_reachable_from(store))
    assert held  # the walk reached the rows' text
    assert not [text for text in held if any(fragment in text for fragment in fragments)]


def texts_reachable_from(root: object, limit: int = 200_000) -> Iterator[str]:
    """Every str (and bytes, decoded) reachable from `root` through the service's own objects
    and the containers they hold (not through a driver's: a connection's last result is the
    driver's, until its next statement)."""
    seen: set[int] = set()
    todo = [root]
    while todo and len(seen) < limit:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, str):
            yield item
        elif isinstance(item, bytes | bytearray):
            yield bytes(item).decode(errors="replace")
        elif isinstance(item, dict | list | tuple | set | frozenset | deque) or type(item).__module__.startswith(
            "usage_service"
        ):
            todo.extend(gc.get_referents(item))


async def test_a_burst_of_misses_shares_statements(gateway: Gateway, app_client: AppClient) -> None:
    tokens = [gateway.add_token(used=i) for i in range(40)]
    async with app_client(db_pool_size=1, refresh_interval=0) as (app, client):
        responses = await asyncio.gather(*(client.get(URL, headers=t.bearer) for t in tokens))
        assert [r.json()["data"]["total_used"] for r in responses] == list(range(40))
        assert app.state.store.statements < 40 / 4


@on_servers
async def test_dropped_sessions_are_replaced(gateway: Gateway, app_client: AppClient) -> None:
    """A database restart or failover closes the service's sessions, every pooled one: the next
    requests reconnect (with four pooled on MySQL, two got 503 first)."""
    tokens = [gateway.add_token(used=i) for i in range(4)]
    async with app_client(refresh_interval=0, db_pool_size=4) as (app, client):
        store = app.state.store
        sleep = "SELECT SLEEP(0.1)" if isinstance(gateway.database, MySQLDSN) else "SELECT pg_sleep(0.1)"
        await asyncio.gather(*(store._query(sleep, ()) for _ in range(4)))  # four sessions pooled
        assert gateway.drop_reader_sessions() >= 1  # type: ignore[attr-defined]
        await asyncio.sleep(0.2)
        responses = [await client.get(URL, headers=token.bearer) for token in tokens]
    assert [response.status_code for response in responses] == [200] * 4
    assert [response.json()["data"]["total_used"] for response in responses] == [0, 1, 2, 3]


@on_servers
async def test_a_store_closed_while_reads_its_callers_left_run_leaves_no_session_behind(
    gateway: Gateway, settings: Settings
) -> None:
    """Reads whose callers were cancelled go on (a batch shared with others, a round stopped at
    shutdown), one held on the gateway's lock and one waiting for its connection: the store's
    close waits for them, within a statement's bound, and leaves no session on the server. (The
    MySQL store closed only its idle sessions: the held read's went on on the server after
    close(), and the waiting read opened a new one.)"""
    token = gateway.add_token()
    store = await open_store(dataclasses.replace(settings, db_timeout=2.0, db_pool_size=1))
    try:
        with gateway.exclusive_lock():  # type: ignore[call-arg]
            # One statement sent (the others queue behind it as one batch), its callers to go.
            reads = [asyncio.create_task(store.fetch(token.key)) for _ in range(4)]
            async with asyncio.timeout(5):
                while not gateway.reader_sessions(busy=True):  # type: ignore[attr-defined]
                    await asyncio.sleep(0.01)
            waiting = asyncio.create_task(store.fetch_many([token.id]))  # left running, as a round's
            await asyncio.sleep(0)
            for read in reads:
                read.cancel()
            await asyncio.gather(*reads, return_exceptions=True)
            started = time.monotonic()
            await store.close()
            assert time.monotonic() - started < 2.0 + STATEMENT_GUARD + 0.5

            async def no_session_left() -> bool:
                return not gateway.reader_sessions()  # type: ignore[attr-defined]

            # The server's own view (it may take a moment to see a socket closed; the held
            # read's session went on for as long as its statement's bound, 2 s, and more).
            await eventually(no_session_left, within=1.0)
            # The read that waited ends at once, without a session of its own.
            assert isinstance((await asyncio.gather(waiting, return_exceptions=True))[0], StoreUnavailable)
            assert not gateway.reader_sessions()  # type: ignore[attr-defined]
    finally:
        await store.close()


def _through(database: Any, port: int) -> Any:
    """The same database, reached through a proxy listening on `port` on loopback."""
    if isinstance(database, MySQLDSN):
        return dataclasses.replace(database, host="127.0.0.1", port=port)
    parts = urlsplit(database.url)
    return dataclasses.replace(
        database, url=parts._replace(netloc=parts.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{port}").geturl()
    )


def _address(database: Any) -> tuple[str, int]:
    if isinstance(database, MySQLDSN):
        return database.host, database.port
    parts = urlsplit(database.url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


@on_servers
async def test_a_server_that_stops_answering_is_waited_on_no_longer_than_a_lock(
    gateway: Gateway, app_client: AppClient
) -> None:
    """A database server that goes silent (a black-holed network, a hung host) is what a lock is:
    cached tokens answer, a miss gets 503 within USAGE_DB_TIMEOUT and the stores' guard, /readyz
    says 503; once it answers again, so does the service."""
    cached, missed = gateway.add_token(used=2), gateway.add_token(used=5)
    with TCPProxy(_address(gateway.database)) as proxy:
        database = _through(gateway.database, proxy.port)
        async with app_client(database=database, db_timeout=0.5, refresh_interval=0, local_ttl=600) as (_, client):
            assert (await client.get(URL, headers=cached.bearer)).json()["data"]["total_used"] == 2
            proxy.black_hole()
            started = time.monotonic()
            miss = await client.get(URL, headers=missed.bearer)
            waited = time.monotonic() - started
            assert miss.status_code == 503 and miss.headers["retry-after"] == "1"
            assert waited < 0.5 + STATEMENT_GUARD + 0.5, waited
            assert (await client.get(URL, headers=cached.bearer)).status_code == 200
            assert (await client.get("/readyz")).status_code == 503
            proxy.heal()
            await eventually(answer_is(client, missed, 200, total_used=5), within=10.0)
            assert (await client.get("/readyz")).status_code == 200


@on_servers
@pytest.mark.parametrize(
    ("change", "words"),
    [
        pytest.param({"port": 1}, "cannot read it", id="unreachable"),
        pytest.param({"password": "wrong"}, "cannot read it", id="bad-password"),
        pytest.param({"database": "nope"}, "", id="no-such-database"),
    ],
)
async def test_start_up_errors_name_sql_dsn(
    gateway: Gateway, settings: Settings, change: dict[str, Any], words: str
) -> None:
    database: Any = gateway.database
    if hasattr(database, "url"):  # PostgreSQL: change the URL the same way
        url = database.url
        if "port" in change:
            url = url.replace(f":{database.url.rsplit(':', 1)[1].split('/')[0]}/", ":1/")
        if "password" in change:
            url = url.replace(url.split("//")[1].split("@")[0], "usage_service:wrong")
        if "database" in change:
            url = url.rsplit("/", 1)[0] + "/nope"
        database = dataclasses.replace(database, url=url)
    else:
        database = dataclasses.replace(database, **change)
    with pytest.raises(SchemaError) as info:
        await open_store(dataclasses.replace(settings, database=database))
    message = str(info.value)
    assert message.startswith("SQL_DSN: ") and words in message
    assert "\n" not in message
    assert "r3ad-only" not in message and "wrong" not in message  # no password, ever


@on_servers
async def test_missing_grant_fails_start_up(gateway: Gateway, settings: Settings) -> None:
    gateway._execute("REVOKE SELECT ON users FROM " + _reader(gateway), ())
    try:
        with pytest.raises(SchemaError, match=r"^SQL_DSN: .*(cannot read it|no SELECT on users)"):
            await open_store(settings)
    finally:
        gateway._execute("GRANT SELECT ON users TO " + _reader(gateway), ())


def _reader(gateway: Gateway) -> str:
    return "usage_service" if hasattr(gateway.database, "url") else "'usage_service'@'%'"


@on_servers
@pytest.mark.parametrize(("change", "status", "data"), CHANGES)
async def test_the_refresher_follows_changes(
    gateway: Gateway, app_client: AppClient, redis_url: str, change: Any, status: int, data: dict[str, Any]
) -> None:
    """Charges, disabled tokens, bans and deletions, re-read in batches by the refresher."""
    token = gateway.add_token()
    async with app_client(redis_url=redis_url, **SLOW_CACHE) as (app, client):
        assert (await client.get(URL, headers=token.bearer)).status_code == 200
        await eventually(lambda: _true(app.state.refresher.stats.leader))
        change(gateway, token)
        await eventually(answer_is(client, token, status, **data), within=2.0)


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize(
    ("options", "expected_subscription", "expected_usage"),
    [
        pytest.param({"DisplayTokenStatEnabled": "false"}, subscription(10), 200, id="owner-totals"),
        pytest.param({"general_setting.quota_display_type": "CNY"}, subscription(14.6, FUTURE), 438, id="cny"),
    ],
)
async def test_billing_reads_options_and_owner_quota(
    gateway: Gateway,
    app_client: AppClient,
    options: dict[str, str],
    expected_subscription: dict[str, Any],
    expected_usage: float,
) -> None:
    """The gateway's options table and the owner's quota columns, on each engine."""
    for key, value in options.items():
        gateway.set_option(key, value)
    token = gateway.add_token(user_id=gateway.add_user(**USER), **TOKEN)
    async with app_client() as (app, client):
        sub = await client.get(SUBSCRIPTION, headers=token.bearer)
        use = await client.get(USAGE, headers=token.bearer)
        assert app.state.store.option_statements >= 1
    assert sub.json() == expected_subscription
    assert use.json() == {"object": "list", "total_usage": expected_usage}


async def assert_read_through(settings: Settings, dsn: str, token: Any, *, used: int) -> None:
    """A store opened on `dsn` reads `token` (whose used quota is `used`)."""
    store = await open_store(dataclasses.replace(settings, database=parse_sql_dsn(dsn)))
    try:
        record = await store.fetch(token.key)
        assert record is not None and record.used_quota == used
    finally:
        await store.close()
