"""Where the gateway's request log is read: `LogReader`, one read statement at a time.

The log lives in the gateway's main database unless LOG_SQL_DSN names another one. Either
way the history and log routes see a `LogReader`: it runs a read statement written with `?`
placeholders and identifiers quoted by `q()`, on whichever engine holds the log, and counts
what it sent, apart from the token statements (the balance's cost and the log's are reported
separately).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .._dsn import MySQLDSN, PostgresDSN
from ..config import Settings
from . import SchemaError, StoreDataError, StoreMisconfigured, StoreUnavailable

if TYPE_CHECKING:
    from . import TokenStore
    from ._sql import SQLStore

logger = logging.getLogger("usage_service.store.logs")

# The log's columns everything built on it reads; the other columns GET /api/log/token shows are
# read where the table has them.
LOG_REQUIRED = frozenset(
    {"id", "token_id", "created_at", "type", "model_name", "quota", "prompt_tokens", "completion_tokens"}
)

# The statement naming the log table's columns on each engine (no rows: there is no such table).
LOG_COLUMNS_SQL: dict[str, str] = {
    "sqlite": "SELECT name FROM pragma_table_info('logs')",
    "postgres": "SELECT a.attname FROM pg_catalog.pg_attribute AS a"
    " WHERE a.attrelid = to_regclass('logs') AND a.attnum > 0 AND NOT a.attisdropped",
    "mysql": "SELECT COLUMN_NAME FROM information_schema.COLUMNS"
    " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'logs'",
}

# Seconds between two looks at the log table's columns (a gateway upgraded in place adds some).
LOG_COLUMNS_CHECK = 60.0

Engine = Literal["sqlite", "postgres", "mysql"]
# Called once for every statement a store sends beyond the one it was asked to run (SQLite sends
# one again to read text that is not UTF-8): its sender counts it as one of its own.
Resent = Callable[[], None]


class Run(Protocol):
    """How a LogReader sends one statement: its store's `_query`.

    `hash_groups`: the statement groups a range of rows; group them by hashing rather than by
    sorting them (on PostgreSQL; the other engines choose alone). PostgreSQL's planner misjudges
    how many of a month's rows are one token's, sorts them, and a cold month's sort spills to
    temporary files on the gateway's server; hashed, its groups (days by models) fit in memory.
    """

    def __call__(
        self, sql: str, params: Sequence[Any], resent: Resent, /, *, hash_groups: bool = False
    ) -> Awaitable[Sequence[Sequence[Any]]]: ...


def uncounted() -> None:
    """The `Resent` of a statement no counter reports (a look at the columns, a readiness probe)."""


# Seconds between attempts to open a log database that could not be opened: a request for the
# log while it is down costs no connection attempt within this interval.
REOPEN_INTERVAL = 5.0

# Seconds between two looks, on PostgreSQL, for an index of the log in token order (an operator
# may create one, or drop it, while the service runs).
TOKEN_ORDER_CHECK = 300.0

# An index of PostgreSQL's logs whose leading columns are (token_id, id), in any order direction.
_TOKEN_ORDER_INDEX = (
    "SELECT 1 FROM pg_catalog.pg_indexes WHERE schemaname = current_schema() AND tablename = 'logs'"
    " AND (indexdef LIKE '%(token_id, id)%' OR indexdef LIKE '%(token_id, id DESC)%'"
    " OR indexdef LIKE '%(token_id, id,%' OR indexdef LIKE '%(token_id, id DESC,%')"
)


class LogReader:
    """Read statements against the database holding the `logs` table, in any engine's dialect."""

    def __init__(
        self,
        run: Run,
        engine: Engine,
        *,
        close: Callable[[], Awaitable[None]] | None = None,
        separate: bool = False,
        clock: Callable[[], float] = time.monotonic,
        share: int | None = None,
        share_wait: float = math.inf,
    ) -> None:
        self._run = run
        # At most `share` of the log's statements at once, each waiting at most `share_wait`
        # seconds for its turn: set when the log is read through the token store's connections,
        # so that a burst of history and log reads leaves the rest to the balance's lookups.
        self._share = None if share is None else asyncio.Semaphore(share)
        self._share_wait = share_wait
        self.engine: Engine = engine
        self._close = close  # set when the reader owns its connections (LOG_SQL_DSN)
        self.separate = separate  # the log is in a database of its own (LOG_SQL_DSN), reported by /readyz
        self.statements = 0  # statements sent to read the log since start
        self.errors = 0
        self.busy = 0  # statements not sent: their turn did not come within share_wait
        self._failing = False
        self._clock = clock
        self._token_order = False  # what the last look for an index in token order found
        self._token_order_seen = -math.inf  # when that look was
        self._columns: frozenset[str] | None = None  # what the last look at the table's columns found
        self._columns_seen = -math.inf

    def q(self, name: str) -> str:
        """An identifier quoted for the engine (`group` is a reserved word on all three)."""
        return f"`{name}`" if self.engine == "mysql" else f'"{name}"'

    def sql(self, text: str) -> str:
        """Turn `?` placeholders into the engine's own (`$1`.. on PostgreSQL, `%s` on MySQL).

        Statements are ours: no `?` (nor, on MySQL, `%`) appears in them but as a placeholder;
        values always travel as parameters.
        """
        if self.engine == "sqlite":
            return text
        if self.engine == "mysql":
            return text.replace("?", "%s")
        parts = text.split("?")
        return "".join(part + (f"${i}" if i < len(parts) else "") for i, part in enumerate(parts, start=1))

    async def query(
        self, text: str, params: Sequence[Any] = (), *, hash_groups: bool = False
    ) -> Sequence[Sequence[Any]]:
        """Run one read statement (written with `?`); raise StoreUnavailable if the database
        cannot answer. `hash_groups`: see `Run`."""
        if self._share is None:
            return await self._send(text, params, hash_groups)
        try:
            async with asyncio.timeout(self._share_wait):
                await self._share.acquire()
        except TimeoutError:
            self.busy += 1
            raise StoreUnavailable("the log's share of the database connections is busy") from None
        try:
            return await self._send(text, params, hash_groups)
        finally:
            self._share.release()

    async def _send(self, text: str, params: Sequence[Any], hash_groups: bool) -> Sequence[Sequence[Any]]:
        self.statements += 1
        try:
            rows = await self._run(self.sql(text), params, self._resent, hash_groups=hash_groups)
        except StoreDataError:
            raise  # the values read, not the database: whoever sent it knows what to do
        except StoreUnavailable as exc:
            self.errors += 1
            if not self._failing:
                self._failing = True
                logger.warning("log database unavailable: %s", exc)
            raise
        if self._failing:
            self._failing = False
            logger.warning("log database answers again")
        return rows

    def _resent(self) -> None:
        self.statements += 1

    async def token_order(self) -> bool:
        """Whether the log has an index on (token_id, id), which a token's rows of an id range
        are one range of. Looked for on PostgreSQL only, at most every TOKEN_ORDER_CHECK seconds
        (not counted among the log's statements): on SQLite and InnoDB the gateway's token
        index carries the row id already."""
        if self.engine != "postgres":
            return False
        now = self._clock()
        if now - self._token_order_seen >= TOKEN_ORDER_CHECK:
            self._token_order_seen = now  # one look at a time, and one per interval if it fails
            with contextlib.suppress(StoreUnavailable):  # what was last seen holds until a look succeeds
                await self.look_for_token_order()
        return self._token_order

    async def columns(self) -> frozenset[str]:
        """The log table's columns (lower case), looked at again at most every LOG_COLUMNS_CHECK
        seconds (not counted among the log's statements); StoreMisconfigured, naming what is
        missing, while the table lacks one of LOG_REQUIRED. Until a look succeeds, StoreUnavailable."""
        now = self._clock()
        if self._columns is None or now - self._columns_seen >= LOG_COLUMNS_CHECK:
            self._columns_seen = now  # one look per interval, if it fails too
            try:
                rows = await self._run(LOG_COLUMNS_SQL[self.engine], (), uncounted)
            except StoreUnavailable:
                if self._columns is None:
                    raise
            else:
                self._columns = frozenset(str(column).lower() for (column,) in rows)
        if not self._columns:
            raise StoreMisconfigured("the gateway's database has no logs table")
        missing = LOG_REQUIRED - self._columns
        if missing:
            raise StoreMisconfigured(f"the gateway's logs table lacks columns {', '.join(sorted(missing))}")
        return self._columns

    async def look_for_token_order(self) -> bool:
        """token_order's look, now; raise StoreUnavailable if the database cannot answer."""
        self._token_order = bool(await self._run(_TOKEN_ORDER_INDEX, (), uncounted))
        self._token_order_seen = self._clock()
        return self._token_order

    async def ping(self) -> None:
        """Raise StoreUnavailable (StoreMisconfigured, with the reason, if it cannot be opened)
        unless the log table can be read now. Not counted among the log's statements."""
        await self._run(f"SELECT 1 FROM {self.q('logs')} LIMIT 1", (), uncounted)

    async def close(self) -> None:
        if self._close is not None:
            await self._close()


async def open_log_reader(settings: Settings, store: TokenStore) -> LogReader:
    """The reader of the database LOG_SQL_DSN names, or of the main one (`store`) without it.

    A log database that cannot be opened does not fail start-up: the balance routes need only
    the main database. It is named in one log line, reported by /readyz, answered 503 by the
    log routes, and tried again (at most every REOPEN_INTERVAL seconds) when the log is asked for.
    """
    target = settings.log_database
    if target is None or target == (settings.database or settings.sqlite_path):
        reader = store.log_reader()  # the same database: the same connections
        await _say_what_the_log_lacks(reader)
    else:
        database = _LogDatabase(target, settings)
        await database.open()
        reader = LogReader(database.run, database.engine, close=database.close, separate=True)
    if reader.engine == "postgres":
        await _advise_token_order_index(reader)
    return reader


async def _say_what_the_log_lacks(reader: LogReader) -> None:
    """Say once, at start, when the main database's log lacks what its routes read (a log
    database of its own is checked as it is opened)."""
    try:
        await reader.columns()
    except StoreMisconfigured as exc:
        logger.error("%s: the history and log routes answer 503 (the balance routes are not affected)", exc)
    except StoreUnavailable:
        pass  # said elsewhere


async def _advise_token_order_index(reader: LogReader) -> None:
    """Say once, at start, when PostgreSQL's log lacks an index giving a token's rows in id order.

    The gateway indexes token_id alone, which on PostgreSQL (unlike SQLite and InnoDB) does not
    carry the row id: a token's newest rows are then found by sorting all of the token's rows, or
    by walking the primary key backwards past other tokens' rows (long for a token whose rows are
    all old), and a month of its spending by reading every token's rows of that month. The
    service never creates anything; an operator may, and the service uses it once it sees it.
    """
    try:
        if await reader.look_for_token_order():
            return
    except StoreUnavailable:
        return  # said elsewhere; the advice can wait for the next start
    logger.warning(
        "the log table has no index on (token_id, id): on PostgreSQL a token's newest log rows and a"
        " month of its spending cost a long walk of the table; CREATE INDEX CONCURRENTLY"
        " idx_logs_token_id_id ON logs (token_id, id) makes each read one index range (docs/databases.md)"
    )


class _LogDatabase:
    """The database LOG_SQL_DSN names, opened read-only in the engine stores' "logs only" mode."""

    def __init__(
        self, target: PostgresDSN | MySQLDSN | Path, settings: Settings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.target = target
        self.settings = settings
        self.engine: Engine = (
            "postgres" if isinstance(target, PostgresDSN) else "mysql" if isinstance(target, MySQLDSN) else "sqlite"
        )
        self._clock = clock
        self._store: SQLStore | None = None
        self._reason: str | None = None  # why it could not be opened, while it cannot
        self._tried_at = -math.inf
        self._lock = asyncio.Lock()
        self._closed = False

    async def open(self) -> None:
        """Try to open the database; on failure keep (and log, the first time) the reason."""
        self._tried_at = self._clock()
        try:
            self._store = await self._open()
        except SchemaError as exc:  # its message names LOG_SQL_DSN and where, never a password
            if str(exc) != self._reason:
                logger.error(
                    "%s; the log routes answer 503 until it can be read (the balance routes are not affected)", exc
                )
            self._reason = str(exc)
            return
        if self._reason is not None:
            logger.warning("the log database (LOG_SQL_DSN) can be read now")
            self._reason = None

    async def _open(self) -> SQLStore:
        timeout, pool_size = self.settings.db_timeout, self.settings.db_pool_size
        # Imported here: each engine's driver loads only where that engine runs.
        if isinstance(self.target, PostgresDSN):
            from .postgres import PostgresStore

            return await PostgresStore.open_logs(self.target, timeout=timeout, pool_size=pool_size)
        if isinstance(self.target, MySQLDSN):
            from .mysql import MySQLStore

            return await MySQLStore.open_logs(self.target, timeout=timeout, pool_size=pool_size)
        from .sqlite import SQLiteStore

        return await SQLiteStore.open_logs(self.target, timeout=timeout, pool_size=pool_size)

    async def run(
        self, sql: str, params: Sequence[Any], resent: Resent, /, *, hash_groups: bool = False
    ) -> Sequence[Sequence[Any]]:
        store = self._store
        if store is None:
            store = await self._reopen()
        return await store._query(sql, params, resent, hash_groups=hash_groups)

    async def _reopen(self) -> SQLStore:
        async with self._lock:  # one attempt at a time, however many requests ask
            if self._store is None and not self._closed and self._clock() - self._tried_at >= REOPEN_INTERVAL:
                await self.open()
            if self._store is None:
                raise StoreMisconfigured(self._reason or "LOG_SQL_DSN: the log database is closed")
            return self._store

    async def close(self) -> None:
        self._closed = True
        if self._store is not None:
            await self._store.close()
