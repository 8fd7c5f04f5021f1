"""Who a request is counted against: the ``key`` of a rate limit.

``key_function(spec)`` is built once per route at config load
and returns, per request, the key's *subject* as a short string whose prefix
says what it is, so no value of one kind can collide with another:

- ``consumer``: ``c:<consumer>`` (the authenticated identity); anonymous
  requests fall back to the client address.
- ``ip``: ``ip:<address>``, the client address with ``server.trusted_proxies``
  applied to X-Forwarded-For (``ctx.client_address``, resolved once per
  request by the gateway with :func:`~txgateway.pipeline.forwarded.client_address`).
  IPv6 clients are counted per /64, the block one subscriber normally holds,
  or every address of it would be a fresh key.
- ``route``: ``route``, one key for every request of the route.
- ``header:NAME``: ``h:<value>``; a missing or empty header falls back to the
  client address.  Values longer than 128 characters are hashed so a client
  cannot make the store hold big keys.

The middleware prefixes the subject with the route and the policy, so each
route has its own counts.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable
from functools import lru_cache

from txgateway.pipeline.context import RequestContext

KeyFunction = Callable[[RequestContext], str]

#: Longer header values are replaced by their hash in the key.
MAX_VALUE_LENGTH = 128


def key_function(spec: str) -> KeyFunction:
    """The key extractor for ``spec`` (consumer | ip | route | header:NAME)."""
    address = client_subject

    if spec == "consumer":

        def consumer(ctx: RequestContext) -> str:
            identity = ctx.identity
            if identity is not None:
                return "c:" + identity.consumer
            return "ip:" + address(ctx)

        return consumer
    if spec == "ip":

        def ip(ctx: RequestContext) -> str:
            return "ip:" + address(ctx)

        return ip
    if spec == "route":
        return lambda ctx: "route"
    kind, _, name = spec.partition(":")
    if kind == "header" and name:
        header = name.lower().encode("latin-1")

        def by_header(ctx: RequestContext) -> str:
            value = ctx.header(header)
            if not value:
                return "ip:" + address(ctx)
            if len(value) > MAX_VALUE_LENGTH:
                return "h#" + hashlib.sha256(value).hexdigest()
            return "h:" + value.decode("latin-1")

        return by_header
    raise ValueError(f"unknown rate limit key {spec!r} (expected consumer, ip, route or header:NAME)")


def client_subject(ctx: RequestContext) -> str:
    """The client address as a rate-limit subject: ``ctx.client_address``, IPv6 per /64."""
    ip = ctx.client_address
    if ":" in ip:
        return ipv6_block(ip)
    return ip


@lru_cache(maxsize=4096)
def ipv6_block(ip: str) -> str:
    """``2001:db8:1:2::/64`` for any address of that /64 (IPv4-mapped: the IPv4 address)."""
    try:
        address = ipaddress.IPv6Address(ip.partition("%")[0])
    except ValueError:
        return ip
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))

