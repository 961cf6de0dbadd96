"""Bearer authentication for /api/usage: every rejection is answered here, before routing.

The middleware reads the credential, resolves it through the cache layers and applies the
usage route's rules; only an accepted token's record travels on, in `scope["usage.token"]`.
"""

from __future__ import annotations

import logging
import re

from starlette.types import ASGIApp, Receive, Scope, Send

from .lookup import TokenLookup
from .records import TOKEN_DISABLED, TOKEN_ENABLED, TOKEN_EXHAUSTED, TOKEN_EXPIRED, USER_ENABLED, TokenRecord
from .responses import JSONError
from .store import StoreUnavailable

logger = logging.getLogger("usage_service.auth")

SCOPE_KEY = "usage.token"

# RFC 7235: the scheme is case-insensitive and separated from the credential by 1*SP. The
# credential is sk-KEY, KEY, or either with the gateway's "-CHANNEL" suffix; KEY is what the
# database stores. One pattern over the raw header bytes: this runs on every request.
_BEARER = re.compile(rb"[Bb][Ee][Aa][Rr][Ee][Rr] +(?:sk-)?([0-9A-Za-z]{1,128})(?:-[0-9A-Za-z]{1,32})? *")

# Statuses under which usage stays readable: expired and exhausted tokens are what people poll.
_READABLE = frozenset({TOKEN_ENABLED, TOKEN_EXPIRED, TOKEN_EXHAUSTED})

_WWW_AUTHENTICATE = (b"www-authenticate", b"Bearer")
NO_HEADER = JSONError(401, "No Authorization header", [_WWW_AUTHENTICATE])
INVALID_BEARER = JSONError(401, "Invalid Bearer token", [_WWW_AUTHENTICATE])
NOT_FOUND = JSONError(401, "token not found", [_WWW_AUTHENTICATE])
DISABLED = JSONError(401, "token is disabled", [_WWW_AUTHENTICATE])
UNUSABLE = JSONError(401, "token status is not usable", [_WWW_AUTHENTICATE])
USER_BANNED = JSONError(403, "user is banned")


def parse_authorization(value: bytes | None) -> bytes | JSONError:
    """Return the token key (without 'sk-' or a channel suffix) or the rejection to send."""
    if not value:
        return NO_HEADER
    bearer = _BEARER.fullmatch(value)
    if bearer is None:
        return INVALID_BEARER
    return bearer.group(1)


def usage_verdict(record: TokenRecord) -> JSONError | None:
    """Apply GET /api/usage/token's rules to a found token: None admits it."""
    if record.user_status != USER_ENABLED:
        return USER_BANNED
    if record.status in _READABLE:
        return None
    return DISABLED if record.status == TOKEN_DISABLED else UNUSABLE


class TokenAuthMiddleware:
    """Pure-ASGI middleware guarding every path under `prefix`."""

    def __init__(self, app: ASGIApp, prefix: str = "/api/usage", retry_after: int = 1) -> None:
        self.app = app
        self.prefix = prefix
        self.prefix_slash = prefix + "/"
        self.unavailable = JSONError(
            503, "database unavailable, retry later", [(b"retry-after", str(retry_after).encode())]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path != self.prefix and not path.startswith(self.prefix_slash):
            await self.app(scope, receive, send)
            return

        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        key = parse_authorization(header)
        if isinstance(key, JSONError):
            await key(scope, receive, send)
            return

        lookup: TokenLookup = scope["app"].state.lookup
        record = lookup.cached(key)
        if record is None:
            try:
                record = await lookup.resolve(key)
            except StoreUnavailable:
                await self.unavailable(scope, receive, send)
                return
            if record is None:
                await NOT_FOUND(scope, receive, send)
                return
        rejection = usage_verdict(record)
        if rejection is not None:
            await rejection(scope, receive, send)
            return

        scope[SCOPE_KEY] = record
        await self.app(scope, receive, send)
