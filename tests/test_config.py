from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from usage_service._dsn import MySQLDSN, PostgresDSN
from usage_service.cli import _host, _port, build_parser
from usage_service.config import (
    TABLE,
    ConfigError,
    Settings,
    Variable,
    check_database_file,
    load_settings,
    markdown_table,
)


def test_defaults_match_the_gateway() -> None:
    settings = load_settings({})
    assert settings == Settings()
    assert settings.sqlite_path == Path("one-api.db")
    assert settings.redis_url is None
    assert settings.cache_ttl == 5.0


@pytest.mark.parametrize(
    ("env", "field", "expected"),
    [
        pytest.param({"SQL_DSN": "local"}, "sqlite_path", Path("one-api.db"), id="dsn-local-means-sqlite"),
        pytest.param({"SQL_DSN": "  "}, "sqlite_path", Path("one-api.db"), id="dsn-blank-means-sqlite"),
        pytest.param(
            {"SQLITE_PATH": "one-api.db?_busy_timeout=30000"},
            "sqlite_path",
            Path("one-api.db"),
            id="gateway-query-suffix-accepted",
        ),
        pytest.param({"SQLITE_PATH": "/data/x.db"}, "sqlite_path", Path("/data/x.db"), id="absolute-path"),
        pytest.param(
            {"REDIS_CONN_STRING": "redis://:pw@cache:6379/2"}, "redis_url", "redis://:pw@cache:6379/2", id="redis-url"
        ),
        pytest.param({"REDIS_CONN_STRING": "rediss://cache:6380"}, "redis_url", "rediss://cache:6380", id="tls"),
        pytest.param(
            # go-redis's options, as the gateway takes them: checked, and left to the service's own settings.
            {"REDIS_CONN_STRING": "redis://:pw@cache:6379/2?dial_timeout=5s&read_timeout=3&pool_size=20&pool_fifo=1"},
            "redis_url",
            "redis://:pw@cache:6379/2",
            id="redis-gateway-options",
        ),
        pytest.param(
            {"REDIS_CONN_STRING": "redis://:pw@cache:6379/2?db=3&min_idle_conns=&idle_timeout=-1"},
            "redis_url",
            "redis://:pw@cache:6379/3",
            id="redis-db-option-wins",
        ),
        pytest.param(
            {"REDIS_CONN_STRING": "unix:///run/redis.sock?db=4&write_timeout=1m30s"},
            "redis_url",
            "unix:///run/redis.sock?db=4",
            id="redis-socket-db-option",
        ),
        pytest.param({"USAGE_CACHE_TTL": "0.5"}, "cache_ttl", 0.5, id="float-ttl"),
        pytest.param({"USAGE_CACHE_TTL": "0.5"}, "local_ttl", 0.5, id="local-ttl-capped-by-cache-ttl"),
        pytest.param({"USAGE_LOCAL_TTL": "0.2"}, "local_ttl", 0.2, id="local-ttl"),
        pytest.param({"USAGE_NEGATIVE_TTL": "0"}, "negative_ttl", 0.0, id="negative-cache-off"),
        pytest.param({"USAGE_DB_POOL_SIZE": "2"}, "db_pool_size", 2, id="pool-size"),
        pytest.param({"USAGE_METRICS": "off"}, "metrics", False, id="metrics-off"),
        pytest.param({"USAGE_METRICS": "ON"}, "metrics", True, id="metrics-on"),
        pytest.param({"USAGE_METRICS_ADDRESS": "127.0.0.1:9100"}, "metrics_address", ("127.0.0.1", 9100), id="addr"),
        pytest.param({"USAGE_METRICS_ADDRESS": "[::1]:9100"}, "metrics_address", ("::1", 9100), id="addr-ipv6"),
        pytest.param({"USAGE_LOG_FORMAT": "json"}, "log_format", "json", id="json-logs"),
        pytest.param({"USAGE_LOG_FORMAT": "JSON"}, "log_format", "json", id="json-logs-any-case"),
        pytest.param(
            {
                "REDIS_CONN_STRING": "redis://cache:6379",
                "USAGE_REDIS_MODE": "sentinel",
                "USAGE_REDIS_SENTINELS": "s1, s2:26380",
            },
            "redis_sentinels",
            (("s1", 26379), ("s2", 26380)),
            id="sentinels-default-port",
        ),
        pytest.param({"USAGE_ACCESS_LOG": "yes"}, "access_log", True, id="access-log"),
        pytest.param({"USAGE_CORS_ORIGINS": ""}, "cors_origins", ("*",), id="cors-default"),
        pytest.param({"USAGE_CORS_ORIGINS": "off"}, "cors_origins", (), id="cors-off"),
        pytest.param(
            {"USAGE_CORS_ORIGINS": "https://Dash.example.com/, http://127.0.0.1:8080"},
            "cors_origins",
            ("https://dash.example.com", "http://127.0.0.1:8080"),
            id="cors-list",
        ),
        pytest.param({"USAGE_CORS_ORIGINS": "https://a.example, *"}, "cors_origins", ("*",), id="cors-star-wins"),
    ],
)
def test_reads_variables(env: dict[str, str], field: str, expected: object) -> None:
    assert getattr(load_settings(env), field) == expected


@pytest.mark.parametrize(
    ("env", "variable", "words"),
    [
        pytest.param({"SQL_DSN": "postgres://u:s3cret@db:port/x"}, "SQL_DSN", "PostgreSQL URL", id="postgres-bad-port"),
        # An OverflowError in asyncpg, 79 lines of it.
        pytest.param({"SQL_DSN": "postgres://u:s3cret@db:99999/x"}, "SQL_DSN", "1 and 65535", id="postgres-port-big"),
        pytest.param({"SQL_DSN": "postgres://u:s3cret@db:0/x"}, "SQL_DSN", "1 and 65535", id="postgres-port-zero"),
        pytest.param(
            {"SQL_DSN": "postgres://u:s3cret%zz@db/x"}, "SQL_DSN", "starts no escape", id="postgres-bad-escape"
        ),
        pytest.param(
            {"SQL_DSN": "postgres://u:s3cret@db/x%2"}, "SQL_DSN", "starts no escape", id="postgres-bad-escape-db"
        ),
        pytest.param({"SQL_DSN": "root:s3cret@tcp(db:3306)"}, "SQL_DSN", "missing the '/'", id="mysql-no-slash"),
        pytest.param({"SQL_DSN": "root:s3cret@tcp(db:3306/new-api"}, "SQL_DSN", "missing ')'", id="mysql-unterminated"),
        pytest.param({"SQL_DSN": "root:s3cret@tcp(db)/d?loc=Asia/Shanghai"}, "SQL_DSN", "escape", id="mysql-unescaped"),
        pytest.param({"SQL_DSN": "root:s3cret@tcp(db:port)/d"}, "SQL_DSN", "port", id="mysql-bad-port"),
        pytest.param({"SQL_DSN": "root:s3cret@tcp(db:0)/d"}, "SQL_DSN", "port", id="mysql-port-zero"),
        pytest.param({"SQL_DSN": "root:s3cret@db:3306/new-api"}, "SQL_DSN", "protocol", id="mysql-no-protocol"),
        pytest.param({"SQL_DSN": "root:s3cret@udp(db)/d"}, "SQL_DSN", "protocol", id="mysql-udp"),
        pytest.param({"SQL_DSN": "root:s3cret/d"}, "SQL_DSN", "protocol", id="mysql-no-at"),
        # urllib's own message would quote the URL up to the '/': the password's first part.
        pytest.param({"SQL_DSN": "postgresql://u:s3cret/Rt@db:5432/x"}, "SQL_DSN", "port", id="postgres-slash"),
        pytest.param({"LOG_SQL_DSN": "postgres://u:s3cret#x@db/x"}, "LOG_SQL_DSN", "port", id="log-postgres-hash"),
        pytest.param({"SQL_DSN": "root:s3cret@tcp(db)/d?timeout=soon"}, "SQL_DSN", "duration", id="mysql-timeout"),
        pytest.param({"SQL_DSN": "root:s3cret@tcp(db)/d?parseTime=yes"}, "SQL_DSN", "true or false", id="mysql-bool"),
        pytest.param({"SQL_DSN": "root:s3cret@tcp(db)/d?tls=custom"}, "SQL_DSN", "tls", id="mysql-custom-tls"),
        pytest.param({"SQLITE_PATH": "?_busy_timeout=1"}, "SQLITE_PATH", "names no file", id="no-file"),
        pytest.param({"REDIS_CONN_STRING": "http://cache"}, "REDIS_CONN_STRING", "scheme", id="bad-scheme"),
        pytest.param({"REDIS_CONN_STRING": "redis://cache:port"}, "REDIS_CONN_STRING", "malformed", id="bad-port"),
        pytest.param({"REDIS_CONN_STRING": "redis://"}, "REDIS_CONN_STRING", "no host", id="no-host"),
        # A password's / ? or # ends the host part early: urllib's own message quoted the password's
        # first part as the port.
        pytest.param({"REDIS_CONN_STRING": "redis://:s3cret/x@c:6379/0"}, "REDIS_CONN_STRING", "%2F", id="pw-slash"),
        pytest.param({"REDIS_CONN_STRING": "redis://:s3cret?x@cache/0"}, "REDIS_CONN_STRING", "%3F", id="pw-question"),
        pytest.param({"REDIS_CONN_STRING": "redis://:s3cret#x@cache:6379"}, "REDIS_CONN_STRING", "%23", id="pw-hash"),
        pytest.param({"REDIS_CONN_STRING": "redis://u:pw/s3cret@c/0"}, "REDIS_CONN_STRING", "password", id="pw-path"),
        # The query string was first read by redis-py in every worker: a traceback, then a hang.
        pytest.param(
            {"REDIS_CONN_STRING": "redis://:s3cret@cache/0?db=abc"},
            "REDIS_CONN_STRING",
            "is a number",
            id="redis-db-abc",
        ),
        pytest.param(
            {"REDIS_CONN_STRING": "redis://:s3cret@cache/0?socket_timeout=5"},
            "REDIS_CONN_STRING",
            "unknown option 'socket_timeout'",
            id="redis-py-option",
        ),
        pytest.param(
            {"REDIS_CONN_STRING": "redis://:s3cret@cache/0?dial_timeout=soon"},
            "REDIS_CONN_STRING",
            "dial_timeout is not a duration",
            id="redis-bad-duration",
        ),
        pytest.param(
            {"REDIS_CONN_STRING": "redis://:s3cret@cache/0?pool_size=1e3"},
            "REDIS_CONN_STRING",
            "pool_size is not a whole number",
            id="redis-bad-number",
        ),
        pytest.param(
            {"REDIS_CONN_STRING": "redis://:s3cret@cache/0?pool_fifo=yes"},
            "REDIS_CONN_STRING",
            "pool_fifo is not true",
            id="redis-bad-boolean",
        ),
        pytest.param(
            {"REDIS_CONN_STRING": "redis://:s3cret@cache:7000?db=1", "USAGE_REDIS_MODE": "cluster"},
            "REDIS_CONN_STRING",
            "only database 0",
            id="redis-cluster-db-option",
        ),
        pytest.param(
            {
                "REDIS_CONN_STRING": "redis://:s3cret@mymaster?db=abc",
                "USAGE_REDIS_MODE": "sentinel",
                "USAGE_REDIS_SENTINELS": "127.0.0.1:26379",
            },
            "REDIS_CONN_STRING",
            "is a number",
            id="redis-sentinel-db-abc",
        ),
        pytest.param({"USAGE_CACHE_TTL": "five"}, "USAGE_CACHE_TTL", "number", id="ttl-not-a-number"),
        pytest.param({"USAGE_CACHE_TTL": "-1"}, "USAGE_CACHE_TTL", "from", id="ttl-negative"),
        pytest.param({"USAGE_CACHE_TTL": "0"}, "USAGE_CACHE_TTL", "from", id="ttl-zero"),
        pytest.param({"USAGE_DB_TIMEOUT": "0"}, "USAGE_DB_TIMEOUT", "from 0.1", id="db-timeout-zero"),
        # Past it, every Redis write whose expiry derives from it failed, silently.
        pytest.param({"USAGE_STALE_IF_ERROR": "1e16"}, "USAGE_STALE_IF_ERROR", "to 1e+09", id="seconds-huge"),
        pytest.param({"USAGE_CACHE_TTL": "nan"}, "USAGE_CACHE_TTL", "finite", id="ttl-nan"),
        pytest.param({"USAGE_CACHE_TTL": "inf"}, "USAGE_CACHE_TTL", "finite", id="ttl-inf"),
        pytest.param({"USAGE_LOCAL_CACHE_SIZE": "0"}, "USAGE_LOCAL_CACHE_SIZE", ">= 1", id="size-zero"),
        pytest.param({"USAGE_LOCAL_CACHE_SIZE": "1e3"}, "USAGE_LOCAL_CACHE_SIZE", "whole number", id="size-float"),
        pytest.param({"USAGE_DB_POOL_SIZE": "1000"}, "USAGE_DB_POOL_SIZE", "between", id="pool-too-big"),
        pytest.param({"USAGE_REDIS_PREFIX": "a b"}, "USAGE_REDIS_PREFIX", "spaces", id="prefix-space"),
        pytest.param({"USAGE_METRICS": "maybe"}, "USAGE_METRICS", "on or off", id="metrics-switch"),
        pytest.param({"USAGE_METRICS_ADDRESS": "9100"}, "USAGE_METRICS_ADDRESS", "host:port", id="addr-no-host"),
        pytest.param({"USAGE_METRICS_ADDRESS": "h:99999"}, "USAGE_METRICS_ADDRESS", "host:port", id="addr-port"),
        # Seconds are taken up to 1e9 whatever the setting, whole seconds too.
        pytest.param(
            {"USAGE_RETRY_AFTER": "99999999999999"}, "USAGE_RETRY_AFTER", "whole number", id="retry-after-huge"
        ),
        pytest.param({"USAGE_LOG_FORMAT": "xml"}, "USAGE_LOG_FORMAT", "text, json", id="log-format"),
        # Port 0 is no sentinel's: it was taken as "no port" and became 26379.
        pytest.param({"USAGE_REDIS_SENTINELS": "s1:0"}, "USAGE_REDIS_SENTINELS", "host:port", id="sentinel-port-0"),
        pytest.param({"USAGE_CORS_ORIGINS": "dash.example.com"}, "USAGE_CORS_ORIGINS", "origins like", id="no-scheme"),
        pytest.param({"USAGE_CORS_ORIGINS": "https://a.example/app"}, "USAGE_CORS_ORIGINS", "origins", id="path"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    message = str(info.value)
    assert message.startswith(f"{variable}: ")
    assert words in message
    assert "\n" not in message
    assert "s3cret" not in message


def test_redis_password_stays_out_of_repr() -> None:
    settings = load_settings({"REDIS_CONN_STRING": "redis://:hunter2@cache:6379"})
    assert "hunter2" not in repr(settings)


def test_missing_database_file_is_an_error_and_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "nope.db"
    with pytest.raises(ConfigError, match=r"^SQLITE_PATH: .*does not exist"):
        check_database_file(load_settings({"SQLITE_PATH": str(path)}))
    assert not path.exists()


def test_directory_is_not_a_database(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^SQLITE_PATH: .*not a file"):
        check_database_file(load_settings({"SQLITE_PATH": str(tmp_path)}))


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        pytest.param(
            "root:pw@tcp(db:3306)/new-api?charset=utf8mb4&parseTime=True&loc=Local",
            MySQLDSN(user="root", password="pw", host="db", port=3306, database="new-api"),
            id="gateway-example",
        ),
        pytest.param(
            "u:pw@tcp(db:3307)/x", MySQLDSN(user="u", password="pw", host="db", port=3307, database="x"), id="port"
        ),
        pytest.param("u:pw@tcp(db)/x", MySQLDSN(user="u", password="pw", host="db", database="x"), id="default-port"),
        pytest.param(
            "u:p@ss:w/rd@tcp(db)/x",
            MySQLDSN(user="u", password="p@ss:w/rd", host="db", database="x"),
            id="odd-password",
        ),
        pytest.param("u@tcp([::1]:3310)/x", MySQLDSN(user="u", host="::1", port=3310, database="x"), id="ipv6"),
        pytest.param("/new-api", MySQLDSN(database="new-api"), id="all-defaults"),
        pytest.param("u:pw@/new-api", MySQLDSN(user="u", password="pw", database="new-api"), id="default-address"),
        pytest.param(
            "u@unix(/run/mysqld/mysqld.sock)/x",
            MySQLDSN(user="u", unix_socket="/run/mysqld/mysqld.sock", database="x"),
            id="unix-socket",
        ),
        pytest.param("u@unix/x", MySQLDSN(user="u", unix_socket="/tmp/mysql.sock", database="x"), id="unix-default"),
        pytest.param("u@tcp(db)/new%2Dapi", MySQLDSN(user="u", host="db", database="new-api"), id="escaped-name"),
        pytest.param(
            "u@tcp(db)/x?timeout=1m30s&charset=utf8mb4,utf8&tls=skip-verify&loc=Asia%2FShanghai",
            MySQLDSN(user="u", host="db", database="x", connect_timeout=90.0, tls="skip-verify"),
            id="params",
        ),
        pytest.param(
            # MySQL 8's name for utf8, first in a list; a tls value in capitals (go-sql-driver takes both).
            "u@tcp(db)/x?charset=utf8mb3,utf8mb4&tls=SKIP-VERIFY",
            MySQLDSN(user="u", host="db", database="x", charset="utf8", tls="skip-verify"),
            id="utf8mb3-and-capitals",
        ),
        pytest.param(
            "u@tcp(db)/x?timeout=500ms&tls=true",
            MySQLDSN(user="u", host="db", database="x", connect_timeout=0.5, tls="true"),
            id="ms",
        ),
        pytest.param(
            # Several hosts (failover), and parameters the gateway's driver reads itself: asyncpg
            # would send them to the server as settings, which it refuses.
            "postgres://u:pw@db1:5432,db2:5433/new-api?connect_timeout=10&sslmode=require&statement_cache_capacity=0",
            PostgresDSN("postgres://u:pw@db1:5432,db2:5433/new-api?sslmode=require", host="db1", database="new-api"),
            id="postgres-failover-and-pgx-parameters",
        ),
        pytest.param(
            # An empty entry in the host list (a trailing comma) is skipped by the gateway's driver
            # (pgx); asyncpg, handed it, failed with an IndexError: a traceback at start-up.
            "postgres://u:pw@,db1:5432,,db2:5433,/new-api",
            PostgresDSN("postgres://u:pw@db1:5432,db2:5433/new-api", host="db1", database="new-api"),
            id="postgres-empty-host-entries",
        ),
        pytest.param(
            "postgres://u:pw@db:5432/new-api?sslmode=disable",
            PostgresDSN("postgres://u:pw@db:5432/new-api?sslmode=disable", host="db", database="new-api"),
            id="postgres",
        ),
        pytest.param(
            "postgresql://u:pw@db/x", PostgresDSN("postgresql://u:pw@db/x", host="db", database="x"), id="postgresql"
        ),
        pytest.param(
            # The gateway's URL parser ends the password at the last '@', asyncpg at the first.
            "postgres://u:p@ss:w%2Frd@db/x",
            PostgresDSN("postgres://u:p%40ss%3Aw%2Frd@db/x", host="db", database="x"),
            id="postgres-password-with-at",
        ),
        pytest.param("local", None, id="local"),
        pytest.param("local-sqlite", None, id="local-anything"),
    ],
)
def test_sql_dsn_in_the_gateways_forms(dsn: str, expected: object) -> None:
    assert load_settings({"SQL_DSN": dsn}).database == expected


def test_database_password_stays_out_of_repr() -> None:
    for dsn in ("root:hunter2@tcp(db:3306)/new-api", "postgres://root:hunter2@db/new-api"):
        settings = load_settings({"SQL_DSN": dsn})
        assert "hunter2" not in repr(settings)
        assert settings.database is not None and "hunter2" not in settings.database.describe()


def test_database_server_needs_no_sqlite_file(tmp_path: Path) -> None:
    check_database_file(load_settings({"SQL_DSN": "u@tcp(db)/x", "SQLITE_PATH": str(tmp_path / "nope.db")}))


# --- each default stated once: the table in config.py, and what is generated or checked from it

ENV_FILE = Path(__file__).resolve().parents[1] / "config" / "usage-service.env"
# What the example file sets, on purpose, to something other than the default.
EXAMPLE_VALUES = {"REDIS_CONN_STRING": "redis://127.0.0.1:6379/0"}


def env_file_entries() -> dict[str, tuple[str, str | None, bool]]:
    """NAME -> (value, the "# Default:" line above it, commented out) for each variable line."""
    entries: dict[str, tuple[str, str | None, bool]] = {}
    default = None
    for line in ENV_FILE.read_text().splitlines():
        if line.startswith("# Default: "):
            default = line.removeprefix("# Default: ")
        elif match := re.fullmatch(r"(#?)([A-Z][A-Z0-9_]*)=(.*)", line):
            commented, name, value = match.groups()
            assert name not in entries, f"{name} is listed twice"
            entries[name] = (value, default, bool(commented))
            default = None
    return entries


def test_every_setting_has_one_row_and_takes_its_default_from_it() -> None:
    fields = [v.field for v in TABLE if v.field is not None]
    assert sorted(fields) == sorted(f.name for f in dataclasses.fields(Settings))
    assert len({v.name for v in TABLE}) == len(TABLE)
    for variable in TABLE:
        if variable.field is not None:
            assert getattr(Settings(), variable.field) == variable.default, variable.name
    assert load_settings({}) == Settings()


@pytest.mark.parametrize("variable", TABLE, ids=lambda v: v.name)
def test_the_example_env_file_states_the_tables_default(variable: Variable) -> None:
    entries = env_file_entries()
    assert variable.name in entries, f"{variable.name} is missing from {ENV_FILE.name}"
    value, stated, commented = entries[variable.name]
    assert stated == variable.shown_default
    if not commented:  # a commented-out line is an example of a value, not the default
        default = "" if variable.shown_default.startswith("(") else variable.shown_default
        assert value == EXAMPLE_VALUES.get(variable.name, default)


def test_the_example_env_file_lists_nothing_else_and_loads() -> None:
    entries = env_file_entries()
    assert set(entries) == {v.name for v in TABLE}
    load_settings({name: value for name, (value, _, commented) in entries.items() if not commented})


def test_help_and_the_docs_table_come_from_the_table() -> None:
    table = markdown_table().splitlines()
    assert table[:2] == ["| Variable | Default | Meaning |", "|---|---|---|"]
    assert len(table) == 2 + len(TABLE)
    for row, variable in zip(table[2:], TABLE, strict=True):
        assert row.startswith(f"| `{variable.name}` | `{variable.shown_default}` | ")
    epilog = build_parser().epilog or ""
    for variable in TABLE:
        assert f"{variable.name:<26} default {variable.shown_default}: {variable.doc}" in epilog


def test_the_configuration_page_shows_the_table_as_generated() -> None:
    """docs/configuration.md carries `python -m usage_service.config --markdown`'s table verbatim."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    assert markdown_table() in page, "regenerate it: .venv/bin/python -m usage_service.config --markdown"


@pytest.mark.parametrize(
    ("flag", "address"),
    [
        ("0.0.0.0", "0.0.0.0"),
        ("::1", "::1"),
        ("localhost", "127.0.0.1"),
        ("999.1.1.1", None),
    ],
)
def test_host_is_an_address_or_a_name_that_resolves(flag: str, address: str | None) -> None:
    """Either server is given an address (granian takes no names): a name is resolved first;
    what is neither an address nor a name this machine resolves stops start-up in one line."""
    if address is None:
        with pytest.raises(ConfigError, match="--host: .* is no IP address"):
            _host(flag)
    else:
        assert _host(flag) == address


@pytest.mark.parametrize("blank", ["", " ", "\t"])
def test_a_blank_variable_means_its_default_for_the_ones_read_by_hand_too(
    blank: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The docs' "an empty variable means its default" (configuration.md) holds for the variables
    read outside TABLE's parsers: the listen port, and the sentinels' password."""
    monkeypatch.setenv("PORT", blank)
    assert _port(None) == 3001
    assert load_settings({"USAGE_REDIS_SENTINEL_PASSWORD": blank}).redis_sentinel_password is None


def test_a_metrics_address_with_metrics_off_stops_start_up() -> None:
    """Two settings that contradict each other are refused, as the Redis topology's are."""
    with pytest.raises(ConfigError, match="USAGE_METRICS_ADDRESS: set, but USAGE_METRICS is off"):
        load_settings({"USAGE_METRICS": "off", "USAGE_METRICS_ADDRESS": "127.0.0.1:9100"})
    assert load_settings({"USAGE_METRICS": "off"}).metrics_address is None


@pytest.mark.parametrize("path", ["/abc", "/0x1", "/1/2", "/-1"])
def test_a_redis_database_that_is_no_number_stops_start_up(path: str) -> None:
    """redis-py reads such a URL as database 0; the gateway refuses it, and so does the service."""
    with pytest.raises(ConfigError, match="REDIS_CONN_STRING: the database is a number") as refused:
        load_settings({"REDIS_CONN_STRING": f"redis://:secret@127.0.0.1:6379{path}"})
    assert "secret" not in str(refused.value)
    assert load_settings({"REDIS_CONN_STRING": "redis://127.0.0.1:6379/3"}).redis_url is not None
    assert load_settings({"REDIS_CONN_STRING": "redis://127.0.0.1:6379/"}).redis_url is not None


# Where the docs and the OpenAPI document name a setting with its default in brackets:
# "`USAGE_CACHE_TTL` (5 s)", "`USAGE_HISTORY_MAX_DAYS` days (100 by default)".
_STATED_DEFAULT = re.compile(r"`(USAGE_[A-Z_]+)`(?: days)? \((\d[\d,]*(?:\.\d+)?)(?: s)?(?: by default)?[),]")


def test_defaults_the_docs_state_in_passing_are_the_tables() -> None:
    root = Path(__file__).resolve().parents[1]
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "usage_service" / "openapi.json"]
    defaults = {v.name: v.default for v in TABLE}
    stated = [(page.name, m) for page in pages for m in _STATED_DEFAULT.finditer(page.read_text())]
    assert len(stated) >= 10  # the pattern still finds them
    for page, match in stated:
        name, number = match.group(1), float(match.group(2).replace(",", ""))
        assert number == defaults[name], f"{page}: {match.group(0)!r}, but the default is {defaults[name]}"
