"""The last stage of every pipeline: send the request to the route's upstream.

Builds the upstream request (hop-by-hop headers removed, X-Forwarded-*,
Via and X-Request-ID set, route header rules applied), picks an instance,
calls it through the upstream's ``IUpstreamClient`` and cleans the response
head the same way on the way back.  Protocol-neutral: HTTP/1.1 and HTTP/2
edges both end here.

With ``retry.attempts > 1`` a failed try (per ``retry.on``) is tried again on
another instance when one exists, after a jittered backoff, within the
upstream's retry budget, and only while the request body can be replayed
(see :mod:`txgateway.upstream.replay`).  Every try's outcome goes to passive
health; every instance counts its requests in flight until the response body
ends (for least-connections).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from txgateway.config.model import HeaderOps, RouteConfig
from txgateway.errors import GatewayError, UpstreamTimeout
from txgateway.http11 import HOP_BY_HOP, body_forbidden, connection_tokens
from txgateway.interfaces import IBody, IBodySink
from txgateway.messages import Response, UpstreamRequest
from txgateway.observability.metrics import GatewayMetrics
from txgateway.pipeline.context import RequestContext
from txgateway.pipeline.forwarded import forwarded_headers
from txgateway.upstream.instance import Instance
from txgateway.upstream.replay import ReplayableBody
from txgateway.upstream.upstream import Upstream

Headers = list[tuple[bytes, bytes]]

VIA = b"1.1 txgateway"
#: Via names the protocol version of the hop it describes (RFC 9110 7.6.3).
VIA_H2 = b"2 txgateway"
#: Request headers the gateway handles itself and never forwards (the trace
#: headers are made anew for each try, see ``Forwarder.send``).
_REQUEST_DROP = HOP_BY_HOP | {b"expect", b"x-request-id", b"via", b"traceparent", b"tracestate"}
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


#: The usual Connection values, which list no header beyond the hop-by-hop ones.
_KEEP_ALIVE = frozenset({b"keep-alive", b"Keep-Alive", b"Keep-alive"})


def _strip(headers: Headers, drop: frozenset[bytes]) -> tuple[Headers, list[bytes]]:
    """Drop ``drop`` (which holds Connection and Via) and Connection-listed names;
    return the rest and any Via values.  One pass in the usual case."""
    kept: Headers = []
    via: list[bytes] = []
    listed = False
    for header in headers:
        name = header[0]
        if name in drop:
            if name == b"via":
                via.append(header[1])
            elif name == b"connection" and header[1] not in _KEEP_ALIVE:
                listed = True  # names other than keep-alive (itself hop-by-hop)
            continue
        kept.append(header)
    if listed:
        tokens = connection_tokens(headers)
        if tokens:
            kept = [header for header in kept if header[0] not in tokens]
    return kept, via


#: The ``kind`` label of ``txgateway_upstream_errors`` for each failure kind.
ERROR_KINDS = {
    "connect_error": "connect",
    "timeout": "timeout",
    "reset": "reset",
    "protocol_error": "protocol",
    "5xx": "status_5xx",
}


def failure_kind(failure: Failure) -> str | None:
    """The upstream failure kind of a try ("connect_error", "timeout"...), None if not an upstream failure."""
    kind = getattr(failure.value, "kind", None)
    return kind if isinstance(kind, str) else None


@implementer(IBody)
class _InFlight:
    """Passes a response body through, watching it.

    Releases the instance's in-flight slot when the body ends, and cuts the
    response when the upstream sends nothing for ``idle`` seconds (a paused
    body, waiting on a slow client, is not idle) or when the ``deadline`` of
    the whole exchange passes.  Timers start only when the body does not end
    at once, so a small response pays nothing for them.
    """

    __slots__ = ("_body", "_clock", "_deadline", "_idle", "_instance", "_paused", "_sink", "_timer", "length")

    def __init__(
        self, body: IBody, instance: Instance, clock: IReactorTime, idle: float, deadline: float | None
    ) -> None:
        self._body = body
        self._instance: Instance | None = instance
        self._sink: IBodySink | None = None
        self._clock = clock
        self._idle = idle
        self._deadline = deadline
        self._timer: IDelayedCall | None = None
        self._paused = False
        self.length = body.length

    def _release(self) -> None:
        instance, self._instance = self._instance, None
        if instance is not None:
            instance.in_flight -= 1
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _arm(self) -> None:
        if self._instance is None or self._paused:
            return
        delay = self._idle
        if self._deadline is not None:
            delay = min(delay, self._deadline - self._clock.seconds())
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(max(0.0, delay))
        else:
            self._timer = self._clock.callLater(max(0.0, delay), self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self._instance is None:
            return
        if self._deadline is not None and self._clock.seconds() >= self._deadline:
            message = "upstream response exceeded the exchange timeout"
        else:
            message = f"upstream sent no response bytes for {self._idle:g}s"
        sink, self._sink = self._sink, None
        self._release()
        self._body.stopProducing()
        if sink is not None:
            sink.abort(Failure(UpstreamTimeout(message)))

    @property
    def trailers(self) -> list[tuple[bytes, bytes]]:
        return getattr(self._body, "trailers", [])

    def complete(self) -> bytes | None:
        """The whole body when the upstream's has all arrived (see ResponseBody.complete)."""
        complete = getattr(self._body, "complete", None)
        data = complete() if complete is not None else None
        if data is not None:
            self._release()
        return data

    def deliverTo(self, sink: IBodySink) -> None:
        self._sink = sink
        self._body.deliverTo(_InFlightSink(self))
        if self._instance is not None:  # not over already
            self._arm()

    def pauseProducing(self) -> None:
        self._paused = True
        timer = self._timer
        if timer is not None and timer.active():
            if self._deadline is None:
                timer.cancel()
                self._timer = None
            else:  # a slow client is not idleness, but the deadline still holds
                timer.reset(max(0.0, self._deadline - self._clock.seconds()))
        self._body.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self._arm()
        self._body.resumeProducing()

    def stopProducing(self) -> None:
        self._release()
        self._body.stopProducing()


@implementer(IBodySink)
class _InFlightSink:
    __slots__ = ("_owner",)

    def __init__(self, owner: _InFlight) -> None:
        self._owner = owner

    def write(self, data: bytes) -> None:
        owner = self._owner
        if owner._timer is not None:
            owner._arm()
        if owner._sink is not None:
            owner._sink.write(data)

    def finish(self) -> None:
        owner = self._owner
        owner._release()
        if owner._sink is not None:
            owner._sink.finish()

    def abort(self, reason: object) -> None:
        owner = self._owner
        owner._release()
        if owner._sink is not None:
            owner._sink.abort(reason)


class Forwarder:
    """The terminal handler of one route."""

    # One per route, and with 10,000 routes a request touches a different one
    # each time: slots keep what it reads in a few cache lines.
    __slots__ = (
        "_budget",
        "_client",
        "_clock",
        "_connect_timeout",
        "_durations",
        "_errors",
        "_idle",
        "_is_trusted",
        "_metrics",
        "_request_rules",
        "_response_rules",
        "_response_timeout",
        "_retry",
        "_total",
        "retries",
        "route",
        "upstream",
    )

    def __init__(
        self,
        route: RouteConfig,
        upstream: Upstream,
        is_trusted: Callable[[str], bool],
        clock: IReactorTime,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        """``metrics``: where tries are measured (upstream duration, errors, retries); None: nowhere."""
        self.route = route
        self.upstream = upstream
        self._metrics = metrics
        #: Metric children by instance address (and error kind), resolved on first use.
        self._durations: dict[str, Any] = {}
        self._errors: dict[tuple[str, str], Any] = {}
        self.retries = metrics.retries.labels(route.name, upstream.name) if metrics is not None else None
        self._client = upstream.client
        self._clock = clock
        self._is_trusted = is_trusted
        self._connect_timeout = upstream.config.timeouts.connect
        self._response_timeout = (
            route.timeout if route.timeout is not None else upstream.config.timeouts.request
        )
        # None when a route has none: the request checks a slot, not a __bool__ call.
        self._request_rules = HeaderRules(route.request_headers) or None
        self._response_rules = HeaderRules(route.response_headers) or None
        self._retry = upstream.retry
        self._budget = upstream.retry_budget
        self._idle = upstream.config.timeouts.idle
        self._total = upstream.config.timeouts.total
        if self._total is not None:
            self._response_timeout = min(self._response_timeout, self._total)

    def __call__(self, ctx: RequestContext) -> Deferred[Response]:
        headers, target = self._prepare(ctx)
        if self._retry.applies_to(ctx.method):
            return _Tries(self, ctx, headers, target).start()
        return self.send(ctx, self.upstream.pick(ctx), headers, target, ctx.body)

    def _prepare(self, ctx: RequestContext) -> tuple[Headers, bytes]:
        headers, via = _strip(ctx.headers, _REQUEST_DROP)
        headers = forwarded_headers(
            headers, ctx.client_ip, ctx.scheme, ctx.host, self._is_trusted(ctx.client_ip)
        )
        via.append(VIA_H2 if ctx.version[0] == 2 else VIA)
        headers.append((b"via", b", ".join(via)))
        headers.append((b"x-request-id", ctx.request_id.encode("ascii")))
        if self._request_rules is not None:
            headers = self._request_rules.apply(headers)
        target = ctx.upstream_path.encode("latin-1")
        if ctx.query:
            target += b"?" + ctx.query
        return headers, target

    def send(
        self, ctx: RequestContext, instance: Instance, headers: Headers, target: bytes, body: IBody | None
    ) -> Deferred[Response]:
        """One try against ``instance``."""
        ctx.upstream_address = instance.address
        if ctx.host is None:
            headers = [*headers, (b"host", instance.address.encode("ascii"))]
        if ctx.trace is not None:  # each try is a client span of its own
            headers = headers + ctx.trace.upstream_headers()
        response_timeout = self._response_timeout
        if ctx.deadline is not None:
            left = ctx.deadline - self._clock.seconds()
            if left <= 0:
                return fail(UpstreamTimeout("deadline exceeded before the upstream was called"))
            response_timeout = min(response_timeout, left)
        instance.in_flight += 1
        ctx.upstream_started = self._clock.seconds()
        d = self._client.request(
            UpstreamRequest(
                host=instance.host,
                port=instance.port,
                method=ctx.method,
                target=target,
                headers=headers,
                body=body,
                connect_timeout=self._connect_timeout,
                response_timeout=response_timeout,
            )
        )
        d.addCallbacks(self._received, self._failed, callbackArgs=(ctx, instance), errbackArgs=(ctx, instance))
        return d

    def _received(self, response: Response, ctx: RequestContext, instance: Instance) -> Response:
        failed = response.status >= 500
        self.upstream.observe(instance, "5xx" if failed else None)
        ended = ctx.upstream_ended = self._clock.seconds()
        if ctx.trace is not None:
            ctx.trace.upstream_status = response.status
        if self._metrics is not None:
            self._measure(instance, ended - (ctx.upstream_started or ended), "5xx" if failed else None)
        body = response.body
        if body is None:
            instance.in_flight -= 1
        else:
            deadline = None if self._total is None else ctx.started + self._total
            response.body = _InFlight(body, instance, self._clock, self._idle, deadline)
        drop = (
            _RESPONSE_DROP_NO_BODY
            if body_forbidden(ctx.method, response.status)
            else _RESPONSE_DROP
        )
        headers, via = _strip(response.headers, drop)
        via.append(VIA_H2 if response.version[0] == 2 else VIA)
        headers.append((b"via", b", ".join(via)))
        headers.append((b"x-request-id", ctx.request_id.encode("ascii")))
        if self._response_rules is not None:
            headers = self._response_rules.apply(headers)
        response.headers = headers
        return response

    def _failed(self, failure: Failure, ctx: RequestContext, instance: Instance) -> Failure:
        instance.in_flight -= 1
        ctx.upstream_ended = self._clock.seconds()
        kind = failure_kind(failure)
        if kind is not None:
            self.upstream.observe(instance, kind)
            if self._metrics is not None:
                self._measure(instance, None, kind)
        return failure

    def _measure(self, instance: Instance, seconds: float | None, failure: str | None) -> None:
        """One try in the upstream metrics: its duration to the response head, its failure kind."""
        metrics = self._metrics
        assert metrics is not None
        address = instance.address
        if seconds is not None:
            duration = self._durations.get(address)
            if duration is None:
                duration = self._durations[address] = metrics.batched_histogram(
                    metrics.upstream_duration.labels(self.upstream.name, address)
                )
            duration.observe(seconds)
        if failure is not None:
            key = (address, failure)
            errors = self._errors.get(key)
            if errors is None:
                kind = ERROR_KINDS.get(failure, failure)
                errors = self._errors[key] = metrics.upstream_errors.labels(self.upstream.name, address, kind)
            errors.inc()


class _Tries:
    """One request's tries, for methods the retry policy covers."""

    def __init__(self, forwarder: Forwarder, ctx: RequestContext, headers: Headers, target: bytes) -> None:
        self._forwarder = forwarder
        self._ctx = ctx
        self._headers = headers
        self._target = target
        self._policy = forwarder._retry
        self._body: ReplayableBody | None = None
        if ctx.body is not None:
            self._body = ReplayableBody(ctx.body)
            ctx.body = self._body
        self._tried: list[Instance] = []
        self._count = 0
        self._current: Deferred[Response] | None = None
        self._waiting: IDelayedCall | None = None
        self._result: Deferred[Response] = Deferred(self._cancel)

    def start(self) -> Deferred[Response]:
        self._forwarder._budget.earn()
        self._next()
        return self._result

    def _next(self) -> None:
        self._waiting = None
        self._count += 1
        forwarder = self._forwarder
        try:
            instance = forwarder.upstream.pick(self._ctx, self._tried)
        except GatewayError as error:
            self._result.errback(Failure(error))
            return
        self._tried.append(instance)
        body = self._body.fresh() if self._body is not None else None
        d = self._current = forwarder.send(self._ctx, instance, self._headers, self._target, body)
        d.addCallbacks(self._received, self._failed)

    def _may_retry(self) -> bool:
        if self._count >= self._policy.attempts:
            return False
        if self._body is not None and not self._body.replayable:
            return False
        return self._forwarder._budget.spend()

    def _later(self) -> None:
        retries = self._forwarder.retries
        if retries is not None:
            retries.inc()
        delay = self._policy.backoff(self._count)
        self._waiting = self._forwarder._clock.callLater(delay, self._next)

    def _received(self, response: Response) -> None:
        self._current = None
        if self._result.called:  # cancelled meanwhile
            if response.body is not None:
                response.body.stopProducing()
            return
        if self._policy.retry_status(response.status) and self._may_retry():
            if response.body is not None:
                response.body.stopProducing()
            self._later()
            return
        self._result.callback(response)

    def _failed(self, failure: Failure) -> None:
        self._current = None
        if self._result.called:  # cancelled meanwhile
            return
        kind = failure_kind(failure)
        if kind is not None and self._policy.retry_kind(kind) and self._may_retry():
            self._later()
            return
        self._result.errback(failure)

    def _cancel(self, result: Deferred[Response]) -> None:
        if self._waiting is not None and self._waiting.active():
            self._waiting.cancel()
        self._waiting = None
        if self._current is not None:
            current, self._current = self._current, None
            current.cancel()
