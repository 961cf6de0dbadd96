"""JSON answers sent straight over ASGI: the hot path builds no framework Response objects."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from starlette.types import Receive, Scope, Send

Headers = list[tuple[bytes, bytes]]

JSON_TYPE = (b"content-type", b"application/json")
NO_CACHE = (b"cache-control", b"private, no-cache")

# Where an answer notes its status for the front door's accounting and error handling: the
# polled routes' senders write it here themselves, so the hot path wraps no `send`.
STATUS_KEY = "usage.status"


def error_body(message: str) -> bytes:
    return orjson.dumps({"success": False, "message": message})


def openai_error_body(message: str, type_: str, code: str) -> bytes:
    """The error shape OpenAI clients parse (chat front-ends, key checkers)."""
    return orjson.dumps({"error": {"message": message, "type": type_, "code": code}})


async def send_body(scope: Scope, send: Send, status: int, headers: Headers, body: bytes) -> None:
    """Send a complete response; HEAD gets the same headers and no body."""
    scope[STATUS_KEY] = status
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


def strong_etag(body: bytes) -> bytes:
    """An ETag for this body: a hash of it, so equal answers revalidate across workers and restarts."""
    return b'"' + hashlib.blake2b(body, digest_size=12).hexdigest().encode() + b'"'


def compact_json(value: object) -> bytes:
    """orjson.dumps in a bytes object of its own size, for answers that are kept.

    orjson hands back its whole 4 KiB output buffer however short the JSON: kept once per
    cached token, that was most of a worker's memory (found by bench/faults/key_sweep.py).
    """
    return bytes(memoryview(orjson.dumps(value)))


@dataclass(frozen=True, slots=True)
class JSONAnswer:
    """A JSON 200 rendered once and sent many times: its body, its ETag and their headers."""

    body: bytes
    etag: bytes
    headers: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def of(cls, content: object) -> JSONAnswer:
        body = compact_json(content)
        etag = strong_etag(body)
        return cls(body, etag, (JSON_TYPE, NO_CACHE, (b"etag", etag), (b"content-length", str(len(body)).encode())))


async def send_revalidated(scope: Scope, send: Send, answer: JSONAnswer) -> None:
    """Send the answer, or 304 without its body when the request's If-None-Match matches its ETag.

    Every If-None-Match line counts: a list-based field sent as several lines is one list
    (RFC 9110, 5.3), and the matching validator may be on any of them."""
    for name, value in scope["headers"]:
        if name == b"if-none-match" and etag_matches(value, answer.etag):
            await send_body(scope, send, 304, [NO_CACHE, (b"etag", answer.etag)], b"")
            return
    # A fresh list: the server or a middleware may add to the headers it is given.
    await send_body(scope, send, 200, [*answer.headers], answer.body)


def etag_matches(if_none_match: bytes, etag: bytes) -> bool:
    """RFC 9110 weak comparison of an If-None-Match list against our (strong) ETag."""
    if if_none_match == etag:
        return True
    for candidate in if_none_match.split(b","):
        candidate = candidate.strip()
        if candidate == b"*" or candidate.removeprefix(b"W/") == etag:
            return True
    return False


class JSONError:
    """A prepared error answer in the gateway's shape: body and headers are built once, sent many times."""

    def __init__(self, status: int, message: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        self.status = status
        self.message = message
        self.body = self.render(message)
        self.headers: Headers = [
            JSON_TYPE,
            NO_CACHE,
            (b"content-length", str(len(self.body)).encode()),
            *headers,
        ]

    def render(self, message: str) -> bytes:
        return error_body(message)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_body(scope, send, self.status, self.headers, self.body)


class OpenAIError(JSONError):
    """A prepared error answer in OpenAI's shape: `{"error": {"message", "type", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
        type_: str = "invalid_request_error",
    ) -> None:
        self.code = code
        self.type = type_
        super().__init__(status, message, headers)

    def render(self, message: str) -> bytes:
        return openai_error_body(message, self.type, self.code)
