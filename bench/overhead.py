"""Microseconds per hot-path request, in process, with each operator feature on and off.

Drives the ASGI app directly (no sockets, no HTTP parsing) with one token answered from the
in-process layer, so what differs between configurations is the cost of the feature itself.
It measures this process's CPU time (a shared machine's other load counts less) and reports
the best of several rounds over every configuration:

    .venv/bin/python bench/overhead.py [--requests 20000] [--repeat 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging.config
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from usage_service import logs  # noqa: E402
from usage_service.app import create_app  # noqa: E402
from usage_service.config import Settings  # noqa: E402
from usage_service.demo import GATEWAY_SCHEMA, new_key  # noqa: E402

CONFIGS: dict[str, tuple[dict[str, Any], list[tuple[bytes, bytes]]]] = {
    # name: (settings, extra request headers)
    "metrics off, CORS off": ({"metrics": False, "cors_origins": ()}, []),
    "metrics on": ({"cors_origins": ()}, []),
    "CORS * (no Origin)": ({"metrics": False}, []),
    "defaults: metrics on, CORS *": ({}, []),
    "defaults, with Origin": ({}, [(b"origin", b"https://dash.example")]),
    "defaults, CORS list, with Origin": (
        {"cors_origins": ("https://dash.example",)},
        [(b"origin", b"https://dash.example")],
    ),
    "defaults + access log (text)": ({"access_log": True}, []),
    "defaults + access log (JSON)": ({"access_log": True, "log_format": "json"}, []),
}


def hot_scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """The ASGI scope of a poll of /api/usage/token with these headers (besides host)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/api/usage/token",
        "raw_path": b"/api/usage/token",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:3001"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 3001),
    }


def hot_database(db: Path) -> str:
    """Write a gateway database with one usable token; return its key."""
    key = new_key()
    conn = sqlite3.connect(db)
    conn.executescript(GATEWAY_SCHEMA)
    conn.execute("INSERT INTO users (id, username, password, status, quota) VALUES (1, 'u', '!', 1, 0)")
    conn.execute(
        "INSERT INTO tokens (user_id, `key`, status, name, created_time, accessed_time, expired_time,"
        " remain_quota, used_quota, unlimited_quota) VALUES (1, ?, 1, 'bench', 0, 0, -1, 1000, 0, 0)",
        (key,),
    )
    conn.commit()
    conn.close()
    return key


async def per_request_us(settings: Settings, headers: list[tuple[bytes, bytes]], requests: int, repeat: int) -> float:
    app = create_app(settings)
    scope = hot_scope([(b"user-agent", b"bench"), *headers])

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    statuses = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    best = float("inf")
    async with app.router.lifespan_context(app):
        for _ in range(requests // 10):  # warm-up
            await app(dict(scope), receive, send)
        for _ in range(repeat):
            started = time.process_time()
            for _ in range(requests):
                await app(dict(scope), receive, send)
            best = min(best, (time.process_time() - started) / requests)
    assert set(statuses) == {200}, set(statuses)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "one-api.db"
        key = hot_database(db)
        base = Settings(sqlite_path=db, refresh_interval=0, local_ttl=5)
        # Access lines go to a real file, as they would under a supervisor.
        log_file = open(Path(tmp) / "access.log", "w")  # noqa: SIM115
        stdout, sys.stdout = sys.stdout, log_file
        best = dict.fromkeys(CONFIGS, float("inf"))
        try:
            # Rounds over every configuration, best of each: drift on the machine hits them all.
            for round_ in range(args.rounds):
                for name, (overrides, headers) in CONFIGS.items():
                    settings = dataclasses.replace(base, **overrides)
                    logging.config.dictConfig(logs.uvicorn_config("warning", settings.log_format))
                    auth = [(b"authorization", b"Bearer sk-" + key.encode())]
                    us = asyncio.run(per_request_us(settings, [*auth, *headers], args.requests, args.repeat))
                    best[name] = min(best[name], us)
                    print(f"round {round_ + 1}  {name:36} {us:6.2f} µs/request", file=stdout, flush=True)
        finally:
            sys.stdout = stdout
            log_file.close()
    results = list(best.items())
    base_us = results[0][1]
    print("\n| configuration | µs per request | + µs |\n|---|---:|---:|")
    for name, us in results:
        print(f"| {name} | {us:.2f} | {us - base_us:+.2f} |")
    print(f"\n(python {sys.version.split()[0]}, pid {os.getpid()})")


if __name__ == "__main__":
    main()
