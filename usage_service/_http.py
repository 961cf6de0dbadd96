"""uvicorn's httptools protocol with a bound on a request's head and JSON for its own rejections.

httptools buffers a request line and headers of any size; without a bound, one client sending
an endless header grows a worker's memory until the OS steps in. A head over MAX_REQUEST_HEAD
is answered 431 and the connection closed, before the parser buffers more of it.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger("usage_service.http")

# Request line plus headers. nginx's default buffers allow 4 × 8 KiB; a poll needs a few hundred bytes.
MAX_REQUEST_HEAD = 32 * 1024


def _raw_response(status: bytes, message: str) -> bytes:
    body = orjson.dumps({"success": False, "message": message})
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncache-control: no-store\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )


_TOO_LARGE = _raw_response(b"431 Request Header Fields Too Large", "request header fields too large")
_INVALID = _raw_response(b"400 Bad Request", "invalid HTTP request")


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            end = data.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else end
            if self._head_bytes > MAX_REQUEST_HEAD:
                self._reject_oversized()
                return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def send_400_response(self, msg: str) -> None:
        # uvicorn's own answer to a request it cannot parse is text/plain; ours are all JSON.
        self.transport.write(_INVALID)
        self.transport.close()

    def _reject_oversized(self) -> None:
        logger.warning("request head over %d bytes; answered 431 and closed the connection", MAX_REQUEST_HEAD)
        self._in_head = False
        # A response still being sent on this connection must not be interleaved with ours.
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_TOO_LARGE)
        self.transport.close()
