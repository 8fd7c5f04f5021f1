"""The circuit breaker stage: refuse at once while the upstream is down.

Wraps the forwarder of every route of an upstream that has a
``circuit_breaker``; the state machine is :mod:`txgateway.upstream.breaker`.
A request is a failure when it ends in an upstream error (connect, reset,
protocol, timeout), no available instance, or a 5xx status; a success on
any other status; and does not count when the client went away or the
gateway refused it for the client's own fault.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from txgateway.errors import GatewayTimeout, ServiceUnavailable, UpstreamError
from txgateway.messages import Response
from txgateway.pipeline.context import RequestContext
from txgateway.pipeline.pipeline import Handler
from txgateway.upstream.breaker import BreakerOpen, CircuitBreaker


class BreakerStage:
    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker

    def wrap(self, next: Handler) -> Handler:
        breaker = self.breaker

        def guarded(ctx: RequestContext) -> Deferred[Response]:
            try:
                ticket = breaker.admit()
            except BreakerOpen as refused:
                return fail(refused)

            def succeeded(response: Response) -> Response:
                breaker.record(ticket, response.status >= 500)
                return response

            def failed(failure: Failure) -> Failure:
                counts = failure.check(UpstreamError, GatewayTimeout, ServiceUnavailable) is not None
                breaker.record(ticket, True if counts else None)
                return failure

            try:
                d = next(ctx)
            except Exception:  # noqa: BLE001 - e.g. no available instance, raised at once
                # Counted like a failed Deferred, so a half-open probe slot is
                # always given back.
                return fail(failed(Failure()))
            return d.addCallbacks(succeeded, failed)

        return guarded
