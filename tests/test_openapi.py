"""The OpenAPI document: committed, served as is, valid, complete, and true of the live service."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest
from conftest import AppClient
from openapi_spec_validator import validate
from starlette.routing import Route
from support import Gateway, Service

import usage_service

COMMITTED = Path(usage_service.__file__).parent / "openapi.json"
HERE = Path(__file__).parent


def committed() -> dict[str, object]:
    spec: dict[str, object] = orjson.loads(COMMITTED.read_bytes())
    return spec


@pytest.mark.asyncio
async def test_served_document_is_the_committed_one(gateway: Gateway, app_client: AppClient) -> None:
    async with app_client() as (_, client):
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.content == COMMITTED.read_bytes()


def test_document_is_valid_openapi_3_1() -> None:
    spec = committed()
    assert spec["openapi"] == "3.1.0"
    validate(spec)  # raises on any violation of the OpenAPI 3.1 schema
    assert spec["info"]["version"] == usage_service.__version__  # type: ignore[index]


@pytest.mark.asyncio
async def test_every_route_is_described(gateway: Gateway, app_client: AppClient) -> None:
    async with app_client() as (app, _):
        served = {route.path for route in app.router.routes if isinstance(route, Route)}
        served |= set(app.exact)  # the polled routes
    documented = set(committed()["paths"])  # type: ignore[arg-type]
    assert served == documented


def run_schemathesis(url: str, workdir: Path, *headers: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(HERE / "schemathesis.toml"),
        "--no-color",
        "run",
        url + "/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        "15",
        "--seed",
        "20261129",
        "--generation-database",
        "none",
        "--workers",
        "1",
        "--request-timeout",
        "10",
        *(arg for header in headers for arg in ("--header", header)),
    ]
    # In a scratch directory: schemathesis leaves files where it runs.
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=workdir)


@pytest.mark.e2e
def test_live_service_conforms(gateway: Gateway, redis_url: str, tmp_path: Path) -> None:
    """Every request schemathesis generates gets an answer the document allows."""
    token = gateway.add_token(model_limits_enabled=1, model_limits="gpt-4o")
    env = {"SQLITE_PATH": str(gateway.path), "REDIS_CONN_STRING": redis_url}
    # Hundreds of requests without a valid key from one address: the failed-authentication
    # limiter would answer most of them 429 and hide the answers under test.
    env["USAGE_AUTH_FAIL_LIMIT"] = "0"
    with Service(env) as service:
        anonymous = run_schemathesis(service.url, tmp_path)
        authorised = run_schemathesis(
            service.url, tmp_path, f"Authorization: Bearer sk-{token.key}", "Origin: https://dash.example.com"
        )
        assert httpx.get(service.url + "/healthz").status_code == 200
    for run in (anonymous, authorised):
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert " passed" in run.stdout
    assert "Authentication failed" not in authorised.stdout  # the valid token reached 200s
