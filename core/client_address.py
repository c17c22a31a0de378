"""Who is on the other end of a request: the address sign-in limits and logs are kept by.

The peer of the TCP connection, unless that peer is a proxy the operator named in TRUSTED_PROXIES: then the
client is the right-most address of `X-Forwarded-For` that is not itself a trusted proxy (every proxy
appends the address it got the request from; anything to the left of the nearest untrusted entry was written
by the client and may be forged). With no trusted proxy configured (the default), forwarded headers are
ignored entirely: anyone can send them.

uvicorn rewrites `scope["client"]` from `X-Forwarded-For` itself when the peer is in its own
`forwarded_allow_ips` (127.0.0.1 unless told otherwise), so the gateway's protocol (`core.server`) keeps the
real peer in the scope under `PEER_KEY`, and that is what is read here.
"""

import ipaddress
from collections.abc import Iterable

from starlette.types import Scope

PEER_KEY = "gateway.peer"
UNKNOWN = "unknown"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Addresses or networks in CIDR notation (`10.0.0.5`, `10.0.0.0/8`, `::1`). Raises ValueError."""
    return tuple(ipaddress.ip_network(value.strip(), strict=False) for value in values if value.strip())


def _address(text: str) -> IPAddress | None:
    """An address as it appears in X-Forwarded-For: bare, `v4:port` or `[v6]:port`."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # ::ffff:10.0.0.1 is how a dual-stack socket shows an IPv4 peer: compare it as the IPv4 address it is.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def peer_of(scope: Scope) -> str | None:
    """The host of the TCP peer, as the connection saw it (never taken from a header)."""
    client = scope.get(PEER_KEY) or scope.get("client")
    return client[0] if client else None


def client_address(scope: Scope, trusted_proxies: tuple[IPNetwork, ...]) -> str:
    peer = peer_of(scope)
    if peer is None:
        return UNKNOWN
    peer_address = _address(peer)
    if peer_address is None:
        return peer  # a Unix socket path, say: nothing to compare
    if not any(peer_address in network for network in trusted_proxies):
        return str(peer_address)
    hops = [
        hop
        for name, value in scope["headers"]
        if name == b"x-forwarded-for"
        for hop in value.decode("latin-1").split(",")
    ]
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            break  # not written by a proxy: stop at the last address a trusted proxy vouched for
        if not any(address in network for network in trusted_proxies):
            return str(address)
        peer_address = address
    return str(peer_address)
