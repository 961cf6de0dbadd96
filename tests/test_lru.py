"""Plain dicts as least-recently-used maps (_lru.py): what a shrink keeps."""

from __future__ import annotations

import gc

from usage_service._lru import keep_newest


def test_a_map_within_its_size_is_kept_as_it_is() -> None:
    entries = {i: b"v" for i in range(10)}
    assert keep_newest(entries, 10) is entries


def test_past_its_size_the_newest_are_kept_in_order_a_tenth_below_it() -> None:
    entries: dict[int, bytes] = {}
    for i in range(1_000):
        entries[i] = b"%d" % i
    for i in (5, 3):  # used again: now the newest
        entries[i] = entries.pop(i)
    entries[1_000] = b"new"
    kept = keep_newest(entries, 1_000)
    assert list(kept) == [*range(103, 1_000), 5, 3, 1_000]  # 0-2, 4 and 6-102 went
    assert len(kept) == 900 and kept[5] == b"5"


def test_a_map_of_ints_and_bytes_is_no_work_for_the_garbage_collector() -> None:
    entries = {(token << 40) + day: b"day" for token in range(100) for day in range(30)}
    for _ in range(3):
        entries = keep_newest({**entries, len(entries) << 40: b"more"}, 2_000)
    assert not gc.is_tracked(entries)
