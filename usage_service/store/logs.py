"""Where the gateway's request log is read: `LogReader`, one read statement at a time.

The log lives in the gateway's main database unless LOG_SQL_DSN names another one. Either
way the history and log routes see a `LogReader`: it runs a read statement written with `?`
placeholders and identifiers quoted by `q()`, on whichever engine holds the log, and counts
what it sent, apart from the token statements (the balance's cost and the log's are reported
separately).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

from . import StoreUnavailable

logger = logging.getLogger("usage_service.store.logs")

Engine = Literal["sqlite", "postgres", "mysql"]
Run = Callable[[str, Sequence[Any]], Awaitable[Sequence[Sequence[Any]]]]


class LogReader:
    """Read statements against the database holding the `logs` table, in any engine's dialect."""

    def __init__(self, run: Run, engine: Engine, *, close: Callable[[], Awaitable[None]] | None = None) -> None:
        self._run = run
        self.engine: Engine = engine
        self._close = close  # set when the reader owns its connections (LOG_SQL_DSN)
        self.statements = 0  # statements sent to read the log since start
        self.errors = 0
        self._failing = False

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

    async def query(self, text: str, params: Sequence[Any] = ()) -> Sequence[Sequence[Any]]:
        """Run one read statement (written with `?`); raise StoreUnavailable if the database cannot answer."""
        self.statements += 1
        try:
            rows = await self._run(self.sql(text), params)
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

    async def close(self) -> None:
        if self._close is not None:
            await self._close()
