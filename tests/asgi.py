"""Call an ASGI app directly with a raw scope: any bytes in headers, any path, no HTTP client in the way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message


@dataclass
class Answer:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""


async def call(
    app: ASGIApp,
    path: str = "/api/usage/token",
    headers: list[tuple[bytes, bytes]] | None = None,
    method: str = "GET",
    client: tuple[str, int] = ("127.0.0.1", 40000),
    raw_path: bytes | None = None,
) -> Answer:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": raw_path if raw_path is not None else path.encode("utf-8", "surrogateescape"),
        "query_string": b"",
        "root_path": "",
        "headers": headers or [],
        "client": client,
        "server": ("127.0.0.1", 3001),
    }
    answer = Answer()

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            answer.status = message["status"]
            answer.headers = {bytes(k).lower(): bytes(v) for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            answer.body += message.get("body", b"")

    await app(scope, receive, send)
    return answer
