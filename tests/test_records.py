"""The record: how it reads gateway columns, renders the usage body and survives the cache."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import orjson
import pytest

from usage_service.billing import BillingOptions, subscription_data
from usage_service.records import (
    INT64_MAX,
    INT64_MIN,
    CorruptCacheValue,
    TokenRecord,
    as_bool,
    as_int,
    decode_cached,
    encode_cached,
    parse_model_limits,
)
from usage_service.store._sql import row_record

RECORD = TokenRecord(7, 3, "ci", 1, 1893456000, 900, 100, False, True, ("gpt-4o", "o3"), 1)


@pytest.mark.parametrize(
    ("column", "expected"),
    [
        pytest.param(None, (), id="null"),
        pytest.param("", (), id="empty"),
        pytest.param("gpt-4o", ("gpt-4o",), id="one"),
        pytest.param("gpt-4o,o3", ("gpt-4o", "o3"), id="two"),
        pytest.param(" gpt-4o , o3 ,", ("gpt-4o", "o3"), id="spaces-and-trailing-comma"),
        pytest.param(",,", (), id="only-commas"),
        pytest.param("a,a", ("a",), id="duplicates"),
        pytest.param(42, (), id="not-text"),
    ],
)
def test_parse_model_limits(column: object, expected: tuple[str, ...]) -> None:
    assert parse_model_limits(column) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, True),
        (0, False),
        (None, False),
        ("1", True),
        ("0", False),
        ("true", True),
        ("false", False),
        ("t", True),
        (b"1", True),
        (1.0, True),
        (True, True),
        (Decimal("1"), True),
        (Decimal("0"), False),
    ],
)
def test_as_bool(value: object, expected: bool) -> None:
    assert as_bool(value) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, 5),
        (None, 0),
        ("12", 12),
        ("x", 0),
        (2.9, 2),
        (float("nan"), 0),
        (1.5e19, 15_000_000_000_000_000_000),  # a REAL past 64 bits, read whole: the row's range check refuses it
        (2**63 - 1, 2**63 - 1),
        (Decimal("500000"), 500_000),  # NUMERIC, DECIMAL
        (Decimal("2.9"), 2),
        (Decimal(10**23), 10**23),  # read whole: the row's range check refuses it
        (Decimal("NaN"), 0),
    ],
)
def test_as_int(value: object, expected: int) -> None:
    assert as_int(value) == expected


def test_usage_body_has_exactly_the_contract_fields() -> None:
    body = orjson.loads(RECORD.usage.body)
    assert body == {
        "code": True,
        "message": "ok",
        "data": {
            "object": "token_usage",
            "name": "ci",
            "total_granted": 1000,
            "total_used": 100,
            "total_available": 900,
            "unlimited_quota": False,
            "model_limits": {"gpt-4o": True, "o3": True},
            "model_limits_enabled": True,
            "expires_at": 1893456000,
        },
    }


def test_never_expires_is_reported_as_zero() -> None:
    assert orjson.loads(dataclasses.replace(RECORD, expired_time=-1).usage.body)["data"]["expires_at"] == 0


def test_quotas_are_64_bit_and_negative_remain_passes_through() -> None:
    record = dataclasses.replace(RECORD, remain_quota=-(2**40), used_quota=2**62, unlimited_quota=True)
    data = orjson.loads(record.usage.body)["data"]
    assert data["total_available"] == -(2**40)
    assert data["total_used"] == 2**62
    assert data["total_granted"] == 2**62 - 2**40


# The gateway adds remain_quota and used_quota as Go ints (64 bits), which wrap around.
EDGES = [
    pytest.param(INT64_MIN, 0, INT64_MIN, id="remain-int64-min"),
    pytest.param(INT64_MIN, -1, INT64_MAX, id="wraps-below-int64-min"),
    pytest.param(INT64_MAX, 10, INT64_MIN + 9, id="wraps-past-int64-max"),
    pytest.param(INT64_MAX, INT64_MAX, -2, id="both-int64-max"),
    pytest.param(INT64_MIN, INT64_MIN, 0, id="both-int64-min"),
]


@pytest.mark.parametrize(("remain", "used", "granted"), EDGES)
def test_totals_wrap_as_the_gateway_computes_them(remain: int, used: int, granted: int) -> None:
    record = dataclasses.replace(RECORD, remain_quota=remain, used_quota=used, user_quota=remain, user_used_quota=used)
    data = orjson.loads(record.usage.body)["data"]
    assert (data["total_granted"], data["total_available"], data["total_used"]) == (granted, remain, used)
    # The billing routes show the same total, as float64(total) / QuotaPerUnit.
    for token_stat in (True, False):
        limit = subscription_data(record, BillingOptions(token_stat=token_stat))["hard_limit_usd"]
        assert limit == pytest.approx(granted / 500_000)
    cached, _ = decode_cached(encode_cached(record, 1.0))
    assert cached == record and cached is not None and cached.usage.body == record.usage.body


ROW = (7, "k" * 48, 3, "ci", 1, -1, 900, 100, 0, 1, "gpt-4o", 1, 5, 6)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        pytest.param(6, 2**63, id="remain-past-int64"),
        pytest.param(7, b"99999999999999999999", id="used-as-digits-past-int64"),
        pytest.param(12, -(2**63) - 1, id="owner-quota-below-int64"),
        pytest.param(0, 2**64, id="id-past-int64"),
    ],
)
def test_rows_no_record_can_hold_are_refused(column: int, value: object) -> None:
    row = list(ROW)
    row[column] = value
    with pytest.raises(ValueError, match="64 bits"):
        row_record(row)


def test_row_text_that_is_not_utf8_reads_with_replacement_characters() -> None:
    record = row_record((*ROW[:3], b"n\xe9w", *ROW[4:10], b"gpt-4\xffo,o3", *ROW[11:]))
    assert record.name == "n\ufffdw" and record.model_limits == ("gpt-4\ufffdo", "o3")


def test_etag_follows_the_body() -> None:
    same = dataclasses.replace(RECORD)
    changed = dataclasses.replace(RECORD, remain_quota=899)
    assert RECORD.usage.etag == same.usage.etag
    assert RECORD.usage.etag != changed.usage.etag
    assert RECORD.usage.etag.startswith(b'"') and RECORD.usage.etag.endswith(b'"')


OWNED = dataclasses.replace(RECORD, user_quota=2**40, user_used_quota=12345)


EXTREME = dataclasses.replace(RECORD, remain_quota=INT64_MIN, used_quota=INT64_MAX, user_quota=INT64_MIN)


@pytest.mark.parametrize(
    "record", [RECORD, OWNED, EXTREME, None], ids=["record", "with-owner-quota", "int64-edges", "unknown-key"]
)
def test_cache_round_trip(record: TokenRecord | None) -> None:
    assert decode_cached(encode_cached(record, 1700000000.5)) == (record, 1700000000.5)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x80\x81", id="binary"),
        pytest.param(b"{}", id="object"),
        pytest.param(b"[1, 2]", id="short"),
        pytest.param(b"[99, 1.0, null]", id="other-format"),
        pytest.param(b'[1, "x", null]', id="bad-time"),
        pytest.param(b"[2, 1.0, [1]]", id="few-fields"),
        pytest.param(b'[2, 1.0, [1, 2, "n", 1, -1, 1, 1, false, false, [], "1", 0, 0]]', id="string-status"),
        pytest.param(b'[2, 1.0, [1, 2, "n", 1, -1, 1, 1, 0, false, [], 1, 0, 0]]', id="int-for-bool"),
        pytest.param(b'[2, 1.0, [1, 2, "n", 1, -1, 1, 1, false, false, [3], 1, 0, 0]]', id="bad-limits"),
        pytest.param(b'[2, 1.0, [1, 2, "n", 1, -1, 99999999999999999999, 1, false, false, [], 1, 0, 0]]', id="huge"),
        pytest.param(b'[2, 1.0, [1, 2, "n", 1, -1, 1, 1, false, false, [], 1, "5", 0]]', id="string-user-quota"),
        pytest.param(b'[1, 1.0, [1, 2, "n", 1, -1, 1, 1, false, false, [], 1]]', id="format-1-of-an-older-worker"),
        pytest.param(b'{"id": 1, "key": "abc"}', id="foreign-json"),
    ],
)
def test_corrupt_cache_values_are_rejected(raw: bytes) -> None:
    with pytest.raises(CorruptCacheValue):
        decode_cached(raw)
