"""Kill Redis under polling and bring it back: failed requests, slowest answer, time to recover.

    .venv/bin/python bench/redis_outage.py [--down SECONDS]

Loopback only, bounded: 20 tokens polled in a loop for --down seconds with Redis dead.
Uses the test suite's stand-in gateway and redis-server helpers; needs redis-server.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent)]

import httpx  # noqa: E402
import redis  # noqa: E402
from support import Gateway, RedisServer, Service  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--down", type=float, default=10.0, help="seconds Redis stays dead (default 10)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="usage-outage-"))
    gateway = Gateway(tmp / "one-api.db")
    tokens = [gateway.add_token(used=i) for i in range(20)]
    server = RedisServer(tmp / "redis")
    server.start()
    env = {"SQLITE_PATH": str(gateway.path), "REDIS_CONN_STRING": server.url}  # default timeouts
    try:
        with Service(env) as service, httpx.Client(base_url=service.url) as client:

            def poll() -> tuple[float, int, int]:
                slowest, failed = 0.0, 0
                for token in tokens:
                    started = time.monotonic()
                    response = client.get("/api/usage/token", headers=token.bearer)
                    slowest = max(slowest, time.monotonic() - started)
                    failed += response.status_code != 200
                return slowest, failed, len(tokens)

            poll()
            server.stop()
            slowest, failed, total = 0.0, 0, 0
            deadline = time.monotonic() + args.down
            while time.monotonic() < deadline:
                s, f, n = poll()
                slowest, failed, total = max(slowest, s), failed + f, total + n
            print(f"Redis dead {args.down:.0f} s: {total} requests, {failed} not 200, slowest {slowest * 1000:.0f} ms")
            server.start()
            back = time.monotonic()
            probe = redis.Redis.from_url(server.url)
            while probe.dbsize() == 0:
                assert time.monotonic() - back < 30, "the service did not return to Redis"
                poll()
                time.sleep(0.05)
            probe.close()
            print(f"Redis back: the service caches through it again after {time.monotonic() - back:.1f} s")
    finally:
        server.stop()
        gateway.close()


if __name__ == "__main__":
    main()
