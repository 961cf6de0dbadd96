"""What GET /api/log/token costs: per read of the database, and per second of polling.

    .venv/bin/python bench/log_route.py [--rows 1000000] [--postgres]

Fills a SQLite gateway log with `--rows` rows, one in ten of them the polled token's, and
measures the route in process (the app, its lifespan, an httpx client; no HTTP server):
- each answer read from the database (the one-second layer off): the first page of 10 and of
  100 with its count, the plain list of 1,000 rows, a deep page;
- polling: 200 requests for the same answer cost how many statements.
With --postgres, the same first pages on a PostgreSQL log (started on loopback as the tests
do), for a busy token and for a token whose rows are all old, with the gateway's indexes and
then with an index on logs (token_id, id). Bounded: about a minute. Figures vary with the
machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import httpx  # noqa: E402
from support import Gateway, Token  # noqa: E402

from usage_service.app import create_app  # noqa: E402
from usage_service.config import Settings  # noqa: E402

URL = "/api/log/token"
OTHER = '{"admin_info":{"use_channel":["3"]},"model_ratio":2.5,"completion_ratio":4,"cache_tokens":0}'
CASES = (
    ("page 1 of 10, with its count", "?p=1&page_size=10"),
    ("page 1 of 100, with its count", "?p=1&page_size=100"),
    ("plain list of 1,000 rows", ""),
    ("page 50 of 100, with its count", "?p=50&page_size=100"),
)


def fill_sqlite(gateway: Gateway, token: Token, other: Token, rows: int) -> None:
    sql = (
        "INSERT INTO logs (user_id, created_at, type, content, username, token_name, model_name, quota,"
        " prompt_tokens, completion_tokens, use_time, is_stream, channel_id, token_id, `group`, ip, other)"
        " VALUES (?, ?, 2, '', 'u', 't', 'gpt-4o', 100, 10, 5, 1, 0, 1, ?, 'default', '', ?)"
    )
    gateway.db.execute("BEGIN")
    for start in range(0, rows, 50_000):
        batch = [
            (1, 1_700_000_000 + i // 10, token.id if i % 10 == 0 else other.id, OTHER)
            for i in range(start, min(rows, start + 50_000))
        ]
        gateway.db.executemany(sql, batch)
    gateway.db.execute("COMMIT")


async def measure(settings: Settings, token: Token, cases: tuple[tuple[str, str], ...], runs: int = 30) -> None:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        endpoint: Any = app.exact[URL].endpoint
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            endpoint.answers.kept.ttl = 0.0  # every request reads the database
            for label, query in cases:
                times = []
                for _ in range(runs):
                    started = time.perf_counter()
                    response = await client.get(URL + query, headers=token.bearer)
                    times.append((time.perf_counter() - started) * 1000)
                    assert response.status_code == 200, response.text
                times.sort()
                print(
                    f"  {label:34s} median {statistics.median(times):7.2f} ms"
                    f"  p90 {times[int(len(times) * 0.9)]:7.2f} ms  ({len(response.content):,} bytes)"
                )
            endpoint.answers.kept.ttl = 1.0
            before = app.state.logs.statements
            started = time.perf_counter()
            polls = 0
            while polls < 200 and time.perf_counter() - started < 0.9:  # within the layer's second
                assert (await client.get(URL + "?p=1", headers=token.bearer)).status_code == 200
                polls += 1
            spent = app.state.logs.statements - before
            print(f"  polling: {polls} requests for one answer within a second cost {spent} statements")


def postgres(rows: int) -> None:
    from dbservers import PostgresGateway, PostgresServer

    server = PostgresServer()
    server.start()
    try:
        gateway = PostgresGateway(server, "new-api")
        conn: Any = gateway.conn
        conn.execute(
            """INSERT INTO logs (user_id, created_at, type, content, model_name, quota, prompt_tokens,
                 completion_tokens, is_stream, channel_id, token_id, "group", ip, other)
               SELECT 1, 1700000000 + g / 10, 2, '', 'gpt-4o', 100, 10, 5, false, 1,
                      CASE WHEN g %% 10 = 0 THEN 1 WHEN g <= %s AND g %% 10 = 1 THEN 2 ELSE 3 END,
                      'default', '', '{}'
               FROM generate_series(1, %s) AS g""",
            (rows // 20, rows),
        )
        conn.execute("ANALYZE logs")
        select = (
            "SELECT user_id, created_at, type, content, username, token_name, model_name, quota, prompt_tokens,"
            ' completion_tokens, use_time, is_stream, "group", ip, other FROM logs WHERE token_id = %s'
            " ORDER BY id DESC LIMIT %s"
        )
        for label in ("the gateway's indexes", "with an index on logs (token_id, id)"):
            if label.startswith("with"):
                conn.execute("CREATE INDEX idx_logs_token_id_id ON logs (token_id, id)")
                conn.execute("ANALYZE logs")
            print(f"PostgreSQL, {rows:,} rows, {label} (EXPLAIN ANALYZE execution time):")
            for token_id, who in ((1, "busy token, 1 row in 10"), (2, "idle token, all its rows old")):
                for limit in (10, 1000):
                    plan = [r[0] for r in conn.execute("EXPLAIN ANALYZE " + select, (token_id, limit)).fetchall()]
                    print(
                        f"  {who:30s} LIMIT {limit:<5d} {plan[-1].split(':')[1].strip():>12s}  {plan[1].strip()[:60]}"
                    )
        gateway.close()
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--postgres", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        gateway = Gateway(Path(directory) / "one-api.db")
        token, other = gateway.add_token(), gateway.add_token()
        started = time.perf_counter()
        fill_sqlite(gateway, token, other, args.rows)
        filled = time.perf_counter() - started
        print(f"SQLite, {args.rows:,} rows, the token's {args.rows // 10:,} (filled in {filled:.0f} s):")
        asyncio.run(measure(Settings(sqlite_path=gateway.path, refresh_interval=0), token, CASES))
        gateway.close()
    if args.postgres:
        postgres(args.rows)


if __name__ == "__main__":
    main()
