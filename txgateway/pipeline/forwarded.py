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
