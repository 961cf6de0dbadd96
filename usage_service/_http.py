"""uvicorn's httptools protocol with bounded request heads, a head-read timeout and JSON for its own answers.

httptools buffers a request line and headers of any size, for as long as a client cares to send
them; uvicorn closes a connection only once it has been idle after a response. Without bounds,
one client sending endless or endlessly slow headers holds a worker's memory and descriptors.
Here every request head, pipelined ones included, is bounded in size (MAX_REQUEST_HEAD: over it,
nothing more is read, the requests before it are answered, then 431 and the connection closed)
and in time (uvicorn's `timeout_keep_alive`, which the command sets from USAGE_HEADER_TIMEOUT: a
connection that has not sent a whole head that long after opening or after its last response is
closed). A request that cannot be parsed is answered 400, after the requests before it, and
the connection closed. At most MAX_PIPELINED requests are read ahead of the one being answered.
Past `limit_concurrency` requests in flight, a request is answered 503, in JSON.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger("usage_service.http")

# Request line plus headers. nginx's default buffers allow 4 × 8 KiB; a poll needs a few hundred bytes.
MAX_REQUEST_HEAD = 32 * 1024

# Requests read ahead of the one being answered. httptools parses every request a read holds,
# and uvicorn queues each one: a client pipelining requests without reading the answers had
# every request it sent parsed and held (hundreds of MiB from one connection). Past this many
# queued, the rest of what was read is kept as bytes and reading stops until the queue shortens.
MAX_PIPELINED = 16

# What ends a request head (httptools accepts no other line ending), and a chunked body.
_BLANK_LINE = b"\r\n\r\n"


def _json_body(message: str) -> bytes:
    return orjson.dumps({"success": False, "message": message})


def _raw_response(status: bytes, message: str) -> bytes:
    body = _json_body(message)
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncache-control: no-store\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )


_TOO_LARGE = _raw_response(b"431 Request Header Fields Too Large", "request header fields too large")
_INVALID = _raw_response(b"400 Bad Request", "invalid HTTP request")
_BUSY_BODY = _json_body("server busy, retry shortly")
_BUSY_HEADERS = [
    (b"content-type", b"application/json"),
    (b"cache-control", b"no-store"),
    (b"retry-after", b"1"),
    (b"content-length", str(len(_BUSY_BODY)).encode()),
    (b"connection", b"close"),
]


async def _busy(scope: Scope, receive: Receive, send: Send) -> None:
    """uvicorn's answer past `limit_concurrency`, in JSON like every other answer of ours."""
    await send({"type": "http.response.start", "status": 503, "headers": _BUSY_HEADERS})
    await send({"type": "http.response.body", "body": _BUSY_BODY})


def raise_descriptor_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; return the limit now in force.

    Every connection is a descriptor. At the soft limit (often 1024) the server drops each new
    connection unanswered, however little memory or CPU the open ones use; the hard limit is
    what the operator meant to allow (Go raises it the same way). Workers inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard and hard != resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's own check would answer text/plain, and count idle connections (on_headers_complete).
        self._limit, self.limit_concurrency = self.limit_concurrency, None
        self._in_head = True  # between requests, or reading one's head
        self._head_bytes = 0  # of the head being read
        self._body_left: int | None = None  # bytes of a Content-Length body still to come, else None
        self._tail = b""  # the last 3 bytes received, where a blank line may have begun
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal: bytes | None = None  # a refused head's 431 or 400, sent after the answers before it
        self._unread = b""  # what was read past MAX_PIPELINED queued requests, from a head's start
        self._answering: Any = None  # the request being answered (uvicorn's `cycle` is the last one read)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn times a connection out only once it has answered on it: one that never sends
        # anything would be held for ever.
        self._head_timer = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        # uvicorn tells only the last request read that its client is gone: with requests
        # pipelined behind it, the one being answered wrote on to the closed connection, and
        # failed with a traceback.
        answering = self._answering
        if answering is not None and answering is not self.cycle and not answering.response_complete:
            answering.disconnected = True
            answering.message_event.set()
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._answering = cycle
        super()._start_asgi_task(cycle, app)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return
        if self._unread:
            # Reading resumed (uvicorn does so when a request awaits its body) while bytes wait
            # for the queue to shorten: these come after them.
            self._unread += data
            self.flow.pause_reading()
            if len(self._unread) > MAX_PIPELINED * MAX_REQUEST_HEAD:
                self._reject_oversized()
            return
        if self._head_timer is None and self.timeout_keep_alive_task is not None:
            # uvicorn stops its keep-alive timer at the first byte of the next request; keep it
            # running until that request's head is whole, so a head trickled in a byte at a time
            # is bounded by the same timeout as silence.
            self._head_timer, self.timeout_keep_alive_task = self.timeout_keep_alive_task, None
        # Feed the parser in pieces that end where a head can end, so that the bytes of each
        # head, pipelined or not, are counted before the parser buffers them.
        start, size = 0, len(data)
        while start < size:
            if self._in_head and self._head_bytes == 0 and len(self.pipeline) >= MAX_PIPELINED:
                self._unread, self._tail = data[start:], b""
                self.flow.pause_reading()
                return
            if self._in_head:
                stop = self._blank_line_end(data, start)
                self._head_bytes += stop - start
                if self._head_bytes > MAX_REQUEST_HEAD:
                    self._reject_oversized()
                    return
            elif self._body_left is not None:
                stop = min(size, start + self._body_left)
                self._body_left -= stop - start
            else:  # a chunked body, which ends with a blank line too
                stop = self._blank_line_end(data, start)
            in_head = self._in_head
            super().data_received(data[start:stop])
            if self._refusal is not None or self.transport.is_closing():
                return
            if in_head and not self._in_head:  # a head is over, and its message is not: a body follows
                self._body_left = self._content_length()
            start = stop
        # A blank line may have begun in the last bytes. (If they ended a head instead, a blank
        # line seen across them only ends a piece early, which costs nothing.)
        self._tail = data[-3:] if size >= 3 else (self._tail + data)[-3:]

    def _blank_line_end(self, data: bytes, start: int) -> int:
        """Where the first blank line in data[start:] ends (one begun in the last data counts), or len(data)."""
        if start == 0 and self._tail:
            joined = self._tail + data[:3]
            end = joined.find(_BLANK_LINE)
            if end >= 0:
                return end + 4 - len(self._tail)
        end = data.find(_BLANK_LINE, start)
        return len(data) if end < 0 else end + 4

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        # Requests in flight, not connections: idle connections cost no work, and counting them
        # would let a client that opens many turn every other client's request into a 503.
        if self._limit is None or len(self.tasks) < self._limit:
            super().on_headers_complete()
            return
        logger.warning("%d requests in flight in this worker; answered 503", self._limit)
        app, self.app = self.app, _busy
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def _content_length(self) -> int | None:
        """The length of the body to come, if the head gave one (httptools has checked it)."""
        for name, value in self.headers:
            if name == b"content-length":
                # httptools passes on the whitespace after the digits (`5 `): read as no length,
                # everything after the head up to a blank line, the next head included, went to
                # the parser uncounted.
                value = value.rstrip(b" \t")
                return int(value) if value.isdigit() else None
        return None

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0
        self._body_left = None

    def send_400_response(self, msg: str) -> None:
        # uvicorn's own answer to a request it cannot parse is text/plain, and written at once,
        # before the answers of the requests pipelined ahead of it; ours are JSON, and in order.
        self._refuse(_INVALID)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _reject_oversized(self) -> None:
        logger.warning("request head over %d bytes; answered 431 and closed the connection", MAX_REQUEST_HEAD)
        self._refuse(_TOO_LARGE)

    def _refuse(self, answer: bytes) -> None:
        """Answer a head that cannot be served, and close: after the requests before it in the
        pipeline have been answered, in order; nothing more is read meanwhile."""
        self._refusal = answer
        if self.cycle is None or self.cycle.response_complete:
            self._send_refusal()
        else:
            self.flow.pause_reading()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts the next queued request, and resumes reading
        if self.transport.is_closing():
            return
        if self._refusal is not None and self.cycle.response_complete:
            self._send_refusal()
        elif self._unread and len(self.pipeline) < MAX_PIPELINED:
            unread, self._unread = self._unread, b""
            self.data_received(unread)  # before anything read from now on

    def _send_refusal(self) -> None:
        assert self._refusal is not None
        self.transport.write(self._refusal)
        self.transport.close()
