"""The statements that read spending from the gateway's log, on any engine (through `LogReader`).

The lever is the log's id order: rows are appended with ids ascending with time, so a time
range maps to an id range, found with one seek on `idx_created_at_type`. A token's rows in that
id range are then one range of `idx_logs_token_id`, which carries the row id (SQLite's rowid,
InnoDB's primary key) after the token id: the statement reads that token's rows of the range and
no other, where `token_id = ? AND created_at BETWEEN …` would walk all of the token's rows.

Rows are only nearly in created_at order (a request's row is written when it ends, stamped when
it started or ended, by concurrent writers): the id bounds are taken MARGIN seconds wide of the
time range, and every statement keeps the exact created_at condition as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from .logs import LogReader

# Seconds by which a row's created_at may run out of id order: the id bounds of a time range are
# taken this much wider than the range.
MARGIN = 600

CONSUME, REFUND = 2, 6


class SpendRow(NamedTuple):
    """One group of a spending statement: one token's rows of one type, slot and model (a
    NamedTuple: a takeover round builds hundreds of thousands)."""

    token_id: int
    slot: int  # the slot's start, Unix seconds
    model: str
    type: int
    quota: int
    prompt_tokens: int
    completion_tokens: int
    rows: int  # how many rows the group has
    min_id: int  # the smallest id among the group's rows
    settled: bool = True  # for `rows_since`: whether all the group's rows have ids up to `settled`


def _slot(reader: LogReader, slot: int) -> str:
    # Integer division in each dialect (created_at is an integer column on all three).
    return f"created_at DIV {slot}" if reader.engine == "mysql" else f"created_at / {slot}"


async def id_before(reader: LogReader, at: int) -> int:
    """An id below every row with created_at >= at: that of the last row stamped MARGIN
    seconds before it (0 when there is none)."""
    rows = await reader.query(
        "SELECT id FROM logs WHERE created_at < ? ORDER BY created_at DESC LIMIT 1", (at - MARGIN,)
    )
    return int(rows[0][0]) if rows else 0


async def id_after(reader: LogReader, at: int) -> int | None:
    """An id above every row with created_at < at: that of the first row stamped MARGIN
    seconds after it (None while there is none)."""
    rows = await reader.query("SELECT id FROM logs WHERE created_at >= ? ORDER BY created_at LIMIT 1", (at + MARGIN,))
    return int(rows[0][0]) if rows else None


async def id_range(reader: LogReader) -> tuple[int, int]:
    """(smallest, largest) id in the log, (0, 0) when it is empty: one index end each."""
    # Two subqueries: SQLite answers min() or max() from the index end only when alone.
    rows = await reader.query("SELECT (SELECT min(id) FROM logs), (SELECT max(id) FROM logs)")
    low, high = rows[0] if rows else (None, None)
    return int(low or 0), int(high or 0)


async def marks(reader: LogReader, settled_before: int) -> tuple[int, int]:
    """(the log's smallest id, the id of the last row stamped before `settled_before`), 0 for
    either when there is none: one statement, two index ends."""
    rows = await reader.query(
        "SELECT (SELECT min(id) FROM logs),"
        " (SELECT id FROM logs WHERE created_at < ? ORDER BY created_at DESC LIMIT 1)",
        (settled_before,),
    )
    low, settled = rows[0] if rows else (None, None)
    return int(low or 0), int(settled or 0)


def _select(reader: LogReader, slot: int, where: str, extra: str = "") -> str:
    return (
        f"SELECT token_id, {_slot(reader, slot)} AS s, model_name, type, SUM(quota), SUM(prompt_tokens),"
        f" SUM(completion_tokens), COUNT(*), MIN(id){extra} FROM logs WHERE {where} AND type IN ({CONSUME}, {REFUND})"
        f" GROUP BY token_id, s, model_name, type{', settled' if extra else ''}"
    )


async def spending(
    reader: LogReader,
    token_ids: Sequence[int],
    slot: int,
    *,
    start: int,
    end: int | None,
    after_id: int,
    before_id: int | None,
) -> list[SpendRow]:
    """The tokens' consume and refund rows with start <= created_at < end (no end: up to now),
    summed by token, slot, model and type, reading only ids in (after_id, before_id)."""
    marks = ", ".join("?" * len(token_ids))
    where = f"token_id IN ({marks}) AND id > ?"
    params: list[Any] = [*token_ids, after_id]
    if before_id is not None:
        where += " AND id < ?"
        params.append(before_id)
    where += " AND created_at >= ?"
    params.append(start)
    if end is not None:
        where += " AND created_at < ?"
        params.append(end)
    rows = await reader.query(_select(reader, slot, where), params)
    return [_row(row, slot) for row in rows]


async def rows_since(reader: LogReader, slot: int, *, after_id: int, settled: int, start: int) -> list[SpendRow]:
    """Every token's consume and refund rows with an id above `after_id` and created_at >= start,
    summed by token, slot, model and type, and split by whether their id is at most `settled`.

    One range of the primary key: what the gateway wrote since `after_id`, whatever the tokens.
    """
    where = "id > ? AND created_at >= ?"
    extra = ", CASE WHEN id <= ? THEN 1 ELSE 0 END AS settled"
    rows = await reader.query(_select(reader, slot, where, extra), (settled, after_id, start))
    return [_row(row, slot) for row in rows]


def _row(row: Sequence[Any], slot: int) -> SpendRow:
    # SUM comes back as Decimal on MySQL and PostgreSQL (int() of an int costs next to nothing);
    # text may come back as bytes on MySQL, NULL sums and models as None.
    model = row[2]
    if type(model) is not str:
        model = model.decode(errors="replace") if isinstance(model, bytes) else ""
    return SpendRow(
        int(row[0]),
        int(row[1]) * slot,
        model,
        int(row[3]),
        int(row[4] or 0),
        int(row[5] or 0),
        int(row[6] or 0),
        int(row[7]),
        int(row[8]),
        bool(row[9]) if len(row) > 9 else True,
    )
