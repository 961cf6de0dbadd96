"""Which address a request came from: the socket peer, or X-Forwarded-For behind a trusted proxy.

Used by the failed-authentication limiter; anything else that needs the client's address (an
access log) should ask here too, so every part of the service agrees on who the client is.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import TypeAlias

from starlette.types import Scope

from .config import Network

UNKNOWN = "unknown"

# Hops read from the right of X-Forwarded-For, and bytes of it looked at: the proxies in front of
# the service are a handful; whatever a client wrote to the left of them costs nothing to skip.
MAX_HOPS = 16
MAX_FORWARDED_BYTES = 1024

Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


class ClientAddresses:
    """Resolve a request's client address.

    X-Forwarded-For is believed only when the socket peer is one of `trusted` networks; then
    the list is read from the right (the hop our proxy appended) and the first address that is
    not itself a trusted proxy is the client. Anything to the left of it was written by the
    client and proves nothing. At most MAX_HOPS hops are read: if they are all trusted proxies,
    the leftmost of them is the client.

    An IPv4 address in IPv6's mapped form (`::ffff:a.b.c.d`: an IPv4 peer of a dual-stack
    socket, listening on `::`, or such a hop) is that IPv4 address, for the trust check as for
    the answer: a proxy listed as 127.0.0.1 is trusted however the socket names it.
    """

    def __init__(self, trusted: Sequence[Network] = ()) -> None:
        self.trusted = tuple(trusted)

    def __call__(self, scope: Scope) -> str:
        client = scope.get("client")
        peer = client[0] if client else UNKNOWN
        if peer.startswith("::ffff:"):
            peer = str(_parse(peer) or peer)
        if not self.trusted or not self._is_trusted(_parse(peer)):
            return peer
        forwarded = [value for name, value in scope["headers"] if name == b"x-forwarded-for"]
        if not forwarded:
            return peer
        joined = b",".join(forwarded)
        hops = joined[-MAX_FORWARDED_BYTES:].rsplit(b",", MAX_HOPS)
        if len(hops) > MAX_HOPS or len(joined) > MAX_FORWARDED_BYTES:
            del hops[0]  # the rest of the list, or a hop cut in two: not read
        address = peer
        for hop in reversed(hops):
            candidate = _parse(hop.decode("latin-1"))
            if candidate is None:
                # Garbage from the client's side of the chain: the last hop we could read is
                # as close to the client as we can tell.
                return address
            address = str(candidate)
            if not self._is_trusted(candidate):
                return address
        return address

    def _is_trusted(self, ip: Address | None) -> bool:
        return ip is not None and any(ip in network for network in self.trusted)


def _parse(hop: str) -> Address | None:
    """Return the IP address of one X-Forwarded-For entry (or of the peer), or None if it is not one."""
    hop = hop.strip()
    if "%" in hop:  # an IPv6 scope (any text after it): no client address, and it would be logged
        return None
    if hop.startswith("["):  # [v6]:port
        hop = hop[1 : hop.find("]")] if "]" in hop else ""
    elif hop.count(":") == 1:  # v4:port
        hop = hop.partition(":")[0]
    try:
        ip = ipaddress.ip_address(hop)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
