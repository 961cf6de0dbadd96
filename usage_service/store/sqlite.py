"""The gateway's SQLite file, through a small pool of read-only aiosqlite connections."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from .._batch import Batcher
from ..records import TokenRecord, as_bool, as_int, parse_model_limits
from . import SchemaError, StoreUnavailable

logger = logging.getLogger("usage_service.store")

# Columns we cannot do without; older gateways (one-api) lack the model-limit columns, which
# then read as "no limits".
_REQUIRED = {
    "tokens": {
        "id",
        "user_id",
        "key",
        "status",
        "name",
        "expired_time",
        "remain_quota",
        "used_quota",
        "unlimited_quota",
        "deleted_at",
    },
    "users": {"id", "status", "deleted_at"},
}
_OPTIONAL_TOKEN_COLUMNS = ("model_limits_enabled", "model_limits")
# The owner's balance (billing routes); one-api era users tables may lack used_quota.
_OPTIONAL_USER_COLUMNS = {"quota": "user_quota", "used_quota": "user_used_quota"}

# Keys or ids per statement: SQLite allows 32766 variables since 3.32, 999 before.
FETCH_BATCH = 1000 if sqlite3.sqlite_version_info >= (3, 32, 0) else 900

# Rows fetch_many remembers, to hand back the same record for an unchanged row.
ROW_MEMORY = 50_000

# How often to check whether the file at SQLITE_PATH is still the one our connections hold
# (a gateway restore replaces it; open connections would go on reading the old inode).
_IDENTITY_CHECK_INTERVAL = 1.0


class SQLiteStore:
    """Read token records from a new-api SQLite database without ever writing to it."""

    def __init__(self, path: Path, *, timeout: float, pool_size: int, columns: str = "") -> None:
        self.path = path
        self.statements = 0
        self.option_statements = 0
        self.errors = 0
        self._uri = path.resolve().as_uri() + "?mode=ro"
        self._timeout = timeout
        self._columns = columns
        self._rows: dict[object, tuple[tuple[object, ...], TokenRecord]] = {}  # fetch_many's last rows, by id
        # Concurrent misses for different keys share one statement per free connection.
        self._by_key: Batcher[str, TokenRecord] = Batcher(self._fetch_keys, max_batch=FETCH_BATCH, slots=pool_size)
        self._size = pool_size
        self._idle: asyncio.LifoQueue[aiosqlite.Connection] = asyncio.LifoQueue()
        self._slots = asyncio.Semaphore(pool_size)
        self._identity = _file_identity(path)
        self._generation = 0
        self._conn_generation: dict[int, int] = {}
        self._checked_at = time.monotonic()
        self._failing = False
        self._closed = False
        self._has_options = False

    @classmethod
    async def open(cls, path: Path, *, timeout: float, pool_size: int = 4) -> SQLiteStore:
        """Open the store, checking that the file is a gateway database; raise SchemaError if not."""
        probe = cls(path, timeout=timeout, pool_size=pool_size)
        try:
            async with probe._connection() as conn:
                columns = {table: await _columns(conn, table) for table in _REQUIRED}
                probe._has_options = bool(await _columns(conn, "options"))
        except StoreUnavailable as exc:
            await probe.close()
            raise SchemaError(f"SQLITE_PATH: cannot read {str(path)!r}: {exc}") from None
        for table, needed in _REQUIRED.items():
            if not columns[table]:
                await probe.close()
                raise SchemaError(f"SQLITE_PATH: {str(path)!r} has no {table} table; is it new-api's database?")
            missing = needed - columns[table]
            if missing:
                await probe.close()
                raise SchemaError(f"SQLITE_PATH: table {table} lacks columns {', '.join(sorted(missing))}")
        probe._columns = _select_columns(columns["tokens"], columns["users"])
        return probe

    async def fetch(self, key: str) -> TokenRecord | None:
        return await self._by_key.load(key)

    async def _fetch_keys(self, keys: Sequence[str]) -> dict[str, TokenRecord]:
        where = f'WHERE t."key" IN ({", ".join("?" * len(keys))}) AND t."deleted_at" IS NULL'
        return {row["key"]: _record(row) for row in await self._execute(f"{self._columns} {where}", keys)}

    async def fetch_many(self, ids: Sequence[int]) -> dict[int, tuple[str, TokenRecord]]:
        found: dict[int, tuple[str, TokenRecord]] = {}
        previous = self._rows
        for start in range(0, len(ids), FETCH_BATCH):
            batch = ids[start : start + FETCH_BATCH]
            where = f'WHERE t."id" IN ({", ".join("?" * len(batch))}) AND t."deleted_at" IS NULL'
            for row in await self._execute(f"{self._columns} {where}", batch):
                values = tuple(row)
                seen = previous.get(values[0])
                # The refresher re-reads the same rows every second and most have not changed:
                # an identical row gives back the same record object, built once.
                record = seen[1] if seen is not None and seen[0] == values else _record(row)
                found[record.id] = (row["key"], record)
                previous.pop(values[0], None)
                previous[values[0]] = (values, record)  # most recently read last
        while len(previous) > ROW_MEMORY:
            del previous[next(iter(previous))]
        return found

    async def fetch_options(self, keys: Sequence[str]) -> dict[str, str]:
        # The gateway creates its options table at start; a database without one has defaults.
        # (Checked again while it is missing: a gateway started after us may create it.)
        if not self._has_options:
            probe = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'options'"
            if not await self._execute(probe, (), options=True):
                return {}
            self._has_options = True
        where = f'WHERE "key" IN ({", ".join("?" * len(keys))})'
        rows = await self._execute(f'SELECT "key", "value" FROM "options" {where}', keys, options=True)
        return {str(row[0]): str(row[1]) for row in rows if row[0] is not None and row[1] is not None}

    async def ping(self) -> None:
        await self._execute("SELECT 1 FROM tokens LIMIT 1", ())

    async def close(self) -> None:
        self._closed = True
        while not self._idle.empty():
            await self._discard(self._idle.get_nowait())

    async def _execute(self, sql: str, params: Sequence[Any], options: bool = False) -> list[sqlite3.Row]:
        # SQLite's own busy timeout bounds waiting on the gateway's locks; this outer bound also
        # covers waiting for a free connection and a query that hangs for any other reason.
        try:
            async with asyncio.timeout(self._timeout + 1.0):
                async with self._connection() as conn:
                    if options:
                        self.option_statements += 1
                    else:
                        self.statements += 1
                    try:
                        rows = list(await conn.execute_fetchall(sql, params))
                    except asyncio.CancelledError:
                        await conn.interrupt()
                        raise
        except TimeoutError:
            self._note_failure("timed out")
            raise StoreUnavailable("database timed out") from None
        except StoreUnavailable as exc:
            self._note_failure(str(exc))
            raise
        if self._failing:
            self._failing = False
            logger.warning("database answers again")
        return rows

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[aiosqlite.Connection]:
        if self._closed:
            raise StoreUnavailable("store is closed")
        self._check_identity()
        async with self._slots:
            conn = None
            while not self._idle.empty():
                candidate = self._idle.get_nowait()
                if self._conn_generation.get(id(candidate)) == self._generation:
                    conn = candidate
                    break
                await self._discard(candidate)
            try:
                if conn is None:
                    conn = await self._connect()
                yield conn
            except sqlite3.Error as exc:
                # A connection that failed for any reason but a lock may be broken (file replaced,
                # disk error): drop it and let the next request open a fresh one.
                if conn is not None and not _is_busy(exc):
                    await self._discard(conn)
                    conn = None
                raise StoreUnavailable(str(exc)) from None
            except BaseException:
                if conn is not None:
                    await self._discard(conn)
                    conn = None
                raise
            finally:
                if conn is not None:
                    if self._closed:
                        await self._discard(conn)
                    else:
                        self._idle.put_nowait(conn)

    async def _connect(self) -> aiosqlite.Connection:
        # mode=ro: SQLite opens the file O_RDONLY and refuses every write; it never creates a
        # missing file. query_only is a second lock on the same door.
        conn = await aiosqlite.connect(self._uri, uri=True, timeout=self._timeout, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            await conn.execute("PRAGMA query_only = 1")
        except BaseException:
            await conn.close()
            raise
        self._conn_generation[id(conn)] = self._generation
        return conn

    async def _discard(self, conn: aiosqlite.Connection) -> None:
        self._conn_generation.pop(id(conn), None)
        try:
            await conn.close()
        except (sqlite3.Error, ValueError):
            pass

    def _check_identity(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < _IDENTITY_CHECK_INTERVAL:
            return
        self._checked_at = now
        identity = _file_identity(self.path)
        if identity is not None and identity != self._identity:
            logger.warning("database file %s was replaced; reopening connections", self.path)
            self._identity = identity
            self._generation += 1

    def _note_failure(self, reason: str) -> None:
        self.errors += 1
        if not self._failing:
            self._failing = True
            logger.warning("database unavailable: %s", reason)


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _is_busy(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or (
        "locked" in str(exc)
    )


async def _columns(conn: aiosqlite.Connection, table: str) -> set[str]:
    async with conn.execute(f"PRAGMA table_info({table})") as cursor:
        return {row[1] for row in await cursor.fetchall()}


def _select_columns(token_columns: set[str], user_columns: set[str]) -> str:
    optional = [f't."{c}"' if c in token_columns else f'NULL AS "{c}"' for c in _OPTIONAL_TOKEN_COLUMNS]
    user = [f'u."{c}" AS "{a}"' if c in user_columns else f'0 AS "{a}"' for c, a in _OPTIONAL_USER_COLUMNS.items()]
    # Only the columns we need; the join drops tokens whose user is missing or soft-deleted,
    # which the contract treats exactly like a missing token.
    return (
        'SELECT t."id", t."key", t."user_id", t."name", t."status", t."expired_time", t."remain_quota", '
        f't."used_quota", t."unlimited_quota", {", ".join(optional)}, u."status" AS "user_status", '
        f"{', '.join(user)} "
        'FROM "tokens" AS t JOIN "users" AS u ON u."id" = t."user_id" AND u."deleted_at" IS NULL'
    )


def _record(row: sqlite3.Row) -> TokenRecord:
    # The refresher builds thousands of these a second: take the common column types as they
    # come and fall back to the careful readers only for odd values.
    tid, uid, name, status, expired, remain, used = row[0], row[2], row[3], row[4], row[5], row[6], row[7]
    unlimited, enabled, limits, user_status = row[8], row[9], row[10], row[11]
    user_quota, user_used = row[12], row[13]
    return TokenRecord(
        tid if type(tid) is int else as_int(tid),
        uid if type(uid) is int else as_int(uid),
        name if type(name) is str else "",
        status if type(status) is int else as_int(status, default=1),
        expired if type(expired) is int else as_int(expired, default=-1),
        remain if type(remain) is int else as_int(remain),
        used if type(used) is int else as_int(used),
        unlimited != 0 if type(unlimited) is int else as_bool(unlimited),
        enabled != 0 if type(enabled) is int else as_bool(enabled),
        parse_model_limits(limits) if limits else (),
        user_status if type(user_status) is int else as_int(user_status, default=1),
        user_quota if type(user_quota) is int else as_int(user_quota),
        user_used if type(user_used) is int else as_int(user_used),
    )
