"""usage-service against each HTTP server's ceiling and a naive peer, on loopback, in one run.

Run through `bash bench/run` (it installs wrk and redis-server if missing). Prints and writes
to bench/results/: a table per server and load, the issue's targets (the service on uvicorn and
on granian against that server's own raw-ASGI ceiling, CPU per hot poll), a latency-versus-
throughput chart, and the refresher's freshness and database cost under paced polling of
10,000 tokens.

The servers: "ceiling" is a raw ASGI app answering the hot token's body with no work at all,
served by uvicorn exactly as the service is; "ceiling-granian" the same on granian; "naive" the
contract written plainly on Starlette; "usage-service" and "usage-service-granian" the service
on each server (`--server granian`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from usage_service.demo import GATEWAY_SCHEMA, new_key  # noqa: E402

TOKENS = 10_000
# At most this many 3-second passes before the freshness runs measure (see run_freshness).
WARM_PASSES = 10
COLD_KEYS = 100_000
CONNECTIONS = 50
SERVER_CORE, LOAD_CORE = "0", "1"
LOAD_NAMES = ("hot", "spread", "cold", "bad")
SERVER_NAMES = ("ceiling", "usage-service", "ceiling-granian", "usage-service-granian", "naive")
# Asked for by name only: the service on granian with its refresher off and records kept for 600 s
# in-process, which gives up the freshness bound: what the spread costs without refresh rounds.
DIAGNOSTIC_SERVERS = ("unrefreshed-granian",)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# --- wrk scripts -----------------------------------------------------------------------------

REPORT = """
done = function(summary, latency, requests)
  local f = io.open(os.getenv("WRK_REPORT"), "w")
  local e = summary.errors
  f:write(string.format('{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "non2xx": %d, '
    .. '"socket_errors": %d}', summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
  f:close()
end
"""

LOADS = {
    "hot": """
wrk.headers["Authorization"] = "Bearer sk-" .. os.getenv("WRK_KEY")
""",
    "spread": """
local keys = {}
for line in io.lines(os.getenv("WRK_KEYS")) do keys[#keys + 1] = "Bearer sk-" .. line end
local i = 0
request = function()
  i = i % #keys + 1
  return wrk.format(nil, nil, {["Authorization"] = keys[i]})
end
""",
    # Distinct unknown keys, each asked once (a server faster than 100,000 in the run wraps).
    "cold": """
local limit = tonumber(os.getenv("WRK_LIMIT"))
local offset = tonumber(os.getenv("WRK_OFFSET") or "0")
local i = 0
request = function()
  i = i % limit + 1
  return wrk.format(nil, nil, {["Authorization"] = string.format("Bearer sk-cold%044d", offset + i)})
end
""",
    "bad": """
local forms = {"Bearer sk-%d!", "Basic %d", "Bearer", "Token sk-%d", "Bearer sk-%d-%d-x", "Bearer a/%d"}
local i = 0
request = function()
  i = i + 1
  local form = forms[i % #forms + 1]
  return wrk.format(nil, nil, {["Authorization"] = string.format(form, i, i)})
end
""",
    # 10,000 tokens in rotation, each connection pausing so the total rate is WRK_RATE.
    "paced": """
local keys = {}
for line in io.lines(os.getenv("WRK_KEYS")) do keys[#keys + 1] = "Bearer sk-" .. line end
local pause = tonumber(os.getenv("WRK_PAUSE_MS"))
local i = 0
init = function(args) i = math.random(#keys) end
request = function()
  i = i % #keys + 1
  return wrk.format(nil, nil, {["Authorization"] = keys[i]})
end
delay = function() return pause end
""",
}


# --- fixtures --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(core: str) -> list[str]:
    """taskset prefix when the machine has the cores to keep server and load apart."""
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", core]
    return []


def make_database(path: Path) -> list[tuple[int, str, int]]:
    """A gateway database with TOKENS tokens across 1,000 users; returns (id, key, user_id)."""
    db = sqlite3.connect(path)
    db.executescript(GATEWAY_SCHEMA)
    db.executemany(
        "INSERT INTO users (id, username, password, status, quota) VALUES (?, ?, '!', 1, 0)",
        [(u, f"user{u}") for u in range(1, 1001)],
    )
    rows = [(i, new_key(), (i % 1000) + 1) for i in range(1, TOKENS + 1)]
    db.executemany(
        "INSERT INTO tokens (id, `key`, user_id, status, name, created_time, accessed_time, expired_time,"
        " remain_quota, used_quota, unlimited_quota, model_limits_enabled, model_limits)"
        " VALUES (?, ?, ?, 1, 'bench', 0, 0, -1, 10000000, 0, 0, 1, 'gpt-4o,o3')",
        rows,
    )
    db.commit()
    db.close()
    return rows


class Process:
    """A server process on a free port, with its peak RSS sampled on demand."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], health: str) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [part.replace("{port}", str(self.port)) for part in command]
        self.log = tempfile.TemporaryFile()
        # A session of its own: stopping it stops its workers too (see stop).
        self.process = subprocess.Popen(
            command, env={**os.environ, **env}, stdout=self.log, stderr=self.log, start_new_session=True
        )
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._kill()  # one that hangs at start is not left running
                self.log.seek(0)
                raise RuntimeError(f"{name} did not start:\n{self.log.read().decode(errors='replace')}")
            try:
                if httpx.get(self.url + health, timeout=1).status_code < 500:
                    break
            except httpx.TransportError:
                time.sleep(0.1)

    def pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        extra = [int(p) for p in children.read_text().split()] if children.exists() else []
        return [self.process.pid, *extra]

    def pause(self) -> None:
        """Stop the process and its workers (SIGSTOP): its background tasks take no CPU meanwhile."""
        for pid in self.pids():
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self.pids():
            os.kill(pid, signal.SIGCONT)

    def cpu_seconds(self) -> float:
        """User and system CPU time of the process and its workers so far."""
        ticks = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        return ticks / CLOCK_TICKS

    def rss_mib(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.resume()  # a paused process would not even hear SIGTERM
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            pass
        # Whatever is left of it: a worker whose server was killed, or did not wait for it, would
        # go on running (and taking CPU from every later measurement).
        self._kill()
        self.log.close()

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    port = free_port()
    command = [
        *pinned(SERVER_CORE),
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        import redis

        client = redis.Redis.from_url(url)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        process.kill()
        process.wait()


# --- measuring -------------------------------------------------------------------------------


@dataclass
class Result:
    server: str
    load: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: int
    db_per_s: float
    peak_rss_mib: float
    cpu_us_per_req: float
    # Ratios are taken round by round, each server against the one measured beside it in the
    # same round (a machine whose speed drifts between rounds then cancels out), and the median
    # round's ratio is reported.
    vs_ceiling: float | None = None
    # The same ratio from CPU per request: what one core of its own would give, which a
    # shared, noisy machine blurs far less than requests/s.
    vs_ceiling_cpu: float | None = None
    vs_naive: float | None = None
    # Every round's figures, in the order the rounds ran (the matrix only).
    round_rps: list[float] = field(default_factory=list)
    round_cpu_us: list[float] = field(default_factory=list)


class Scenario:
    def __init__(self, workdir: Path, keys_file: Path, hot_key: str) -> None:
        self.workdir = workdir
        self.keys_file = keys_file
        self.hot_key = hot_key

    def wrk(
        self,
        target: Process,
        load: str,
        seconds: float,
        connections: int = CONNECTIONS,
        db_count: Callable[[], int] = lambda: 0,
        extra_env: dict[str, str] | None = None,
        path: str = "/api/usage/token",
    ) -> Result:
        script = self.workdir / f"{load}.lua"
        script.write_text(LOADS[load] + REPORT)
        report = self.workdir / "report.json"
        report.unlink(missing_ok=True)
        env = {
            **os.environ,
            "WRK_REPORT": str(report),
            "WRK_KEY": self.hot_key,
            "WRK_KEYS": str(self.keys_file),
            "WRK_LIMIT": str(COLD_KEYS),
            **(extra_env or {}),
        }
        command = [
            *pinned(LOAD_CORE),
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "5s",
            "-s",
            str(script),
            target.url + path,
        ]
        peak = [target.rss_mib()]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.1):
                peak.append(target.rss_mib())

        sampler = threading.Thread(target=sample, daemon=True)
        statements = db_count()
        cpu = target.cpu_seconds()
        sampler.start()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        cpu = target.cpu_seconds() - cpu
        stop.set()
        sampler.join()
        data = json.loads(report.read_text())
        duration = data["duration_us"] / 1e6
        return Result(
            server=target.name,
            load=load,
            connections=connections,
            rps=data["requests"] / duration,
            p50_ms=data["p50_us"] / 1000,
            p99_ms=data["p99_us"] / 1000,
            non2xx=data["non2xx"],
            socket_errors=data["socket_errors"],
            db_per_s=(db_count() - statements) / duration,
            peak_rss_mib=max(peak),
            cpu_us_per_req=cpu * 1e6 / max(1, data["requests"]),
        )


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0].split("{")[0] == name)


def db_counter(server: Process) -> Callable[[], int]:
    if server.name == "naive":
        return lambda: int(httpx.get(server.url + "/_stats").json()["statements"])
    if server.name.startswith("usage-service") or server.name in DIAGNOSTIC_SERVERS:
        return lambda: int(metric(server.url, "usage_db_statements_total"))
    return lambda: 0


# --- the runs --------------------------------------------------------------------------------


def service_command(workers: int, server: str = "uvicorn") -> list[str]:
    """usage-service as an operator runs it; one worker is pinned beside the load generator."""
    pin = pinned(SERVER_CORE) if workers == 1 else []
    return [
        *pin,
        sys.executable,
        "-m",
        "usage_service",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--workers",
        str(workers),
        "--server",
        server,
        "--log-level",
        "warning",
    ]


def start_servers(db: Path, hot_key: str, redis_url: str) -> dict[str, Callable[[], Process]]:
    python = sys.executable
    servers = str(HERE / "servers.py")
    service_env = {"SQLITE_PATH": str(db), "REDIS_CONN_STRING": redis_url, "PYTHONPATH": str(HERE.parent)}
    # The cold and bad loads are failures from one address: measure the lookup, not the limiter's 429.
    service_env["USAGE_AUTH_FAIL_LIMIT"] = "0"
    ceiling = [*pinned(SERVER_CORE), python, servers, "ceiling", "--port", "{port}", "--db", str(db), "--key", hot_key]
    return {
        "ceiling": lambda: Process("ceiling", ceiling, {"PYTHONPATH": str(HERE.parent)}, "/"),
        "ceiling-granian": lambda: Process(
            "ceiling-granian", [*ceiling, "--server", "granian"], {"PYTHONPATH": str(HERE.parent)}, "/"
        ),
        "naive": lambda: Process(
            "naive",
            [*pinned(SERVER_CORE), python, servers, "naive", "--port", "{port}", "--db", str(db)],
            {"PYTHONPATH": str(HERE.parent)},
            "/_stats",
        ),
        # Two deployments, not one fleet: each refreshes its own records (its own Redis prefix).
        "usage-service": lambda: Process(
            "usage-service",
            service_command(workers=1),
            {**service_env, "USAGE_REDIS_PREFIX": "uvicorn:"},
            "/healthz",
        ),
        "usage-service-granian": lambda: Process(
            "usage-service-granian",
            service_command(workers=1, server="granian"),
            {**service_env, "USAGE_REDIS_PREFIX": "granian:"},
            "/healthz",
        ),
        "unrefreshed-granian": lambda: Process(
            "unrefreshed-granian",
            service_command(workers=1, server="granian"),
            {
                **service_env,
                "USAGE_REDIS_PREFIX": "unrefreshed:",
                "USAGE_REFRESH_INTERVAL": "0",
                "USAGE_CACHE_TTL": "600",
                "USAGE_LOCAL_TTL": "600",
            },
            "/healthz",
        ),
    }


def flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    client.flushall()
    client.close()


def run_matrix(
    scenario: Scenario,
    factories: dict[str, Callable[[], Process]],
    redis_url: str,
    seconds: float,
    rounds: int,
    loads: list[str],
) -> list[Result]:
    """Every load against every server, the servers taking turns round after round: a machine
    whose speed drifts during the run then weighs on all of them alike. Each figure is the
    median round (by requests/s); ratios are the median of each round's (`paired`)."""
    flush_redis(redis_url)
    servers = {name: factory() for name, factory in factories.items()}
    results = []

    def alone(server: Process) -> None:
        # The others are paused: a service's refresher keeps its polled tokens fresh for
        # USAGE_HOT_WINDOW after its own round, which would run on the core being measured.
        for other in servers.values():
            if other is not server:
                other.pause()
        server.resume()

    try:
        counters = {name: db_counter(server) for name, server in servers.items()}
        for load in loads:
            runs: dict[str, list[Result]] = {name: [] for name in servers}
            for turn in range(rounds):
                # Every other round in reverse order: a server and its ceiling, measured side by
                # side, take turns going first, so that a machine speeding up or slowing down
                # within a round favours neither.
                order = list(servers.items())
                for name, server in order if turn % 2 == 0 else reversed(order):
                    alone(server)
                    if load != "cold":  # polling is measured in its steady state
                        warm_up(scenario, server, load, first=turn == 0)
                    # Cold keys are new in every round: a later round must not find them cached.
                    offset = {"WRK_OFFSET": str(turn * COLD_KEYS)}
                    runs[name].append(scenario.wrk(server, load, seconds, db_count=counters[name], extra_env=offset))
            for name, attempts in runs.items():
                result = sorted(attempts, key=lambda r: r.rps)[len(attempts) // 2]
                result.peak_rss_mib = max(r.peak_rss_mib for r in attempts)
                result.round_rps = [r.rps for r in attempts]
                result.round_cpu_us = [r.cpu_us_per_req for r in attempts]
                results.append(result)
                rps = ", ".join(f"{r.rps:.0f}" for r in attempts)
                cpu = ", ".join(f"{r.cpu_us_per_req:.1f}" for r in attempts)
                print(
                    f"  {name:21} {load:7} {result.rps:9.0f} req/s  p99 {result.p99_ms:6.2f} ms  "
                    f"{result.cpu_us_per_req:5.1f} µs CPU/req  (rounds: {rps} req/s; {cpu} µs)",
                    flush=True,
                )
    finally:
        for server in servers.values():
            server.resume()
            server.stop()
    for result in results:
        # Each server against the ceiling of the HTTP server it runs on.
        family = "ceiling-granian" if result.server.endswith("granian") else "ceiling"
        ceiling = next((r for r in results if r.server == family and r.load == result.load), None)
        naive = next((r for r in results if r.server == "naive" and r.load == result.load), None)
        if ceiling is not None:
            result.vs_ceiling = paired(result.round_rps, ceiling.round_rps)
            result.vs_ceiling_cpu = paired(ceiling.round_cpu_us, result.round_cpu_us)
        if naive is not None:
            result.vs_naive = paired(result.round_rps, naive.round_rps)
    return results


# Seconds of extra warm-up a service may take, a second at a time, to reach its steady state.
MAX_EXTRA_WARM_UP = 8


def warm_up(scenario: Scenario, server: Process, load: str, *, first: bool) -> None:
    """Bring a server that was paused back to its steady state before it is measured.

    Paused for longer than USAGE_CACHE_TTL and the leader lock's TTL, a service resumes with
    every record expired and the lock lapsed: it re-takes the lock, and its polls fetch the
    records again from Redis, 10,000 of them under the spread load -- recovery from a stall, not
    polling. How long that takes moves with the machine, so after a fixed warm-up a service is
    warmed a second at a time until a second goes by in which every poll was answered in-process.
    """
    scenario.wrk(server, load, (5 if first else 3) if load == "spread" else 2)
    if not (server.name.startswith("usage-service") or server.name in DIAGNOSTIC_SERVERS):
        return
    for _ in range(MAX_EXTRA_WARM_UP):
        missed = metric(server.url, "usage_cache_misses_total")
        scenario.wrk(server, load, 1)
        if metric(server.url, "usage_cache_misses_total") == missed:
            return


def paired(numerators: list[float], denominators: list[float]) -> float:
    """The median over rounds of one figure divided by another measured in the same round."""
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


# The "Done when": (what, server, load, bound, at least?).
TARGETS = (
    ("usage-service on uvicorn, × uvicorn's ceiling", "usage-service", "hot", 0.75),
    ("usage-service on uvicorn, × uvicorn's ceiling", "usage-service", "spread", 0.60),
    ("usage-service on granian, × granian's ceiling", "usage-service-granian", "hot", 0.80),
    ("usage-service on granian, × granian's ceiling", "usage-service-granian", "spread", 0.70),
)


def targets(results: list[Result]) -> str:
    """The ratios the issue asks for, from this one run."""
    lines = ["| target | load | req/s ratio | by CPU/req | bound | met (req/s, CPU) |", "|---|---|---:|---:|---:|---|"]
    found = {(r.server, r.load): r for r in results}
    for text, server, load, bound in TARGETS:
        result = found.get((server, load))
        if result is not None and result.vs_ceiling is not None and result.vs_ceiling_cpu is not None:
            met = ", ".join("yes" if ratio >= bound else "NO" for ratio in (result.vs_ceiling, result.vs_ceiling_cpu))
            lines.append(
                f"| {text} | {load} | {result.vs_ceiling:.2f} | {result.vs_ceiling_cpu:.2f} | ≥ {bound:.2f} | {met} |"
            )
    uvicorn, granian = found.get(("usage-service", "hot")), found.get(("usage-service-granian", "hot"))
    if uvicorn is not None and granian is not None:
        ratio = paired(granian.round_cpu_us, uvicorn.round_cpu_us)
        # What the servers alone give: an app that cost nothing would have this ratio.
        ceilings = found.get(("ceiling-granian", "hot")), found.get(("ceiling", "hot"))
        alone = (
            f"; the ceilings' own: {paired(ceilings[0].round_cpu_us, ceilings[1].round_cpu_us):.2f}"
            if ceilings[0] is not None and ceilings[1] is not None
            else ""
        )
        lines.append(
            f"| CPU per hot poll, granian ÷ uvicorn (the median of the rounds' ratios; each server's "
            f"median round: {granian.cpu_us_per_req:.1f} and {uvicorn.cpu_us_per_req:.1f} µs{alone}) "
            f"| hot | – | {ratio:.2f} | ≤ 0.75 | {'yes' if ratio <= 0.75 else 'NO'} |"
        )
    return "\n".join(lines)


def run_curve(
    scenario: Scenario, factories: dict[str, Callable[[], Process]], redis_url: str, seconds: float
) -> list[Result]:
    points = []
    for factory in factories.values():
        flush_redis(redis_url)
        server = factory()
        try:
            scenario.wrk(server, "hot", 1)
            for connections in (1, 2, 5, 10, 25, 50, 100, 200):
                points.append(scenario.wrk(server, "hot", seconds, connections=connections))
        finally:
            server.stop()
    return points


@dataclass
class Freshness:
    config: str
    target_rps: int
    rps: float = 0.0
    db_per_s: float = 0.0
    charge_p50_s: float = 0.0
    charge_p99_s: float = 0.0
    charge_max_s: float = 0.0
    charges: int = 0
    disable_max_s: float = 0.0
    ban_max_s: float = 0.0
    delete_max_s: float = 0.0
    non2xx: int = 0
    warm_s: float = 0.0  # until every token was read once and polls found them cached
    samples: list[float] = field(default_factory=list, repr=False)


def propagation(url: str, db_path: Path, tokens: list[tuple[int, str, int]], seconds: float) -> Freshness:
    """Change tokens as the gateway would and time until the service answers with the change."""
    result = Freshness("", 0)
    gateway = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False, timeout=10)
    lock = threading.Lock()
    rng = random.Random(7)
    reserved = tokens[-300:]  # disabled, banned or deleted along the way: not charged
    chargeable = tokens[:-300]
    deadline = time.monotonic() + seconds

    def write(sql: str, *args: object) -> float:
        with lock:
            gateway.execute(sql, args)
            return time.monotonic()

    def wait_for(client: httpx.Client, key: str, done: Callable[[httpx.Response], bool]) -> float:
        while True:
            response = client.get(url + "/api/usage/token", headers={"Authorization": f"Bearer sk-{key}"})
            if done(response):
                return time.monotonic()
            time.sleep(0.01)

    def charger() -> None:
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                token_id, key, _ = rng.choice(chargeable)
                before = client.get(url + "/api/usage/token", headers={"Authorization": f"Bearer sk-{key}"})
                used = before.json()["data"]["total_used"] + 100
                written = write(
                    "UPDATE tokens SET remain_quota = remain_quota - 100, used_quota = used_quota + 100 WHERE id = ?",
                    token_id,
                )
                seen = wait_for(
                    client, key, lambda r, used=used: r.status_code == 200 and r.json()["data"]["total_used"] >= used
                )
                with lock:
                    result.samples.append(seen - written)
                time.sleep(rng.uniform(0.05, 0.3))

    def changer(kind: str, picks: list[tuple[int, str, int]]) -> float:
        worst = 0.0
        with httpx.Client() as client:
            for token_id, key, user_id in picks:
                client.get(url + "/api/usage/token", headers={"Authorization": f"Bearer sk-{key}"})
                time.sleep(rng.uniform(0.1, 0.5))
                if kind == "disable":
                    written, status = write("UPDATE tokens SET status = 2 WHERE id = ?", token_id), 401
                elif kind == "ban":
                    written, status = write("UPDATE users SET status = 2 WHERE id = ?", user_id), 403
                else:
                    written, status = write("UPDATE tokens SET deleted_at = '2025-01-01' WHERE id = ?", token_id), 401
                worst = max(worst, wait_for(client, key, lambda r, status=status: r.status_code == status) - written)
        return worst

    threads = [threading.Thread(target=charger) for _ in range(6)]
    for thread in threads:
        thread.start()
    # Ban users whose tokens are all reserved: user ids 1000 and below serve many tokens, so pick
    # tokens of their own users for bans by giving each a fresh user.
    banned = reserved[200:210]
    for i, (token_id, _, _) in enumerate(banned):
        write("INSERT INTO users (id, username, password, status) VALUES (?, ?, '!', 1)", 5000 + i, f"ban{i}")
        write("UPDATE tokens SET user_id = ? WHERE id = ?", 5000 + i, token_id)
    banned = [(t, k, 5000 + i) for i, (t, k, _) in enumerate(banned)]
    time.sleep(1.5)
    result.disable_max_s = changer("disable", reserved[:10])
    result.ban_max_s = changer("ban", banned)
    result.delete_max_s = changer("delete", reserved[100:110])
    for thread in threads:
        thread.join()
    gateway.close()
    samples = sorted(result.samples)
    result.charges = len(samples)
    result.charge_p50_s = statistics.median(samples)
    result.charge_p99_s = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    result.charge_max_s = samples[-1]
    return result


def run_freshness(
    scenario: Scenario, db_template: Path, tokens: list[tuple[int, str, int]], redis_url: str, seconds: float
) -> list[Freshness]:
    """10,000 tokens each polled once a second (and twice, and by two workers): freshness and DB cost."""
    runs = []
    for config, rate, workers in (
        ("1 worker", TOKENS, 1),
        ("1 worker, 2x rate", 2 * TOKENS, 1),
        ("2 workers", TOKENS, 2),
    ):
        flush_redis(redis_url)
        db = scenario.workdir / "fresh.db"
        shutil.copy(db_template, db)
        env = {"SQLITE_PATH": str(db), "REDIS_CONN_STRING": redis_url, "PYTHONPATH": str(HERE.parent)}
        server = Process(
            f"usage-service x{workers}",
            service_command(workers),
            env,
            "/healthz",
        )
        try:
            connections = 200
            pause = 1000 * connections / rate
            # The first passes read every token once; measure from the steady state on. A
            # saturated worker takes up 10,000 tokens more slowly than it answers known ones
            # (each miss waits for its trips down), so passes go on until one reads almost none.
            warm = time.monotonic()
            for _ in range(WARM_PASSES):
                loaded = metric(server.url, "usage_db_lookups_total")
                scenario.wrk(server, "paced", 3, connections=connections, extra_env={"WRK_PAUSE_MS": str(int(pause))})
                if metric(server.url, "usage_db_lookups_total") - loaded < TOKENS / 100:
                    break
            warm_s = time.monotonic() - warm
            # Each connection waits for an answer, then pauses: calibration passes move the pause
            # by the error in each connection's cycle, so the rate is the target wherever the
            # server can reach it (answer times shift as the server warms up: twice).
            for _ in range(2):
                calibration = scenario.wrk(
                    server, "paced", 3, connections=connections, extra_env={"WRK_PAUSE_MS": str(int(pause))}
                )
                pause = max(0.0, pause + 1000 * connections / rate - 1000 * connections / calibration.rps)
            extra = {"WRK_PAUSE_MS": str(int(pause))}
            holder: dict[str, Result] = {}

            def paced_load(
                server: Process = server, extra: dict[str, str] = extra, holder: dict[str, Result] = holder
            ) -> None:
                count = db_counter(server)
                holder["r"] = scenario.wrk(server, "paced", seconds, connections=200, db_count=count, extra_env=extra)

            load = threading.Thread(target=paced_load)
            load.start()
            time.sleep(1)
            fresh = propagation(server.url, db, tokens, seconds - 6)
            load.join()
            fresh.config, fresh.target_rps, fresh.warm_s = config, rate, warm_s
            fresh.rps, fresh.db_per_s, fresh.non2xx = holder["r"].rps, holder["r"].db_per_s, holder["r"].non2xx
            runs.append(fresh)
            print(
                f"  {config:18} {fresh.rps:7.0f} req/s  {fresh.db_per_s:5.1f} DB statements/s  "
                f"charge p99 {fresh.charge_p99_s:.2f} s  (warm after {fresh.warm_s:.0f} s)",
                flush=True,
            )
        finally:
            server.stop()
    return runs


# --- output ----------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    lines = [
        "| server | load | req/s | p50 ms | p99 ms | non-2xx | × its ceiling | × its ceiling by CPU | × naive "
        "| CPU µs/req | DB stmts/s | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ratio(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}"

    servers = SERVER_NAMES + DIAGNOSTIC_SERVERS
    for r in sorted(results, key=lambda r: (LOAD_NAMES.index(r.load), servers.index(r.server))):
        lines.append(
            f"| {r.server} | {r.load} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.non2xx:,} | "
            f"{ratio(r.vs_ceiling)} | {ratio(r.vs_ceiling_cpu)} | {ratio(r.vs_naive)} | {r.cpu_us_per_req:.1f} "
            f"| {r.db_per_s:,.1f} | {r.peak_rss_mib:.0f} |"
        )
    return "\n".join(lines)


def freshness_table(runs: list[Freshness]) -> str:
    lines = [
        "| usage-service | target req/s | req/s | DB stmts/s | charges | charge p50 s | charge p99 s | charge max s "
        "| disable max s | ban max s | delete max s | warm after s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in runs:
        lines.append(
            f"| {f.config} | {f.target_rps:,} | {f.rps:,.0f} | {f.db_per_s:.1f} | {f.charges} | "
            f"{f.charge_p50_s:.2f} | {f.charge_p99_s:.2f} | {f.charge_max_s:.2f} | {f.disable_max_s:.2f} | "
            f"{f.ban_max_s:.2f} | {f.delete_max_s:.2f} | {f.warm_s:.0f} |"
        )
    return "\n".join(lines)


def chart(points: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    colors = {
        "ceiling": "#888888",
        "naive": "#d62728",
        "usage-service": "#1f77b4",
        "ceiling-granian": "#bcbd22",
        "usage-service-granian": "#2ca02c",
    }
    for name, color in colors.items():
        mine = [p for p in points if p.server == name]
        ax.plot([p.rps for p in mine], [p.p99_ms for p in mine], "o-", color=color, label=f"{name} p99")
        ax.plot([p.rps for p in mine], [p.p50_ms for p in mine], "o--", color=color, alpha=0.6, label=f"{name} p50")
    ax.set_xlabel("requests/s (hot token, 1 to 200 connections)")
    ax.set_ylabel("latency, ms")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("GET /api/usage/token, 1 worker pinned to one core, wrk on the other")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4, help="per load and round (default 4)")
    parser.add_argument("--rounds", type=int, default=6, help="turns each server takes at each load (default 6)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--skip", nargs="*", default=[], choices=["matrix", "curve", "freshness"])
    parser.add_argument("--loads", nargs="+", default=list(LOAD_NAMES), choices=LOAD_NAMES, help="(default: all)")
    parser.add_argument(
        "--servers",
        nargs="+",
        default=list(SERVER_NAMES),
        choices=SERVER_NAMES + DIAGNOSTIC_SERVERS,
        help=f"(default: all but {', '.join(DIAGNOSTIC_SERVERS)})",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # Stopped with SIGTERM, unwind as on Ctrl-C: the servers it paused are resumed and stopped,
    # and Redis and the temporary directory go with them.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    with tempfile.TemporaryDirectory(prefix="usage-bench-") as tmp:
        workdir = Path(tmp)
        db = workdir / "one-api.db"
        tokens = make_database(db)
        keys_file = workdir / "keys.txt"
        keys_file.write_text("\n".join(key for _, key, _ in tokens) + "\n")
        scenario = Scenario(workdir, keys_file, tokens[0][1])
        print(
            f"bench: {TOKENS:,} tokens, {os.cpu_count()} cores; servers on core {SERVER_CORE}, wrk on core {LOAD_CORE}"
            if pinned(SERVER_CORE)
            else "bench: not pinned (fewer than 2 cores)",
            flush=True,
        )
        with redis_server(workdir) as redis_url:
            factories = {
                name: f for name, f in start_servers(db, tokens[0][1], redis_url).items() if name in args.servers
            }
            report: dict[str, object] = {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cores": os.cpu_count()}
            sections = []
            if "matrix" not in args.skip:
                results = run_matrix(scenario, factories, redis_url, args.seconds, args.rounds, args.loads)
                report["matrix"] = [asdict(r) for r in results]
                sections.append(
                    f"## Throughput (1 worker, 50 connections; median of {args.rounds} rounds of "
                    f"{args.seconds:g} s, servers taking turns; each ratio the median of its rounds' "
                    "ratios, a round's servers measured one after another)\n\n" + table(results)
                )
                sections.append("## Targets (issue 12, measured in this run)\n\n" + targets(results))
            if "curve" not in args.skip:
                points = run_curve(scenario, factories, redis_url, min(args.seconds, 3))
                report["curve"] = [asdict(p) for p in points]
                chart(points, args.out / "latency-throughput.png")
            if "freshness" not in args.skip:
                runs = run_freshness(scenario, db, tokens, redis_url, max(args.seconds * 2, 20))
                report["freshness"] = [{k: v for k, v in asdict(f).items() if k != "samples"} for f in runs]
                sections.append(
                    "## Freshness and database cost (10,000 tokens, each polled once a second)\n\n"
                    + freshness_table(runs)
                )
    text = "\n\n".join(sections) + "\n"
    print("\n" + text)
    (args.out / "results.md").write_text(f"Run at {report['when']} on {report['cores']} cores.\n\n{text}")
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.out / 'results.md'}, {args.out / 'results.json'}, {args.out / 'latency-throughput.png'}")


if __name__ == "__main__":
    main()
