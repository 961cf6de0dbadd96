"""GET /api/usage/token/history: the admitted token's spending per day, model, or both.

Built on the history engine's 15-minute slots (`services.history`), summed per day of the
client's calendar (`days.py`). A rendered answer is kept per (token id, query string) and served
again, like a token's record in the in-process layer, so that polling the history costs about
what polling the balance does: for USAGE_LOCAL_TTL seconds, and past that while the refresher's
rounds vouch for the token's open days it was made from (`still_true`). A round heard to have
changed the token's spending puts an end to it at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from .billing import BillingOptions, json_number
from .budget import TOO_MANY_DAYS, Spent
from .cache import AnswerCache, query_digest
from .days import FIRST_DATE, day_starts, horizon, parse_date, parse_zone, today
from .history import SLOT, History, Spend, Tail, total
from .records import INT64_MAX, INT64_MIN, TokenRecord
from .responses import JSONAnswer, JSONError, send_revalidated
from .routing import SCOPE_KEY, TooManyParameters, query_values
from .store import StoreUnavailable
from .store.spending import SpendingPast64Bits

if TYPE_CHECKING:
    from .services import Services

# The range when the client names none: the last 30 days, today included.
DEFAULT_DAYS = 30
GROUPINGS = {"day": ("day",), "model": ("model",), "day,model": ("day", "model")}
# What `unit` says for each display type the gateway knows; any other is counted like USD.
UNITS = ("USD", "CNY", "TOKENS", "CUSTOM")


class BadQuery(ValueError):
    """A query parameter this route cannot use; the message names it and is shown to the client."""


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    start: date
    end: date  # inclusive
    zone: ZoneInfo
    group_by: tuple[str, ...]  # ("day",), ("model",) or ("day", "model")

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1


def read_date(params: Mapping[str, str], name: str) -> date | None:
    raw = params.get(name)
    if raw is None:
        return None
    try:
        return parse_date(raw)
    except ValueError as exc:
        raise BadQuery(f"{name}: {exc}") from None


def parse_history_query(params: Mapping[str, str], now: float, max_days: int) -> HistoryQuery:
    """Read the route's parameters, with their defaults; raise BadQuery naming a bad one."""
    try:
        zone = parse_zone(params.get("tz", "UTC"))
    except ValueError as exc:
        raise BadQuery(f"tz: {exc}") from None
    grouping = GROUPINGS.get(params.get("group_by", "day"))
    if grouping is None:
        raise BadQuery("group_by: expected day, model or day,model")
    start, end = read_date(params, "start_date"), read_date(params, "end_date")
    if end is None:
        end = today(zone, now) if start is None else max(start, today(zone, now))
    if start is None:  # (the range a default start makes never begins before the first date either)
        start = max(FIRST_DATE, end - timedelta(days=min(DEFAULT_DAYS, max_days) - 1))
    query = HistoryQuery(start, end, zone, grouping)
    if end < start:
        raise BadQuery("end_date: before start_date")
    if query.days > max_days:
        raise BadQuery(f"start_date, end_date: at most {max_days} days at once (end_date is included)")
    return query


# Parsed queries kept per worker (a query string is a client's: there are as many as clients
# have ways of asking).
PARSED_KEPT = 1024


class ParsedQueries:
    """Queries as parsed, by a digest of the query string, for the 15-minute slot they were
    parsed in: which date is today in a zone changes only at a slot's bound (every zone's offset
    is a whole number of quarter hours, days.py). A bad query's error is kept too."""

    def __init__(self, max_days: int, size: int = PARSED_KEPT) -> None:
        self.max_days = max_days
        self.size = size
        self._parsed: dict[bytes, tuple[int, HistoryQuery | BadQuery]] = {}

    def get(self, query_string: bytes, digest: bytes, now: float) -> HistoryQuery | BadQuery:
        """The query `query_string` (whose `cache.query_digest` is `digest`) asks for at `now`."""
        slot = int(now) // SLOT
        held = self._parsed.get(digest)
        if held is not None and held[0] == slot:
            return held[1]
        query: HistoryQuery | BadQuery
        try:
            query = parse_history_query(query_values(query_string), slot * SLOT, self.max_days)
        except (BadQuery, TooManyParameters) as exc:
            # A new one, never raised: the raised one's traceback holds the parser's frames, and
            # with them the query string. Returned, not raised, by whoever asks for it.
            query = BadQuery(str(exc))
        if len(self._parsed) >= self.size:
            self._parsed.clear()
        self._parsed[digest] = (slot, query)
        return query


def figures(spend: Spend, options: BillingOptions) -> dict[str, object]:
    quota, prompt_tokens, completion_tokens, requests = spend
    if not all(INT64_MIN <= figure <= INT64_MAX for figure in spend):  # days or models summed
        raise SpendingPast64Bits("a sum of the token's spending past 64 bits")
    return {
        "quota": quota,
        "amount": json_number(options.amount(quota)),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "requests": requests,
    }


def history_data(query: HistoryQuery, sums: dict[tuple[int, str], Spend], options: BillingOptions) -> dict[str, object]:
    """The `data` of the answer, from the sums per (day index, model) over the query's days."""
    buckets: list[dict[str, object]] = []
    if query.group_by == ("day",):
        # Every day of the range, zeros included: charts and status lines want a dense series.
        per_day: list[list[Spend]] = [[] for _ in range(query.days)]
        for (day, _), spend in sums.items():
            per_day[day].append(spend)
        buckets = [
            {"date": (query.start + timedelta(days=n)).isoformat(), **figures(total(spends), options)}
            for n, spends in enumerate(per_day)
        ]
    elif query.group_by == ("model",):
        per_model: dict[str, list[Spend]] = {}
        for (_, model), spend in sums.items():
            per_model.setdefault(model, []).append(spend)
        buckets = [{"model": model, **figures(total(per_model[model]), options)} for model in sorted(per_model)]
    else:
        buckets = [
            {"date": (query.start + timedelta(days=day)).isoformat(), "model": model, **figures(spend, options)}
            for (day, model), spend in sums.items()  # in (day, model) order
        ]
    return {
        "object": "token_usage_history",
        "start_date": query.start.isoformat(),
        "end_date": query.end.isoformat(),
        "tz": query.zone.key,
        "group_by": list(query.group_by),
        "unit": options.display_type if options.display_type in UNITS else "USD",
        "buckets": buckets,
        "total": figures(total(sums.values()), options),
    }


@dataclass(frozen=True, slots=True)
class Answer:
    options: BillingOptions  # what the amounts were converted with: a change re-renders
    rendered: JSONAnswer
    # What the answer was rendered from (the query's days and a digest of the sums): an answer
    # whose next computation gives the same is served again without being rendered again.
    source: tuple[object, ...]
    # When the last round heard to have changed the token had run, as the answer was made
    # (History.changed_at): a later one makes the answer out of date, however young it is.
    changed: float
    # The token's open days the answer was made from, if the rounds kept them
    # (History.vouched_tail; weakly: the answer does not keep them alive), and what else it rests
    # on (History.basis): while both are what the history holds, it is what computing it again
    # would give.
    tail: weakref.ref[Tail] | None
    basis: tuple[int, int, int]


def source_of(query: HistoryQuery, sums: dict[tuple[int, str], Spend]) -> tuple[object, ...]:
    # A digest, not the sums: kept for every answer, a long range's sums by day and model held
    # many times the answer's own bytes (and pinned sums the day caches had let go).
    items = list(sums.items())
    try:
        text = orjson.dumps(items)
    except orjson.JSONEncodeError:  # a sum past 64 bits (which the answer then refuses)
        text = repr(items).encode()
    return (query.start, query.end, hashlib.blake2b(text, digest_size=16).digest())


def render(
    data: dict[str, object],
    options: BillingOptions,
    source: tuple[object, ...],
    changed: float,
    tail: weakref.ref[Tail] | None,
    basis: tuple[int, int, int],
) -> Answer:
    rendered = JSONAnswer.of({"success": True, "message": "", "data": data})
    return Answer(options, rendered, source, changed, tail, basis)


class HistoryEndpoint:
    """GET /api/usage/token/history for the token the auth middleware admitted."""

    def __init__(
        self,
        services: Services,
        *,
        unavailable: ASGIApp,
        max_days: int,
        answers: AnswerCache[bytes, Answer],
    ) -> None:
        self.services = services
        self.unavailable = unavailable
        self.answers = answers
        self.queries = ParsedQueries(max_days)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record: TokenRecord = scope[SCOPE_KEY]
        # Keyed by the query as sent, so that a hit parses nothing. A default range rendered just
        # before a midnight may be answered up to USAGE_LOCAL_TTL after it, as stale as any answer.
        query_string: bytes = scope["query_string"]
        digest = query_digest(query_string)
        key = b"%d?%s" % (record.id, digest)
        answer = self.kept(key, record.id)
        if answer is None:
            made = await self.make(key, record.id, query_string, digest)
            if not isinstance(made, Answer):  # the error to answer instead
                await made(scope, receive, send)
                return
            answer = made
        await send_revalidated(scope, send, answer.rendered)

    def kept(self, key: bytes, token_id: int) -> Answer | None:
        """The answer kept for `key`, if it may be served as it is: for USAGE_LOCAL_TTL after it
        was made or last served again, unless a round was heard to have changed the token since;
        past that, while it is `still_true` (as the balance's record is kept past it while the
        rounds confirm it), at no cost but that check."""
        history = self.services.history
        options = self.services.options.current
        changed = history.changed_at(token_id)
        clock = time.monotonic()
        answer = self.answers.fresh(key, clock)
        if answer is not None and answer.options is options and answer.changed == changed:
            return answer
        answer = self.answers.peek(key)
        if answer is None or not still_true(answer, history, token_id, options, changed):
            return None
        history.note_polled(token_id)  # as `slots` does: the rounds go on keeping the token
        self.answers.put(key, answer, len(answer.rendered.body) + len(key), clock)
        return answer

    async def make(self, key: bytes, token_id: int, query_string: bytes, digest: bytes) -> Answer | ASGIApp:
        """Compute the answer and keep it; or the error to answer: 400 for a bad query, 503 when
        the log cannot be read and no answer made lately stands in (stale-if-error)."""
        history = self.services.history
        options = self.services.options.current
        changed = history.changed_at(token_id)
        basis = history.basis()  # before the reads: anything that moves meanwhile shows
        now = history.clock()  # which day "today" is, in the client's zone
        query = self.queries.get(query_string, digest, now)
        if isinstance(query, BadQuery):
            return JSONError(400, str(query))
        clock = time.monotonic()
        try:
            sums = await self.services.day_sums.sums(token_id, day_starts_of(query), horizon(now))
        except StoreUnavailable:
            return self.answers.stale(key, clock) or self.unavailable
        except Spent as spent:
            return JSONError(429, TOO_MANY_DAYS, [spent.header])
        # The open days the sums were made from, if the rounds keep them (nothing was awaited
        # since they were taken).
        vouched = history.vouched_tail(token_id)
        tail = None if vouched is None else weakref.ref(vouched)
        # Polled once a second, a history mostly comes out as it was: rendering 30 days costs
        # far more than seeing that nothing changed.
        source = source_of(query, sums)
        last = self.answers.peek(key)
        if last is None or last.options is not options or last.source != source:
            try:
                data = history_data(query, sums, options)
            except SpendingPast64Bits:
                return self.unavailable
            answer = render(data, options, source, changed, tail, basis)
        else:
            answer = dataclasses.replace(last, changed=changed, tail=tail, basis=basis)
        self.answers.put(key, answer, len(answer.rendered.body) + len(key), clock)
        return answer


def still_true(answer: Answer, history: History, token_id: int, options: BillingOptions, changed: float) -> bool:
    """Whether computing the answer again now would give the same: made from the open days the
    rounds still vouch for (the same object: a round that changed them, a lapse of the rounds'
    word, a lost channel each end it), on the same basis, with the same options, and no round
    heard to have changed the token since."""
    tail = history.vouched_tail(token_id)
    return (
        tail is not None
        and answer.tail is not None
        and answer.tail() is tail
        and answer.basis == history.basis()
        and answer.options is options
        and answer.changed == changed
    )


def day_starts_of(query: HistoryQuery) -> tuple[int, ...]:
    return day_starts(query.start, query.days, query.zone)
