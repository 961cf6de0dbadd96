"""The access log and the JSON log format: what a line holds, and that no key ever reaches one."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import AppClient
from support import Gateway

from usage_service.access import logged_path
from usage_service.logs import JSONFormatter
from usage_service.openapi import ROUTE_LABELS

URL = "/api/usage/token"


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
        pytest.param("/.well-known/openid-configuration", "/.well-known/openid-configuration", id="words-stay"),
    ],
)
def test_paths_are_logged_without_key_material(path: str, logged: str) -> None:
    assert logged_path(path, ROUTE_LABELS) == logged


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
