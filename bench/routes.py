"""The app's own cost per request on each short-path route, in process (no sockets, no server).

A polled token answered from the in-process layer, as in production between refreshes (and
the history and dated billing answers from theirs): this isolates what the route table, the
auth middleware and each endpoint cost, so a change to one route can be checked against the
others. One more row polls SPREAD tokens in turn on the usage route: what a poll costs when its
token's entry, record and answer are no longer in the CPU's caches. Figures are µs per
request, best and median of several rounds on one core; compare routes within one run.

    .venv/bin/python bench/routes.py [--requests N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from usage_service.app import create_app  # noqa: E402
from usage_service.config import Settings  # noqa: E402
from usage_service.demo import ensure_demo_db, new_key  # noqa: E402

ROUTES = (
    "/api/usage/token",
    "/v1/dashboard/billing/subscription",
    "/dashboard/billing/usage",
    "/api/usage/token/history",
    "/api/usage/token/history?tz=Europe/Berlin&group_by=day,model",
    "/v1/dashboard/billing/usage?start_date=2026-09-01&end_date=2026-10-01",
    "/api/usage/nothing",  # authenticated, then 404
)
SPREAD = 10_000  # tokens polled in turn on the last row
SPREAD_ROW = f"/api/usage/token, {SPREAD:,} tokens in turn"


def add_tokens(db: Path, count: int) -> list[str]:
    """Add `count` tokens to the demo database's first user; return their keys."""
    keys = [new_key() for _ in range(count)]
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO tokens (user_id, `key`, status, name, remain_quota, used_quota, expired_time)"
            " VALUES (1, ?, 1, 'spread', 1000000, 0, -1)",
            [(key,) for key in keys],
        )
    return keys


async def measure(db: Path, key: str, spread: list[str], requests: int, rounds: int) -> dict[str, list[float]]:
    settings = Settings(sqlite_path=db, cache_ttl=3600, local_ttl=3600, refresh_interval=0, options_interval=0)
    app = create_app(settings)
    headers = [(b"host", b"bench"), (b"authorization", b"Bearer sk-" + key.encode()), (b"accept", b"*/*")]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    def scope(route: str) -> dict[str, Any]:
        # What uvicorn hands the app for each request.
        path, _, query = route.partition("?")
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 3001),
            "app": app,
            "state": {},
        }

    def spread_scope(key: str) -> dict[str, Any]:
        credential = (b"authorization", b"Bearer sk-" + key.encode())
        return {**scope(ROUTES[0]), "headers": [headers[0], credential, headers[2]]}

    spread_scopes = [spread_scope(key) for key in spread]
    # Polled in an order other than the one their records were made in: in a server, a
    # token's neighbours in memory are not the next ones polled.
    asked = random.Random(1).sample(spread_scopes, len(spread_scopes))
    results: dict[str, list[float]] = {path: [] for path in (*ROUTES, SPREAD_ROW)}
    async with app.router.lifespan_context(app):
        for path in ROUTES:
            await app(scope(path), receive, send)  # warm the caches
        for each in spread_scopes:
            await app(dict(each), receive, send)
        for _ in range(rounds):
            for path in ROUTES:  # interleaved, so noise spreads over every route alike
                started = time.perf_counter()
                for _ in range(requests):
                    await app(scope(path), receive, send)
                results[path].append((time.perf_counter() - started) / requests * 1e6)
            started = time.perf_counter()
            for i in range(requests):
                await app(dict(asked[i % len(asked)]), receive, send)
            results[SPREAD_ROW].append((time.perf_counter() - started) / requests * 1e6)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000, help="requests per route per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "gateway.db"
        key = ensure_demo_db(db)
        results = asyncio.run(measure(db, key, add_tokens(db, SPREAD), args.requests, args.rounds))
    print(f"{'route':72} {'best µs':>8} {'median µs':>10}")
    for path, figures in results.items():
        print(f"{path:72} {min(figures):8.2f} {statistics.median(figures):10.2f}")


if __name__ == "__main__":
    main()
