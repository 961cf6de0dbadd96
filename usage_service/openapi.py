"""The OpenAPI document: kept in the repository as package data, served at /openapi.json.

It is also the one list of the service's routes: the metrics label requests by its paths, and
CORS applies to the paths that declare an `options` operation (the browser-facing API).
Adding a route means describing it there.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import orjson

DOCUMENT: bytes = resources.files(__package__).joinpath("openapi.json").read_bytes()
SPEC: dict[str, Any] = orjson.loads(DOCUMENT)

PATHS: tuple[str, ...] = tuple(SPEC["paths"])
# Paths a browser on another origin may call.
BROWSER_PATHS: frozenset[str] = frozenset(path for path, item in SPEC["paths"].items() if "options" in item)
# path -> the route label in metrics: an alias with a trailing slash counts as its route.
ROUTE_LABELS: dict[str, str] = {path: path.rstrip("/") or "/" for path in PATHS}
