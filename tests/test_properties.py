"""Property-based: whatever arrives (Authorization values, paths, methods, header sizes), the
answer is never a 5xx, always JSON, and never shows a stack trace."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress

import orjson
import pytest
from asgi import Answer, call
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Gateway

from usage_service.app import create_app
from usage_service.config import Settings

PATHS = [
    "/api/usage/token",
    "/api/usage/token/",
    "/api/usage",
    "/api/usage/",
    "/v1/dashboard/billing/usage",
    "/dashboard/billing/subscription/",
    "/v1/dashboard/billing/",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/",
]
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT"]

# Keys the gateway holds, filled in by the test: the strategies mix them into credentials.
KNOWN_KEYS: list[str] = []

known_key = st.integers(0, 2).map(lambda i: KNOWN_KEYS[i])  # filled in before the strategies run
credential = st.one_of(
    st.sampled_from(["", "sk-", "sk--", "-", "sk-" + "a" * 129]),
    st.text(alphabet="abcdefABCDEF0123456789-", max_size=140),
    st.text(max_size=60),
    st.builds(lambda key, suffix: f"sk-{key}{suffix}", known_key, st.sampled_from(["", "-7", "-x-y", "-"])),
)


def _authorization(scheme: str, spaces: str, value: str, tail: str) -> bytes:
    return f"{scheme}{spaces}{value}{tail}".encode("utf-8", "surrogatepass")


authorization = st.one_of(
    st.builds(
        _authorization,
        st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Token", "", "Bearer\t"]),
        st.sampled_from(["", " ", "  ", "\t"]),
        credential,
        st.sampled_from(["", " ", "\x00", "\r", ",", "\xff"]),
    ),
    st.binary(max_size=300),
    st.binary(min_size=4000, max_size=16_000),  # large values
)

header_name = st.one_of(
    st.sampled_from([b"authorization", b"if-none-match", b"x-forwarded-for", b"content-length", b"host"]),
    st.binary(min_size=1, max_size=40),
)
headers = st.lists(st.tuples(header_name, st.binary(max_size=2000)), max_size=30)
path = st.one_of(
    st.sampled_from(PATHS),
    st.text(max_size=200).map(lambda s: "/" + s),
    st.text(max_size=100).map(lambda s: "/api/usage/" + s),
)
method = st.one_of(st.sampled_from(METHODS), st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ-", min_size=1, max_size=12))


def check(answer: Answer, method: str, path: str) -> None:
    assert 200 <= answer.status < 500, answer
    assert b"Traceback" not in answer.body and b'File "' not in answer.body
    if answer.status == 304 or (method == "HEAD" and not answer.body):
        return  # (the server drops a HEAD answer's body; Starlette's routes leave that to it)
    if path == "/metrics" and answer.status == 200:
        assert answer.headers[b"content-type"].startswith(b"text/plain")
        return
    assert answer.headers[b"content-type"] == b"application/json", answer
    body = orjson.loads(answer.body)
    assert isinstance(body, dict)
    if answer.status >= 400:  # the gateway's shape, or OpenAI's on the billing routes
        error = body.get("error", body)
        assert isinstance(error["message"], str) and (body.get("success") is False or "code" in error), body


@pytest.mark.parametrize("with_redis", [False, True], ids=["in-process", "redis"])
def test_any_request_gets_a_json_answer_never_a_5xx(
    gateway: Gateway, settings: Settings, request: pytest.FixtureRequest, with_redis: bool
) -> None:
    tokens = [gateway.add_token(), gateway.add_token(status=2), gateway.add_token(user_id=gateway.add_user(status=2))]
    KNOWN_KEYS[:] = [t.key for t in tokens]
    overrides: dict[str, object] = {
        # The limiter on, and low, so that 401s and 429s both come up; X-Forwarded-For believed.
        "auth_fail_limit": 5,
        "trusted_proxies": (ipaddress.ip_network("127.0.0.0/8"),),
    }
    if with_redis:
        overrides["redis_url"] = request.getfixturevalue("redis_url")
    app = create_app(dataclasses.replace(settings, **overrides))  # type: ignore[arg-type]

    with asyncio.Runner() as runner, contextlib.ExitStack() as stack:
        lifespan = app.router.lifespan_context(app)
        runner.run(lifespan.__aenter__())
        stack.callback(lambda: runner.run(lifespan.__aexit__(None, None, None)))

        @settings_profile
        @given(method=method, path=path, auth=st.none() | authorization, extra=headers)
        def scenario(method: str, path: str, auth: bytes | None, extra: list[tuple[bytes, bytes]]) -> None:
            sent = list(extra) + ([(b"authorization", auth)] if auth is not None else [])
            answer = runner.run(call(app, path, sent, method))
            seen.add(answer.status)
            check(answer, method, path)

        seen: set[int] = set()
        scenario()
        assert {401, 404, 405, 429} <= seen, seen  # the strategies reached every kind of refusal


settings_profile = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
