"""The Authorization header rules, and which found tokens the usage route admits."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from usage_service.auth import (
    _BEARER,
    DISABLED,
    INVALID_BEARER,
    NO_HEADER,
    UNUSABLE,
    USER_BANNED,
    bearer_key,
    parse_authorization,
    usage_verdict,
)
from usage_service.records import TokenRecord

KEY = "AbCdEf0123456789AbCdEf0123456789AbCdEf0123456789"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param(None, NO_HEADER, id="missing"),
        pytest.param("", NO_HEADER, id="empty"),
        pytest.param(f"Bearer sk-{KEY}", KEY, id="sk-prefix"),
        pytest.param(f"Bearer {KEY}", KEY, id="bare-key"),
        pytest.param(f"bearer sk-{KEY}", KEY, id="lowercase-scheme"),
        pytest.param(f"BEARER sk-{KEY}", KEY, id="uppercase-scheme"),
        pytest.param(f"Bearer    sk-{KEY}", KEY, id="several-spaces"),
        pytest.param(f"Bearer sk-{KEY} ", KEY, id="trailing-space"),
        pytest.param(f"Bearer sk-{KEY}-12", KEY, id="channel-suffix"),
        pytest.param(f"Bearer {KEY}-12", KEY, id="channel-suffix-no-prefix"),
        pytest.param("Bearer " + "a" * 128, "a" * 128, id="longest-key"),
        pytest.param("Bearer abc", "abc", id="short-key"),
        pytest.param("Bearer", INVALID_BEARER, id="scheme-only"),
        pytest.param("Bearer ", INVALID_BEARER, id="scheme-and-space"),
        pytest.param("Bearer    ", INVALID_BEARER, id="scheme-and-spaces"),
        pytest.param(f"Basic {KEY}", INVALID_BEARER, id="basic-scheme"),
        pytest.param(f"Token {KEY}", INVALID_BEARER, id="other-scheme"),
        pytest.param(f"Bearer{KEY}", INVALID_BEARER, id="no-separator"),
        pytest.param(f"sk-{KEY}", INVALID_BEARER, id="no-scheme"),
        pytest.param("Bearer sk-", INVALID_BEARER, id="prefix-only"),
        pytest.param(f"Bearer sk-{KEY}-", INVALID_BEARER, id="empty-channel"),
        pytest.param(f"Bearer sk-{KEY}-1-2", INVALID_BEARER, id="two-suffixes"),
        pytest.param(f"Bearer sk-{KEY}-1!", INVALID_BEARER, id="junk-channel"),
        pytest.param("Bearer " + "a" * 129, INVALID_BEARER, id="too-long"),
        pytest.param(f"Bearer {KEY[:10]}!{KEY[10:]}", INVALID_BEARER, id="punctuation"),
        pytest.param("Bearer a b", INVALID_BEARER, id="two-words"),
        pytest.param("Bearer ' OR 1=1 --", INVALID_BEARER, id="sql"),
        pytest.param("Bearer \u00e9t\u00e9", INVALID_BEARER, id="non-ascii"),
        pytest.param("Bearer \tabc", INVALID_BEARER, id="tab-is-not-sp"),
        pytest.param("Bearer sk-sk-abc", "sk", id="double-prefix-splits-like-the-gateway"),
        pytest.param("Bearer sk-" + "a" * 128, "a" * 128, id="longest-key-with-prefix"),
        pytest.param("Bearer sk-" + "a" * 129, INVALID_BEARER, id="too-long-with-prefix"),
        pytest.param("Bearer sk-\u00e9t\u00e9", INVALID_BEARER, id="non-ascii-with-prefix"),
    ],
)
def test_parse_authorization(header: str | None, expected: object) -> None:
    raw = header.encode() if header is not None else None
    assert parse_authorization(raw) == (expected.encode() if isinstance(expected, str) else expected)


# Headers near the accepted shapes: scheme spellings, prefixes, keys, suffixes, spaces, junk.
_PIECES = st.sampled_from([b"Bearer", b"bearer", b"BEARER", b"Basic", b" ", b"  ", b"\t", b"sk-", b"sk", b"-"])
_HEADERS = st.lists(_PIECES | st.binary(max_size=3) | st.text("aZ09", min_size=1, max_size=140).map(str.encode))


@given(parts=_HEADERS)
def test_fast_parse_agrees_with_the_pattern(parts: list[bytes]) -> None:
    """The hot path skips the regex for the common shape; it must accept exactly what the pattern does."""
    header = b"".join(parts)
    bearer = _BEARER.fullmatch(header)
    assert bearer_key(header) == (None if bearer is None else bearer.group(1))


def test_rejections_carry_www_authenticate() -> None:
    for rejection in (NO_HEADER, INVALID_BEARER, DISABLED, UNUSABLE):
        assert rejection.status == 401
        assert (b"www-authenticate", b"Bearer") in rejection.headers


RECORD = TokenRecord(1, 1, "t", 1, -1, 10, 0, False, False, (), 1)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param({}, None, id="enabled"),
        pytest.param({"status": 3}, None, id="expired-status-readable"),
        pytest.param({"status": 4}, None, id="exhausted-readable"),
        pytest.param({"expired_time": 1}, None, id="expired-time-past-readable"),
        pytest.param({"remain_quota": -5}, None, id="negative-remain-readable"),
        pytest.param({"status": 2}, DISABLED, id="disabled"),
        pytest.param({"status": 9}, UNUSABLE, id="unknown-status"),
        pytest.param({"user_status": 2}, USER_BANNED, id="user-banned"),
        pytest.param({"user_status": 2, "status": 2}, USER_BANNED, id="banned-wins"),
    ],
)
def test_usage_verdict(changes: dict[str, object], expected: object) -> None:
    assert usage_verdict(dataclasses.replace(RECORD, **changes)) is expected  # type: ignore[arg-type]
