"""What the cache's Redis calls cost on each topology: batched record reads and write-behind.

    .venv/bin/python bench/redis_topologies.py [--records N] [--rounds R] [--concurrency C]

In process, loopback only, bounded: starts a standalone redis-server, a Sentinel group (master,
replica, three sentinels) and a three-master Cluster with the test suite's helpers, fills each
with N records, then per round reads them all through `RedisRecords` (C concurrent readers,
coalesced into MGETs; one MGET per slot on Cluster) and writes them all behind (Lua scripts;
one per slot on Cluster). Prints records per second, median and best of the rounds; compare
topologies within one run (the machine is shared and noisy). Needs redis-server,
redis-sentinel and redis-cli.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent)]

from redis_topologies import RedisClusterNodes, RedisTopology, SentinelGroup  # noqa: E402
from support import RedisServer  # noqa: E402

from usage_service._circuit import CircuitBreaker  # noqa: E402
from usage_service._redis_guard import RedisGuard  # noqa: E402
from usage_service.cache import RedisRecords  # noqa: E402
from usage_service.config import Settings  # noqa: E402
from usage_service.redis_client import create_client  # noqa: E402

VALUE = b'[2,1700000000.0,"a token record of about the usual size, padded to look like one",1,2,3]'


async def one_round(topology: RedisTopology, digests: list[bytes], concurrency: int) -> tuple[float, float]:
    settings = Settings(redis_url=topology.url, redis_timeout=5.0, **topology.mode_settings)
    guard = RedisGuard(create_client(settings), timeout=5.0, breaker=CircuitBreaker(3, 5))
    cache = RedisRecords(guard, prefix="bench:tok:", requested_key="bench:requested")
    try:
        started = time.perf_counter()
        for digest in digests:
            cache.write(digest, VALUE, 600)
        while cache._writer is not None:
            await asyncio.sleep(0.001)
        writes = len(digests) / (time.perf_counter() - started)

        pending = iter(digests)

        async def reader() -> None:
            for digest in pending:
                if await cache._reads.load(digest) is None:
                    raise RuntimeError("a record written in this round is missing")

        started = time.perf_counter()
        await asyncio.gather(*(reader() for _ in range(concurrency)))
        reads = len(digests) / (time.perf_counter() - started)
        if guard.errors:
            raise RuntimeError(f"{guard.errors} Redis errors")
        return reads, writes
    finally:
        await cache.close()
        await guard.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="usage-topologies-"))
    standalone = RedisServer(tmp / "standalone")
    sentinel = SentinelGroup(tmp / "sentinel")
    cluster = RedisClusterNodes(tmp / "cluster")
    servers: list[Any] = []
    try:
        for server in (standalone, sentinel, cluster):
            server.start()
            servers.append(server)
        topologies = [
            RedisTopology("standalone", standalone.url),
            sentinel.topology(),
            cluster.topology(),
        ]
        print(f"{args.records:,} records, {args.concurrency} concurrent readers, {args.rounds} rounds")
        print(f"{'topology':<11} {'reads/s median':>15} {'best':>9} {'writes/s median':>16} {'best':>9}")
        for topology in topologies:
            rounds = [
                asyncio.run(one_round(topology, [os.urandom(32) for _ in range(args.records)], args.concurrency))
                for _ in range(args.rounds)
            ]
            reads, writes = [r[0] for r in rounds], [r[1] for r in rounds]
            print(
                f"{topology.name:<11} {statistics.median(reads):>15,.0f} {max(reads):>9,.0f}"
                f" {statistics.median(writes):>16,.0f} {max(writes):>9,.0f}"
            )
    finally:
        for server in reversed(servers):
            server.stop()


if __name__ == "__main__":
    main()
