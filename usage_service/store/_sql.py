"""What every engine shares: the gateway's columns, the one SELECT, rows into records.

Each engine module supplies a connection pool, its parameter style and identifier quoting;
`SQLStore` gives them the same fetch, fetch_many and ping, so the three engines answer alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Literal, TypeVar

import orjson

from .._batch import Batcher
from .._lru import keep_newest
from ..cache import key_digest
from ..records import INT64_MAX, INT64_MIN, TokenRecord, as_bool, as_int, parse_model_limits
from . import STATEMENT_GUARD, SchemaError, StoreUnavailable, UnreadableRow
from .logs import LOG_REQUIRED, Engine, LogReader, Resent, uncounted

logger = logging.getLogger("usage_service.store")

# Columns we cannot do without; older gateways (one-api) lack the model-limit columns, which
# then read as "no limits".
REQUIRED = {
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
OPTIONAL_TOKEN_COLUMNS = ("model_limits_enabled", "model_limits")
# The owner's balance (billing routes); one-api era users tables may lack used_quota.
OPTIONAL_USER_COLUMNS = {"quota": "user_quota", "used_quota": "user_used_quota"}

# Rows fetch_many remembers, to hand back the same record for an unchanged row: at least this
# many, and at least a whole refresh round's (see rows_kept).
ROW_MEMORY = 50_000

# How often (seconds) the tables' columns are looked at again: a gateway upgraded in place adds
# columns (the model limits, coming from one-api) that would otherwise be read only after a restart.
SCHEMA_CHECK_INTERVAL = 60.0

# A token whose row cannot be read is logged at most this often (seconds), however often it is asked for.
UNREADABLE_LOG_INTERVAL = 60.0

Column = Literal["id", "key"]


def check_schema(columns: dict[str, set[str]], where: str, *, server: bool = False) -> None:
    """Raise SchemaError unless both tables are there with the columns we read."""
    for table, needed in REQUIRED.items():
        if not columns.get(table):
            # A server hides the tables a user has no privilege on.
            hint = f" (or the user has no SELECT on {table})" if server else ""
            raise SchemaError(f"{where} has no {table} table{hint}; is it new-api's database?")
        missing = needed - columns[table]
        if missing:
            raise SchemaError(f"{where}: table {table} lacks columns {', '.join(sorted(missing))}")


def check_log_schema(columns: set[str], where: str, *, server: bool = False) -> None:
    """Raise SchemaError unless the database has the gateway's `logs` table with the columns we read."""
    if not columns:
        hint = " (or the user has no SELECT on logs)" if server else ""
        raise SchemaError(f"{where} has no logs table{hint}; is it the gateway's log database?")
    missing = LOG_REQUIRED - columns
    if missing:
        raise SchemaError(f"{where}: table logs lacks columns {', '.join(sorted(missing))}")


def select_sql(token_columns: set[str], user_columns: set[str], quote: str, *, fixed_order: bool = False) -> str:
    """The SELECT of a token joined with its live user, identifiers quoted with `quote`.

    `key` and `group` are reserved words on MySQL and PostgreSQL: every identifier is quoted,
    with backticks on MySQL and double quotes elsewhere. `fixed_order` (SQLite, which plans
    without statistics) reads the tokens first, by key or id, then each one's user by primary
    key: CROSS JOIN fixes the order there, and + keeps the users' deleted_at index out of it.
    """
    columns = select_columns(token_columns, user_columns, quote)
    return f"SELECT {', '.join(columns)} {select_from(quote, fixed_order=fixed_order)}"


def select_columns(token_columns: set[str], user_columns: set[str], quote: str) -> list[str]:
    """The columns `row_record` reads, in its order; a column the database lacks reads as a constant."""

    def q(name: str) -> str:
        return f"{quote}{name}{quote}"

    optional = [f"t.{q(c)}" if c in token_columns else "NULL" for c in OPTIONAL_TOKEN_COLUMNS]
    user = [f"u.{q(c)}" if c in user_columns else "0" for c in OPTIONAL_USER_COLUMNS]
    # Only the columns we need.
    names = ("id", "key", "user_id", "name", "status", "expired_time", "remain_quota", "used_quota", "unlimited_quota")
    return [*(f"t.{q(c)}" for c in names), *optional, f"u.{q('status')}", *user]


def select_from(quote: str, *, fixed_order: bool = False) -> str:
    """FROM the tokens joined with their live users: the join drops a token whose user is
    missing or soft-deleted, which the contract treats exactly like a missing token."""

    def q(name: str) -> str:
        return f"{quote}{name}{quote}"

    return (
        f"FROM {q('tokens')} AS t {'CROSS JOIN' if fixed_order else 'JOIN'} {q('users')} AS u "
        f"ON u.{q('id')} = t.{q('user_id')} AND {'+' if fixed_order else ''}u.{q('deleted_at')} IS NULL"
    )


def row_key(row: Sequence[Any]) -> str:
    """The key column of a row; a char(48) column on PostgreSQL comes back blank-padded."""
    key = row[1]
    if isinstance(key, bytes):
        key = key.decode(errors="replace")
    return key.rstrip(" ") if isinstance(key, str) else str(key)


def row_record(row: Sequence[Any]) -> TokenRecord:
    """Build a record from a row of `select_sql`, whatever types the engine gave the columns.

    Raise ValueError for a row no record can hold: a number beyond 64 bits (which the gateway,
    reading it into a Go int, fails on too).
    """
    # The refresher builds thousands of these a second: take the common column types as they
    # come and fall back to the careful readers only for odd values (bool on PostgreSQL,
    # 'true'/'false' text in some old databases, Decimal or bytes from MySQL).
    tid, uid, name, status, expired, remain, used = row[0], row[2], row[3], row[4], row[5], row[6], row[7]
    unlimited, enabled, limits, user_status = row[8], row[9], row[10], row[11]
    user_quota, user_used = row[12], row[13]
    # Text that is not UTF-8 reads with U+FFFD in its place: what the gateway's JSON shows.
    if isinstance(limits, bytes):
        limits = limits.decode(errors="replace")
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    record = TokenRecord(
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
    # Out of range, a record could be neither cached (the cached form holds int64) nor rendered.
    numbers = (record.id, record.user_id, record.status, record.expired_time, record.remain_quota)
    for value in (*numbers, record.used_quota, record.user_status, record.user_quota, record.user_used_quota):
        if not INT64_MIN <= value <= INT64_MAX:
            raise ValueError(f"{value} does not fit in 64 bits")
    return record


Pair = tuple[bytes, TokenRecord]  # (the digest of the row's key, its record)
F = TypeVar("F", str, tuple[Any, ...])


def read_row(values: Sequence[Any]) -> Pair | UnreadableRow:
    """(key digest, record) of a row of `select_sql`, or why no record can be made of it."""
    try:
        return key_digest(row_key(values).encode()), row_record(values)
    except (ValueError, TypeError) as exc:  # this row alone: the others are read
        token_id = as_int(values[0])
        return UnreadableRow(token_id, str(exc))


class RowMemory:
    """The rows fetch_many read lately, each with what was made of it.

    The refresher re-reads the same rows every second and most have not changed: a row read
    again unchanged gives back the same (key digest, record) pair, built once. A row holds its
    token's key, which is never kept: rows are remembered by a digest of their form (a tuple of
    values, or a whole row's text), most recently read last.
    """

    def __init__(self, size: int = ROW_MEMORY) -> None:
        self.size = size
        self._pairs: dict[bytes, Pair | UnreadableRow] = {}
        # Whole statements' answers (one JSON line a row, see SQLiteStore), by a digest of their
        # text: an answer read again unchanged, what most refresh rounds read, is not even split.
        self._answers: dict[bytes, list[Pair | UnreadableRow]] = {}

    def read(self, form: F, values: Callable[[F], Sequence[Any]]) -> Pair | UnreadableRow:
        """What `form` reads as, `values(form)` giving its values when it was not read lately."""
        seen = _form_digest(form)
        pair = self._pairs.pop(seen, None)
        if pair is None:
            pair = read_row(values(form))
        self._pairs[seen] = pair
        return pair

    def read_lines(self, lines: str) -> list[Pair | UnreadableRow]:
        """What a statement's rows, one JSON line each, read as: `read` line by line, unless
        the very same text was read lately."""
        seen = _form_digest(lines)
        pairs = self._answers.pop(seen, None)
        if pairs is None:
            remember = self.read
            pairs = [remember(line, orjson.loads) for line in lines.split("\n")]
        self._answers[seen] = pairs
        return pairs

    def trim(self) -> None:
        self._pairs = keep_newest(self._pairs, self.size)
        # A statement reads at most a thousand rows: this many answers hold no more rows than _pairs.
        self._answers = keep_newest(self._answers, self.size // 1000)


class Borrowers:
    """The reads holding a pooled store's connections, for its close() to wait for.

    A read whose callers were cancelled goes on (a batch shared with others, a round stopped at
    shutdown) and comes back after close(): waited for, within its statement's bound, its
    connection is closed with the others rather than outliving the store (an aiosqlite thread
    past the event loop, a session left on the database server).
    """

    def __init__(self, closed: Callable[[], bool]) -> None:
        self._closed = closed
        self._count = 0
        self._none = asyncio.Event()

    @asynccontextmanager
    async def borrowing(self) -> AsyncIterator[None]:
        """Count a read holding a connection (entered once it has its slot)."""
        if self._closed():  # closed while it waited for a slot
            raise StoreUnavailable("store is closed")
        self._count += 1
        self._none.clear()
        try:
            yield
        finally:
            self._count -= 1
            if not self._count:
                self._none.set()

    async def returned(self, within: float) -> None:
        """Wait, at most `within` seconds, until no read holds a connection."""
        if self._count:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await self._none.wait()


def rows_kept(hot_max: int) -> int:
    """How many rows a store remembers when the refresher keeps up to `hot_max` tokens fresh.

    A round re-reads every hot token's row, oldest remembered first: a memory that holds less
    than a round (and the tenth that trimming drops) would have forgotten each row by the time
    it is read again, and never find one. So: a round and a quarter more, ROW_MEMORY at least.
    """
    return max(ROW_MEMORY, hot_max + hot_max // 4)


def _form_digest(form: str | tuple[Any, ...]) -> bytes:
    if isinstance(form, str):
        text = form.encode(errors="surrogatepass")
    else:
        try:  # the values as JSON; decimals, bytes and the like as [their repr], apart from any text
            text = orjson.dumps(form, default=_tagged)
        except orjson.JSONEncodeError:  # an integer past 64 bits, say: repr tells every value apart
            text = repr(form).encode(errors="surrogatepass")
    # SHA-256: a whole statement's answer is some 200 KB, which it digests at twice BLAKE2's speed
    # on CPUs with SHA extensions.
    return hashlib.sha256(text).digest()


def _tagged(value: object) -> list[str]:
    return [repr(value)]


class SQLStore(ABC):
    """fetch, fetch_many and ping for an engine that supplies `_query` and `_match`."""

    fetch_batch = 1000  # keys or ids per statement
    engine: ClassVar[Engine]

    _timeout: float  # seconds a statement may wait on the database (each engine's store sets it)

    def __init__(self, *, pool_size: int, rows_kept: int = ROW_MEMORY) -> None:
        self.pool_size = pool_size  # connections at most
        self._in_flight = 0  # statements holding or awaiting a connection (see spare_connections)
        self.statements = 0
        self.option_statements = 0
        self.errors = 0  # statements that failed or timed out (metrics)
        self._has_options = False  # whether the gateway's options table was there when last looked
        self._said_no_options = False
        self._select = ""  # set once the schema has been read
        self.schema_check_interval = SCHEMA_CHECK_INTERVAL  # tests set 0 to look at every statement
        self._schema_read_at = time.monotonic()  # the openers read it
        self._rows = RowMemory(rows_kept)
        self._failing = False
        self._unreadable_logged: dict[object, float] = {}  # token id -> when its unreadable row was last logged
        # Concurrent misses for different keys share one statement per free connection.
        self._by_key: Batcher[str, TokenRecord | UnreadableRow] = Batcher(
            self._fetch_keys,
            max_batch=self.fetch_batch,
            slots=pool_size,
            expected=(StoreUnavailable,),
            what="a read of tokens by key",
        )

    @abstractmethod
    async def _query(
        self, sql: str, params: Sequence[Any], resent: Resent = uncounted, /, *, hash_groups: bool = False
    ) -> Sequence[Sequence[Any]]:
        """Run one read statement; raise StoreUnavailable if the database cannot answer.

        The caller counts the statement; `resent` is called for each further one sent for it
        (SQLite reads it again when some text is not UTF-8), for the caller to count too.
        `hash_groups`: see `logs.Run` (PostgreSQL's store acts on it, the others need not).
        """

    @abstractmethod
    def _match(self, column: Column, values: Sequence[Any]) -> tuple[str, Sequence[Any]]:
        """A condition `t.column IN values` in the engine's dialect, and its parameters."""

    @abstractmethod
    def _live(self) -> str:
        """The condition that the token is not soft-deleted, in the engine's quoting."""

    @abstractmethod
    def _options_probe(self) -> str:
        """A statement returning a row if the options table exists."""

    @abstractmethod
    def _options_sql(self, keys: Sequence[str]) -> tuple[str, Sequence[Any]]:
        """`SELECT key, value FROM options WHERE key IN keys` in the engine's dialect."""

    @abstractmethod
    async def close(self) -> None:
        """Close every connection; statements after this raise StoreUnavailable."""

    @property
    def spare_connections(self) -> int:
        """Connections no statement of this store holds or waits for now."""
        return max(0, self.pool_size - self._in_flight)

    async def _sent(
        self, sql: str, params: Sequence[Any], resent: Resent = uncounted, /, *, hash_groups: bool = False
    ) -> Sequence[Sequence[Any]]:
        """`_query`, counted among the statements in flight while it runs."""
        self._in_flight += 1
        try:
            return await self._query(sql, params, resent, hash_groups=hash_groups)
        finally:
            self._in_flight -= 1

    def log_reader(self) -> LogReader:
        """A reader of the gateway's log through this store's connections (no LOG_SQL_DSN): the
        log's statements take at most half of them at once (one with a single connection), so
        that history and log reads, however many, leave the balance's lookups connections."""
        return LogReader(
            self._sent, self.engine, share=max(1, self.pool_size // 2), share_wait=self._timeout + STATEMENT_GUARD
        )

    async def _prepare(self, *, counted: bool = True) -> None:
        """Make sure the SELECT fits the database before a statement is built from it: its
        columns are looked at again every `schema_check_interval` seconds.

        Raise StoreUnavailable while the database cannot answer, counted among the errors
        unless `counted` is false (ping). The SQLite store, whose file may be replaced under
        it, overrides this.
        """
        if time.monotonic() - self._schema_read_at < self.schema_check_interval:
            return
        self._schema_read_at = time.monotonic()
        try:
            select = await self._read_select()
        except StoreUnavailable as exc:
            self._schema_read_at = -math.inf  # not read: look again at the next statement
            if counted:
                self._failed(exc)
            raise
        except SchemaError as exc:  # the statements will say what is wrong: keep what worked
            logger.error("%s; reading the tables with the columns they had", exc)
            return
        if select != self._select:
            logger.warning("the columns of the gateway's tables changed; reading them as they are now")
            self._select = select

    async def _read_select(self, where: str = "SQL_DSN") -> str:
        """The SELECT that fits the tables' columns now; raise SchemaError if it is no gateway database."""
        return self._select

    async def _check_tables(self, where: str) -> None:
        """At start (servers): read the columns, then the tables once, which proves the user may:
        a missing GRANT fails start-up, not requests."""
        self._select = await self._read_select(where)
        await self._query(f"{self._select} LIMIT 0", ())

    async def fetch(self, key: str) -> TokenRecord | None:
        found = await self._by_key.load(key)
        if isinstance(found, UnreadableRow):
            # A fresh exception per caller: requests coalesced on one statement each raise their own.
            self._log_unreadable(found)
            raise UnreadableRow(found.token_id, found.reason)
        return found

    async def _fetch_keys(self, keys: Sequence[str]) -> dict[str, TokenRecord | UnreadableRow]:
        await self._prepare()
        condition, params = self._match("key", keys)
        rows = await self._execute(f"{self._select} WHERE {condition} AND {self._live()}", params)
        # Keyed by the stored key: a case-insensitive collation (MySQL's default) may return a
        # row for a key that differs in case, and that is not the key asked for.
        found: dict[str, TokenRecord | UnreadableRow] = {}
        for row in rows:
            try:
                found[row_key(row)] = row_record(row)
            except (ValueError, TypeError) as exc:  # this row alone: the others were read
                found[row_key(row)] = UnreadableRow(row[0], str(exc))
        return found

    async def fetch_many(self, ids: Sequence[int]) -> dict[int, Pair | UnreadableRow]:
        await self._prepare()
        found: dict[int, Pair | UnreadableRow] = {}
        for start in range(0, len(ids), self.fetch_batch):
            condition, params = self._match("id", ids[start : start + self.fetch_batch])
            for row in await self._read_by_id(condition, params):
                if isinstance(row, UnreadableRow):
                    found[as_int(row.token_id)] = row
                else:
                    found[row[1].id] = row
        self._rows.trim()
        return found

    async def _read_by_id(self, condition: str, params: Sequence[Any]) -> list[Pair | UnreadableRow]:
        """What one of fetch_many's statements read, row by row (engines may read it faster)."""
        rows = await self._execute(f"{self._select} WHERE {condition} AND {self._live()}", params)
        remember = self._rows.read
        return [remember(values, _as_is) for values in map(tuple, rows)]

    def _log_unreadable(self, row: UnreadableRow) -> None:
        # A broken row stays broken until someone fixes it: say so now and then, not per request.
        now = time.monotonic()
        if now - self._unreadable_logged.get(row.token_id, -UNREADABLE_LOG_INTERVAL) >= UNREADABLE_LOG_INTERVAL:
            if len(self._unreadable_logged) > 1000:
                self._unreadable_logged.clear()
            self._unreadable_logged[row.token_id] = now
            logger.warning("%s; its requests are answered 503", row)

    async def fetch_options(self, keys: Sequence[str]) -> dict[str, str]:
        # The gateway creates its options table at start; a database without one has defaults.
        # (Checked again while it is missing: a gateway started after us may create it.)
        if not self._has_options:
            if not await self._execute(self._options_probe(), (), options=True):
                if not self._said_no_options:
                    self._said_no_options = True
                    logger.warning(
                        "the gateway's database has no options table: the billing routes answer with"
                        " the gateway's default settings until it appears"
                    )
                return {}
            self._has_options = True
        sql, params = self._options_sql(keys)
        rows = await self._execute(sql, params, options=True)
        return {_text(row[0]): _text(row[1]) for row in rows if row[0] is not None and row[1] is not None}

    async def ping(self) -> None:
        # Not counted among the statements, nor a failure among the errors (as the log's ping):
        # those counters say what polling costs and how its reads fare, however often a probe asks.
        await self._prepare(counted=False)
        # The token route's own read, of one row that never leaves the database: a database that
        # answers but has either of its tables locked (a migration of users too) is not ready.
        await self._query(f"SELECT EXISTS ({self._select} LIMIT 1)", ())

    async def _execute(self, sql: str, params: Sequence[Any], options: bool = False) -> Sequence[Sequence[Any]]:
        count = self._count_option_statement if options else self._count_statement
        try:
            count()
            rows = await self._sent(sql, params, count)
        except StoreUnavailable as exc:
            self._failed(exc, counted=not options)
            raise
        if self._failing:
            self._failing = False
            logger.warning("database answers again")
        return rows

    def _count_statement(self) -> None:
        self.statements += 1

    def _count_option_statement(self) -> None:
        self.option_statements += 1

    def _failed(self, exc: StoreUnavailable, *, counted: bool = True) -> None:
        """Count a statement the database did not answer (among the errors of the statements
        counted: not the billing settings' read); say so once, when it starts."""
        if counted:
            self.errors += 1
        if not self._failing:
            self._failing = True
            logger.warning("database unavailable: %s", exc)


def _as_is(values: tuple[Any, ...]) -> tuple[Any, ...]:
    return values


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
