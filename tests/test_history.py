"""The spending engine (usage_service/history.py) against real gateway databases: its sums equal a
direct SELECT over the same rows, it reads what it must and nothing more, and its caches stay true."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
from conftest import GatewayFactory
from dbservers import POSTGRES_LOGS_SCHEMA, PostgresGateway, PostgresServer
from support import Gateway, Token, free_port
from test_freshness import Gate, until

from usage_service import history as history_module
from usage_service.app import _open_redis
from usage_service.config import Settings
from usage_service.days import DaySums
from usage_service.history import DAY, GRACE, SLOT, Day, History, Spend, _Loaded, plus
from usage_service.records import INT64_MAX, INT64_MIN
from usage_service.shared import SharedRedis
from usage_service.store import StoreUnavailable, open_store
from usage_service.store.logs import TOKEN_ORDER_CHECK, LogReader, uncounted
from usage_service.store.spending import marks, spending

pytestmark = pytest.mark.asyncio

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z, a day's start


class Clock:
    """The wall clock the engine reads, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A LogReader's `run` that notes each statement before the engine's database runs it."""

    def __init__(self, run: Callable[..., Any]) -> None:
        self.run = run
        self.sent: list[tuple[str, Sequence[Any]]] = []
        self.hashed: list[bool] = []  # each statement's hash_groups

    async def __call__(
        self, sql: str, params: Sequence[Any], *resent: Callable[[], None], hash_groups: bool = False
    ) -> Sequence[Sequence[Any]]:
        self.sent.append((sql, params))
        self.hashed.append(hash_groups)
        return await self.run(sql, params, *resent, hash_groups=hash_groups)  # type: ignore[no-any-return]


def hold_reads(recorder: Recorder, *, first_only: bool = False) -> Gate:
    """Hold the recorder's reads of spending (its grouping statements), once they have read, at
    the gate returned (only the first of them with `first_only`): injected ordering."""
    gate, run = Gate(), recorder.run

    async def held(
        sql: str, params: Sequence[Any], *resent: Callable[[], None], **options: Any
    ) -> Sequence[Sequence[Any]]:
        rows = await run(sql, params, *resent, **options)
        if "GROUP BY" in sql and not (first_only and gate.reached.is_set()):
            await gate.hold()
        return rows  # type: ignore[no-any-return]

    recorder.run = held
    return gate


@asynccontextmanager
async def engine(settings: Settings, clock: Clock) -> AsyncIterator[tuple[History, Recorder]]:
    store = await open_store(settings)
    try:
        inner = store.log_reader()
        recorder = Recorder(inner._run)
        yield History(LogReader(recorder, inner.engine), clock=clock, stale_if_error=300), recorder
    finally:
        await store.close()


def direct(rows: list[dict[str, int | str]], token_id: int, start: int, end: int) -> dict[tuple[int, str], Spend]:
    """What the spending of these rows is, summed the plain way."""
    found: dict[tuple[int, str], Spend] = {}
    for row in rows:
        created = int(row["created_at"])
        if row["token_id"] != token_id or not start <= created < end or row["type"] not in (2, 6):
            continue
        key = (created - created % SLOT, str(row["model_name"]))
        if row["type"] == 2:
            spend: Spend = (int(row["quota"]), int(row["prompt_tokens"]), int(row["completion_tokens"]), 1)
        else:
            spend = (-int(row["quota"]), 0, 0, 0)
        found[key] = plus(found[key], spend) if key in found else spend
    return found


async def plain_select(reader: LogReader, token_id: int, start: int, end: int) -> dict[tuple[int, str], Spend]:
    """The direct SELECT of the token's rows, summed in Python: the reference the engine must equal."""
    rows = await reader.query(
        "SELECT created_at, model_name, type, quota, prompt_tokens, completion_tokens FROM logs"
        " WHERE token_id = ? AND created_at >= ? AND created_at < ?",
        (token_id, start, end),
    )
    return direct(
        [
            {
                "token_id": token_id,
                "created_at": int(r[0]),
                "model_name": r[1],
                "type": int(r[2]),
                "quota": int(r[3]),
                "prompt_tokens": int(r[4]),
                "completion_tokens": int(r[5]),
            }
            for r in rows
        ],
        token_id,
        start,
        end,
    )


# The index in token order docs/databases.md advises on PostgreSQL, which the service reads
# a token's spending through once it sees it ("postgres+index" below).
TOKEN_ORDER_INDEX = "idx_logs_token_id_id"


@pytest.fixture(params=["sqlite", "postgres", "postgres+index", "mysql"])
def gateway(request: pytest.FixtureRequest, make_gateway: GatewayFactory) -> Iterator[Gateway]:
    if request.param != "postgres+index":
        yield make_gateway(request.param)
        return
    gateway = make_gateway("postgres")
    gateway.conn.execute(f"CREATE INDEX {TOKEN_ORDER_INDEX} ON logs (token_id, id)")  # type: ignore[attr-defined]
    try:
        yield gateway
    finally:
        gateway.conn.execute(f"DROP INDEX {TOKEN_ORDER_INDEX}")  # type: ignore[attr-defined]


sqlite_only = pytest.mark.parametrize("gateway", ["sqlite"], indirect=True)


def write_random_log(gateway: Gateway, tokens: list[Any], days: int, per_day: int, seed: int) -> list[dict[str, Any]]:
    """Rows over `days` days from T0, of several tokens and users, types and models, a little
    out of created_at order (as concurrent writers leave them)."""
    rng = random.Random(seed)
    rows = []
    for i in range(days * per_day):
        created = T0 + i * (DAY // per_day) + rng.randint(-120, 120)
        token = rng.choice(tokens)
        row = {
            "token_id": token.id,
            "created_at": max(T0, created),
            "type": rng.choice([2, 2, 2, 2, 5, 6, 1]),
            "model_name": rng.choice(["gpt-4o", "gpt-4o-mini", "claude"]),
            "quota": rng.randint(0, 10_000),
            "prompt_tokens": rng.randint(0, 2000),
            "completion_tokens": rng.randint(0, 2000),
        }
        rows.append(row)
        gateway.add_log(
            token,
            created_at=row["created_at"],
            type=row["type"],
            model_name=row["model_name"],
            quota=row["quota"],
            prompt_tokens=row["prompt_tokens"],
            completion_tokens=row["completion_tokens"],
        )
    return rows


async def test_sums_equal_a_direct_select(gateway: Gateway, settings: Settings) -> None:
    mine = gateway.add_token()
    sibling = gateway.add_token(user_id=mine.user_id)  # same user, other token
    stranger = gateway.add_token()
    rows = write_random_log(gateway, [mine, sibling, stranger], days=4, per_day=150, seed=13)
    clock = Clock(T0 + 3 * DAY + 12 * 3600)  # the fourth day's noon: three closed days, one open
    async with engine(settings, clock) as (history, _):
        ranges = [
            (T0, T0 + 4 * DAY),  # everything, closed and open
            (T0 - DAY, T0 + 10 * DAY),  # wider than the log
            (T0 + DAY + 5 * SLOT, T0 + 2 * DAY + 7 * SLOT),  # slots across a day boundary
            (T0 + 2 * DAY, T0 + 2 * DAY + SLOT),  # one slot
            (T0 + 3 * DAY + 4 * SLOT, T0 + 3 * DAY + 40 * SLOT),  # within the open day
            (T0 + 5 * DAY, T0 + 6 * DAY),  # the future
        ]
        for start, end in ranges:
            for token in (mine, sibling, stranger):
                answer = await history.slots(token.id, start, end)
                assert answer == await plain_select(history.reader, token.id, start, end), (start, end)
                assert answer == direct(rows, token.id, start, end)
        assert await history.slots(mine.id, T0 + DAY, T0 + DAY) == {}


async def test_a_long_cold_range_is_read_in_two_halves_at_once(gateway: Gateway, settings: Settings) -> None:
    """A month read cold is two statements running together (the database sorts each half on a
    core of its own), whose sums are still the direct SELECT's."""
    mine, other = gateway.add_token(), gateway.add_token()
    rows = write_random_log(gateway, [mine, other], days=12, per_day=40, seed=7)
    in_flight = most = 0

    async def run(
        sql: str, params: Sequence[Any], *resent: Callable[[], None], **options: Any
    ) -> Sequence[Sequence[Any]]:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0)  # both halves sent before either is answered
            return await inner(sql, params, *resent, **options)  # type: ignore[no-any-return]
        finally:
            in_flight -= 1

    async with engine(settings, Clock(T0 + 11 * DAY + 12 * 3600)) as (history, recorder):
        inner, recorder.run = recorder.run, run
        answer = await history.slots(mine.id, T0, T0 + 12 * DAY)
        assert [sql.count("GROUP BY") for sql, _ in recorder.sent].count(1) == 2
        assert most == 2
        assert answer == direct(rows, mine.id, T0, T0 + 12 * DAY)
        assert answer == await plain_select(history.reader, mine.id, T0, T0 + 12 * DAY)
        assert history.stats.days_read == 11 and history.stats.tails_read == 1


@pytest.mark.parametrize("gateway", ["sqlite", "postgres"], indirect=True)
async def test_a_sum_past_64_bits_fails_its_tokens_history_alone(gateway: Gateway, settings: Settings) -> None:
    """Sums are 64-bit integers on SQLite and PostgreSQL alike: a slot whose sum does not fit
    fails that token's read (the route answers 503), and every other token is answered."""
    huge, other = gateway.add_token(), gateway.add_token()
    for created_at in (T0 + 60, T0 + 120):
        gateway.add_log(huge, created_at=created_at, quota=2**62)
    gateway.add_log(other, created_at=T0 + 60, quota=2**62)
    gateway.add_log(other, created_at=T0 + 120, quota=5)
    async with engine(settings, Clock(T0 + 2 * DAY)) as (history, _):
        with pytest.raises(StoreUnavailable):
            await history.slots(huge.id, T0, T0 + DAY)
        answer = await history.slots(other.id, T0, T0 + DAY)
        assert answer == await plain_select(history.reader, other.id, T0, T0 + DAY)
        assert [spend[0] for spend in answer.values()] == [2**62 + 5]


@pytest.mark.parametrize("gateway", ["sqlite", "postgres", "mysql"], indirect=True)
@pytest.mark.parametrize(
    "rows, net",
    [
        pytest.param([(2, 2**62), (2, 2**62), (6, 2**62)], 2**62, id="past-64-bits-on-the-way"),
        pytest.param([(2, -1), (6, INT64_MIN)], INT64_MAX, id="a-refund-of-the-smallest-int64"),
    ],
)
async def test_sums_that_fit_are_answered_whatever_passes_64_bits_on_the_way(
    gateway: Gateway, settings: Settings, rows: list[tuple[int, int]], net: int
) -> None:
    """A token's sums that a 64-bit integer holds are answered, read directly as the rounds
    read them, though a running sum (SQLite's SUM) or a refund negated (the smallest int64, on
    every engine) passes 64 bits on the way. (They answered 503, and logged the log database
    as unavailable.)"""
    token = gateway.add_token()
    for i, (type_, quota) in enumerate(rows):
        gateway.add_log(token, created_at=T0 + 60 + i, type=type_, quota=quota)
    async with engine(settings, Clock(T0 + 2 * DAY)) as (history, _):
        answer = await history.slots(token.id, T0, T0 + DAY)
        assert answer == await plain_select(history.reader, token.id, T0, T0 + DAY)
        assert [spend[0] for spend in answer.values()] == [net]
        assert history.reader.errors == 0


@sqlite_only
async def test_slot_boundaries_and_refunds(gateway: Gateway, settings: Settings) -> None:
    token = gateway.add_token()
    slot = T0 + 8 * SLOT
    gateway.add_log(token, created_at=slot - 1, quota=1)  # the slot before
    gateway.add_log(token, created_at=slot, quota=10, prompt_tokens=3, completion_tokens=4)
    gateway.add_log(token, created_at=slot + SLOT - 1, quota=20, prompt_tokens=5, completion_tokens=6)
    gateway.add_log(token, created_at=slot + 100, type=6, quota=7, prompt_tokens=99)  # a refund
    gateway.add_log(token, created_at=slot + 200, type=5, quota=0, model_name="gpt-4o-mini")  # an error
    gateway.add_log(token, created_at=slot + 300, type=6, quota=3, model_name="only-refunded")
    gateway.add_log(token, created_at=slot + SLOT, quota=100)  # the slot after
    gateway.add_log(None, created_at=slot + 5)  # made by no token
    async with engine(settings, Clock(T0 + 2 * DAY)) as (history, _):
        assert await history.slots(token.id, slot, slot + SLOT) == {
            (slot, "gpt-4o-mini"): (23, 8, 10, 2),  # quota, prompt and completion tokens, requests
            (slot, "only-refunded"): (-3, 0, 0, 0),
        }
        around = await history.slots(token.id, slot - SLOT, slot + 2 * SLOT)
    assert around[(slot - SLOT, "gpt-4o-mini")] == (1, 10, 5, 1)
    assert around[(slot + SLOT, "gpt-4o-mini")] == (100, 10, 5, 1)


async def test_queries_read_an_index_range_never_the_table(gateway: Gateway, settings: Settings) -> None:
    """Every statement the engine sends is planned on an index (EXPLAIN on each engine)."""
    token = gateway.add_token()
    write_random_log(gateway, [token, gateway.add_token()], days=3, per_day=50, seed=1)
    async with engine(settings, Clock(T0 + 2 * DAY + 3600)) as (history, recorder):
        await history.slots(token.id, T0, T0 + 3 * DAY)
        await history.slots(token.id + 1, T0 + DAY, T0 + 2 * DAY)
        sent = list(zip(recorder.sent, recorder.hashed, strict=True))
        assert len(sent) >= 4
        for (sql, params), hash_groups in sent:
            plan = await explain(history.reader, recorder, sql, params, hash_groups=hash_groups)
            if history.reader.engine == "sqlite":
                assert not any(line.startswith("SCAN logs") for line in plan), (sql, plan)
                if "GROUP BY" in sql:
                    assert any("idx_logs_token_id (token_id=? AND rowid>?" in line for line in plan), plan
            elif history.reader.engine == "postgres":
                assert not any("Seq Scan on logs" in line for line in plan), (sql, plan)
                if "GROUP BY" in sql:
                    # Grouped by hashing: a month's rows sorted would spill to the server's disk.
                    assert any("HashAggregate" in line for line in plan), plan
                    assert not any("Sort" in line for line in plan), plan
                if "GROUP BY" in sql and await history.reader.token_order():
                    # One token's id range: never the primary key's range over every token's
                    # rows. (On a table of so few rows and no statistics the planner may as well
                    # take the day's range of idx_created_at_type, by what earlier tests left of
                    # the table; under a busy log's statistics it takes the index in token order:
                    # test_postgres_reads_a_busy_tokens_month_through_the_index_in_token_order.)
                    assert not any("logs_pkey" in line for line in plan), plan
            else:
                assert all(line.split("|")[0] != "ALL" for line in plan), (sql, plan)
                if "GROUP BY" in sql:
                    # The token's index and id range (key length: token_id and id), or on a table
                    # this small, the id range alone, as MariaDB's statistics may say.
                    assert all(line.split("|")[1] in ("idx_logs_token_id", "PRIMARY") for line in plan), plan


@pytest.mark.parametrize("gateway", ["postgres"], indirect=True)
async def test_hashing_the_groups_holds_for_that_statement_only(gateway: Gateway, settings: Settings) -> None:
    """A spending statement groups by hashing; the token log's pages, sent later on the same
    pooled connection, may still sort (sorting disfavoured for the whole session would make a
    page walk the primary key past every other token's rows)."""
    token = gateway.add_token()
    gateway.add_log(token, created_at=T0 + 60, quota=5)
    store = await open_store(dataclasses.replace(settings, db_pool_size=1))
    try:
        reader = store.log_reader()
        before = await reader.query("SHOW enable_sort")
        rows = await spending(reader, [token.id], SLOT, start=T0, end=T0 + DAY, after_id=0, before_id=None)
        assert [(row.token_id, row.quota) for row in rows] == [(token.id, 5)]
        assert before == [("on",)] and await reader.query("SHOW enable_sort") == [("on",)]
        assert await reader.query("SELECT current_setting('transaction_read_only')") == [("on",)]
    finally:
        await store.close()


@sqlite_only
async def test_the_logs_statements_take_at_most_half_the_connections(gateway: Gateway, settings: Settings) -> None:
    """Without LOG_SQL_DSN the log is read through the token store's connections: at most half
    of them carry log statements at once, the rest are left to the balance's lookups; a log
    statement whose turn does not come in time is not sent, and answers StoreUnavailable."""
    token = gateway.add_token()
    store = await open_store(dataclasses.replace(settings, db_pool_size=4, db_timeout=0.0))
    try:
        gate, query, in_flight = Gate(), store._sent, [0]

        async def held(sql: str, params: Sequence[Any], *more: Any, **options: Any) -> Sequence[Sequence[Any]]:
            in_flight[0] += 1
            await gate.hold()
            in_flight[0] -= 1
            return await query(sql, params, *more, **options)

        store._sent = held  # type: ignore[method-assign]
        reader = store.log_reader()  # its statements held; the store's own lookups not
        store._sent = query  # type: ignore[method-assign]
        sent = [asyncio.create_task(reader.query("SELECT 1")) for _ in range(2)]
        await until(lambda: in_flight[0] == 2)
        with pytest.raises(StoreUnavailable, match="busy"):
            await reader.query("SELECT 1")  # its turn does not come within the wait (1 s here)
        assert (reader.statements, reader.busy) == (2, 1)
        assert await store.fetch(token.key) is not None  # the balance's lookups go on meanwhile
        third = asyncio.create_task(reader.query("SELECT 2"))
        gate.release.set()
        assert [await task for task in (*sent, third)] == [[(1,)], [(1,)], [(2,)]]
        assert reader.statements == 3
    finally:
        await store.close()


async def test_the_index_in_token_order_is_looked_for_every_few_minutes() -> None:
    """An operator may create the advised index (or drop it) while the service runs: the reader
    looks again every TOKEN_ORDER_CHECK seconds, and a look that fails changes nothing."""
    looks = 0
    exists, down = False, False

    async def run(
        sql: str, params: Sequence[Any], resent: Callable[[], None], **options: Any
    ) -> Sequence[Sequence[Any]]:
        nonlocal looks
        assert "pg_indexes" in sql
        looks += 1
        if down:
            raise StoreUnavailable("the database is down")
        return [(1,)] if exists else []

    clock = Clock(0.0)
    reader = LogReader(run, "postgres", clock=clock)
    assert not await reader.token_order() and looks == 1
    exists = True
    clock.now += TOKEN_ORDER_CHECK - 1
    assert not await reader.token_order() and looks == 1  # seen a moment ago
    clock.now += 1
    assert await reader.token_order() and looks == 2
    down = True
    clock.now += TOKEN_ORDER_CHECK
    assert await reader.token_order() and looks == 3  # what was last seen holds
    assert await reader.token_order() and looks == 3  # and the failed look is not tried again at once
    down, exists = False, False
    clock.now += TOKEN_ORDER_CHECK
    assert not await reader.token_order() and looks == 4  # dropped: the plain form again
    for engine_name in ("sqlite", "mysql"):  # their token index carries the row id: nothing to look for
        assert not await LogReader(run, engine_name).token_order()
    assert looks == 4


async def explain(
    reader: LogReader, recorder: Recorder, sql: str, params: Sequence[Any], *, hash_groups: bool = False
) -> list[str]:
    if reader.engine == "sqlite":
        return [str(row[3]) for row in await recorder.run("EXPLAIN QUERY PLAN " + sql, params)]
    if reader.engine == "postgres":
        rows = await recorder.run("EXPLAIN " + sql, params, uncounted, hash_groups=hash_groups)
        return [str(row[0]) for row in rows]
    rows = await recorder.run("EXPLAIN " + sql, params)
    return [f"{row[3]}|{row[5]}" for row in rows]  # access type | key


@sqlite_only
async def test_closed_days_cost_no_statement_and_the_open_day_is_read_again(
    gateway: Gateway, settings: Settings
) -> None:
    token = gateway.add_token()
    for day in range(3):
        gateway.add_log(token, created_at=T0 + day * DAY + 3600, quota=10 + day)
    clock = Clock(T0 + 2 * DAY + 7200)
    async with engine(settings, clock) as (history, recorder):
        first = await history.slots(token.id, T0, T0 + 3 * DAY)
        cold = len(recorder.sent)
        # The log's smallest id, the id bounds, one statement for two closed days and the open one.
        assert cold == 3
        assert await history.slots(token.id, T0, T0 + 2 * DAY) == {
            k: v for k, v in first.items() if k[0] < T0 + 2 * DAY
        }
        assert await history.slots(token.id, T0, T0 + 3 * DAY) == first
        assert len(recorder.sent) == cold  # all in-process
        # A new charge on the open day shows once the tail's in-process life is over.
        gateway.add_log(token, created_at=T0 + 2 * DAY + 7000, quota=5)
        clock.now += 0.5
        assert await history.slots(token.id, T0, T0 + 3 * DAY) == first
        clock.now += 0.6
        later = await history.slots(token.id, T0, T0 + 3 * DAY)
        assert later[(T0 + 2 * DAY + 6300, "gpt-4o-mini")] == (5, 10, 5, 1)
        # Only the open day was read again (with the smallest id, a second later, and the id
        # bound of the open day's start, found once).
        assert [sql.count("GROUP BY") for sql, _ in recorder.sent[cold:]] == [0, 0, 1]
        clock.now += 1.1
        sent = len(recorder.sent)
        assert await history.slots(token.id, T0 + 2 * DAY, T0 + 3 * DAY) == {
            k: v for k, v in later.items() if k[0] >= T0 + 2 * DAY
        }
        assert [sql.count("GROUP BY") for sql, _ in recorder.sent[sent:]] == [0, 1]
        assert history.stats.days_read == 2 and history.stats.tails_read == 3


@sqlite_only
async def test_a_day_closes_grace_seconds_after_its_end(gateway: Gateway, settings: Settings) -> None:
    token = gateway.add_token()
    gateway.add_log(token, created_at=T0 + DAY - 10, quota=1)
    clock = Clock(T0 + DAY + GRACE - 1)  # the first day is still open
    async with engine(settings, clock) as (history, _):
        assert sum(quota for quota, *_ in (await history.slots(token.id, T0, T0 + DAY)).values()) == 1
        gateway.add_log(token, created_at=T0 + DAY - 5, quota=2)  # written late, within the grace
        clock.now += 2  # closed now: read once more, then kept
        assert sum(quota for quota, *_ in (await history.slots(token.id, T0, T0 + DAY)).values()) == 3
        assert history.stats.days_read == 1


@sqlite_only
async def test_concurrent_misses_for_a_token_share_one_read(gateway: Gateway, settings: Settings) -> None:
    token = gateway.add_token()
    for day in range(5):
        gateway.add_log(token, created_at=T0 + day * DAY, quota=1)
    async with engine(settings, Clock(T0 + 4 * DAY + 3600)) as (history, recorder):
        history.note_min_id(1, T0 + 4 * DAY + 3600)  # nothing to look at before the read starts
        answers = await asyncio.gather(*(history.slots(token.id, T0, T0 + 5 * DAY) for _ in range(10)))
    assert all(answer == answers[0] for answer in answers) and len(answers[0]) == 5
    assert sum(sql.count("GROUP BY") for sql, _ in recorder.sent) == 1
    assert history.stats.coalesced == 9


@sqlite_only
async def test_a_burst_of_one_tokens_ranges_reads_them_in_turn(gateway: Gateway, settings: Settings) -> None:
    """Requests for different ranges of one token read its log one at a time (review: each
    started its own read once the first had landed, two statements each, and a burst of one
    token's history took every connection the balance's lookups needed)."""
    token = gateway.add_token()
    rows = write_random_log(gateway, [token, gateway.add_token()], days=40, per_day=5, seed=3)
    in_flight = most = 0
    async with engine(settings, Clock(T0 + 39 * DAY + 3600)) as (history, recorder):
        run = recorder.run

        async def counted(
            sql: str, params: Sequence[Any], *resent: Callable[[], None], **options: Any
        ) -> Sequence[Sequence[Any]]:
            nonlocal in_flight, most
            grouping = "GROUP BY" in sql
            in_flight += grouping
            most = max(most, in_flight)
            try:
                await asyncio.sleep(0)  # every request has started before any statement is answered
                return await run(sql, params, *resent, **options)  # type: ignore[no-any-return]
            finally:
                in_flight -= grouping

        recorder.run = counted
        history.note_min_id(1, T0 + 39 * DAY + 3600)  # no look of its own at the log's smallest id
        ranges = [(T0 + first * DAY, T0 + (first + 10) * DAY) for first in range(0, 30, 5)]
        answers = await asyncio.gather(*(history.slots(token.id, start, end) for start, end in ranges))
    assert most <= 2, most  # one read at a time: a long range's two halves at most (12 before)
    for (start, end), answer in zip(ranges, answers, strict=True):
        assert answer == direct(rows, token.id, start, end)


@asynccontextmanager
async def a_first_read_held(
    gateway: Gateway, settings: Settings, token: Token
) -> AsyncIterator[tuple[History, Gate, asyncio.Task[dict[tuple[int, str], Spend]]]]:
    """A token with a charge of 4 on its first day, whose read of that day is under way and held
    at the gate: (its engine, the gate, the read)."""
    gateway.add_log(token, created_at=T0 + 3600, quota=4)
    async with engine(settings, Clock(T0 + 3 * DAY)) as (history, recorder):
        gate = hold_reads(recorder)
        first = asyncio.create_task(history.slots(token.id, T0, T0 + DAY))
        await until(lambda: gate.reached.is_set() or first.done())
        yield history, gate, first


@sqlite_only
async def test_a_request_waits_for_its_tokens_earlier_reads_for_a_bounded_time(
    gateway: Gateway, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read of the token that does not land within TURN_WAIT: the next request for the token
    answers StoreUnavailable (503) rather than queueing for ever; the read itself goes on."""
    monkeypatch.setattr(history_module, "TURN_WAIT", 0.05)
    token = gateway.add_token()
    async with a_first_read_held(gateway, settings, token) as (history, gate, first):
        with pytest.raises(StoreUnavailable, match="still running"):
            await history.slots(token.id, T0 + DAY, T0 + 2 * DAY)
        gate.release.set()
        assert sum(spend[0] for spend in (await first).values()) == 4


@sqlite_only
@pytest.mark.timeout(20)  # the signal interrupts a loop that never yields
async def test_a_read_that_landed_but_has_not_left_the_table_is_not_waited_on(
    gateway: Gateway, settings: Settings
) -> None:
    """A token's read that has just landed stays in the table until its done-callback runs; a
    request that looks in between reads for itself (waiting on a done task does not yield to
    the loop: looking again found it again, for ever, and the worker's loop spun)."""
    token = gateway.add_token()
    gateway.add_log(token, created_at=T0 + 3600, quota=4)
    async with engine(settings, Clock(T0 + 3 * DAY)) as (history, _):

        async def landed() -> None:
            return None

        task = asyncio.create_task(landed())
        await task
        history._flights._tasks[token.id] = task  # type: ignore[assignment]  # as before its callback ran
        answer = await history.slots(token.id, T0, T0 + DAY)
    assert sum(spend[0] for spend in answer.values()) == 4


@sqlite_only
async def test_a_request_that_waited_its_turn_judges_the_tail_when_it_answers(
    gateway: Gateway, settings: Settings
) -> None:
    """A tail fresh for a second when a request began is not served after the request waited
    for its token's other read for longer: freshness is judged when the answer is made (found
    by review: the time was taken once, at the start)."""
    token = gateway.add_token()
    gateway.add_log(token, created_at=T0 + 3600, quota=1)  # day 0, closed
    gateway.add_log(token, created_at=T0 + 3 * DAY + 600, quota=10)  # day 3, open
    clock = Clock(T0 + 3 * DAY + 3600)
    async with engine(settings, clock) as (history, recorder):
        history.note_min_id(1, clock.now, 10**9)
        await history.slots(token.id, T0 + 3 * DAY, T0 + 4 * DAY)  # the tail, fresh for a second
        gate = hold_reads(recorder, first_only=True)
        other = asyncio.create_task(history.slots(token.id, T0, T0 + DAY))  # another range: day 0 read
        await until(gate.reached.is_set)
        mine = asyncio.create_task(history.slots(token.id, T0, T0 + 4 * DAY))  # days 0 to 2 and the tail
        await until(lambda: history.stats.coalesced == 1)  # waiting for its turn
        gateway.add_log(token, created_at=T0 + 3 * DAY + 3000, quota=100)  # charged meanwhile
        clock.now += 8
        gate.release.set()
        await other
        assert await mine == await plain_select(history.reader, token.id, T0, T0 + 4 * DAY)


@sqlite_only
async def test_a_request_over_closed_and_open_days_waits_its_turn_once(
    gateway: Gateway, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The history's sums ask for the closed part and the open part of a range separately: the
    request's wait for its token's turns is bounded once, by TURN_WAIT from its start, not once
    per part (found by review: 2 x TURN_WAIT)."""
    monkeypatch.setattr(history_module, "TURN_WAIT", 1.0)
    token = gateway.add_token()
    gateway.add_log(token, created_at=T0 + 3600, quota=1)
    clock = Clock(T0 + 3 * DAY + 3600)
    loop = asyncio.get_running_loop()
    async with engine(settings, clock) as (history, recorder):
        history.note_min_id(1, clock.now, 10**9)
        sums = DaySums(history)
        first_read, second_read = asyncio.Event(), asyncio.Event()

        async def running(landed: asyncio.Event) -> Any:
            await landed.wait()
            return _Loaded({}, None)

        history._flights._tasks[token.id] = asyncio.create_task(running(first_read))  # another's read
        run = recorder.run

        async def another_begins(
            sql: str, params: Sequence[Any], *resent: Callable[[], None], **options: Any
        ) -> Sequence[Sequence[Any]]:
            # While this request reads its closed days, another read of the token begins.
            if "GROUP BY" in sql:
                history._flights._tasks[token.id] = asyncio.create_task(running(second_read))
            return await run(sql, params, *resent, **options)  # type: ignore[no-any-return]

        recorder.run = another_begins
        began = loop.time()
        loop.call_later(0.9, first_read.set)  # the first read lands just within the turn
        with pytest.raises(StoreUnavailable, match="still running"):
            await sums.sums(token.id, tuple(T0 + day * DAY for day in range(5)), T0 + 4 * DAY)
        waited = loop.time() - began
        second_read.set()
        assert waited < 1.5, waited  # 1.9 s with a deadline per part


@sqlite_only
async def test_a_token_whose_queue_of_requests_is_full_is_answered_at_once(
    gateway: Gateway, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past TURN_QUEUE requests of one token waiting for its read, the next is answered
    StoreUnavailable (503) at once; the waiting ones are answered when the read lands."""
    monkeypatch.setattr(history_module, "TURN_QUEUE", 2)
    token = gateway.add_token()
    async with a_first_read_held(gateway, settings, token) as (history, gate, first):
        waiting = [asyncio.create_task(history.slots(token.id, T0, T0 + DAY)) for _ in range(2)]
        await until(lambda: history.stats.coalesced == 2)
        with pytest.raises(StoreUnavailable, match="at once"):
            await history.slots(token.id, T0, T0 + DAY)
        gate.release.set()
        answers = await asyncio.gather(first, *waiting)
        assert all(sum(spend[0] for spend in answer.values()) == 4 for answer in answers)


@sqlite_only
async def test_a_request_that_waited_on_anothers_read_counts_each_day_once(
    gateway: Gateway, settings: Settings
) -> None:
    """usage_history_days_total and usage_history_tails_total count each day (and tail) a request
    answers once, under the layer it came from: a request that waited on another's read and then
    looked again counted the days it had found held before the wait a second time."""
    token = gateway.add_token()
    for day in range(11):
        gateway.add_log(token, created_at=T0 + day * DAY + 3600, quota=day + 1)
    clock = Clock(T0 + 10 * DAY + 7200)  # days 0 to 9 closed, day 10 open
    async with engine(settings, clock) as (history, recorder):
        await history.slots(token.id, T0 + 7 * DAY, T0 + 11 * DAY)  # days 7 to 9 and the tail, held
        stats = history.stats
        before = dataclasses.replace(stats)
        # The next read of the log's spending is held once it has read (injected ordering).
        gate = hold_reads(recorder)
        first = asyncio.create_task(history.slots(token.id, T0, T0 + 11 * DAY))
        await until(lambda: gate.reached.is_set() or first.done())  # reading days 0 to 6
        assert not first.done(), first.result()
        second = asyncio.create_task(history.slots(token.id, T0, T0 + 11 * DAY))
        await until(lambda: stats.coalesced > before.coalesced)  # waiting on that read
        gate.release.set()
        answers = await asyncio.gather(first, second)
        assert answers[0] == answers[1] == await plain_select(history.reader, token.id, T0, T0 + 11 * DAY)
    assert sum(sql.count("GROUP BY") for sql, _ in recorder.sent) == 2  # the warm-up's and the first's
    # Two answers of ten closed days and the tail each: the first took 3 days in-process and read
    # 7, the second took all 10 in-process after its wait; both took the tail in-process.
    days = {
        "local": stats.days_local - before.days_local,
        "redis": stats.days_redis - before.days_redis,
        "database": stats.days_read - before.days_read,
    }
    tails = {
        "local": stats.tails_local - before.tails_local,
        "redis": stats.tails_redis - before.tails_redis,
        "database": stats.tails_read - before.tails_read,
    }
    assert (days, tails) == ({"local": 13, "redis": 0, "database": 7}, {"local": 2, "redis": 0, "database": 0})


@sqlite_only
async def test_cleaned_rows_are_gone_from_the_answer(gateway: Gateway, settings: Settings) -> None:
    """The gateway's clean-up deletes the oldest rows: cached days it reached are read again, and
    show what is left (the gateway's truth); days it did not reach stay cached."""
    token = gateway.add_token()
    for day in range(4):
        gateway.add_log(token, created_at=T0 + day * DAY + 3600, quota=1)
        gateway.add_log(token, created_at=T0 + day * DAY + 7200, quota=10)
    clock = Clock(T0 + 4 * DAY + 3600)
    async with engine(settings, clock) as (history, recorder):
        before = await history.slots(token.id, T0, T0 + 4 * DAY)
        assert sum(quota for quota, *_ in before.values()) == 44
        gateway._execute("DELETE FROM logs WHERE created_at < ?", (T0 + DAY + 5000,))  # day 0, half of day 1
        clock.now += 0.5  # the clean-up is not seen yet
        assert await history.slots(token.id, T0, T0 + 4 * DAY) == before
        clock.now += 1
        sent = len(recorder.sent)
        after = await history.slots(token.id, T0, T0 + 4 * DAY)
        assert sum(quota for quota, *_ in after.values()) == 32
        assert after == await plain_select(history.reader, token.id, T0, T0 + 4 * DAY)
        assert history.stats.cleaned == 2
        # Days 2 and 3 were still good: only days 0 and 1 were read again, in one statement.
        assert sum(sql.count("GROUP BY") for sql, _ in recorder.sent[sent:]) == 1


def restore_logs(gateway: Gateway, upto: int) -> None:
    """Take the log back to a backup holding the rows up to id `upto`, as SQLite's backup API
    (`.restore`) writes it into the same file: the later rows are gone, and new ones take
    their ids again."""
    gateway.db.execute("DELETE FROM logs WHERE id > ?", (upto,))
    gateway.db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'logs'", (upto,))


@sqlite_only
async def test_a_log_restored_from_a_backup_is_read_with_new_bounds(gateway: Gateway, settings: Settings) -> None:
    """The gateway's log is restored from a backup taken 3 hours before the open day began: a
    new charge takes an id below the one the engine found (and kept) as the bound below the day's
    start. Once it sees the log's largest id below that bound, it finds its bounds again. (It
    kept them: the open day lacked every new charge, until a restart.)"""
    token = gateway.add_token()
    backup = gateway.add_log(token, created_at=T0 - 3 * 3600, quota=1)
    for i in range(5):
        gateway.add_log(token, created_at=T0 - 7200 + i * 600, quota=1)
    gateway.add_log(token, created_at=T0 + 3600, quota=100)
    clock = Clock(T0 + 2 * 3600)
    today = (T0, T0 + DAY)
    async with engine(settings, clock) as (history, _):
        assert sum(quota for quota, *_ in (await history.slots(token.id, *today)).values()) == 100
        restore_logs(gateway, backup)
        gateway.add_log(token, created_at=int(clock.now), quota=7)
        clock.now += history_module.CLEANUP_CHECK  # (and the open day read lately is no longer fresh)
        answer = await history.slots(token.id, *today)
        assert answer == await plain_select(history.reader, token.id, *today)
        assert sum(quota for quota, *_ in answer.values()) == 7


@sqlite_only
async def test_database_down(gateway: Gateway, settings: Settings) -> None:
    """Closed days in the cache are served; anything that needs the database raises StoreUnavailable.

    Down: the gateway holds its database locked (as a migration would) past USAGE_DB_TIMEOUT."""
    token = gateway.add_token()
    for day in range(3):
        gateway.add_log(token, created_at=T0 + day * DAY, quota=1)
    clock = Clock(T0 + 2 * DAY + 3600)
    async with engine(settings, clock) as (history, _):
        closed = await history.slots(token.id, T0, T0 + 2 * DAY)
        with gateway.exclusive_lock():
            clock.now += 5  # the look at the smallest id fails too: the last one stands
            assert await history.slots(token.id, T0, T0 + 2 * DAY) == closed
            with pytest.raises(StoreUnavailable):
                await history.slots(token.id, T0, T0 + 3 * DAY)  # the open day
            with pytest.raises(StoreUnavailable):
                await history.slots(token.id, T0 - DAY, T0 + DAY)  # a day never read
        whole = await history.slots(token.id, T0, T0 + 3 * DAY)
        assert len(whole) == 3
        with gateway.exclusive_lock():
            clock.now += 5  # the open day read lately stands in (stale-if-error)...
            assert await history.slots(token.id, T0, T0 + 3 * DAY) == whole
            assert history.stats.stale_served == 1
            clock.now += 300  # ...for USAGE_STALE_IF_ERROR
            with pytest.raises(StoreUnavailable):
                await history.slots(token.id, T0, T0 + 3 * DAY)


@asynccontextmanager
async def shared_redis(settings: Settings, url: str) -> AsyncIterator[SharedRedis]:
    redis = _open_redis(dataclasses.replace(settings, redis_url=url))
    assert redis is not None
    try:
        yield redis
    finally:
        await redis.close()


@asynccontextmanager
async def worker(
    settings: Settings, clock: Clock, redis: SharedRedis | None
) -> AsyncIterator[tuple[History, Recorder]]:
    """A History as one worker of a deployment has it: its own connections, the shared Redis."""
    store = await open_store(settings)
    try:
        inner = store.log_reader()
        recorder = Recorder(inner._run)
        history = History(LogReader(recorder, inner.engine), days=redis.history_days if redis else None, clock=clock)
        yield history, recorder
        await history.close()
    finally:
        await store.close()


def group_bys(recorder: Recorder, since: int = 0) -> int:
    return sum(sql.count("GROUP BY") for sql, _ in recorder.sent[since:])


@sqlite_only
@pytest.mark.redis_topologies
async def test_closed_days_are_read_once_per_deployment(gateway: Gateway, settings: Settings, redis_url: str) -> None:
    token = gateway.add_token()
    for day in range(5):
        gateway.add_log(token, created_at=T0 + day * DAY + 60, quota=day + 1)
    clock = Clock(T0 + 5 * DAY + 3600)
    async with shared_redis(settings, redis_url) as redis:
        async with worker(settings, clock, redis) as (first, first_sent):
            answer = await first.slots(token.id, T0, T0 + 5 * DAY)
        assert group_bys(first_sent) == 1
        # Another worker (or this one after a restart): the days come from Redis.
        async with worker(settings, clock, redis) as (second, second_sent):
            assert await second.slots(token.id, T0, T0 + 5 * DAY) == answer
            assert group_bys(second_sent) == 0 and len(second_sent.sent) == 1  # the log's smallest id
            assert second.stats.days_redis == 5
            # Clean-up: what Redis holds of the days it reached is not served as if their rows were there.
            gateway._execute("DELETE FROM logs WHERE created_at < ?", (T0 + 2 * DAY,))
        async with worker(settings, clock, redis) as (third, third_sent):
            after = await third.slots(token.id, T0, T0 + 5 * DAY)
            assert sum(quota for quota, *_ in after.values()) == 3 + 4 + 5
            assert third.stats.days_redis == 3 and third.stats.days_read == 2
            assert group_bys(third_sent) == 1


@sqlite_only
async def test_a_damaged_day_in_redis_is_read_again(
    gateway: Gateway, settings: Settings, redis_url: str, redis_client: Any
) -> None:
    token = gateway.add_token()
    gateway.add_log(token, created_at=T0 + 60, quota=7)
    clock = Clock(T0 + 2 * DAY)
    async with shared_redis(settings, redis_url) as redis:
        redis_client.set(redis.history_days.key(token.id, T0 // DAY), b"\x00not json")
        async with worker(settings, clock, redis) as (history, recorder):
            assert (await history.slots(token.id, T0, T0 + DAY))[(T0, "gpt-4o-mini")][0] == 7
            assert group_bys(recorder) == 1
    assert Day.decode(T0 // DAY, redis_client.get(redis.history_days.key(token.id, T0 // DAY))).guard == 1


@sqlite_only
async def test_redis_down_answers_from_the_database(gateway: Gateway, settings: Settings) -> None:
    token = gateway.add_token()
    for day in range(3):
        gateway.add_log(token, created_at=T0 + day * DAY + 60, quota=1)
    clock = Clock(T0 + 2 * DAY + 3600)
    async with shared_redis(settings, f"redis://127.0.0.1:{free_port()}/0") as redis:
        async with worker(settings, clock, redis) as (history, _):
            answer = await history.slots(token.id, T0, T0 + 3 * DAY)
    assert answer == await_direct(gateway, token.id)


def await_direct(gateway: Gateway, token_id: int) -> dict[tuple[int, str], Spend]:
    rows = gateway.db.execute(
        "SELECT created_at, model_name, type, quota, prompt_tokens, completion_tokens FROM logs WHERE token_id = ?",
        (token_id,),
    ).fetchall()
    keys = ("created_at", "model_name", "type", "quota", "prompt_tokens", "completion_tokens")
    return direct([{"token_id": token_id, **dict(zip(keys, r, strict=True))} for r in rows], token_id, 0, 2**40)


@sqlite_only
@pytest.mark.redis_topologies
async def test_months_asked_for_at_once_share_a_few_mgets(settings: Settings, redis_url: str) -> None:
    """A started worker's first polls ask Redis for a month of closed days per token, hundreds of
    tokens at once: they go out as a few MGETs (one each would queue for the pool's connections
    past the timeout, and those timeouts open the breaker)."""
    # A generous timeout: this counts the batches, and a loaded machine's late answer would be
    # a missing month, not a batch more (a Cluster's nodes are three processes on two cores).
    redis = _open_redis(dataclasses.replace(settings, redis_url=redis_url, redis_timeout=5.0))
    assert redis is not None
    try:
        days = range(T0 // DAY, T0 // DAY + 30)
        stored = {(token_id, day): Day({}, token_id).encode(day) for token_id in range(1, 301) for day in days}
        for token_id in range(1, 301):
            await redis.history_days.put_many(token_id, {day: stored[token_id, day] for day in days})
        tokens = range(1, 301)
        months = await asyncio.gather(*(redis.history_days.get_many(t, [*days, days[-1] + 1]) for t in tokens))
        assert all(month == {day: stored[t, day] for day in days} for t, month in zip(tokens, months, strict=True))
        assert redis.history_days._reads.batches <= 2 + 300 * 31 // 1024 + 1
    finally:
        await redis.close()


async def test_a_range_beyond_ten_years_is_refused(gateway: Gateway, settings: Settings) -> None:
    async with engine(settings, Clock(T0)) as (history, recorder):
        with pytest.raises(ValueError, match="more than 3660 days"):
            await history.slots(1, 0, T0)
    assert recorder.sent == []


async def test_day_sums_keep_the_closed_part_and_ask_only_for_the_open_one(
    gateway: Gateway, settings: Settings
) -> None:
    """A month polled again costs the open day alone; a closed day's sums are redone only when
    the day boundary moves or the gateway's clean-up reached the log."""
    from usage_service.days import DaySums, by_day_and_model

    token = gateway.add_token()
    for day in range(4):
        gateway.add_log(token, created_at=T0 + day * DAY + 3600, quota=10 * (day + 1), model_name="m")
    clock = Clock(T0 + 3 * DAY + 7200)  # the fourth day is open
    starts = tuple(T0 + day * DAY for day in range(5))  # four days

    async def truth(history: History) -> dict[tuple[int, str], object]:
        slots = await history.slots(token.id, starts[0], starts[-1])
        return {k: (quota, requests) for k, (quota, _, _, requests) in by_day_and_model(slots, starts).items()}

    async with engine(settings, clock) as (history, _):
        sums = DaySums(history)
        first = await sums.sums(token.id, starts, starts[-1])
        assert {k: (quota, requests) for k, (quota, _, _, requests) in first.items()} == await truth(history)
        looked_up = history.stats.days_local + history.stats.days_redis + history.stats.days_read
        # A new charge today: in the next answer, without the closed days being looked at again.
        gateway.add_log(token, created_at=T0 + 3 * DAY + 7000, quota=5, model_name="m")
        clock.now += 2  # past the open day's in-process life
        again = await sums.sums(token.id, starts, starts[-1])
        assert history.stats.days_local + history.stats.days_redis + history.stats.days_read == looked_up
        assert (again[(3, "m")][0], again[(0, "m")][0]) == (45, 10)
        assert first[(0, "m")][0] == 10 and first[(3, "m")][0] == 40  # kept sums never added to
        # The clean-up takes the first day: the kept sums are redone, without it.
        gateway.clean_logs(before=T0 + DAY)
        clock.now += 60
        cleaned = await sums.sums(token.id, starts, starts[-1])
        assert (0, "m") not in cleaned and cleaned[(1, "m")][0] == 20
        # The fourth day closes: it moves to the kept part, and the answer is the same.
        clock.now = T0 + 4 * DAY + GRACE + 1
        closed = await sums.sums(token.id, starts, starts[-1])
        assert {k: (quota, requests) for k, (quota, _, _, requests) in closed.items()} == await truth(history)
        assert closed[(3, "m")][0] == 45


@sqlite_only
async def test_day_sums_count_the_days_that_key_a_range_in_their_bound(gateway: Gateway, settings: Settings) -> None:
    """A client may name many ranges of 100 days with nothing in them: each keeps no sum, but is
    keyed by 101 day starts, which the bound counts (it counted one per range: some 3.5 KB held
    for each, about 3.3 GiB at the bound)."""
    from usage_service.days import STARTS_PER_SUM, DaySums

    token = gateway.add_token()
    async with engine(settings, Clock(T0 + 200 * DAY)) as (history, _):
        sums = DaySums(history, max_sums=300)
        for first in range(50):
            starts = tuple(T0 + (first + day) * DAY for day in range(101))
            assert await sums.sums(token.id, starts, starts[-1]) == {}
        assert sums.kept_sums <= 300
        assert len(sums._kept) == 300 // (1 + 101 // STARTS_PER_SUM)


async def test_day_sums_of_a_local_day_partly_closed_come_in_day_and_model_order(
    gateway: Gateway, settings: Settings
) -> None:
    """At UTC+12 the day boundary (a UTC midnight) falls inside a local day: its closed part is
    kept, its open part added, and a model seen only in the open part still comes in order."""
    from usage_service.days import DaySums, by_day_and_model

    token = gateway.add_token()
    starts = (T0 - DAY // 2, T0 + DAY // 2, T0 + 3 * DAY // 2)  # two local days at UTC+12
    gateway.add_log(token, created_at=T0 - 3600, quota=1, model_name="o3")  # day 0, closed
    gateway.add_log(token, created_at=T0 + 3600, quota=2, model_name="gpt-4o")  # day 0, open
    gateway.add_log(token, created_at=T0 + DAY // 2 + 3600, quota=4, model_name="a")  # day 1, open
    clock = Clock(T0 + DAY // 2 + 7200)  # the UTC day starting at T0 is open
    async with engine(settings, clock) as (history, _):
        sums = await DaySums(history).sums(token.id, starts, starts[-1])
        assert list(sums) == [(0, "gpt-4o"), (0, "o3"), (1, "a")]
        expected = by_day_and_model(await history.slots(token.id, starts[0], starts[-1]), starts)
        assert sums == expected


async def test_postgres_reads_a_busy_tokens_month_through_the_index_in_token_order(
    postgres_server: PostgresServer,
) -> None:
    """Under the statistics of a busy log (one token a tenth of the rows over 90 days), PostgreSQL
    plans `token_id = ? AND id > ? AND id < ?` on the primary key's range, in parallel: every
    token's rows of the month, a tenth of them the token's. With the index in token order, the
    month's statement reads the token's range of that index instead."""
    gateway = PostgresGateway(postgres_server, "busy-log", schema=POSTGRES_LOGS_SCHEMA)
    conn: Any = gateway.conn
    try:
        conn.execute(
            "INSERT INTO logs (user_id, created_at, type, model_name, quota, token_id)"
            " SELECT 1, %s + g * 26, 2, 'gpt-4o', 7, CASE WHEN g %% 10 = 0 THEN 1 ELSE 2 + g %% 997 END"
            " FROM generate_series(1, 300000) AS g",
            (T0,),
        )
        conn.execute(f"CREATE INDEX {TOKEN_ORDER_INDEX} ON logs (token_id, id)")
        conn.execute("ANALYZE logs")
        # Parallel plans as cheap as a log of millions of rows makes them: at that scale the
        # planner takes the primary key's range in parallel (the bench's 10,000,000 rows do).
        for setting in ("parallel_setup_cost", "parallel_tuple_cost", "min_parallel_index_scan_size"):
            conn.execute(f"SET {setting} = 0")
        sent: list[tuple[str, Sequence[Any]]] = []

        async def run(
            sql: str, params: Sequence[Any], resent: Callable[[], None], **options: Any
        ) -> Sequence[Sequence[Any]]:
            if "pg_indexes" in sql:  # the reader's look for the index: the database answers
                return conn.execute(sql.replace("%", "%%")).fetchall()  # type: ignore[no-any-return]
            sent.append((sql, params))
            return []

        reader = LogReader(run, "postgres")
        month_start, month_end = T0 + 60 * DAY, T0 + 90 * DAY
        low, high = (
            conn.execute(
                f"SELECT {f}(id) FROM logs WHERE created_at >= %s AND created_at < %s", (month_start, month_end)
            ).fetchone()[0]
            for f in ("min", "max")
        )
        await spending(reader, [1], SLOT, start=month_start, end=month_end, after_id=low - 1, before_id=high + 1)
        ((sql, params),) = sent
        conn.execute(f"PREPARE month AS {sql}")
        try:
            values = ", ".join(str(value) for value in params)
            plan = "\n".join(row[0] for row in conn.execute(f"EXPLAIN EXECUTE month({values})").fetchall())
        finally:
            conn.execute("DEALLOCATE month")
        assert TOKEN_ORDER_INDEX in plan and "logs_pkey" not in plan, plan
    finally:
        conn.execute("DROP TABLE logs")
        conn.execute(POSTGRES_LOGS_SCHEMA)
        gateway.close()


@sqlite_only
async def test_the_marks_pass_over_text_in_created_at(gateway: Gateway, settings: Settings) -> None:
    """SQLite keeps whatever it is given: text in created_at sorts after every number, so the
    log's newest time was that text, and every history round failed on it ("refresh failed",
    with a traceback, each second). One bad row fails nothing but itself."""
    token = gateway.add_token()
    first = gateway.add_log(token, created_at=T0)
    bad = gateway.add_log(token, created_at=T0 + 50)
    gateway.add_log(token, created_at=T0 + 100)
    gateway._execute("UPDATE logs SET created_at = 'abc' WHERE id = ?", (bad,))
    store = await open_store(settings)
    try:
        # The newest number is T0 + 100: settled up to 60 s before it, the row stamped T0.
        assert await marks(store.log_reader(), T0 + 1000, 60) == (first, first, T0 + 40, None, first + 2)
    finally:
        await store.close()


async def test_a_row_stamped_in_the_future_fails_no_other_rows(gateway: Gateway, settings: Settings) -> None:
    """A day's rows are read up to the id of the first row stamped MARGIN after its end. A row
    stamped years ahead (a gateway clock gone wrong), written before the day's rows, was that
    row while no later row had come yet: the day was read without them, and kept so."""
    token, other = gateway.add_token(), gateway.add_token()
    gateway.add_log(other, created_at=4_102_444_800)  # 2100-01-01
    gateway.add_log(token, created_at=T0 + 3600, quota=7)
    gateway.add_log(token, created_at=T0 + DAY - 60)
    async with engine(settings, Clock(T0 + DAY + GRACE + 1)) as (history, _):  # the day has just closed
        answer = await history.slots(token.id, T0, T0 + DAY)
        assert answer == await plain_select(history.reader, token.id, T0, T0 + DAY)
        assert sum(quota for quota, *_ in answer.values()) == 107


@sqlite_only
async def test_text_in_created_at_fails_no_other_rows(gateway: Gateway, settings: Settings) -> None:
    """SQLite's text sorts after every number: a row with text in created_at was the first row
    stamped after any moment that no later row had reached yet (as above)."""
    token = gateway.add_token()
    bad = gateway.add_log(token, created_at=T0)
    gateway._execute("UPDATE logs SET created_at = 'abc' WHERE id = ?", (bad,))
    gateway.add_log(token, created_at=T0 + 3600, quota=7)
    async with engine(settings, Clock(T0 + DAY + GRACE + 1)) as (history, _):
        answer = await history.slots(token.id, T0, T0 + DAY)
        assert sum(quota for quota, *_ in answer.values()) == 7


async def test_a_row_stamped_before_the_log_began_fails_no_other_rows(gateway: Gateway, settings: Settings) -> None:
    """A range's rows are read from the id of the last row stamped MARGIN before its start. A
    row stamped 0, written after the range's first rows, was that row for a range from the log's
    beginning (a new gateway's 30 days): the rows before it were left out."""
    token = gateway.add_token()
    gateway.add_log(token, created_at=T0 + 3600, quota=7)
    gateway.add_log(token, created_at=0, quota=1000)
    gateway.add_log(token, created_at=T0 + 7200, quota=5)
    async with engine(settings, Clock(T0 + 2 * DAY)) as (history, _):
        answer = await history.slots(token.id, T0, T0 + DAY)
        assert answer == await plain_select(history.reader, token.id, T0, T0 + DAY)
        assert sum(quota for quota, *_ in answer.values()) == 12
