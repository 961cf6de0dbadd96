"""Bearer authentication for the polled routes: every rejection is answered here, before dispatch.

The middleware reads the credential, resolves it through the cache layers and applies the
matched route's rules (the usage route's, or the gateway's relay rules for the OpenAI-style
billing routes); only an accepted token's record travels on, in `scope["usage.token"]`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from functools import lru_cache

from starlette.types import ASGIApp, Receive, Scope, Send

from .limiter import NoTurn
from .records import TOKEN_DISABLED, TOKEN_ENABLED, TOKEN_EXHAUSTED, TOKEN_EXPIRED, USER_ENABLED, TokenRecord
from .responses import JSONError, OpenAIError
from .routing import ROUTE_KEY, SCOPE_KEY, Rules, ShortRoute, TooManyParameters, query_pairs
from .services import Services
from .store import StoreUnavailable

logger = logging.getLogger("usage_service.auth")

# RFC 7235: the scheme is case-insensitive and separated from the credential by 1*SP. The
# credential is sk-KEY, KEY, or either with the gateway's "-CHANNEL" suffix; KEY is what the
# database stores. One pattern over the raw header bytes: this runs on every request.
_BEARER = re.compile(rb"[Bb][Ee][Aa][Rr][Ee][Rr] +(?:sk-)?([0-9A-Za-z]{1,128})(?:-[0-9A-Za-z]{1,32})? *")
# The same credential as a query parameter's value (`?key=sk-KEY`, the log route's legacy form).
_CREDENTIAL = re.compile(rb"(?:sk-)?([0-9A-Za-z]{1,128})(?:-[0-9A-Za-z]{1,32})?")

# Statuses under which usage stays readable: expired and exhausted tokens are what people poll.
_READABLE = frozenset({TOKEN_ENABLED, TOKEN_EXPIRED, TOKEN_EXHAUSTED})

_WWW_AUTHENTICATE = (b"www-authenticate", b"Bearer")
NO_HEADER = JSONError(401, "No Authorization header", [_WWW_AUTHENTICATE])
INVALID_BEARER = JSONError(401, "Invalid Bearer token", [_WWW_AUTHENTICATE])
NOT_FOUND = JSONError(401, "token not found", [_WWW_AUTHENTICATE])
DISABLED = JSONError(401, "token is disabled", [_WWW_AUTHENTICATE])
UNUSABLE = JSONError(401, "token status is not usable", [_WWW_AUTHENTICATE])
USER_BANNED = JSONError(403, "user is banned")


def bearer_key(value: bytes) -> bytes | None:
    """The token key in an Authorization value, or None when it is no credential we accept."""
    # What nearly every client sends, checked without the regex engine: half the cost.
    if value[:10] == b"Bearer sk-":
        key = value[10:]
        if len(key) <= 128 and key.isalnum():  # bytes.isalnum() is ASCII-only, like the pattern
            return key
    bearer = _BEARER.fullmatch(value)
    return None if bearer is None else bearer.group(1)


def key_parameter(query_string: bytes) -> bytes | None:
    """The first `key` query parameter, percent-decoded, or None if it is empty (as the gateway
    reads it) or the query string holds too many parameters to look. (Never logged, never echoed.)"""
    if not query_string:
        return None
    try:
        pairs = query_pairs(query_string)
    except TooManyParameters:
        return None
    for name, value in pairs:
        if name == "key":
            return value.encode(errors="replace") if value else None
    return None


def parameter_key(value: bytes) -> bytes | None:
    """The token key in a `?key=` value or a scheme-less Authorization value (sk-KEY or KEY, as
    in a Bearer header), or None."""
    credential = _CREDENTIAL.fullmatch(value)
    return None if credential is None else credential.group(1)


def usage_verdict(record: TokenRecord) -> JSONError | None:
    """Apply GET /api/usage/token's rules to a found token: None admits it."""
    if record.user_status != USER_ENABLED:
        return USER_BANNED
    if record.status in _READABLE:
        return None
    return DISABLED if record.status == TOKEN_DISABLED else UNUSABLE


def usage_rules(retry_after: int, *, query_key: bool = False, bare_key: bool = False) -> Rules:
    """The usage route's rules and its errors, in the gateway's `{"success": false, ...}` shape;
    `query_key` also takes the credential from `?key=` when there is no Authorization header,
    and `bare_key` an Authorization value without the Bearer scheme."""
    return Rules(
        verdict=usage_verdict,
        no_header=NO_HEADER,
        invalid_bearer=INVALID_BEARER,
        unknown_key=NOT_FOUND,
        unavailable=JSONError(503, "database unavailable, retry later", [_retry_after(retry_after)]),
        not_found=JSONError(404, "not found"),
        method_not_allowed=JSONError(405, "method not allowed", [(b"allow", b"GET, HEAD")]),
        internal_error=JSONError(500, "internal server error"),
        query_key=query_key,
        bare_key=bare_key,
    )


# --- the gateway's relay rules (its TokenAuth), in OpenAI's error shape ------------------------
# OpenAI clients (NextChat, chatgpt-web, key checkers) read `error.message` and `error.code`.


def _relay_401(message: str) -> OpenAIError:
    return OpenAIError(401, message, "invalid_api_key", [_WWW_AUTHENTICATE])


RELAY_NO_HEADER = _relay_401("No Authorization header")
RELAY_INVALID_BEARER = _relay_401("Invalid Bearer token")
RELAY_NOT_FOUND = _relay_401("token not found")
RELAY_DISABLED = _relay_401("token is disabled")
RELAY_EXPIRED = _relay_401("token has expired")
RELAY_EXHAUSTED = _relay_401("token quota is exhausted")
RELAY_UNUSABLE = _relay_401("token status is not usable")
RELAY_USER_BANNED = OpenAIError(403, "user is banned", "account_deactivated")
_RELAY_BY_STATUS = {TOKEN_DISABLED: RELAY_DISABLED, TOKEN_EXPIRED: RELAY_EXPIRED, TOKEN_EXHAUSTED: RELAY_EXHAUSTED}


def relay_verdict(record: TokenRecord) -> OpenAIError | None:
    """Apply the gateway's relay rules, in its order: the token must be usable, then its user enabled."""
    if record.status != TOKEN_ENABLED:
        return _RELAY_BY_STATUS.get(record.status, RELAY_UNUSABLE)
    # The gateway compares with whole seconds: a token is still usable during its last second.
    if record.expired_time != -1 and record.expired_time < int(time.time()):
        return RELAY_EXPIRED
    if not record.unlimited_quota and record.remain_quota <= 0:
        return RELAY_EXHAUSTED
    if record.user_status != USER_ENABLED:
        return RELAY_USER_BANNED
    return None


def relay_rules(retry_after: int) -> Rules:
    """The billing routes' rules: the gateway's relay checks, every error in OpenAI's shape."""
    return Rules(
        verdict=relay_verdict,
        no_header=RELAY_NO_HEADER,
        invalid_bearer=RELAY_INVALID_BEARER,
        unknown_key=RELAY_NOT_FOUND,
        unavailable=OpenAIError(
            503,
            "database unavailable, retry later",
            "service_unavailable",
            [_retry_after(retry_after)],
            type_="server_error",
        ),
        not_found=OpenAIError(404, "not found", "not_found"),
        method_not_allowed=OpenAIError(405, "method not allowed", "method_not_allowed", [(b"allow", b"GET, HEAD")]),
        internal_error=OpenAIError(500, "internal server error", "internal_error", type_="server_error"),
        bare_key=True,
    )


def _retry_after(seconds: int) -> tuple[bytes, bytes]:
    return (b"retry-after", str(seconds).encode())


# --- the failed-authentication limiter's answer ------------------------------------------------

TOO_MANY_FAILURES = "too many failed authentications, retry later"


@lru_cache(maxsize=512)
def _too_many(openai_shape: bool, retry_after: int) -> JSONError:
    """429 in the route's error shape (OpenAI clients back off on rate_limit_exceeded)."""
    headers = [_retry_after(retry_after)]
    if openai_shape:
        return OpenAIError(429, TOO_MANY_FAILURES, "rate_limit_exceeded", headers, type_="requests")
    return JSONError(429, TOO_MANY_FAILURES, headers)


class TokenAuthMiddleware:
    """Pure-ASGI middleware guarding every request the front door matched to a polled route.

    The route (in `scope["usage.route"]`) says which rules apply. Credentials that name no
    token are failures the limiter counts; a token that is found but refused is not one.
    """

    def __init__(self, app: ASGIApp, *, services: Services) -> None:
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route: ShortRoute = scope[ROUTE_KEY]
        rules = route.rules

        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        if header:
            key = bearer_key(header)
            if key is None and rules.bare_key:
                key = parameter_key(header)
        elif rules.query_key and (parameter := key_parameter(scope.get("query_string", b""))) is not None:
            key = parameter_key(parameter)
        else:
            await self.refuse(rules.no_header, scope, receive, send)
            return
        if key is None:
            await self.refuse(rules.invalid_bearer, scope, receive, send)
            return

        record = self.services.lookup.cached(key, scope)
        if record is None:
            record = await self.resolve(key, rules, scope, receive, send)
            if record is None:
                return  # answered
        rejection = rules.verdict(record)
        if rejection is not None:
            await rejection(scope, receive, send)
            return

        scope[SCOPE_KEY] = record
        await self.app(scope, receive, send)

    async def resolve(self, key: bytes, rules: Rules, scope: Scope, receive: Receive, send: Send) -> TokenRecord | None:
        """Resolve a key the in-process layer does not hold, in one of its address's turns: a
        blocked address is answered before resolution (guessing costs it no lookup at all), and a
        burst of guesses waits. Returns the token's record, or None once the request is answered
        (an unknown key, a 429, or a 503 when the database does not answer within its deadline,
        the wait for a turn included)."""
        lookup, limiter = self.services.lookup, self.services.limiter
        deadline = lookup.deadline()
        turn = limiter.turn(scope, deadline) if limiter is not None else contextlib.nullcontext()
        try:
            async with turn as retry_after:
                if retry_after is not None:
                    await self.too_many(rules, retry_after, scope, receive, send)
                    return None
                record = await lookup.resolve(key, scope, deadline)
                if record is None:
                    await self.refuse(rules.unknown_key, scope, receive, send)  # counted within the turn
                return record
        except NoTurn:
            record = lookup.stale(key, scope)
            if record is None:
                await rules.unavailable(scope, receive, send)
            return record
        except StoreUnavailable:
            await rules.unavailable(scope, receive, send)
            return None

    async def refuse(self, rejection: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a credential that names no token: the route's 401, or 429 once its address failed too often."""
        limiter = self.services.limiter
        if limiter is not None:
            retry_after = await limiter.failed(scope)
            if retry_after is not None:
                await self.too_many(scope[ROUTE_KEY].rules, retry_after, scope, receive, send)
                return
        await rejection(scope, receive, send)

    async def too_many(self, rules: Rules, retry_after: int, scope: Scope, receive: Receive, send: Send) -> None:
        self.services.lookup.stats.limited += 1  # published as usage_limiter_rejections_total
        await _too_many(isinstance(rules.unknown_key, OpenAIError), retry_after)(scope, receive, send)
