from __future__ import annotations

from pathlib import Path

import pytest

from usage_service.config import ConfigError, Settings, check_database_file, load_settings


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
        pytest.param({"SQL_DSN": "postgres://u:p@db/new-api"}, "SQL_DSN", "PostgreSQL", id="postgres"),
        pytest.param({"SQL_DSN": "postgresql://u:p@db/new-api"}, "SQL_DSN", "not supported yet", id="postgresql"),
        pytest.param({"SQL_DSN": "root:pw@tcp(db:3306)/new-api"}, "SQL_DSN", "MySQL", id="mysql"),
        pytest.param({"SQLITE_PATH": "?_busy_timeout=1"}, "SQLITE_PATH", "names no file", id="no-file"),
        pytest.param({"REDIS_CONN_STRING": "http://cache"}, "REDIS_CONN_STRING", "scheme", id="bad-scheme"),
        pytest.param({"REDIS_CONN_STRING": "redis://cache:port"}, "REDIS_CONN_STRING", "malformed", id="bad-port"),
        pytest.param({"REDIS_CONN_STRING": "redis://"}, "REDIS_CONN_STRING", "no host", id="no-host"),
        pytest.param({"USAGE_CACHE_TTL": "five"}, "USAGE_CACHE_TTL", "number", id="ttl-not-a-number"),
        pytest.param({"USAGE_CACHE_TTL": "-1"}, "USAGE_CACHE_TTL", ">=", id="ttl-negative"),
        pytest.param({"USAGE_CACHE_TTL": "0"}, "USAGE_CACHE_TTL", ">=", id="ttl-zero"),
        pytest.param({"USAGE_CACHE_TTL": "nan"}, "USAGE_CACHE_TTL", "finite", id="ttl-nan"),
        pytest.param({"USAGE_CACHE_TTL": "inf"}, "USAGE_CACHE_TTL", "finite", id="ttl-inf"),
        pytest.param({"USAGE_LOCAL_CACHE_SIZE": "0"}, "USAGE_LOCAL_CACHE_SIZE", ">= 1", id="size-zero"),
        pytest.param({"USAGE_LOCAL_CACHE_SIZE": "1e3"}, "USAGE_LOCAL_CACHE_SIZE", "whole number", id="size-float"),
        pytest.param({"USAGE_DB_POOL_SIZE": "1000"}, "USAGE_DB_POOL_SIZE", "between", id="pool-too-big"),
        pytest.param({"USAGE_REDIS_PREFIX": "a b"}, "USAGE_REDIS_PREFIX", "spaces", id="prefix-space"),
        pytest.param({"USAGE_METRICS": "maybe"}, "USAGE_METRICS", "on or off", id="metrics-switch"),
        pytest.param({"USAGE_METRICS_ADDRESS": "9100"}, "USAGE_METRICS_ADDRESS", "host:port", id="addr-no-host"),
        pytest.param({"USAGE_METRICS_ADDRESS": "h:99999"}, "USAGE_METRICS_ADDRESS", "host:port", id="addr-port"),
        pytest.param({"USAGE_LOG_FORMAT": "xml"}, "USAGE_LOG_FORMAT", "text, json", id="log-format"),
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
