"""The last stage of every pipeline: send the request to the route's upstream.

Builds the upstream request (hop-by-hop headers removed, X-Forwarded-*,
Via and X-Request-ID set, route header rules applied), calls the upstream
through its ``IUpstreamClient`` and cleans the response head the same way on
the way back.  Protocol-neutral: HTTP/1.1 and HTTP/2 edges both end here.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred

from txgateway.config.model import HeaderOps, RouteConfig
from txgateway.http11 import HOP_BY_HOP, body_forbidden, connection_tokens
from txgateway.messages import Response, UpstreamRequest
from txgateway.pipeline.context import RequestContext
from txgateway.pipeline.forwarded import forwarded_headers
from txgateway.upstream.upstream import Upstream

Headers = list[tuple[bytes, bytes]]

VIA = b"1.1 txgateway"
#: Request headers the gateway handles itself and never forwards.
_REQUEST_DROP = HOP_BY_HOP | {b"expect", b"x-request-id", b"via"}
_RESPONSE_DROP = HOP_BY_HOP | {b"via", b"x-request-id"}
#: For HEAD and 304 the upstream's Content-Length describes the entity, keep it.
_RESPONSE_DROP_NO_BODY = _RESPONSE_DROP - {b"content-length"}


class HeaderRules:
    """A route's ``headers.request`` / ``headers.response`` rules, compiled once."""

    __slots__ = ("_drop", "_set")

    def __init__(self, ops: HeaderOps) -> None:
        names = {n.encode("latin-1") for n, _ in ops.set}
        self._drop = frozenset({r.encode("latin-1") for r in ops.remove} | names)
        self._set = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in ops.set]

    def __bool__(self) -> bool:
        return bool(self._drop)

    def apply(self, headers: Headers) -> Headers:
        drop = self._drop
        out = [(n, v) for n, v in headers if n not in drop]
        out.extend(self._set)
        return out


def _strip(headers: Headers, drop: frozenset[bytes]) -> tuple[Headers, list[bytes]]:
    """Drop ``drop`` and Connection-listed names; return the rest and any Via values."""
    listed = connection_tokens(headers) if any(n == b"connection" for n, _ in headers) else None
    if listed:
        drop = drop | listed
    via = [v for n, v in headers if n == b"via"]
    return [(n, v) for n, v in headers if n not in drop], via


class Forwarder:
    """The terminal handler of one route."""

    def __init__(self, route: RouteConfig, upstream: Upstream, is_trusted: Callable[[str], bool]) -> None:
        self.route = route
        self.upstream = upstream
        self._is_trusted = is_trusted
        self._connect_timeout = upstream.config.timeouts.connect
        self._response_timeout = (
            route.timeout if route.timeout is not None else upstream.config.timeouts.request
        )
        self._request_rules = HeaderRules(route.request_headers)
        self._response_rules = HeaderRules(route.response_headers)

    def __call__(self, ctx: RequestContext) -> Deferred[Response]:
        instance = self.upstream.pick(ctx)
        ctx.upstream_address = instance.address
        headers, via = _strip(ctx.headers, _REQUEST_DROP)
        headers = forwarded_headers(
            headers, ctx.client_ip, ctx.scheme, ctx.host, self._is_trusted(ctx.client_ip)
        )
        via.append(VIA)
        headers.append((b"via", b", ".join(via)))
        headers.append((b"x-request-id", ctx.request_id.encode("ascii")))
        if ctx.host is None:
            headers.append((b"host", instance.address.encode("ascii")))
        if self._request_rules:
            headers = self._request_rules.apply(headers)
        target = ctx.upstream_path.encode("latin-1")
        if ctx.query:
            target += b"?" + ctx.query
        request = UpstreamRequest(
            host=instance.host,
            port=instance.port,
            method=ctx.method,
            target=target,
            headers=headers,
            body=ctx.body,
            connect_timeout=self._connect_timeout,
            response_timeout=self._response_timeout,
        )
        d = self.upstream.client.request(request)
        d.addCallback(self._response, ctx)
        return d

    def _response(self, response: Response, ctx: RequestContext) -> Response:
        drop = (
            _RESPONSE_DROP_NO_BODY
            if body_forbidden(ctx.method, response.status)
            else _RESPONSE_DROP
        )
        headers, via = _strip(response.headers, drop)
        via.append(VIA)
        headers.append((b"via", b", ".join(via)))
        headers.append((b"x-request-id", ctx.request_id.encode("ascii")))
        if self._response_rules:
            headers = self._response_rules.apply(headers)
        response.headers = headers
        return response
