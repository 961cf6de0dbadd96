"""Calendar days in a time zone as ranges of history slots, and spending summed per day and model.

The history engine answers per 15-minute slot (`history.SLOT`); the routes answer per day of a
client's calendar. A day is [its local midnight, the next day's local midnight), so DST days are
23 or 25 hours long, and a slot belongs to the day its start falls in. Every zone's UTC offset has
been a whole number of quarter hours since 1980 (Pacific/Kiritimati was UTC−10:40 until 1979,
Africa/Monrovia UTC−0:44:30 until 1972): since then a slot never straddles a local midnight, so
the sums per day are exact. Before that, in those two zones, a straddling slot counts for the day
it starts in.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .budget import TokenBudget
from .history import SLOT, History, Spend, add_to, plus

# Dates a range may name: the log has no row before 1970, and the day after the last one must
# still be a date.
FIRST_DATE, LAST_DATE = date(1970, 1, 1), date(9999, 12, 30)

# YYYY-MM-DD; month and day may also come unpadded, as key checkers build them in JavaScript
# (`getMonth() + 1`): 2026-3-5.
_DATE = re.compile(r"([0-9]{4})-([0-9]{1,2})-([0-9]{1,2})")

# Longer names are no IANA zone (the longest is 32 characters): refused before any lookup.
_ZONE_NAME_MAX = 64


def parse_date(text: str) -> date:
    """Read YYYY-MM-DD (or YYYY-M-D); raise ValueError saying what was expected."""
    match = _DATE.fullmatch(text)
    try:
        if match is None:
            raise ValueError
        day = date(*map(int, match.groups()))
    except ValueError:
        raise ValueError("expected a date as YYYY-MM-DD") from None
    if not FIRST_DATE <= day <= LAST_DATE:
        raise ValueError(f"expected a date between {FIRST_DATE} and {LAST_DATE}")
    return day


def parse_zone(name: str) -> ZoneInfo:
    """The IANA time zone of this name (e.g. Europe/Berlin, UTC); raise ValueError if there is none."""
    if not name or len(name) > _ZONE_NAME_MAX:
        raise ValueError("expected an IANA time zone name such as Europe/Berlin")
    try:
        # zoneinfo keeps the zones it loaded: a polled name is looked up once per process.
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # not found, not a key (`../x`), unreadable
        raise ValueError("expected an IANA time zone name such as Europe/Berlin") from None


def today(zone: ZoneInfo, now: float) -> date:
    """The date in `zone` at Unix time `now`."""
    return datetime.fromtimestamp(now, zone).date()


@lru_cache(maxsize=1024)
def day_starts(first: date, days: int, zone: ZoneInfo) -> tuple[int, ...]:
    """Unix seconds of the local midnights of `first` and the `days` days after it (days + 1 bounds).

    A midnight that a DST change skips (some zones change at 00:00) is read with the offset
    before the change (PEP 495, fold=0): that is the instant the day begins. Kept: polled
    ranges are few and asked for again and again.
    """
    return tuple(int(datetime.combine(first + timedelta(n), time(), zone).timestamp()) for n in range(days + 1))


def slot_bounds(starts: Sequence[int]) -> tuple[int, int]:
    """The whole slots covering [starts[0], starts[-1]), as the history engine takes them."""
    return starts[0] - starts[0] % SLOT, starts[-1] + (-starts[-1]) % SLOT


def horizon(now: float) -> int:
    """The end of the slot after the current one: later slots hold nothing yet (one slot of
    slack for a gateway whose clock runs a little ahead of ours)."""
    return (int(now) // SLOT + 2) * SLOT


def by_day_and_model(slots: Mapping[tuple[int, str], Spend], starts: Sequence[int]) -> dict[tuple[int, str], Spend]:
    """Sum slots per (day index, model); `starts` are the days' bounds from `day_starts`.

    Slots outside [starts[0], starts[-1]) are left out. Only (day, model) pairs with at least one
    slot appear; their order is (day, model).
    """
    first, end = starts[0], starts[-1]
    sums: dict[tuple[int, str], Spend] = {}
    for (slot, model), spend in slots.items():
        if first <= slot < end:
            add_to(sums, (bisect_right(starts, slot) - 1, model), spend)
    return dict(sorted(sums.items()))


# What DaySums keeps per worker, in sums: 10,000 tokens' 30 days of a few models. A sum held
# costs about 300 bytes (its day and model, four numbers, its place in a dict), a kept range
# about one more, and each day start of the range that keys it about a seventh of one (a range
# of 100 days keys its sums with 100 numbers): about 300 MiB at most.
SUMS_KEPT = 1_000_000
STARTS_PER_SUM = 7


class DaySums:
    """Spending per (day, model) over a range of days, the part already closed kept.

    Closed days never change (see history.py), so the sums over the part of a range before the
    history's first open day are kept per token and range of days, and a poll asks the history
    only for the open part: polling a month costs what the open day costs, not thirty days'
    lookups. Kept sums are started afresh once a day closes (the boundary moves) or the
    gateway's clean-up moves the log's smallest id; bounded by the number of sums kept.
    """

    def __init__(self, history: History, max_sums: int = SUMS_KEPT, *, budget: TokenBudget | None = None) -> None:
        self.history = history
        self.max_sums = max_sums
        # Days summed per token for ranges whose closed part is not kept (the costly part: every
        # slot of every day; for a busy token's 100 days, tens of thousands); None: not counted.
        self.budget = budget
        self.kept_sums = 0
        self._kept: OrderedDict[tuple[int, int, int, tuple[int, ...]], dict[tuple[int, str], Spend]] = OrderedDict()

    async def sums(self, token_id: int, starts: tuple[int, ...], end: int) -> dict[tuple[int, str], Spend]:
        """Sums per (day index, model), as `by_day_and_model`, of the token's slots in the days
        `starts` bounds (from `day_starts`), up to `end` (a slot bound). Raises StoreUnavailable."""
        start, last = slot_bounds(starts)
        end = min(end, last)
        if end <= start:
            return {}
        boundary = self.history.open_from()
        turn_ends = self.history.turn_deadline()  # one for both parts: the request's wait is bounded once
        closed: dict[tuple[int, str], Spend] = {}
        if start < boundary:
            min_id = await self.history.current_min_id()  # moved: the clean-up may have taken kept days
            kept = self._kept.get((token_id, boundary, min_id, starts))
            if kept is None:
                if self.budget is not None:
                    self.budget.spend(token_id, len(starts) - 1)  # raises Spent
                slots = await self.history.slots(token_id, start, min(boundary, end), turn_ends=turn_ends)
                kept = by_day_and_model(slots, starts)
                # Kept only if the clean-up did not move meanwhile: days the history held were
                # checked against the smallest id before the read, and may hold rows it took.
                if self.history.min_id == min_id:
                    self._keep((token_id, boundary, min_id, starts), kept)
            else:
                self._kept.move_to_end((token_id, boundary, min_id, starts))
            closed = kept
        if end <= boundary:
            return closed
        open_slots = await self.history.slots(token_id, max(start, boundary), end, turn_ends=turn_ends)
        open_sums = by_day_and_model(open_slots, starts)
        if not closed:
            return open_sums
        if not open_sums:
            return closed
        merged = dict(closed)  # the kept sums are shared: never changed
        # Both are in (day, model) order, and the open part's days are the closed part's last
        # day (the boundary's, when it is no local midnight) and later: merged in order.
        last_closed = next(reversed(closed))
        in_order = True
        for day_model, spend in open_sums.items():
            held = merged.get(day_model)
            if held is None:
                merged[day_model] = spend
                in_order = in_order and day_model > last_closed
            else:
                merged[day_model] = plus(held, spend)
        return merged if in_order else dict(sorted(merged.items()))

    def _keep(self, key: tuple[int, int, int, tuple[int, ...]], sums: dict[tuple[int, str], Spend]) -> None:
        self._kept[key] = sums
        self.kept_sums += _cost(key, sums)
        while self.kept_sums > self.max_sums and self._kept:
            self.kept_sums -= _cost(*self._kept.popitem(last=False))


def _cost(key: tuple[int, int, int, tuple[int, ...]], sums: dict[tuple[int, str], Spend]) -> int:
    """What a kept range costs, in sums (see SUMS_KEPT): a client may name many ranges with
    nothing in them, each keyed by its days' starts."""
    return len(sums) + 1 + len(key[3]) // STARTS_PER_SUM
