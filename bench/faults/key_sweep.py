"""Sweep distinct keys through the real process and watch its memory: RSS before and after.

    .venv/bin/python bench/faults/key_sweep.py [--keys 1000000] [--connections 32] [--max-seconds 1800]

Loopback only, bounded (stops after --keys requests or --max-seconds). Builds a gateway
database holding half the keys as tokens, starts redis-server and usage-service (defaults,
limiter on, 127.0.0.1 trusted as a proxy), then sends every key once — valid and invalid
alternating, each request from its own X-Forwarded-For address, so the in-process layer, the
negative cache, the refresher's hot set and the limiter all see a new entry per request.
Prints RSS (current and peak) before, during and after, and Redis's memory.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import sys
import tempfile
import time
from pathlib import Path

import redis
from _load import URL, rss_mib
from support import Gateway, RedisServer, Service

from usage_service.demo import new_key


async def sweep(port: int, keys: list[str], connections: int, deadline: float, report: object) -> dict[int, int]:
    statuses: dict[int, int] = {}
    counter = itertools.count()
    first = int(ipaddress.IPv4Address("10.0.0.0"))

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < deadline:
                i = next(counter)
                if i >= len(keys):
                    return
                address = ipaddress.IPv4Address(first + i)
                writer.write(
                    f"GET {URL} HTTP/1.1\r\nHost: sweep\r\nAuthorization: Bearer sk-{keys[i]}\r\n"
                    f"X-Forwarded-For: {address}\r\n\r\n".encode()
                )
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                statuses[status] = statuses.get(status, 0) + 1
                if i and i % 100_000 == 0:
                    report(i)  # type: ignore[operator]
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    return statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1_000_000, help="distinct keys to send (default 1,000,000)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="stop sending after this long")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the service (repeatable)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    tmp = Path(tempfile.mkdtemp(prefix="usage-sweep-"))
    gateway = Gateway(tmp / "one-api.db")
    started = time.monotonic()
    valid = gateway.add_tokens(args.keys // 2)
    invalid = [new_key() for _ in range(args.keys - len(valid))]
    keys = [k for pair in itertools.zip_longest(valid, invalid) for k in pair if k is not None]
    print(f"database: {len(valid):,} tokens in {time.monotonic() - started:.0f} s; {len(invalid):,} unknown keys")
    server = RedisServer(tmp / "redis")
    server.start()
    env = {"SQLITE_PATH": str(gateway.path), "REDIS_CONN_STRING": server.url, "USAGE_TRUSTED_PROXIES": "127.0.0.1"}
    env |= dict(item.split("=", 1) for item in args.env)
    try:
        with Service(env, "--log-level", "warning") as service:
            pid = service.process.pid

            def report(done: int) -> None:
                rss, peak = rss_mib(pid)
                rate = done / (time.monotonic() - began)
                print(f"  {done:>9,} keys  RSS {rss:6.1f} MiB  peak {peak:6.1f} MiB  {rate:,.0f} req/s", flush=True)

            import httpx

            httpx.get(service.url + URL, headers={"Authorization": f"Bearer sk-{valid[0]}"})
            rss, _ = rss_mib(pid)
            print(f"before: RSS {rss:.1f} MiB (pid {pid}, 1 worker, settings {args.env or 'defaults'})")
            began = time.monotonic()
            statuses = asyncio.run(sweep(service.port, keys, args.connections, began + args.max_seconds, report))
            elapsed = time.monotonic() - began
            rss, peak = rss_mib(pid)
            sent = sum(statuses.values())
            print(
                f"after:  RSS {rss:.1f} MiB, peak {peak:.1f} MiB; {sent:,} keys in {elapsed:.0f} s, statuses {statuses}"
            )
            time.sleep(10)
            rss, peak = rss_mib(pid)
            print(f"10 s later: RSS {rss:.1f} MiB")
            with redis.Redis.from_url(server.url) as probe:
                info = probe.info("memory")
                print(f"redis: {probe.dbsize():,} keys, {info['used_memory_human']}")
    finally:
        server.stop()
        gateway.close()


if __name__ == "__main__":
    main()
