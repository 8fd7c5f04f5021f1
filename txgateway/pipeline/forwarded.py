"""X-Forwarded-For / -Proto / -Host, trusting only ``server.trusted_proxies``.

A client that is not a trusted proxy cannot make the upstream believe it
comes from another address: its X-Forwarded-* headers are replaced by what the
gateway saw.  A trusted proxy's are kept and the proxy's address appended.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from functools import lru_cache

Headers = list[tuple[bytes, bytes]]
_FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})


def trust_check(networks: Sequence[str]) -> Callable[[str], bool]:
    """A cached predicate: is this client address one of the trusted proxies?"""
    nets = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
    if not nets:
        return lambda ip: False

    @lru_cache(maxsize=4096)
    def trusted(ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in net for net in nets)

    return trusted


def forwarded_headers(
    headers: Headers, client_ip: str, scheme: bytes, host: str | None, trusted: bool
) -> Headers:
    """``headers`` (already free of hop-by-hop) with the X-Forwarded-* set."""
    client = client_ip.encode("ascii")
    if not trusted:
        out = [(n, v) for n, v in headers if n not in _FORWARDED]
        out.append((b"x-forwarded-for", client))
        out.append((b"x-forwarded-proto", scheme))
        if host is not None:
            out.append((b"x-forwarded-host", host.encode("latin-1")))
        return out
    prior: list[bytes] = []
    proto = fhost = None
    out = []
    for n, v in headers:
        if n == b"x-forwarded-for":
            prior.append(v)
        elif n == b"x-forwarded-proto":
            proto = v
        elif n == b"x-forwarded-host":
            fhost = v
        else:
            out.append((n, v))
    prior.append(client)
    out.append((b"x-forwarded-for", b", ".join(prior)))
    out.append((b"x-forwarded-proto", proto if proto is not None else scheme))
    if fhost is not None:
        out.append((b"x-forwarded-host", fhost))
    elif host is not None:
        out.append((b"x-forwarded-host", host.encode("latin-1")))
    return out


def client_address(peer_ip: str, headers: Headers, is_trusted: Callable[[str], bool]) -> str:
    """The address of the client that sent the request, for limits and logs.

    The peer itself unless it is a trusted proxy.  Otherwise X-Forwarded-For
    (every such header, in order) is walked from the right, skipping the
    hops that are trusted proxies: the first one that is not is the client.
    Everything to its left was written by the client and is ignored, so
    prepending addresses cannot buy a client a fresh identity.  An entry
    that is not an address (``unknown``, garbage) stops the walk at the last
    hop that was vouched for; when every hop is trusted, the leftmost is the
    client.  Addresses taken from the header are returned in canonical form
    (``::1`` for ``0:0::1``, IPv4-mapped IPv6 as IPv4), ports removed
    (``1.2.3.4:80``, ``[::1]:80``).
    """
    if not is_trusted(peer_ip):
        return peer_ip
    hops: list[bytes] = []
    for name, value in headers:
        if name == b"x-forwarded-for":
            hops.extend(value.split(b","))
    address = peer_ip
    for raw in reversed(hops):
        hop = raw.strip()
        if not hop:
            continue
        parsed = _hop_address(hop)
        if parsed is None:
            return address
        address = parsed
        if not is_trusted(parsed):
            return parsed
    return address


@lru_cache(maxsize=4096)
def _hop_address(hop: bytes) -> str | None:
    """The canonical IP address in one X-Forwarded-For entry, or None."""
    text = hop.strip(b'"').decode("latin-1")
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
