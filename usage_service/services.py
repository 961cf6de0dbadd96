"""What the lifespan opens and the request path uses, in one typed holder.

create_app makes an empty Services and hands it to the auth middleware, the endpoints and the
health routes as it builds them; the lifespan fills it before the first request and leaves it
filled until the process ends. One object, read where it is used: nothing is fished out of
the ASGI scope, nothing is kept twice.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from .billing import GatewayOptions
from .days import DaySums
from .history import History
from .limiter import AuthFailureLimiter
from .lookup import TokenLookup
from .refresh import Refresher
from .shared import SharedRedis
from .store import TokenStore
from .store.logs import LogReader


class Services:
    # Declared, not set: reading one before the lifespan ran is an AttributeError, not a None.
    __slots__ = (
        "store",
        "logs",
        "redis",
        "lookup",
        "limiter",
        "options",
        "refresher",
        "history",
        "day_sums",
        "metrics",
    )

    store: TokenStore
    logs: LogReader  # the gateway's request log: in `store`'s database, or LOG_SQL_DSN's
    redis: SharedRedis | None  # None: Redis is not configured
    lookup: TokenLookup
    limiter: AuthFailureLimiter | None  # None: USAGE_AUTH_FAIL_LIMIT is 0
    options: GatewayOptions
    refresher: Refresher
    history: History  # spending by slot and model, from the gateway's log
    day_sums: DaySums  # the history per day and model, closed days' sums kept
    metrics: CollectorRegistry | None  # None: USAGE_METRICS is off
