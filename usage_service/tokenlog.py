"""GET /api/log/token: the token's newest rows of the gateway's request log, as the gateway shows
them to the token's owner.

The gateway's contract: `{"success":true,"message":"","data":[row, ...]}`, the token's rows id
descending, at most 1,000; with `p` or `page_size` (newer gateways) `data` is a page,
`{"items":[...],"total":N,"page":p,"page_size":n}`. Each row has its id replaced by its
position, no channel, and `other` without its administrators' members.

Every read is one index range: `token_id = ? ORDER BY id DESC LIMIT n` walks the gateway's
idx_logs_token_id backwards (the index carries the row id on SQLite and InnoDB; PostgreSQL's
does not, and its planner either sorts the token's rows or walks the primary key backwards
keeping the token's, unless the log has an index on (token_id, id)). Polling costs
no statement per request: an answer is kept per token and parameters for ANSWER_TTL seconds,
the balance's freshness bound, concurrent identical misses share one read, and one token's
reads run one at a time (a key cannot take every connection with different parameters).
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from ._flights import Flights
from .budget import Spent, TokenBudget
from .cache import AnswerCache
from .records import INT64_MAX, INT64_MIN, TokenRecord, as_bool, as_int
from .responses import JSON_TYPE, NO_CACHE, JSONError, compact_json, error_body, send_body
from .routing import SCOPE_KEY, TooManyParameters, query_values
from .store import StoreUnavailable
from .store.logs import LogReader

LIMIT = 1000  # rows of the plain list: the gateway's MaxRecentItems
PAGE_SIZE = 10  # page_size when none (or 0) is given: the gateway's ItemsPerPage
MAX_PAGE_SIZE = 100  # a larger page_size is served as this, as the gateway does
# Paging counts, and reaches, the newest TOTAL_CAP matching rows: neither the count nor a deep
# OFFSET ever walks more of the index than this. Older rows are reached with end_timestamp.
TOTAL_CAP = 10_000

ANSWER_TTL = 1.0  # seconds an answer is served again: the balance's freshness bound
ANSWER_ENTRIES = 4096  # answers kept per worker...
ANSWER_BYTES = 32 * 2**20  # ...and their bytes (a full list is a few hundred KiB)

# What the owner of a token is never shown of `other`: every member a new-api version removes
# before showing a log to its owner (the administrators' and the root's diagnostics, and the
# channel and its refusal, which older versions kept at the top level), whichever version
# wrote the row.
HIDDEN_OTHER = (
    "admin_info",
    "audit_info",
    "root_info",
    "channel_id",
    "channel_name",
    "channel_type",
    "reject_reason",
    "stream_status",
)

# The columns read, in this order (those the table lacks read as NULL, shown as the gateway's zero
# values); the row's id, channel and channel_name are not shown.
COLUMNS = (
    "user_id",
    "created_at",
    "type",
    "content",
    "username",
    "token_name",
    "model_name",
    "quota",
    "prompt_tokens",
    "completion_tokens",
    "use_time",
    "is_stream",
    "group",
    "ip",
    "other",
)

_WHOLE = re.compile(r"[0-9]{1,19}")


class BadParameter(ValueError):
    """A query parameter that is no value the route takes; the message never repeats the value."""


@dataclass(frozen=True, slots=True)
class LogQuery:
    """What a request asks of the log, parsed; hashable, it keys the answers kept."""

    page: int | None = None  # None: the plain list of the newest LIMIT rows
    page_size: int = PAGE_SIZE
    start: int = 0  # created_at >= start, when not 0 (Unix seconds)
    end: int = 0  # created_at <= end, when not 0
    type: int = 0  # 0: every type
    model_name: str = ""  # "": every model; else exactly this name

    @property
    def offset(self) -> int:
        return 0 if self.page is None else (self.page - 1) * self.page_size

    @property
    def limit(self) -> int:
        """Rows to read: a page (never past TOTAL_CAP), or the plain list's LIMIT."""
        return LIMIT if self.page is None else max(0, min(self.page_size, TOTAL_CAP - self.offset))


def parse_query(query_string: bytes) -> LogQuery:
    """Read the route's parameters (the first of each; others, `key` among them, are ignored).

    As the gateway: an empty value is an absent one, `p` 0 is page 1, `page_size` 0 is 10 and
    more than 100 is 100. Unlike it, text that is no whole number, or a negative one, is a 400
    rather than silently the default.
    """
    try:
        values = query_values(query_string)
    except TooManyParameters as exc:
        raise BadParameter(str(exc)) from None
    paged = "p" in values or "page_size" in values
    page = _whole(values, "p")
    size = _whole(values, "page_size")
    model = values.get("model_name", "")
    if len(model) > 255:
        raise BadParameter("model_name: at most 255 characters")
    if "\x00" in model:  # no stored name holds one, and PostgreSQL refuses the text
        raise BadParameter("model_name: no NUL characters")
    return LogQuery(
        page=max(page, 1) if paged else None,
        page_size=min(size, MAX_PAGE_SIZE) if size else PAGE_SIZE,
        start=_whole(values, "start_timestamp"),
        end=_whole(values, "end_timestamp"),
        type=_whole(values, "type"),
        model_name=model,
    )


def _whole(values: dict[str, str], name: str) -> int:
    text = values.get(name, "").strip()
    if not text:
        return 0
    if not _WHOLE.fullmatch(text) or int(text) > INT64_MAX:
        raise BadParameter(f"{name}: expected a whole number, 0 or more")
    return int(text)


def select_sql(
    reader: LogReader, columns: frozenset[str], token_id: int, query: LogQuery
) -> tuple[str, list[Any], str]:
    """The page's SELECT and the COUNT of the newest TOTAL_CAP matching rows, with their
    parameters, for a log table of these `columns`."""
    q = reader.q
    # SQLite plans without statistics: a unary + keeps the filters off the log's other indexes
    # (created_at, model_name), so that the token's index range, walked backwards, stays the plan.
    plus = "+" if reader.engine == "sqlite" else ""
    where = [f"{q('token_id')} = ?"]
    params: list[Any] = [token_id]
    if query.start:
        where.append(f"{plus}{q('created_at')} >= ?")
        params.append(query.start)
    if query.end:
        where.append(f"{plus}{q('created_at')} <= ?")
        params.append(query.end)
    if query.type:
        where.append(f"{plus}{q('type')} = ?")
        params.append(query.type)
    if query.model_name:
        # Exact: the gateway's LIKE with its wildcards escaped means the same, without LIKE's
        # case folding (SQLite, MySQL) that PostgreSQL does not do.
        where.append(f"{plus}{q('model_name')} = ?")
        params.append(query.model_name)
    condition = " AND ".join(where)
    # (Never a quoted name the table lacks: SQLite reads that as a string, the name itself.)
    shown = ", ".join(q(c) if c in columns else "NULL" for c in COLUMNS)
    select = f"SELECT {shown} FROM {q('logs')} WHERE {condition} ORDER BY {q('id')} DESC LIMIT ? OFFSET ?"
    count = f"SELECT COUNT(*) FROM (SELECT 1 FROM {q('logs')} WHERE {condition} LIMIT ?) AS matching"
    return select, params, count


async def read_answer(reader: LogReader, token_id: int, query: LogQuery) -> bytes:
    """Read the rows (and, paged, the count) and render the whole answer."""
    select, params, count = select_sql(reader, await reader.columns(), token_id, query)
    rows: Sequence[Sequence[Any]] = ()
    if query.limit:
        rows = await reader.query(select, [*params, query.limit, query.offset])
    items = [owner_row(row, token_id, query.offset + i + 1) for i, row in enumerate(rows)]
    if query.page is None:
        return compact_json({"success": True, "message": "", "data": items})
    ((total,),) = await reader.query(count, [*params, TOTAL_CAP])
    data = {"items": items, "total": as_int(total), "page": query.page, "page_size": query.page_size}
    return compact_json({"success": True, "message": "", "data": data})


def owner_row(row: Sequence[Any], token_id: int, position: int) -> dict[str, object]:
    """A row as the gateway shows it to the token's owner; odd values read as the gateway's zero values."""
    user_id, created_at, type_, content, username, token_name, model_name = row[:7]
    quota, prompt_tokens, completion_tokens, use_time, is_stream, group, ip, other = row[7:]
    # Up to 1,000 rows an answer: the types the engines nearly always give are taken as they
    # come, the careful readers only for odd values.
    return {
        "id": position,
        "user_id": user_id if type(user_id) is int else _number(user_id),
        "created_at": created_at if type(created_at) is int else _number(created_at),
        "type": type_ if type(type_) is int else _number(type_),
        "content": content if type(content) is str else _text(content),
        "username": username if type(username) is str else _text(username),
        "token_name": token_name if type(token_name) is str else _text(token_name),
        "model_name": model_name if type(model_name) is str else _text(model_name),
        "quota": quota if type(quota) is int else _number(quota),
        "prompt_tokens": prompt_tokens if type(prompt_tokens) is int else _number(prompt_tokens),
        "completion_tokens": completion_tokens if type(completion_tokens) is int else _number(completion_tokens),
        "use_time": use_time if type(use_time) is int else _number(use_time),
        "is_stream": as_bool(is_stream),
        "channel": 0,  # which upstream channel served the request is never shown to an owner
        "channel_name": "",
        "token_id": token_id,
        "group": group if type(group) is str else _text(group),
        "ip": ip if type(ip) is str else _text(ip),
        "other": owner_other(other if type(other) is str else _text(other)),
    }


def _number(value: object) -> int:
    """An odd value in a number column as the gateway's JSON would show it: what as_int reads
    (junk as 0), and 0 past 64 bits (text of too many digits: no JSON number of ours holds it)."""
    number = as_int(value)
    return number if INT64_MIN <= number <= INT64_MAX else 0


# Escapes in JSON text, left to right: a surrogate pair, a surrogate alone, or any other (an
# escaped backslash taken whole, so that the text after it is not read as an escape).
_LONE_SURROGATE = re.compile(
    r"\\(?:u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|(?P<alone>u[dD][89a-fA-F][0-9a-fA-F]{2})|.)",
    re.S,
)


def _unpaired_replaced(escape: re.Match[str]) -> str:
    return "\\ufffd" if escape.group("alone") else escape.group(0)


def owner_other(text: str) -> str:
    """`other` without its administrators' members, re-serialised as the gateway does (keys sorted).

    The gateway decodes it into a Go map and encodes the map again: text that is not a JSON
    object (empty, an array, junk, a number beyond float64) decodes to a nil map, which encodes
    as `null`; so does JSON `null`. The same here.
    """
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        try:  # Go reads an escaped surrogate that has no pair as U+FFFD, where orjson refuses it
            value = orjson.loads(_LONE_SURROGATE.sub(_unpaired_replaced, text))
        except orjson.JSONDecodeError:
            return "null"
    if not isinstance(value, dict):
        return "null"
    for member in HIDDEN_OTHER:
        value.pop(member, None)
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except orjson.JSONEncodeError:
        # Nested deeper than orjson writes (254 levels; it reads 1,024): shown as what cannot
        # be read is, rather than failing every answer that holds the row.
        return "null"


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode(errors="replace")  # as the gateway's JSON shows bytes that are not UTF-8
    return str(value)


Key = tuple[int, LogQuery]  # the token's id, never its key


class Answers:
    """Rendered answers by token id and parameters, each served for at most `ttl` seconds after
    the read that made it began; concurrent misses for the same key share that one read.

    One token's reads run one at a time: a key asking for many different pages or filters at
    once queues them rather than taking every connection to the gateway's database.

    Kept in an `AnswerCache` (bounded by entries and by bytes, the least recently used going
    first). A read that fails is not kept: each waiter gets the error, and the next
    request reads again.
    """

    def __init__(
        self,
        ttl: float = ANSWER_TTL,
        *,
        max_entries: int = ANSWER_ENTRIES,
        max_bytes: int = ANSWER_BYTES,
        budget: TokenBudget | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        # Reads of each token's log (each distinct parameter set not answered within `ttl` is
        # a read of up to 1,000 rows: one key asking for a new one each time had a worker read
        # about 85 a second for it); None: not counted.
        self.budget = budget
        # Fresh for `ttl` from when its read began; never served stale.
        self.kept: AnswerCache[Key, bytes] = AnswerCache(max_entries, max_bytes, ttl, stale_if_error=0.0)
        self._flights: Flights[Key, bytes] = Flights((StoreUnavailable,), "a read of a token's log")
        # Per token with a read running or waiting: its lock and how many reads hold or await it.
        self._turns: dict[int, tuple[asyncio.Lock, list[int]]] = {}
        self.coalesced = 0
        self.reads = 0

    async def get(self, key: Key, read: Callable[[], Awaitable[bytes]]) -> bytes:
        now = self._clock()
        body = self.kept.fresh(key, now)
        if body is not None:
            return body
        flight = self._flights.get(key)
        if flight is None:
            if self.budget is not None:
                self.budget.spend(key[0])  # raises Spent
            self.reads += 1
            flight = self._flights.start(key, self._in_turn(key[0], read))
            flight.add_done_callback(functools.partial(self._landed, key, now))
        else:
            self.coalesced += 1
        return await self._flights.wait(flight)

    async def _in_turn(self, token_id: int, read: Callable[[], Awaitable[bytes]]) -> bytes:
        """Run `read` once no other read of this token's log is running."""
        turn = self._turns.get(token_id)
        if turn is None:
            turn = self._turns[token_id] = (asyncio.Lock(), [0])
        lock, users = turn
        users[0] += 1
        try:
            async with lock:
                return await read()
        finally:
            users[0] -= 1
            if not users[0]:
                del self._turns[token_id]

    def _landed(self, key: Key, started: float, flight: asyncio.Future[bytes]) -> None:
        if not flight.cancelled() and flight.exception() is None:
            body = flight.result()
            self.kept.put(key, body, len(body), started)


class TokenLogEndpoint:
    """GET /api/log/token for the token the auth middleware admitted (header or `?key=`)."""

    def __init__(self, reader: Callable[[], LogReader], unavailable: ASGIApp, answers: Answers | None = None) -> None:
        self.reader = reader  # the lifespan opens it: looked up per request
        self.unavailable = unavailable
        self.answers = answers or Answers()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record: TokenRecord = scope[SCOPE_KEY]
        try:
            query = parse_query(scope.get("query_string", b""))
        except BadParameter as exc:
            body = error_body(str(exc))
            await send_body(scope, send, 400, [JSON_TYPE, NO_CACHE, _length(body)], body)
            return
        reader = self.reader()
        try:
            # Always this token's rows: the id the middleware resolved, never a parameter.
            body = await self.answers.get((record.id, query), lambda: read_answer(reader, record.id, query))
        except StoreUnavailable:
            await self.unavailable(scope, receive, send)
            return
        except Spent as spent:
            await JSONError(429, TOO_MANY_READS, [spent.header])(scope, receive, send)
            return
        await send_body(scope, send, 200, [JSON_TYPE, NO_CACHE, _length(body)], body)


TOO_MANY_READS = "too many reads of this token's log, retry later"


def _length(body: bytes) -> tuple[bytes, bytes]:
    return (b"content-length", str(len(body)).encode())
