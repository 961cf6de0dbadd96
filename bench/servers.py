"""The peers usage-service is measured against, served exactly as the service is.

python bench/servers.py ceiling --port P --db one-api.db --key KEY [--server granian]
python bench/servers.py naive   --port P --db one-api.db

The ceiling runs on uvicorn (cli.SERVER_OPTIONS) or granian (usage_service._granian's settings);
the naive peer on uvicorn.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from usage_service import logs
from usage_service._http import raise_descriptor_limit
from usage_service.auth import bearer_key, usage_verdict
from usage_service.cli import SERVER_OPTIONS
from usage_service.config import Settings
from usage_service.store.sqlite import SQLiteStore


def ceiling(body: bytes, etag: bytes) -> object:
    """The same 200 answer, headers included, with no work at all: what the HTTP stack can do."""
    headers = [
        (b"content-type", b"application/json"),
        (b"cache-control", b"private, no-cache"),
        (b"etag", etag),
        (b"content-length", str(len(body)).encode()),
    ]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def naive(db: Path) -> Starlette:
    """The same contract written plainly: Starlette routing, one database query per request."""
    store: SQLiteStore | None = None

    async def usage(request: Request) -> Response:
        key = bearer_key(request.headers.get("authorization", "").encode("latin-1"))
        if key is None:
            return JSONResponse({"success": False, "message": "Invalid Bearer token"}, 401)
        assert store is not None
        record = await store.fetch(key.decode())
        if record is None:
            return JSONResponse({"success": False, "message": "token not found"}, 401)
        rejection = usage_verdict(record)
        if rejection is not None:
            return JSONResponse({"success": False, "message": rejection.message}, rejection.status)
        return JSONResponse(
            {"code": True, "message": "ok", "data": record.usage_data()}, headers={"cache-control": "private, no-cache"}
        )

    async def stats(request: Request) -> Response:
        return JSONResponse({"statements": store.statements if store else 0})

    async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
        nonlocal store
        store = await SQLiteStore.open(db, timeout=2.0, pool_size=Settings.db_pool_size)
        yield
        await store.close()

    routes = [Route("/api/usage/token", usage), Route("/api/usage/token/", usage), Route("/_stats", stats)]
    return Starlette(routes=routes, lifespan=lifespan)


def ceiling_from_env() -> object:
    """The ceiling app, as a factory granian's worker calls (it imports this module by name)."""
    record = asyncio.run(_fetch(Path(os.environ["BENCH_DB"]), os.environ["BENCH_KEY"]))
    return ceiling(record.usage.body, record.usage.etag)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["ceiling", "naive"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--key", help="ceiling: the token whose answer it returns")
    parser.add_argument("--server", choices=["uvicorn", "granian"], default="uvicorn", help="ceiling: served by")
    args = parser.parse_args()
    if args.kind == "ceiling" and args.server == "granian":
        from usage_service import _granian

        os.environ |= {"BENCH_DB": str(args.db), "BENCH_KEY": args.key}
        config = logs.uvicorn_config("warning", "text")
        _granian.server(
            "servers:ceiling_from_env",
            host="127.0.0.1",
            port=args.port,
            workers=1,
            log_level="warning",
            log_config=config,
            header_timeout=Settings.header_timeout,
            open_files=raise_descriptor_limit(),
        ).serve()
        return
    if args.kind == "ceiling":
        record = asyncio.run(_fetch(args.db, args.key))
        app = ceiling(record.usage.body, record.usage.etag)
    else:
        app = naive(args.db)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", **SERVER_OPTIONS)  # type: ignore[arg-type]


async def _fetch(db: Path, key: str):  # type: ignore[no-untyped-def]
    store = await SQLiteStore.open(db, timeout=2.0, pool_size=Settings.db_pool_size)
    record = await store.fetch(key)
    await store.close()
    assert record is not None, "the ceiling's token is not in the database"
    return record


if __name__ == "__main__":
    main()
