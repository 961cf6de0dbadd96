"""Make Redis silent (a black hole) or slow behind a TCP proxy, under load: waits and the circuit.

    .venv/bin/python bench/faults/redis_blackhole.py [--mode black-hole|slow] [--seconds S] [--every-request]

Loopback only, bounded: N clients poll 20 tokens through the real process, whose Redis is a
TCP proxy in front of a real redis-server. For --seconds the proxy drops everything
(black-hole) or holds every chunk for 1 s (slow); then it heals. Prints the waits per phase
and when the circuit opened and closed. --every-request turns off the in-process layer and
the refresher, so that every request asks Redis (the worst case for waits).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _load import Poller
from support import Gateway, RedisServer, Service
from tcpproxy import TCPProxy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["black-hole", "slow"], default="black-hole")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long Redis misbehaves (default 10)")
    parser.add_argument("--threads", type=int, default=4, help="polling clients (default 4)")
    parser.add_argument("--every-request", action="store_true", help="no in-process layer, no refresher")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="usage-blackhole-"))
    gateway = Gateway(tmp / "one-api.db")
    tokens = [gateway.add_token(used=i) for i in range(20)]
    server = RedisServer(tmp / "redis")
    server.start()
    try:
        with TCPProxy(("127.0.0.1", server.port)) as proxy:
            env = {"SQLITE_PATH": str(gateway.path), "REDIS_CONN_STRING": proxy.url}  # default timeouts
            if args.every_request:
                env |= {"USAGE_LOCAL_TTL": "0", "USAGE_REFRESH_INTERVAL": "0"}
            with Service(env) as service, Poller(service.url, tokens, range(20), args.threads) as load:
                load.phase("healthy")
                time.sleep(2)
                if args.mode == "black-hole":
                    proxy.black_hole()
                else:
                    proxy.delay(1.0)
                broke = time.monotonic()
                load.phase(args.mode)
                opened = None
                while time.monotonic() - broke < args.seconds:
                    if opened is None and "redis unavailable" in service.output():
                        opened = time.monotonic() - broke
                    time.sleep(0.02)
                proxy.heal()
                healed = time.monotonic()
                load.phase("healed")
                closed = None
                while closed is None and time.monotonic() - healed < 30:
                    if "redis is back" in service.output():
                        closed = time.monotonic() - healed
                    time.sleep(0.02)
                time.sleep(1)
        setting = "every request asks Redis" if args.every_request else "default settings"
        print(f"USAGE_REDIS_TIMEOUT 0.25 s, USAGE_REDIS_COOLDOWN 5 s, {args.threads} clients, {setting}")
        for phase in ("healthy", args.mode, "healed"):
            print(f"{phase:<10} {load.result(phase).summary()}")
        print(f"circuit opened {_seconds(opened)} after the fault, closed {_seconds(closed)} after it healed")
    finally:
        server.stop()
        gateway.close()


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


if __name__ == "__main__":
    main()
