"""X-Forwarded-For from a trusted proxy: the right client, for bounded work however long the list."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import Gateway, Service

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
        # Garbage ends the walk: what lies left of it, on the client's side, could be anything.
        pytest.param(["198.51.100.1, not-an-address, 10.0.0.7"], "10.0.0.7", id="garbage-ends-the-walk"),
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
    parsed.clear()
    # Few hops, one of them 100 KB long: the bytes read are bounded too, not only the hops.
    assert resolve(scope("198.51.100.9, " + "x" * 100_000 + ", 10.0.0.7")) == "10.0.0.7"
    assert 0 < sum(len(hop) for hop in parsed) <= MAX_FORWARDED_BYTES + len("10.0.0.2")


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        # A proxy on the same host, reaching a service that listens on "::" over IPv4.
        pytest.param("::ffff:10.0.0.2", ["198.51.100.1"], "198.51.100.1", id="a-mapped-peer-is-trusted"),
        # A dual-stack hop in front of the proxy writes its own address in the mapped form.
        pytest.param("10.0.0.2", ["198.51.100.2, ::ffff:10.0.0.7"], "198.51.100.2", id="a-mapped-hop-is-trusted"),
        pytest.param("10.0.0.2", ["::ffff:198.51.100.3"], "198.51.100.3", id="a-mapped-client-is-ipv4"),
        pytest.param("::ffff:198.51.100.4", ["192.0.2.66"], "198.51.100.4", id="a-mapped-untrusted-peer-is-ipv4"),
    ],
)
def test_an_ipv4_address_in_ipv6s_mapped_form_is_that_ipv4_address(
    peer: str, forwarded: list[str], client: str
) -> None:
    assert ClientAddresses(PROXIES)(scope(*forwarded, peer=peer)) == client
    assert ClientAddresses()(scope(*forwarded, peer=peer)) == str(addresses._parse(peer))


@pytest.mark.parametrize("listed", ["::ffff:127.0.0.1", "::ffff:0:0/96", "::ffff:127.0.0.0/104", "::/0", "127.0.0.1"])
@pytest.mark.parametrize("peer", ["::ffff:127.0.0.1", "127.0.0.1"])
def test_a_proxy_listed_in_ipv6s_mapped_form_is_trusted(listed: str, peer: str) -> None:
    """Listing the proxy as ::ffff:127.0.0.1 was how to trust it on "::" before mapped peers were
    read as IPv4: such an entry, or a network of them, names the IPv4 addresses it maps."""
    trusted = load_settings({"USAGE_TRUSTED_PROXIES": listed}).trusted_proxies
    assert ClientAddresses(trusted)(scope("203.0.113.7", peer=peer)) == "203.0.113.7"


def _dual_stack() -> bool:
    """Whether this machine has IPv6 and lets a socket on "::" take IPv4 connections."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _dual_stack(), reason="no dual-stack IPv6 on this machine")
@pytest.mark.parametrize(
    ("server", "workers"),
    # uvicorn listens on both families only when its workers share a socket it made itself.
    [pytest.param("granian", "1", id="granian"), pytest.param("uvicorn", "2", id="uvicorn-2-workers")],
)
def test_a_proxy_on_the_same_host_is_trusted_when_the_service_listens_on_ipv6(
    tmp_path: Path, server: str, workers: str, redis_url: str
) -> None:
    """Listening on "::", IPv4 peers arrive as ::ffff:127.0.0.1: the proxy listed as 127.0.0.1 is
    still trusted, so each client behind it is counted alone (not all of them as the proxy).
    (With Redis, which the workers count through together: without it each counts alone.)"""
    db = Gateway(tmp_path / "one-api.db")
    token = db.add_token()
    env = {
        "SQLITE_PATH": str(db.path),
        "REDIS_CONN_STRING": redis_url,
        "USAGE_AUTH_FAIL_LIMIT": "3",
        "USAGE_TRUSTED_PROXIES": "127.0.0.1",
    }
    bad = {"Authorization": "Bearer sk-" + "x" * 48}
    with Service(env, "--host", "::", "--workers", workers, server=server) as service:
        url = service.url + "/api/usage/token"
        statuses = [httpx.get(url, headers={**bad, "X-Forwarded-For": f"198.51.100.{i}"}).status_code for i in range(6)]
        assert statuses == [401] * 6
        fresh = httpx.get(url, headers={**token.bearer, "X-Forwarded-For": "203.0.113.77"})
        assert fresh.status_code == 200
        # One client's failures are still its own.
        mine = [httpx.get(url, headers={**bad, "X-Forwarded-For": "192.0.2.1"}).status_code for _ in range(4)]
        assert mine == [401, 401, 401, 429]
    db.close()
