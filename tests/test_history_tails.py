"""Polled tokens' open days kept fresh by the refresher's rounds (usage_service/tails.py): a new
charge shows after one round, the database cost is flat in polls and workers, and what is kept
stays equal to a direct SELECT as rows settle, days close, leaders and Redis come and go.

Rounds are driven by calling `Refresher.tick()`; the clock the engine reads is injected; workers
hear a round through the real pub/sub channel, awaited on an event (no sleeps)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

import orjson
import pytest
import redis
from conftest import GatewayFactory
from dbservers import PostgresGateway
from support import Gateway, Token, free_port, sample_value
from test_freshness import Gate, GatedStore, until
from test_history import T0, Clock, Recorder, explain, plain_select

from usage_service.app import _open_redis
from usage_service.billing import BillingOptions, GatewayOptions
from usage_service.cache import AnswerCache, key_digest
from usage_service.config import Settings
from usage_service.days import DaySums
from usage_service.history import DAY, GRACE, SLOT, History, Tail
from usage_service.hotset import renote_interval
from usage_service.lookup import TokenLookup
from usage_service.records import TokenRecord
from usage_service.refresh import Refresher
from usage_service.responses import JSONError
from usage_service.routing import SCOPE_KEY
from usage_service.services import Services
from usage_service.shared import SharedRedis
from usage_service.store import StoreUnavailable, open_store
from usage_service.store.logs import LogReader
from usage_service.tails import LATE, SETTLE, TailKeeper
from usage_service.usage_history import HistoryEndpoint

pytestmark = pytest.mark.asyncio

NOON = T0 + DAY // 2


@dataclasses.dataclass
class Worker:
    history: History
    keeper: TailKeeper
    refresher: Refresher
    recorder: Recorder
    redis: SharedRedis | None
    heard: asyncio.Condition
    rounds_heard: int = 0
    rounds_begun: int = 0  # announcements heard on the channel that the leader's round began

    async def hear_next_round(self, after: int) -> None:
        async with self.heard:
            await asyncio.wait_for(self.heard.wait_for(lambda: self.rounds_heard > after), timeout=10)


@asynccontextmanager
async def worker(
    settings: Settings, clock: Clock, redis_url: str | None, *, listen: bool = True
) -> AsyncIterator[Worker]:
    """One worker as the app builds it: its own connections, History, TailKeeper and Refresher,
    and (with Redis) the invalidation listener."""
    # A generous Redis timeout: a call that times out on a loaded machine would read the database
    # instead, and these tests count statements.
    settings = dataclasses.replace(settings, redis_url=redis_url, refresh_interval=1.0, redis_timeout=5.0)
    async with contextlib.AsyncExitStack() as stack:
        store = await open_store(settings)
        stack.push_async_callback(store.close)
        redis = _open_redis(settings)
        if redis is not None:
            stack.push_async_callback(redis.close)
        inner = store.log_reader()
        recorder = Recorder(inner._run)
        history = History(
            LogReader(recorder, inner.engine),
            days=redis.history_days if redis else None,
            tails=redis.history_tails if redis else None,
            clock=clock,
            confirmed_for=2.0,
            note_polls=True,
            kept_while_asked=settings.hot_window - renote_interval(settings.hot_window),  # as the app's
        )
        stack.push_async_callback(history.close)
        keeper = TailKeeper(history, settings, clock=clock)
        lookup = TokenLookup(store, redis.records if redis else None, settings)
        refresher = Refresher(lookup, store, redis, settings, tails=keeper)
        me = Worker(history, keeper, refresher, recorder, redis, asyncio.Condition())
        if redis is not None and listen:
            live = asyncio.Event()

            def on_live(up: bool) -> None:
                history.set_live(up)
                if up:
                    live.set()

            def on_history(
                as_of: float,
                min_id: int,
                complete: bool,
                changed: list[tuple[int, bytes | None]],
                epoch: str,
                max_id: int | None,
            ) -> None:
                history.hear_round(as_of, min_id, complete, changed, epoch, max_id)
                me.rounds_heard += 1

                async def notify() -> None:
                    async with me.heard:
                        me.heard.notify_all()

                asyncio.get_running_loop().create_task(notify())

            def on_history_round(until: float | None) -> None:
                history.hear_round_began(until)
                if until is not None:
                    me.rounds_begun += 1

            assert await redis.ping()  # as the lifespan does first (a Cluster client learns its slots)
            listener = asyncio.create_task(
                redis.channel.listen(lambda _: None, lambda _: None, on_live, on_history, on_history_round)
            )

            async def stop() -> None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener

            stack.push_async_callback(stop)
            await asyncio.wait_for(live.wait(), timeout=10)
        yield me
        if me.refresher.lock is not None and me.refresher.stats.leader:
            with contextlib.suppress(Exception):
                await me.refresher.lock.release()


async def round_heard(leader: Worker, *workers: Worker) -> None:
    """Run one round on `leader` and wait until every worker heard it."""
    before = [w.rounds_heard for w in workers]
    await leader.refresher.tick()
    assert leader.refresher.stats.leader
    for w, seen in zip(workers, before, strict=True):
        await w.hear_next_round(seen)


async def lead_and_follow(leader: Worker, follower: Worker, tokens: list[Token], today: tuple[int, int]) -> None:
    """Both workers poll every token's open day (read directly, coalesced, and noted); the first
    takes the lead and keeps them, the second notes its polls and follows; both hear the round."""
    for w in (leader, follower):
        for token in tokens:
            await w.history.slots(token.id, *today)
    await leader.refresher.tick()
    await follower.refresher.tick()
    await round_heard(leader, leader, follower)
    assert not follower.refresher.stats.leader


def truth(w: Worker) -> LogReader:
    """A reader of the worker's database that the engine's count does not see."""
    return LogReader(w.recorder.run, w.history.reader.engine)


def sent(w: Worker) -> int:
    return len(w.recorder.sent)


@pytest.mark.redis_topologies
async def test_a_new_charge_shows_after_one_round_at_a_flat_cost(
    gateway: Gateway, settings: Settings, redis_url: str
) -> None:
    tokens = [gateway.add_token() for _ in range(30)]
    for token in tokens:
        gateway.add_log(token, created_at=T0 - DAY + 60, quota=1000)  # a closed day
    for i, token in enumerate(tokens):
        gateway.add_log(token, created_at=NOON - 3600 + i, quota=i + 1)
    clock = Clock(NOON)
    today = (T0, T0 + DAY)
    async with worker(settings, clock, redis_url) as a, worker(settings, clock, redis_url) as b:
        await lead_and_follow(a, b, tokens, today)
        # Every poll from now on is answered without a statement, in-process: the round named
        # every token it saw first with its tail's fingerprint, and b already held those very
        # tails (it read them itself), so it kept them rather than fetch them from Redis.
        before = sent(a), sent(b)
        for _ in range(5):
            for w in (a, b):
                answers = await asyncio.gather(*(w.history.slots(t.id, *today) for t in tokens))
                assert [sum(quota for quota, *_ in ans.values()) for ans in answers] == [i + 1 for i in range(30)]
        assert (sent(a), sent(b)) == before
        assert b.history.stats.tails_redis == 0

        # A charge: shown by both workers after one round, which cost two statements.
        gateway.add_log(tokens[3], created_at=int(clock.now) - 1, quota=500, model_name="claude")
        clock.now += 1
        round_started = sent(a)
        await round_heard(a, a, b)
        assert sent(a) - round_started == 2
        for w in (a, b):
            answer = await w.history.slots(tokens[3].id, *today)
            assert answer[(NOON - 900, "claude")] == (500, 10, 5, 1)
            assert answer == await plain_select(truth(w), tokens[3].id, *today)
        # More polling, more rounds: still two statements a round.
        for _ in range(3):
            for w in (a, b):
                await asyncio.gather(*(w.history.slots(t.id, *today) for t in tokens))
            clock.now += 1
            round_started = sent(a)
            await round_heard(a, a, b)
            assert sent(a) - round_started == 2
        assert sent(b) == before[1]  # b, a follower, sent nothing since its first polls


async def test_a_charge_reaches_the_history_while_the_balances_round_is_still_reading(
    gateway: Gateway, settings: Settings, redis_url: str
) -> None:
    """A round refreshes the records and the history's open days side by side: with the leader's
    read of the balances held, the round's word on a new charge still reaches every worker."""
    tokens = [gateway.add_token() for _ in range(3)]
    for token in tokens:
        gateway.add_log(token, created_at=NOON - 3600, quota=10)
    clock = Clock(NOON)
    today = (T0, T0 + DAY)
    async with worker(settings, clock, redis_url) as a, worker(settings, clock, redis_url) as b:
        await lead_and_follow(a, b, tokens, today)
        assert a.redis is not None
        await a.redis.hot_set.note({key_digest(tokens[0].key.encode()): tokens[0].id}, time.time())
        gate = Gate()
        a.refresher.store = cast(Any, GatedStore(a.refresher.store, gate))
        gateway.add_log(tokens[1], created_at=int(clock.now) - 1, quota=500, model_name="claude")
        clock.now += 1
        heard = b.rounds_heard
        round_ = asyncio.create_task(a.refresher.tick())
        try:
            await asyncio.wait_for(gate.reached.wait(), timeout=10)  # the records' read is held...
            await b.hear_next_round(heard)  # ...and the history's word came all the same
            answer = await b.history.slots(tokens[1].id, *today)
            assert answer[(NOON - 900, "claude")] == (500, 10, 5, 1)
            assert answer == await plain_select(truth(b), tokens[1].id, *today)
        finally:
            gate.release.set()
            await round_
        assert a.refresher.stats.leader and a.refresher.stats.tokens == 1


@pytest.mark.parametrize("engine", ["sqlite", "postgres", "mysql"])
async def test_kept_tails_equal_a_direct_select_as_rows_settle(
    make_gateway: GatewayFactory, settings: Settings, redis_url: str, engine: str
) -> None:
    """A gateway appending between rounds (some rows late, refunds, errors, other tokens): what
    the rounds keep equals a direct SELECT after every round, on every engine."""
    gateway = make_gateway(engine)
    settings = dataclasses.replace(settings, sqlite_path=gateway.path, database=gateway.database)  # type: ignore[arg-type]
    rng = random.Random(7)
    polled = [gateway.add_token() for _ in range(4)]
    others = [gateway.add_token(user_id=polled[0].user_id), gateway.add_token()]
    clock = Clock(NOON)
    today = (T0, T0 + DAY)
    async with worker(settings, clock, redis_url) as w:
        for token in polled:
            await w.history.slots(token.id, *today)
        for _ in range(12):
            for _ in range(rng.randint(0, 6)):
                gateway.add_log(
                    rng.choice(polled + others),
                    created_at=int(clock.now) - rng.randint(0, 15),
                    type=rng.choice([2, 2, 5, 6]),
                    model_name=rng.choice(["a", "b"]),
                    quota=rng.randint(1, 100),
                )
            clock.now += SETTLE / 3
            await round_heard(w, w)
            for token in polled:
                assert await w.history.slots(token.id, *today) == await plain_select(truth(w), token.id, *today)
        assert w.keeper.stats.initialised == len(polled)  # each read whole once, then kept


async def test_the_day_closes_under_the_rounds(gateway: Gateway, settings: Settings, redis_url: str) -> None:
    token = gateway.add_token()
    gateway.add_log(token, created_at=T0 + DAY - 30, quota=1)
    clock = Clock(T0 + DAY - 20)
    span = (T0, T0 + 2 * DAY)
    async with worker(settings, clock, redis_url) as w:
        await w.history.slots(token.id, *span)
        await round_heard(w, w)
        gateway.add_log(token, created_at=T0 + DAY - 5, quota=2)
        gateway.add_log(token, created_at=T0 + DAY + 10, quota=4)  # the next day
        clock.now = T0 + DAY + 15
        await round_heard(w, w)
        assert sum(quota for quota, *_ in (await w.history.slots(token.id, *span)).values()) == 7
        clock.now = T0 + DAY + GRACE + 1  # day one is closed now
        gateway.add_log(token, created_at=int(clock.now) - 1, quota=8)
        await round_heard(w, w)
        answer = await w.history.slots(token.id, *span)
        assert answer == await plain_select(truth(w), token.id, *span)
        assert sum(quota for quota, *_ in answer.values()) == 15
        # Rounds stalled across the close: the round that closes the day reads what came since
        # the last one and hands it over all the same (it was read directly, once).
        assert w.history.stats.days_read == 0 and w.history.stats.days_redis == 1


@pytest.mark.parametrize("redis", ["none", "down"])
async def test_without_redis_each_worker_keeps_its_own(gateway: Gateway, settings: Settings, redis: str) -> None:
    token = gateway.add_token()
    gateway.add_log(token, created_at=NOON - 100, quota=1)
    clock = Clock(NOON)
    url = None if redis == "none" else f"redis://127.0.0.1:{free_port()}/0"
    async with worker(settings, clock, url, listen=False) as w:
        await w.history.slots(token.id, T0, T0 + DAY)
        await w.refresher.tick()
        assert not w.refresher.stats.leader
        gateway.add_log(token, created_at=NOON, quota=2)
        clock.now += 1
        await w.refresher.tick()
        before = sent(w)
        for _ in range(5):
            answer = await w.history.slots(token.id, T0, T0 + DAY)
            assert sum(quota for quota, *_ in answer.values()) == 3
        assert sent(w) == before  # kept in-process by its own rounds


async def test_a_new_leader_keeps_the_tails_from_scratch(
    gateway: Gateway, settings: Settings, redis_url: str, redis_client: Any
) -> None:
    token = gateway.add_token()
    gateway.add_log(token, created_at=NOON - 100, quota=1)
    clock = Clock(NOON)
    today = (T0, T0 + DAY)
    async with worker(settings, clock, redis_url) as a, worker(settings, clock, redis_url) as b:
        await a.history.slots(token.id, *today)
        await round_heard(a, a, b)
        # a goes away without a word; b takes over once the lock expires (deleted here).
        redis_client.delete(a.redis.leader_key if a.redis else "")
        gateway.add_log(token, created_at=NOON, quota=2)
        clock.now += 1
        await round_heard(b, a, b)
        for w in (a, b):
            assert sum(quota for quota, *_ in (await w.history.slots(token.id, *today)).values()) == 3


@pytest.mark.parametrize("engine", ["sqlite", "postgres", "mysql"])
async def test_round_statements_read_index_ranges(
    make_gateway: GatewayFactory, settings: Settings, engine: str
) -> None:
    """The rounds' statements on every engine: index ends and ranges, never the whole log."""
    gateway = make_gateway(engine)
    settings = dataclasses.replace(settings, sqlite_path=gateway.path, database=gateway.database)  # type: ignore[arg-type]
    tokens = [gateway.add_token() for _ in range(3)]
    for i in range(60):
        gateway.add_log(tokens[i % 3], created_at=NOON - 7200 + 100 * i, type=6 if i % 7 == 0 else 2)
    clock = Clock(NOON)
    async with worker(settings, clock, None) as w:
        for token in tokens[:2]:
            await w.history.slots(token.id, T0, T0 + DAY)
        started = sent(w)
        await w.refresher.tick()
        clock.now += 1
        gateway.add_log(tokens[0], created_at=NOON, quota=3)
        await w.refresher.tick()
        statements = list(zip(w.recorder.sent, w.recorder.hashed, strict=True))[started:]
        # marks, the last row LATE before the mark (the one right before it: no id to look
        # for in between), the two tokens whole, what came since; marks, what came since
        assert len(statements) == 6
        for (sql, params), hash_groups in statements:
            plan = await explain(w.history.reader, w.recorder, sql, params, hash_groups=hash_groups)
            if engine == "sqlite":
                assert not any(line.startswith("SCAN logs") for line in plan), (sql, plan)
            elif engine == "postgres":
                assert not any("Seq Scan on logs" in line for line in plan), (sql, plan)
            else:
                assert all(line.split("|")[0] != "ALL" for line in plan), (sql, plan)
        answer = await w.history.slots(tokens[0].id, T0, T0 + DAY)
        assert answer == await plain_select(truth(w), tokens[0].id, T0, T0 + DAY)


async def test_a_tail_older_than_a_change_heard_is_not_served(
    gateway: Gateway, settings: Settings, redis_url: str
) -> None:
    """A worker that hears of a change while what it takes from Redis predates it (the read raced
    the round) reads the database instead of serving the older tail."""
    token = gateway.add_token()
    gateway.add_log(token, created_at=NOON - 100, quota=1)
    clock = Clock(NOON)
    today = (T0, T0 + DAY)
    async with worker(settings, clock, redis_url) as a, worker(settings, clock, redis_url) as b:
        await a.history.slots(token.id, *today)
        await round_heard(a, a, b)
        gateway.add_log(token, created_at=NOON, quota=2)
        b.history.hear_round(clock.now + 0.5, 1, True, [(token.id, None)])  # a change Redis does not show yet
        before = b.history.stats.tails_read
        assert sum(quota for quota, *_ in (await b.history.slots(token.id, *today)).values()) == 3
        assert b.history.stats.tails_read == before + 1 and b.history.stats.tails_redis == 0


@pytest.mark.parametrize("outcome", ["vouched", "no word", "lost the lock"])
async def test_a_lapse_while_the_leaders_round_runs_late_waits_for_it(
    gateway: Gateway, settings: Settings, redis_url: str, monkeypatch: pytest.MonkeyPatch, outcome: str
) -> None:
    """Under load the leader's rounds run late, and the last round's word lapses before the next
    one's arrives. The polls that find it lapsed meanwhile, in the leader's worker and in the
    others (the leader says on the channel that its round began), wait for the round under way
    rather than all reading the log at once: they are answered after it, with what it kept (a
    charge made before it included), at no statement of their own. A round that ends without a
    word lets them go at once, to the database; a leader deposed meanwhile says nothing more, and
    the others' polls go once the round's word is overdue."""
    tokens = [gateway.add_token() for _ in range(5)]
    for token in tokens:
        gateway.add_log(token, created_at=NOON - 100, quota=1)
    clock = Clock(NOON)
    today = (T0, T0 + DAY)
    async with worker(settings, clock, redis_url) as w, worker(settings, clock, redis_url) as f:
        await lead_and_follow(w, f, tokens, today)
        await round_heard(w, w, f)  # the tails are the leader's now, confirmed in both

        # The next round is held up just before its history part (injected ordering).
        reached, go_on = asyncio.Event(), asyncio.Event()
        lead = w.keeper.lead

        async def late_lead(redis: Any, *checks: Any) -> bool:
            reached.set()
            await go_on.wait()
            if outcome == "vouched":
                return await lead(redis, *checks)
            if outcome == "no word":  # as a round whose hot set was cut at USAGE_HOT_MAX ends
                monkeypatch.setattr(w.keeper, "hot_max", 1)
                return await lead(redis, *checks)
            return False

        monkeypatch.setattr(w.keeper, "lead", late_lead)
        clock.now += 3  # past confirmed_for (2 s) since the last word: lapsed
        heard = [w.rounds_heard, f.rounds_heard]
        begun = f.rounds_begun
        tick = asyncio.create_task(w.refresher.tick())
        await reached.wait()
        await until(lambda: f.rounds_begun > begun)  # f heard that the round began
        gateway.add_log(tokens[2], created_at=int(clock.now) - 1, quota=50)
        read = [w.history.stats.tails_read, f.history.stats.tails_read]
        polls = [asyncio.create_task(other.history.slots(t.id, *today)) for other in (w, f) for t in tokens]
        for _ in range(10_000):  # each poll runs up to its wait (bounded: without one, they finish)
            waiting = w.history.stats.waited_round + f.history.stats.waited_round
            if waiting == len(polls) or all(poll.done() for poll in polls):
                break
            await asyncio.sleep(0)
        assert not any(poll.done() for poll in polls)
        # (Each worker's first poll also looked at the log's smallest id: the word that reports it lapsed.)
        before = [sent(w), sent(f)]

        go_on.set()
        await tick
        if outcome == "vouched":
            await w.hear_next_round(heard[0])
            await f.hear_next_round(heard[1])
        answers = await asyncio.gather(*polls)
        for (other, token), answer in zip([(o, t) for o in (w, f) for t in tokens], answers, strict=True):
            assert answer == await plain_select(truth(other), token.id, *today)
            if token is tokens[2]:
                assert sum(quota for quota, *_ in answer.values()) == 51
        statements = 2 if outcome != "lost the lock" else 0  # the round's own
        if outcome == "vouched":  # and none of the polls'
            assert [sent(w) - before[0], sent(f) - before[1]] == [statements, 0]
            assert [w.history.stats.tails_read, f.history.stats.tails_read] == read
        else:  # each poll read its open day itself
            assert [sent(w) - before[0], sent(f) - before[1]] == [statements + len(tokens), len(tokens)]
            assert [w.history.stats.tails_read, f.history.stats.tails_read] == [n + len(tokens) for n in read]


async def test_the_app_wires_history_and_its_metrics(
    gateway: Gateway, settings: Settings, redis_url: str, app_client: Any
) -> None:
    token = gateway.add_token()
    gateway.add_log(token, created_at=T0 + 60, quota=5)
    async with app_client(redis_url=redis_url) as (app, client):
        history = app.state.history
        assert history.redis_days is app.state.redis.history_days
        assert app.state.refresher.tails.history is history
        read = 'usage_history_days_total{layer="database"}'
        before = sample_value((await client.get("/metrics")).text, read)
        spent = await history.slots(token.id, T0, T0 + DAY)
        assert spent == {(T0, "gpt-4o-mini"): (5, 10, 5, 1)}
        text = (await client.get("/metrics")).text
    assert sample_value(text, read) == before + 1
    assert "usage_history_tails_total" in text


async def test_a_day_that_closes_under_the_rounds_is_not_read_again(
    gateway: Gateway, settings: Settings, redis_url: str
) -> None:
    """Rounds on time through a day's close, the gateway busy: the leader hands the kept day over
    as closed. (Idle, the gateway's rows would not show its clock past the close: the day would
    be read once more, directly.)"""
    token, other = gateway.add_token(), gateway.add_token()
    gateway.add_log(token, created_at=T0 + 100, quota=1, model_name="a")
    gateway.add_log(other, created_at=T0 + 200, quota=50)
    gateway.add_log(token, created_at=T0 + DAY - 30, quota=2, type=6)
    clock = Clock(T0 + DAY - 20)
    span = (T0, T0 + 2 * DAY)
    async with worker(settings, clock, redis_url) as w, worker(settings, clock, redis_url) as b:
        await w.history.slots(token.id, *span)
        await round_heard(w, w, b)
        gateway.add_log(token, created_at=T0 + DAY - 5, quota=4)  # written late
        gateway.add_log(token, created_at=T0 + DAY + 10, quota=8)  # the next day
        clock.now = T0 + DAY + GRACE - 1
        gateway.add_log(other, created_at=int(clock.now), quota=1)
        await w.history.slots(token.id, *span)  # polled all along (the hot window is a minute)
        await round_heard(w, w, b)
        clock.now += 2  # day 0 closes: kept whole, handed over
        gateway.add_log(other, created_at=int(clock.now), quota=1)
        await round_heard(w, w, b)
        answer = await b.history.slots(token.id, *span)
        assert answer == await plain_select(truth(b), token.id, *span)
        assert sum(quota for quota, *_ in answer.values()) == 1 - 2 + 4 + 8
        assert b.history.stats.days_read == 0 and b.history.stats.days_redis == 1


@pytest.mark.redis_topologies
async def test_a_late_tail_write_never_replaces_a_newer_one(settings: Settings, redis_url: str) -> None:
    """A deposed leader's write, held up past its lock, lands after its successor's: ignored."""
    # A generous timeout here and below: a loaded machine's late answer would read as a miss.
    redis = _open_redis(dataclasses.replace(settings, redis_url=redis_url, redis_timeout=5.0))
    assert redis is not None
    try:
        day = T0 // DAY
        newer = Tail(day, {(T0, "m"): (2, 0, 0, 1)}, NOON + 1.5, None)
        older = Tail(day, {(T0, "m"): (1, 0, 0, 1)}, NOON, None)
        await redis.history_tails.put_many({7: newer.encode(), 8: older.encode()}, 60)
        await redis.history_tails.put_many({7: older.encode(), 8: newer.encode()}, 60)
        for token_id in (7, 8):
            value = await redis.history_tails.get(token_id)
            assert value is not None and Tail.decode(value, 0).slots == newer.slots
    finally:
        await redis.close()


@pytest.mark.redis_topologies
async def test_tails_asked_for_at_once_are_read_in_a_few_mgets(settings: Settings, redis_url: str) -> None:
    """A worker taking up 500 tokens' tails at once (a started worker, a lost channel regained)
    makes a few round trips, not 500; a token the leader keeps nothing for reads as None."""
    redis = _open_redis(dataclasses.replace(settings, redis_url=redis_url, redis_timeout=5.0))
    assert redis is not None
    try:
        day = T0 // DAY
        tails = {token_id: Tail(day, {(T0, "m"): (token_id, 0, 0, 1)}, NOON, None) for token_id in range(1, 501)}
        await redis.history_tails.put_many({t: tail.encode() for t, tail in tails.items()}, 60)
        values = await asyncio.gather(*(redis.history_tails.get(t) for t in range(1, 502)))
        assert [Tail.decode(v, 0).slots for v in values[:500] if v is not None] == [t.slots for t in tails.values()]
        assert values[500] is None
        assert redis.history_tails._reads.batches <= 5
    finally:
        await redis.close()


async def test_round_cost_is_flat_in_the_number_of_polled_tokens(
    gateway: Gateway, settings: Settings, redis_url: str
) -> None:
    """1,200 polled tokens: read whole once in INIT_CHUNK batches, then two statements a round."""
    gateway.add_tokens(1200)
    ids = [int(i) for (i,) in gateway.db.execute("SELECT id FROM tokens WHERE name = 'sweep'")]
    for token_id in ids[::50]:
        gateway.add_log(Token(token_id, "", 0), created_at=NOON - 60, quota=token_id)
    clock = Clock(NOON)
    async with worker(settings, clock, redis_url) as w:
        assert w.redis is not None
        await w.redis.history_hot.note(ids, clock.now)  # as the workers' polls would
        started = sent(w)
        await round_heard(w, w)
        # Marks, the last row LATE before the mark (none: no id to look for), the day's first
        # id, 1,200 tokens in chunks of 500, what came since.
        assert sent(w) - started == 1 + 1 + 1 + 3 + 1
        for _ in range(3):
            clock.now += 1
            gateway.add_log(Token(ids[7], "", 0), created_at=int(clock.now), quota=1)
            started = sent(w)
            await round_heard(w, w)
            assert sent(w) - started == 2
        assert w.keeper.stats.tokens == 1200
        after_rounds = sent(w)
        answer = await w.history.slots(ids[7], T0, T0 + DAY)
        assert sum(quota for quota, *_ in answer.values()) == 3  # its three charges (it had no row before)
        assert sent(w) == after_rounds  # answered from Redis


async def test_a_round_cut_at_hot_max_confirms_nothing(gateway: Gateway, settings: Settings, redis_url: str) -> None:
    """Past USAGE_HOT_MAX some polled tokens are not kept: no worker may take what it holds as
    confirmed then, and each reads the open days it needs directly."""
    tokens = [gateway.add_token() for _ in range(3)]
    for token in tokens:
        gateway.add_log(token, created_at=NOON - 100, quota=1)
    clock = Clock(NOON)
    today = (T0, T0 + DAY)
    async with worker(dataclasses.replace(settings, hot_max=2), clock, redis_url) as w:
        for token in tokens:
            await w.history.slots(token.id, *today)
        await round_heard(w, w)
        assert w.keeper.stats.tokens == 2
        clock.now += 1.5  # past the direct reads' own TTL
        read = w.history.stats.tails_read
        for token in tokens:
            assert sum(quota for quota, *_ in (await w.history.slots(token.id, *today)).values()) == 1
        assert w.history.stats.tails_read == read + 3 and w.history.stats.tails_redis == 0


async def test_workers_learn_of_a_clean_up_from_the_rounds(
    gateway: Gateway, settings: Settings, redis_url: str
) -> None:
    """The round reports the log's smallest id: workers drop cached days the clean-up reached
    without a look of their own."""
    token = gateway.add_token()
    gateway.add_log(token, created_at=T0 - 2 * DAY + 60, quota=1)
    gateway.add_log(token, created_at=T0 - DAY + 60, quota=2)
    gateway.add_log(token, created_at=NOON - 60, quota=4)
    clock = Clock(NOON)
    span = (T0 - 2 * DAY, T0 + DAY)
    async with worker(settings, clock, redis_url) as a, worker(settings, clock, redis_url) as b:
        for w in (a, b):
            assert sum(quota for quota, *_ in (await w.history.slots(token.id, *span)).values()) == 7
        gateway._execute("DELETE FROM logs WHERE created_at < ?", (T0 - DAY,))
        clock.now += 0.5
        await round_heard(a, a, b)
        looks = sum(1 for sql, _ in b.recorder.sent if sql.startswith("SELECT (SELECT min(id)"))
        answer = await b.history.slots(token.id, *span)
        assert sum(quota for quota, *_ in answer.values()) == 6
        assert answer == await plain_select(truth(b), token.id, *span)
        assert b.history.stats.cleaned == 1
        assert sum(1 for sql, _ in b.recorder.sent if sql.startswith("SELECT (SELECT min(id)")) == looks


async def test_a_first_sight_keeps_the_tails_a_worker_holds_only_if_they_are_the_leaders(
    gateway: Gateway, settings: Settings, redis_url: str
) -> None:
    """A leader that sees tokens for the first time names them all; a worker keeps a tail it
    read itself only when its fingerprint is the round's. Here b read both tokens' open days,
    then one of them was charged before the round: b keeps the other and drops that one, which
    it then takes from Redis, charge included."""
    same, charged = gateway.add_token(), gateway.add_token()
    for token in (same, charged):
        gateway.add_log(token, created_at=NOON - 3600, quota=10)
    clock = Clock(NOON)
    today = (T0, T0 + DAY)
    async with worker(settings, clock, redis_url) as a, worker(settings, clock, redis_url) as b:
        for token in (same, charged):
            await b.history.slots(token.id, *today)  # b's own reads
            await a.history.slots(token.id, *today)
        gateway.add_log(charged, created_at=NOON - 60, quota=5)
        await a.refresher.tick()  # notes, leads, keeps: the charge is in its first read
        await round_heard(a, a, b)
        before = sent(b)
        assert sum(quota for quota, *_ in (await b.history.slots(same.id, *today)).values()) == 10
        assert b.history.stats.tails_redis == 0  # kept: it was the leader's
        assert sum(quota for quota, *_ in (await b.history.slots(charged.id, *today)).values()) == 15
        assert b.history.stats.tails_redis == 1  # dropped: b's read predates the charge
        assert sent(b) == before


class HistoryRoute:
    """GET /api/usage/token/history answered by one worker's history, its answers never fresh by
    their own TTL (USAGE_LOCAL_TTL 0): whatever is served again is served because it is vouched
    for. Counts the answers it computed."""

    def __init__(self, w: Worker) -> None:
        services = Services()
        services.history = w.history
        services.day_sums = DaySums(w.history)
        services.options = cast(GatewayOptions, SimpleNamespace(current=BillingOptions()))
        self.computed = 0
        sums = services.day_sums.sums

        async def counted(*args: Any) -> dict[tuple[int, str], Any]:
            self.computed += 1
            return await sums(*args)

        services.day_sums.sums = counted  # type: ignore[method-assign]
        self.endpoint = HistoryEndpoint(
            services,
            unavailable=JSONError(503, "database unavailable"),
            max_days=31,
            answers=AnswerCache(100, 2**20, ttl=0.0, stale_if_error=0.0),
        )

    async def quota(self, token: Token) -> int:
        """The token's total over the test's day, as answered."""
        record = TokenRecord(token.id, token.user_id, "t", 1, -1, 0, 0, False, False, (), 1)
        day = datetime.fromtimestamp(T0, UTC).date().isoformat()
        scope = {
            "type": "http",
            "method": "GET",
            "path": "/api/usage/token/history",
            "query_string": f"start_date={day}&end_date={day}".encode(),
            "headers": [],
            SCOPE_KEY: record,
        }
        sent: list[dict[str, Any]] = []

        async def send(message: Any) -> None:
            sent.append(message)

        await self.endpoint(scope, lambda: None, send)  # type: ignore[arg-type]
        assert sent[0]["status"] == 200, sent
        return int(orjson.loads(sent[1]["body"])["data"]["total"]["quota"])


async def test_a_polled_history_answer_is_served_again_while_the_rounds_vouch_for_what_it_was_made_from(
    gateway: Gateway, settings: Settings, redis_url: str
) -> None:
    """Past its own TTL, a history answer is served again without being computed while computing
    it would give the same: the open days it was made from are still the ones the rounds vouch
    for, and the slot, the first open day and the log's smallest id have not moved. A round that
    changed the token, a new slot and a lapse of the rounds' word each have it computed again.
    Served again, the token is still noted as polled, so that the rounds go on keeping it."""
    token, other = gateway.add_token(), gateway.add_token()
    for t in (token, other):
        gateway.add_log(t, created_at=NOON - 100, quota=1)
    clock = Clock(NOON + SLOT - 10)  # the next slot a few seconds away (within USAGE_HOT_WINDOW)
    async with worker(settings, clock, redis_url) as a, worker(settings, clock, redis_url) as b:
        await lead_and_follow(a, b, [token, other], (T0, T0 + DAY))
        route = HistoryRoute(b)
        assert await route.quota(token) == 1 and route.computed == 1
        b.history.take_polled()
        for _ in range(3):
            assert await route.quota(token) == 1
        assert route.computed == 1  # served again, not computed
        assert b.history.take_polled() == {token.id}

        # A charge shows once a round has read it (as in the balance), and only then.
        gateway.add_log(token, created_at=int(clock.now) - 1, quota=500)
        assert await route.quota(token) == 1 and route.computed == 1
        clock.now += 1
        await round_heard(a, a, b)
        assert await route.quota(token) == 501 and route.computed == 2
        assert await route.quota(token) == 501 and route.computed == 2

        # The next slot, the rounds' word heard again: the same open days, computed once more.
        clock.now = (int(clock.now) // SLOT + 1) * SLOT
        await round_heard(a, a, b)
        assert await route.quota(token) == 501 and route.computed == 3
        assert await route.quota(token) == 501 and route.computed == 3

        # The rounds' word lapses (no round for longer than it holds): computed again.
        clock.now += 3
        assert await route.quota(token) == 501 and route.computed == 4


async def test_day_sums_made_across_a_clean_up_are_not_kept(
    gateway: Gateway, settings: Settings, redis_url: str
) -> None:
    """A range's closed sums whose read waits while the gateway's clean-up runs and a round
    reports it: the day held in-process before may still count the deleted rows, so those sums
    are not kept (they were, under the new smallest id, and served until the next clean-up)."""
    token = gateway.add_token()
    gateway.add_log(token, created_at=T0 - 3 * DAY + 60, quota=1000)  # to be cleaned up
    gateway.add_log(token, created_at=T0 - 2 * DAY + 60, quota=20)
    gateway.add_log(token, created_at=T0 - DAY + 60, quota=3)
    clock = Clock(NOON)
    starts = (T0 - 3 * DAY, T0 - 2 * DAY, T0 - DAY, T0)
    async with worker(settings, clock, redis_url) as a, worker(settings, clock, redis_url) as w:
        await a.history.slots(token.id, T0, T0 + DAY)  # a polls today: its rounds report the smallest id
        await round_heard(a, a, w)
        await w.history.slots(token.id, T0 - 3 * DAY, T0 - 2 * DAY)  # w holds the oldest day
        sums = DaySums(w.history)
        assert w.history.redis_days is not None
        gate, get_many = Gate(), w.history.redis_days.get_many

        async def held_up(token_id: int, days: Any) -> Any:  # the other days' read waits on Redis
            await gate.hold()
            return await get_many(token_id, days)

        w.history.redis_days.get_many = held_up  # type: ignore[method-assign]
        read = asyncio.create_task(sums.sums(token.id, starts, T0))
        await gate.reached.wait()
        gateway._execute("DELETE FROM logs WHERE created_at < ?", (T0 - 2 * DAY,))
        clock.now += 0.5
        await round_heard(a, a, w)
        gate.release.set()
        await read  # (this one answer may still count the deleted day)
        w.history.redis_days.get_many = get_many  # type: ignore[method-assign]
        clock.now += 1
        await round_heard(a, a, w)
        again = await sums.sums(token.id, starts, T0)
        assert sum(quota for quota, *_ in again.values()) == 23


@pytest.mark.parametrize("skew", [0, 15], ids=["clocks-in-step", "gateway-15-s-behind"])
async def test_a_charge_committed_after_a_later_one_shows_whatever_the_gateways_clock(
    make_gateway: GatewayFactory, settings: Settings, redis_url: str, skew: int
) -> None:
    """Two gateway writers at once on PostgreSQL: x's charge takes its id first and commits after
    y's. The rounds' settled mark must stay below it until it commits, however far the gateway's
    clock runs behind ours: measured against ours, it was on y's row, x's fell under it and no
    round ever read it (1 instead of 501, for as long as the token was polled)."""
    gateway = make_gateway("postgres")
    settings, x, y, clock = x_and_y(gateway, settings)
    today = (T0, T0 + DAY)
    async with worker(settings, clock, redis_url) as w:
        await w.history.slots(x.id, *today)
        await round_heard(w, w)
        clock.now += 1
        with uncommitted(gateway) as writer:
            charge_held_open(gateway, writer, x, int(clock.now) - skew)
            gateway.add_log(y, created_at=int(clock.now) - skew, quota=7)
            clock.now += 1
            await round_heard(w, w)  # a round runs meanwhile
            writer.commit()
        for _ in range(12):  # the rounds go on, and so does the gateway
            clock.now += 1
            gateway.add_log(y, created_at=int(clock.now) - skew, quota=7)
            await round_heard(w, w)
        answer = await w.history.slots(x.id, *today)
        assert sum(quota for quota, *_ in answer.values()) == 501


async def x_leaves_the_hot_set(y: Token, clock: Clock, a: Worker, b: Worker) -> None:
    """20 s in which only y is asked for, every second in both workers, with a round each (led
    by a): any other token leaves the 10 s hot window, and no round reads it any more."""
    today = (T0, T0 + DAY)
    for _ in range(20):
        clock.now += 1
        for w in (a, b):
            await w.history.slots(y.id, *today)
        await b.refresher.tick()
        await round_heard(a, a, b)
    assert a.keeper.stats.tokens == 1


@pytest.mark.parametrize("through", ["history", "route"])
async def test_a_token_back_from_a_pause_shows_what_it_spent_meanwhile(
    gateway: Gateway, settings: Settings, redis_url: str, through: str
) -> None:
    """x is not asked for past USAGE_HOT_WINDOW, so it leaves the shared hot set and no round
    reads it, while rounds (kept going by y) go on vouching for what workers hold. A charge of x
    meanwhile shows at its next poll (its held open days, or an answer kept on them, were served
    as if a round had read them: 1 instead of 501, until a later round did)."""
    x, y = gateway.add_token(), gateway.add_token()
    for token in (x, y):
        gateway.add_log(token, created_at=NOON - 100, quota=1)
    clock = Clock(NOON)
    today = (T0, T0 + DAY)
    settings = dataclasses.replace(settings, hot_window=10.0)
    async with worker(settings, clock, redis_url) as a, worker(settings, clock, redis_url) as b:
        route = HistoryRoute(b)
        for w in (a, b):
            for token in (x, y):
                await w.history.slots(token.id, *today)
        await a.refresher.tick()
        await b.refresher.tick()
        await round_heard(a, a, b)
        assert await route.quota(x) == 1
        await x_leaves_the_hot_set(y, clock, a, b)
        gateway.add_log(x, created_at=int(clock.now) - 1, quota=500)
        for _ in range(3):
            clock.now += 1
            await a.history.slots(y.id, *today)
            await b.refresher.tick()
            await round_heard(a, a, b)
        if through == "route":
            assert await route.quota(x) == 501
        else:
            for w in (a, b):
                assert sum(quota for quota, *_ in (await w.history.slots(x.id, *today)).values()) == 501


async def test_a_token_back_from_a_pause_on_a_worker_that_never_held_it_shows_what_it_spent(
    gateway: Gateway, settings: Settings, redis_url: str
) -> None:
    """As above, but x's first ask after its pause lands on worker b, which never held its open
    days: the tail the leader kept for x in Redis left with x from the rounds, so b reads x's
    open days itself (it took the old tail as vouched for: 1 instead of 501)."""
    x, y = gateway.add_token(), gateway.add_token()
    for token in (x, y):
        gateway.add_log(token, created_at=NOON - 100, quota=1)
    clock = Clock(NOON)
    today = (T0, T0 + DAY)
    settings = dataclasses.replace(settings, hot_window=10.0)
    async with worker(settings, clock, redis_url) as a, worker(settings, clock, redis_url) as b:
        for token in (x, y):
            await a.history.slots(token.id, *today)  # only a serves x before the pause
        await a.refresher.tick()
        await b.refresher.tick()
        await round_heard(a, a, b)
        await x_leaves_the_hot_set(y, clock, a, b)
        gateway.add_log(x, created_at=int(clock.now) - 1, quota=500)
        clock.now += 1
        await round_heard(a, a, b)
        assert sum(quota for quota, *_ in (await b.history.slots(x.id, *today)).values()) == 501


async def test_a_tail_left_by_a_former_leader_is_not_taken(
    gateway: Gateway, settings: Settings, redis_url: str, redis_client: redis.Redis
) -> None:
    """As above, but the lead changes hands while x leaves the hot set: the new leader never
    kept x, so it cannot take x's tail out of Redis; a worker that never held x takes no tail
    of another leadership than the one whose rounds it hears, and reads x itself (it answered
    1 instead of 501)."""
    x, y = gateway.add_token(), gateway.add_token()
    for token in (x, y):
        gateway.add_log(token, created_at=NOON - 100, quota=1)
    clock = Clock(NOON)
    today = (T0, T0 + DAY)
    settings = dataclasses.replace(settings, hot_window=10.0)
    async with (
        worker(settings, clock, redis_url) as a,
        worker(settings, clock, redis_url) as b,
        worker(settings, clock, redis_url) as c,
    ):
        for token in (x, y):
            await a.history.slots(token.id, *today)
        await round_heard(a, a, b, c)
        redis_client.delete(a.redis.leader_key)  # a goes away...
        clock.now += 11  # ...and x leaves the hot window meanwhile
        await b.history.slots(y.id, *today)
        await b.refresher.tick()  # b notes y, and leads
        assert b.refresher.stats.leader and b.keeper.stats.tokens == 1
        assert await b.redis.history_tails.get(x.id) is not None  # a's tail of x, still there
        gateway.add_log(x, created_at=int(clock.now) - 1, quota=500)
        clock.now += 1
        await round_heard(b, a, b, c)
        assert sum(quota for quota, *_ in (await c.history.slots(x.id, *today)).values()) == 501


async def test_a_deposed_leader_takes_out_no_tail_its_successor_keeps(
    gateway: Gateway, settings: Settings, redis_url: str, redis_client: redis.Redis
) -> None:
    """Leader a drops x from its rounds, and its round is held up past its lock after its last
    check: b leads meanwhile and keeps x's tail. a's late removal of x's tail leaves b's."""
    x, y = gateway.add_token(), gateway.add_token()
    for token in (x, y):
        gateway.add_log(token, created_at=NOON - 100, quota=1)
    clock = Clock(NOON)
    today = (T0, T0 + DAY)
    async with worker(settings, clock, redis_url) as a, worker(settings, clock, redis_url) as b:
        for token in (x, y):
            await a.history.slots(token.id, *today)
        await a.refresher.tick()
        members = a.redis.history_hot.members

        async def without_x(since: float, limit: int) -> list[int]:
            return [t for t in await members(since, limit) if t != x.id]

        put_many = a.redis.history_tails.put_many

        async def held_up(tails: Any, ttl: float) -> None:
            await put_many(tails, ttl)
            redis_client.delete(a.redis.leader_key)  # a's lock runs out; b leads a round
            b.redis.history_hot.members = members  # type: ignore[method-assign]
            clock.now += 0.5
            await b.refresher.tick()
            assert b.refresher.stats.leader and await b.redis.history_tails.get(x.id) is not None

        a.redis.history_hot.members = without_x  # type: ignore[method-assign]
        a.redis.history_tails.put_many = held_up  # type: ignore[method-assign]
        clock.now += 1
        gateway.add_log(y, created_at=int(clock.now) - 1, quota=2)  # a has y's tail to write
        await a.history.slots(y.id, *today)
        await a.refresher.tick()
        assert b.refresher.stats.leader  # (held_up ran)
        assert await b.redis.history_tails.get(x.id) is not None


async def test_a_clean_up_reaching_into_the_open_day_leaves_the_polled_tails(
    gateway: Gateway, settings: Settings, redis_url: str
) -> None:
    """A clean-up whose cut-off falls in the open day (an administrator clearing the log up to
    now): the rounds read again the open days of the tokens that lost rows, and every worker
    then shows what a direct SELECT does (the kept tails went on counting the deleted rows
    until the day closed)."""
    x = gateway.add_token()
    gateway.add_log(x, created_at=NOON - 3600, quota=100)
    gateway.add_log(x, created_at=NOON - 60, quota=1)
    clock = Clock(NOON)
    today = (T0, T0 + DAY)
    async with worker(settings, clock, redis_url) as a, worker(settings, clock, redis_url) as b:
        for w in (a, b):
            assert sum(quota for quota, *_ in (await w.history.slots(x.id, *today)).values()) == 101
        await a.refresher.tick()
        await b.refresher.tick()
        await round_heard(a, a, b)
        gateway.clean_logs(before=NOON - 600)  # the 100
        for _ in range(2):
            clock.now += 1
            await round_heard(a, a, b)
        for w in (a, b):
            answer = await w.history.slots(x.id, *today)
            assert answer == await plain_select(truth(w), x.id, *today)
            assert sum(quota for quota, *_ in answer.values()) == 1


@pytest.mark.parametrize("late", [296, 200], ids=["rounds-on-time", "rounds-held-up"])
async def test_a_row_written_late_within_the_grace_is_in_the_day_handed_over(
    gateway: Gateway, settings: Settings, redis_url: str, late: int
) -> None:
    """A row of day 0 written `late` seconds after its time (within the 5 minutes' grace, after
    the last round's settled mark): the round that closes the day reads it with the rest and
    hands the day over with it (it handed over what the rounds before had kept: the row was
    missing from the closed day in Redis, for its 7 days)."""
    token, busy = gateway.add_token(), gateway.add_token()
    end = T0 + DAY
    gateway.add_log(token, created_at=T0 + 100, quota=1)
    span = (T0, T0 + 2 * DAY)
    last_round_before = end + GRACE - 1 if late == 296 else end + 170  # (held up ~130 s before the close)
    clock = Clock(end + 100)
    async with worker(settings, clock, redis_url) as w, worker(settings, clock, redis_url) as b:
        await w.history.slots(token.id, *span)
        await round_heard(w, w, b)
        for t in range(end + 101, last_round_before + 1):
            clock.now = t
            if t % 5 == 0:
                gateway.add_log(busy, created_at=t)  # a busy gateway writes on time
            if t == end + late - 1:
                gateway.add_log(token, created_at=end - 1, quota=50)  # written late
            if t % 10 == 0:
                await w.history.slots(token.id, *span)
            await round_heard(w, w, b)
        if late == 200:  # written while the rounds are held up
            gateway.add_log(token, created_at=end - 1, quota=50)
        clock.now = end + GRACE + 1  # day 0 closes: the leader hands it over
        if late == 200:  # polled all along, as the workers' notes would say
            await w.redis.history_hot.note([token.id], clock.now)  # type: ignore[union-attr]
        gateway.add_log(busy, created_at=int(clock.now))
        await round_heard(w, w, b)
        answer = await b.history.slots(token.id, *span)
        assert b.history.stats.days_redis == 1 and b.history.stats.days_read == 0  # as handed over
        assert sum(quota for (slot, _), (quota, *_) in answer.items() if slot < end) == 51


@pytest.mark.parametrize("engine", ["sqlite", "postgres", "mysql"])
@pytest.mark.parametrize("redis_on", [True, False], ids=["shared", "own"])
async def test_a_token_whose_spending_passes_64_bits_fails_alone_in_the_rounds(
    make_gateway: GatewayFactory, settings: Settings, redis_url: str, engine: str, redis_on: bool
) -> None:
    """Every polled token's new rows are summed in one statement, and the tokens that became hot
    in another: one token's sums past 64 bits (in the database's SUM or in what the rounds add
    up) fail that token's history alone. The others are kept as before, at two statements a
    round, and their day is handed over as it closes; that token's polls read its open days
    directly, and answer 503."""
    gateway = make_gateway(engine)
    settings = dataclasses.replace(settings, sqlite_path=gateway.path, database=gateway.database)  # type: ignore[arg-type]
    end = T0 + DAY
    born_huge, grows_huge, *others = [gateway.add_token() for _ in range(4)]
    for token in (born_huge, born_huge, grows_huge, *others):
        gateway.add_log(token, created_at=end - 3600, quota=2**62)
    clock = Clock(end - 100)
    span = (T0, T0 + 2 * DAY)

    async def poll_and_round() -> None:
        for token in (born_huge, grows_huge, *others):
            with contextlib.suppress(StoreUnavailable):
                await w.history.slots(token.id, *span)
        await round_heard(w, w) if redis_on else await w.refresher.tick()

    async with worker(settings, clock, redis_url if redis_on else None) as w:
        await poll_and_round()
        gateway.add_log(grows_huge, created_at=end - 3600 + 1, quota=2**62)  # in the same slot
        charged_at = int(clock.now) - 1
        gateway.add_log(others[1], created_at=charged_at, quota=7, model_name="claude")
        for _ in range(2):  # the rows are new, then settled
            clock.now += SETTLE
            await poll_and_round()
            before = sent(w)
            for token in others:
                answer = await w.history.slots(token.id, *span)
                assert answer == await plain_select(truth(w), token.id, *span)
            assert sent(w) == before  # kept by the rounds
            assert answer[(charged_at - charged_at % SLOT, "claude")] == (7, 10, 5, 1)
            for token in (born_huge, grows_huge):
                with pytest.raises(StoreUnavailable):
                    await w.history.slots(token.id, *span)
        rounds = w.keeper.stats.statements
        clock.now += SETTLE
        await poll_and_round()
        assert w.keeper.stats.statements - rounds == 2
        # The day closes: the others' are handed over as closed days, the unfit tokens' are not.
        while clock.now < end + GRACE + 1:
            clock.now = min(clock.now + 30, end + GRACE + 1)
            gateway.add_log(others[0], created_at=int(clock.now) - 1, quota=1)
            await poll_and_round()
        before = sent(w)
        for token in others:
            assert await w.history.slots(token.id, *span) == await plain_select(truth(w), token.id, *span)
        assert sent(w) == before  # handed over
        for token in (born_huge, grows_huge):
            with pytest.raises(StoreUnavailable):
                await w.history.slots(token.id, *span)


async def rounds_go_on(
    w: Worker, gateway: Gateway, clock: Clock, writing: Token, polled: Token, seconds: int
) -> dict[tuple[int, str], tuple[int, int, int, int]]:
    """`seconds` more rounds, one a second, each after a charge of `writing` and a poll of
    `polled`; then `polled`'s open day as the worker answers it."""
    today = (T0, T0 + DAY)
    for _ in range(seconds):
        clock.now += 1
        gateway.add_log(writing, created_at=int(clock.now), quota=7)
        await w.history.slots(polled.id, *today)
        await round_heard(w, w)
    return await w.history.slots(polled.id, *today)


def roll_back_a_charge(gateway: Gateway, token: Token, at: int) -> int:
    """Insert a charge and roll it back: its id stays missing for good. Returns that id."""
    with uncommitted(gateway) as writer, through(gateway, writer):
        hole = gateway.add_log(token, created_at=at, quota=500)
        writer.rollback()
    return hole


@contextlib.contextmanager
def uncommitted(gateway: Gateway) -> Iterator[Any]:
    """A second connection to the gateway's database, whose writes stay uncommitted until the
    caller commits or rolls them back: an insert takes its id at once, and its row shows when
    the transaction commits."""
    server = gateway.server  # type: ignore[attr-defined]
    if isinstance(gateway, PostgresGateway):
        import psycopg

        writer: Any = psycopg.connect(server.url(gateway.name), autocommit=False)
    else:
        import pymysql

        name = gateway.name  # type: ignore[attr-defined]
        writer = pymysql.connect(unix_socket=str(server.socket), user="root", database=name, autocommit=False)
    try:
        yield writer
    finally:
        writer.close()


@contextlib.contextmanager
def through(gateway: Gateway, writer: Any) -> Iterator[None]:
    """`gateway.add_log` writes through `writer` meanwhile."""
    autocommit, gateway.conn = gateway.conn, writer  # type: ignore[attr-defined]
    try:
        yield
    finally:
        gateway.conn = autocommit  # type: ignore[attr-defined]


def x_and_y(gateway: Gateway, settings: Settings) -> tuple[Settings, Token, Token, Clock]:
    """Settings reading `gateway`, two tokens on it (x charged once before NOON) and a clock at NOON."""
    settings = dataclasses.replace(settings, sqlite_path=gateway.path, database=gateway.database)  # type: ignore[arg-type]
    x, y = gateway.add_token(), gateway.add_token()
    gateway.add_log(x, created_at=NOON - 100, quota=1)
    return settings, x, y, Clock(NOON)


def charge_held_open(gateway: Gateway, writer: Any, token: Token, created_at: int) -> None:
    """Charge `token` 500 through `writer` (`uncommitted`): its row takes its id now, and shows
    once the writer commits."""
    with through(gateway, writer):
        gateway.add_log(token, created_at=created_at, quota=500)


@pytest.mark.parametrize("engine", ["postgres", "mysql"])
async def test_a_charge_committed_long_after_it_took_its_id_is_counted(
    make_gateway: GatewayFactory, settings: Settings, redis_url: str, engine: str
) -> None:
    """x's charge takes its id, then its transaction stays open 40 s (past SETTLE, within LATE)
    while the gateway goes on writing y's: the rounds settle below the missing id meanwhile,
    still show y's charges every round at two statements a round, and count x's once it
    commits. (They settled past it: x's charge was never counted.)"""
    gateway = make_gateway(engine)
    settings, x, y, clock = x_and_y(gateway, settings)
    today = (T0, T0 + DAY)
    async with worker(settings, clock, redis_url) as w:
        for token in (x, y):
            await w.history.slots(token.id, *today)
        await round_heard(w, w)
        with uncommitted(gateway) as writer:
            charge_held_open(gateway, writer, x, int(clock.now))
            for _ in range(40):
                clock.now += 1
                gateway.add_log(y, created_at=int(clock.now), quota=7)
                before = w.keeper.stats.statements
                await round_heard(w, w)
                assert w.keeper.stats.statements - before == 2
                assert await w.history.slots(y.id, *today) == await plain_select(truth(w), y.id, *today)
                await w.history.slots(x.id, *today)
            writer.commit()
        for _ in range(3):
            clock.now += 1
            await round_heard(w, w)
            answer = await w.history.slots(x.id, *today)
            assert sum(quota for quota, *_ in answer.values()) == 501
        answer = await rounds_go_on(w, gateway, clock, y, x, int(SETTLE) + 2)  # once settled, it stays
        assert answer == await plain_select(truth(w), x.id, *today)
        assert sum(quota for quota, *_ in answer.values()) == 501


@pytest.mark.parametrize("engine", ["postgres", "mysql"])
async def test_an_id_never_committed_is_waited_for_late_seconds_only(
    make_gateway: GatewayFactory, settings: Settings, redis_url: str, engine: str
) -> None:
    """An insert rolled back leaves its id missing for good: the rounds wait LATE seconds for it,
    then read the new rows from above it again (one statement to find where), rather than read
    every row written since it each round."""
    gateway = make_gateway(engine)
    settings = dataclasses.replace(settings, sqlite_path=gateway.path, database=gateway.database)  # type: ignore[arg-type]
    y = gateway.add_token()
    clock = Clock(NOON)
    gateway.add_log(y, created_at=NOON - 100, quota=1)
    today = (T0, T0 + DAY)
    async with worker(settings, clock, redis_url) as w:
        await w.history.slots(y.id, *today)
        await round_heard(w, w)
        hole = roll_back_a_charge(gateway, y, int(clock.now))
        gateway.add_log(y, created_at=int(clock.now), quota=7)
        extra_statements = 0
        first_new: list[int] = []  # the first id each round's read of new rows may count
        for _ in range(int(LATE + SETTLE) + 5):
            clock.now += 1
            gateway.add_log(y, created_at=int(clock.now), quota=7)
            before, sent_before = w.keeper.stats.statements, sent(w)
            await round_heard(w, w)
            extra_statements += w.keeper.stats.statements - before - 2
            (rows_since_params,) = [p for sql, p in w.recorder.sent[sent_before:] if "CASE WHEN id <=" in sql]
            first_new.append(int(rows_since_params[1]) + 1)
            await w.history.slots(y.id, *today)
        assert await w.history.slots(y.id, *today) == await plain_select(truth(w), y.id, *today)
        assert extra_statements == 1
        # Waited for LATE once the mark passed it (SETTLE after it), a round a second, then past it.
        first_past = next(i for i, first in enumerate(first_new) if first > hole)
        assert LATE <= first_past <= LATE + SETTLE + 2
        assert all(first > hole for first in first_new[first_past:])


async def test_a_charge_still_committing_as_a_clean_up_passes_it_is_counted(
    make_gateway: GatewayFactory, settings: Settings, redis_url: str
) -> None:
    """x's charge takes its id, then a clean-up up to now (an administrator clearing the log)
    deletes every row around it while its transaction is still open: on PostgreSQL the row, not
    yet there to delete, outlives the clean-up. The rounds take its id, below the log's smallest,
    as deleted and settle past it; once it commits, the smallest id drops below the last round's
    and they begin afresh, counting it. (They never counted the charge: the kept open day, and
    the closed day handed over after it, showed less than a direct SELECT.)"""
    gateway = make_gateway("postgres")
    settings, x, y, clock = x_and_y(gateway, settings)
    today = (T0, T0 + DAY)
    async with worker(settings, clock, redis_url) as w:
        for token in (x, y):
            await w.history.slots(token.id, *today)
        await round_heard(w, w)
        with uncommitted(gateway) as writer:
            charge_held_open(gateway, writer, x, int(clock.now))
            for _ in range(int(SETTLE) + 2):  # the rounds' mark passes it
                clock.now += 1
                gateway.add_log(y, created_at=int(clock.now), quota=7)
                await round_heard(w, w)
            gateway.clean_logs(before=int(clock.now))  # x's charge is not there to be deleted
            for _ in range(int(SETTLE) + 5):  # the mark passes the log's smallest id
                clock.now += 1
                gateway.add_log(y, created_at=int(clock.now), quota=7)
                await round_heard(w, w)
                await w.history.slots(x.id, *today)
            writer.commit()
        answer = await rounds_go_on(w, gateway, clock, y, x, int(LATE + SETTLE) + 2)  # once settled, it stays
        assert answer == await plain_select(truth(w), x.id, *today)
        assert sum(quota for quota, *_ in answer.values()) == 500


@pytest.mark.parametrize("redis_on", [True, False], ids=["shared", "own"])
async def test_a_round_that_fails_as_a_day_closes_leaves_nothing_half_moved(
    gateway: Gateway, settings: Settings, redis_url: str, redis_on: bool
) -> None:
    """The round that closes a day fails at its last statement (the database locked for a
    moment): the next rounds close the day all the same. (The failed round had moved the open
    days on before it failed: the day then stayed in what the rounds kept, and a token unfit
    from it, its sums past 64 bits, stayed unfit and read directly all the next day.)"""
    end = T0 + DAY
    huge, other = gateway.add_token(), gateway.add_token()
    gateway.add_log(huge, created_at=end - 3600, quota=2**62)
    gateway.add_log(huge, created_at=end - 3600 + 1, quota=2**62)  # the same slot: 2**63
    gateway.add_log(other, created_at=end - 3600, quota=5)
    clock = Clock(end + 100)  # within the grace: yesterday is still open
    span, today = (T0, end + DAY), (end, end + DAY)

    async def poll_and_round() -> None:
        for token in (huge, other):
            with contextlib.suppress(StoreUnavailable):
                await w.history.slots(token.id, *span)
        await round_heard(w, w) if redis_on else await w.refresher.tick()

    async with worker(settings, clock, redis_url if redis_on else None) as w:
        while clock.now + 30 < end + GRACE:
            clock.now += 30
            gateway.add_log(other, created_at=int(clock.now) - 1, quota=1)
            await poll_and_round()
        clock.now = end + GRACE + 1  # the next round closes yesterday
        gateway.add_log(other, created_at=int(clock.now) - 1, quota=1)
        for token in (huge, other):
            with contextlib.suppress(StoreUnavailable):
                await w.history.slots(token.id, *span)
        run = w.recorder.run

        async def failing(sql: str, params: Any, *resent: Any, **options: Any) -> Any:
            if "AS settled" in sql:  # the round's read of what came since
                raise StoreUnavailable("database is locked")
            return await run(sql, params, *resent, **options)

        w.recorder.run = failing
        with pytest.raises(StoreUnavailable):
            await w.refresher.tick()
        w.recorder.run = run
        gateway.add_log(huge, created_at=int(clock.now) - 1, quota=3)  # today's: it fits
        for _ in range(3):
            clock.now += SETTLE
            await poll_and_round()
        before = sent(w)
        for token in (huge, other):
            answer = await w.history.slots(token.id, *today)
            assert answer == await plain_select(truth(w), token.id, *today)
            if token is huge:
                assert sum(quota for quota, *_ in answer.values()) == 3
        assert sent(w) == before  # kept by the rounds


@pytest.mark.parametrize("engine", ["sqlite", "postgres", "mysql"])
async def test_model_names_differing_in_case_are_kept_apart_as_read_directly(
    make_gateway: GatewayFactory, settings: Settings, engine: str
) -> None:
    """ "gpt-4o" and "GPT-4o" in one slot, written in different rounds: what the rounds keep, a
    direct read and a plain SELECT agree on every engine. (MySQL's collation grouped them in a
    direct read, as one of the two names, while the rounds kept them apart.)"""
    gateway = make_gateway(engine)
    settings = dataclasses.replace(settings, sqlite_path=gateway.path, database=gateway.database)  # type: ignore[arg-type]
    token, other = gateway.add_token(), gateway.add_token()
    gateway.add_log(token, created_at=NOON - 100, quota=10, model_name="gpt-4o")
    gateway.add_log(other, created_at=NOON - 60, quota=1)
    clock = Clock(NOON)
    today = (T0, T0 + DAY)
    async with worker(settings, clock, None) as w:
        await w.history.slots(token.id, *today)
        await w.refresher.tick()
        gateway.add_log(token, created_at=NOON - 90, quota=5, model_name="GPT-4o")  # the same slot
        for _ in range(3):
            clock.now += SETTLE
            gateway.add_log(other, created_at=int(clock.now) - 1, quota=1)
            await w.history.slots(token.id, *today)
            await w.refresher.tick()
        before = sent(w)
        kept = await w.history.slots(token.id, *today)
        assert sent(w) == before  # as the rounds keep it
        direct = await History(truth(w), clock=clock).slots(token.id, *today)
        assert kept == direct == await plain_select(truth(w), token.id, *today)
        assert {model for _, model in kept} == {"gpt-4o", "GPT-4o"}


@pytest.mark.parametrize("real, expected", [(1e19, None), (12.7, 25)], ids=["past-64-bits", "fraction"])
async def test_a_real_in_the_quota_column_reads_the_same_kept_or_read_directly(
    gateway: Gateway, settings: Settings, real: float, expected: int | None
) -> None:
    """SQLite keeps a REAL given for a number (the gateway never writes one): the rounds' sums
    read it as a direct read does, past 64 bits or not. (Their exact sums took it through a
    64-bit integer: 1e19 was kept as 2**63 - 1 where a direct read answered 503, two 12.7 as 24
    where it answered 25.)"""
    token = gateway.add_token()
    for _ in range(1 if expected is None else 2):
        row = gateway.add_log(token, created_at=NOON - 3600, quota=1)
        gateway._execute("UPDATE logs SET quota = ? WHERE id = ?", (real, row))
    gateway.add_log(gateway.add_token(), created_at=NOON - 60, quota=1)  # a newer row: ours settle
    clock = Clock(NOON)
    today = (T0, T0 + DAY)
    async with worker(settings, clock, None) as w:
        for round_ in range(3):
            if round_:
                clock.now += SETTLE
                await w.refresher.tick()
            if expected is None:
                with pytest.raises(StoreUnavailable):
                    await w.history.slots(token.id, *today)
            else:
                answer = await w.history.slots(token.id, *today)
                assert [quota for quota, *_ in answer.values()] == [expected]


@pytest.mark.parametrize("engine", ["postgres", "mysql"])
@pytest.mark.parametrize("when", ["first-round", "after-a-failed-round"])
async def test_a_charge_committing_as_the_rounds_begin_or_fail_is_counted(
    make_gateway: GatewayFactory, settings: Settings, redis_url: str, engine: str, when: str
) -> None:
    """x's charge takes its id and commits 16 s later: meanwhile the rounds begin (the first
    poll of the token; a new leader's first round is the same) or one of them fails. Its charge
    is counted once it commits. (A first round settled on its mark unseen, and a failed round
    forgot the id it waited for: the charge was never counted.)"""
    gateway = make_gateway(engine)
    settings, x, y, clock = x_and_y(gateway, settings)
    today = (T0, T0 + DAY)
    async with worker(settings, clock, redis_url) as w:
        if when == "after-a-failed-round":
            await w.history.slots(x.id, *today)
            await round_heard(w, w)
        with uncommitted(gateway) as writer:
            charge_held_open(gateway, writer, x, int(clock.now))
            for _ in range(15):
                clock.now += 1
                gateway.add_log(y, created_at=int(clock.now), quota=7)
                if when == "after-a-failed-round":
                    await w.history.slots(x.id, *today)
                    await round_heard(w, w)
            if when == "after-a-failed-round":
                run = w.recorder.run

                async def failing(sql: str, params: Any, *resent: Any, **options: Any) -> Any:
                    if "AS settled" in sql:  # the round's read of what came since
                        raise StoreUnavailable("database is locked")
                    return await run(sql, params, *resent, **options)

                w.recorder.run = failing
                clock.now += 1
                with pytest.raises(StoreUnavailable):
                    await w.refresher.tick()
                w.recorder.run = run
            clock.now += 1
            await w.history.slots(x.id, *today)
            await round_heard(w, w)
            writer.commit()
        answer = await rounds_go_on(w, gateway, clock, y, x, int(LATE))
        assert answer == await plain_select(truth(w), x.id, *today)
        assert sum(quota for quota, *_ in answer.values()) == 501


@pytest.mark.parametrize("engine", ["postgres", "mysql"])
async def test_ids_missing_for_good_keep_the_rounds_within_twice_late_of_the_mark(
    make_gateway: GatewayFactory, settings: Settings, redis_url: str, engine: str
) -> None:
    """An insert rolled back every 20 s, one charge a second: the ids the rounds read again each
    round stay within about 2 × LATE + SETTLE seconds of the log. (Each missing id waited LATE
    of its own from when the rounds reached it: the rounds fell behind without bound, reading
    every row since each round.)"""
    gateway = make_gateway(engine)
    settings = dataclasses.replace(settings, sqlite_path=gateway.path, database=gateway.database)  # type: ignore[arg-type]
    y = gateway.add_token()
    clock = Clock(NOON)
    gateway.add_log(y, created_at=NOON - 100, quota=1)
    today = (T0, T0 + DAY)
    reread: list[int] = []
    async with worker(settings, clock, redis_url) as w:
        await w.history.slots(y.id, *today)
        await round_heard(w, w)
        for i in range(300):
            clock.now += 1
            if i % 20 == 0:
                roll_back_a_charge(gateway, y, int(clock.now))
            newest = gateway.add_log(y, created_at=int(clock.now), quota=7)
            before = sent(w)
            await round_heard(w, w)
            (params,) = [p for sql, p in w.recorder.sent[before:] if "CASE WHEN id <=" in sql]
            reread.append(newest - int(params[1]))  # the ids above what the round had settled
            await w.history.slots(y.id, *today)
        assert await w.history.slots(y.id, *today) == await plain_select(truth(w), y.id, *today)
    ids_a_second = 1 + 1 / 20  # (the first round read the log from its start)
    assert max(reread[1:]) <= (2 * LATE + SETTLE + 5) * ids_a_second, reread[::20]


async def test_the_rounds_catch_up_after_an_outage_of_10_minutes(
    gateway: Gateway, settings: Settings, redis_url: str
) -> None:
    """The database is out for the service for 10 minutes while the gateway writes 10 rows a
    second: the first round after it begins afresh, as a leader's first does, rather than read
    the 10 minutes in one statement each round. (A round kept trying to: past the statement
    timeout, modelled here by failing a read of more than 1,500 ids, the rounds never succeeded
    again while this worker led.)"""
    x, other = gateway.add_token(), gateway.add_token()
    newest = gateway.add_log(x, created_at=NOON - 100, quota=1)
    clock = Clock(NOON)
    today = (T0, T0 + DAY)
    run = None
    out = False

    async def database(sql: str, params: Any, *resent: Any, **options: Any) -> Any:
        assert run is not None
        if out:
            raise StoreUnavailable("could not connect to server")
        # The first id a round's read of new rows, or its search for missing ids, starts from.
        if "AS settled" in sql or "NOT EXISTS" in sql:
            after = params[3] if "min(id)" in sql else params[1]  # marks' search, or the others'
            if newest - int(after) > 1500:
                raise StoreUnavailable("canceling statement due to statement timeout")
        return await run(sql, params, *resent, **options)

    async with worker(settings, clock, redis_url) as w:
        run, w.recorder.run = w.recorder.run, database
        for minute in range(12):  # a minute of polling, 10 minutes out, a minute of polling
            out = 1 <= minute <= 10
            for _ in range(6):
                clock.now += 10
                for _ in range(100):
                    newest = gateway.add_log(other, created_at=int(clock.now) - 1, quota=1)
                with contextlib.suppress(StoreUnavailable):
                    await w.history.slots(x.id, *today)
                with contextlib.suppress(StoreUnavailable):
                    await w.refresher.tick()
        gateway.add_log(x, created_at=int(clock.now) - 1, quota=5)
        clock.now += 1
        statements = w.keeper.stats.statements
        await round_heard(w, w)
        assert w.keeper.stats.statements - statements == 2
        before = sent(w)
        answer = await w.history.slots(x.id, *today)
        assert sent(w) == before  # kept by the rounds again
        assert answer == await plain_select(truth(w), x.id, *today)
        assert sum(quota for quota, *_ in answer.values()) == 6


async def test_a_day_handed_over_stays_closed_if_our_clock_steps_back(
    gateway: Gateway, settings: Settings, redis_url: str
) -> None:
    """The leader's clock steps back 2 s across the day's close (an NTP correction) after the
    round that closed it: the closed day in Redis stays whole. (That round took the day as open
    again, its rows already trimmed, and the next closed it again from nothing: a fresh worker
    read yesterday as empty, for 7 days.)"""
    end = T0 + DAY
    x, other = gateway.add_token(), gateway.add_token()
    gateway.add_log(x, created_at=end - 3600, quota=1000)
    clock = Clock(end + 100)
    span, yesterday = (T0, end + DAY), (T0, end)

    async def poll_and_round(at: float) -> None:
        clock.now = at
        gateway.add_log(other, created_at=int(clock.now) - 1, quota=1)
        await a.history.slots(x.id, *span)
        await round_heard(a, a)

    async with worker(settings, clock, redis_url) as a:
        while clock.now + SETTLE < end + GRACE:
            await poll_and_round(clock.now + SETTLE)
        await poll_and_round(end + GRACE + 1)  # closes yesterday
        await poll_and_round(end + GRACE - 1)  # our clock steps back
        await poll_and_round(end + GRACE + 3)
        async with worker(settings, clock, redis_url) as fresh:
            answer = await fresh.history.slots(x.id, *yesterday)
            assert fresh.history.stats.days_redis == 1  # as handed over
            assert answer == await plain_select(truth(fresh), x.id, *yesterday)
            assert sum(quota for quota, *_ in answer.values()) == 1000


async def test_a_round_that_fails_as_it_passes_a_missing_id_does_not_wait_for_it_again(
    make_gateway: GatewayFactory, settings: Settings, redis_url: str
) -> None:
    """The round that passes over an id missing for LATE fails at its read of new rows (the
    widest of any round: the likeliest to time out): the next round passes it all the same.
    (It had taken the id for one found anew, and waited LATE for it again, reading everything
    written since it each round.)"""
    gateway = make_gateway("postgres")
    settings = dataclasses.replace(settings, sqlite_path=gateway.path, database=gateway.database)  # type: ignore[arg-type]
    y = gateway.add_token()
    clock = Clock(NOON)
    gateway.add_log(y, created_at=NOON - 100, quota=1)
    today = (T0, T0 + DAY)
    async with worker(settings, clock, redis_url) as w:
        await w.history.slots(y.id, *today)
        await round_heard(w, w)
        hole = roll_back_a_charge(gateway, y, int(clock.now))
        gateway.add_log(y, created_at=int(clock.now), quota=7)
        run = w.recorder.run
        passing = False  # the round passes over the hole: it looks for the next missing id

        async def database(sql: str, params: Any, *resent: Any, **options: Any) -> Any:
            nonlocal passing
            if "NOT EXISTS" in sql and "min(id)" not in sql:
                passing = True
            elif passing and "AS settled" in sql:
                raise StoreUnavailable("canceling statement due to statement timeout")
            return await run(sql, params, *resent, **options)

        w.recorder.run = database
        first_new: list[int] = []  # after the failed round: the first id each round may count
        for _ in range(int(LATE + SETTLE) + 10):
            clock.now += 1
            gateway.add_log(y, created_at=int(clock.now), quota=7)
            if passing and not first_new:
                passing = False
                w.recorder.run = run
            before = sent(w)
            try:
                await round_heard(w, w)
            except StoreUnavailable:
                continue  # the failed round
            if w.recorder.run is run:
                (params,) = [p for sql, p in w.recorder.sent[before:] if "CASE WHEN id <=" in sql]
                first_new.append(int(params[1]) + 1)
            await w.history.slots(y.id, *today)
        # The round after the failed one passes over the hole; the rounds after it read above it.
        assert len(first_new) > 2 and all(first > hole for first in first_new[1:]), (hole, first_new)
        assert await w.history.slots(y.id, *today) == await plain_select(truth(w), y.id, *today)


def restore_logs(gateway: Gateway, upto: int) -> None:
    """Take the log back to a backup holding the rows up to id `upto`, as SQLite's backup API
    (`.restore`) writes it into the same file: the later rows are gone, and new ones take
    their ids again."""
    gateway.db.execute("DELETE FROM logs WHERE id > ?", (upto,))
    gateway.db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'logs'", (upto,))


async def test_a_log_restored_from_a_backup_is_kept_from_scratch(
    gateway: Gateway, settings: Settings, redis_url: str
) -> None:
    """The gateway's database is restored from a backup taken before x's last charges while the
    rounds go on: the log's smallest id is as it was, the new rows take the ids of those the
    restore took out. The rounds kept the charges the restore took out, and settled past the
    ids the new charges took: the open day showed the first and lacked the second (and so did
    the day handed over at its close)."""
    settings, x, y, clock = x_and_y(gateway, settings)
    today = (T0, T0 + DAY)
    backup = gateway.add_log(y, created_at=NOON - 60, quota=1)
    async with worker(settings, clock, redis_url) as w:
        await w.history.slots(x.id, *today)
        await round_heard(w, w)
        for _ in range(int(SETTLE) + 3):  # the rounds settle past these
            clock.now += 1
            gateway.add_log(x, created_at=int(clock.now), quota=100)
            await w.history.slots(x.id, *today)
            await round_heard(w, w)
        restore_logs(gateway, backup)
        answer = await rounds_go_on(w, gateway, clock, x, x, int(SETTLE) + 5)
        assert answer == await plain_select(truth(w), x.id, *today)
        assert sum(quota for quota, *_ in answer.values()) == 1 + (int(SETTLE) + 5) * 7


async def test_a_log_restored_from_a_backup_before_the_open_day_is_read_with_new_bounds(
    gateway: Gateway, settings: Settings, redis_url: str
) -> None:
    """The gateway's log is restored from a backup taken 3 hours before the open day began, while
    the rounds go on: new charges take ids below the one every worker found (and kept) as the
    bound below the day's start. The rounds report the log's largest id: the leader's first round
    afresh and the workers that hear it find their bounds again. (They kept them: the leader's
    round left out y's settled charge, and x's first poll on the follower read nothing.)"""
    settings = dataclasses.replace(settings, sqlite_path=gateway.path, database=gateway.database)  # type: ignore[arg-type]
    x, y = gateway.add_token(), gateway.add_token()
    backup = gateway.add_log(y, created_at=T0 - 3 * 3600, quota=1)
    for i in range(5):
        gateway.add_log(y, created_at=T0 - 7200 + i * 600, quota=1)
    gateway.add_log(x, created_at=NOON - 100, quota=1)
    clock = Clock(NOON)
    today = (T0, T0 + DAY)
    async with worker(settings, clock, redis_url) as a, worker(settings, clock, redis_url) as b:
        await lead_and_follow(a, b, [y], today)  # both found the bound below T0
        restore_logs(gateway, backup)
        clock.now += 1
        gateway.add_log(y, created_at=int(clock.now), quota=7)
        gateway.add_log(x, created_at=int(clock.now), quota=7)
        clock.now += SETTLE + 1  # the rounds settle past these two
        gateway.add_log(y, created_at=int(clock.now), quota=7)
        await round_heard(a, a, b)
        assert await b.history.slots(x.id, *today) == await plain_select(truth(b), x.id, *today)
        expected = await plain_select(truth(a), y.id, *today)
        assert sum(quota for quota, *_ in expected.values()) == 14
        assert await a.history.slots(y.id, *today) == expected
        assert await b.history.slots(y.id, *today) == expected
