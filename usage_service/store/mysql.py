"""A MySQL or MariaDB gateway database, through a small pool of read-only asyncmy sessions."""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncmy
from asyncmy.errors import MySQLError

from .._dsn import MySQLDSN
from . import STATEMENT_GUARD, SchemaError, StoreDataError, StoreNotReady, StoreUnavailable
from ._sql import ROW_MEMORY, Borrowers, Column, SQLStore, check_log_schema, check_schema, select_sql
from .logs import LOG_COLUMNS_SQL, Resent, uncounted

logger = logging.getLogger("usage_service.store")

# Seconds a connection may sit idle in the pool before it is closed rather than reused (the
# server drops idle sessions after its wait_timeout; a proxy may do so much sooner).
IDLE_LIFETIME = 60.0

_COLUMNS_SQL = (
    "SELECT TABLE_NAME, COLUMN_NAME FROM information_schema.COLUMNS"
    " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME IN ('tokens', 'users', 'options')"
)


class MySQLStore(SQLStore):
    """Read token records from a new-api MySQL/MariaDB database without ever writing to it."""

    engine = "mysql"

    def __init__(self, dsn: MySQLDSN, *, timeout: float, pool_size: int, rows_kept: int = ROW_MEMORY) -> None:
        super().__init__(pool_size=pool_size, rows_kept=rows_kept)
        self.dsn = dsn
        self._timeout = timeout
        self._idle: list[tuple[asyncmy.Connection, float]] = []  # (connection, idle since), newest last
        self._slots = asyncio.Semaphore(pool_size)
        self._borrowers = Borrowers(lambda: self._closed)  # close() waits for them
        self._closed = False
        # `tls=preferred` on a server that offers no TLS: plain text, as the gateway's driver does.
        self._tls = dsn.tls

    @classmethod
    async def open(cls, dsn: MySQLDSN, *, timeout: float, pool_size: int, rows_kept: int = ROW_MEMORY) -> MySQLStore:
        """Connect, check that the database is a gateway's; raise SchemaError if not."""
        store = cls(dsn, timeout=timeout, pool_size=pool_size, rows_kept=rows_kept)
        await store._start(f"SQL_DSN: {dsn.describe()}", store._check_tables)
        return store

    @classmethod
    async def open_logs(cls, dsn: MySQLDSN, *, timeout: float, pool_size: int) -> MySQLStore:
        """Connect only for the `logs` table (LOG_SQL_DSN), in the same read-only sessions; raise
        SchemaError if the database has none."""
        store = cls(dsn, timeout=timeout, pool_size=pool_size)
        await store._start(f"LOG_SQL_DSN: {dsn.describe()}", store._check_logs)
        return store

    async def _start(self, where: str, check: Callable[[str], Awaitable[None]]) -> None:
        try:
            await check(where)
        except StoreUnavailable as exc:
            await self.close()
            raise StoreNotReady(f"{where}: cannot read it: {exc}") from None
        except SchemaError:
            await self.close()
            raise

    async def _read_select(self, where: str = "SQL_DSN") -> str:
        rows = await self._query(_COLUMNS_SQL, ())
        columns: dict[str, set[str]] = {"tokens": set(), "users": set(), "options": set()}
        for table, column in rows:
            columns[str(table).lower()].add(str(column).lower())
        check_schema(columns, where, server=True)
        self._has_options = bool(columns["options"])
        return select_sql(columns["tokens"], columns["users"], "`")

    async def _check_logs(self, where: str) -> None:
        rows = await self._query(LOG_COLUMNS_SQL["mysql"], ())
        check_log_schema({str(column).lower() for (column,) in rows}, where, server=True)
        await self._query("SELECT `id` FROM `logs` LIMIT 0", ())  # proves the GRANT

    def _match(self, column: Column, values: Sequence[Any]) -> tuple[str, Sequence[Any]]:
        return f"t.`{column}` IN ({', '.join(['%s'] * len(values))})", tuple(values)

    def _live(self) -> str:
        return "t.`deleted_at` IS NULL"

    def _options_probe(self) -> str:
        return "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'options'"

    def _options_sql(self, keys: Sequence[str]) -> tuple[str, Sequence[Any]]:
        return f"SELECT `key`, `value` FROM `options` WHERE `key` IN ({', '.join(['%s'] * len(keys))})", tuple(keys)

    async def _query(
        self, sql: str, params: Sequence[Any], resent: Resent = uncounted, /, *, hash_groups: bool = False
    ) -> Sequence[Sequence[Any]]:
        try:
            # Bounds waiting for a free connection, connecting and the statement(s) together.
            async with asyncio.timeout(self._timeout + STATEMENT_GUARD):
                try:
                    return await self._fetch(sql, params)
                except _ConnectionLost:
                    # A pooled connection the server dropped (restart, failover, wait_timeout):
                    # it has been discarded, and the others pooled with it most likely went the
                    # same way (asyncmy does not notice until it writes): one more try, on a
                    # fresh one.
                    self._drop_idle()
                    return await self._fetch(sql, params)
        except TimeoutError:
            raise StoreUnavailable("database timed out") from None

    async def _fetch(self, sql: str, params: Sequence[Any]) -> Sequence[Sequence[Any]]:
        async with self._connection() as conn:
            async with conn.cursor() as cursor:
                await cursor.execute(sql, tuple(params) or None)
                rows: Sequence[Sequence[Any]] = await cursor.fetchall()
                return rows

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncmy.Connection]:
        if self._closed:
            raise StoreUnavailable("store is closed")
        async with self._slots, self._borrowers.borrowing():
            conn = self._take_idle()
            fresh = None
            try:
                if conn is None:
                    conn = fresh = await self._connect()
                yield conn
            except (MySQLError, OSError, EOFError) as exc:
                # Whatever failed, the session may be unusable (dropped, mid-result): never reuse it.
                self._discard(conn)
                reused, conn = conn is not None and conn is not fresh, None
                if reused and _is_connection_lost(exc):
                    raise _ConnectionLost(_reason(exc)) from None
                if isinstance(exc, MySQLError) and exc.args and exc.args[0] in _OUT_OF_RANGE:
                    raise StoreDataError(_reason(exc)) from None
                raise StoreUnavailable(_reason(exc)) from None
            except BaseException:
                # Cancelled or timed out mid-statement: the protocol state is unknown.
                self._discard(conn)
                conn = None
                raise
            finally:
                if conn is not None:
                    if self._closed:
                        self._discard(conn)
                    else:
                        self._idle.append((conn, time.monotonic()))

    def _drop_idle(self) -> None:
        while self._idle:
            self._discard(self._idle.pop()[0])

    def _take_idle(self) -> asyncmy.Connection | None:
        now = time.monotonic()
        while self._idle:
            conn, since = self._idle.pop()
            if now - since < IDLE_LIFETIME and conn.connected:
                return conn
            self._discard(conn)
        return None

    async def _connect(self) -> asyncmy.Connection:
        conn = self._new_connection(self._tls)
        try:
            await _login(conn)
        except MySQLError:
            # The driver asks for TLS whatever the server offers, where the gateway's driver, with
            # `preferred`, asks only a server whose greeting offers it: a login that failed on a
            # server that offers none is made again without. (A server that offers TLS and fails
            # the handshake is an error, never a reason to go without.)
            if self._tls != "preferred" or _offered_tls(conn):
                raise
            logger.warning(
                "%s: tls=preferred and the server offers no TLS: connecting without it, as the gateway's driver does",
                self.dsn.describe(),
            )
            self._tls = "false"
            conn = self._new_connection(self._tls)
            await _login(conn)
        return await self._session(conn)

    def _new_connection(self, tls: str) -> asyncmy.Connection:
        """A connection to the database, not yet made."""
        dsn = self.dsn
        try:
            return asyncmy.Connection(  # type: ignore[no-untyped-call]
                host=dsn.host,
                port=dsn.port,
                unix_socket=dsn.unix_socket,
                user=dsn.user,
                # As UTF-8, as the gateway's driver sends it (asyncmy would send a text as Latin-1:
                # a password with 'é' would not match, one with '€' would not even be sent).
                password=dsn.password.encode(errors="surrogateescape"),
                database=dsn.database or None,
                charset=dsn.charset,
                connect_timeout=max(1, math.ceil(dsn.connect_timeout or max(self._timeout, 1.0))),
                read_timeout=self._timeout + 1.0,
                ssl=_ssl_context(tls),
                # Each statement its own transaction: every read sees the gateway's latest commits.
                autocommit=True,
            )
        except Exception as exc:  # the driver's own checks (a charset it does not know)
            raise _driver_failure(exc) from None

    async def _session(self, conn: asyncmy.Connection) -> asyncmy.Connection:
        """Make a new connection's session read-only and bounded in time."""
        try:
            async with conn.cursor() as cursor:
                # Every transaction of this session is read-only: the server refuses any write.
                await cursor.execute("SET SESSION TRANSACTION READ ONLY")
                # Waiting on a table lock (a gateway migration) gives up in time...
                await cursor.execute(f"SET SESSION lock_wait_timeout = {max(1, math.ceil(self._timeout))}")
                # ...and so does any statement: MariaDB counts seconds, MySQL milliseconds.
                await cursor.execute("SELECT VERSION()")
                (version,) = await cursor.fetchone()
                if "mariadb" in str(version).lower():
                    await cursor.execute(f"SET SESSION max_statement_time = {self._timeout:.3f}")
                else:
                    await cursor.execute(f"SET SESSION max_execution_time = {max(1, round(self._timeout * 1000))}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _discard(self, conn: asyncmy.Connection | None) -> None:
        if conn is not None:
            conn.close()  # closes the socket at once, no round trip

    async def close(self) -> None:
        self._closed = True
        await self._borrowers.returned(self._timeout + STATEMENT_GUARD)
        while self._idle:
            conn, _ = self._idle.pop()
            try:
                async with asyncio.timeout(1.0):
                    await conn.ensure_closed()
            except (MySQLError, OSError, TimeoutError):
                conn.close()


class _ConnectionLost(StoreUnavailable):
    """A pooled connection turned out to be dead; a fresh one may well work."""


# Client-side errors for a session the server has closed: gone away, lost during a query.
_LOST_ERRNOS = {2006, 2013, 2055}


def _is_connection_lost(exc: BaseException) -> bool:
    if isinstance(exc, OSError | EOFError):
        return True
    return bool(exc.args) and exc.args[0] in _LOST_ERRNOS


_CLIENT_SSL = 0x0800  # the capability flag a server that offers TLS sets in its greeting


async def _login(conn: asyncmy.Connection) -> None:
    try:
        await conn.connect()
    except (MySQLError, OSError, EOFError):
        raise
    except Exception as exc:  # the driver's own (an authentication plugin it cannot run: KeyError, say)
        raise _driver_failure(exc) from None


def _driver_failure(exc: Exception) -> StoreUnavailable:
    """The driver's own failures (an authentication plugin it cannot run, a charset it does not
    know): the database cannot be read, said in one line without the DSN."""
    return StoreUnavailable(f"cannot connect ({type(exc).__name__}: {exc})")


def _offered_tls(conn: asyncmy.Connection) -> bool:
    """Whether the server's greeting offered TLS; True when no greeting was read (nothing told)."""
    capabilities = getattr(conn, "server_capabilities", None)
    return capabilities is None or bool(capabilities & _CLIENT_SSL)


def _ssl_context(tls: str) -> ssl.SSLContext | None:
    if tls == "false":
        return None
    context = ssl.create_default_context()
    if tls != "true":  # skip-verify, preferred: encrypted, certificate not checked (as the Go driver)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# ER_DATA_OUT_OF_RANGE ("BIGINT value is out of range in …"), ER_WARN_DATA_OUT_OF_RANGE.
_OUT_OF_RANGE = (1690, 1264)


def _reason(exc: BaseException) -> str:
    args: tuple[Any, ...] = exc.args
    if isinstance(exc, MySQLError) and len(args) == 2:
        return f"({args[0]}) {args[1]}"
    return str(exc) or type(exc).__name__
