"""Instructions per hot-path request, in process, counted by valgrind (callgrind).

Timings on a shared machine move by tens of percent from one minute to the next; instruction
counts do not. This drives the ASGI app directly (no sockets) with one token answered from the
in-process layer, twice under callgrind with different request counts, and prints the
difference per request: what the app's own code costs, repeatable to a few instructions.

    .venv/bin/python bench/instructions.py [--requests 5000] [--metrics on|off] [--cors on|off] [--budget N]

Needs valgrind (Debian package). Compare two checkouts by running each one's copy. The hot
path's budget: with the defaults (metrics and CORS on), a count past BUDGET exits 1, so a change
that makes every poll dearer fails here rather than in production.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from overhead import hot_database, hot_scope  # noqa: E402

# Instructions per hot request the app may cost (metrics and CORS on, python 3.11): 40,786 and
# 41,060 were counted in the last changes to the request path, and about 5 % is left for the
# next; raise it only with the reason in the commit that does.
BUDGET = 43_000

from usage_service.app import create_app  # noqa: E402
from usage_service.config import Settings  # noqa: E402

WARM_UP = 200


async def drive(db: Path, key: str, requests: int, metrics: bool, cors: bool) -> None:
    """Answer `requests` polls of one token from the in-process layer (after a warm-up)."""
    settings = Settings(
        sqlite_path=db, refresh_interval=0, local_ttl=600, metrics=metrics, cors_origins=("*",) if cors else ()
    )
    app = create_app(settings)
    scope = hot_scope([(b"authorization", b"Bearer sk-" + key.encode())])
    statuses: set[int] = set()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.add(message["status"])

    async with app.router.lifespan_context(app):
        for _ in range(WARM_UP + requests):
            await app(dict(scope), receive, send)
    assert statuses == {200}, statuses


def count(args: argparse.Namespace, db: Path, key: str, requests: int, workdir: Path) -> int:
    """Total instructions of one process answering `requests` polls."""
    out = workdir / f"callgrind.{requests}"
    command = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
        __file__,
        "--child",
        str(db),
        key,
        str(requests),
        args.metrics,
        args.cors,
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = re.search(rb"^summary: (\d+)", out.read_bytes(), re.MULTILINE)
    assert summary is not None, "no summary line in the callgrind output"
    return int(summary.group(1))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        db, key, requests, metrics, cors = sys.argv[2:7]
        asyncio.run(drive(Path(db), key, int(requests), metrics == "on", cors == "on"))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--metrics", choices=["on", "off"], default="on")
    parser.add_argument("--cors", choices=["on", "off"], default="on")
    parser.add_argument("--budget", type=int, default=BUDGET, help="exit 1 past this many (default: %(default)s)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("bench/instructions.py: valgrind is needed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        db = workdir / "one-api.db"
        key = hot_database(db)
        few = count(args, db, key, 1000, workdir)
        many = count(args, db, key, 1000 + args.requests, workdir)
    per_request = (many - few) / args.requests
    print(
        f"{per_request:,.0f} instructions per hot request in process "
        f"(metrics {args.metrics}, CORS {args.cors}; python {sys.version.split()[0]}, pid {os.getpid()})"
    )
    if per_request > args.budget:
        sys.exit(f"over the hot path's budget of {args.budget:,} instructions per request")


if __name__ == "__main__":
    main()
