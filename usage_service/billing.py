"""The OpenAI-style billing routes new-api serves, answered from the same records as the usage route.

NextChat, chatgpt-web and key checkers poll `/dashboard/billing/subscription` and
`/dashboard/billing/usage` (with or without `/v1`). The amounts follow the gateway's own
settings, read from its `options` table every USAGE_OPTIONS_INTERVAL seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.types import Receive, Scope, Send

from .auth import SCOPE_KEY
from .records import TokenRecord, compact_json, go_int_sum
from .responses import JSON_TYPE, NO_CACHE, Headers, send_body
from .store import StoreUnavailable, TokenStore

logger = logging.getLogger("usage_service.billing")

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
        display_type = rows.get(DISPLAY_TYPE, "").strip()
        if not display_type:
            # Gateways older than quota_display_type only had this switch: false meant raw quota.
            display_type = "TOKENS" if rows.get(LEGACY_CURRENCY) == "false" else default.display_type
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


def _positive(raw: str | None, default: float) -> float:
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        return default
    # The gateway would divide by zero or by junk here; the default is the only sensible reading.
    return value if math.isfinite(value) and value > 0 else default


def _number(value: float) -> int | float:
    """Render a float as Go's encoding/json does: whole numbers without a fraction."""
    return int(value) if value.is_integer() and abs(value) < 1e21 else value


def subscription_data(record: TokenRecord, options: BillingOptions) -> dict[str, object]:
    """The body of GET /dashboard/billing/subscription, as the gateway computes it."""
    if options.token_stat:
        quota, access_until = go_int_sum(record.remain_quota, record.used_quota), max(record.expired_time, 0)
    else:
        quota, access_until = go_int_sum(record.user_quota, record.user_used_quota), 0
    limit: int | float = _number(options.amount(quota))
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


def usage_data(record: TokenRecord, options: BillingOptions) -> dict[str, object]:
    """The body of GET /dashboard/billing/usage: lifetime use in hundredths of the display unit."""
    used = record.used_quota if options.token_stat else record.user_used_quota
    return {"object": "list", "total_usage": _number(options.amount(used) * 100)}


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
        """Refresh every interval until cancelled."""
        if self.interval <= 0:
            return
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except Exception:  # never let one odd failure stop the refreshes for good
                logger.exception("reading the gateway's options failed")


# --- the endpoints ---------------------------------------------------------------------------


def _answer(data: dict[str, object]) -> tuple[Headers, bytes]:
    body = compact_json(data)  # kept with the record
    return [JSON_TYPE, NO_CACHE, (b"content-length", str(len(body)).encode())], body


async def billing_subscription(scope: Scope, receive: Receive, send: Send) -> None:
    """GET /dashboard/billing/subscription for the token the auth middleware admitted."""
    await _send(scope, send, "subscription")


async def billing_usage(scope: Scope, receive: Receive, send: Send) -> None:
    """GET /dashboard/billing/usage for the token the auth middleware admitted."""
    await _send(scope, send, "usage")


_RENDER = {"subscription": subscription_data, "usage": usage_data}


async def _send(scope: Scope, send: Send, name: str) -> None:
    record: TokenRecord = scope[SCOPE_KEY]
    options: BillingOptions = scope["app"].options.current
    # Rendered once per (record, options): a polled record is answered many times unchanged.
    memo = record.rendered
    entry = memo.get(name)
    if entry is None or entry[0] is not options:
        entry = (options, _answer(_RENDER[name](record, options)))
        memo[name] = entry
    headers, body = entry[1]
    # A fresh list: the server or a middleware may add to the headers it is given.
    await send_body(scope, send, 200, [*headers], body)
