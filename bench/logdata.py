"""A large gateway request log for the history benchmark, generated inside the database.

One statement per engine (`INSERT … SELECT` over a recursive CTE on SQLite, generate_series on
PostgreSQL, the SEQUENCE engine on MariaDB) writes `rows` log rows:
- ids ascending with time, spread evenly over DAYS days that end at `end`;
- one row in ten (`rows // 10`: 1,000,000 of 10,000,000) belongs to the hot token, id 1; the
  others are spread over tokens 2..TOKENS, whose user is `id % 1000 + 1` (bench.make_database);
- mostly consumes (type 2), 3% errors (type 5, no quota), 0.5% refunds (type 6);
- seven models, the cheap ones most used; `other` carries admin members, as the gateway writes.
Every value is a function of the row's number: the same parameters give the same log.
"""

from __future__ import annotations

DAYS = 90
HOT_TOKEN = 1
TOKENS = 10_000  # as bench.make_database makes them
HOT_SHARE = 10  # one row in HOT_SHARE is the hot token's

# (model, cumulative share in %), by popularity.
MODELS = (
    ("gpt-4o-mini", 40),
    ("gpt-4o", 60),
    ("claude-3-5-sonnet-20241022", 75),
    ("deepseek-chat", 85),
    ("o3", 90),
    ("gemini-2.0-flash", 95),
    ("text-embedding-3-small", 100),
)
OTHER = '{"model_ratio":1.5,"group_ratio":1,"completion_ratio":4,"admin_info":{"use_channel":["3"]}}'
ERROR = "upstream error: status code 429"


def columns(engine: str) -> str:
    group = "`group`" if engine != "postgres" else '"group"'
    return (
        "id, user_id, created_at, type, content, username, token_name, model_name, quota, prompt_tokens,"
        f" completion_tokens, use_time, is_stream, channel_id, token_id, {group}, ip, other"
    )


def select(engine: str, rows: int, end: int) -> str:
    """The SELECT list computing row `i` (1..rows) from a column named `i`, in the engine's dialect."""
    span = DAYS * 86400
    start = end - span
    token = f"(CASE WHEN i % {HOT_SHARE} = 0 THEN {HOT_TOKEN} ELSE (i * 7919) % {TOKENS - 1} + 2 END)"
    user = f"({token} % 1000 + 1)"
    # Residues modulo primes: the hot token's rows (every tenth) get the same mix as the others.
    kind = "(CASE WHEN (i * 31) % 199 < 6 THEN 5 WHEN (i * 31) % 199 = 6 THEN 6 ELSE 2 END)"
    share = "((i * 13) % 101)"
    model = "CASE " + " ".join(f"WHEN {share} < {bound} THEN '{name}'" for name, bound in MODELS[:-1])
    model += f" ELSE '{MODELS[-1][0]}' END"
    username = f"CONCAT('user', {user})" if engine == "mysql" else f"'user' || {user}"
    stream = "(i % 2 = 1)" if engine == "postgres" else "i % 2"
    offset = f"(i * {span}) DIV {rows}" if engine == "mysql" else f"(i * {span}) / {rows}"
    return (
        f"SELECT i, {user}, {start} + {offset}, {kind},"
        f" CASE WHEN {kind} = 5 THEN '{ERROR}' ELSE '' END, {username}, 'bench', {model},"
        f" CASE {kind} WHEN 5 THEN 0 WHEN 6 THEN 100 + i % 900 ELSE 50 + (i * 37) % 5000 END,"
        f" CASE WHEN {kind} = 2 THEN 10 + (i * 17) % 4000 ELSE 0 END,"
        f" CASE WHEN {kind} = 2 THEN (i * 23) % 1000 ELSE 0 END,"
        f" 1 + i % 30, {stream}, 1 + i % 20, {token}, 'default', '', '{OTHER}'"
    )


def insert(engine: str, first: int, last: int, rows: int, end: int) -> str:
    """One statement appending rows first..last (of `rows`) to `logs`."""
    body = select(engine, rows, end)
    if engine == "sqlite":
        return (
            f"WITH RECURSIVE seq(i) AS (SELECT {first} UNION ALL SELECT i + 1 FROM seq WHERE i < {last})"
            f" INSERT INTO logs ({columns(engine)}) {body} FROM seq"
        )
    if engine == "postgres":
        return (
            f"INSERT INTO logs ({columns(engine)}) {body} FROM generate_series(CAST({first} AS bigint), {last}) AS s(i)"
        )
    return f"INSERT INTO logs ({columns(engine)}) {body} FROM (SELECT seq AS i FROM seq_{first}_to_{last}) AS s"
