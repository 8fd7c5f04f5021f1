"""CORS: preflights answered at the gateway, allow headers added to responses.

A preflight (OPTIONS with Origin and Access-Control-Request-Method) is
routed by the method it asks about (``Gateway.handle`` does that), so it
reaches the route the real request will take and is answered here without
authentication: browsers never send credentials on a preflight.  Responses
to allowed origins, errors included, carry Access-Control-Allow-Origin so the
page can read a 401 or 429 body.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from txgateway.body import BytesBody
from txgateway.config.model import CORSConfig, GatewayConfig, RouteConfig
from txgateway.errors import Forbidden, GatewayError
from txgateway.messages import Response
from txgateway.pipeline.context import RequestContext
from txgateway.pipeline.pipeline import Handler
from txgateway.runtime import Runtime

Headers = list[tuple[bytes, bytes]]


class CORS:
    def __init__(self, config: CORSConfig) -> None:
        origins = {o.lower().rstrip("/") for o in config.allow_origins}
        self._any_origin = "*" in origins
        self._origins = frozenset(o.encode("latin-1") for o in origins if o != "*")
        self._preflight_headers: Headers = [
            (b"access-control-allow-methods", ", ".join(config.allow_methods).encode("latin-1")),
            (b"access-control-max-age", str(config.max_age).encode("ascii")),
        ]
        if config.allow_headers:
            self._preflight_headers.append(
                (b"access-control-allow-headers", ", ".join(config.allow_headers).encode("latin-1"))
            )
        self._methods = frozenset(m.upper().encode("latin-1") for m in config.allow_methods)

    def _allow_origin(self, origin: bytes) -> bytes | None:
        """The Access-Control-Allow-Origin value for ``origin``, or None if not allowed."""
        if origin.lower().rstrip(b"/") in self._origins:
            return origin
        if self._any_origin:
            return b"*"
        return None

    def wrap(self, next: Handler) -> Handler:
        def cors(ctx: RequestContext) -> Deferred[Response]:
            origin = ctx.header(b"origin")
            if origin is None:
                return next(ctx)
            allowed = self._allow_origin(origin)
            requested = ctx.header(b"access-control-request-method")
            if ctx.method == b"OPTIONS" and requested is not None:
                return self._preflight(allowed, requested)
            if allowed is None:
                # Not our business to refuse: the browser enforces CORS by the
                # absence of the allow header; other clients are unaffected.
                return next(ctx)
            added = [(b"access-control-allow-origin", allowed), (b"vary", b"origin")]

            def add(response: Response) -> Response:
                response.headers.extend(added)
                return response

            def add_to_error(failure: Failure) -> Failure:
                if isinstance(failure.value, GatewayError):
                    failure.value.headers.extend(added)
                return failure

            return next(ctx).addCallbacks(add, add_to_error)

        return cors

    def _preflight(self, allowed: bytes | None, requested: bytes) -> Deferred[Response]:
        if allowed is None:
            return fail(Forbidden("origin not allowed by CORS policy", [(b"vary", b"origin")]))
        if requested.upper() not in self._methods:
            return fail(Forbidden("method not allowed by CORS policy", [(b"vary", b"origin")]))
        headers = [(b"access-control-allow-origin", allowed), (b"vary", b"origin"), *self._preflight_headers]
        return succeed(Response(204, headers, BytesBody(b"")))


def for_route(route: RouteConfig, config: GatewayConfig, runtime: Runtime) -> CORS | None:
    cors = config.middleware.cors
    if cors is None:
        return None
    return CORS(cors)
