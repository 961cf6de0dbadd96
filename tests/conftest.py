from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
import pytest
import redis
from starlette.applications import Starlette
from support import Gateway, RedisServer

from usage_service.app import create_app
from usage_service.config import Settings


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session; tests that kill Redis start their own."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield redis_server.url
    client.flushall()
    client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = Gateway(tmp_path / "one-api.db")
    yield gw
    gw.close()


@pytest.fixture
def settings(gateway: Gateway) -> Settings:
    # A unique prefix per test keeps tests from reading each other's Redis entries.
    return Settings(sqlite_path=gateway.path, db_timeout=0.3, redis_prefix=f"t{uuid.uuid4().hex[:8]}:")


AppClient = Callable[..., AbstractAsyncContextManager[tuple[Starlette, httpx.AsyncClient]]]


@pytest.fixture
def app_client(settings: Settings) -> AppClient:
    """Run the app's lifespan and talk to it in process: `async with app_client(**overrides) as (app, client)`."""

    @asynccontextmanager
    async def run(**overrides: object) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
        app = create_app(dataclasses.replace(settings, **overrides))  # type: ignore[arg-type]
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                yield app, client

    return run
