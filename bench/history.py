"""Usage history and the token log against a large gateway log, on loopback, in one run.

    .venv/bin/python bench/history.py [--rows 10000000] [--quick] [--engines] [--seconds 20]

Generates a gateway database whose log holds --rows rows (default 10,000,000) over 90 days,
one token (id 1) holding a tenth of them (1,000,000) and 10,000 tokens of 1,000 users sharing
the rest (bench/logdata.py). The SQLite file is cached under ~/.cache/usage-service-bench (or
$XDG_CACHE_HOME), keyed by its parameters, and made again once its newest row is a day old.
Then it measures, and prints beside the issue's targets:
- the plain `GROUP BY day, model` over the token's index for 30 days, against the service's
  cold 30-day history for that token (`History.slots`, and the route, Redis and process empty)
  and its warm one; the route's requests/s against the balance route's for the same token;
- `/api/log/token` with its cache cold (distinct tokens), p50/p99: the plain list of up to 1,000
  rows, and the newer gateways' first page of 100;
- database statements per second while 10,000 tokens poll their history once a second (1
  worker, 1 worker at twice the rate, 2 workers), from /metrics before and after;
- how long a new charge takes to show in the history, and in the balance, polled meanwhile.
The first two are timed with the database's files held in memory (`resident`). --engines
runs them on PostgreSQL and MariaDB too (their servers are temporary: each run loads them
again, a few minutes at 10,000,000 rows, and measures each alone), PostgreSQL twice: with the
gateway's indexes, then with the index on (token_id, id) docs/databases.md advises there.
--quick: 200,000 rows, shorter loads.
Bounded: about 10 minutes with the default rows once the file is cached (generating it takes
about 2 minutes more). Figures vary with the machine; compare within a run.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import mmap
import os
import random
import re
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from logdata import DAYS, HOT_TOKEN, TOKENS, insert  # noqa: E402

from bench import (  # noqa: E402
    Process,
    Result,
    Scenario,
    flush_redis,
    make_database,
    metric,
    redis_server,
    service_command,
)
from usage_service._dsn import PostgresDSN  # noqa: E402
from usage_service.config import Settings  # noqa: E402
from usage_service.demo import GATEWAY_SCHEMA  # noqa: E402
from usage_service.refresh import REFRESH_CHUNK  # noqa: E402

VERSION = 1  # of the generated data: bump when logdata.py changes what it writes
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "usage-service-bench"
CHUNK = 1_000_000
RANGE_DAYS = 30
# Tokens whose first log page is timed, for each of the two forms: the p99 is the fifth slowest.
FIRST_PAGES = 500
HISTORY = "/api/usage/token/history"
BALANCE = "/api/usage/token"
LOG = "/api/log/token"
# What the database is asked, from /metrics: the token records' statements and the log's.
STATEMENT_METRICS = ("usage_db_statements_total", "usage_log_db_statements_total")


# The plain query a history would be without the service: every row of the token in the range,
# grouped by UTC day and model, over the token's index.
def plain(engine: str) -> str:
    day = "created_at DIV 86400" if engine == "mysql" else "created_at / 86400"  # no % with MySQL's %s
    return (
        f"SELECT {day} AS day, model_name, SUM(CASE WHEN type = 2 THEN quota ELSE -quota END),"
        " SUM(CASE WHEN type = 2 THEN prompt_tokens ELSE 0 END),"
        " SUM(CASE WHEN type = 2 THEN completion_tokens ELSE 0 END), SUM(CASE WHEN type = 2 THEN 1 ELSE 0 END)"
        " FROM logs WHERE token_id = ? AND created_at >= ? AND created_at < ? AND type IN (2, 6)"
        " GROUP BY day, model_name"
    )


# --- the data ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    tokens: list[tuple[int, str, int]]  # (id, key, user_id); the hot token first
    rows: int
    end: int  # the newest row's created_at
    files: tuple[Path, ...] = ()  # the database's files, held in memory while the queries are timed

    @property
    def hot_key(self) -> str:
        return self.tokens[0][1]


def log_indexes() -> list[str]:
    return [s.strip() for s in GATEWAY_SCHEMA.split(";") if s.strip().startswith("CREATE INDEX") and "`logs`" in s]


def sqlite_data(rows: int) -> tuple[Path, Data]:
    """The cached SQLite gateway with `rows` log rows ending about now; made when missing or a day old."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"history-v{VERSION}-{rows}.db"
    if path.exists():
        db = sqlite3.connect(path)
        # Rows a run appended (it deletes them at the end, unless it was killed).
        db.execute("DELETE FROM logs WHERE id > ?", (rows,))
        db.commit()
        (end,) = db.execute("SELECT MAX(created_at) FROM logs").fetchone()
        tokens = db.execute("SELECT id, `key`, user_id FROM tokens ORDER BY id").fetchall()
        db.close()
        if end is not None and end > time.time() - 86400:
            return path, Data(tokens, rows, end, (path,))
        path.unlink()
    started = time.monotonic()
    print(f"generating {rows:,} log rows into {path} ...", flush=True)
    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    tokens = make_database(partial)
    db = sqlite3.connect(partial, isolation_level=None)
    # Our own file: no journal while filling it, indexes built once at the end.
    db.execute("PRAGMA journal_mode = off")
    db.execute("PRAGMA synchronous = off")
    for statement in log_indexes():
        name = re.search(r"INDEX `(\w+)`", statement)
        assert name is not None
        db.execute(f"DROP INDEX `{name.group(1)}`")
    end = int(time.time())
    db.execute("BEGIN")
    for first in range(1, rows + 1, CHUNK):
        db.execute(insert("sqlite", first, min(rows, first + CHUNK - 1), rows, end))
    for statement in log_indexes():
        db.execute(statement)
    db.execute("COMMIT")
    db.close()
    partial.rename(path)
    print(f"generated in {time.monotonic() - started:.0f} s", flush=True)
    return path, Data(tokens, rows, end, (path,))


def server_data(engine: str, gateway: Any, rows: int) -> Data:
    """Fill a PostgreSQL or MariaDB gateway (tests/dbservers.py) as sqlite_data fills its file."""
    from usage_service.demo import new_key

    conn = gateway.conn
    mysql = engine == "mysql"
    tokens = [(i, new_key(), i % 1000 + 1) for i in range(1, TOKENS + 1)]
    false: object = 0 if mysql else False
    mark = "%s"
    quote = (lambda name: f"`{name}`") if mysql else (lambda name: f'"{name}"')
    with conn.cursor() as cursor:
        cursor.execute("DELETE FROM logs")
        cursor.executemany(
            f"INSERT INTO users (id, username, password, status, quota) VALUES ({mark}, {mark}, '!', 1, 0)",
            [(u, f"user{u}") for u in range(1, 1001)],
        )
        cursor.executemany(
            f"INSERT INTO tokens (id, {quote('key')}, user_id, status, name, created_time, accessed_time,"
            " expired_time, remain_quota, used_quota, unlimited_quota, model_limits_enabled, model_limits)"
            f" VALUES ({mark}, {mark}, {mark}, 1, 'bench', 0, 0, -1, 10000000, 0, {mark}, {mark}, '')",
            [(i, key, user, false, false) for i, key, user in tokens],
        )
        # Secondary indexes built once after the load, as sqlite_data does.
        if mysql:
            cursor.execute("SHOW INDEX FROM logs")
            columns: dict[str, list[str]] = {}
            for row in cursor.fetchall():
                if row[2] != "PRIMARY":
                    columns.setdefault(row[2], []).append(f"`{row[4]}`")
            if columns:
                cursor.execute("ALTER TABLE logs " + ", ".join(f"DROP INDEX `{name}`" for name in columns))
            rebuild = ["ALTER TABLE logs " + ", ".join(f"ADD INDEX `{n}` ({', '.join(c)})" for n, c in columns.items())]
        else:
            cursor.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'logs'")
            found = [(n, d) for n, d in cursor.fetchall() if not d.startswith("CREATE UNIQUE")]
            for name, _ in found:
                cursor.execute(f'DROP INDEX "{name}"')
            rebuild = [definition for _, definition in found]
        end = int(time.time())
        started = time.monotonic()
        for first in range(1, rows + 1, CHUNK):
            cursor.execute(insert(engine, first, min(rows, first + CHUNK - 1), rows, end))
        for statement in rebuild:
            cursor.execute(statement)
        # A live gateway's tables have planner statistics; fresh ones get them now.
        for table in ("tokens", "users", "logs"):
            cursor.execute(f"ANALYZE TABLE {table}" if mysql else f"ANALYZE {table}")
            if mysql:
                cursor.fetchall()
    print(f"  {engine}: {rows:,} log rows loaded in {time.monotonic() - started:.0f} s", flush=True)
    # PostgreSQL reads through the OS's cache (beyond its shared buffers); InnoDB reads around it
    # (O_DIRECT) into its buffer pool, which the server's options size for the log.
    files = tuple(gateway.server.dir.glob("data/base/*/*")) if engine == "postgres" else ()
    return Data(tokens, rows, end, files)


@contextmanager
def resident(files: tuple[Path, ...]) -> Iterator[None]:
    """Hold these files in the OS's memory (mapped and locked) while the queries are timed.

    Some machines page out file cache that nobody touched for a while (this project's, any after
    a minute): a cold read of a token's log there is a read of the disk, a millisecond or
    more per page, whatever the service does. Held in memory, as a gateway's database server
    whose memory holds its database would have it, the figures are the service's and the
    database's work. Without the right to lock memory (not root), the files are read once instead.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mlock.argtypes = libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    started, held, failed = time.monotonic(), [], 0
    try:
        for path in files:
            size = path.stat().st_size
            if not size:
                continue
            with path.open("rb") as file:
                address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, file.fileno(), 0)
                if address in (None, ctypes.c_void_p(-1).value):
                    raise OSError(ctypes.get_errno(), f"mmap {path}")
                held.append((address, size))
                if libc.mlock(address, size) != 0:  # faults every page in, and keeps it
                    failed += 1
                    while file.read(1 << 20):
                        pass
        if held:
            gib = sum(size for _, size in held) / 2**30
            how = "read once (no right to lock memory)" if failed else "locked in memory"
            print(f"  {gib:.1f} GiB of database files {how} in {time.monotonic() - started:.0f} s", flush=True)
        yield
    finally:
        for address, size in held:
            libc.munmap(address, size)  # unlocks too


# --- in process: the query against the service's engine, cold and warm ------------------------


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


@dataclass
class Query:
    engine: str
    plain_ms: float = 0.0
    cold_slots_ms: float = 0.0
    warm_slots_ms: float = 0.0
    cold_route_ms: float = 0.0
    warm_route_ms: float = 0.0
    log_p50_ms: float = 0.0
    log_p99_ms: float = 0.0
    log_hot_ms: float = 0.0
    paged_p50_ms: float = 0.0  # the first page of 100 (p=1&page_size=100) with its count
    paged_p99_ms: float = 0.0
    cold_statements: int = 0


async def timed(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await call()
    return 1000 * (time.perf_counter() - started)


async def measure_query(engine: str, settings: Settings, data: Data, redis_url: str, repeat: int) -> Query:
    """The plain GROUP BY, then the service's history for the same token and range, cold and warm."""
    from usage_service.app import create_app
    from usage_service.history import SLOT
    from usage_service.store import open_store

    result = Query(engine)
    end = (int(time.time()) // SLOT + 1) * SLOT
    start = end - RANGE_DAYS * 86400
    hot_id, hot_key, _ = data.tokens[0]
    bearer = {"Authorization": f"Bearer sk-{hot_key}"}

    # The plain query and the service's cold reads take turns, so that the machine's drift (the
    # figures move by tens of percent within minutes here) weighs on both alike.
    store = await open_store(settings)
    reader = store.log_reader()
    sql = plain(reader.engine)
    plain_conn = None
    if isinstance(settings.database, PostgresDSN):
        # As the gateway's server runs it, parallel workers and all (the service's own sessions
        # do without); JIT off for both, docs/databases.md.
        import asyncpg

        plain_conn = await asyncpg.connect(settings.database.url, server_settings={"jit": "off"})

    async def plain_query(text: str, params: Sequence[Any]) -> object:
        if plain_conn is None:
            return await reader.query(text, params)
        return await plain_conn.fetch(reader.sql(text), *params)

    plains, cold_slots, cold_routes, warm_slots, warm_routes = [], [], [], [], []
    try:
        await plain_query(sql, (hot_id, start, end))  # the OS's cache warm, as for the service
        for _ in range(repeat):
            plains.append(await timed(lambda: plain_query(sql, (hot_id, start, end))))
            for route in (False, True):
                flush_redis(redis_url)
                app = create_app(settings)
                async with app.router.lifespan_context(app):  # type: ignore[attr-defined]
                    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
                    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
                        if route:
                            await client.get(BALANCE, headers=bearer)  # the token known: time the history alone
                            cold_routes.append(await timed(lambda: client.get(HISTORY, headers=bearer)))
                            for _ in range(20):
                                warm_routes.append(await timed(lambda: client.get(HISTORY, headers=bearer)))
                        else:
                            history = app.state.history
                            statements = history.reader.statements
                            cold_slots.append(await timed(lambda h=history: h.slots(hot_id, start, end)))
                            result.cold_statements = history.reader.statements - statements
                            for _ in range(20):
                                warm_slots.append(await timed(lambda h=history: h.slots(hot_id, start, end)))
    finally:
        if plain_conn is not None:
            await plain_conn.close()
        await store.close()
    result.plain_ms = statistics.median(plains)
    result.cold_slots_ms = statistics.median(cold_slots)
    result.cold_route_ms = statistics.median(cold_routes)
    result.warm_slots_ms = statistics.median(warm_slots)
    result.warm_route_ms = statistics.median(warm_routes)

    # The log's first page, its short cache cold: each token asked once (its balance first, so
    # that the token's own lookup is not in the figure), in turn for the plain list of up to
    # 1,000 rows (what the key-checking tools ask for) and for the newer gateways' first page of 100.
    flush_redis(redis_url)
    app = create_app(settings)
    async with app.router.lifespan_context(app):  # type: ignore[attr-defined]
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            sample = data.tokens[1 : 1 + 2 * FIRST_PAGES]
            for _, key, _ in [data.tokens[0], *sample]:
                await client.get(BALANCE, headers={"Authorization": f"Bearer sk-{key}"})
            result.log_hot_ms = await timed(lambda: client.get(LOG, headers=bearer))
            pages: list[float] = []
            paged: list[float] = []
            for i, (_, key, _) in enumerate(sample):
                answer: list[httpx.Response] = []
                url = LOG if i % 2 == 0 else LOG + "?p=1&page_size=100"

                async def page(key: str = key, url: str = url, answer: list[httpx.Response] = answer) -> None:
                    answer.append(await client.get(url, headers={"Authorization": f"Bearer sk-{key}"}))

                (pages if i % 2 == 0 else paged).append(await timed(page))
                assert answer[0].status_code == 200 and answer[0].json()["data"], answer[0].text[:200]
    result.paged_p50_ms, result.paged_p99_ms = percentile(paged, 0.5), percentile(paged, 0.99)
    result.log_p50_ms, result.log_p99_ms = percentile(pages, 0.5), percentile(pages, 0.99)
    return result


# --- over HTTP: warm throughput, polling cost, freshness (SQLite) ------------------------------


def read_from_log(url: str) -> tuple[float, float]:
    """(closed days, open days) the service has read from the log so far, from /metrics."""
    days = tails = 0.0
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if 'layer="database"' in line:
            if line.startswith("usage_history_days_total{"):
                days += float(line.split()[-1])
            elif line.startswith("usage_history_tails_total{"):
                tails += float(line.split()[-1])
    return days, tails


def statements(url: str) -> float:
    return sum(metric(url, name) for name in STATEMENT_METRICS)


def redis_failures(url: str) -> tuple[int, int]:
    """Redis calls failed so far, and those of them timed out while a worker was overloaded."""
    return (
        int(metric(url, "usage_redis_errors_total")),
        int(metric(url, "usage_redis_overloaded_timeouts_total")),
    )


def history_quota(body: dict[str, Any]) -> int:
    """The range's total quota in a history answer."""
    return int(body["data"]["total"]["quota"])


@dataclass
class Polling:
    config: str
    target_rps: int
    rps: float = 0.0
    statements_per_s: float = 0.0
    log_statements_per_s: float = 0.0  # of them, the log's (the rest read token records)
    days_read_per_s: float = 0.0  # closed days read from the log (not from Redis or in-process)
    tails_read_per_s: float = 0.0  # open days read from the log directly (not kept by the rounds)
    non2xx: int = 0
    history_p50_s: float = 0.0
    history_p99_s: float = 0.0
    balance_p50_s: float = 0.0
    balance_p99_s: float = 0.0
    charges: int = 0
    cpu_us_per_req: float = 0.0  # the service's processes, all workers
    peak_rss_mib: float = 0.0  # the same, summed
    # Redis calls that failed, and those of them that timed out while a worker was overloaded
    # (not counted against Redis): failures beyond those open the circuit breaker.
    redis_errors: int = 0
    redis_overloaded: int = 0


@dataclass
class Charges:
    history: list[float] = field(default_factory=list)
    balance: list[float] = field(default_factory=list)


def charge_loop(url: str, db_path: Path, data: Data, seconds: float) -> Charges:
    """Charge polled tokens as the gateway does (the token's quota, then a log row) and time until
    the history and the balance show it."""
    found = Charges()
    gateway = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False, timeout=10)
    lock = threading.Lock()
    rng = random.Random(13)
    deadline = time.monotonic() + seconds

    def charger() -> None:
        with httpx.Client(timeout=10) as client:
            while time.monotonic() < deadline:
                token_id, key, user_id = rng.choice(data.tokens[1:])
                bearer = {"Authorization": f"Bearer sk-{key}"}
                history = client.get(url + HISTORY, headers=bearer)
                balance = client.get(url + BALANCE, headers=bearer)
                if history.status_code != 200 or balance.status_code != 200:
                    continue
                quota, used = history_quota(history.json()), balance.json()["data"]["total_used"]
                with lock:
                    gateway.execute(
                        "UPDATE tokens SET remain_quota = remain_quota - 100, used_quota = used_quota + 100,"
                        " accessed_time = ? WHERE id = ?",
                        (int(time.time()), token_id),
                    )
                    gateway.execute(
                        "INSERT INTO logs (user_id, created_at, type, content, username, token_name, model_name,"
                        " quota, prompt_tokens, completion_tokens, use_time, is_stream, channel_id, token_id,"
                        " `group`, ip, other) VALUES (?, ?, 2, '', ?, 'bench', 'gpt-4o-mini', 100, 10, 5, 1, 0, 1,"
                        " ?, 'default', '', '{}')",
                        (user_id, int(time.time()), f"user{user_id}", token_id),
                    )
                    written = time.monotonic()
                waiting = {"history", "balance"}
                while waiting and time.monotonic() < written + 10:
                    if "history" in waiting:
                        r = client.get(url + HISTORY, headers=bearer)
                        if r.status_code == 200 and history_quota(r.json()) >= quota + 100:
                            found.history.append(time.monotonic() - written)
                            waiting.discard("history")
                    if "balance" in waiting:
                        r = client.get(url + BALANCE, headers=bearer)
                        if r.status_code == 200 and r.json()["data"]["total_used"] >= used + 100:
                            found.balance.append(time.monotonic() - written)
                            waiting.discard("balance")
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.05, 0.3))

    threads = [threading.Thread(target=charger) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    gateway.close()
    return found


async def touch_all(url: str, data: Data, concurrency: int = 50) -> None:
    """Ask every token's history once, `concurrency` at a time."""
    queue = [key for _, key, _ in data.tokens]

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            key = queue.pop()
            answer = await client.get(HISTORY, headers={"Authorization": f"Bearer sk-{key}"})
            assert answer.status_code == 200, answer.text[:200]

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))


def run_polling(scenario: Scenario, db: Path, data: Data, redis_url: str, seconds: float) -> list[Polling]:
    """10,000 tokens polling their history once a second (and twice, and on two workers)."""
    runs = []
    env = {"SQLITE_PATH": str(db), "REDIS_CONN_STRING": redis_url, "PYTHONPATH": str(HERE.parent)}
    for config, rate, workers in (
        ("1 worker", TOKENS, 1),
        ("1 worker, 2x rate", 2 * TOKENS, 1),
        ("2 workers", TOKENS, 2),
    ):
        flush_redis(redis_url)
        server = Process(f"usage-service x{workers}", service_command(workers), env, "/healthz")
        try:
            connections = 200
            pause = 1000 * connections / rate
            extra = {"WRK_PAUSE_MS": str(int(pause))}
            # Every token's history read once (cold) first: measure polling from the steady state
            # on, not the first reads, however long those take.
            asyncio.run(touch_all(server.url, data))
            scenario.wrk(server, "paced", 3, connections=connections, extra_env=extra, path=HISTORY)
            # A token read once was read by one worker: the others compute its month from the
            # closed days in Redis on their first poll of it. Polled until that is over (or 30 s).
            for _ in range(10):
                days = metric(server.url, "usage_history_days_total")
                scenario.wrk(server, "paced", 3, connections=connections, extra_env=extra, path=HISTORY)
                if metric(server.url, "usage_history_days_total") - days < TOKENS // 10:
                    break
            for _ in range(2):  # as bench.run_freshness: move the pause by each pass's error
                calibration = scenario.wrk(
                    server,
                    "paced",
                    3,
                    connections=connections,
                    extra_env={"WRK_PAUSE_MS": str(int(pause))},
                    path=HISTORY,
                )
                pause = max(0.0, pause + 1000 * connections / rate - 1000 * connections / calibration.rps)
            extra = {"WRK_PAUSE_MS": str(int(pause))}
            holder: dict[str, Result] = {}

            def load(
                server: Process = server, extra: dict[str, str] = extra, holder: dict[str, Result] = holder
            ) -> None:
                count = lambda: int(statements(server.url))  # noqa: E731
                holder["r"] = scenario.wrk(
                    server, "paced", seconds, connections=200, db_count=count, extra_env=extra, path=HISTORY
                )

            redis_before = redis_failures(server.url)
            log_before, started = metric(server.url, STATEMENT_METRICS[1]), time.monotonic()
            read_before = read_from_log(server.url)
            thread = threading.Thread(target=load)
            thread.start()
            time.sleep(1)
            charges = charge_loop(server.url, db, data, seconds - 4)
            thread.join()
            took = time.monotonic() - started
            log_per_s = (metric(server.url, STATEMENT_METRICS[1]) - log_before) / took
            read_after = read_from_log(server.url)
            days_read, tails_read = ((read_after[i] - read_before[i]) / took for i in (0, 1))
            r = holder["r"]
            redis_after = redis_failures(server.url)
            errors, overloaded = redis_after[0] - redis_before[0], redis_after[1] - redis_before[1]
            run = Polling(
                config,
                rate,
                r.rps,
                r.db_per_s,
                log_per_s,
                days_read,
                tails_read,
                r.non2xx,
                charges=len(charges.history),
                cpu_us_per_req=r.cpu_us_per_req,
                peak_rss_mib=r.peak_rss_mib,
                redis_errors=errors,
                redis_overloaded=overloaded,
            )
            if charges.history:
                run.history_p50_s, run.history_p99_s = (
                    percentile(charges.history, 0.5),
                    percentile(charges.history, 0.99),
                )
            if charges.balance:
                run.balance_p50_s, run.balance_p99_s = (
                    percentile(charges.balance, 0.5),
                    percentile(charges.balance, 0.99),
                )
            runs.append(run)
            print(
                f"  {config:18} {run.rps:7.0f} req/s  {run.statements_per_s:5.1f} statements/s "
                f"({run.log_statements_per_s:.1f} of the log; {run.days_read_per_s:.1f} closed, "
                f"{run.tails_read_per_s:.1f} open days read from it)  "
                f"charge in history p99 {run.history_p99_s:.2f} s (balance {run.balance_p99_s:.2f} s)  "
                f"redis errors {run.redis_errors} ({run.redis_overloaded} overloaded)",
                flush=True,
            )
            for line in warnings_of(server):
                print(f"    the service said: {line}", flush=True)
        finally:
            server.stop()
    return runs


def warnings_of(server: Process, most: int = 10) -> list[str]:
    """The distinct warning (and worse) lines the service logged so far, the first `most`."""
    server.log.seek(0)
    lines = server.log.read().decode(errors="replace").splitlines()
    found = dict.fromkeys(line for line in lines if re.search(r"\b(WARNING|ERROR|CRITICAL)\b", line))
    return list(found)[:most]


def run_throughput(scenario: Scenario, db: Path, redis_url: str, seconds: float) -> dict[str, Result]:
    """The hot token's history and balance, warm, 50 connections, one worker pinned like bench.py's."""
    flush_redis(redis_url)
    env = {"SQLITE_PATH": str(db), "REDIS_CONN_STRING": redis_url, "PYTHONPATH": str(HERE.parent)}
    server = Process("usage-service", service_command(1), env, "/healthz")
    found = {}
    try:
        for name, path in (("balance", BALANCE), ("history", HISTORY)):
            # Warm: until the rounds keep the token's open days (a pass reads none from the log).
            # Before that each poll past the last direct read's second reads them again, and the
            # requests queued behind that read are the p99, not the warm route's.
            for _ in range(10):
                before = read_from_log(server.url)
                scenario.wrk(server, "hot", 2, path=path)
                if read_from_log(server.url) == before:
                    break
            found[name] = scenario.wrk(server, "hot", seconds, path=path)
    finally:
        server.stop()
    return found


# --- output ------------------------------------------------------------------------------------


def yes(met: bool) -> str:
    return "yes" if met else "NO"


def query_table(results: list[Query]) -> str:
    lines = [
        "| engine | plain GROUP BY ms | cold History.slots ms (statements) | cold route ms | cold ÷ plain "
        "| warm slots ms | warm route ms | log first page p50 / p99 ms | page 1 of 100 p50 / p99 ms "
        "| hot token's first page ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for q in results:
        ratio = max(q.cold_slots_ms, q.cold_route_ms) / q.plain_ms
        lines.append(
            f"| {q.engine} | {q.plain_ms:.0f} | {q.cold_slots_ms:.0f} ({q.cold_statements}) | {q.cold_route_ms:.0f} "
            f"| {ratio:.2f} | {q.warm_slots_ms:.3f} | {q.warm_route_ms:.2f} | {q.log_p50_ms:.1f} / {q.log_p99_ms:.1f} "
            f"| {q.paged_p50_ms:.1f} / {q.paged_p99_ms:.1f} | {q.log_hot_ms:.1f} |"
        )
    return "\n".join(lines)


def targets_table(queries: list[Query], throughput: dict[str, Result], polling: list[Polling]) -> str:
    lines = ["| target | measured | bound | met |", "|---|---|---|---|"]
    for q in queries:
        ratio = max(q.cold_slots_ms, q.cold_route_ms) / q.plain_ms
        lines.append(
            f"| {q.engine}: cold 30-day history ÷ plain GROUP BY | {ratio:.2f} | ≤ 0.50 | {yes(ratio <= 0.5)} |"
        )
        met = yes(q.log_p99_ms <= 20)
        lines.append(
            f"| {q.engine}: /api/log/token first page (the plain list, up to 1,000 rows) p99 "
            f"| {q.log_p99_ms:.1f} ms | ≤ 20 ms | {met} |"
        )
    if throughput:
        ratio = throughput["history"].rps / throughput["balance"].rps
        lines.append(
            f"| warm history req/s ÷ balance req/s (hot token, 1 worker) | {ratio:.2f} "
            f"({throughput['history'].rps:,.0f} ÷ {throughput['balance'].rps:,.0f}) | ≈ 1 | {yes(ratio >= 0.8)} |"
        )
    if polling:
        # Flat: whatever the rate and the workers, no load costs more than half again what the
        # rounds themselves cost on time (the balance's statement per 1,000 hot tokens and the
        # history's two, each second). A saturated worker's rounds run late and cost less.
        rounds = -(-TOKENS // REFRESH_CHUNK) + 2
        worst = max(p.statements_per_s for p in polling)
        lines.append(
            f"| statements/s, 10,000 tokens polling history at 1 Hz (1 worker, 2× rate, 2 workers) "
            f"| {', '.join(f'{p.statements_per_s:.1f}' for p in polling)} "
            f"| ≤ 30, flat (none over 1.5 × the rounds' {rounds}/s) | {yes(worst <= min(30, 1.5 * rounds))} |"
        )
        for p in polling:
            bound = max(p.balance_p99_s, 1.0)
            lines.append(
                f"| {p.config}: a charge in history, p99 (balance p99) | {p.history_p99_s:.2f} s "
                f"({p.balance_p99_s:.2f} s) | ≤ the balance's (about 1 s) | {yes(p.history_p99_s <= bound)} |"
            )
    return "\n".join(lines)


def polling_table(polling: list[Polling]) -> str:
    lines = [
        "| usage-service | target req/s | req/s | non-2xx | statements/s (the log's) "
        "| closed / open days read from the log per s | charges | history p50 / p99 s "
        "| balance p50 / p99 s | CPU µs/req | peak RSS MiB | Redis errors (overloaded) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in polling:
        lines.append(
            f"| {p.config} | {p.target_rps:,} | {p.rps:,.0f} | {p.non2xx:,} "
            f"| {p.statements_per_s:.1f} ({p.log_statements_per_s:.1f}) "
            f"| {p.days_read_per_s:.1f} / {p.tails_read_per_s:.1f} | {p.charges} "
            f"| {p.history_p50_s:.2f} / {p.history_p99_s:.2f} | {p.balance_p50_s:.2f} / {p.balance_p99_s:.2f} "
            f"| {p.cpu_us_per_req:.0f} | {p.peak_rss_mib:.0f} | {p.redis_errors} ({p.redis_overloaded}) |"
        )
    return "\n".join(lines)


# --- the run -----------------------------------------------------------------------------------


# The servers' caches sized as a gateway's database server holding this log would be (the tests'
# servers keep theirs tiny): MariaDB's buffer pool holds the 3.5 GB log, PostgreSQL keeps 1 GB
# of it in shared buffers and the rest in the OS's cache.
POSTGRES_OPTIONS = ("shared_buffers=1GB", "effective_cache_size=4GB")
MARIADB_OPTIONS = ("--innodb-buffer-pool-size=4G", "--innodb-log-file-size=1G")


@contextmanager
def engine_gateway(engine: str, rows: int) -> Iterator[tuple[Settings, Data, Any]]:
    """A PostgreSQL or MariaDB server holding the log (and the server), for one engine's
    measurements: each server runs alone, and is stopped before the next one starts."""
    from dbservers import MariaDBServer, MySQLGateway, PostgresGateway, PostgresServer

    server = PostgresServer(POSTGRES_OPTIONS) if engine == "postgres" else MariaDBServer(MARIADB_OPTIONS)
    server.start()
    try:
        gateway = (PostgresGateway if engine == "postgres" else MySQLGateway)(server, "history")
        data = server_data(engine, gateway, rows)
        gateway.close()
        settle()
        yield Settings(database=gateway.database, db_timeout=60.0), data, server
    finally:
        server.stop()


# The index docs/databases.md advises on PostgreSQL, whose idx_logs_token_id does not carry the row id.
ADVISED_INDEX = "CREATE INDEX idx_logs_token_id_id ON logs (token_id, id)"


def add_token_order_index(server: Any) -> tuple[Path, ...]:
    """Create the advised index as an operator would (then the planner's statistics, as
    autovacuum would take them); return the index's files."""
    import psycopg

    before = set(server.dir.glob("data/base/*/*"))
    started = time.monotonic()
    with psycopg.connect(server.url("history"), autocommit=True) as admin:
        admin.execute(ADVISED_INDEX)
        admin.execute("VACUUM ANALYZE logs")
    print(f"  postgres: {ADVISED_INDEX} in {time.monotonic() - started:.0f} s", flush=True)
    return tuple(set(server.dir.glob("data/base/*/*")) - before)


def settle(most: float = 180.0) -> None:
    """Wait (at most `most` seconds) until the machine's CPUs are nearly idle: a server that
    has just loaded 10,000,000 rows goes on working for a while (InnoDB's purge and flushing
    for minutes), and would be timed along with the queries."""
    started = time.monotonic()

    def busy() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
        return sum(fields) - fields[3] - fields[4], sum(fields)  # all but idle and iowait

    while time.monotonic() - started < most:
        before = busy()
        time.sleep(2)
        after = busy()
        if (after[0] - before[0]) / max(1, after[1] - before[1]) < 0.10:
            break
    print(f"  settled in {time.monotonic() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000, help="log rows (default 10,000,000)")
    parser.add_argument("--quick", action="store_true", help="200,000 rows and short loads: a smoke run")
    parser.add_argument("--engines", action="store_true", help="also measure the queries on PostgreSQL and MariaDB")
    parser.add_argument("--seconds", type=float, default=20, help="per polling load (default 20)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "polling"])
    args = parser.parse_args()
    if args.quick:
        args.rows, args.seconds = min(args.rows, 200_000), min(args.seconds, 8)
    repeat = 5
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    db, data = sqlite_data(args.rows)
    print(
        f"bench/history: {args.rows:,} log rows over {DAYS} days, token {HOT_TOKEN} holding {args.rows // 10:,}; "
        f"{os.cpu_count()} cores",
        flush=True,
    )
    sections = []
    with tempfile.TemporaryDirectory(prefix="usage-history-") as tmp, redis_server(Path(tmp)) as redis_url:
        workdir = Path(tmp)
        # A first read of a cold 3 GB file may outlast the default timeout: these time reads, not limits.
        settings = Settings(sqlite_path=db, redis_url=redis_url, db_timeout=60.0)
        with resident(data.files):
            queries = [asyncio.run(measure_query("sqlite", settings, data, redis_url, repeat))]
        if args.engines:
            for engine in ("postgres", "mysql"):
                with engine_gateway(engine, args.rows) as (engine_settings, engine_data, server):
                    engine_settings = replace(engine_settings, redis_url=redis_url)
                    measured = functools.partial(
                        measure_query, settings=engine_settings, data=engine_data, redis_url=redis_url
                    )
                    with resident(engine_data.files):
                        queries.append(asyncio.run(measured(engine, repeat=repeat)))
                        if engine == "postgres":  # again with the index the docs advise there
                            with resident(add_token_order_index(server)):
                                settle()
                                queries.append(asyncio.run(measured("postgres + (token_id, id)", repeat=repeat)))
        sections.append(
            f"## Cold and warm history, first log page ({RANGE_DAYS} days of the token holding "
            f"{args.rows // 10:,} rows; median of {repeat})\n\n" + query_table(queries)
        )
        keys_file = workdir / "keys.txt"
        keys_file.write_text("\n".join(key for _, key, _ in data.tokens) + "\n")
        scenario = Scenario(workdir, keys_file, data.hot_key)
        throughput: dict[str, Result] = {}
        polling: list[Polling] = []
        try:
            if "throughput" not in args.skip:
                throughput = run_throughput(scenario, db, redis_url, 3 if args.quick else 8)
                sections.append(
                    "## Warm, the hot token (1 worker, 50 connections)\n\n| route | req/s | p50 ms | p99 ms |\n"
                    "|---|---:|---:|---:|\n"
                    + "\n".join(
                        f"| {name} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} |" for name, r in throughput.items()
                    )
                )
            if "polling" not in args.skip:
                polling = run_polling(scenario, db, data, redis_url, args.seconds)
                sections.append(
                    "## 10,000 tokens polling their history once a second: database cost and freshness\n\n"
                    + polling_table(polling)
                )
        finally:
            # The rows the charges appended: the cached file keeps the generated log only.
            cleanup = sqlite3.connect(db)
            cleanup.execute("DELETE FROM logs WHERE id > ?", (data.rows,))
            cleanup.commit()
            cleanup.close()
        sections.append("## Targets (issue 13, measured in this run)\n\n" + targets_table(queries, throughput, polling))
    print("\n" + "\n\n".join(sections))


if __name__ == "__main__":
    main()
