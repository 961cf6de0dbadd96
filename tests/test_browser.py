"""A real browser on another origin polls the usage with a Bearer token (CORS end to end).

Headless Chromium (Debian's `chromium`, installed by scripts/test) loads a page from a small
static server on one loopback port; the page fetches /api/usage/token from usage-service on
another, with an Authorization header, which makes the browser send a preflight first. The
test reads what the page wrote into its DOM.
"""

from __future__ import annotations

import functools
import html
import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import Gateway, Service, Token

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

PAGE = """<!doctype html>
<html><body><pre id="result">pending</pre>
<script>
fetch(%(url)s, {headers: {"Authorization": "Bearer sk-" + %(key)s}})
  .then(async (response) => {
    const body = await response.json();
    document.getElementById("result").textContent = JSON.stringify(
      {status: response.status, etag: response.headers.get("ETag"), body: body});
  })
  .catch((error) => {
    document.getElementById("result").textContent = JSON.stringify({error: String(error)});
  });
</script></body></html>
"""


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def static_site(directory: Path) -> Iterator[str]:
    """Serve a directory on a free loopback port: the dashboard's origin."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("chromium is not installed; run scripts/test, which installs it")
    return binary


def page_result(page_url: str, profile: Path) -> dict[str, object]:
    """Load a page in headless Chromium and return what its script wrote into #result."""
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--disable-quic",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        # Virtual time runs only while nothing is loading: the fetch finishes within the budget.
        "--virtual-time-budget=15000",
        "--dump-dom",
        page_url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="result">(.*?)</pre>', result.stdout, re.S)
    assert found is not None, f"no result in the page:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    parsed: dict[str, object] = json.loads(html.unescape(found.group(1)))
    return parsed


def write_page(directory: Path, service_url: str, token: Token) -> None:
    directory.mkdir()
    page = PAGE % {"url": json.dumps(service_url + "/api/usage/token"), "key": json.dumps(token.key)}
    (directory / "index.html").write_text(page)


def preflights(service_url: str, status: str) -> float:
    text = httpx.get(service_url + "/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "usage_http_requests_total"
        and sample.labels == {"route": "/api/usage/token", "status": status}
    )


def test_dashboard_on_another_origin(gateway: Gateway, tmp_path: Path) -> None:
    token = gateway.add_token(name="dashboard", remain=4321, used=79)
    with static_site(tmp_path / "allowed") as allowed, static_site(tmp_path / "other") as other:
        # The list names the first page's origin and not the second's.
        env = {"SQLITE_PATH": str(gateway.path), "USAGE_CORS_ORIGINS": f"https://dash.example.com, {allowed}"}
        with Service(env) as service:
            write_page(tmp_path / "allowed", service.url, token)
            write_page(tmp_path / "other", service.url, token)

            shown = page_result(allowed + "/index.html", tmp_path / "profile-1")
            assert preflights(service.url, "204") == 1  # the browser asked first, and was let through

            refused = page_result(other + "/index.html", tmp_path / "profile-2")
            assert preflights(service.url, "403") == 1  # the other origin's preflight was refused
            assert preflights(service.url, "200") == 1  # so only the allowed page's request was sent

    assert shown["status"] == 200
    assert shown["etag"]  # exposed to the page
    body = shown["body"]
    assert isinstance(body, dict)
    assert body["data"]["name"] == "dashboard"
    assert body["data"]["total_available"] == 4321
    assert body["data"]["total_used"] == 79
    assert "Failed to fetch" in str(refused.get("error"))
