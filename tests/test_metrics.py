"""Prometheus metrics, in process: what is counted, how it is labelled, where it is served."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import AppClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from support import Gateway, free_port

from usage_service import metrics
from usage_service.access import BUCKETS

pytestmark = pytest.mark.asyncio

URL = "/api/usage/token"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return parse(response.text)


def grown(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_requests_by_route_and_status(gateway: Gateway, app_client: AppClient) -> None:
    token, banned = gateway.add_token(), gateway.add_token(user_id=gateway.add_user(status=2))
    async with app_client() as (_, client):
        before = await scrape(client)
        for _ in range(3):
            assert (await client.get(URL, headers=token.bearer)).status_code == 200
        assert (await client.get(URL + "/", headers=token.bearer)).status_code == 200
        assert (await client.get(URL)).status_code == 401
        assert (await client.get(URL, headers=banned.bearer)).status_code == 403
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get(f"/no/such/sk-{token.key}")).status_code == 404
        after = await scrape(client)
    route = {"route": URL}
    assert grown(before, after, "usage_http_requests_total", **route, status="200") == 4  # both spellings
    assert grown(before, after, "usage_http_requests_total", **route, status="401") == 1
    assert grown(before, after, "usage_http_requests_total", **route, status="403") == 1
    assert grown(before, after, "usage_http_requests_total", route="/healthz", status="200") == 1
    assert grown(before, after, "usage_http_requests_total", route="other", status="404") == 1
    # The histogram saw every usage request; buckets are cumulative and end at +Inf.
    histogram = "usage_http_request_duration_seconds"
    assert grown(before, after, histogram + "_count", **route) == 6
    assert grown(before, after, histogram + "_bucket", **route, le="+Inf") == 6
    assert 0 < grown(before, after, histogram + "_sum", **route) < 6
    cumulative = [value(after, histogram + "_bucket", **route, le=str(bound)) for bound in BUCKETS]
    assert cumulative == sorted(cumulative)


async def test_no_key_material_in_metrics(gateway: Gateway, app_client: AppClient, redis_url: str) -> None:
    tokens = [gateway.add_token() for _ in range(5)]
    async with app_client(redis_url=redis_url) as (_, client):
        for token in tokens:
            await client.get(URL, headers=token.bearer)
            await client.get(f"/api/usage/{token.key}", headers=token.bearer)
        text = (await client.get("/metrics")).text
    for token in tokens:
        assert token.key not in text
        assert token.key[:16] not in text


async def test_cache_layers_database_and_limiter(gateway: Gateway, app_client: AppClient, redis_url: str) -> None:
    token = gateway.add_token()
    async with app_client(redis_url=redis_url) as (first, client):
        before = await scrape(client)
        await client.get(URL, headers=token.bearer)  # database
        await client.get(URL, headers=token.bearer)  # in-process
        await client.get(URL, headers={"Authorization": "Bearer sk-unknownkey1"})  # database, then negative
        await client.get(URL, headers={"Authorization": "Bearer sk-unknownkey1"})
        first.state.lookup.stats.limited += 2  # what a rate limiter does when it turns requests away
        after = await scrape(client)
    async with app_client(redis_url=redis_url) as (_, client):  # another instance: Redis has it
        await client.get(URL, headers=token.bearer)
        shared = await scrape(client)
    assert grown(before, after, "usage_cache_hits_total", layer="local") == 1
    assert grown(before, after, "usage_cache_hits_total", layer="negative") == 1
    assert grown(before, after, "usage_cache_misses_total", layer="local") == 2
    assert grown(before, after, "usage_cache_misses_total", layer="redis") == 2
    assert grown(before, after, "usage_db_lookups_total") == 2
    assert grown(before, after, "usage_db_statements_total") == 2
    assert grown(before, after, "usage_limiter_rejections_total") == 2
    assert grown(after, shared, "usage_cache_hits_total", layer="redis") == 1
    assert grown(after, shared, "usage_db_statements_total") == 0


async def test_database_errors(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client() as (_, client):
        before = await scrape(client)
        with gateway.exclusive_lock():
            assert (await client.get(URL, headers=token.bearer)).status_code == 503
        after = await scrape(client)
    assert grown(before, after, "usage_db_errors_total") >= 1
    assert grown(before, after, "usage_http_requests_total", route=URL, status="503") == 1


async def test_readiness_probes_are_not_statements(gateway: Gateway, app_client: AppClient) -> None:
    """/readyz reads the database, but usage_db_statements says what polling costs: however often
    a probe asks, it adds nothing, and a failed probe adds nothing to usage_db_errors (its answer
    says so). A lookup still counts."""
    token = gateway.add_token()
    async with app_client(refresh_interval=0) as (_, client):
        before = await scrape(client)
        for _ in range(20):
            assert (await client.get("/readyz")).status_code == 200
        with gateway.exclusive_lock():
            failed = await client.get("/readyz")
        probed = await scrape(client)
        assert (await client.get(URL, headers=token.bearer)).status_code == 200
        looked_up = await scrape(client)
    assert failed.status_code == 503 and failed.json()["database"] == "unavailable"
    assert grown(before, probed, "usage_db_statements_total") == 0
    assert grown(before, probed, "usage_db_errors_total") == 0
    assert grown(probed, looked_up, "usage_db_statements_total") == 1
    assert grown(probed, looked_up, "usage_db_lookups_total") == 1


async def test_redis_circuit_state(gateway: Gateway, app_client: AppClient, redis_url: str) -> None:
    token = gateway.add_token()
    async with app_client(redis_url=redis_url) as (_, client):
        assert value(await scrape(client), "usage_redis_circuit_open") == 0
    async with app_client(redis_url=f"redis://127.0.0.1:{free_port()}/0", local_ttl=0) as (_, client):
        for _ in range(4):  # three failures in a row open the circuit
            assert (await client.get(URL, headers=token.bearer)).status_code == 200
        samples = await scrape(client)
    assert value(samples, "usage_redis_circuit_open") == 1
    assert value(samples, "usage_redis_errors_total") >= 3


async def test_refresher_lag_and_batch_size(gateway: Gateway, app_client: AppClient, redis_url: str) -> None:
    tokens = [gateway.add_token() for _ in range(3)]
    async with app_client(redis_url=redis_url, refresh_interval=0.1) as (_, client):
        before = await scrape(client)
        for token in tokens:
            await client.get(URL, headers=token.bearer)
        for _ in range(100):
            await asyncio.sleep(0.05)
            after = await scrape(client)
            if value(after, "usage_refresh_tokens") == 3:
                break
    assert value(after, "usage_refresh_tokens") == 3
    assert value(after, "usage_refresh_leader") == 1
    assert value(after, "usage_refresh_last_run_timestamp_seconds") > value(
        before, "usage_refresh_last_run_timestamp_seconds"
    )
    assert grown(before, after, "usage_refresh_runs_total") >= 1
    assert grown(before, after, "usage_refresh_tokens_read_total") >= 3


async def test_metrics_can_be_turned_off(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    async with app_client(metrics=False) as (app, client):
        assert (await client.get(URL, headers=token.bearer)).status_code == 200
        response = await client.get("/metrics")
        assert app.access is None  # type: ignore[attr-defined]  # no request is even timed
    assert response.status_code == 404
    assert response.json() == {"success": False, "message": "not found"}


async def test_metrics_on_their_own_address(gateway: Gateway, app_client: AppClient) -> None:
    token = gateway.add_token()
    port = free_port()
    async with app_client(metrics_address=("127.0.0.1", port)) as (_, client):
        assert (await client.get(URL, headers=token.bearer)).status_code == 200
        assert (await client.get("/metrics")).status_code == 404  # not on the main port
        async with httpx.AsyncClient() as outside:
            for _ in range(100):  # the server starts with the lifespan
                try:
                    response = await outside.get(f"http://127.0.0.1:{port}/metrics")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
    assert response.status_code == 200
    # Published at scrape time: the request just made is already counted.
    assert value(parse(response.text), "usage_http_requests_total", route=URL, status="200") >= 1
    # The lifespan closed it.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1)


async def test_a_worker_that_died_leaves_no_gauge_behind(tmp_path: Path) -> None:
    """A worker killed without its shutdown (SIGKILL, a crash) kept its gauges in every scrape:
    its open circuit read 1 for ever. Its counters stay, so that totals never go back."""
    script = (
        "import os; from usage_service import metrics;"
        " metrics.REDIS_CIRCUIT_OPEN.set(1); metrics.REFRESH_LEADER.set(1); metrics.LOOP_LAG.set(3.0);"
        " metrics.DB_LOOKUPS.inc(5); os._exit(0)"  # dies without running its shutdown
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, cwd=Path(__file__).parent.parent)

    def scraped() -> dict[str, float]:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
        text = generate_latest(registry).decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    assert scraped()["usage_redis_circuit_open"] == 1
    metrics.forget_dead_workers(str(tmp_path))
    after = scraped()
    assert {"usage_redis_circuit_open", "usage_refresh_leader", "usage_event_loop_lag_seconds"}.isdisjoint(after)
    assert after["usage_db_lookups_total"] == 5


async def test_a_scrape_holds_while_workers_come_and_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scrape answered 500 when a worker's file was empty (a worker starting) or gone by the
    time it was read (another worker's scrape had just forgotten a dead worker's gauges)."""
    script = "import os; from usage_service import metrics; metrics.DB_LOOKUPS.inc(5); os._exit(0)"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, cwd=Path(__file__).parent.parent)
    (tmp_path / "counter_4194301.db").touch()  # a worker starting: created, not yet sized
    forgotten = tmp_path / "gauge_max_4194303.db"
    forgotten.write_bytes(struct.pack("i", 8) + bytes(4))  # a worker's file holding no value yet
    real_merge = MultiProcessCollector.merge
    merges = 0

    def merge_after_another_scrape(files: list[str], accumulate: bool = True) -> object:
        # Between this scrape's listing and its reading, another worker's scrape removes a file.
        nonlocal merges
        merges += 1
        forgotten.unlink(missing_ok=True)
        return real_merge(files, accumulate)  # type: ignore[no-untyped-call]

    monkeypatch.setattr(MultiProcessCollector, "merge", staticmethod(merge_after_another_scrape))
    samples = {s.name: s.value for family in metrics.every_worker(str(tmp_path)) for s in family.samples}
    assert samples["usage_db_lookups_total"] == 5
    assert merges == 2  # listed again once


async def test_the_metrics_address_is_tried_again_when_it_cannot_be_had(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An address the machine does not hold (yet: an interface still coming up) was tried once,
    and the metrics were gone until a restart. It is said once and tried again."""
    registry, port = CollectorRegistry(), free_port()
    tries: list[str] = []
    start = metrics.start_http_server

    def start_once_held(port: int, host: str, registry: CollectorRegistry) -> Any:
        tries.append(host)
        if len(tries) <= 5:  # the address comes up after five tries
            return start(port, "192.0.2.1", registry)  # (TEST-NET-1: never this machine's)
        return start(port, "127.0.0.1", registry)

    monkeypatch.setattr(metrics, "start_http_server", start_once_held)
    serving = asyncio.create_task(metrics.serve_separately(registry, "metrics.internal", port, retry=0.01))
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(500):
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"http://127.0.0.1:{port}/metrics")).status_code == 200:
                        break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the metrics were never served")
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
    assert len(tries) == 6
    said = [r.getMessage() for r in caplog.records if "cannot serve metrics" in r.getMessage()]
    assert len(said) == 1 and "trying again" in said[0]
