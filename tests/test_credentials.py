"""The Authorization header rules, and which found tokens the usage route admits."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from usage_service import auth
from usage_service.auth import (
    _BEARER,
    DISABLED,
    NOT_FOUND,
    UNUSABLE,
    USER_BANNED,
    bearer_key,
    usage_verdict,
)
from usage_service.records import TokenRecord
from usage_service.responses import JSONError

KEY = "AbCdEf0123456789AbCdEf0123456789AbCdEf0123456789"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param("", None, id="empty"),
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
        pytest.param("Bearer", None, id="scheme-only"),
        pytest.param("Bearer ", None, id="scheme-and-space"),
        pytest.param("Bearer    ", None, id="scheme-and-spaces"),
        pytest.param(f"Basic {KEY}", None, id="basic-scheme"),
        pytest.param(f"Token {KEY}", None, id="other-scheme"),
        pytest.param(f"Bearer{KEY}", None, id="no-separator"),
        pytest.param(f"sk-{KEY}", None, id="no-scheme"),
        pytest.param("Bearer sk-", None, id="prefix-only"),
        pytest.param(f"Bearer sk-{KEY}-", None, id="empty-channel"),
        pytest.param(f"Bearer sk-{KEY}-1-2", None, id="two-suffixes"),
        pytest.param(f"Bearer sk-{KEY}-1!", None, id="junk-channel"),
        pytest.param("Bearer " + "a" * 129, None, id="too-long"),
        pytest.param(f"Bearer {KEY[:10]}!{KEY[10:]}", None, id="punctuation"),
        pytest.param("Bearer a b", None, id="two-words"),
        pytest.param("Bearer ' OR 1=1 --", None, id="sql"),
        pytest.param("Bearer \u00e9t\u00e9", None, id="non-ascii"),
        pytest.param("Bearer \tabc", None, id="tab-is-not-sp"),
        pytest.param("Bearer sk-sk-abc", "sk", id="double-prefix-splits-like-the-gateway"),
        pytest.param("Bearer sk-" + "a" * 128, "a" * 128, id="longest-key-with-prefix"),
        pytest.param("Bearer sk-" + "a" * 129, None, id="too-long-with-prefix"),
        pytest.param("Bearer sk-\u00e9t\u00e9", None, id="non-ascii-with-prefix"),
    ],
)
def test_bearer_key(header: str, expected: str | None) -> None:
    """The token key (without 'sk-' or a channel suffix), or None for a credential we refuse."""
    assert bearer_key(header.encode()) == (None if expected is None else expected.encode())


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
    """Every 401 the auth middleware can send, in both routes' shapes."""
    rejections = [value for value in vars(auth).values() if isinstance(value, JSONError) and value.status == 401]
    assert NOT_FOUND in rejections and auth.RELAY_NOT_FOUND in rejections and len(rejections) >= 11
    for rejection in rejections:
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
