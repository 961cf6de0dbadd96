"""What the operators' features cost on the hot path: hot polling with each one on and off.

Runs usage-service (1 worker, Redis, pinned like bench/bench.py) under the "hot" load (or
"spread": 10,000 tokens in rotation, whose refresher rounds run on the measured core) in
alternating rounds, so that drift on a shared machine spreads over every configuration:

    .venv/bin/python bench/features.py [--seconds 5] [--rounds 3] [--load hot|spread] [--baseline DIR_OF_OTHER_CHECKOUT]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench import LOADS, Process, Scenario, flush_redis, make_database, redis_server, service_command

CONFIGS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    # name: (service environment, extra wrk headers)
    "metrics off, CORS off": ({"USAGE_METRICS": "off", "USAGE_CORS_ORIGINS": "off"}, {}),
    "defaults (metrics on, CORS *)": ({}, {}),
    "defaults, request with Origin": ({}, {"Origin": "https://dash.example"}),
    "defaults + access log": ({"USAGE_ACCESS_LOG": "on"}, {}),
    "defaults + JSON access log": ({"USAGE_ACCESS_LOG": "on", "USAGE_LOG_FORMAT": "json"}, {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--load", choices=["hot", "spread"], default="hot")
    parser.add_argument("--only", action="append", help="run only configurations whose name contains this")
    parser.add_argument("--baseline", type=Path, help="also run the usage_service package found in this directory")
    args = parser.parse_args()
    configs = {k: v for k, v in CONFIGS.items() if not args.only or any(o in k for o in args.only)}
    if args.baseline:
        configs = {f"baseline {args.baseline}": ({"PYTHONPATH": str(args.baseline.resolve())}, {}), **configs}

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        db = work / "one-api.db"
        tokens = make_database(db)
        keys = work / "keys.txt"
        keys.write_text("\n".join(key for _, key, _ in tokens) + "\n")
        scenario = Scenario(work, keys, tokens[0][1])
        rps: dict[str, list[float]] = {name: [] for name in configs}
        with redis_server(work) as redis_url:
            for round_ in range(args.rounds):
                for name, (env, headers) in configs.items():
                    flush_redis(redis_url)
                    server = Process(
                        "usage-service",
                        service_command(workers=1),
                        {"SQLITE_PATH": str(db), "REDIS_CONN_STRING": redis_url, **env},
                        "/healthz",
                    )
                    extra = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items())
                    LOADS["load+"] = LOADS[args.load] + extra
                    try:
                        # Warmed up until every token of the spread is in the refresher's rounds.
                        scenario.wrk(server, "load+", 1 if args.load == "hot" else 4)
                        result = scenario.wrk(server, "load+", args.seconds)
                    finally:
                        server.stop()
                    rps[name].append(result.rps)
                    print(f"round {round_ + 1}  {name:32} {result.rps:9.0f} req/s", flush=True)
    base = statistics.median(next(iter(rps.values())))
    print("\n| configuration | req/s (median) | × first |\n|---|---:|---:|")
    for name, values in rps.items():
        median = statistics.median(values)
        print(f"| {name} | {median:,.0f} | {median / base:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
