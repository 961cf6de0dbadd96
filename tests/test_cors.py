"""CORS for browser dashboards, in process: preflights, headers on every answer, configured origins."""

from __future__ import annotations

import pytest
from conftest import AppClient
from support import Gateway, Token

from usage_service.auth import NO_HEADER
from usage_service.openapi import BROWSER_PATHS

pytestmark = pytest.mark.asyncio

URL = "/api/usage/token"
DASH = "https://dash.example.com"
OTHER = "https://evil.example.net"


def preflight(origin: str, method: str = "GET", headers: str = "authorization") -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers}


@pytest.mark.parametrize("path", sorted(BROWSER_PATHS))
async def test_preflight_any_origin(gateway: Gateway, app_client: AppClient, path: str) -> None:
    async with app_client() as (_, client):
        response = await client.options(path, headers=preflight(DASH, headers="Authorization, If-None-Match"))
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "*"
    assert response.headers["access-control-allow-methods"] == "GET, HEAD"
    allowed = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "if-none-match"} <= allowed
    assert int(response.headers["access-control-max-age"]) > 0
    assert response.headers["cache-control"] == "no-store"  # the browser's preflight cache, not a proxy's
    assert response.content == b""


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        pytest.param(preflight(OTHER), "origin not allowed", id="origin"),
        pytest.param(preflight(DASH, method="DELETE"), "CORS method not allowed", id="method"),
        pytest.param(preflight(DASH, headers="authorization, x-a"), "CORS request headers not allowed", id="header"),
    ],
)
async def test_preflight_refused(
    gateway: Gateway, app_client: AppClient, headers: dict[str, str], message: str
) -> None:
    async with app_client(cors_origins=(DASH,)) as (_, client):
        response = await client.options(URL, headers=headers)
    assert response.status_code == 403
    assert response.json() == {"success": False, "message": message}
    assert "access-control-allow-origin" not in response.headers


async def test_every_answer_carries_the_origin(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    banned = gateway.add_token(user_id=gateway.add_user(status=2))
    origin = {"Origin": DASH}
    async with app_client() as (_, client):
        ok = await client.get(URL, headers={**token.bearer, **origin})
        answers = {
            200: ok,
            304: await client.get(URL, headers={**token.bearer, **origin, "If-None-Match": ok.headers["etag"]}),
            401: await client.get(URL, headers=origin),
            403: await client.get(URL, headers={**banned.bearer, **origin}),
        }
        with gateway.exclusive_lock():
            answers[503] = await client.get(URL, headers={**Token(0, "lockedkey1", 0).bearer, **origin})
    for status, response in answers.items():
        assert response.status_code == status
        assert response.headers["access-control-allow-origin"] == "*", status
        exposed = {h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")}
        assert "etag" in exposed


async def test_listed_origins(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client(cors_origins=(DASH, "http://127.0.0.1:8080")) as (_, client):
        allowed = await client.get(URL, headers={**token.bearer, "Origin": DASH})
        refused = await client.get(URL, headers={**token.bearer, "Origin": OTHER})
        ok = await client.options(URL, headers=preflight("http://127.0.0.1:8080"))
    assert allowed.headers["access-control-allow-origin"] == DASH
    assert allowed.headers["vary"] == "Origin"
    # The server answers; the browser refuses to hand the answer to the page.
    assert refused.status_code == 200
    assert "access-control-allow-origin" not in refused.headers
    assert refused.headers["vary"] == "Origin"
    assert ok.status_code == 204 and ok.headers["access-control-allow-origin"] == "http://127.0.0.1:8080"


async def test_without_origin_nothing_changes(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client() as (_, client):
        response = await client.get(URL, headers=token.bearer)
        options = await client.options(URL, headers={"Access-Control-Request-Method": "GET"})
    assert response.status_code == 200
    assert not any(name.startswith("access-control-") for name in response.headers)
    assert options.status_code == 401  # not a preflight: authenticated like any request


async def test_only_the_api_is_cross_origin(gateway: Gateway, app_client: AppClient) -> None:
    async with app_client() as (_, client):
        health = await client.get("/healthz", headers={"Origin": DASH})
        metrics = await client.options("/metrics", headers=preflight(DASH))
    assert "access-control-allow-origin" not in health.headers
    assert metrics.status_code == 405


async def test_cors_off(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client(cors_origins=()) as (_, client):
        response = await client.get(URL, headers={**token.bearer, "Origin": DASH})
        options = await client.options(URL, headers=preflight(DASH))
    assert "access-control-allow-origin" not in response.headers
    assert options.status_code == 401


async def test_prepared_answers_stay_unchanged(gateway: Gateway, app_client: AppClient) -> None:
    """A prepared error's header list is shared between requests; CORS must add to a copy."""
    before = list(NO_HEADER.headers)
    async with app_client(cors_origins=(DASH,)) as (_, client):
        for _ in range(3):
            response = await client.get(URL, headers={"Origin": DASH})
            assert response.headers.get_list("access-control-allow-origin") == [DASH]
    assert NO_HEADER.headers == before


async def test_an_unexpected_error_carries_the_origin_too(gateway: Gateway, app_client: AppClient) -> None:
    """The front door answers an error nothing else caught with a 500: a page must be able to
    read that one as well, not see a CORS failure instead."""
    token = gateway.add_token()
    async with app_client(cors_origins=(DASH,)) as (app, client):

        async def broken(*args: object) -> None:
            raise RuntimeError("unexpected")

        app.state.store.fetch = broken
        response = await client.get(URL, headers={**token.bearer, "Origin": DASH})
    assert response.status_code == 500
    assert response.headers["access-control-allow-origin"] == DASH
    assert response.headers["vary"] == "Origin"
