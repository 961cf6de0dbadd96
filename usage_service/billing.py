"""The OpenAI-style billing routes new-api serves, answered from the same records as the usage route.

NextChat, chatgpt-web and key checkers poll `/dashboard/billing/subscription` and
`/dashboard/billing/usage` (with or without `/v1`). The amounts follow the gateway's own
settings, read from its `options` table every USAGE_OPTIONS_INTERVAL seconds. With
`start_date` and `end_date`, the usage answer adds OpenAI's `daily_costs`, from the history
engine (the only answer here that reads the log).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from starlette.types import ASGIApp, Receive, Scope, Send

from .budget import TOO_MANY_DAYS, Spent
from .cache import AnswerCache, query_digest
from .config import BillingTotal
from .days import day_starts, horizon, parse_date
from .records import TokenRecord, go_int_sum
from .responses import JSON_TYPE, NO_CACHE, Headers, OpenAIError, compact_json, send_body
from .routing import SCOPE_KEY, TooManyParameters, query_values
from .store import StoreUnavailable, TokenStore

if TYPE_CHECKING:  # services.py holds a GatewayOptions: a run-time import would be circular
    from .services import Services

logger = logging.getLogger("usage_service.billing")

UTC = ZoneInfo("UTC")  # OpenAI's days

# What the gateway reports as the limit of an unlimited token; clients read it as "no limit".
UNLIMITED_AMOUNT = 100_000_000

# The option rows the billing answers depend on (names as the gateway stores them).
TOKEN_STAT = "DisplayTokenStatEnabled"
QUOTA_PER_UNIT = "QuotaPerUnit"
EXCHANGE_RATE = "USDExchangeRate"
DISPLAY_TYPE = "general_setting.quota_display_type"
LEGACY_CURRENCY = "DisplayInCurrencyEnabled"
OPTION_KEYS = (TOKEN_STAT, QUOTA_PER_UNIT, EXCHANGE_RATE, DISPLAY_TYPE, LEGACY_CURRENCY)


@dataclass(frozen=True)
class BillingOptions:
    """The gateway settings the billing answers follow; defaults are the gateway's."""

    token_stat: bool = True  # report the token's quota (True) or its owner's (False)
    display_type: str = "USD"  # USD, CNY, TOKENS or CUSTOM; anything else counts like USD
    quota_per_unit: float = 500_000.0  # quota per US dollar
    usd_exchange_rate: float = 7.3  # yuan per US dollar

    @classmethod
    def from_rows(cls, rows: Mapping[str, str]) -> BillingOptions:
        """Read the options as the gateway does; a missing row keeps its default, a junk number too."""
        default = cls()
        token_stat = rows[TOKEN_STAT] == "true" if TOKEN_STAT in rows else default.token_stat
        # Compared as stored, as the gateway does (" CNY" is no type it knows); a blank one is unset.
        display_type = rows.get(DISPLAY_TYPE, "")
        if not display_type.strip():
            # Gateways older than quota_display_type only had this switch: off meant raw quota, and
            # the gateway reads every value but "true" as off (as DisplayTokenStatEnabled above).
            legacy_off = LEGACY_CURRENCY in rows and rows[LEGACY_CURRENCY] != "true"
            display_type = "TOKENS" if legacy_off else default.display_type
        return cls(
            token_stat=token_stat,
            display_type=display_type,
            quota_per_unit=_positive(rows.get(QUOTA_PER_UNIT), default.quota_per_unit),
            usd_exchange_rate=_positive(rows.get(EXCHANGE_RATE), default.usd_exchange_rate),
        )

    def amount(self, quota: int) -> float:
        """Convert quota to the display unit, with the gateway's float64 arithmetic, in its order."""
        if self.display_type == "TOKENS":
            return float(quota)
        value = float(quota) / self.quota_per_unit
        if self.display_type == "CNY":
            value *= self.usd_exchange_rate
        return value


# The numbers Go's strconv.ParseFloat takes (the gateway's reader of these options), finite ones:
# decimal, or hexadecimal with its binary exponent. Python's float() also takes surrounding
# spaces and underscores between digits, which the gateway reads as junk.
_GO_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_GO_HEX = re.compile(r"[+-]?0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)[pP][+-]?[0-9]+")


def _positive(raw: str | None, default: float) -> float:
    if raw is None:
        return default
    if _GO_DECIMAL.fullmatch(raw):
        value = float(raw)
    elif _GO_HEX.fullmatch(raw):
        try:
            value = float.fromhex(raw)
        except OverflowError:  # past float64 (Go's infinity): no positive number either
            return default
    else:
        return default
    # The gateway would divide by zero or by junk here; the default is the only sensible reading.
    return value if math.isfinite(value) and value > 0 else default


def json_number(value: float) -> int | float:
    """Render a float as Go's encoding/json does: whole numbers without a fraction.

    Only those orjson writes as integers (-2**63 to 2**64 - 1): a larger one (a used quota of
    2**58 in hundredths of TOKENS, any large quota over a QuotaPerUnit below 1) stays a float, the
    same number to every JSON reader; as an int it failed to render, and the answer was a 500."""
    return int(value) if value.is_integer() and -(2**63) <= value < 2**64 else value


def subscription_data(record: TokenRecord, options: BillingOptions) -> dict[str, object]:
    """The body of GET /dashboard/billing/subscription, as the gateway computes it."""
    if options.token_stat:
        quota, access_until = go_int_sum(record.remain_quota, record.used_quota), max(record.expired_time, 0)
    else:
        quota, access_until = go_int_sum(record.user_quota, record.user_used_quota), 0
    limit: int | float = json_number(options.amount(quota))
    if options.token_stat and record.unlimited_quota:
        limit = UNLIMITED_AMOUNT
    return {
        "object": "billing_subscription",
        "has_payment_method": True,
        "soft_limit_usd": limit,
        "hard_limit_usd": limit,
        "system_hard_limit_usd": limit,
        "access_until": access_until,
    }


def lifetime_usage(record: TokenRecord, options: BillingOptions) -> int | float:
    """Lifetime use in hundredths of the display unit, the token's or its owner's as the gateway shows it."""
    used = record.used_quota if options.token_stat else record.user_used_quota
    return json_number(options.amount(used) * 100)


def usage_data(record: TokenRecord, options: BillingOptions) -> dict[str, object]:
    """The body of GET /dashboard/billing/usage without a date range."""
    return {"object": "list", "total_usage": lifetime_usage(record, options)}


class GatewayOptions:
    """The gateway's current billing options, re-read every `interval` seconds (0: at start only).

    Readers take `current`, an immutable object replaced as a whole; while the database cannot
    answer, the last options read stay in force.
    """

    def __init__(self, store: TokenStore, interval: float) -> None:
        self.store = store
        self.interval = interval
        self.current = BillingOptions()
        self.reads = 0
        self._failing = False

    async def refresh(self) -> BillingOptions:
        """Read the options now; keep the last known ones if the database does not answer."""
        try:
            rows = await self.store.fetch_options(OPTION_KEYS)
        except StoreUnavailable as exc:
            if not self._failing:
                self._failing = True
                logger.warning("cannot read the gateway's options (%s); keeping the last known ones", exc)
            return self.current
        self._failing = False
        self.reads += 1
        options = BillingOptions.from_rows(rows)
        if options != self.current:
            if self.reads > 1:
                logger.info("gateway billing options changed: %s", options)
            self.current = options  # a new object: answers rendered for the old one are redone
        return self.current

    async def run(self) -> None:
        """Refresh every interval until cancelled (the lifespan restarts it after an unexpected error)."""
        if self.interval <= 0:
            return
        while True:
            await asyncio.sleep(self.interval)
            await self.refresh()


# --- the endpoints ---------------------------------------------------------------------------


def _answer(data: dict[str, object]) -> tuple[Headers, bytes]:
    body = compact_json(data)  # kept with the record
    return [JSON_TYPE, NO_CACHE, (b"content-length", str(len(body)).encode())], body


class BillingEndpoint:
    """GET /dashboard/billing/subscription or /usage for the token the auth middleware admitted."""

    def __init__(
        self, name: str, render: Callable[[TokenRecord, BillingOptions], dict[str, object]], services: Services
    ) -> None:
        self.name = name  # the answer's name in the record's memo
        self.render = render
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record: TokenRecord = scope[SCOPE_KEY]
        options = self.services.options.current
        # Rendered once per (record, options): a polled record is answered many times unchanged.
        memo = record.rendered
        entry = memo.get(self.name)
        if entry is None or entry[0] is not options:
            entry = (options, _answer(self.render(record, options)))
            memo[self.name] = entry
        headers, body = entry[1]
        # A fresh list: the server or a middleware may add to the headers it is given.
        await send_body(scope, send, 200, [*headers], body)


# --- /dashboard/billing/usage with a date range ----------------------------------------------


def billing_range(params: Mapping[str, str], max_days: int) -> tuple[date, date]:
    """OpenAI's range: start_date included, end_date excluded, in UTC; raise ValueError naming the bad one."""
    start_raw, end_raw = params.get("start_date") or None, params.get("end_date") or None
    if start_raw is None or end_raw is None:
        raise ValueError("start_date, end_date: give both (or neither, for the lifetime total alone)")
    dates = []
    for name, raw in (("start_date", start_raw), ("end_date", end_raw)):
        try:
            dates.append(parse_date(raw))
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    start, end = dates
    if end < start:
        raise ValueError("end_date: before start_date")
    # One day of slack over the history route: neko-api-key-tool asks from now - 100 x 24 h to
    # today in the browser's zone, which is 101 dates during an hour of the night for months
    # after a DST change.
    if (end - start).days > max_days + 1:
        raise ValueError(f"start_date, end_date: at most {max_days + 1} days apart")
    return start, end


@dataclass(frozen=True, slots=True)
class DatedAnswer:
    record: TokenRecord  # the lifetime total came from it: a record read since with other values re-renders
    options: BillingOptions
    changed: float  # History.changed_at as it was made: a round heard to change the token since re-renders
    headers: Headers
    body: bytes


class BillingUsageEndpoint:
    """GET /dashboard/billing/usage: the gateway's answer; with start_date and end_date, also
    OpenAI's `daily_costs` over that range (and, with USAGE_BILLING_TOTAL=range, its total)."""

    def __init__(
        self,
        services: Services,
        *,
        unavailable: ASGIApp,
        max_days: int,
        total: BillingTotal,
        answers: AnswerCache[bytes, DatedAnswer],
    ) -> None:
        self.lifetime = BillingEndpoint("usage", usage_data, services)
        self.services = services
        self.unavailable = unavailable
        self.max_days = max_days
        self.range_total = total == "range"
        self.answers = answers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query_string: bytes = scope["query_string"]
        if not query_string:
            await self.lifetime(scope, receive, send)
            return
        record: TokenRecord = scope[SCOPE_KEY]
        options = self.services.options.current
        # Dated answers are kept per (token, query as sent): a hit parses nothing. Only dated
        # answers are kept, so a hit is one.
        key = b"%d?%s" % (record.id, query_digest(query_string))
        now = time.monotonic()
        answer = self.answers.fresh(key, now)
        changed = self.services.history.changed_at(record.id)
        if (
            answer is None
            or answer.options is not options
            or answer.changed != changed
            or (answer.record is not record and answer.record != record)
        ):
            try:
                params = query_values(query_string)
            except TooManyParameters as exc:
                await OpenAIError(400, str(exc), "invalid_request")(scope, receive, send)
                return
            if not (params.get("start_date") or params.get("end_date")):
                await self.lifetime(scope, receive, send)
                return
            try:
                start, end = billing_range(params, self.max_days)
            except ValueError as exc:
                await OpenAIError(400, str(exc), "invalid_date_range")(scope, receive, send)
                return
            try:
                data = await self.daily_costs(record, start, end, options)
            except Spent as spent:
                too_many = OpenAIError(429, TOO_MANY_DAYS, "rate_limit_exceeded", [spent.header], type_="requests")
                await too_many(scope, receive, send)
                return
            except StoreUnavailable:
                answer = self.answers.stale(key, now)
                if answer is None:
                    await self.unavailable(scope, receive, send)
                    return
            else:
                answer = DatedAnswer(record, options, changed, *_answer(data))
                self.answers.put(key, answer, len(answer.body) + len(key), now)
        await send_body(scope, send, 200, [*answer.headers], answer.body)

    async def daily_costs(
        self, record: TokenRecord, start: date, end: date, options: BillingOptions
    ) -> dict[str, object]:
        """OpenAI's body: a cost per model per UTC day, in hundredths of the display unit.

        Always the token's own spending (never its owner's other tokens), whatever
        DisplayTokenStatEnabled says; it says only what the lifetime total counts.
        """
        days = (end - start).days
        starts = day_starts(start, days, UTC)
        sums = await self.services.day_sums.sums(record.id, starts, horizon(time.time()))
        daily: list[dict[str, Any]] = [{"timestamp": starts[n], "line_items": []} for n in range(days)]
        quota = 0
        for (day, model), (spent, *_) in sums.items():  # in (day, model) order
            daily[day]["line_items"].append({"name": model, "cost": json_number(options.amount(spent) * 100)})
            quota += spent
        total = json_number(options.amount(quota) * 100) if self.range_total else lifetime_usage(record, options)
        return {"object": "list", "daily_costs": daily, "total_usage": total}
