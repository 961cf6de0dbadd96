"""The front door and its two pipelines, by behaviour: what a poll costs, how every answer is
accounted once, and how an unexpected error is answered once, on either pipeline.

Speed lives in bench/ (timings on these shared machines are noise): bench/overhead.py prints
microseconds per hot poll, bench/instructions.py the instructions.
"""

from __future__ import annotations

import logging

import httpx
import pytest
import redis
from conftest import AppClient
from support import Gateway

pytestmark = pytest.mark.asyncio

URL = "/api/usage/token"


async def test_a_polled_token_costs_no_lookup_below_the_in_process_layer(
    gateway: Gateway, app_client: AppClient, redis_url: str, redis_client: redis.Redis
) -> None:
    token = gateway.add_token()
    # No refresher: it reads the database on its own schedule.
    async with app_client(redis_url=redis_url, refresh_interval=0, local_ttl=60.0, cache_ttl=60.0) as (app, client):
        assert (await client.get(URL, headers=token.bearer)).status_code == 200
        stats, statements = app.state.lookup.stats, app.state.store.statements
        reads, redis_hits, local_hits = stats.db_reads, stats.redis_hits, stats.local_hits
        redis_client.config_resetstat()
        for _ in range(20):
            assert (await client.get(URL, headers=token.bearer)).status_code == 200
        assert (stats.db_reads, stats.redis_hits, app.state.store.statements) == (reads, redis_hits, statements)
        assert stats.local_hits == local_hits + 20
        assert "cmdstat_get" not in redis_client.info("commandstats")


def responses(app: object, route: str) -> dict[int, int]:
    return dict(app.access.stats.routes[route].statuses)  # type: ignore[attr-defined]


async def test_every_answer_is_accounted_once_on_both_pipelines(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client(metrics=True) as (app, client):
        assert (await client.get(URL, headers=token.bearer)).status_code == 200
        assert (await client.get(URL + "/", headers=token.bearer)).status_code == 200
        assert (await client.get(URL)).status_code == 401
        assert (await client.post(URL, headers=token.bearer)).status_code == 405
        assert (await client.get("/api/usage/nothing", headers=token.bearer)).status_code == 404
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/nowhere")).status_code == 404
        assert (await client.post("/healthz")).status_code == 405
        assert responses(app, URL) == {200: 2, 401: 1, 405: 1}
        assert responses(app, "/healthz") == {200: 1, 405: 1}
        assert responses(app, "other") == {404: 2}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param(URL, {"success": False, "message": "internal server error"}, id="polled-usage"),
        pytest.param(
            "/v1/dashboard/billing/usage",
            {"error": {"message": "internal server error", "type": "server_error", "code": "internal_error"}},
            id="polled-billing",
        ),
        pytest.param("/readyz", {"success": False, "message": "internal server error"}, id="starlette"),
    ],
)
async def test_an_unexpected_error_is_answered_logged_and_accounted_once(
    gateway: Gateway, app_client: AppClient, caplog: pytest.LogCaptureFixture, path: str, body: object
) -> None:
    token = gateway.add_token()
    async with app_client(metrics=True) as (app, _):

        async def broken(*args: object) -> None:
            raise RuntimeError("secret internals")

        app.state.store.fetch = app.state.store.ping = broken
        transport = httpx.ASGITransport(app=app)  # raises what the app lets out: nothing may escape
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            with caplog.at_level(logging.ERROR, logger="usage_service"):
                response = await client.get(path, headers=token.bearer)
        assert responses(app, path) == {500: 1}
    assert response.status_code == 500
    assert response.json() == body
    assert "secret" not in response.text
    logged = [r for r in caplog.records if r.exc_info is not None]
    assert len(logged) == 1 and "secret internals" in caplog.text


async def test_an_error_after_the_answer_started_is_not_answered_again(
    gateway: Gateway, app_client: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    token = gateway.add_token()
    async with app_client(metrics=True) as (app, _):
        sent: list[dict[str, object]] = []

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def failing_send(message: dict[str, object]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body":
                raise OSError("client went away")

        scope = {
            "type": "http",
            "method": "GET",
            "path": URL,
            "headers": [(b"authorization", token.bearer["Authorization"].encode())],
            "client": ("127.0.0.1", 4000),
            "query_string": b"",
        }
        with caplog.at_level(logging.ERROR, logger="usage_service"):
            await app(scope, receive, failing_send)
        assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
        assert responses(app, URL) == {200: 1}  # the status it had started to answer
    assert "client went away" in caplog.text


async def test_a_browser_poll_gets_cors_headers_and_others_none(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client(cors_origins=("*",)) as (_, client):
        browser = await client.get(URL, headers={**token.bearer, "Origin": "https://dash.example.com"})
        plain = await client.get(URL, headers=token.bearer)
    assert browser.status_code == plain.status_code == 200
    assert browser.headers["access-control-allow-origin"] == "*"
    assert not any(name.startswith("access-control-") for name in plain.headers)
    assert browser.content == plain.content
