from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from dbservers import (
    MYSQL_LOGS_SCHEMA,
    MYSQL_OLD_SCHEMA,
    POSTGRES_LOGS_SCHEMA,
    POSTGRES_OLD_SCHEMA,
    MariaDBServer,
    MySQLGateway,
    PostgresGateway,
    PostgresServer,
)
from redis_topologies import RedisClusterNodes, RedisTopology, SentinelGroup
from starlette.applications import Starlette
from support import SQLITE_LOGS_SCHEMA, Gateway, RedisServer

from usage_service.app import create_app
from usage_service.cli import SERVERS
from usage_service.config import Settings


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session; tests that kill Redis start their own."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    """A master, a replica and three sentinels for the session; the failover test starts its own."""
    group = SentinelGroup(tmp_path_factory.mktemp("sentinel"))
    group.start()
    yield group
    group.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    """A three-master Redis Cluster for the session."""
    cluster = RedisClusterNodes(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


REDIS_TOPOLOGIES = ("standalone", "sentinel", "cluster")


@pytest.fixture(scope="module", params=SERVERS)
def server(request: pytest.FixtureRequest) -> str:
    """The HTTP server the end-to-end tests that take it start the service on, each in turn."""
    return request.param  # type: ignore[no-any-return]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run tests marked `redis_topologies` once per Redis topology; others use standalone Redis."""
    marker = metafunc.definition.get_closest_marker("redis_topologies")
    if marker is None or "redis_topology" not in metafunc.fixturenames:
        return
    names = marker.args or REDIS_TOPOLOGIES
    params = [
        pytest.param(name, id=name, marks=() if name == "standalone" else pytest.mark.slow_topology) for name in names
    ]
    metafunc.parametrize("redis_topology", params, indirect=True)


@pytest.fixture
def redis_topology(request: pytest.FixtureRequest) -> RedisTopology:
    name = getattr(request, "param", "standalone")
    if name == "sentinel":
        return request.getfixturevalue("redis_sentinel").topology()  # type: ignore[no-any-return]
    if name == "cluster":
        return request.getfixturevalue("redis_cluster").topology()  # type: ignore[no-any-return]
    server: RedisServer = request.getfixturevalue("redis_server")
    return RedisTopology(
        "standalone", server.url, env={"REDIS_CONN_STRING": server.url}, client=lambda: redis.Redis.from_url(server.url)
    )


@pytest.fixture
def redis_url(redis_topology: RedisTopology) -> Iterator[str]:
    """The Redis to test with, emptied; the `settings` fixture carries its topology."""
    client = redis_topology.client()
    client.flushall()
    yield redis_topology.url
    client.flushall()
    client.close()


@pytest.fixture
def redis_client(redis_topology: RedisTopology, redis_url: str) -> Iterator[Any]:
    """A plain client of the test's Redis (redis.Redis, or redis.RedisCluster on Cluster)."""
    client = redis_topology.client()
    yield client
    client.close()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = Gateway(tmp_path / "one-api.db")
    yield gw
    gw.close()


@pytest.fixture
def settings(gateway: Gateway, request: pytest.FixtureRequest) -> Settings:
    # A unique prefix per test keeps tests from reading each other's Redis entries. Tests send
    # many bad credentials from one address: the limiter is off unless a test turns it on.
    settings = Settings(
        sqlite_path=gateway.path,
        database=gateway.database,  # type: ignore[arg-type]
        db_timeout=0.3,
        redis_prefix=f"t{uuid.uuid4().hex[:8]}:",
        auth_fail_limit=0,
    )
    if "redis_topology" in request.fixturenames:
        # The test talks to Redis through `redis_url`: connect the way its topology needs.
        topology: RedisTopology = request.getfixturevalue("redis_topology")
        settings = dataclasses.replace(settings, **topology.mode_settings)
    return settings


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


@pytest.fixture
def make_log_gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GatewayFactory]:
    """`make_log_gateway(engine)`: an empty log database of its own on that engine (LOG_SQL_DSN),
    holding only the gateway's `logs` table: a second SQLite file, or a second server database.
    Settings reach it through `log_database=gw.log_database`."""
    made: list[Gateway] = []

    def make(engine: str) -> Gateway:
        gw: Gateway
        if engine == "sqlite":
            gw = Gateway(tmp_path / "new-api-log.db", schema=SQLITE_LOGS_SCHEMA)
        elif engine == "postgres":
            gw = PostgresGateway(request.getfixturevalue("postgres_server"), "new-api-log", schema=POSTGRES_LOGS_SCHEMA)
        elif engine == "mysql":
            gw = MySQLGateway(request.getfixturevalue("mariadb_server"), "new-api-log", schema=MYSQL_LOGS_SCHEMA)
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
