"""Cost of W3C trace context handling per request, and of exporting a sampled one.

Run: ``.venv/bin/python bench/tracing_cost.py [--requests N]``.

Prints microseconds per request for:

- ``headers scan, no traceparent``: ``TraceContexts.for_request`` over a
  typical request's 8 headers without trace headers: the scan, a new trace
  id and span id, the sampling decision.
- ``headers scan, valid traceparent`` (``+ tracestate``): the same when the
  client continues a trace: scan, strict parse, a new span id (and the
  tracestate validation).
- ``invalid traceparent``: parse fails, a new trace is started.
- ``upstream header``: ``TraceContext.upstream_headers`` (a new client span
  id and the ``traceparent`` bytes), once per upstream attempt.
- ``per request (new trace)``: the sum the gateway pays on every request
  with tracing disabled: ``for_request`` + ``upstream_headers``;
  ``+ x-trace-id``: with tracing enabled, plus the response header.
- ``export, sampled``: ``TraceExport.exchange_done`` for a sampled request
  with an upstream call (a server and a client span built as the
  OpenTelemetry SDK's ReadableSpan and queued for its batch processor), with
  an exporter that drops batches: the reactor thread's share only (encoding
  and sending happen in the export thread, between the timed batches).
- for comparison, ``uuid4().hex`` and ``os.urandom(16).hex()``: the
  alternatives for new ids.

Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import uuid
from collections.abc import Callable, Sequence

from txgateway.config.model import RouteConfig, RouteMatch, TracingConfig
from txgateway.messages import Response
from txgateway.observability.tracing import TraceContexts, tag_response
from txgateway.pipeline.context import RequestContext

HEADERS = [
    (b"host", b"api.example.com"),
    (b"user-agent", b"curl/8.5.0"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"authorization", b"Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc"),
    (b"content-type", b"application/json"),
    (b"x-api-version", b"2"),
    (b"connection", b"keep-alive"),
]
TRACEPARENT = (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
TRACESTATE = (b"tracestate", b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
INVALID = (b"traceparent", b"00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01")


def per_request(run: Callable[[int], None], count: int) -> float:
    """Best of five runs, microseconds per request."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        run(count)
        best = min(best, time.perf_counter() - started)
    return best / count * 1e6


def scan(headers: Sequence[tuple[bytes, bytes]]) -> Callable[[int], None]:
    contexts = TraceContexts(0.1)
    listed = list(headers)

    def run(count: int) -> None:
        for_request = contexts.for_request
        for _ in range(count):
            for_request(listed)

    return run


def upstream_header(count: int) -> None:
    trace = TraceContexts(0.1).for_request(HEADERS)
    for _ in range(count):
        trace.upstream_headers()


def whole(tag: bool) -> Callable[[int], None]:
    contexts = TraceContexts(0.1)
    ctx = RequestContext(b"GET", "/api/users/7", b"", HEADERS, client_ip="127.0.0.1")

    def run(count: int) -> None:
        for _ in range(count):
            ctx.trace = contexts.for_request(HEADERS)
            ctx.trace.upstream_headers()
            if tag:
                tag_response(Response(200, []), ctx)

    return run


def uuid_ids(count: int) -> None:
    for _ in range(count):
        uuid.uuid4().hex  # noqa: B018 - the cost is the point


def urandom_ids(count: int) -> None:
    for _ in range(count):
        os.urandom(16).hex()


def baseline(count: int) -> None:
    """What ``whole(tag=True)`` spends outside tracing: the Response and loop."""
    for _ in range(count):
        Response(200, [])


def export(count: int) -> float | None:
    try:
        from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

        from txgateway.observability._otlp import TraceExport
    except ImportError:
        return None

    class Drop(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    class Threads:
        def callFromThread(self, call: Callable[..., object], *args: object) -> None:
            pass

    traced = TraceExport(TracingConfig(enabled=True, sample_ratio=1.0), Threads(), Drop())
    contexts = TraceContexts(1.0)
    route = RouteConfig("users-api", RouteMatch("/api/users/{id}"), "users")

    def finished() -> RequestContext:
        ctx = RequestContext(b"GET", "/api/users/7", b"", HEADERS, client_ip="127.0.0.1", started=1.7e9)
        ctx.request_id = "abc-1"
        ctx.route = route
        ctx.trace = contexts.for_request([*HEADERS, TRACEPARENT])
        ctx.trace.upstream_headers()
        ctx.upstream_address = "127.0.0.1:9001"
        ctx.upstream_started, ctx.upstream_ended, ctx.ended, ctx.status = (
            1.7e9 + 0.001,
            1.7e9 + 0.002,
            1.7e9 + 0.003,
            200,
        )
        return ctx

    # In batches below the processor's export batch size, flushed (untimed)
    # in between, so the export thread does not run during the timed part.
    done = traced.exchange_done
    elapsed = 0.0
    batch = 256
    for _ in range(max(1, count // batch)):
        ready = [finished() for _ in range(batch)]
        started = time.perf_counter()
        for ctx in ready:
            done(ctx)
        elapsed += time.perf_counter() - started
        traced.flush()
    traced.shutdown()
    return elapsed / (max(1, count // batch) * batch) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=200_000)
    args = parser.parse_args()
    n = args.requests
    print(f"python {platform.python_version()} on {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    rows = [
        ("headers scan, no traceparent (new trace)", per_request(scan(HEADERS), n)),
        ("headers scan, valid traceparent", per_request(scan([*HEADERS, TRACEPARENT]), n)),
        ("headers scan, valid traceparent + tracestate", per_request(scan([*HEADERS, TRACEPARENT, TRACESTATE]), n)),
        ("headers scan, invalid traceparent (new trace)", per_request(scan([*HEADERS, INVALID]), n)),
        ("upstream header (new client span id)", per_request(upstream_header, n)),
    ]
    plain = per_request(whole(False), n)
    tagged = per_request(whole(True), n) - per_request(baseline, n)
    rows += [
        ("per request (new trace + upstream header)", plain),
        ("per request + x-trace-id response header", tagged),
        ("  for comparison: uuid.uuid4().hex", per_request(uuid_ids, n)),
        ("  for comparison: os.urandom(16).hex()", per_request(urandom_ids, n)),
    ]
    exported = export(min(n, 50_000))
    if exported is not None:
        rows.append(("export, sampled (server + client span, reactor share)", exported))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:7.2f} us")


if __name__ == "__main__":
    main()
