"""Memory stays bounded: a sweep of distinct keys (valid and invalid, each from its own address)
leaves every per-key structure at its size limit. bench/faults/key_sweep.py is the 1,000,000-key
version against the real process, with RSS figures."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from asgi import call
from conftest import AppClient
from support import Gateway

from usage_service.config import Settings
from usage_service.demo import new_key

LIMIT = 1000
SWEEP = 20_000


async def test_a_sweep_of_distinct_keys_leaves_the_caches_at_their_limits(
    gateway: Gateway, app_client: AppClient
) -> None:
    valid = gateway.add_tokens(SWEEP // 2)
    invalid = [new_key() for _ in range(SWEEP // 2)]
    overrides = {
        "local_cache_size": LIMIT,
        "negative_cache_size": LIMIT,
        "hot_max": LIMIT,
        "refresh_interval": 0.2,
        "auth_fail_limit": 30,
        "trusted_proxies": (ipaddress.ip_network("127.0.0.0/8"),),
    }
    async with app_client(**overrides) as (app, _):
        limiter, lookup, refresher = app.state.limiter, app.state.lookup, app.state.refresher
        limiter._counts.max_size = limiter._blocked.max_size = LIMIT
        statuses: dict[int, int] = {}

        async def poll(i: int, key: str) -> None:
            address = str(ipaddress.ip_address("10.0.0.0") + i)  # every request from its own client
            headers = [(b"authorization", f"Bearer sk-{key}".encode()), (b"x-forwarded-for", address.encode())]
            answer = await call(app, headers=headers)
            statuses[answer.status] = statuses.get(answer.status, 0) + 1

        keys = [k for pair in zip(valid, invalid, strict=True) for k in pair]
        for start in range(0, len(keys), 250):
            await asyncio.gather(*(poll(start + i, k) for i, k in enumerate(keys[start : start + 250])))
        await asyncio.sleep(0.5)  # a refresher round or two trims its hot set

        assert statuses == {200: SWEEP // 2, 401: SWEEP // 2}
        assert len(lookup.local) == LIMIT
        assert len(lookup.negative) == LIMIT
        assert len(limiter._counts) == LIMIT
        assert len(refresher.polled) <= LIMIT
        assert len(lookup._loads) == 0


@pytest.mark.parametrize("count", [1, 50, 1000])
async def test_batched_statements_use_the_key_and_id_indexes(gateway: Gateway, count: int) -> None:
    """A batch of keys must not become a scan of every live token (found by the key sweep)."""
    from usage_service.store.sqlite import SQLiteStore

    store = await SQLiteStore.open(gateway.path, timeout=1.0, pool_size=Settings.db_pool_size)
    try:
        for column, index in (("key", "idx_tokens_key"), ("id", "PRIMARY KEY")):
            condition, params = store._match(column, [0] * count)  # type: ignore[arg-type]
            statement = f"{store._select} WHERE {condition} AND {store._live()}"
            rows = gateway.db.execute("EXPLAIN QUERY PLAN " + statement, list(params))
            plan = " ".join(row[3].replace("SEARCH TABLE ", "SEARCH ") for row in rows)  # older SQLite says TABLE
            tokens, _, users = plan.partition("SEARCH u ")
            assert tokens.startswith("SEARCH t ") and index in tokens and "deleted_at" not in tokens, plan
            assert "PRIMARY KEY" in users, plan
    finally:
        await store.close()


def test_rendered_answers_kept_with_records_are_their_own_size() -> None:
    """orjson's output keeps a 4 KiB buffer; kept per cached record it dominated a worker's RSS."""
    import tracemalloc

    from usage_service.records import TokenRecord

    records = [TokenRecord(i, 1, "t", 1, -1, 1000, 0, False, False, (), 1) for i in range(2000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [(r.usage.body, r.cache_fields) for r in records]
        per_record = (tracemalloc.get_traced_memory()[0] - before) / len(records)
    finally:
        tracemalloc.stop()
    assert len(kept[0][0]) < 400
    assert per_record < 1500, f"{per_record:.0f} bytes kept per record"
