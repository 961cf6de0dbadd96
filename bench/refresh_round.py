"""CPU one leader's refresh round costs this process, by what the round finds.

The refresher's rounds share a worker's core with its requests: at 10,000 hot tokens a round a
second is most of what a spread of tokens costs beyond a hot one (docs/performance.md). This
builds the benchmark's gateway database (10,000 tokens), starts a Redis server on loopback,
makes every token hot and drives the leader's rounds directly, measuring this process's CPU
time (the SQLite reading thread included; the Redis server's is not) for three kinds of round:

- steady: nothing changed and no record due to be rewritten (most rounds);
- rewrite: nothing changed, every record due to be rewritten to Redis (each record is, once
  every few rounds, to keep it from ageing out of the cache);
- 10% changed: a tenth of the tokens charged since the last round.

    .venv/bin/python bench/refresh_round.py [--rounds 15] [--tokens 10000]

Prints the median of each. Then the wall time of a round with a tenth charged on an event loop
kept saturated (`--busy N` callbacks of 75 µs each, always ready: a worker answering requests on
N connections as fast as it can), and how many passes of that loop the round waited: each await
of a round waits out a whole pass, so that count, not its CPU, is what makes a saturated worker's
rounds late. Compare two checkouts by running each one's copy in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import bench  # noqa: E402
from usage_service.app import create_app  # noqa: E402
from usage_service.cache import key_digest  # noqa: E402
from usage_service.config import Settings  # noqa: E402


async def cpu_ms(action: Callable[[], Awaitable[None]]) -> float:
    started = time.process_time()
    await action()
    return (time.process_time() - started) * 1000


async def measure(
    db: Path, tokens: list[tuple[int, str, int]], redis_url: str, rounds: int, busy_callbacks: int
) -> dict[str, float]:
    # A long interval: the rounds below are driven by hand, not by the refresher's own task.
    app = create_app(Settings(sqlite_path=db, redis_url=redis_url, refresh_interval=3600.0))
    async with app.router.lifespan_context(app):
        refresher, redis = app.state.refresher, app.state.redis
        await redis.hot_set.note({key_digest(key.encode()): token_id for token_id, key, _ in tokens}, time.time())
        for _ in range(2):  # the first sight of every token, then a round that finds them all written
            await refresher.tick()
        assert refresher.stats.leader and refresher.stats.tokens == len(tokens)
        writer = sqlite3.connect(db)
        charged = [(token_id,) for token_id, _, _ in tokens[::10]]

        async def rewrite() -> None:
            refresher._written.clear()  # as if every record's last write were half a TTL ago
            await refresher.tick()

        costs: dict[str, list[float]] = {"steady": [], "rewrite": [], "10% changed": []}
        for _ in range(rounds):
            costs["steady"].append(await cpu_ms(refresher.tick))
            costs["rewrite"].append(await cpu_ms(rewrite))
            with writer:  # the gateway's charges, outside the measured round
                writer.executemany("UPDATE tokens SET used_quota = used_quota + 1 WHERE id = ?", charged)
            costs["10% changed"].append(await cpu_ms(refresher.tick))
        medians = {kind: statistics.median(values) for kind, values in costs.items()}

        busy = Saturation(busy_callbacks, BUSY_CALLBACK_S)
        busy.start()
        walls, passes = [], []
        for _ in range(rounds):
            with writer:
                writer.executemany("UPDATE tokens SET used_quota = used_quota + 1 WHERE id = ?", charged)
            passes_before, started = busy.passes, time.perf_counter()
            await refresher.tick()
            walls.append((time.perf_counter() - started) * 1000)
            passes.append(busy.passes - passes_before)
        busy.stop()
        writer.close()
        medians["saturated wall"] = statistics.median(walls)
        medians["saturated passes"] = statistics.median(passes)
        return medians


BUSY_CALLBACK_S = 75e-6  # about what answering one poll costs a worker


class Saturation:
    """`count` callbacks that each take `cost` seconds and schedule themselves again: every pass
    of the event loop runs all of them, as a worker saturated by `count` connections does."""

    def __init__(self, count: int, cost: float) -> None:
        self.count, self.cost, self.running, self.passes = count, cost, False, 0

    def start(self) -> None:
        self.running = True
        for i in range(self.count):
            asyncio.get_running_loop().call_soon(self._step, i)

    def stop(self) -> None:
        self.running = False

    def _step(self, i: int) -> None:
        if not self.running:
            return
        if i == 0:
            self.passes += 1
        until = time.perf_counter() + self.cost
        while time.perf_counter() < until:
            pass
        asyncio.get_running_loop().call_soon(self._step, i)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--busy", type=int, default=200, help="callbacks keeping the loop saturated")
    parser.add_argument("--tokens", type=int, default=bench.TOKENS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        db = workdir / "one-api.db"
        tokens = bench.make_database(db)[: args.tokens]
        with bench.redis_server(workdir) as redis_url:
            medians = asyncio.run(measure(db, tokens, redis_url, args.rounds, args.busy))
    print(f"CPU per leader's round, {len(tokens):,} hot tokens (median of {args.rounds}):")
    for kind in ("steady", "rewrite", "10% changed"):
        print(f"  {kind:12} {medians[kind]:6.1f} ms")
    print(
        f"a round with 10% changed on a loop saturated by {args.busy} callbacks of"
        f" {BUSY_CALLBACK_S * 1e6:.0f} µs: {medians['saturated wall']:.0f} ms,"
        f" {medians['saturated passes']:.0f} passes of the loop"
    )


if __name__ == "__main__":
    main()
