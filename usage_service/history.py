"""The spending engine: what a token spent, by 15-minute slot and model, from the gateway's log.

A token's spending is kept by UTC day:
- a *closed* day (one that ended GRACE seconds ago or more: the gateway writes a row within
  seconds of its created_at) never changes, apart from the gateway's clean-up of old rows. It is
  read once, kept in-process (an LRU of DAYS_KEPT days) and in Redis (for a week, shared by all
  workers and restarts), and served from there while the log's smallest id shows no clean-up
  reached it (see `Day.guard`);
- the *open* days (from the day holding now - GRACE on) are where new charges appear. For a
  token whose history is polled, the refresher's rounds keep them (tails.py): the leader reads
  what the gateway wrote since its last round for every polled token at once, writes the tails
  that changed to Redis and says so on the invalidation channel; workers answer from Redis and
  then in-process while the rounds confirm them (`hear_round`). Any other token's open days are
  read directly, at most once per token at a time in a worker, and held TAIL_TTL seconds.

Reads are bounded by the log's id order (store/spending.py): a cold month reads that month of
the token's rows, not all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import orjson

from ._flights import Flights
from ._lru import keep_newest
from .history_cache import RedisDays, RedisTails
from .records import INT64_MAX, INT64_MIN
from .store import StoreUnavailable
from .store.logs import LogReader
from .store.spending import SpendRow, id_after, id_before, id_range, spending

SLOT = 900  # seconds; every time zone's UTC offset is a whole number of slots
DAY = 86_400

# Seconds after which the gateway has written every row of a past moment: a slot (and a day)
# is closed once its end is this much in the past.
GRACE = 300

# Seconds a token's open days, read directly, are answered from the in-process layer: the
# balance's freshness bound (USAGE_LOCAL_TTL's default).
TAIL_TTL = 1.0

# (token, day) entries kept in-process per worker, encoded: a month for ~3,000 tokens, about 50 MB
# at ten rows a day.
DAYS_KEPT = 100_000
TAILS_KEPT = 20_000
BOUNDS_KEPT = 4096

# Bumped whenever the layout of a day in Redis changes, so old and new workers never misread each other.
DAY_FORMAT = 1
TAIL_FORMAT = 2

# Seconds a request waits, all told, for earlier reads of its token's log to land (they run one
# at a time) before it answers 503 (or with what stale-if-error holds).
TURN_WAIT = 10.0
# Requests of one token that may wait for its reads at once, in a worker; more answer 503 at once.
TURN_QUEUE = 32
# Runs of at least this many days read from the database are read in two halves at once.
SPLIT_DAYS = 8

# The longest range `slots` answers, in days (ten years): the routes bound theirs far below.
MAX_DAYS = 3660

# Seconds between two looks at the log's smallest id (how a clean-up is noticed) when nobody
# reports it sooner.
CLEANUP_CHECK = 1.0


# What a token spent in a slot, for one model: (quota, prompt tokens, completion tokens,
# requests). quota is sum(quota) of type-2 rows minus sum(quota) of type-6 (refund) rows; the
# others sum type-2 rows. A plain tuple, not a class: a worker holds up to millions of them
# (kept sums, open days, closed days being read), and Python's garbage collector stops looking
# at a tuple of ints, while every instance of a class (a NamedTuple too) is scanned again in each
# full collection, which stalled a loaded worker for up to a second (docs/performance.md).
Spend = tuple[int, int, int, int]
K = TypeVar("K")


def plus(a: Spend, b: Spend) -> Spend:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3])


def add_to(sums: dict[K, Spend], key: K, spend: Spend) -> None:
    """Add `spend` into `sums[key]` (which may not be there yet)."""
    held = sums.get(key)
    sums[key] = spend if held is None else plus(held, spend)


def total(spends: Iterable[Spend]) -> Spend:
    quota = prompt = completion = requests = 0
    for q, p, c, n in spends:
        quota, prompt, completion, requests = quota + q, prompt + p, completion + c, requests + n
    return (quota, prompt, completion, requests)


Slots = dict[tuple[int, str], Spend]  # {(slot start, model): Spend}


def fits(slots: Slots) -> bool:
    """Whether every figure is a 64-bit integer, as Redis's JSON and the routes take them."""
    return all(INT64_MIN <= figure <= INT64_MAX for spend in slots.values() for figure in spend)


@dataclass(frozen=True, slots=True)
class Day:
    """One token's spending over one closed UTC day."""

    slots: Slots
    # The smallest id among the token's rows of the day (None: it has none). The gateway's
    # clean-up deletes the oldest rows: while the log's smallest id is at most this, none of the
    # day's rows is gone.
    guard: int | None

    def valid(self, min_id: int) -> bool:
        return self.guard is None or self.guard >= min_id

    def encode(self, day: int) -> bytes:
        """Compact JSON for Redis: [format, guard, [[slot in the day, model, quota, prompt,
        completion, requests], ...]]."""
        first = day * DAY
        slots = [[(slot - first) // SLOT, model, *spend] for (slot, model), spend in self.slots.items()]
        return orjson.dumps([DAY_FORMAT, self.guard, slots])

    @staticmethod
    def guard_of(value: bytes) -> int | None:
        """The guard of what `encode` wrote, read without decoding its slots."""
        guard = value[1 : value.index(b",[")].split(b",")[1]
        return None if guard == b"null" else int(guard)

    @classmethod
    def decode(cls, day: int, value: bytes) -> Day:
        """Read what `encode` wrote; raise ValueError for anything else."""
        try:
            fmt, guard, slots = orjson.loads(value)
            if fmt != DAY_FORMAT or not (guard is None or type(guard) is int):
                raise ValueError("another format")
            first = day * DAY
            return cls(
                {(first + int(i) * SLOT, str(m)): (int(q), int(p), int(c), int(n)) for i, m, q, p, c, n in slots},
                guard,
            )
        except (TypeError, ValueError) as exc:  # orjson.JSONDecodeError is a ValueError
            raise ValueError(f"not a cached day: {exc}") from None


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Tail:
    """One token's spending from the start of day `start` on, the log's truth as of `read_at`."""

    start: int  # a day number (Unix seconds // DAY)
    slots: Slots
    read_at: float  # wall clock
    # Fresh until then (wall clock); None: kept by the leader, fresh while its rounds confirm it
    # under the generation it was taken in (see History.hear_round).
    until: float | None
    generation: int = -1
    # The leadership that kept it in Redis (TailKeeper): a worker takes a tail from Redis only
    # under the leadership whose rounds it hears, which keeps every tail it vouches for there.
    epoch: str = ""

    def encode(self) -> bytes:
        """Compact JSON for Redis: [format, start day, read at, [[slot / SLOT, model, quota,
        prompt, completion, requests], ...], epoch]."""
        slots = [[slot // SLOT, m, *spend] for (slot, m), spend in self.slots.items()]
        return orjson.dumps([TAIL_FORMAT, self.start, self.read_at, slots, self.epoch])

    @property
    def fingerprint(self) -> bytes:
        """8 bytes that tell these open days from any others (the same in every process)."""
        return tail_fingerprint(self.start, self.slots)

    @classmethod
    def decode(cls, value: bytes, generation: int) -> Tail:
        """Read what `encode` wrote, as kept by the leader; raise ValueError for anything else."""
        try:
            fmt, start, read_at, slots, epoch = orjson.loads(value)
            if fmt != TAIL_FORMAT:
                raise ValueError("another format")
            return cls(
                int(start),
                {(int(i) * SLOT, str(m)): (int(q), int(p), int(c), int(n)) for i, m, q, p, c, n in slots},
                float(read_at),
                None,
                generation,
                str(epoch),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a cached tail: {exc}") from None


def tail_fingerprint(start: int, slots: Slots) -> bytes:
    """What a history round's message carries for a token's open days (Tail.fingerprint)."""
    items = sorted([slot, model, *spend] for (slot, model), spend in slots.items())
    return hashlib.blake2b(orjson.dumps([start, items]), digest_size=8).digest()


@dataclass
class HistoryStats:
    days_local: int = 0  # closed days answered in-process
    days_redis: int = 0  # closed days answered from Redis
    days_read: int = 0  # closed days read from the database
    tails_local: int = 0  # open days answered in-process
    tails_redis: int = 0  # open days answered from what the leader keeps in Redis
    tails_read: int = 0  # open days read from the database
    coalesced: int = 0  # requests that waited on another request's read
    waited_round: int = 0  # requests that waited for the leader's late round instead of reading
    cleaned: int = 0  # cached days dropped because the gateway's clean-up reached them
    stale_served: int = 0  # answers whose open days were stale, the database being unavailable


@dataclass(frozen=True, slots=True)
class _Loaded:
    days: dict[int, Day]
    tail: Tail | None


def add_row(slots: Slots, row: SpendRow) -> None:
    """Add one group of a spending statement into `slots`."""
    add_to(slots, (row.slot, row.model), (row.quota, row.prompt_tokens, row.completion_tokens, row.requests))


def add_rows(into: dict[int, Slots], rows: Iterable[SpendRow]) -> dict[int, int]:
    """Add a spending statement's rows into {day: Slots}; return {day: smallest id seen}."""
    guards: dict[int, int] = {}
    for row in rows:
        day = row.slot // DAY
        add_row(into.setdefault(day, {}), row)
        guards[day] = min(guards.get(day, row.min_id), row.min_id)
    return guards


class History:
    """Answers `slots` for any token, from the in-process layer or the gateway's log."""

    def __init__(
        self,
        reader: LogReader,
        *,
        days: RedisDays | None = None,
        tails: RedisTails | None = None,
        clock: Callable[[], float] = time.time,
        tail_ttl: float = TAIL_TTL,
        confirmed_for: float = 2.0,
        note_polls: bool = False,
        stale_if_error: float = 0.0,
        kept_while_asked: float = math.inf,
    ) -> None:
        self.reader = reader
        self.redis_days = days
        self.redis_tails = tails
        # How long after a round's confirmation the tails it vouched for stay fresh: a bit more
        # than one refresh interval, so that rounds on time keep them fresh without a gap.
        self.confirmed_for = confirmed_for
        self._confirmed_at = -math.inf  # as_of of the last history round this worker heard
        self._epoch: str | None = None  # the leadership whose round that was
        self._generation = 0  # bumped whenever the channel is lost or regained
        self._changed: dict[int, float] = {}  # token id -> as_of of the last round that changed it
        # Tokens whose open days were asked for since the refresher last took them (tails.py).
        self._polled: set[int] = set()
        self._note_polls = note_polls
        # The rounds keep a token's open days while it is in the shared hot set, which it leaves
        # once nobody asked for them within USAGE_HOT_WINDOW: for `kept_while_asked` seconds after
        # this worker last asked (the window less the re-note interval), they surely still do.
        # Past that, what the rounds kept is taken on no one's word: the next ask reads directly.
        self.kept_while_asked = kept_while_asked
        self._asked: dict[int, float] = {}  # token id -> when this worker last asked for its open days
        self.clock = clock  # wall clock: created_at is one
        self.tail_ttl = tail_ttl
        self.stale_if_error = stale_if_error  # seconds open days read lately stand in for a failed read
        self.stats = HistoryStats()
        self.min_id = 0  # the log's smallest id, last we looked
        self._min_checked = -math.inf
        self._min_reported_until = -math.inf  # until when the rounds vouch for it
        # _day_key(token id, day) -> the Day as `Day.encode` gives it, the form Redis holds: a few
        # hundred bytes, where the Day itself takes a few KB in objects the garbage collector walks
        # in every full collection. Decoded when asked for, which DaySums makes rare. A plain dict
        # of ints and bytes, least recently used first (_lru.py): the collector does not track it
        # at all, where an OrderedDict keyed by tuples had every full collection visit each member
        # (about 10 ms a collection per 100,000 days held).
        self._days: dict[int, bytes] = {}
        self._tails: OrderedDict[int, Tail] = OrderedDict()
        # Id bounds of moments (see store/spending.py), which do not change once found, unless
        # the log is restored from a backup (note_max_id).
        self._before: OrderedDict[int, int] = OrderedDict()
        self._after: OrderedDict[int, int] = OrderedDict()
        self._bounds_top = 0  # the largest bound found since they were last forgotten
        self._flights: Flights[int, _Loaded] = Flights(
            (StoreUnavailable,), "a read of a token's spending"
        )  # each token's read of its days
        self._waiting: dict[int, int] = {}  # token id -> requests waiting for its read (_wait_turn)
        self._writes: set[asyncio.Task[None]] = set()  # days on their way to Redis
        # Set while the leader runs a round that will vouch for the tails again, until
        # `_round_until` at the latest (see round_began).
        self._round: asyncio.Event | None = None
        self._round_until = -math.inf

    async def slots(
        self, token_id: int, start: int, end: int, *, turn_ends: float | None = None
    ) -> dict[tuple[int, str], Spend]:
        """{(slot_start, model_name): Spend} over the token's rows with start <= created_at < end.
        start and end are Unix seconds, multiples of SLOT. Raises StoreUnavailable (and
        ValueError for a range of more than MAX_DAYS). `turn_ends`: until when (loop time) the
        request may wait for its token's other reads, from `turn_deadline()` (a request that
        asks for two parts shares one deadline); TURN_WAIT from now without it."""
        if end <= start:
            return {}
        if end - start > MAX_DAYS * DAY:
            raise ValueError(f"a range of more than {MAX_DAYS} days")
        await self.current_min_id()
        now = self.clock()
        open_day = int(now - GRACE) // DAY
        first, last = start // DAY, (end - 1) // DAY
        wants_tail = last >= open_day
        direct = False
        if wants_tail:
            if not self._asked_lately(token_id, now):
                direct = self._forget_kept_tail(token_id)
            self._note_asked(token_id, now)
        waited_round = False
        if turn_ends is None:
            turn_ends = self.turn_deadline()
        turn_failed: StoreUnavailable | None = None
        while True:  # once more after the round's wait, and after each read of the token's we waited for
            # Freshness is judged when the answer is made: a pass after a wait takes the time again
            # (which day is open stays as the request found it).
            now = self.clock()
            task = self._running_read(token_id)
            tail_from = open_day if wants_tail else None
            if task is not None and self._lacks(token_id, first, min(last, open_day - 1), tail_from, now):
                # One read of a token's log at a time: a burst of one token's requests for
                # different ranges reads them in turn, not side by side on every connection.
                # Wait for the running one, then read only what it did not; its failure is
                # ours (the database is failing now), answered as our own read's would be.
                try:
                    await self._wait_turn(token_id, task, turn_ends)
                    continue
                except StoreUnavailable as exc:
                    turn_failed = exc
            days, missing = self._held_days(token_id, first, min(last, open_day - 1))
            tail = self._held_tail(token_id, open_day, now) if wants_tail else None
            # Counted after the loop, from the last pass alone: a pass before a wait found
            # some of the same days held, and counting every pass counted those twice.
            held_days, held_tail = len(days), tail is not None
            if not missing and (tail is not None or not wants_tail):
                break
            if wants_tail and tail is None and not waited_round and turn_failed is None:
                waited_round = True
                if await self._wait_for_round():
                    continue
            try:
                if turn_failed is not None:
                    raise turn_failed
                task = self._running_read(token_id)
                if task is not None:  # one began while this request waited for the round
                    await self._wait_turn(token_id, task, turn_ends)
                    continue
                loaded = await self._load(token_id, missing, open_day if wants_tail and tail is None else None, direct)
            except StoreUnavailable:
                # Stale-if-error, as for the balance: open days read lately stand in while the
                # database cannot answer (closed days never missing from an answer).
                tail = None if missing else self._stale_tail(token_id, open_day, now)
                if tail is None:
                    raise
                self.stats.stale_served += 1
                break
            days.update({day: entry.slots for day, entry in loaded.days.items()})
            tail = tail or loaded.tail
            break
        self.stats.days_local += held_days
        self.stats.tails_local += held_tail
        found: dict[tuple[int, str], Spend] = {}
        for day, day_slots in days.items():
            if start <= day * DAY and (day + 1) * DAY <= end:
                found.update(day_slots)  # a whole day: no slot to leave out
            else:
                _select(found, day_slots, start, end)
        if tail is not None:
            # A tail read before a day closed also holds that day, now answered as closed.
            _select(found, tail.slots, max(start, open_day * DAY), end)
        return found

    async def current_min_id(self) -> int:
        """The log's smallest id, as the rounds report it or, without them, as looked at again
        at most every CLEANUP_CHECK seconds: it moves when the gateway's clean-up ran."""
        now = self.clock()
        # While the refresher's rounds report the smallest id, no look of our own.
        if now - self._min_checked >= CLEANUP_CHECK and now >= self._min_reported_until:
            await self._check_cleanup(now)
        return self.min_id

    def open_from(self) -> int:
        """The start (Unix seconds) of the first open day: spending before it is closed."""
        return int(self.clock() - GRACE) // DAY * DAY

    def take_polled(self) -> set[int]:
        """The tokens whose open days were asked for since the last call."""
        polled, self._polled = self._polled, set()
        return polled

    def keep_days(self, token_id: int, days: dict[int, Day]) -> None:
        """Take closed days this worker's own round kept whole as they closed (no Redis)."""
        self._keep(token_id, {day: entry.encode(day) for day, entry in days.items()}, None)

    def keep_tails(self, tails: dict[int, Tail], unkept: Iterable[int] = ()) -> None:
        """Take tails this worker's own round read (no Redis), and drop what it holds of the
        `unkept` tokens' (read directly from now on)."""
        for token_id in unkept:
            self._tails.pop(token_id, None)
        for token_id, tail in tails.items():
            self._tails[token_id] = tail
            self._tails.move_to_end(token_id)
        while len(self._tails) > TAILS_KEPT:
            self._tails.popitem(last=False)

    def hear_round(
        self,
        as_of: float,
        min_id: int,
        complete: bool,
        changed: Sequence[tuple[int, bytes | None]],
        epoch: str | None = None,
        max_id: int | None = None,
    ) -> None:
        """Hear the leader's history round: the polled tokens' open days (`complete`: every
        polled token's) were checked as of `as_of`, and these changed or are new to the leader
        (their tails are in Redis), each with the fingerprint of its tail; the round read the
        log's smallest id and (None from a leader of the version before) its largest. The
        invariant: a tail taken before this worker hears that it changed is never served fresh
        after, unless it is the very tail the round kept (then it is the leader's from now on);
        only a complete round keeps the others fresh, and only under its leadership (`epoch`)
        are tails taken from Redis."""
        self.note_min_id(min_id, as_of, self.confirmed_for)
        if max_id is not None:
            self.note_max_id(max_id)
        for token_id, fingerprint in changed:
            self._changed[token_id] = as_of  # a read under way may predate the change
            held = self._tails.pop(token_id, None)
            if held is not None and fingerprint is not None and held.fingerprint == fingerprint:
                self._tails[token_id] = dataclasses.replace(
                    held, read_at=max(held.read_at, as_of), until=None, generation=self._generation
                )
        if len(self._changed) > TAILS_KEPT:  # a tail read this long ago no longer races with a round
            self._changed = {t: at for t, at in self._changed.items() if at > as_of - 60}
        if complete:
            if as_of >= self._confirmed_at:
                self._confirmed_at, self._epoch = as_of, epoch
            self._end_round()

    def round_began(self, until: float | None = None) -> None:
        """Hear that the leader (this worker, or another through the channel) began a round
        whose word will vouch for the tails again, by `until` at the latest. If the last round's
        word lapses before this one's arrives (under load, rounds run late), a poll of open days
        waits for it, never past `until` nor `confirmed_for` from now, instead of reading them
        from the log: else every polled token would go to the database at once, just when the
        workers are busiest."""
        if self._round is None:
            self._round = asyncio.Event()
        now = self.clock()
        self._round_until = now + self.confirmed_for if until is None else min(until, now + self.confirmed_for)

    def hear_round_began(self, until: float | None) -> None:
        """Hear from the channel that the leader began a round whose word should come by
        `until`, or (None) that its round ended without one."""
        if until is None:
            self._end_round()
        else:
            self.round_began(until)

    def round_ended(self, *, heard_later: bool) -> None:
        """Hear that this worker's own round (as leader) is over. `heard_later`: its word comes
        back through the channel (hear_round lets the waiting polls go then); otherwise they go
        now, to what the round left in-process or to the database."""
        if not heard_later:
            self._end_round()

    def _end_round(self) -> None:
        waiting, self._round = self._round, None
        if waiting is not None:
            waiting.set()

    async def _wait_for_round(self) -> bool:
        """Wait, if the rounds' word lapsed while the leader's round is under way, until that
        round is over (at most until `_round_until`); True if there was a wait."""
        waiting = self._round
        now = self.clock()
        lapsed = -math.inf < self._confirmed_at <= now - self.confirmed_for
        if waiting is None or not lapsed or now >= self._round_until:
            return False
        self.stats.waited_round += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiting.wait(), self._round_until - now)
        return True

    def vouched_tail(self, token_id: int) -> Tail | None:
        """The token's open days as the leader's rounds keep them, while the rounds' word still
        vouches for them: the very object `slots` answers from, so that an answer made from it
        stays true for as long as this returns that same object. None when the token's open
        days are held otherwise (read directly, they are fresh for their own TTL only) or not
        at all, or the word lapsed, or the channel was lost or regained since."""
        tail = self._tails.get(token_id)
        if tail is None or tail.until is not None:
            return None
        now = self.clock()
        if tail.start > int(now - GRACE) // DAY or not self._fresh(tail, now) or not self._asked_lately(token_id, now):
            return None
        return tail

    def basis(self) -> tuple[int, int, int]:
        """What every answer from the history rests on besides a token's own open days: the
        current slot (which days a query names, and up to when they are summed), the first
        open day, and the log's smallest id (the gateway's clean-up)."""
        now = self.clock()
        return int(now) // SLOT, int(now - GRACE) // DAY, self.min_id

    def note_polled(self, token_id: int) -> None:
        """Note that the token's open days were answered without asking `slots` (from an answer
        kept on them), so that the rounds go on keeping them."""
        self._note_asked(token_id, self.clock())

    def _note_asked(self, token_id: int, now: float) -> None:
        if self._note_polls:
            self._polled.add(token_id)
        asked = self._asked
        asked.pop(token_id, None)  # most recently asked last, for keep_newest
        asked[token_id] = now
        # Bounded: a token forgotten here is read directly at its next ask, as after a pause.
        self._asked = keep_newest(asked, 2 * TAILS_KEPT)

    def _asked_lately(self, token_id: int, now: float) -> bool:
        """Whether the rounds surely still keep the token's open days (see `kept_while_asked`)."""
        return now - self._asked.get(token_id, -math.inf) <= self.kept_while_asked

    def _forget_kept_tail(self, token_id: int) -> bool:
        """Drop the open days the rounds kept of a token they may no longer keep; True if any."""
        tail = self._tails.get(token_id)
        if tail is None or tail.until is not None:
            return False
        del self._tails[token_id]
        return True

    def changed_at(self, token_id: int) -> float:
        """The time (as_of) of the last round heard to have changed the token's open days, -inf
        if none lately: an answer rendered before that changes is out of date."""
        return self._changed.get(token_id, -math.inf)

    def set_live(self, live: bool) -> None:
        """Hear whether rounds can reach this worker: either way, some may have been missed."""
        self._generation += 1
        self._confirmed_at, self._epoch = -math.inf, None
        self._end_round()

    def note_min_id(self, min_id: int, at: float, vouched_for: float = 0.0) -> None:
        """Take the log's smallest id as a round read it at `at` (wall clock); the rounds report
        it again within `vouched_for` seconds."""
        if at >= self._min_checked:
            self.min_id, self._min_checked = min_id, at
            self._min_reported_until = max(self._min_reported_until, at + vouched_for)

    def note_max_id(self, max_id: int) -> None:
        """Take the log's largest id, as a round or a look of our own read it. Below a bound
        found lately, the log was restored from a backup (or emptied): new rows take again the
        ids the restore freed, below bounds that would leave them out of every read of the open
        days. Forget the bounds then (found again at the next read), and the open days read
        directly (they may hold rows the restore took out). (The rounds begin afresh on their
        own, and name the tokens whose open days changed.) A round's id read a moment before a
        bound was found may be below it too: the bounds are then found again, to no harm."""
        if max_id >= self._bounds_top:
            return
        self._before.clear()
        self._after.clear()
        self._bounds_top = 0
        for token_id in [t for t, tail in self._tails.items() if tail.until is not None]:
            del self._tails[token_id]

    async def _check_cleanup(self, now: float) -> None:
        self._min_checked = now  # one look per interval, even if it fails
        # A failure leaves the last value: cached days are then served as they were last valid.
        with contextlib.suppress(StoreUnavailable):
            self.min_id, max_id = await id_range(self.reader)
            self.note_max_id(max_id)

    def _held_days(self, token_id: int, first: int, last: int) -> tuple[dict[int, Slots], list[int]]:
        held: dict[int, Slots] = {}
        missing: list[int] = []
        kept = self._days
        for day in range(first, last + 1):
            key = _day_key(token_id, day)
            encoded = kept.pop(key, None)
            entry = None if encoded is None else Day.decode(day, encoded)
            if entry is not None and not entry.valid(self.min_id):
                self.stats.cleaned += 1
                entry = None
            if entry is None or encoded is None:
                missing.append(day)
            else:
                kept[key] = encoded  # back in, as the most recently used
                held[day] = entry.slots
        return held, missing

    def _lacks(self, token_id: int, first: int, last: int, tail_from: int | None, now: float) -> bool:
        """Whether `_held_days` (and `_held_tail` from `tail_from`, if not None) would find
        something missing, told without decoding any day: a request waiting for its token's
        reads looks again at every read that lands."""
        kept, min_id = self._days, self.min_id
        for day in range(first, last + 1):
            encoded = kept.get(_day_key(token_id, day))
            if encoded is None:
                return True
            guard = Day.guard_of(encoded)
            if guard is not None and guard < min_id:
                return True
        return tail_from is not None and self._held_tail(token_id, tail_from, now) is None

    def _held_tail(self, token_id: int, open_day: int, now: float) -> Tail | None:
        tail = self._tails.get(token_id)
        if tail is None or tail.start > open_day or not self._fresh(tail, now):
            return None
        return tail

    def _stale_tail(self, token_id: int, open_day: int, now: float) -> Tail | None:
        tail = self._tails.get(token_id)
        if tail is None or tail.start > open_day or now - tail.read_at > self.stale_if_error:
            return None
        return tail

    def _fresh(self, tail: Tail, now: float) -> bool:
        if tail.until is not None:
            return now < tail.until
        return tail.generation == self._generation and now < self._confirmed_at + self.confirmed_for

    @staticmethod
    def turn_deadline() -> float:
        """Until when (loop time) a request starting now may wait for its token's reads."""
        return asyncio.get_running_loop().time() + TURN_WAIT

    def _running_read(self, token_id: int) -> asyncio.Task[_Loaded] | None:
        """The token's read still running, if any. One that has just landed may still be in the
        table until its callback runs: waiting on it would not yield to the loop, and looking
        again at once would find it again, for ever."""
        task = self._flights.get(token_id)
        return None if task is None or task.done() else task

    async def _wait_turn(self, token_id: int, task: asyncio.Task[_Loaded], turn_ends: float) -> None:
        """Wait (shielded) for another request's read of the token, until `turn_ends` (loop time)
        at the latest; raise StoreUnavailable if it failed, if the turn did not come in time, or
        at once if TURN_QUEUE requests of the token wait already (each looks again at every read
        that lands: a queue without bound would cost a pass over its days per read per waiter)."""
        waiting = self._waiting.get(token_id, 0)
        if waiting >= TURN_QUEUE:
            raise StoreUnavailable("too many requests for this token's history at once")
        self._waiting[token_id] = waiting + 1
        self.stats.coalesced += 1
        try:
            async with asyncio.timeout_at(turn_ends):
                await self._flights.wait(task)
        except TimeoutError:
            raise StoreUnavailable("earlier reads of this token's history are still running") from None
        finally:
            waiting = self._waiting.pop(token_id) - 1
            if waiting:
                self._waiting[token_id] = waiting

    async def _load(self, token_id: int, missing: list[int], tail_from: int | None, direct: bool = False) -> _Loaded:
        task = self._flights.start(token_id, self._read(token_id, missing, tail_from, direct))
        # Shielded: a client that goes away must not cancel the read others wait on.
        return await self._flights.wait(task)

    async def _read(self, token_id: int, missing: list[int], tail_from: int | None, direct: bool) -> _Loaded:
        """Read closed days (each run of consecutive ones in one statement) and the open days
        (in the same statement when they follow the last run; `direct`: never the tail the
        rounds keep in Redis, which they may have stopped keeping)."""
        days: dict[int, Day] = {}
        encoded: dict[int, bytes] = {}
        if self.redis_days is not None and missing:
            for day, value in (await self.redis_days.get_many(token_id, missing)).items():
                try:
                    entry = Day.decode(day, value)
                except ValueError:
                    continue  # foreign or damaged: read again, and overwritten
                if entry.valid(self.min_id):
                    days[day] = entry
                    encoded[day] = value
            self.stats.days_redis += len(days)
            missing = [day for day in missing if day not in days]
        tail: Tail | None = None
        if tail_from is not None and not direct:
            tail = await self._kept_tail(token_id, tail_from)
            if tail is not None:
                tail_from = None
        runs: list[list[int]] = []
        for day in [*missing, *([tail_from] if tail_from is not None else [])]:
            if runs and runs[-1][-1] == day - 1:
                runs[-1].append(day)
            else:
                runs.append([day])
        read: dict[int, Day] = {}
        for run in runs:
            open_ended = run[-1] == tail_from
            read_at = self.clock()
            by_day, guards = await self._read_run(token_id, run, open_ended)
            for day in run:
                if day == tail_from:
                    break
                read[day] = Day(by_day.get(day, {}), guards.get(day))
            if open_ended:
                assert tail_from is not None
                tail_slots: Slots = {}
                for day, day_slots in by_day.items():
                    if day >= tail_from:
                        tail_slots.update(day_slots)
                tail = Tail(tail_from, tail_slots, read_at, read_at + self.tail_ttl)
                self.stats.tails_read += 1
        days.update(read)
        written = {day: entry.encode(day) for day, entry in read.items()}
        encoded.update(written)
        self._keep(token_id, encoded, tail)
        self.stats.days_read += len(read)
        if self.redis_days is not None and written:
            # Behind the answer: nobody waits for Redis to take them.
            write = asyncio.create_task(self.redis_days.put_many(token_id, written))
            self._writes.add(write)
            write.add_done_callback(self._writes.discard)
        return _Loaded(days, tail)

    async def _read_run(
        self, token_id: int, run: list[int], open_ended: bool
    ) -> tuple[dict[int, Slots], dict[int, int]]:
        """The token's slots over consecutive days (the last one up to now if `open_ended`), by
        day, and the smallest id of each day's rows.

        A long run is read in two halves at once, on two connections: most of a cold month's time
        is the database reading and grouping its rows, and each half is read on a core of its
        own. Each half is summed as soon as it lands, while the other may still be read.
        """
        by_day: dict[int, Slots] = {}
        guards: dict[int, int] = {}

        async def read(first_day: int, end_day: int | None) -> None:
            start, end = first_day * DAY, None if end_day is None else end_day * DAY
            rows = await spending(
                self.reader,
                [token_id],
                SLOT,
                start=start,
                end=end,
                after_id=await self.id_before(start),
                before_id=None if end is None else await self._id_after(end),
            )
            guards.update(add_rows(by_day, rows))  # the halves hold different days

        end_day = None if open_ended else run[-1] + 1
        if len(run) < SPLIT_DAYS:
            await read(run[0], end_day)
        else:
            middle = run[len(run) // 2]
            await asyncio.gather(read(run[0], middle), read(middle, end_day))
        return by_day, guards

    async def _kept_tail(self, token_id: int, tail_from: int) -> Tail | None:
        """The token's tail as the leader keeps it in Redis, if its rounds reach us and it does."""
        if self.redis_tails is None or self.clock() >= self._confirmed_at + self.confirmed_for:
            return None
        generation = self._generation
        value = await self.redis_tails.get(token_id)
        if value is None:
            return None
        try:
            tail = Tail.decode(value, generation)
        except ValueError:
            return None
        # Kept by another leadership than the one whose rounds this worker hears (its rounds
        # may not have read the token since), or older than a change this worker heard of while
        # the read was under way: a direct read is the surest.
        if tail.epoch != self._epoch or tail.start > tail_from or tail.read_at < self._changed.get(token_id, -math.inf):
            return None
        self.stats.tails_redis += 1
        return tail

    async def close(self) -> None:
        """Wait (up to a Redis batch timeout) for the days still on their way to Redis."""
        if self._writes and self.redis_days is not None:
            await asyncio.wait(self._writes, timeout=self.redis_days.guard.batch_timeout)

    def _keep(self, token_id: int, days: dict[int, bytes], tail: Tail | None) -> None:
        kept = self._days
        for day, encoded in days.items():
            key = _day_key(token_id, day)
            kept.pop(key, None)
            kept[key] = encoded
        self._days = keep_newest(kept, DAYS_KEPT)
        # A tail read before a round this worker heard of changed it is not kept (hear_round).
        if tail is not None and tail.read_at >= self._changed.get(token_id, -math.inf):
            self._tails[token_id] = tail
            self._tails.move_to_end(token_id)
            while len(self._tails) > TAILS_KEPT:
                self._tails.popitem(last=False)

    async def id_before(self, at: int) -> int:
        """An id below every row stamped at or after `at` (store/spending.py), found once."""
        bound = self._before.get(at)
        if bound is None:
            bound = await id_before(self.reader, at)
            # 0 (no row that early) stays right; it would only tighten if rows stamped that long
            # before `at` were still to come, which for a moment already past they are not.
            if bound or at <= self.clock():
                self._remember(self._before, at, bound)
        return bound

    async def _id_after(self, at: int) -> int | None:
        bound = self._after.get(at)
        if bound is None:
            bound = await id_after(self.reader, at, int(self.clock()))
            if bound is not None:
                self._remember(self._after, at, bound)
        return bound

    def _remember(self, bounds: OrderedDict[int, int], at: int, bound: int) -> None:
        bounds[at] = bound
        if len(bounds) > BOUNDS_KEPT:
            bounds.popitem(last=False)
        self._bounds_top = max(self._bounds_top, bound)


def _day_key(token_id: int, day: int) -> int:
    """One int for (token id, day): days since 1970 of any date lie within ±2**39."""
    return (token_id << 40) + day


def _select(into: dict[tuple[int, str], Spend], slots: Slots, start: int, end: int) -> None:
    for key, spend in slots.items():
        if start <= key[0] < end:
            into[key] = spend
