"""Shared by the fault scripts: the test suite's helpers on the path, a threaded poller, RSS."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import httpx  # noqa: E402
from support import Token  # noqa: E402

URL = "/api/usage/token"


@dataclass
class Tally:
    requests: int = 0
    failed: int = 0  # anything but a 200 with the right numbers, or no answer at all
    waits: list[float] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.requests += other.requests
        self.failed += other.failed
        self.waits += other.waits

    def summary(self) -> str:
        waits = sorted(self.waits) or [0.0]
        p99 = waits[min(len(waits) - 1, int(len(waits) * 0.99))]
        return (
            f"{self.requests:,} requests, {self.failed} failed, "
            f"p99 {p99 * 1000:.0f} ms, slowest {waits[-1] * 1000:.0f} ms"
        )


class Poller:
    """`threads` clients polling `tokens` round and round; `phase(name)` starts a new tally."""

    def __init__(self, base_url: str, tokens: Sequence[Token], expected: Sequence[int], threads: int = 4) -> None:
        self.base_url = base_url
        self.tokens = tokens
        self.expected = expected
        self.tallies: dict[str, list[Tally]] = {}
        self._phase = "start"
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def phase(self, name: str) -> None:
        self._phase = name

    def __enter__(self) -> Poller:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def result(self, name: str) -> Tally:
        total = Tally()
        for tally in self.tallies.get(name, []):
            total.add(tally)
        return total

    def _run(self, offset: int) -> None:
        mine: dict[str, Tally] = {}
        with httpx.Client(base_url=self.base_url, timeout=30) as client:
            i = offset
            while not self._stop.is_set():
                token, expected = self.tokens[i % len(self.tokens)], self.expected[i % len(self.tokens)]
                i += 1
                phase = self._phase
                tally = mine.get(phase)
                if tally is None:
                    tally = mine[phase] = Tally()
                    self.tallies.setdefault(phase, []).append(tally)
                started = time.monotonic()
                try:
                    response = client.get(URL, headers=token.bearer)
                    ok = response.status_code == 200 and response.json()["data"]["total_used"] == expected
                except httpx.HTTPError:
                    ok = False
                tally.waits.append(time.monotonic() - started)
                tally.requests += 1
                tally.failed += not ok


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of a process, in MiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value.split()
    return int(fields["VmRSS"][0]) / 1024, int(fields["VmHWM"][0]) / 1024
