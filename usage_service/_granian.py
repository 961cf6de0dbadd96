"""Serving with granian (`usage-service --server granian`), with the guarantees uvicorn's setup keeps.

granian parses HTTP in Rust (hyper) and only calls Python for the app, so a polled token costs
less CPU than under uvicorn. What cli.py's SERVER_OPTIONS and _http.py give uvicorn is kept:
- bounded request heads: hyper stops buffering a head at HTTP/1's buffer size and answers 431,
  per request, pipelined ones included (and 431 to a head of more than 100 header fields);
- a header-read timeout: a connection that has not sent a whole head within USAGE_HEADER_TIMEOUT
  of opening or of its last answer is closed (without an answer), idle keep-alive connections
  included (hyper starts the timer as soon as it waits for a head);
- HTTP/1 only, as under uvicorn: HTTP/2 heads have a bound of their own (16 MiB by default);
- no proxy-header rewriting (granian never does any) and no access log of its own (it would
  log query strings, which may carry keys): ours, --access-log, never logs a query string;
- graceful SIGTERM: the workers stop accepting, finish what is in flight, run the lifespan's
  shutdown, and the command exits 0.

Where granian differs, for want of a setting: its own answers to requests it cannot parse
(400, 431) are written by hyper with an empty body (no hook makes them JSON); it bounds a
worker's connections (by the open files limit), not its requests in flight, so none is answered
503 for being one too many; a SIGTERM waits for connections part-way through a head until their
header-read timeout; and every response carries `server: granian`.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from granian import Granian
from granian.constants import HTTPModes, Interfaces, Loops
from granian.http import HTTP1Settings
from granian.log import LogLevels
from granian.server.common import AbstractServer

from ._http import MAX_REQUEST_HEAD

# Seconds a worker has, beyond USAGE_HEADER_TIMEOUT, to stop after SIGTERM before granian kills
# it. A worker still starting when the signal comes (one just spawned to replace a worker that
# died) misses it and would serve on, and granian would wait for it for ever. A worker that got
# it waits for the connections part-way through a head until their header-read timeout closes
# them (hyper's graceful shutdown), then finishes what is in flight and runs the lifespan's
# shutdown (the leader lock handed over, the metrics' files removed): killed sooner, it skipped
# all that.
STOP_MARGIN = 10

# Descriptors a worker keeps for itself (database and Redis connections, logs, metrics' files).
OWN_DESCRIPTORS = 128


def http1_settings(header_timeout: int) -> HTTP1Settings:
    """granian's HTTP/1 settings: heads bounded in size and, by `header_timeout` seconds, in time."""
    return HTTP1Settings(
        header_read_timeout=header_timeout * 1000,
        keep_alive=True,
        # hyper refuses a head once its read buffer holds this much without a whole head; one read
        # (at most this much again) may land first. So every head up to MAX_REQUEST_HEAD is read,
        # as under uvicorn, and none over twice that is.
        max_buffer_size=MAX_REQUEST_HEAD,
    )


def server(
    target: str,
    *,
    host: str,
    port: int,
    workers: int,
    log_level: str,
    log_config: dict[str, Any],
    header_timeout: int,
    open_files: int,
) -> AbstractServer[Any]:
    """granian set up to serve the app factory `target` ("module:function"); `.serve()` runs it.

    `log_config` is the dictConfig uvicorn would be given (logs.uvicorn_config): granian's own
    lines go through its "default" handler, so they come out in the same format as ours.
    """
    loggers = log_config["loggers"]
    log_config = {**log_config, "loggers": {**loggers, "_granian": {**loggers["uvicorn"]}}}
    return Granian(
        target,
        address=host,
        port=port,
        interface=Interfaces.ASGI,  # with the lifespan, run in every worker
        factory=True,
        workers=workers,
        loop=Loops.uvloop if importlib.util.find_spec("uvloop") else Loops.asyncio,
        http=HTTPModes.http1,
        http1_settings=http1_settings(header_timeout),
        # granian's backpressure counts connections, not requests: a worker takes no new
        # connection past it, so idle ones from one client would shut it to everyone else. It
        # is set to what the open files allow, as uvicorn's connections are bounded.
        backpressure=max(1, open_files - OWN_DESCRIPTORS),
        websockets=False,
        log_enabled=True,
        log_level=LogLevels(log_level),
        log_dictconfig=log_config,
        log_access=False,
        # A worker that dies is replaced (a crash loop still stops the server), as uvicorn's are.
        respawn_failed_workers=True,
        workers_kill_timeout=header_timeout + STOP_MARGIN,
    )
