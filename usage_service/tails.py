"""Polled tokens' open days kept fresh by the refresher's rounds, at a cost flat in polls and workers.

Workers note the tokens whose open days they answered (`History.take_polled`) in a Redis sorted
set, `hist:hot`. Every USAGE_REFRESH_INTERVAL, side by side with the balance's round (a charge
need not wait for the records to be read), the refresher's leader runs a history round over the
tokens noted within USAGE_HOT_WINDOW:

1. one statement: the log's smallest id (how a clean-up shows), the *settled* mark, the id of
   the last row stamped SETTLE seconds before the newest one (the gateway's clock, not ours),
   and the first id missing below it: every row with an id up to the mark has been written,
   unless its transaction still commits (its id is missing meanwhile). The rounds settle below
   a missing id for up to LATE seconds, then pass over it (`_settle_below`); a leadership's
   first round looks for one in the LATE seconds below its mark (`_first_settled`);
2. for tokens that became hot, their open days up to the last settled mark: INIT_CHUNK tokens a
   statement, each token an index range of `idx_logs_token_id` from the open days' first id;
3. one statement: every row above the last settled mark, whatever its token (one range of the
   primary key: what the gateway wrote in the last SETTLE seconds and a round), summed by token,
   slot and model, split at the new settled mark. What is settled is added to the tokens' kept
   open days for good; the rest counts this round only and is read again next round.

When a day closes (5 minutes after its end), the round that closes it reads it once more with
the open days (what the gateway wrote since the last round, late rows of the day included, in
the same range of ids), and writes it to Redis as each token's closed day, so that nobody reads
that day again: it holds what reading the day directly would.

It writes the tails that changed to Redis (`hist:tail:<id>`; the others again once half their TTL
has gone), then publishes one message on the invalidation channel: the round's time, the smallest
and largest id and the changed tokens. Workers drop what they hold of those and take the rest as
confirmed (History.hear_round), unless the hot set was cut at USAGE_HOT_MAX: then the round
confirms nothing, and workers read what they need directly, as they do for any token not kept.

The steady cost is two statements a round, however many tokens are polled, how often, and by
how many workers. So that it stays so when the leader is saturated and its rounds run late, it
says on the channel when a round begins: workers whose last word lapsed wait for this one's
(History.round_began) instead of reading every polled token's open days at once.

Without Redis, or while it is down, each worker runs the same round over its own polled tokens
and keeps the tails it reads in-process.

Leadership: the leader lock is checked before each statement and again before the round's
writes and its message, as in the balance's round; a leader that finds it lost abandons the round
and forgets what it kept (refresh.py).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from .config import Settings
from .history import DAY, GRACE, SLOT, Day, History, Slots, Tail, add_row, add_to, fits, tail_fingerprint
from .hotset import Polled
from .shared import SharedRedis
from .store.spending import SpendRow, first_missing, last_id_before, marks, rows_since, spending

# Seconds after which every row stamped before then is taken as written (its transaction
# committed): rows above the mark they give are read again each round.
SETTLE = 10.0

# Seconds for which an id missing below the mark is waited for (a row still committing): the
# rounds settle below it meanwhile, and past it once it shows or this has gone (its insert was
# rolled back, or it commits later still and is not counted).
LATE = 60.0

# Seconds a tail stays in Redis without being written again; the leader rewrites unchanged ones
# once half of it has gone.
TAIL_KEY_TTL = 60.0

# Seconds without a round done (the database out, this worker stalled) after which the next
# begins afresh, as a leadership's first, rather than read all that came since in one statement:
# within them, a day that closed meanwhile is still handed over whole.
AFRESH_AFTER = GRACE

# Tokens whose open days one statement reads when they become hot.
INIT_CHUNK = 500

LockCheck = Callable[[], Awaitable[bool]]

logger = logging.getLogger("usage_service.tails")


@dataclass
class TailStats:
    tokens: int = 0  # tokens kept by the last round
    initialised: int = 0  # tokens whose open days were read whole, since start
    statements: int = 0  # statements the rounds sent, since start


class _Gap(NamedTuple):
    """An id missing below the mark, waited for (TailKeeper._settle_below)."""

    id: int
    since: float  # when a round first found it missing (our clock)
    mark: int  # that round's mark: every id missing below it has been missing since then


@dataclass
class _Kept:
    """What one round leaves: the log's smallest and largest id, every hot token's open days,
    the days that closed since the last round (token -> day -> Day), and the hot tokens not kept
    (`unfit`: a sum of their open days passes 64 bits)."""

    min_id: int
    max_id: int
    tails: dict[int, Slots]
    closed: dict[int, dict[int, Day]] = field(default_factory=dict)
    unfit: set[int] = field(default_factory=set)


class TailKeeper:
    def __init__(self, history: History, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self.history = history
        self.reader = history.reader
        self.clock = clock
        self.window = settings.hot_window
        self.hot_max = settings.hot_max
        self.stats = TailStats()
        self.polled: Polled[int, None] = Polled(self.window, self.hot_max)  # this worker's own
        # What the rounds keep, as leader or on our own: every kept token's rows with an id up
        # to `_settled` and created_at from the open days' start, summed.
        self._settled: int | None = None
        self._settled_at = 0.0  # the mark's time, by the gateway's clock
        self._kept_at = -math.inf  # when the last round was done (our clock)
        self._min_id = 0  # the log's smallest id, as the last round done read it
        self._gap: _Gap | None = None  # the first id missing above `_settled`
        self._open_day = -1
        self._base: dict[int, Slots] = {}
        # The smallest id among each kept token's rows of each open day: the guard of the day
        # once it closes (history.Day).
        self._guards: dict[int, dict[int, int]] = {}
        # Kept tokens whose open days hold a sum past 64 bits: not published, read directly.
        self._unfit: set[int] = set()
        self._published: dict[int, Slots] = {}
        self._written: dict[int, float] = {}
        self._vouched = False  # this round published a complete round's word (see round_ended)
        # This leadership's mark on the tails it keeps in Redis (see Tail.epoch): new each time
        # this worker takes the lead, so that no worker takes a tail another leadership left.
        self._epoch: str | None = None
        self._announced = False  # this round told the workers it began (see announce)

    def take_polled(self) -> list[int]:
        """Take the tokens answered since last time; return those to note in the shared set."""
        return list(self.polled.take(dict.fromkeys(self.history.take_polled()), self.clock()))

    def forget_noted(self) -> None:
        """Redis failed, and may come back empty: note every polled token again once it answers."""
        self.polled.forget_noted()

    async def note(self, redis: SharedRedis, unnoted: list[int]) -> None:
        now = self.clock()
        await redis.history_hot.note(unnoted, now)
        self.polled.noted(unnoted, now)

    def round_began(self, *, leading: bool) -> None:
        """A refresher's round begins; `leading`: this worker expects to run the history round."""
        self._vouched = self._announced = False
        if leading:
            self.history.round_began()

    async def announce(self, redis: SharedRedis) -> None:
        """As leader, at the start of a round, tell the other workers that its word will come
        (History.round_began), if the last round kept any token's history."""
        if self.stats.tokens:
            self._announced = True
            await redis.channel.publish_history_round(self.clock() + self.history.confirmed_for)

    def round_ended(self) -> None:
        """The refresher's round is over: polls waiting for it go on, now or (when it published
        a complete round) once this worker hears it."""
        self.history.round_ended(heard_later=self._vouched)

    async def lead(self, redis: SharedRedis, before_statement: LockCheck, before_writes: LockCheck) -> bool:
        """Run a round as leader, checking the lock before each statement and before the writes
        (refresh.py); False: the lock was lost, and nothing more was written."""
        now = self.clock()
        members = await redis.history_hot.members(now - self.window, self.hot_max)
        if not members:  # nobody polls history: no statement
            self.step_down()
            await self._release(redis)
            return True
        kept = await self._round(members, now, before_statement)
        if kept is None:
            return False
        if self._epoch is None:
            self._epoch = uuid.uuid4().hex[:16]
        epoch = self._epoch
        min_id, tails = kept.min_id, kept.tails
        # The unfit are named as changed, without a fingerprint: workers drop what they hold.
        changed = {t for t, slots in tails.items() if not _same(self._published.get(t), slots)} | kept.unfit
        due = now - TAIL_KEY_TTL / 2
        writes = {
            t: Tail(self._open_day, slots, now, None, epoch=epoch).encode()
            for t, slots in tails.items()
            if t in changed or self._written.get(t, 0.0) <= due
        }
        if not await before_writes():
            return False
        if kept.closed:
            await redis.history_days.put_all(
                {(t, day): entry.encode(day) for t, days in kept.closed.items() for day, entry in days.items()}
            )
        if writes:
            await redis.history_tails.put_many(writes, TAIL_KEY_TTL)
            self._written.update(dict.fromkeys(writes, now))
        # Tokens no longer polled leave the rounds: their tails go from Redis with them, or a
        # worker asking for one later would take it as vouched for by the rounds that go on.
        # (Only this leadership's: a successor's, should this leader be deposed by now, stays.)
        dropped = [t for t in self._published if t not in tails]
        if dropped:
            await redis.history_tails.forget(dropped, epoch)
        # Only a round that kept every polled token vouches for what workers hold (as the
        # balance's confirmation): past USAGE_HOT_MAX, the others' tails would go stale unseen.
        # With each tail's fingerprint: a worker holding those very open days keeps them (a
        # first sight of 10,000 tokens need not send every worker to Redis for each).
        fingerprints = {t: tail_fingerprint(self._open_day, tails[t]) for t in changed if t in tails}
        complete = len(members) < self.hot_max
        await redis.channel.publish_history(now, min_id, kept.max_id, complete, sorted(changed), fingerprints, epoch)
        self._vouched = complete
        await self._release(redis)
        self._published = tails
        self._written = {t: at for t, at in self._written.items() if t in tails}
        return True

    async def _release(self, redis: SharedRedis) -> None:
        """Tell the workers waiting on an announced round that no word will vouch for them."""
        if self._announced and not self._vouched:
            await redis.channel.publish_history_round(None)

    async def own_round(self) -> None:
        """Run a round over this worker's own polled tokens and keep the tails in-process."""
        now = self.clock()
        self.polled.prune(now)
        if not self.polled:
            self.step_down()
            return
        kept = await self._round(list(self.polled.current()), now, None)
        assert kept is not None  # nobody to be deposed by
        self.history.note_min_id(kept.min_id, now, self.history.confirmed_for)
        for token_id, days in kept.closed.items():
            self.history.keep_days(token_id, days)
        until = now + self.history.confirmed_for
        tails = {t: Tail(self._open_day, slots, now, until) for t, slots in kept.tails.items()}
        self.history.keep_tails(tails, unkept=kept.unfit)

    def step_down(self) -> None:
        """Forget what was kept: another leader may have come and gone since."""
        self._forget_kept()
        self._epoch = None
        self._published.clear()
        self._written.clear()

    def _forget_kept(self) -> None:
        """Forget the open days kept: the next round begins afresh, as a leadership's first."""
        self._settled = None
        self._gap = None
        self._open_day = -1
        self._base.clear()
        self._guards.clear()
        self._unfit.clear()

    async def _round(self, tokens: list[int], now: float, before_statement: LockCheck | None) -> _Kept | None:
        """Bring the kept open days of these tokens up to date; None when the lock was lost.
        A round that fails part-way (a statement, or cancelled) leaves what was kept as it was:
        the open days not moved on, the tokens it began to take in not taken."""
        taking: list[int] = []
        settled, gap = self._settled, self._gap
        try:
            return await self._read_round(tokens, now, before_statement, taking)
        except BaseException:
            self._settled, self._gap = settled, gap  # (a missing id waited for: since as long)
            for token_id in taking:  # read whole again by the next round
                self._base.pop(token_id, None)
                self._guards.pop(token_id, None)
            raise

    async def _read_round(
        self, tokens: list[int], now: float, before_statement: LockCheck | None, taking: list[int]
    ) -> _Kept | None:
        if self._settled is not None and now - self._kept_at > AFRESH_AFTER:
            self._forget_kept()
        # A day kept as closed stays closed, should our clock step back across its close.
        open_day = max(int(now - GRACE) // DAY, self._open_day)
        start = open_day * DAY
        if before_statement is not None and not await before_statement():
            return None
        self.stats.statements += 1
        min_id, settled, settled_at, gap, max_id = await marks(self.reader, int(now), int(SETTLE), self._settled)
        if 0 < min_id < self._min_id:
            # A row committed below the log's smallest id (still committing as the clean-up
            # deleted the rows around it, on PostgreSQL): the rounds took its id as deleted, and
            # may have settled past it. Begin afresh, as a leadership's first round.
            self._forget_kept()
            gap = None
        elif self._settled is not None and max_id < self._settled:
            # The log ends below the rows the rounds settled on: it was restored from a backup
            # (or emptied). What was kept holds rows it no longer has, and new rows take ids the
            # rounds settled past. Begin afresh, as a leadership's first round.
            self._forget_kept()
            gap = None
        # This worker's bounds, which the tokens taken in below are read from, are found again
        # after such a restore (History.note_max_id): the workers hear of it after this round.
        self.history.note_max_id(max_id)
        # Days that closed since the last round are read once more with the open ones (a row
        # the gateway wrote late, in the same range of ids), then handed over as closed.
        closing_from = self._open_day
        closing = self._settled is not None and 0 <= closing_from < open_day  # (-1: no day kept yet)
        read_from = closing_from * DAY if closing else start
        new_day = open_day != self._open_day  # (self._open_day moves on once the round is done)
        if new_day and not closing:
            self._trim(open_day)
        hot = set(tokens)
        if len(self._base) > len(hot) or not hot.issuperset(self._base):
            self._base = {t: slots for t, slots in self._base.items() if t in hot}
            self._guards = {t: days for t, days in self._guards.items() if t in hot}
        first_round = self._settled is None
        if self._settled is None:
            self._base.clear()
            self._guards.clear()
            self._settled = await self._first_settled(settled, settled_at, min_id, now, before_statement)
            if self._settled is None:
                return None
        # The gateway's clean-up deleted every row below min_id: a token with a kept row under
        # it lost rows from its open days, which are read again whole (as new tokens' are).
        for token_id in [t for t, days in self._guards.items() if min(days.values(), default=min_id) < min_id]:
            self._base.pop(token_id, None)
            del self._guards[token_id]
        new = sorted(hot.difference(self._base))  # (their days closing now are not read: not handed over)
        if new:
            after = await self.history.id_before(start)
            for first in range(0, len(new), INIT_CHUNK):
                chunk = new[first : first + INIT_CHUNK]
                if before_statement is not None and not await before_statement():
                    return None
                self.stats.statements += 1
                rows = await spending(
                    self.reader,
                    chunk,
                    SLOT,
                    start=start,
                    end=None,
                    after_id=after,
                    before_id=self._settled + 1,
                    exact=True,  # one token's sum past 64 bits fails it alone (below)
                )
                read: dict[int, Slots] = {t: {} for t in chunk}
                taking.extend(chunk)
                for row in rows:
                    add_row(read[row.token_id], row)
                    self._guard(row)
                self._base.update(read)
            self.stats.initialised += len(new)
        newly_settled = self._settled
        if gap is not None:
            below = await self._settle_below(gap, settled, min_id, now, before_statement)
            if below is None:
                return None
            newly_settled = below
        elif not first_round:  # (a first round's settled where `_first_settled` said)
            self._gap = None
            newly_settled = max(self._settled, settled)
        if before_statement is not None and not await before_statement():
            return None
        self.stats.statements += 1
        rows = await rows_since(self.reader, SLOT, after_id=self._settled, settled=newly_settled, start=read_from)
        grown: dict[int, Slots] = {}
        recent: dict[int, Slots] = {}
        for row in rows:
            base = self._base.get(row.token_id)
            if base is None:
                continue  # not polled: other tokens' rows are never kept
            # A closing day's rows go in whole, settled or not: what is read of it now is what
            # reading the day directly would give, and no later round reads it again.
            if row.settled or row.slot < start:
                # Copied before it grows: the slots last published must stay as they were.
                slots = grown.get(row.token_id)
                if slots is None:
                    slots = grown[row.token_id] = dict(base)
                self._guard(row)
            else:
                slots = recent.setdefault(row.token_id, {})
            add_row(slots, row)
        self._base.update(grown)
        self._settled = newly_settled
        self._settled_at = settled_at
        self._open_day = open_day
        self._kept_at = now
        self._min_id = min_id
        closed: dict[int, dict[int, Day]] = {}
        if closing:
            # Days closed: what was kept of them is whole, and is each token's closed day.
            closed = self._close_days(closing_from, open_day, skip=set(new))
            self._trim(open_day)
        tails: dict[int, Slots] = {}
        for token_id in hot:
            base = self._base[token_id]
            extra = recent.get(token_id)
            if extra is None:
                tails[token_id] = base
            else:
                merged = dict(base)
                for key, spend in extra.items():
                    add_to(merged, key, spend)
                tails[token_id] = merged
        # A token whose sums pass 64 bits fails alone: it is not kept, and its polls read its
        # open days directly (and answer 503). What a token holds changes only where rows came.
        self._unfit.intersection_update(hot)
        for token_id in hot if new_day else set(new).union(grown, recent):
            if fits(tails[token_id]):
                self._unfit.discard(token_id)
            elif token_id not in self._unfit:
                self._unfit.add(token_id)
                logger.warning("token %d: a sum of its open days' spending passes 64 bits (history: 503)", token_id)
        for token_id in self._unfit:
            del tails[token_id]
        self.stats.tokens = len(tails)
        return _Kept(min_id, max_id, tails, closed, set(self._unfit))

    async def _first_settled(
        self, mark: int, mark_at: int, min_id: int, now: float, before_statement: LockCheck | None
    ) -> int | None:
        """Where a keeper's first round settles: at the mark, unless an id is missing in the
        LATE seconds below it (a row still committing, as after the ones the rounds found
        missing: `_settle_below`); then below that one. Up to two statements, once a
        leadership; None when the lock was lost."""
        if before_statement is not None and not await before_statement():
            return None
        self.stats.statements += 1
        floor = max(await last_id_before(self.reader, mark_at - int(LATE)), min_id - 1)
        return await self._below_first_missing(floor, mark, now, before_statement)

    async def _settle_below(
        self, gap: int, mark: int, min_id: int, now: float, before_statement: LockCheck | None
    ) -> int | None:
        """Where to settle when the id `gap` is missing below the mark: below it while it may
        still be committing (up to LATE since a round first found it missing); after that,
        past it and every other id missing below the mark of that round (missing as long), up
        to the first id missing above that mark (one more statement). None when the lock was
        lost."""
        assert self._settled is not None
        if gap < min_id:  # deleted by the clean-up, as every id below min_id
            return max(self._settled, min(mark, min_id - 1))
        if self._gap is None or self._gap.id != gap:
            if self._gap is not None and gap < self._gap.mark:  # missing as long as the last one
                self._gap = self._gap._replace(id=gap)
            else:
                self._gap = _Gap(gap, now, mark)
        if now - self._gap.since < LATE:
            return gap - 1
        return await self._below_first_missing(max(self._gap.mark, gap), mark, now, before_statement)

    async def _below_first_missing(
        self, after: int, mark: int, now: float, before_statement: LockCheck | None
    ) -> int | None:
        """The mark, or just below the first id missing above `after` (waited for from now on);
        one statement if there are ids to look at. None when the lock was lost."""
        missing = None
        if mark > after + 1:
            if before_statement is not None and not await before_statement():
                return None
            self.stats.statements += 1
            missing = await first_missing(self.reader, after, mark)
        self._gap = None if missing is None else _Gap(missing, now, mark)
        return mark if missing is None else missing - 1

    def _guard(self, row: SpendRow) -> None:
        days = self._guards.setdefault(row.token_id, {})
        day = row.slot // DAY
        held = days.get(day)
        if held is None or row.min_id < held:
            days[day] = row.min_id

    def _trim(self, open_day: int) -> None:
        """Keep only what belongs to the open days."""
        start = open_day * DAY
        self._base = {t: {k: v for k, v in slots.items() if k[0] >= start} for t, slots in self._base.items()}
        self._guards = {t: {d: g for d, g in days.items() if d >= open_day} for t, days in self._guards.items()}

    def _close_days(self, first: int, end: int, *, skip: set[int]) -> dict[int, dict[int, Day]]:
        """The kept tokens' days from `first` up to (not including) `end`, as closed days, once
        this round has read what came since the last one: those the gateway's rows show half the
        grace past (an idle gateway's may not: they are left to be read from the database). What
        a day holds then is what reading it directly would: a row written later than the grace
        after its time is in neither. The tokens in `skip` became hot this round: their base
        holds the open days only."""
        while end > first and end * DAY + GRACE / 2 > self._settled_at:
            end -= 1
        closed: dict[int, dict[int, Day]] = {}
        if end <= first:
            return closed
        for token_id, slots in self._base.items():
            if token_id in skip:
                continue
            by_day: dict[int, Slots] = {day: {} for day in range(first, end)}
            for key, spend in slots.items():
                day = key[0] // DAY
                if first <= day < end:
                    by_day[day][key] = spend
            guards = self._guards.get(token_id, {})
            # A day whose sums pass 64 bits is not handed over: read directly, it fails alone.
            closed[token_id] = {day: Day(s, guards.get(day)) for day, s in by_day.items() if fits(s)}
        return closed


def _same(published: Slots | None, slots: Slots) -> bool:
    return published is slots or published == slots
