"""The exchange recorder: every finished exchange moves the request metrics.

An observer of :meth:`Gateway.exchange_done`: for each exchange it counts
``txgateway_requests`` (route, method, code, protocol), observes
``txgateway_request_duration_seconds`` (route, method, code) and adds the
body bytes to ``txgateway_request_bytes`` / ``txgateway_response_bytes``
(route).

The route label is the route's *name* (``""`` when no route matched), the
method is bounded to :data:`~txgateway.observability.metrics.METHODS`, the
code is the status the protocol recorded (499: the client went away before
the response ended, see README "Observability"), so the label sets stay
bounded whatever paths clients send.  The labelled children are cached per
(route, method, code, protocol) and batched (``GatewayMetrics.batched_*``):
the hot path is one dict lookup and a few additions, never ``.labels()`` and
never a lock.

One recorder per process (``Runtime.shared``): reloads keep its cache.
"""

from __future__ import annotations

from typing import Any

from txgateway.config.model import GatewayConfig
from txgateway.observability.metrics import GatewayMetrics, method_bytes_label
from txgateway.pipeline.context import RequestContext
from txgateway.runtime import Runtime

#: ``Runtime.shared`` key of the process's recorder.
RECORDER = ("txgateway.observability", "recorder")

_Key = tuple[str, bytes, int, str]


class _Children:
    """The metric children of one (route, method, code, protocol)."""

    __slots__ = ("bytes_in", "bytes_out", "duration", "requests")

    def __init__(self, requests: Any, duration: Any, bytes_in: Any, bytes_out: Any) -> None:
        self.requests = requests
        self.duration = duration
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out


class ExchangeRecorder:
    """Updates the request metrics for each finished exchange (an exchange observer)."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self._children: dict[_Key, _Children] = {}

    def __call__(self, ctx: RequestContext) -> None:
        route = ctx.route
        key = (route.name if route is not None else "", method_bytes_label(ctx.method), ctx.status, ctx.protocol)
        children = self._children.get(key)
        if children is None:
            children = self._resolve(key)
        children.requests.inc()
        duration = ctx.ended - ctx.started
        children.duration.observe(duration if duration > 0.0 else 0.0)
        if ctx.bytes_in:
            children.bytes_in.inc(ctx.bytes_in)
        if ctx.bytes_out:
            children.bytes_out.inc(ctx.bytes_out)

    def _resolve(self, key: _Key) -> _Children:
        route, method, status, protocol = key
        metrics = self.metrics
        name = method.decode("ascii")
        code = str(status)
        children = self._children[key] = _Children(
            metrics.batched_counter(metrics.requests.labels(route, name, code, protocol)),
            metrics.batched_histogram(metrics.request_duration.labels(route, name, code)),
            metrics.batched_counter(metrics.request_bytes.labels(route)),
            metrics.batched_counter(metrics.response_bytes.labels(route)),
        )
        return children


def recorder_for(config: GatewayConfig, runtime: Runtime) -> ExchangeRecorder | None:
    """The process's recorder, None when ``observability.metrics.enabled`` is false."""
    if not config.observability.metrics_enabled:
        return None
    return runtime.shared(RECORDER, lambda: ExchangeRecorder(runtime.metrics))
