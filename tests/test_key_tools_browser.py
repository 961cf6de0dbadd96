"""The two key-checking web apps people host for their users, as a real browser runs them.

A page on another origin makes exactly the calls new-api-key-tool and neko-api-key-tool make
(read from their public sources; nothing of theirs is copied here), with their headers, and
renders what they render: the token's balance and usage, and its log rows. Headless Chromium
loads it against usage-service with CORS on; the test reads the rendered page back and compares
it with the database.

- new-api-key-tool: `GET {base}/api/usage/token/` and `GET {base}/api/log/token`, both with
  `Authorization: Bearer sk-…`; amounts shown as `$` + quota / 500,000 (3 digits for the
  totals, 6 for a row), the log oldest first (it reverses the answer).
- neko-api-key-tool: `GET {base}/v1/dashboard/billing/subscription` and
  `GET {base}/v1/dashboard/billing/usage?start_date=…&end_date=…` (100 days back to today, in
  the browser's local time, months and days unpadded, as it writes them) with the header;
  balance `hard_limit_usd`, usage `total_usage / 100`, remaining their difference; then
  `GET {base}/api/log/token?key=sk-…` with no header at all.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from support import Gateway, Service, Token
from test_browser import page_result, static_site

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

QUOTA_PER_UNIT = 500_000

PAGE = """<!doctype html>
<html><body>
<section><h2>new-api-key-tool</h2><table id="new-info"></table><table id="new-logs"></table></section>
<section><h2>neko-api-key-tool</h2><table id="neko-info"></table><table id="neko-logs"></table></section>
<pre id="result">pending</pre>
<script>
const base = %(base)s;
const key = "sk-" + %(key)s;  // what the user pastes into both apps
const calls = [];

async function get(path, headers) {
  const response = await fetch(base + path, {headers: headers || {}});
  calls.push([path, response.status]);
  if (!response.ok) throw new Error(path + " answered " + response.status);
  return response.json();
}
const dollars = (quota, digits) => "$" + (quota / %(quota_per_unit)d).toFixed(digits);
const unpadded = (d) => d.getFullYear() + "-" + (d.getMonth() + 1) + "-" + d.getDate();

function put(table, cells) {
  const tr = document.getElementById(table).insertRow();
  for (const cell of cells) tr.insertCell().textContent = String(cell);
}
function logRows(table, rows) {
  for (const r of rows.slice().reverse()) {
    put(table, [r.created_at, r.type, r.model_name, r.prompt_tokens, r.completion_tokens, dollars(r.quota, 6)]);
  }
}

async function newApiKeyTool() {
  const auth = {Authorization: "Bearer " + key};
  const usage = await get("/api/usage/token/", auth);
  const d = usage.data;
  put("new-info", ["name", d.name]);
  put("new-info", ["granted", dollars(d.total_granted, 3)]);
  put("new-info", ["available", dollars(d.total_available, 3)]);
  put("new-info", ["used", dollars(d.total_used, 3)]);
  const log = await get("/api/log/token", auth);
  if (log.success) logRows("new-logs", log.data);
}

async function nekoApiKeyTool() {
  const auth = {Authorization: "Bearer " + key};
  const subscription = await get("/v1/dashboard/billing/subscription", auth);
  const now = new Date();
  const start = new Date(now.getTime() - 100 * 24 * 3600 * 1000);
  const usage = await get(
    "/v1/dashboard/billing/usage?start_date=" + unpadded(start) + "&end_date=" + unpadded(now), auth);
  const balance = subscription.hard_limit_usd, used = usage.total_usage / 100;
  put("neko-info", ["balance", "$" + balance.toFixed(3)]);
  put("neko-info", ["remaining", "$" + (balance - used).toFixed(3)]);
  put("neko-info", ["used", "$" + used.toFixed(3)]);
  const log = await get("/api/log/token?key=" + key);
  if (log.success) logRows("neko-logs", log.data);
}

const cells = (table) =>
  [...document.getElementById(table).rows].map((tr) => [...tr.cells].map((td) => td.textContent));

(async () => {
  const shown = {calls: calls, errors: []};
  for (const app of [newApiKeyTool, nekoApiKeyTool]) {
    try { await app(); } catch (error) { shown.errors.push(app.name + ": " + error); }
  }
  for (const table of ["new-info", "new-logs", "neko-info", "neko-logs"]) shown[table] = cells(table);
  document.getElementById("result").textContent = JSON.stringify(shown);
})();
</script></body></html>
"""


def dollars(quota: int, digits: int) -> str:
    return f"${quota / QUOTA_PER_UNIT:.{digits}f}"


def test_both_key_tools_show_the_databases_truth(gateway: Gateway, tmp_path: Path) -> None:
    # Amounts chosen away from rounding ties: JavaScript's toFixed and Python's format agree on them.
    token = gateway.add_token(name="status line", remain=1_234_567, used=765_433)
    other = gateway.add_token(user_id=token.user_id, name="status line", remain=10, used=10)
    now = int(time.time())
    rows = []  # (created_at, type, model, prompt, completion, quota), oldest first
    for i in range(8):
        kind = 5 if i == 3 else 6 if i == 6 else 2
        row = (
            now - 3600 * (8 - i),
            kind,
            ("gpt-4o", "o3")[i % 2],
            100 + i,
            20 + i,
            0 if kind == 5 else 1_234 * (i + 1),
        )
        gateway.add_log(
            token,
            created_at=row[0],
            type=kind,
            model_name=row[2],
            prompt_tokens=row[3],
            completion_tokens=row[4],
            quota=row[5],
            token_name="status line",
            other='{"admin_info":{"use_channel":["7"]}}',
        )
        rows.append(row)
        gateway.add_log(other, created_at=row[0], quota=999_999, token_name="status line")  # never shown

    site = tmp_path / "site"
    site.mkdir()
    with static_site(site) as origin:
        env = {"SQLITE_PATH": str(gateway.path), "USAGE_CORS_ORIGINS": origin}
        with Service(env) as service:
            page = PAGE % {
                "base": json.dumps(service.url),
                "key": json.dumps(token.key),
                "quota_per_unit": QUOTA_PER_UNIT,
            }
            (site / "index.html").write_text(page)
            shown = page_result(origin + "/index.html", tmp_path / "profile")

    assert shown["errors"] == []
    assert [call[0].split("?")[0] for call in shown["calls"]] == [  # type: ignore[union-attr]
        "/api/usage/token/",
        "/api/log/token",
        "/v1/dashboard/billing/subscription",
        "/v1/dashboard/billing/usage",
        "/api/log/token",
    ]
    assert {call[1] for call in shown["calls"]} == {200}  # type: ignore[union-attr]

    ((remain, used),) = gateway.db.execute("SELECT remain_quota, used_quota FROM tokens WHERE id = ?", (token.id,))
    truth = gateway.db.execute(
        "SELECT created_at, type, model_name, prompt_tokens, completion_tokens, quota FROM logs"
        " WHERE token_id = ? ORDER BY id",  # oldest first, as both apps show the gateway's newest-first list
        (token.id,),
    ).fetchall()
    assert truth == rows
    assert shown["new-info"] == [
        ["name", "status line"],
        ["granted", dollars(remain + used, 3)],
        ["available", dollars(remain, 3)],
        ["used", dollars(used, 3)],
    ]
    # The drop-in default: the billing usage is the token's lifetime use, whatever the dates.
    assert shown["neko-info"] == [
        ["balance", dollars(remain + used, 3)],
        ["remaining", dollars(remain, 3)],
        ["used", dollars(used, 3)],
    ]
    expected = [[str(c) for c in (*row[:5], dollars(row[5], 6))] for row in truth]
    assert shown["new-logs"] == expected
    assert shown["neko-logs"] == expected


def test_key_tools_on_an_origin_not_allowed_get_nothing(gateway: Gateway, tmp_path: Path) -> None:
    """The same page from an origin the operator did not list: every call fails in the browser."""
    token: Token = gateway.add_token()
    gateway.add_log(token)
    site = tmp_path / "site"
    site.mkdir()
    with static_site(site) as origin:
        env = {"SQLITE_PATH": str(gateway.path), "USAGE_CORS_ORIGINS": "https://keys.example.com"}
        with Service(env) as service:
            page = PAGE % {"base": json.dumps(service.url), "key": json.dumps(token.key), "quota_per_unit": 1}
            (site / "index.html").write_text(page)
            shown = page_result(origin + "/index.html", tmp_path / "profile")
    errors = shown["errors"]
    assert isinstance(errors, list) and len(errors) == 2
    assert all("Failed to fetch" in error for error in errors)
    assert shown["new-logs"] == [] and shown["neko-logs"] == []
