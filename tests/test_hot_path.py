"""The hot path's budget: which Python functions a poll answered in-process runs, and nothing more.

Speed targets live in bench/ (timings on these shared machines are noise). What a test can hold
without timing is the shape of the work: a polled token is answered by this short, fixed list
of calls, none of them Starlette's and none of them a wrapper around `send`. A change that adds
a call here should be one that was meant, and measured (bench/instructions.py).
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

import pytest
from conftest import AppClient
from support import Gateway

pytestmark = pytest.mark.asyncio

HOT_PATH = [
    "UsageService.__call__",  # the front door: route table, accounting
    "request_origin",  # CORS only for a request with an Origin header
    "TokenAuthMiddleware.__call__",
    "bearer_key",
    "TokenLookup.cached",
    "key_digest",
    "LocalCache.get",
    "usage_verdict",
    "ShortRoutes.__call__",
    "token_usage",
    "send_body",
    "send",  # the server's, twice: start and body
    "send",
    "AccessLog.record",
    "RequestStats.note",
]


async def calls_of_one_poll(app: Any, headers: list[tuple[bytes, bytes]]) -> list[str]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/api/usage/token",
        "raw_path": b"/api/usage/token",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 3001),
    }
    statuses = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(dict(scope), receive, send)  # the first poll reads the database
    calls: list[str] = []

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "call":
            calls.append(frame.f_code.co_qualname.rsplit("<locals>.", 1)[-1])

    sys.setprofile(profile)
    try:
        await app(dict(scope), receive, send)
    finally:
        sys.setprofile(None)
    assert statuses == [200, 200]
    return calls


async def test_a_polled_token_is_answered_by_a_fixed_short_list_of_calls(
    gateway: Gateway, app_client: AppClient
) -> None:
    token = gateway.add_token()
    async with app_client(metrics=True, cors_origins=("*",)) as (app, _):
        calls = await calls_of_one_poll(app, [(b"authorization", f"Bearer sk-{token.key}".encode())])
    assert calls == HOT_PATH


async def test_a_browser_poll_adds_only_the_cors_layer(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    headers = [(b"authorization", f"Bearer sk-{token.key}".encode()), (b"origin", b"https://dash.example.com")]
    async with app_client(metrics=True, cors_origins=("*",)) as (app, _):
        calls = await calls_of_one_poll(app, headers)
    added = list(calls)
    for name in HOT_PATH:
        added.remove(name)
    # The CORS middleware's answer path and its send wrapper (start and body).
    assert sorted(added) == sorted(
        ["CORSMiddleware.cross_origin", "CORSMiddleware.response_headers", *2 * ["send_with_cors"]]
    )
