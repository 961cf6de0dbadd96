"""What the service knows about one token: its record, how it is cached, how it is shown."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson

from .responses import JSONAnswer, compact_json

# new-api's token and user statuses.
TOKEN_ENABLED, TOKEN_DISABLED, TOKEN_EXPIRED, TOKEN_EXHAUSTED = 1, 2, 3, 4
USER_ENABLED = 1

# Bumped whenever the cached layout changes, so old and new workers never misread each other.
CACHE_FORMAT = 2

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def go_int_sum(a: int, b: int) -> int:
    """a + b as the gateway computes it: Go's 64-bit `int`, which wraps around on overflow.

    The gateway shows remain_quota + used_quota as a total; past the int64 range it shows the
    wrapped value (two's complement, as the Go spec defines), and so do we.
    """
    return (a + b - INT64_MIN) % 2**64 + INT64_MIN


@dataclass(frozen=True, eq=True, slots=True)
class TokenRecord:
    """A token joined with its owner, as read from the gateway's database (never its key).

    What is rendered from a record is made when first asked for and kept with it, in slots that
    are not part of its value: a polled record is served many times unchanged. (Slots, not a
    `__dict__`: a poll of one of 10,000 tokens reads its record from memory the cache no longer
    holds, and every object less it reads counts.)
    """

    id: int
    user_id: int
    name: str
    status: int
    expired_time: int  # Unix seconds; -1 means never
    remain_quota: int
    used_quota: int
    unlimited_quota: bool
    model_limits_enabled: bool
    model_limits: tuple[str, ...]
    user_status: int
    # The owner's balance, which the billing routes report when the gateway shows user totals.
    user_quota: int = 0
    user_used_quota: int = 0
    _usage: JSONAnswer | None = field(default=None, init=False, repr=False, compare=False)
    _cache_fields: bytes | None = field(default=None, init=False, repr=False, compare=False)
    _fingerprint: bytes | None = field(default=None, init=False, repr=False, compare=False)
    _rendered: dict[str, tuple[object, Any]] | None = field(default=None, init=False, repr=False, compare=False)

    def usage_data(self) -> dict[str, object]:
        """Return the `data` object of GET /api/usage/token."""
        return {
            "object": "token_usage",
            "name": self.name,
            "total_granted": go_int_sum(self.remain_quota, self.used_quota),
            "total_used": self.used_quota,
            "total_available": self.remain_quota,
            "unlimited_quota": self.unlimited_quota,
            "model_limits": {model: True for model in self.model_limits},
            "model_limits_enabled": self.model_limits_enabled,
            "expires_at": 0 if self.expired_time == -1 else self.expired_time,
        }

    @property
    def usage(self) -> JSONAnswer:
        """GET /api/usage/token's answer for this record."""
        answer = self._usage
        if answer is None:
            answer = JSONAnswer.of({"code": True, "message": "ok", "data": self.usage_data()})
            object.__setattr__(self, "_usage", answer)
        return answer

    @property
    def cache_fields(self) -> bytes:
        """The record's part of its cached form, encoded once however often it is rewritten."""
        fields = self._cache_fields
        if fields is None:
            fields = compact_json(
                [
                    self.id,
                    self.user_id,
                    self.name,
                    self.status,
                    self.expired_time,
                    self.remain_quota,
                    self.used_quota,
                    self.unlimited_quota,
                    self.model_limits_enabled,
                    list(self.model_limits),
                    self.user_status,
                    self.user_quota,
                    self.user_used_quota,
                ]
            )
            object.__setattr__(self, "_cache_fields", fields)
        return fields

    @property
    def fingerprint(self) -> bytes:
        """8 bytes that tell this record's fields from any other's (the same in every process):
        what an invalidation carries, so that a worker holding an equal record keeps it."""
        fingerprint = self._fingerprint
        if fingerprint is None:
            fingerprint = hashlib.blake2b(self.cache_fields, digest_size=8).digest()
            object.__setattr__(self, "_fingerprint", fingerprint)
        return fingerprint

    @property
    def rendered(self) -> dict[str, tuple[object, Any]]:
        """Answers that also depend on something else (the gateway's options), rendered once per
        (record, that thing): name -> (what it was rendered for, answer)."""
        rendered = self._rendered
        if rendered is None:
            rendered = {}
            object.__setattr__(self, "_rendered", rendered)
        return rendered


def parse_model_limits(value: object) -> tuple[str, ...]:
    """Split the gateway's comma-separated model list, trimming spaces and dropping empty entries."""
    if not isinstance(value, str) or not value:
        return ()
    return tuple(dict.fromkeys(m for m in (part.strip() for part in value.split(",")) if m))


def as_bool(value: object) -> bool:
    """Read a gateway boolean: 1/0 in numeric columns, occasionally 'true'/'false' text."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float | Decimal):
        return value != 0
    if isinstance(value, str | bytes):
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        return text.strip().lower() in ("1", "t", "true", "y", "yes")
    return False


def as_int(value: object, default: int = 0) -> int:
    """Read an integer column defensively: NULL and junk become the default, floats are truncated,
    and so are decimals (a NUMERIC or DECIMAL column). A number past 64 bits, float or decimal,
    is read whole, for the caller's range check to refuse: SQLite stores a sum past 64 bits (the
    gateway's `used_quota + ?`) as a REAL, which is no quota of 0. (NaN and infinities are junk.)"""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    if isinstance(value, Decimal) and value.is_finite():
        return int(value)
    if isinstance(value, str | bytes):
        try:
            return int(value)
        except ValueError:
            return default
    return default


# --- the cached form -----------------------------------------------------------------------
# A cache value is `[format, fetched_at, record-or-null]`: compact, versioned and carrying the
# time the database was read, so that no layer serves a record older than USAGE_CACHE_TTL.


class CorruptCacheValue(ValueError):
    """A cached value this version cannot read (corrupt, foreign, or another format)."""


def encode_cached(record: TokenRecord | None, fetched_at: float) -> bytes:
    fields = b"null" if record is None else record.cache_fields
    return b"[%d,%s,%s]" % (CACHE_FORMAT, orjson.dumps(fetched_at), fields)


def decode_cached(raw: bytes | str) -> tuple[TokenRecord | None, float]:
    """Return (record or None for a remembered unknown key, fetched_at); raise CorruptCacheValue."""
    try:
        value = orjson.loads(raw)
        fmt, fetched_at, fields = value
        if fmt != CACHE_FORMAT or type(fetched_at) not in (int, float):
            raise CorruptCacheValue("unknown cache format")
        if fields is None:
            return None, float(fetched_at)
        (tid, uid, name, status, expired, remain, used, unlimited, mle, limits, user_status, uq, uuq) = fields
        ints = (tid, uid, status, expired, remain, used, user_status, uq, uuq)
        if not all(type(i) is int and INT64_MIN <= i <= INT64_MAX for i in ints):
            raise CorruptCacheValue("bad integer field")
        if type(name) is not str or type(unlimited) is not bool or type(mle) is not bool:
            raise CorruptCacheValue("bad field type")
        if type(limits) is not list or not all(type(m) is str for m in limits):
            raise CorruptCacheValue("bad model limits")
    except CorruptCacheValue:
        raise
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise CorruptCacheValue(str(exc)) from None
    record = TokenRecord(
        tid, uid, name, status, expired, remain, used, unlimited, mle, tuple(limits), user_status, uq, uuq
    )
    return record, float(fetched_at)
