"""End to end: the legacy `?key=` of GET /api/log/token through the real servers, with the access
log and debug logging on: the key reaches no line the process writes."""

from __future__ import annotations

import httpx
import pytest
from support import Gateway, Service, wait_until

pytestmark = pytest.mark.e2e

URL = "/api/log/token"


def test_a_key_in_the_query_reaches_no_line_of_the_process(gateway: Gateway, server: str) -> None:
    token = gateway.add_token()
    gateway.add_log(token, content="seen")
    unknown = "Z" * 48
    env = {"SQLITE_PATH": str(gateway.path)}
    with Service(env, "--access-log", "--log-level", "debug", server=server) as service:
        ok = httpx.get(f"{service.url}{URL}?key=sk-{token.key}")
        bad = httpx.get(f"{service.url}{URL}/?key={token.key}&p=x")
        refused = httpx.get(f"{service.url}{URL}?key=sk-{unknown}")
        assert wait_until(lambda: service.output().count(f'"GET {URL}') >= 3)
    assert ok.status_code == 200 and [r["content"] for r in ok.json()["data"]] == ["seen"]
    assert bad.status_code == 400 and refused.status_code == 401
    output = service.output()
    assert f'"GET {URL}" 200' in output and f'"GET {URL}/" 400' in output and f'"GET {URL}" 401' in output
    assert token.key not in output and unknown not in output
