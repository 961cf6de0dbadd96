"""A PostgreSQL gateway database, through a bounded asyncpg pool of read-only sessions."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import asyncpg

from .._dsn import PostgresDSN
from . import STATEMENT_GUARD, SchemaError, StoreDataError, StoreNotReady, StoreUnavailable
from ._sql import ROW_MEMORY, Column, SQLStore, check_log_schema, check_schema, select_sql
from .logs import LOG_COLUMNS_SQL, Resent, uncounted

# Seconds a connection may sit idle in the pool before it is closed.
IDLE_LIFETIME = 60.0

# Columns of both tables, resolved through the session's search_path like the query itself.
_COLUMNS_SQL = """
SELECT c.relname, a.attname
FROM pg_catalog.pg_attribute AS a JOIN pg_catalog.pg_class AS c ON c.oid = a.attrelid
WHERE a.attrelid IN (to_regclass('tokens'), to_regclass('users'), to_regclass('options'))
  AND a.attnum > 0 AND NOT a.attisdropped
"""


# Errors that mean the connection, not the statement, failed.
_CONNECTION_LOST = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.InterfaceError,
)

# The ids and keys of one batch go as one array parameter: one prepared statement serves
# every batch size.
_ARRAY_TYPES = {"id": "bigint[]", "key": "text[]"}


class PostgresStore(SQLStore):
    """Read token records from a new-api PostgreSQL database without ever writing to it."""

    engine = "postgres"

    def __init__(self, dsn: PostgresDSN, *, timeout: float, pool_size: int, rows_kept: int = ROW_MEMORY) -> None:
        super().__init__(pool_size=pool_size, rows_kept=rows_kept)
        self.dsn = dsn
        self._timeout = timeout
        self._pool: asyncpg.Pool | None = None

    @classmethod
    async def open(
        cls, dsn: PostgresDSN, *, timeout: float, pool_size: int, rows_kept: int = ROW_MEMORY
    ) -> PostgresStore:
        """Connect, check that the database is a gateway's; raise SchemaError if not."""
        store = cls(dsn, timeout=timeout, pool_size=pool_size, rows_kept=rows_kept)
        await store._start(f"SQL_DSN: {dsn.describe()}", store._check_tables)
        return store

    @classmethod
    async def open_logs(cls, dsn: PostgresDSN, *, timeout: float, pool_size: int) -> PostgresStore:
        """Connect only for the `logs` table (LOG_SQL_DSN), in the same read-only sessions; raise
        SchemaError if the database has none."""
        store = cls(dsn, timeout=timeout, pool_size=pool_size)
        await store._start(f"LOG_SQL_DSN: {dsn.describe()}", store._check_logs)
        return store

    async def _start(self, where: str, check: Callable[[str], Awaitable[None]]) -> None:
        connecting = max(self._timeout, 1.0) + 5.0
        try:
            self._pool = await asyncio.wait_for(self._create_pool(), timeout=connecting)
            if await self._server_encoding() == "SQL_ASCII":
                # The server keeps text as the bytes it was given and refuses to send a row whose
                # bytes are not UTF-8 to a UTF-8 session: one such row would fail every statement
                # that reads it. Sessions that take the bytes as they are, read leniently, instead.
                await self._pool.close()
                self._pool = await asyncio.wait_for(self._create_pool(raw_text=True), timeout=connecting)
            await check(where)
        except (StoreUnavailable, OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            await self.close()
            raise StoreNotReady(f"{where}: cannot read it: {_reason(exc)}") from None
        except SchemaError:
            await self.close()
            raise

    async def _read_select(self, where: str = "SQL_DSN") -> str:
        rows = await self._query(_COLUMNS_SQL, ())
        columns: dict[str, set[str]] = {"tokens": set(), "users": set(), "options": set()}
        for table, column in rows:
            columns[table].add(column)
        check_schema(columns, where, server=True)
        self._has_options = bool(columns["options"])
        return select_sql(columns["tokens"], columns["users"], '"')

    async def _check_logs(self, where: str) -> None:
        rows = await self._query(LOG_COLUMNS_SQL["postgres"], ())
        check_log_schema({column for (column,) in rows}, where, server=True)
        await self._query('SELECT "id" FROM "logs" LIMIT 0', ())  # proves the GRANT

    async def _server_encoding(self) -> str:
        assert self._pool is not None
        async with self._pool.acquire() as conn:
            return str(conn.get_settings().server_encoding).upper()

    async def _create_pool(self, *, raw_text: bool = False) -> asyncpg.Pool:
        """The pool of read-only sessions; with `raw_text`, sessions that receive text as the
        server holds it (a SQL_ASCII database) and read it as the gateway shows it."""
        return await asyncpg.create_pool(
            self.dsn.url,
            min_size=0,
            max_size=self.pool_size,
            max_inactive_connection_lifetime=IDLE_LIFETIME,
            timeout=max(self._timeout, 1.0),  # connecting
            init=_read_text_leniently if raw_text else None,
            # A session is returned to the pool as it was taken: its statements change nothing
            # that outlives their transaction (SET LOCAL at most). The driver's default reset sent
            # the server a statement of its own (RESET ALL, UNLISTEN *, ...) after each of ours.
            reset=_nothing_to_reset,
            server_settings={
                **({"client_encoding": "SQL_ASCII"} if raw_text else {}),
                # Every transaction of these sessions is read-only: the server refuses any write.
                "default_transaction_read_only": "on",
                # A statement waiting on a gateway's lock (or anything else) gives up in time.
                "statement_timeout": str(max(1, round(self._timeout * 1000))),
                "application_name": "usage-service",
                # No JIT compilation (PostgreSQL 11+): the history's month reads cost enough to
                # trigger it, and compiling took 130 to 290 ms of the server's CPU per statement
                # on the 10,000,000-row bench, more than it saved.
                "jit": "off",
                # No parallel workers: the server's few (max_parallel_workers, 8 by default) are
                # left to the gateway's own queries; a cold month is read in two halves on two
                # connections already (history.py).
                "max_parallel_workers_per_gather": "0",
            },
        )

    def _match(self, column: Column, values: Sequence[Any]) -> tuple[str, Sequence[Any]]:
        return f't."{column}" = ANY($1::{_ARRAY_TYPES[column]})', (list(values),)

    def _live(self) -> str:
        return 't."deleted_at" IS NULL'

    def _options_probe(self) -> str:
        return "SELECT 1 WHERE to_regclass('options') IS NOT NULL"

    def _options_sql(self, keys: Sequence[str]) -> tuple[str, Sequence[Any]]:
        return 'SELECT "key", "value" FROM "options" WHERE "key" = ANY($1::text[])', (list(keys),)

    async def _query(
        self, sql: str, params: Sequence[Any], resent: Resent = uncounted, /, *, hash_groups: bool = False
    ) -> Sequence[Sequence[Any]]:
        pool = self._pool
        if pool is None or pool.is_closing():
            raise StoreUnavailable("store is closed")
        try:
            # Bounds waiting for a free connection, connecting and the statement(s) together.
            async with asyncio.timeout(self._timeout + STATEMENT_GUARD):
                try:
                    return await self._fetch(pool, sql, params, hash_groups)
                except _CONNECTION_LOST:
                    # A pooled connection the server dropped (restart, failover, idle kill): the
                    # pool has discarded it; one more try on a fresh one.
                    return await self._fetch(pool, sql, params, hash_groups)
        except TimeoutError:
            raise StoreUnavailable("database timed out") from None
        except asyncpg.DataError as exc:  # a number out of range, say
            raise StoreDataError(_reason(exc)) from None
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(_reason(exc)) from None

    @staticmethod
    async def _fetch(pool: asyncpg.Pool, sql: str, params: Sequence[Any], hash_groups: bool) -> Sequence[Sequence[Any]]:
        async with pool.acquire() as conn:
            if not hash_groups:
                # Records index like tuples.
                return cast(Sequence[Sequence[Any]], await conn.fetch(sql, *params))
            # Sorting disfavoured for this statement only (SET LOCAL ends with its transaction):
            # the token log's pages, on the same connections, still sort when they must.
            async with conn.transaction(readonly=True):
                await conn.execute("SET LOCAL enable_sort = off")
                return cast(Sequence[Sequence[Any]], await conn.fetch(sql, *params))

    async def close(self) -> None:
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), timeout=self._timeout + 1.0)
            except TimeoutError:
                self._pool.terminate()


async def _nothing_to_reset(conn: asyncpg.Connection) -> None:
    """(The pool still rolls back a transaction left open before calling this.)"""


# The text types of the columns the service reads (and of what its statements make of them).
_TEXT_TYPES = ("text", "varchar", "bpchar", "name")


async def _read_text_leniently(conn: asyncpg.Connection) -> None:
    """Decode text as UTF-8, showing bytes that are not as U+FFFD (as the gateway's JSON encoder
    does), instead of failing the row and the statement with it; parameters are sent as UTF-8."""
    for name in _TEXT_TYPES:
        await conn.set_type_codec(name, schema="pg_catalog", encoder=_utf8, decoder=_lenient, format="binary")


def _utf8(text: str) -> bytes:
    return text.encode()


def _lenient(data: bytes) -> str:
    return data.decode(errors="replace")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
