"""Kill Redis under load and bring it back: failed requests, waits, time to return to Redis.

    .venv/bin/python bench/faults/redis_outage.py [--down SECONDS] [--threads N]

Loopback only, bounded: N clients poll 20 tokens with default settings; Redis is killed for
--down seconds, started again, and polling goes on until the service caches through it again
(at most 30 s) and 2 s more. Needs redis-server (scripts/test installs it).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import redis
from _load import Poller
from support import Gateway, RedisServer, Service


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--down", type=float, default=10.0, help="seconds Redis stays dead (default 10)")
    parser.add_argument("--threads", type=int, default=4, help="polling clients (default 4)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="usage-outage-"))
    gateway = Gateway(tmp / "one-api.db")
    tokens = [gateway.add_token(used=i) for i in range(20)]
    server = RedisServer(tmp / "redis")
    server.start()
    env = {"SQLITE_PATH": str(gateway.path), "REDIS_CONN_STRING": server.url}  # default timeouts
    try:
        with Service(env) as service, Poller(service.url, tokens, range(20), args.threads) as load:
            load.phase("up")
            time.sleep(2)
            server.stop()
            load.phase("down")
            time.sleep(args.down)
            server.start()
            load.phase("restart")
            back = time.monotonic()
            with redis.Redis.from_url(server.url) as probe:
                while probe.dbsize() == 0:
                    assert time.monotonic() - back < 30, "the service did not return to Redis"
                    time.sleep(0.05)
            returned = time.monotonic() - back
            time.sleep(2)
        for phase in ("up", "down", "restart"):
            print(f"Redis {phase:<8} {load.result(phase).summary()}")
        print(f"Redis back: the service caches through it again after {returned:.1f} s")
    finally:
        server.stop()
        gateway.close()


if __name__ == "__main__":
    main()
