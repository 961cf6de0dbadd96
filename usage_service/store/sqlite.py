"""The gateway's SQLite file, through a small pool of read-only aiosqlite connections."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from . import (
    STATEMENT_GUARD,
    SchemaError,
    StoreDataError,
    StoreMisconfigured,
    StoreNotReady,
    StoreUnavailable,
    UnreadableRow,
)
from ._sql import (
    ROW_MEMORY,
    Borrowers,
    Column,
    Pair,
    SQLStore,
    check_log_schema,
    check_schema,
    select_columns,
    select_from,
    select_sql,
)
from .logs import Resent, uncounted

logger = logging.getLogger("usage_service.store")

# Text that is not UTF-8 reads with U+FFFD in place of the bad bytes, as the gateway's JSON shows
# it (Go's encoding/json does the same), instead of failing every row read with it. Only for a
# statement whose rows need it (see `_read_rows`): a text factory is a Python call per text value,
# a fifth of what reading the refresher's 10,000 rows a second costs, where SQLite's own decoding
# is done in C.
_TEXT = functools.partial(str, encoding="utf-8", errors="replace")
_UNDECODABLE = "Could not decode to UTF-8"
# What SQLite's json_array says of a BLOB argument.
_NOT_JSON = "JSON cannot hold BLOB values"

# How often to check whether the file at SQLITE_PATH is still the one our connections hold
# (a gateway restore replaces it; open connections would go on reading the old inode).
_IDENTITY_CHECK_INTERVAL = 1.0


class SQLiteStore(SQLStore):
    """Read token records from a new-api SQLite database without ever writing to it."""

    engine = "sqlite"

    # Keys or ids per statement: SQLite allows 32766 variables since 3.32, 999 before.
    fetch_batch = 1000 if sqlite3.sqlite_version_info >= (3, 32, 0) else 900

    def __init__(self, path: Path, *, timeout: float, pool_size: int, rows_kept: int = ROW_MEMORY) -> None:
        super().__init__(pool_size=pool_size, rows_kept=rows_kept)
        self.path = path
        self._locate()
        self._timeout = timeout
        self._idle: asyncio.LifoQueue[aiosqlite.Connection] = asyncio.LifoQueue()
        self._slots = asyncio.Semaphore(pool_size)
        self._borrowers = Borrowers(lambda: self._closed)  # close() waits for them
        self._identity = _file_identity(path)
        self._generation = 0
        self._conn_generation: dict[int, int] = {}
        # Connections reading a WAL database the gateway has closed: the file's (inode, size,
        # mtime) when they opened it. They see no change, so they serve only while it holds.
        self._snapshots: dict[int, tuple[int, int, int]] = {}
        self._snapshot_mode = False
        # Descriptors the header is read through, by (device, inode), kept open until close():
        # closing any descriptor of a file drops every POSIX lock this process holds on it, our
        # SQLite connections' included, which would let the gateway write under their reads.
        self._header_fds: dict[tuple[int, int], int] = {}
        self._spare_fds: list[int] = []
        self.identity_check_interval = _IDENTITY_CHECK_INTERVAL  # tests set 0 to notice a swap at once
        self._checked_at = time.monotonic()
        self._schema_stale = False  # the file was replaced, or a statement missed a column
        self._schema_error: str | None = None  # why no SELECT fits the file, while none does
        self._schema_lock = asyncio.Lock()
        self._closed = False
        # fetch_many reads each statement's rows as one JSON array (SQLite's JSON functions are
        # built in since 3.38; without them, row by row).
        self._json = sqlite3.sqlite_version_info >= (3, 38, 0)
        self._json_select = ""

    @classmethod
    async def open(cls, path: Path, *, timeout: float, pool_size: int, rows_kept: int = ROW_MEMORY) -> SQLiteStore:
        """Open the store, checking that the file is a gateway database; raise SchemaError if not."""
        store = cls(path, timeout=timeout, pool_size=pool_size, rows_kept=rows_kept)
        try:
            await store._read_schema(f"SQLITE_PATH: {str(path)!r}")
        except StoreUnavailable as exc:
            await store.close()
            raise StoreNotReady(f"SQLITE_PATH: cannot read {str(path)!r}: {exc}") from None
        except SchemaError:
            await store.close()
            raise
        return store

    @classmethod
    async def open_logs(cls, path: Path, *, timeout: float, pool_size: int) -> SQLiteStore:
        """Open a file only for its `logs` table (LOG_SQL_DSN), with the same read-only connections;
        raise SchemaError if it has none. Its tokens and users, if any, are never read."""
        store = cls(path, timeout=timeout, pool_size=pool_size)
        where = f"LOG_SQL_DSN: {str(path)!r}"
        try:
            async with store._connection() as conn:
                check_log_schema(await _columns(conn, "logs"), where)
        except StoreUnavailable as exc:
            await store.close()
            raise StoreNotReady(f"{where}: cannot read it: {exc}") from None
        except SchemaError:
            await store.close()
            raise
        return store

    async def _read_schema(self, where: str) -> None:
        """Build the SELECT for the file's columns; raise SchemaError if it is no gateway database."""
        async with self._connection() as conn:
            columns = {table: await _columns(conn, table) for table in ("tokens", "users", "options")}
        self._schema_read_at = time.monotonic()
        check_schema(columns, where)
        select = select_sql(columns["tokens"], columns["users"], '"', fixed_order=True)
        if self._select and select != self._select:
            logger.warning("the columns of %s changed; reading them as they are now", self.path)
        self._select, self._has_options = select, bool(columns["options"])
        if self._json:
            row = ", ".join(select_columns(columns["tokens"], columns["users"], '"'))
            tables = select_from('"', fixed_order=True)
            self._json_select = f"SELECT group_concat(json_array({row}), char(10)) {tables}"

    async def _prepare(self, *, counted: bool = True) -> None:
        # (A failure to read the file's columns is never counted among the errors here.)
        self._check_identity()
        if time.monotonic() - self._schema_read_at >= self.schema_check_interval:
            self._schema_read_at = time.monotonic()  # once, not by every statement meanwhile
            self._schema_stale = True  # columns added in place (a gateway upgraded under us)
        if self._schema_stale:
            async with self._schema_lock:
                if self._schema_stale:
                    self._schema_stale = False
                    try:
                        await self._read_schema("the database file")
                    except StoreUnavailable:
                        self._schema_stale = True  # not read (locked, say): read it next time
                        raise
                    except SchemaError as exc:
                        if self._schema_error is None:
                            logger.error("%s: %s; answering from the caches until it is fixed", self.path, exc)
                        self._schema_error = str(exc)
                    else:
                        if self._schema_error is not None:
                            logger.warning("%s is a gateway database again", self.path)
                        self._schema_error = None
        if self._schema_error is not None:
            raise StoreMisconfigured(self._schema_error)

    async def _read_by_id(self, condition: str, params: Sequence[Any]) -> list[Pair | UnreadableRow]:
        # The refresher reads thousands of rows a second. Row by row, Python's sqlite3 gives up
        # and takes back the GIL for every row, against the event loop's thread serving requests,
        # and builds a tuple of every row: most of a round's cost. Here SQLite writes each row as
        # a line of JSON and the statement's rows as one text value: one handover, and a row
        # that has not changed since it was last read is the same line, found in the row memory
        # without being parsed at all. (JSON text holds no raw newline.)
        if not self._json_select:
            return await super()._read_by_id(condition, params)
        try:
            rows = await self._execute(f"{self._json_select} WHERE {condition} AND {self._live()}", params)
        except _HoldsBlob:
            # A BLOB in one of the columns (a value the gateway never writes): row by row, where
            # the record reader decides what to make of it.
            return await super()._read_by_id(condition, params)
        lines = rows[0][0] if rows else None
        if not lines:
            return []
        try:
            return self._rows.read_lines(lines)
        except orjson.JSONDecodeError:
            # SQLite wrote a value JSON has no form for (an infinite REAL): row by row, where
            # the record reader reads it as it reads junk, and the other rows are read as ever.
            return await super()._read_by_id(condition, params)

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
        await self._borrowers.returned(self._timeout + STATEMENT_GUARD)
        while not self._idle.empty():
            await self._discard(self._idle.get_nowait())
        for fd in [*self._header_fds.values(), *self._spare_fds]:
            os.close(fd)
        self._header_fds.clear()
        self._spare_fds.clear()

    async def _query(
        self, sql: str, params: Sequence[Any], resent: Resent = uncounted, /, *, hash_groups: bool = False
    ) -> Sequence[Sequence[Any]]:
        # SQLite's own busy timeout bounds waiting on the gateway's locks; this outer bound also
        # covers waiting for a free connection and a query that hangs for any other reason.
        try:
            async with asyncio.timeout(self._timeout + STATEMENT_GUARD):
                for _ in range(2):
                    async with self._connection() as conn:
                        try:
                            rows = await self._read_rows(conn, sql, params, resent)
                        except asyncio.CancelledError:
                            await conn.interrupt()
                            raise
                        if self._holds(conn):
                            return rows
                    # The gateway opened the database while a snapshot was read: read it again, live.
        except TimeoutError:
            raise StoreUnavailable("database timed out") from None
        raise StoreUnavailable("the database changed while it was read")

    async def _read_rows(
        self, conn: aiosqlite.Connection, sql: str, params: Sequence[Any], resent: Resent
    ) -> list[Any]:
        try:
            return list(await conn.execute_fetchall(sql, params))
        except sqlite3.OperationalError as exc:
            if str(exc) == _NOT_JSON:
                raise _HoldsBlob from None
            # (The message quotes the text: it may be a key, so it goes nowhere.)
            if not str(exc).startswith(_UNDECODABLE):
                raise
        # Some text is not UTF-8: read the statement again, replacing what cannot be decoded
        # (counted by whoever sent it: a token statement or one of the log's).
        resent()
        conn.text_factory = _TEXT
        try:
            return list(await conn.execute_fetchall(sql, params))
        finally:
            conn.text_factory = str

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[aiosqlite.Connection]:
        if self._closed:
            raise StoreUnavailable("store is closed")
        self._check_identity()
        async with self._slots, self._borrowers.borrowing():
            conn = None
            while not self._idle.empty():
                candidate = self._idle.get_nowait()
                if self._holds(candidate):
                    conn = candidate
                    break
                await self._discard(candidate)
            try:
                if conn is None:
                    conn = await self._connect()
                yield conn
            except sqlite3.Error as exc:
                if "no such" in str(exc):  # a table or column gone: read the schema again
                    self._schema_stale = True
                # A connection that failed for any reason but a lock may be broken (file replaced,
                # disk error): drop it and let the next request open a fresh one.
                if str(exc) == _OVERFLOW:
                    raise StoreDataError(str(exc)) from None
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
        snapshot = self._snapshot_stamp()
        uri = self._uri if snapshot is None else self._uri + "&immutable=1"
        conn = await aiosqlite.connect(uri, uri=True, timeout=self._timeout, isolation_level=None)
        try:
            # Rows stay plain tuples (sqlite3.Row objects would cost the refresher thousands a second).
            await conn.execute("PRAGMA query_only = 1")
        except BaseException:
            await conn.close()
            raise
        self._conn_generation[id(conn)] = self._generation
        if snapshot is not None:
            self._snapshots[id(conn)] = snapshot
        return conn

    def _snapshot_stamp(self) -> tuple[int, int, int] | None:
        """None to open the file as usual; the file's stamp to open it immutable; else raise.

        A reader of a WAL database shares the gateway's -wal and -shm files, and SQLite creates
        them (owned by whoever opens first) when they are missing, even read-only: the gateway,
        running as another user, could then no longer write. When the gateway has the database
        closed (it removes both on its way out) the file itself holds every commit: it is read
        immutable, which creates nothing, for as long as it stays untouched.
        """
        try:
            stat = os.stat(self.path)
            header = os.pread(self._header_fd((stat.st_dev, stat.st_ino)), 20, 0)
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {self.path.name}: {exc.strerror}") from None
        # Bytes 18 and 19 of the header are 2 for WAL, 1 for a rollback journal (which a
        # reader never creates).
        if len(header) < 20 or 2 not in (header[18], header[19]):
            self._note_snapshot_mode(False)
            return None
        wal, shm = self._wal.exists(), self._shm.exists()
        if wal and shm:
            if not (os.access(self._wal, os.R_OK) and os.access(self._shm, os.R_OK)):
                raise StoreMisconfigured(
                    f"{self.path.name} is in WAL mode and this user may not read {self._wal.name} and"
                    f" {self._shm.name}: give it read access to the gateway's -wal and -shm files"
                )
            self._note_snapshot_mode(False)
            return None
        if wal or shm:
            present, missing = (self._wal, self._shm) if wal else (self._shm, self._wal)
            raise StoreMisconfigured(
                f"{self.path.name} is in WAL mode and {present.name} exists without {missing.name}: SQLite"
                f" cannot read it without creating {missing.name}, which this service never does"
                " (the gateway recreates or removes them when it next opens and closes the database)"
            )
        self._note_snapshot_mode(True)
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def _header_fd(self, identity: tuple[int, int]) -> int:
        fd = self._header_fds.get(identity)
        if fd is None:
            fd = os.open(self.path, os.O_RDONLY)
            st = os.fstat(fd)  # the file may have been swapped since it was looked at
            if (st.st_dev, st.st_ino) in self._header_fds:
                self._spare_fds.append(fd)  # not closed: see _header_fds
                fd = self._header_fds[st.st_dev, st.st_ino]
            else:
                self._header_fds[st.st_dev, st.st_ino] = fd
        return fd

    def _note_snapshot_mode(self, snapshot: bool) -> None:
        if snapshot != self._snapshot_mode:
            self._snapshot_mode = snapshot
            if snapshot:
                logger.warning(
                    "%s is in WAL mode and closed by the gateway: reading it as it is (immutable, no"
                    " -wal or -shm file created) until the gateway opens it",
                    self.path,
                )
            else:
                logger.warning("%s is open as usual again", self.path)

    def _holds(self, conn: aiosqlite.Connection) -> bool:
        """Whether a connection still reads the current file, and an immutable one still the truth."""
        if self._conn_generation.get(id(conn)) != self._generation:
            return False
        stamp = self._snapshots.get(id(conn))
        if stamp is None:
            # Opened as usual: still right unless the file has since gone to WAL mode and been
            # closed, -wal and -shm gone with it, which this connection's next read would create.
            return not self._wal_without_its_files()
        # The gateway creates -wal and -shm before its first read or write of a WAL database, and
        # any write to the file itself (a checkpoint, another journal mode) changes its stamp.
        try:
            stat = os.stat(self.path)
        except OSError:
            return False
        unchanged = (stat.st_ino, stat.st_size, stat.st_mtime_ns) == stamp
        return unchanged and not self._shm.exists() and not self._wal.exists()

    def _wal_without_its_files(self) -> bool:
        """Whether the file is in WAL mode without its -wal or -shm, which a read would create."""
        try:
            stat = os.stat(self.path)
            header = os.pread(self._header_fd((stat.st_dev, stat.st_ino)), 20, 0)
        except OSError:
            return False  # gone for now: open connections read the file they opened
        if len(header) < 20 or 2 not in (header[18], header[19]):
            return False
        return not (self._wal.exists() and self._shm.exists())

    async def _discard(self, conn: aiosqlite.Connection) -> None:
        self._conn_generation.pop(id(conn), None)
        self._snapshots.pop(id(conn), None)
        try:
            await conn.close()
        except (sqlite3.Error, ValueError):
            pass
        if len(self._header_fds) > 1:
            self._close_replaced_headers()

    def _close_replaced_headers(self) -> None:
        """Close the header descriptors of files replaced since (each holds a deleted file's disk
        space), once no connection of theirs is left: closing a descriptor drops every POSIX lock
        this process holds on its file, those of a connection still reading it included."""
        if any(generation != self._generation for generation in self._conn_generation.values()):
            return
        current = {self._identity, _file_identity(self.path)}
        for identity in [identity for identity in self._header_fds if identity not in current]:
            os.close(self._header_fds.pop(identity))

    def _locate(self) -> None:
        """Find the file SQLITE_PATH names now, through any symbolic link: the file connections
        open, and where SQLite keeps its -wal and -shm. Looked for beside the link, they were
        never found, and a running gateway's database was read as a closed one (immutable,
        without the commits still in -wal); and a link pointed at a restored file was followed
        only by a restart."""
        resolved = self.path.resolve()
        self._uri = resolved.as_uri() + "?mode=ro&readonly_shm=1"
        self._wal, self._shm = Path(f"{resolved}-wal"), Path(f"{resolved}-shm")

    def _check_identity(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < self.identity_check_interval:
            return
        self._checked_at = now
        if self._schema_error is not None:
            self._schema_stale = True  # the gateway may have migrated the file in place
        identity = _file_identity(self.path)
        if identity is not None and identity != self._identity:
            logger.warning("database file %s was replaced; reopening connections", self.path)
            self._identity = identity
            self._locate()
            self._generation += 1
            self._schema_stale = True  # a restored file may have other columns


class _HoldsBlob(Exception):
    """A row of a JSON statement holds a BLOB (not a database failure: read it another way)."""


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


# What SQLite's SUM says when a running sum of integers passes 64 bits.
_OVERFLOW = "integer overflow"


def _is_busy(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or (
        "locked" in str(exc)
    )


async def _columns(conn: aiosqlite.Connection, table: str) -> set[str]:
    async with conn.execute(f"PRAGMA table_info({table})") as cursor:
        return {row[1] for row in await cursor.fetchall()}
