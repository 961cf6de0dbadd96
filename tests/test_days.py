"""Calendar days in time zones as slot ranges, and sums per day and model, over hand-made slots."""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo, available_timezones

import pytest

from usage_service.days import (
    by_day_and_model,
    day_starts,
    parse_date,
    parse_zone,
    slot_bounds,
    today,
)
from usage_service.history import SLOT, Spend

HOUR = 3600


def utc(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("2026-03-29", date(2026, 3, 29), id="padded"),
        pytest.param("2026-3-5", date(2026, 3, 5), id="unpadded-as-javascript-builds-it"),
        pytest.param("1970-01-01", date(1970, 1, 1), id="first"),
        pytest.param("9999-12-30", date(9999, 12, 30), id="last"),
    ],
)
def test_dates_read(text: str, expected: date) -> None:
    assert parse_date(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("2026-02-30", id="no-such-day"),
        pytest.param("2026-13-01", id="month-13"),
        pytest.param("26-03-01", id="two-digit-year"),
        pytest.param("2026/03/01", id="slashes"),
        pytest.param("2026-03-01T00:00", id="with-time"),
        pytest.param(" 2026-03-01", id="space"),
        pytest.param("２０２６-03-01", id="non-ascii-digits"),
        pytest.param("1969-12-31", id="before-1970"),
        pytest.param("9999-12-31", id="no-day-after"),
        pytest.param("1" * 5000, id="huge"),
    ],
)
def test_bad_dates_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="expected a date"):
        parse_date(text)


@pytest.mark.parametrize(
    "name", ["Nowhere/City", "../../etc/passwd", "/etc/localtime", "Europe/", "x" * 200, "", "Europe/Berlin\x00"]
)
def test_unknown_zones_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="IANA time zone"):
        parse_zone(name)


def test_known_zones() -> None:
    assert parse_zone("Asia/Kathmandu") is ZoneInfo("Asia/Kathmandu")
    assert parse_zone("UTC") is ZoneInfo("UTC")


def test_today_is_the_zones_date() -> None:
    instant = utc(2026, 3, 28, 23, 30)
    assert today(ZoneInfo("UTC"), instant) == date(2026, 3, 28)
    assert today(ZoneInfo("Europe/Berlin"), instant) == date(2026, 3, 29)
    assert today(ZoneInfo("America/New_York"), instant) == date(2026, 3, 28)


@pytest.mark.parametrize(
    ("zone", "day", "midnight", "hours"),
    [
        pytest.param("UTC", date(2026, 3, 29), utc(2026, 3, 29), 24, id="utc"),
        pytest.param("Europe/Berlin", date(2026, 3, 29), utc(2026, 3, 28, 23), 23, id="berlin-spring-23h"),
        pytest.param("Europe/Berlin", date(2026, 10, 25), utc(2026, 10, 24, 22), 25, id="berlin-autumn-25h"),
        pytest.param("America/New_York", date(2026, 3, 8), utc(2026, 3, 8, 5), 23, id="new-york-spring-23h"),
        pytest.param("America/New_York", date(2026, 11, 1), utc(2026, 11, 1, 4), 25, id="new-york-autumn-25h"),
        pytest.param("Asia/Kolkata", date(2026, 6, 1), utc(2026, 5, 31, 18, 30), 24, id="kolkata-half-hour"),
        pytest.param("Asia/Kathmandu", date(2026, 6, 1), utc(2026, 5, 31, 18, 15), 24, id="kathmandu-quarter"),
        # Lord Howe moves its clocks by half an hour.
        pytest.param("Australia/Lord_Howe", date(2026, 4, 5), utc(2026, 4, 4, 13), 24.5, id="lord-howe-24h30"),
        # Chatham Islands: UTC+13:45 in summer, +12:45 in winter.
        pytest.param("Pacific/Chatham", date(2026, 4, 5), utc(2026, 4, 4, 10, 15), 25, id="chatham-autumn-25h"),
        # Paraguay-style changes at midnight: the skipped 00:00 starts the day at the change.
        pytest.param("America/Asuncion", date(2024, 10, 6), utc(2024, 10, 6, 4), 23, id="asuncion-midnight-gap"),
    ],
)
def test_day_starts_in_zones(zone: str, day: date, midnight: int, hours: float) -> None:
    start, end = day_starts(day, 1, ZoneInfo(zone))
    assert start == midnight
    assert end - start == hours * HOUR
    assert start % SLOT == 0 and end % SLOT == 0


def test_every_zone_is_in_whole_slots_since_1980() -> None:
    """What makes the sums per local day exact: no slot straddles a local midnight."""
    odd = set()
    for name in available_timezones():
        zone = ZoneInfo(name)
        for year in range(1980, 2040):
            for month in range(1, 13):
                offset = datetime(year, month, 1, 12, tzinfo=zone).utcoffset()
                assert offset is not None
                if offset.total_seconds() % SLOT:
                    odd.add(name)
    assert not odd


def test_slot_bounds_cover_offsets_that_are_no_whole_slots() -> None:
    """Africa/Monrovia was UTC-0:44:30 in 1970: its midnights fall inside slots."""
    starts = day_starts(date(1970, 6, 1), 2, ZoneInfo("Africa/Monrovia"))
    assert starts[0] == utc(1970, 6, 1, 0, 44, 30)
    start, end = slot_bounds(starts)
    assert start == utc(1970, 6, 1, 0, 30) and end == utc(1970, 6, 3, 0, 45)


def spend(quota: int, requests: int = 1, prompt: int = 10, completion: int = 5) -> Spend:
    return (quota, prompt, completion, requests)


def test_sums_per_local_day_across_a_dst_day() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    starts = day_starts(date(2026, 3, 28), 3, berlin)  # 28th (24 h), 29th (23 h), 30th
    slots = {
        (starts[0] - SLOT, "gpt-4o"): spend(1),  # the slot before the range
        (starts[0], "gpt-4o"): spend(10),  # on the first local midnight
        (starts[1] - SLOT, "gpt-4o"): spend(20),  # the last slot of the 28th
        (starts[1], "gpt-4o"): spend(100),  # the 29th's midnight: 23:00 UTC on the 28th
        (starts[1], "o3"): spend(1000),
        (utc(2026, 3, 29, 1), "gpt-4o"): spend(200),  # 03:00 CEST, just after the change
        (starts[2] - SLOT, "gpt-4o"): spend(300),  # the 29th's last slot: 21:45 UTC
        (starts[2], "gpt-4o"): spend(10_000),  # the 30th
        (starts[3], "gpt-4o"): spend(7),  # the day after the range
    }
    sums = by_day_and_model(slots, starts)
    assert {key: quota for key, (quota, *_) in sums.items()} == {
        (0, "gpt-4o"): 30,
        (1, "gpt-4o"): 600,
        (1, "o3"): 1000,
        (2, "gpt-4o"): 10_000,
    }
    assert list(sums) == sorted(sums)
    assert sums[1, "gpt-4o"] == (600, 30, 15, 3)  # quota, prompt and completion tokens, requests


@pytest.mark.parametrize("zone", ["Asia/Kolkata", "Asia/Kathmandu", "Pacific/Chatham", "America/New_York"])
def test_slots_on_either_side_of_a_local_midnight(zone: str) -> None:
    starts = day_starts(date(2026, 11, 1), 2, ZoneInfo(zone))
    slots = {(starts[1] - SLOT, "m"): spend(1), (starts[1], "m"): spend(2)}
    assert {key: quota for key, (quota, *_) in by_day_and_model(slots, starts).items()} == {(0, "m"): 1, (1, "m"): 2}


def test_refunds_make_quota_negative() -> None:
    starts = day_starts(date(2026, 6, 1), 1, ZoneInfo("UTC"))
    slots = {(starts[0], "gpt-4o"): (-500, 0, 0, 0), (starts[0] + SLOT, "gpt-4o"): spend(200)}
    assert by_day_and_model(slots, starts)[0, "gpt-4o"] == (-300, 10, 5, 1)


def test_no_slots_no_sums() -> None:
    assert by_day_and_model({}, day_starts(date(2026, 6, 1), 30, ZoneInfo("UTC"))) == {}
