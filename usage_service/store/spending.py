"""The statements that read spending from the gateway's log, on any engine (through `LogReader`).

The lever is the log's id order: rows are appended with ids ascending with time, so a time
range maps to an id range, found with one seek on `idx_created_at_type`. A token's rows in that
id range are then one range of `idx_logs_token_id`, which carries the row id (SQLite's rowid,
InnoDB's primary key) after the token id: the statement reads that token's rows of the range and
no other, where `token_id = ? AND created_at BETWEEN …` would walk all of the token's rows.

PostgreSQL's `idx_logs_token_id` does not carry the row id: there the token's rows of an id range
are one index range only of an index on (token_id, id), which the docs advise and the service uses
once it sees it (`LogReader.token_order`). The range is then asked as a row comparison, which
the primary key cannot serve: asked as `token_id = ? AND id > ?`, the planner reads the id range
of every token through the primary key instead (a month of the bench's busiest token: 0.3 s
against 0.8 to 0.9 s, docs/performance.md).

Rows are only nearly in created_at order (a request's row is written when it ends, stamped when
it started or ended, by concurrent writers): the id bounds are taken MARGIN seconds wide of the
time range, and every statement keeps the exact created_at condition as well.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from ..records import INT64_MAX, INT64_MIN, as_int
from . import StoreDataError, StoreUnavailable
from .logs import LogReader

# Seconds by which a row's created_at may run out of id order: the id bounds of a time range are
# taken this much wider than the range.
MARGIN = 600

CONSUME, REFUND = 2, 6


class SpendRow(NamedTuple):
    """One group of a spending statement: one token's consume and refund rows of one slot and
    model (a NamedTuple: a takeover round builds hundreds of thousands)."""

    token_id: int
    slot: int  # the slot's start, Unix seconds
    model: str
    quota: int  # consumed minus refunded
    prompt_tokens: int  # of the consume rows
    completion_tokens: int  # of the consume rows
    requests: int  # how many consume rows
    min_id: int  # the smallest id among the group's rows
    settled: int = 1  # for `rows_since`: 1 if all the group's rows have ids up to `settled`, else 0


def _slot(reader: LogReader, slot: int) -> str:
    """The start of a row's slot, by integer division in each dialect (created_at is an integer
    column on all three)."""
    return f"created_at DIV {slot} * {slot}" if reader.engine == "mysql" else f"created_at / {slot} * {slot}"


async def id_before(reader: LogReader, at: int) -> int:
    """An id below every row with created_at >= at: that of the last row stamped MARGIN
    seconds before it (0 when there is none)."""
    return await last_id_before(reader, at - MARGIN)


async def last_id_before(reader: LogReader, at: int) -> int:
    """The id of the last row stamped before `at` (0 when there is none).

    A row stamped more than MARGIN before the log's first row (the smallest id) is passed over:
    written after that row, it was stamped when it was not its time (a zero, a gateway clock gone
    wrong), and where no true row was stamped before `at` (a range from the log's beginning) it
    was taken as written before the range's rows, which were then left out."""
    rows = await reader.query(
        "SELECT id FROM logs WHERE created_at < ?"
        " AND created_at >= (SELECT created_at FROM logs WHERE id = (SELECT min(id) FROM logs)) - ?"
        " ORDER BY created_at DESC LIMIT 1",
        (at, MARGIN),
    )
    return int(rows[0][0]) if rows else 0


async def id_after(reader: LogReader, at: int, now: int) -> int | None:
    """An id above every row with created_at < at: that of the first row stamped MARGIN
    seconds after it (None while there is none).

    Only a row stamped before `now` (our clock) + MARGIN is taken: one stamped later (a gateway
    clock gone wrong, years ahead) was written when it was not its time, maybe before the rows
    stamped < at, and would leave them out of every range ending at `at` (they were read as
    missing until a later row came, and the closed day kept so). So would text in created_at,
    which SQLite keeps and sorts after every number. Without such a row, None: read to the end.
    """
    rows = await reader.query(
        "SELECT id FROM logs WHERE created_at >= ? AND created_at < ? ORDER BY created_at LIMIT 1",
        (at + MARGIN, now + MARGIN),
    )
    return int(rows[0][0]) if rows else None


async def id_range(reader: LogReader) -> tuple[int, int]:
    """(smallest, largest) id in the log, (0, 0) when it is empty: one index end each."""
    # Two subqueries: SQLite answers min() or max() from the index end only when alone.
    rows = await reader.query("SELECT (SELECT min(id) FROM logs), (SELECT max(id) FROM logs)")
    low, high = rows[0] if rows else (None, None)
    return int(low or 0), int(high or 0)


class Marks(NamedTuple):
    """What a round of the history learns of the log first (`marks`)."""

    min_id: int  # the log's smallest id (0 when empty): how a clean-up shows
    settled: int  # the id of the last row stamped `settle` seconds before the newest one (0: none)
    settled_at: int  # when that was, by the gateway's clock
    gap: int | None  # the smallest id above `after` and below `settled` that no row has, if any
    max_id: int = 0  # the log's largest id (0 when empty): below a mark the rounds settled on, a restore


async def marks(reader: LogReader, now: int, settle: int, after: int | None = None) -> Marks:
    """The log's marks (`Marks`), in one statement of index lookups. The mark is taken before
    `now` as well, should the gateway's clock run ahead of ours.

    The gateway stamps its rows with its own clock: measured against ours, a gateway whose
    clock runs behind would have the mark on rows still being committed (a lower id committed
    after a higher one would fall under it, and never be read).

    `gap` (looked for only given `after`, the last mark the rounds settled on): a row stamped
    before the mark may still be committing (on PostgreSQL and MySQL an id is taken when the row
    is inserted, and the row shows once its transaction commits); its id is missing until then,
    as is one whose insert was rolled back (`first_missing`).
    """
    # The newest row's time, one index end: bounded, because SQLite keeps text given for a
    # number, and text sorts after every number (max() gave the text).
    newest_sql = f"(SELECT created_at FROM logs WHERE created_at < {INT64_MAX} ORDER BY created_at DESC LIMIT 1)"
    settled_sql = (
        f"(SELECT id FROM logs WHERE created_at < ? AND created_at < {newest_sql} - ? ORDER BY created_at DESC LIMIT 1)"
    )
    params: list[Any] = [now - settle, settle]
    gap_sql = "NULL"
    if after is not None:
        gap_sql = _first_missing_sql(settled_sql)
        params += [after + 1, after, now - settle, settle]
    rows = await reader.query(
        f"SELECT (SELECT min(id) FROM logs), {newest_sql}, {settled_sql}, {gap_sql}, (SELECT max(id) FROM logs)", params
    )
    low, newest, settled, gap, high = rows[0] if rows else (None, None, None, None, None)
    settled_id = int(settled or 0)
    settled_at = min(now, as_int(newest) if newest is not None else now) - settle
    missing = None if after is None else _missing(after, settled_id, gap)
    return Marks(int(low or 0), settled_id, settled_at, missing, int(high or 0))


async def first_missing(reader: LogReader, after: int, below: int) -> int | None:
    """The smallest id above `after` and below `below` (a row's id) that no row has, if any.

    The search stops at the first missing id: it costs one index lookup for each id from
    `after` up to it."""
    if below <= after + 1:
        return None
    rows = await reader.query(f"SELECT {_first_missing_sql('?')}", (after + 1, after, below))
    return _missing(after, below, rows[0][0] if rows else None)


def _first_missing_sql(below: str) -> str:
    """-1 if the id right after `after` is missing; else the first id after a row whose next
    one is missing, below `below`, if any. Parameters: after + 1, after, then `below`'s."""
    return (
        "CASE WHEN EXISTS (SELECT 1 FROM logs WHERE id = ?) THEN (SELECT g.id + 1 FROM logs g"
        f" WHERE g.id > ? AND g.id < {below}"
        " AND NOT EXISTS (SELECT 1 FROM logs n WHERE n.id = g.id + 1) ORDER BY g.id LIMIT 1) ELSE -1 END"
    )


def _missing(after: int, below: int, found: Any) -> int | None:
    if below <= after + 1 or found is None:
        return None
    return after + 1 if int(found) == -1 else int(found)


def _select(reader: LogReader, slot: int, where: str, extra: str = "", *, exact: bool = False) -> str:
    """The spending statement over `where`; `exact`: its sums never fail in the database, however
    large (`_exact_sums`), for the statements that read many tokens' rows at once."""
    # Refunds are netted in the sums rather than grouped apart: the fewer the grouping keys, the
    # cheaper the sort that every GROUP BY of a month of rows pays for.
    consume = f"CASE WHEN type = {CONSUME} THEN"
    if exact:
        sums = _exact_sums(reader.engine, consume)
    else:
        # PostgreSQL sums bigints as numeric, which arrives as Decimal: as bigint instead, a
        # cold month's 20,000 groups cost the worker 50 ms less. A sum past 64 bits then fails
        # its statement, as SQLite's SUM does (MySQL's DECIMAL sums arrive whole): one token's.
        big = "::bigint" if reader.engine == "postgres" else ""
        sums = (
            f"COALESCE(SUM({consume} quota ELSE -quota END), 0){big},"
            f" COALESCE(SUM({consume} prompt_tokens ELSE 0 END), 0){big},"
            f" COALESCE(SUM({consume} completion_tokens ELSE 0 END), 0){big}"
        )
    # A model's name as written: MySQL's usual collations compare text without case, and would
    # group "gpt-4o" with "GPT-4o" (one of the two names), as SQLite and PostgreSQL do not, nor
    # the rounds adding up groups read apart.
    model = "CAST(model_name AS BINARY)" if reader.engine == "mysql" else "model_name"
    return (
        f"SELECT token_id, {_slot(reader, slot)} AS s, {model} AS m, {sums},"
        f" SUM({consume} 1 ELSE 0 END), MIN(id){extra} FROM logs WHERE {where} AND type IN ({CONSUME}, {REFUND})"
        f" GROUP BY token_id, s, m{', settled' if extra else ''}"
    )


def _exact_sums(engine: str, consume: str) -> str:
    """Sums of quota (refunds netted) and of prompt and completion tokens that no value fails,
    for a statement over many tokens' rows: one token's sum past 64 bits must not fail the
    others' (the token fails alone, in `TailKeeper`).

    PostgreSQL's and MySQL's SUM of an integer column is a numeric that cannot overflow (the
    refunds are summed apart: negating the smallest bigint fails). SQLite's SUM fails past 64
    bits, so each integer is summed in two halves, its high 32 bits (an arithmetic shift) and
    its low 32 bits, which `_exact_row` joins again: neither sum can pass 63 bits. What SQLite
    holds there that is not an integer (a REAL or text, which the gateway never writes) is
    summed apart, as a float, as SQLite's SUM sums it."""
    if engine != "sqlite":
        return (
            f"COALESCE(SUM({consume} quota END), 0) - COALESCE(SUM(CASE WHEN type = {REFUND} THEN quota END), 0),"
            f" COALESCE(SUM({consume} prompt_tokens END), 0), COALESCE(SUM({consume} completion_tokens END), 0)"
        )
    sums = []
    for column, refunded in (("quota", True), ("prompt_tokens", False), ("completion_tokens", False)):
        whole = f"CASE WHEN typeof({column}) = 'integer' THEN {column} END"
        for part in (f"({whole}) >> 32", f"({whole}) & {_LOW}"):
            sums.append(f"COALESCE(SUM({consume} {part} ELSE {f'-({part})' if refunded else '0'} END), 0)")
        signed = f"{consume} {column} ELSE {f'-{column}' if refunded else '0'} END"
        sums.append(f"TOTAL(CASE WHEN typeof({column}) <> 'integer' THEN {signed} END)")
    return ", ".join(sums)


_LOW = 2**32 - 1


async def spending(
    reader: LogReader,
    token_ids: Sequence[int],
    slot: int,
    *,
    start: int,
    end: int | None,
    after_id: int,
    before_id: int | None,
    exact: bool = False,
) -> list[SpendRow]:
    """The tokens' consume and refund rows with start <= created_at < end (no end: up to now),
    summed by token, slot and model, reading only ids in (after_id, before_id). Not `exact`, a
    sum past 64 bits fails the statement (SpendingPast64Bits or the database's error); `exact`,
    every sum arrives whole, however large."""
    params: list[Any]
    if len(token_ids) == 1 and await reader.token_order():
        (token_id,) = token_ids
        where = "token_id = ? AND (token_id, id) > (?, ?) AND (token_id, id) < (?, ?)"
        params = [token_id, token_id, after_id, token_id, INT64_MAX if before_id is None else before_id]
    else:
        where = f"token_id IN ({', '.join('?' * len(token_ids))}) AND id > ?"
        params = [*token_ids, after_id]
        if before_id is not None:
            where += " AND id < ?"
            params.append(before_id)
    where += " AND created_at >= ?"
    params.append(start)
    if end is not None:
        where += " AND created_at < ?"
        params.append(end)
    if not exact:
        try:
            rows = await reader.query(_select(reader, slot, where), params, hash_groups=True)
            return [_row(row) for row in rows]
        except (StoreDataError, SpendingPast64Bits):
            # A running sum past 64 bits (SQLite's SUM), or a refund of the smallest int64
            # negated (an error, or a float on SQLite): read exactly, and fail only if a sum
            # itself is past 64 bits.
            rows = await reader.query(_select(reader, slot, where, exact=True), params, hash_groups=True)
            return [_fits(_exact_row(row, reader.engine)) for row in rows]
    rows = await reader.query(_select(reader, slot, where, exact=True), params, hash_groups=True)
    return [_exact_row(row, reader.engine) for row in rows]


async def rows_since(reader: LogReader, slot: int, *, after_id: int, settled: int, start: int) -> list[SpendRow]:
    """Every token's consume and refund rows with an id above `after_id` and created_at >= start,
    summed by token, slot and model, and split by whether their id is at most `settled`; the
    sums exact, however large (`_exact_sums`).

    One range of the primary key: what the gateway wrote since `after_id`, whatever the tokens.
    """
    where = "id > ? AND created_at >= ?"
    extra = ", CASE WHEN id <= ? THEN 1 ELSE 0 END AS settled"
    rows = await reader.query(_select(reader, slot, where, extra, exact=True), (settled, after_id, start))
    return [_exact_row(row, reader.engine) for row in rows]


def _row(row: Sequence[Any]) -> SpendRow:
    if type(row[2]) is str and type(row[3]) is int and type(row[4]) is int and type(row[5]) is int:
        return SpendRow(*row)  # as SQLite gives it: taken as is (a month read cold is 20,000 rows)
    # SUM comes back as Decimal on MySQL (and as a float on SQLite over a value that is not an
    # integer).
    return SpendRow(
        int(row[0]),
        int(row[1]),
        _model(row[2]),
        _sum(row[3]),
        _sum(row[4]),
        _sum(row[5]),
        _sum(row[6]),
        int(row[7]),
        int(row[8]) if len(row) > 8 else 1,
    )


def _exact_row(row: Sequence[Any], engine: str) -> SpendRow:
    """A group of an `exact` statement, its sums whole however large."""
    if engine == "sqlite":  # each sum as its integers' high and low 32 bits, and the rest
        sums = [_joined(row[i], row[i + 1], row[i + 2]) for i in (3, 6, 9)]
        rest = row[12:]
    else:
        sums = [int(value or 0) for value in row[3:6]]
        rest = row[6:]
    quota, prompt, completion = sums
    requests, min_id, settled = int(rest[0] or 0), int(rest[1]), int(rest[2]) if len(rest) > 2 else 1
    return SpendRow(int(row[0]), int(row[1]), _model(row[2]), quota, prompt, completion, requests, min_id, settled)


def _joined(high: Any, low: Any, other: float) -> int:
    """A SQLite sum from `_exact_sums`: past 64 bits if what is not an integer sums past them
    (an infinite float too), as `_sum` reads SQLite's own SUM."""
    whole = int(high or 0) * 2**32 + int(low or 0)
    if not other:
        return whole
    if math.isnan(other):
        return whole
    if math.isinf(other):
        return INT64_MAX + 1 if other > 0 else INT64_MIN - 1
    return int(whole + other)


def _model(model: Any) -> str:
    """A model's name as given: text may come back as bytes on MySQL, and as None."""
    if type(model) is str:
        return model
    return model.decode(errors="replace") if isinstance(model, bytes) else ""


def _fits(row: SpendRow) -> SpendRow:
    if not all(INT64_MIN <= figure <= INT64_MAX for figure in row[3:7]):
        raise SpendingPast64Bits("a sum of the log past 64 bits")
    return row


class SpendingPast64Bits(StoreUnavailable):
    """A sum of a token's spending that no 64-bit integer holds (SQLite's own SUM fails alike):
    that token's history cannot be read, and its route answers 503; other tokens are served."""


def _sum(value: Any) -> int:
    """A sum as a whole number (a REAL the gateway never writes read as one; NaN as 0, as junk
    in a number column is), or SpendingPast64Bits."""
    if isinstance(value, float) and not math.isfinite(value):
        if math.isnan(value):
            return 0
        raise SpendingPast64Bits("a sum of the log past 64 bits")
    number = int(value)
    if not INT64_MIN <= number <= INT64_MAX:
        raise SpendingPast64Bits("a sum of the log past 64 bits")
    return number
