"""Fallbacks: what a route answers when its upstream cannot.

Used when the breaker is open or every try failed (an upstream error, no
available instance, or a 502/503/504 from the upstream): either a static
response (``fallback.status/body/content_type``) or the same request sent to
another upstream (``fallback.upstream``), the latter only when the request
has no body or its body can still be replayed.  Responses served from a
fallback carry ``X-Fallback: static`` or ``X-Fallback: upstream``; a
fallback for an open breaker keeps its ``Retry-After``.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from txgateway.body import BytesBody
from txgateway.config.model import FallbackConfig
from txgateway.errors import GatewayError, GatewayTimeout, ServiceUnavailable, UpstreamError
from txgateway.messages import Response
from txgateway.pipeline.context import RequestContext
from txgateway.pipeline.pipeline import Handler
from txgateway.upstream.replay import ReplayableBody

_FAILED_STATUSES = frozenset({502, 503, 504})


class FallbackStage:
    def __init__(self, config: FallbackConfig, other: Handler | None) -> None:
        """``other`` forwards to ``config.upstream`` when the fallback is another upstream."""
        self._other = other
        self._status = config.status
        self._body = config.body.encode("utf-8")
        self._content_type = config.content_type.encode("latin-1")

    def wrap(self, next: Handler) -> Handler:
        def handle(ctx: RequestContext) -> Deferred[Response]:
            def check(response: Response) -> Response | Deferred[Response]:
                if response.status in _FAILED_STATUSES:
                    if response.body is not None:
                        response.body.stopProducing()
                    return self._answer(ctx, None)
                return response

            def failed(failure: Failure) -> Failure | Deferred[Response]:
                if failure.check(UpstreamError, GatewayTimeout, ServiceUnavailable):
                    error = failure.value
                    assert isinstance(error, GatewayError)
                    return self._answer(ctx, error)
                return failure

            return next(ctx).addCallbacks(check, failed)

        return handle

    def _answer(self, ctx: RequestContext, error: GatewayError | None) -> Deferred[Response]:
        body = ctx.body
        replayable = body is None or (isinstance(body, ReplayableBody) and body.replayable)
        if self._other is not None and replayable:
            if isinstance(body, ReplayableBody):
                ctx.body = body.fresh()
            d = self._other(ctx)

            def mark(response: Response) -> Response:
                response.headers.append((b"x-fallback", b"upstream"))
                return response

            return d.addCallback(mark)
        headers = [(b"content-type", self._content_type), (b"x-fallback", b"static")]
        headers.append((b"x-request-id", ctx.request_id.encode("ascii")))
        if error is not None:
            headers.extend((n, v) for n, v in error.headers if n == b"retry-after")
        return succeed(Response(self._status, headers, BytesBody(self._body)))
