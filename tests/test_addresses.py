"""X-Forwarded-For from a trusted proxy: the right client, for bounded work however long the list."""

from __future__ import annotations

from typing import Any

import pytest

from usage_service import addresses
from usage_service.addresses import MAX_FORWARDED_BYTES, MAX_HOPS, ClientAddresses
from usage_service.config import load_settings

PROXIES = load_settings({"USAGE_TRUSTED_PROXIES": "10.0.0.0/8"}).trusted_proxies


def scope(*forwarded: str, peer: str = "10.0.0.2") -> dict[str, Any]:
    return {"type": "http", "client": (peer, 5000), "headers": [(b"x-forwarded-for", v.encode()) for v in forwarded]}


def proxies(count: int) -> list[str]:
    """`count` distinct addresses of trusted proxies."""
    return [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(1, count + 1)]


@pytest.mark.parametrize(
    ("forwarded", "client"),
    [
        pytest.param(
            [", ".join(["192.0.2.66"] * 2700 + ["198.51.100.1", *proxies(3)])],
            "198.51.100.1",
            id="long-forged-prefix",
        ),
        pytest.param(["198.51.100.1, " + ", ".join(proxies(MAX_HOPS - 1))], "198.51.100.1", id="client-at-the-bound"),
        pytest.param(
            ["198.51.100.1, " + ", ".join(proxies(MAX_HOPS))], proxies(MAX_HOPS)[0], id="client-past-the-bound"
        ),
        pytest.param(
            ["198.51.100.1, " + ", ".join(proxies(2700))], proxies(2700)[-MAX_HOPS], id="thousands-of-proxies"
        ),
        pytest.param(
            # Only "2.168.1.5" is within the bytes read: not a client, but a hop cut in two.
            ["192.168.1.5," + " " * (MAX_FORWARDED_BYTES - 18) + "10.0.0.7"],
            "10.0.0.7",
            id="a-hop-cut-by-the-byte-bound-is-not-read",
        ),
        pytest.param(["198.51.100.1" + " " * 2000], "10.0.0.2", id="nothing-whole-within-the-byte-bound"),
        pytest.param([*(["192.0.2.66"] * 2000), "198.51.100.1", "10.0.0.7"], "198.51.100.1", id="many-headers"),
        pytest.param(
            # Python reads any text after '%' as an IPv6 scope: it would reach the access log as
            # is, and give the limiter a new address for every scope.
            ['fe80::1%" 200 0.001ms local FORGED sk-ABCDEFGHIJKLMNOPQRSTUVWXYZ, 10.0.0.7'],
            "10.0.0.7",
            id="a-scoped-address-is-not-read",
        ),
    ],
)
def test_the_client_is_read_from_the_right(forwarded: list[str], client: str) -> None:
    assert ClientAddresses(PROXIES)(scope(*forwarded)) == client


def test_a_huge_header_costs_a_bounded_number_of_hops(monkeypatch: pytest.MonkeyPatch) -> None:
    """2,700 trusted hops from a trusted peer: at most MAX_HOPS of them are parsed (was: every one)."""
    parsed: list[str] = []
    parse = addresses._parse

    def counting(hop: str) -> Any:
        parsed.append(hop)
        return parse(hop)

    monkeypatch.setattr(addresses, "_parse", counting)
    resolve = ClientAddresses(PROXIES)
    resolve(scope(", ".join(proxies(2700))))
    assert 0 < len(parsed) <= MAX_HOPS + 1  # the hops, and the peer
    parsed.clear()
    resolve(scope(*proxies(2700)))  # as many headers
    assert 0 < len(parsed) <= MAX_HOPS + 1
    assert sum(len(hop) for hop in parsed) <= MAX_FORWARDED_BYTES + len("10.0.0.2")
