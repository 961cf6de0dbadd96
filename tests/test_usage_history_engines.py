"""The history and dated billing routes on each database engine, against a direct SELECT."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from conftest import ENGINES, AppClient, GatewayFactory
from support import Gateway

pytestmark = pytest.mark.asyncio

SLOT_STEP = 1700  # seconds between rows: they fall in ever-different slots


def utc(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())  # type: ignore[misc]


@pytest.fixture(params=ENGINES)
def gateway(request: pytest.FixtureRequest, make_gateway: GatewayFactory) -> Gateway:
    return make_gateway(request.param)


async def test_sums_per_local_day_and_model_on_every_engine(gateway: Gateway, app_client: AppClient) -> None:
    token, other = gateway.add_token(), gateway.add_token()
    start = utc(2026, 3, 28, 20)  # across Berlin's 23-hour day
    expected: dict[tuple[str, str], int] = {}
    berlin = ZoneInfo("Europe/Berlin")

    def count(created_at: int, model: str, quota: int) -> None:
        key = (datetime.fromtimestamp(created_at, berlin).date().isoformat(), model)
        expected[key] = expected.get(key, 0) + quota

    for n in range(40):  # in time order, as the gateway appends them
        created_at, model = start + n * SLOT_STEP, f"m{n % 3}"
        gateway.add_log(token if n % 4 else other, created_at=created_at, quota=1000 + n, model_name=model)
        if n % 4:
            count(created_at, model, 1000 + n)
        if n % 10 == 9:
            gateway.add_log(token, created_at=created_at + 5, type=6, quota=300, model_name="m0")
            count(created_at + 5, "m0", -300)
    params = {"start_date": "2026-03-28", "end_date": "2026-03-30", "tz": "Europe/Berlin", "group_by": "day,model"}
    dates = {"start_date": "2026-03-28", "end_date": "2026-03-31"}
    async with app_client() as (_, client):
        history = await client.get("/api/usage/token/history", params=params, headers=token.bearer)
        billing = await client.get("/v1/dashboard/billing/usage", params=dates, headers=token.bearer)
    assert history.status_code == 200, history.text
    buckets = history.json()["data"]["buckets"]
    assert [(b["date"], b["model"], b["quota"]) for b in buckets] == [(*k, q) for k, q in sorted(expected.items())]
    assert billing.status_code == 200, billing.text
    costs = sum(item["cost"] for day in billing.json()["daily_costs"] for item in day["line_items"])
    assert costs == pytest.approx(sum(expected.values()) / 500_000 * 100)
