"""The access log and the JSON log format: what a line holds, and that no key ever reaches one."""

from __future__ import annotations

import json
import logging
import re

import pytest
from conftest import AppClient
from support import Gateway

from usage_service.access import logged_method, logged_path
from usage_service.logs import JSONFormatter, OneLineFormatter, TextFormatter, uvicorn_config
from usage_service.openapi import ROUTE_LABELS

URL = "/api/usage/token"
KEY = "Q7w" * 16  # shaped like a gateway key: 48 letters and digits


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [dict(r.args) for r in caplog.records if r.name == "usage_service.access"]  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_one_line_per_request(
    gateway: Gateway, app_client: AppClient, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    token = gateway.add_token()
    caplog.set_level(logging.INFO, logger="usage_service.access")
    async with app_client(access_log=True, redis_url=redis_url) as (_, client):
        await client.get(URL, headers=token.bearer)  # database
        await client.get(URL + "?key=sk-" + token.key, headers=token.bearer)  # in-process
        await client.get(URL, headers={"Authorization": "Bearer sk-nosuchkey123"})
        await client.get(URL, headers={"Authorization": "Bearer sk-nosuchkey123"})
        await client.head("/healthz")
    async with app_client(access_log=True, redis_url=redis_url) as (_, client):
        await client.get(URL, headers=token.bearer)  # another instance: Redis
    lines = access_lines(caplog)
    assert [(line["method"], line["path"], line["status"], line["layer"]) for line in lines] == [
        ("GET", URL, 200, "database"),
        ("GET", URL, 200, "local"),
        ("GET", URL, 401, "database"),
        ("GET", URL, 401, "negative"),
        ("HEAD", "/healthz", 200, "-"),
        ("GET", URL, 200, "redis"),
    ]
    for line in lines:
        assert line["client"] == "127.0.0.1"
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert token.key not in caplog.text


@pytest.mark.asyncio
async def test_access_log_without_metrics(
    gateway: Gateway, app_client: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="usage_service.access")
    async with app_client(access_log=True, metrics=False) as (_, client):
        await client.get("/healthz")
    assert [(line["path"], line["status"]) for line in access_lines(caplog)] == [("/healthz", 200)]


@pytest.mark.asyncio
async def test_access_log_is_off_by_default(
    gateway: Gateway, app_client: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="usage_service.access")
    async with app_client() as (_, client):
        await client.get("/healthz")
    assert access_lines(caplog) == []


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        pytest.param(URL, URL, id="route"),
        pytest.param("/api/usage/sk-" + "a1B2" * 12, "/api/usage/[redacted]", id="key-in-path"),
        pytest.param("/v1/" + "Z9" * 24 + "/x", "/v1/[redacted]/x", id="bare-key-in-path"),
        pytest.param("/api/usage/tok", "/api/usage/tok", id="short-words-stay"),
        # Keys may be short: any run after sk- or key= is redacted.
        pytest.param("/api/log/token;key=sk-qw7rtz", "/api/log/token;key=[redacted]", id="short-key"),
        pytest.param("/api/log/token;KEY=qw7rtz/x", "/api/log/token;KEY=[redacted]/x", id="short-bare-key"),
        pytest.param("/.well-known/openid-configuration", "/.well-known/openid-configuration", id="words-stay"),
        pytest.param(
            # 186 characters, then a key: cut at 200 first, its first 14 characters would stay.
            "/" + "a/" * 92 + "-" + KEY,
            "/" + "a/" * 92 + "-[redacted]",
            id="key-across-the-cut",
        ),
        pytest.param("/" + "x/" * 150 + "sk-" + KEY, "/" + "x/" * 99 + "x", id="key-past-the-cut"),
    ],
)
def test_paths_are_logged_without_key_material(path: str, logged: str) -> None:
    assert logged_path(path, ROUTE_LABELS) == logged


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        pytest.param("/a\nINFO:     forged", "/a\\x0aINFO:\\x20\\x20\\x20\\x20\\x20forged", id="newline"),
        pytest.param("/a\r\x1b[2J", "/a\\x0d\\x1b[2J", id="carriage-return-and-terminal-escape"),
        pytest.param('/a" 200 0.1ms local', "/a\\x22\\x20200\\x200.1ms\\x20local", id="quote"),
        pytest.param("/a\\x0a", "/a\\x5cx0a", id="backslash"),
        pytest.param("/a\u2028b\x85c", "/a\\u2028b\\x85c", id="unicode-line-breaks"),
        pytest.param("/caf\u00e9/\U0001f600", "/caf\\xe9/\\U0001f600", id="non-ascii"),
        pytest.param("/a/b-c_d.e~f?g", "/a/b-c_d.e~f?g", id="printable-ascii-stays"),
    ],
)
def test_paths_are_logged_escaped(path: str, logged: str) -> None:
    """A path (decoded: %0a is a newline) is logged on one line, inside its quotes."""
    assert logged_path(path, ROUTE_LABELS) == logged


@pytest.mark.parametrize(
    ("method", "logged"),
    [
        pytest.param("GET", "GET", id="http-methods-stay"),
        pytest.param("PROPFIND", "PROPFIND", id="short-words-stay"),
        pytest.param("sk-" + KEY, "[redacted]", id="a-key"),
        pytest.param("A\nINFO:", "A\\x0aINFO:", id="newline"),
    ],
)
def test_methods_are_logged_as_unknown_paths_are(method: str, logged: str) -> None:
    """granian hands the app any method token a client sends (uvicorn answers 400 to most)."""
    assert logged_method(method) == logged


ACCESS_LINE = re.compile(r'^(\S+) - "([A-Z]+) (\S+)" (\d{3}) (\d+\.\d{3})ms (\S+)$')


@pytest.mark.asyncio
async def test_one_request_is_one_text_line(
    gateway: Gateway, app_client: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="usage_service.access")
    paths = ["/a%0aINFO:%20%20%20%20%20forged", "/a%0d%0a%22%20x", "/a%e2%80%a8b", "/" + "a/" * 92 + "-" + KEY]
    async with app_client(access_log=True) as (_, client):
        for path in paths:
            await client.get(path)
    lines = [record.getMessage() for record in caplog.records if record.name == "usage_service.access"]
    assert len(lines) == len(paths)
    for line in lines:
        assert line.isprintable() and ACCESS_LINE.match(line), line
    assert KEY[:12] not in caplog.text


@pytest.mark.asyncio
async def test_no_key_from_a_query_string_reaches_any_log(
    gateway: Gateway, app_client: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Every logger at DEBUG, the access log on: a key sent in `?key=` appears nowhere."""
    token = gateway.add_token()
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="aiosqlite")  # as logs.configure leaves it whatever the level
    queries = [f"?key=sk-{token.key}", f"?key={token.key}", f"?a=1&key=sk-{token.key}%0a", f"?{token.key}"]
    paths = [URL, "/v1/dashboard/billing/subscription", "/healthz", "/nowhere", "/api/usage/token/"]
    async with app_client(access_log=True) as (_, client):
        for path in paths:
            for query in queries:
                await client.get(path + query)
                await client.get(path + query, headers={"Authorization": "Bearer sk-nosuchkey123"})
                await client.options(
                    path + query, headers={"Origin": "https://a.example", "Access-Control-Request-Method": "GET"}
                )
    assert len(access_lines(caplog)) == len(paths) * len(queries) * 3
    # The test's own HTTP client logs the URLs it asks for; everything else is the service's.
    logged = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore")))
    for start in range(0, len(token.key) - 12):
        assert token.key[start : start + 12] not in logged


def test_json_formatter() -> None:
    formatter = JSONFormatter()
    access = logging.LogRecord("usage_service.access", logging.INFO, "", 0, "%(status)d", ({"status": 200},), None)
    entry = json.loads(formatter.format(access))
    assert entry["status"] == 200 and entry["logger"] == "usage_service.access" and entry["level"] == "info"
    assert entry["time"].endswith("+00:00")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = logging.LogRecord("usage_service", logging.ERROR, "", 0, "failed %s", ("x",), sys.exc_info())
    entry = json.loads(formatter.format(failed))
    assert entry["message"] == "failed x"
    assert "ValueError: boom" in entry["exception"]


@pytest.mark.parametrize(
    "formatter",
    [
        pytest.param(TextFormatter("%(levelprefix)s %(message)s", use_colors=False), id="uvicorn-text"),
        pytest.param(OneLineFormatter("%(levelname)s:     %(message)s"), id="command-text"),
    ],
)
def test_every_text_message_is_one_line(formatter: logging.Formatter) -> None:
    """Whatever a message quotes (here a path with %0a decoded), it stays on one line; a
    traceback follows it on lines of its own."""
    record = logging.LogRecord("usage_service", logging.ERROR, "", 0, "failed answering %s", ("/a\nINFO: x\x1b",), None)
    assert formatter.format(record).endswith("failed answering /a\\x0aINFO: x\\x1b")
    assert "\n" not in formatter.format(record)
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    lines = formatter.format(record).splitlines()
    assert lines[0].endswith("failed answering /a\\x0aINFO: x\\x1b") and lines[-1] == "ValueError: boom"


def test_uvicorn_text_logging_uses_the_one_line_formatter() -> None:
    assert uvicorn_config("info", "text")["formatters"]["default"]["()"] == "usage_service.logs.TextFormatter"
