"""Plain dicts used as least-recently-used maps, and how to shrink them.

A dict keeps insertion order, so re-inserting an entry (pop, then set) makes it the newest, and
a dict of ints, bytes and the like is not tracked by the garbage collector at all, where an
OrderedDict always is (every full collection then visits each member). What a dict lacks is a
cheap way to drop its oldest entry: `next(iter(d))` scans past every slot that earlier
deletions left at its front, so dropping entries one at a time is quadratic. They are dropped
in bulk instead, by one pass that copies the newest ones.
"""

from __future__ import annotations

import itertools
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def keep_newest(entries: dict[K, V], size: int) -> dict[K, V]:
    """`entries` while it holds at most `size`; past that, a new dict of its newest entries,
    a tenth of `size` fewer (so that the copy is made once per that many insertions)."""
    if len(entries) <= size:
        return entries
    keep = size - size // 10
    return dict(itertools.islice(entries.items(), len(entries) - keep, None))
