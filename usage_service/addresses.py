"""Which address a request came from: the socket peer, or X-Forwarded-For behind a trusted proxy.

Used by the failed-authentication limiter; anything else that needs the client's address (an
access log) should ask here too, so every part of the service agrees on who the client is.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from starlette.types import Scope

from .config import Network

UNKNOWN = "unknown"


class ClientAddresses:
    """Resolve a request's client address.

    X-Forwarded-For is believed only when the socket peer is one of `trusted` networks; then
    the list is read from the right (the hop our proxy appended) and the first address that is
    not itself a trusted proxy is the client. Anything to the left of it was written by the
    client and proves nothing.
    """

    def __init__(self, trusted: Sequence[Network] = ()) -> None:
        self.trusted = tuple(trusted)

    def __call__(self, scope: Scope) -> str:
        client = scope.get("client")
        peer = client[0] if client else UNKNOWN
        if not self.trusted or not self._is_trusted(peer):
            return peer
        forwarded = [value for name, value in scope["headers"] if name == b"x-forwarded-for"]
        if not forwarded:
            return peer
        hops = b",".join(forwarded).decode("latin-1").split(",")
        address = peer
        for hop in reversed(hops):
            candidate = _parse(hop)
            if candidate is None:
                # Garbage from the client's side of the chain: the last hop we could read is
                # as close to the client as we can tell.
                return address
            address = candidate
            if not self._is_trusted(candidate):
                return candidate
        return address

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted)


def _parse(hop: str) -> str | None:
    """Return a normalised IP address from one X-Forwarded-For entry, or None if it is not one."""
    hop = hop.strip()
    if hop.startswith("["):  # [v6]:port
        hop = hop[1 : hop.find("]")] if "]" in hop else ""
    elif hop.count(":") == 1:  # v4:port
        hop = hop.partition(":")[0]
    try:
        return str(ipaddress.ip_address(hop))
    except ValueError:
        return None
