"""Where token records come from: the gateway's own database, read-only.

Everything above this package sees the `TokenStore` interface only; one module per engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from .._dsn import MySQLDSN, PostgresDSN
from ..config import Settings
from ..records import TokenRecord

if TYPE_CHECKING:
    from .logs import LogReader

# Seconds a statement may run past USAGE_DB_TIMEOUT before its store gives up on it (each
# engine's outer guard, beside the database's own lock or statement timeout).
STATEMENT_GUARD = 1.0


class StoreUnavailable(Exception):
    """The database could not answer (locked, missing, timed out); the request may be retried."""


class StoreMisconfigured(StoreUnavailable):
    """The database cannot be read as it is until someone acts (a replaced file that is no
    gateway database, WAL files this user may not read or that SQLite would have to create).

    The message says what in one line, without credentials or paths: /readyz shows it.
    """


class StoreDataError(StoreUnavailable):
    """A statement failed on the values it read (a sum, or a number negated, past 64 bits), not
    because the database could not answer: the same statement fails again, another may not."""


class UnreadableRow(StoreUnavailable):
    """A token's row is there but cannot be made into a record (a value no record can hold).

    Only that token fails: its requests are answered 503 (or from a stale record), the other
    tokens read in the same statement are served, and the refresher leaves it alone.
    """

    def __init__(self, token_id: object, reason: str) -> None:
        super().__init__(f"token id {token_id}: row cannot be read ({reason})")
        self.token_id = token_id
        self.reason = reason


class SchemaError(Exception):
    """The database does not look like a new-api gateway's; raised at start-up."""


class StoreNotReady(SchemaError):
    """The database could not be read at start-up (locked, unreachable, missing, timed out):
    which may pass, unlike a database that is no gateway's."""


class TokenStore(Protocol):
    statements: int
    """Statements sent to the database for token records since start (read by tests, benchmarks, metrics)."""
    option_statements: int
    """Statements sent to read the gateway's options: a fixed background cost, not the polling's."""
    errors: int
    """Statements that failed or timed out since start (read by the metrics)."""

    @property
    def spare_connections(self) -> int:
        """Connections no statement holds or waits for now (the refresher sends a statement
        ahead of its round only while two are spare: it never waits for a connection, and one
        stays for the requests' misses)."""
        ...

    async def fetch(self, key: str) -> TokenRecord | None:
        """Return the live token with this key (without 'sk-') joined with its live user, or None.

        Raise UnreadableRow when the token's row is there but cannot be read.
        """
        ...

    async def fetch_many(self, ids: Sequence[int]) -> dict[int, tuple[bytes, TokenRecord] | UnreadableRow]:
        """Return {id: (key digest, record)} for the live tokens among these ids, in batched
        statements.

        The digest of the token's key (`cache.key_digest`) comes back so the caller can check
        that the key is still the one it cached the token under. A live token whose row cannot
        be read maps to an UnreadableRow instead.
        """
        ...

    async def fetch_options(self, keys: Sequence[str]) -> dict[str, str]:
        """Return {key: value} of the gateway's `options` rows among these keys ({} without the table)."""
        ...

    def log_reader(self) -> LogReader:
        """A reader of the gateway's log over this store's connections."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers a query now (a readiness probe:
        counted neither among `statements` nor among `errors`)."""
        ...

    async def close(self) -> None: ...


async def open_store(settings: Settings) -> TokenStore:
    """Open the store of the engine SQL_DSN names (SQLite at SQLITE_PATH when it names none)."""
    from ._sql import rows_kept

    database, timeout, pool_size = settings.database, settings.db_timeout, settings.db_pool_size
    kept = rows_kept(settings.hot_max)  # the refresher's rows, re-read every round
    # Imported here: each engine's driver loads only where that engine runs.
    if isinstance(database, PostgresDSN):
        from .postgres import PostgresStore

        return await PostgresStore.open(database, timeout=timeout, pool_size=pool_size, rows_kept=kept)
    if isinstance(database, MySQLDSN):
        from .mysql import MySQLStore

        return await MySQLStore.open(database, timeout=timeout, pool_size=pool_size, rows_kept=kept)
    from .sqlite import SQLiteStore

    return await SQLiteStore.open(settings.sqlite_path, timeout=timeout, pool_size=pool_size, rows_kept=kept)
