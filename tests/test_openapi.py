"""The OpenAPI document: committed, served as is, valid, complete, and true of the live service."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import AppClient
from jsonschema import Draft202012Validator
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


def _resolved(spec: Any, node: Any) -> Any:
    """`node`, or what its $ref points to in `spec`."""
    while "$ref" in node:
        target: Any = spec
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def conformance_problems(spec: Any, method: str, path: str, response: httpx.Response) -> list[str]:
    """What in `response` the document does not allow for `method` on `path`: an undeclared
    status, a body on HEAD, 204 or 304, a body its schema refuses, a declared header missing
    (the CORS ones are declared but sent to browsers only) or off its schema."""
    tag = f"{method} {path} -> {response.status_code}"
    declared = spec["paths"][path][method.lower()]["responses"].get(str(response.status_code))
    if declared is None:
        return [f"{tag}: undeclared status ({response.text[:100]})"]
    declared = _resolved(spec, declared)
    problems = []
    content = declared.get("content", {})
    if method == "HEAD" or response.status_code in (204, 304):
        if response.content:
            problems.append(f"{tag}: a body")
    else:
        media = response.headers.get("content-type", "").split(";")[0]
        if media not in content:
            problems.append(f"{tag}: {media} is not declared")
        elif media == "application/json":
            errors = Draft202012Validator(spec).descend(response.json(), content[media]["schema"])
            problems += [f"{tag}: {error.message}" for error in errors]
    for name, header in declared.get("headers", {}).items():
        schema = _resolved(spec, header)["schema"]
        value = response.headers.get(name)
        if value is None:
            if not name.startswith("Access-Control-"):
                problems.append(f"{tag}: no {name}")
        elif schema.get("type") == "integer" and not value.isdigit():
            problems.append(f"{tag}: {name} {value!r} is no integer")
        elif "const" in schema and value != schema["const"]:
            problems.append(f"{tag}: {name} {value!r}")
    return problems


@pytest.mark.asyncio
async def test_answers_schemathesis_rarely_reaches_conform(gateway: Gateway, app_client: AppClient) -> None:
    """In process, on every documented path: the answers a generated request seldom gets (304,
    429 past a budget, 503 with the database locked, HEAD of each) are as the document says."""
    spec = committed()
    token = gateway.add_token(model_limits_enabled=1, model_limits="gpt-4o")
    gateway.add_log(token)
    problems: list[str] = []
    seen: set[int] = set()

    def check(method: str, path: str, answer: httpx.Response) -> None:
        seen.add(answer.status_code)
        problems.extend(conformance_problems(spec, method, path, answer))

    async with app_client(log_reads_per_token=1, history_days_per_token=1, db_timeout=0.2) as (_, client):
        for path in spec["paths"]:  # type: ignore[attr-defined]
            for origin in ({}, {"Origin": "https://dash.example.com"}):
                headers = {**token.bearer, **origin}
                for method in ("GET", "HEAD"):
                    answer = await client.request(method, path, headers=headers)
                    check(method, path, answer)
                    if "etag" in answer.headers:
                        again = {**headers, "If-None-Match": answer.headers["etag"]}
                        revalidated = await client.request(method, path, headers=again)
                        assert revalidated.status_code == 304, (method, path)
                        check(method, path, revalidated)
                # New parameter sets until the token's budgets are spent (429 where there is one).
                for n in range(8):
                    query = f"?start_date=2024-{n + 1}-01&end_date=2024-{n + 1}-20&p={n + 1}"
                    check("GET", path, await client.get(path + query, headers=headers))
                unknown = gateway.add_token()  # a key no layer holds: its lookup must reach the database
                with gateway.exclusive_lock():
                    locked = await client.get(path, headers={**unknown.bearer, **origin})
                check("GET", path, locked)
    assert {200, 304, 429, 503} <= seen, seen
    assert not problems, "\n".join(dict.fromkeys(problems))
