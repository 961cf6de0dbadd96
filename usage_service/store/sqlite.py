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

from . import SchemaError, StoreUnavailable
from ._sql import Column, SQLStore, check_schema, select_sql

logger = logging.getLogger("usage_service.store")

# How often to check whether the file at SQLITE_PATH is still the one our connections hold
# (a gateway restore replaces it; open connections would go on reading the old inode).
_IDENTITY_CHECK_INTERVAL = 1.0


class SQLiteStore(SQLStore):
    """Read token records from a new-api SQLite database without ever writing to it."""

    # Keys or ids per statement: SQLite allows 32766 variables since 3.32, 999 before.
    fetch_batch = 1000 if sqlite3.sqlite_version_info >= (3, 32, 0) else 900

    def __init__(self, path: Path, *, timeout: float, pool_size: int) -> None:
        super().__init__(pool_size=pool_size)
        self.path = path
        self._uri = path.resolve().as_uri() + "?mode=ro"
        self._timeout = timeout
        self._size = pool_size
        self._idle: asyncio.LifoQueue[aiosqlite.Connection] = asyncio.LifoQueue()
        self._slots = asyncio.Semaphore(pool_size)
        self._identity = _file_identity(path)
        self._generation = 0
        self._conn_generation: dict[int, int] = {}
        self._checked_at = time.monotonic()
        self._closed = False

    @classmethod
    async def open(cls, path: Path, *, timeout: float, pool_size: int = 4) -> SQLiteStore:
        """Open the store, checking that the file is a gateway database; raise SchemaError if not."""
        store = cls(path, timeout=timeout, pool_size=pool_size)
        try:
            async with store._connection() as conn:
                columns = {table: await _columns(conn, table) for table in ("tokens", "users")}
                store._has_options = bool(await _columns(conn, "options"))
            check_schema(columns, f"SQLITE_PATH: {str(path)!r}")
        except StoreUnavailable as exc:
            await store.close()
            raise SchemaError(f"SQLITE_PATH: cannot read {str(path)!r}: {exc}") from None
        except SchemaError:
            await store.close()
            raise
        store._select = select_sql(columns["tokens"], columns["users"], '"', fixed_order=True)
        return store

    def _match(self, column: Column, values: Sequence[Any]) -> tuple[str, Sequence[Any]]:
        return f't."{column}" IN ({", ".join("?" * len(values))})', values

    def _live(self) -> str:
        # The gateway indexes tokens.deleted_at; without statistics SQLite may prefer that
        # index for "deleted_at IS NULL" over the key's unique index once an IN list holds more
        # than a few keys, and scan every live token per statement. The unary + keeps the term
        # off any index.
        return '+t."deleted_at" IS NULL'

    def _options_probe(self) -> str:
        return "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'options'"

    def _options_sql(self, keys: Sequence[str]) -> tuple[str, Sequence[Any]]:
        return f'SELECT "key", "value" FROM "options" WHERE "key" IN ({", ".join("?" * len(keys))})', keys

    async def close(self) -> None:
        self._closed = True
        while not self._idle.empty():
            await self._discard(self._idle.get_nowait())

    async def _query(self, sql: str, params: Sequence[Any]) -> Sequence[Sequence[Any]]:
        # SQLite's own busy timeout bounds waiting on the gateway's locks; this outer bound also
        # covers waiting for a free connection and a query that hangs for any other reason.
        try:
            async with asyncio.timeout(self._timeout + 1.0):
                async with self._connection() as conn:
                    try:
                        return list(await conn.execute_fetchall(sql, params))
                    except asyncio.CancelledError:
                        await conn.interrupt()
                        raise
        except TimeoutError:
            raise StoreUnavailable("database timed out") from None

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
            # Rows stay plain tuples (sqlite3.Row objects would cost the refresher thousands a second).
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
