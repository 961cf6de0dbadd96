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
from asgi import call
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
    """The functions one poll of /api/usage/token runs (after a first poll read the database)."""
    assert (await call(app, headers=headers)).status == 200
    calls: list[str] = []

    def profile(frame: FrameType, event: str, arg: object) -> None:
        name = frame.f_code.co_qualname.rsplit("<locals>.", 1)[-1]
        # The caller in tests/asgi.py is not the app's; its `send` stands for the server's.
        if event == "call" and (name == "send" or frame.f_globals.get("__name__") != call.__module__):
            calls.append(name)

    sys.setprofile(profile)
    try:
        answer = await call(app, headers=headers)
    finally:
        sys.setprofile(None)
    assert answer.status == 200
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
