from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
import pytest
import redis
from dbservers import (
    MYSQL_OLD_SCHEMA,
    POSTGRES_OLD_SCHEMA,
    MariaDBServer,
    MySQLGateway,
    PostgresGateway,
    PostgresServer,
)
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
    return Settings(
        sqlite_path=gateway.path,
        database=gateway.database,  # type: ignore[arg-type]
        db_timeout=0.3,
        redis_prefix=f"t{uuid.uuid4().hex[:8]}:",
    )


# The database engines a gateway runs on; tests parametrised over them use `make_gateway`.
ENGINES = ("sqlite", "postgres", "mysql")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session, started the first time a test needs it."""
    server = PostgresServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[MariaDBServer]:
    """One real MariaDB server for the session, started the first time a test needs it."""
    server = MariaDBServer()
    server.start()
    yield server
    server.stop()


GatewayFactory = Callable[..., Gateway]


@pytest.fixture
def make_gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GatewayFactory]:
    """`make_gateway(engine, old=False)`: an empty gateway database on that engine.

    `old` lays the tables out as one-api did (key as char(48), no model-limit columns).
    """
    made: list[Gateway] = []

    def make(engine: str, *, old: bool = False) -> Gateway:
        gw: Gateway
        if engine == "sqlite":
            gw = Gateway(
                tmp_path / ("one-api.db" if old else "new-api.db"), **({"schema": SQLITE_OLD_SCHEMA} if old else {})
            )
        elif engine == "postgres":
            server = request.getfixturevalue("postgres_server")
            gw = PostgresGateway(
                server, "one-api" if old else "new-api", **({"schema": POSTGRES_OLD_SCHEMA} if old else {})
            )
        elif engine == "mysql":
            server = request.getfixturevalue("mariadb_server")
            gw = MySQLGateway(server, "one-api" if old else "new-api", **({"schema": MYSQL_OLD_SCHEMA} if old else {}))
        else:
            raise ValueError(engine)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.close()


SQLITE_OLD_SCHEMA = """
CREATE TABLE tokens (
  id integer PRIMARY KEY AUTOINCREMENT, user_id integer, `key` char(48), status integer DEFAULT 1, name text,
  created_time integer, accessed_time integer, expired_time integer DEFAULT -1, remain_quota integer DEFAULT 0,
  unlimited_quota numeric, used_quota integer DEFAULT 0, deleted_at datetime
);
CREATE UNIQUE INDEX idx_tokens_key ON tokens(`key`);
CREATE TABLE users (
  id integer PRIMARY KEY AUTOINCREMENT, username text UNIQUE, password text NOT NULL, status integer DEFAULT 1,
  quota integer DEFAULT 0, deleted_at datetime
);
"""


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
