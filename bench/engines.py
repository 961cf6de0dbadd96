"""What a database lookup costs on each engine, through the store the service uses.

    .venv/bin/python bench/engines.py [--tokens 10000]

Needs what `bash scripts/test` installs (postgresql, mariadb-server, the test extra). Starts a
PostgreSQL and a MariaDB server on loopback (as the tests do), fills each engine's gateway
tables with the same tokens, and measures through each engine's store:
- a miss: one key fetched alone, one after another (latency);
- a burst of misses: every key fetched at once (batched into shared statements);
- a refresher round: every id re-read with fetch_many, in statements of 1,000.
Bounded: a few seconds per engine. Figures vary with the machine; compare engines within a run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from dbservers import MariaDBServer, MySQLGateway, PostgresGateway, PostgresServer  # noqa: E402
from support import Gateway  # noqa: E402

from usage_service.config import Settings  # noqa: E402
from usage_service.demo import new_key  # noqa: E402
from usage_service.store import open_store  # noqa: E402

COLUMNS = (
    "user_id, `key`, status, name, created_time, accessed_time, expired_time, remain_quota, used_quota,"
    " unlimited_quota, model_limits_enabled, model_limits"
)


def fill(gateway: Gateway, engine: str, count: int) -> tuple[list[str], list[int]]:
    """Insert `count` tokens in bulk; return their keys and ids."""
    user = gateway.add_user()
    keys = [new_key() for _ in range(count)]
    false: object = False if engine == "postgres" else 0
    rows = [(user, key, 1, f"t{i}", 0, 0, -1, 1000, i, false, false, "") for i, key in enumerate(keys)]
    if engine == "sqlite":
        gateway.db.executemany(f"INSERT INTO tokens ({COLUMNS}) VALUES ({', '.join('?' * 12)})", rows)
        ids = [row[0] for row in gateway.db.execute("SELECT id FROM tokens ORDER BY id")]
    else:
        quoted = COLUMNS.replace("`", '"') if engine == "postgres" else COLUMNS
        conn = gateway.conn  # type: ignore[attr-defined]
        with conn.cursor() as cursor:
            cursor.executemany(f"INSERT INTO tokens ({quoted}) VALUES ({', '.join(['%s'] * 12)})", rows)
            cursor.execute("SELECT id FROM tokens ORDER BY id")
            ids = [row[0] for row in cursor.fetchall()]
            # A live gateway's tables have planner statistics; fresh ones get them now.
            cursor.execute("ANALYZE tokens" if engine == "postgres" else "ANALYZE TABLE tokens")
            if engine == "mysql":
                cursor.fetchall()
    return keys, ids


async def measure(settings: Settings, keys: list[str], ids: list[int]) -> dict[str, float]:
    store = await open_store(settings)
    try:
        sample = keys[: min(2000, len(keys))]
        latencies = []
        for key in sample:
            started = time.perf_counter()
            assert await store.fetch(key) is not None
            latencies.append(time.perf_counter() - started)
        latencies.sort()

        burst = keys[-min(2000, len(keys)) :]
        before = store.statements
        started = time.perf_counter()
        found = await asyncio.gather(*(store.fetch(key) for key in burst))
        burst_seconds = time.perf_counter() - started
        assert all(found)
        burst_statements = store.statements - before

        rounds = []
        for _ in range(5):
            started = time.perf_counter()
            assert len(await store.fetch_many(ids)) == len(ids)
            rounds.append(time.perf_counter() - started)
    finally:
        await store.close()
    return {
        "miss_p50_ms": 1000 * latencies[len(latencies) // 2],
        "miss_p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
        "burst_keys_per_s": len(burst) / burst_seconds,
        "burst_statements": burst_statements,
        "round_first_ms": 1000 * rounds[0],
        "round_median_ms": 1000 * statistics.median(rounds[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=10_000)
    args = parser.parse_args()
    postgres, mariadb = PostgresServer(), MariaDBServer()
    postgres.start()
    mariadb.start()
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for engine in ("sqlite", "postgres", "mysql"):
                if engine == "sqlite":
                    gateway: Gateway = Gateway(Path(tmp) / "one-api.db")
                elif engine == "postgres":
                    gateway = PostgresGateway(postgres, "new-api")
                else:
                    gateway = MySQLGateway(mariadb, "new-api")
                keys, ids = fill(gateway, engine, args.tokens)
                settings = Settings(sqlite_path=gateway.path, database=gateway.database)  # type: ignore[arg-type]
                results[engine] = asyncio.run(measure(settings, keys, ids))
                gateway.close()
    finally:
        postgres.stop()
        mariadb.stop()
    print(f"{args.tokens:,} tokens; USAGE_DB_POOL_SIZE=4; one process, loopback\n")
    print("| engine | miss p50 ms | miss p99 ms | 2,000 concurrent misses: keys/s (statements) | refresh round ms |")
    print("|---|---:|---:|---:|---:|")
    for engine, r in results.items():
        print(
            f"| {engine} | {r['miss_p50_ms']:.2f} | {r['miss_p99_ms']:.2f} | "
            f"{r['burst_keys_per_s']:,.0f} ({r['burst_statements']:.0f}) | "
            f"{r['round_first_ms']:.0f} first, {r['round_median_ms']:.0f} then |"
        )


if __name__ == "__main__":
    main()
