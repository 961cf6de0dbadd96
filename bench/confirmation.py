"""What a refresher confirmation costs a worker, by the number of records it holds in-process.

A confirmation arrives once per refresh interval on every worker; it moves one watermark, so its
cost must not grow with the in-process layer (walking 100,000 entries stalled the event loop for
tens of milliseconds every second). Run: `.venv/bin/python bench/confirmation.py` (a few seconds).
"""

from __future__ import annotations

import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from usage_service.cache import LocalCache  # noqa: E402

CALLS = 1000


def confirmation_cost(entries: int) -> float:
    """Seconds one confirmation takes with `entries` records held (best of three runs)."""
    cache: LocalCache[int] = LocalCache(entries)
    now = time.monotonic()
    for i in range(entries):
        cache.put(i.to_bytes(32, "big"), i, now + 1, hard_deadline=now + 60, generation=cache.generation)
    return min(timeit.repeat(lambda: cache.confirm(time.monotonic() + 5), number=CALLS, repeat=3)) / CALLS


def main() -> None:
    print("| records in-process | one confirmation |")
    print("|---:|---:|")
    for entries in (1_000, 10_000, 100_000):
        print(f"| {entries:,} | {confirmation_cost(entries) * 1e6:.2f} µs |")


if __name__ == "__main__":
    main()
