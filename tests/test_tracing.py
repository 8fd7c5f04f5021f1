"""W3C trace context: parsing, sampling, propagation to the upstream, x-trace-id,
and the spans exported for sampled exchanges (in memory, through the real
SDK batch processor)."""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from txgateway.config import parse_config
from txgateway.config.errors import ConfigError
from txgateway.config.model import GatewayConfig, RouteConfig, RouteMatch
from txgateway.errors import RateLimited, UpstreamConnectError, render_grpc
from txgateway.observability._otlp import TraceExport
from txgateway.observability.tracing import (
    TRACESTATE_MAX_MEMBERS,
    TraceContext,
    TraceContexts,
    export_key,
    parse_traceparent,
    parse_tracestate,
)
from txgateway.pipeline.context import RequestContext
from txgateway.runtime import Runtime
from txgateway.testing import GatewayHarness, MemoryUpstream, ReceivedRequest
from txgateway.upstream.websocket import ConnectionCounts, WebSocketConnector, WebSocketSettings

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
VALID = f"00-{TRACE}-{PARENT}-01"
#: What the gateway sends upstream: version 00, the trace, a span id, the flags.
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])\Z")

Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


def ok(request: ReceivedRequest) -> Answer:
    return 200, [(b"content-type", b"text/plain")], b"ok"


def config(enabled: bool = True, ratio: float = 1.0, retry: str = "") -> GatewayConfig:
    return parse_config(
        f"""
upstreams:
  users:
    servers: ["10.0.0.1:9001", "10.0.0.2:9001"]
    {retry}
routes:
  - name: users-api
    match: {{path: "/api/users/{{id}}"}}
    upstream: users
observability:
  tracing: {{enabled: {str(enabled).lower()}, sample_ratio: {ratio}, service_name: edge}}
"""
    )


class Threads(Clock):
    """A fake reactor: time by hand, calls from other threads queued until ``run``."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: list[tuple[Callable[..., object], tuple[object, ...]]] = []

    def callFromThread(self, call: Callable[..., object], *args: object) -> None:
        self.from_threads.append((call, args))

    def run(self) -> None:
        calls, self.from_threads = self.from_threads, []
        for call, args in calls:
            call(*args)


class Failing(SpanExporter):
    """A collector that is down (or comes back when ``up`` is set)."""

    def __init__(self) -> None:
        self.up = False
        self.received: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not self.up:
            return SpanExportResult.FAILURE
        self.received.extend(spans)
        return SpanExportResult.SUCCESS


class Stalled(SpanExporter):
    """A collector that takes the first batch and answers only once ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.received: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(10)
        self.received.extend(spans)
        return SpanExportResult.SUCCESS


class Traced:
    """A gateway in memory whose span export goes to ``exporter``."""

    def __init__(
        self,
        test: SynchronousTestCase,
        config: GatewayConfig,
        answer: Callable[[ReceivedRequest], Answer] = ok,
        exporter: SpanExporter | None = None,
        queue_size: int = 2048,
    ) -> None:
        self.reactor = Threads()
        self.reactor.advance(1_700_000_000)
        self.runtime = Runtime(self.reactor, self.reactor)
        self.exporter = exporter if exporter is not None else InMemorySpanExporter()
        tracing = config.observability.tracing
        self.export = self.runtime.shared(
            export_key(tracing), lambda: TraceExport(tracing, self.reactor, self.exporter, queue_size)
        )
        test.addCleanup(self.export.shutdown)
        self.upstream = MemoryUpstream(answer)
        self.harness = GatewayHarness(config, self.upstream, clock=self.reactor, runtime=self.runtime)

    def request(self, path: str = "/api/users/7", headers: Sequence[tuple[str, str]] = ()) -> Any:
        return self.harness.request("GET", path, headers=headers)

    def spans(self) -> dict[SpanKind, list[ReadableSpan]]:
        self.export.flush()
        assert isinstance(self.exporter, InMemorySpanExporter)
        found: dict[SpanKind, list[ReadableSpan]] = {SpanKind.SERVER: [], SpanKind.CLIENT: []}
        for span in self.exporter.get_finished_spans():
            found[span.kind].append(span)
        return found


def upstream_traceparent(request: ReceivedRequest) -> tuple[str, str, str]:
    values = [v for n, v in request.headers if n == b"traceparent"]
    assert len(values) == 1, values
    match = TRACEPARENT.match(values[0].decode("latin-1"))
    assert match is not None, values[0]
    trace_id, span_id, flags = match.groups()
    return trace_id, span_id, flags


def hex_id(value: int, digits: int) -> str:
    return f"{value:0{digits}x}"


# -- parsing ------------------------------------------------------------------


class TraceparentParsingTests(SynchronousTestCase):
    def test_valid(self) -> None:
        self.assertEqual(parse_traceparent(VALID.encode()), (TRACE, PARENT, True))
        self.assertEqual(parse_traceparent(f"00-{TRACE}-{PARENT}-00".encode()), (TRACE, PARENT, False))

    def test_only_the_sampled_bit_counts(self) -> None:
        self.assertEqual(parse_traceparent(f"00-{TRACE}-{PARENT}-03".encode()), (TRACE, PARENT, True))
        self.assertEqual(parse_traceparent(f"00-{TRACE}-{PARENT}-02".encode()), (TRACE, PARENT, False))
        self.assertEqual(parse_traceparent(f"00-{TRACE}-{PARENT}-ff".encode()), (TRACE, PARENT, True))

    def test_optional_whitespace_around_the_value(self) -> None:
        self.assertEqual(parse_traceparent(f" \t{VALID} ".encode()), (TRACE, PARENT, True))

    def test_invalid(self) -> None:
        for value in [
            "",
            "00",
            VALID.upper(),
            f"00-{TRACE.upper()}-{PARENT}-01",
            f"00-{TRACE}-{PARENT.upper()}-01",
            f"00-{TRACE}-{PARENT}-0A",
            f"0-{TRACE}-{PARENT}-01",
            f"00-{TRACE[:-1]}-{PARENT}-01",
            f"00-{TRACE}0-{PARENT}-01",
            f"00-{TRACE}-{PARENT[:-1]}-01",
            f"00-{TRACE}-{PARENT}-1",
            f"00-{TRACE}-{PARENT}-011",
            f"00-{'0' * 32}-{PARENT}-01",
            f"00-{TRACE}-{'0' * 16}-01",
            f"00_{TRACE}_{PARENT}_01",
            f"00-{TRACE}-{PARENT}-01-",
            f"00-{TRACE}-{PARENT}-01-what-the-future-will-be-like",
            f"ff-{TRACE}-{PARENT}-01",
            f"0g-{TRACE}-{PARENT}-01",
            f"00-{TRACE[:-1]}g-{PARENT}-01",
            f"00- {TRACE}-{PARENT}-01",
            f"cc-{TRACE}-{PARENT}-01.what",
        ]:
            self.assertIsNone(parse_traceparent(value.encode()), value)

    def test_future_versions_are_read_by_their_first_fields(self) -> None:
        self.assertEqual(parse_traceparent(f"cc-{TRACE}-{PARENT}-01".encode()), (TRACE, PARENT, True))
        self.assertEqual(
            parse_traceparent(f"cc-{TRACE}-{PARENT}-01-what-the-future-will-be-like".encode()),
            (TRACE, PARENT, True),
        )

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=80))
    def test_never_raises_on_bytes(self, value: bytes) -> None:
        parsed = parse_traceparent(value)
        if parsed is not None:
            trace_id, parent_id, _ = parsed
            self.assertRegex(trace_id, r"\A[0-9a-f]{32}\Z")
            self.assertRegex(parent_id, r"\A[0-9a-f]{16}\Z")
            self.assertNotEqual(int(trace_id, 16), 0)
            self.assertNotEqual(int(parent_id, 16), 0)

    @settings(max_examples=500, deadline=None)
    @given(
        st.from_regex(r"\A[0-9a-f]{2}\Z"),
        st.integers(0, 2**128 - 1),
        st.integers(0, 2**64 - 1),
        st.integers(0, 255),
        st.text(alphabet="-0123456789abcdefABCDEF xyz", max_size=4),
    )
    def test_near_valid_values(self, version: str, trace: int, parent: int, flags: int, tail: str) -> None:
        value = f"{version}-{hex_id(trace, 32)}-{hex_id(parent, 16)}-{flags:02x}{tail}"
        parsed = parse_traceparent(value.encode())
        valid = (
            version != "ff"
            and trace != 0
            and parent != 0
            and (tail.rstrip() == "" or (version != "00" and tail.startswith("-")))  # trailing OWS is not content
        )
        if valid:
            self.assertEqual(parsed, (hex_id(trace, 32), hex_id(parent, 16), bool(flags & 1)))
        else:
            self.assertIsNone(parsed)


class TracestateParsingTests(SynchronousTestCase):
    def test_valid_kept_as_sent(self) -> None:
        for value in [b"congo=t61rcWkgMzE", b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE", b"a=1, b=2", b"t@vendor=x y"]:
            self.assertEqual(parse_tracestate(value), value)

    def test_empty_members_allowed(self) -> None:
        self.assertEqual(parse_tracestate(b"a=1,,b=2"), b"a=1,,b=2")

    def test_invalid_dropped_whole(self) -> None:
        for value in [
            b"",
            b" , ",
            b"A=1",  # keys are lower case
            b"a=1,a=2",  # a key twice
            b"a",  # no value
            b"a=",  # empty value
            b"a=1 ,b=x\x01",  # control character
            b"a=b=,c",  # a member without '='
            b"1a=1",  # simple keys start with a letter
            b"t@V=1",  # system ids are lower case
            b"a=" + b"x" * 257,  # value too long
            b"a=x=y",  # '=' in a value
        ]:
            self.assertIsNone(parse_tracestate(value), value)

    def test_member_count_limit(self) -> None:
        members = [f"k{i}=v".encode() for i in range(TRACESTATE_MAX_MEMBERS)]
        self.assertIsNotNone(parse_tracestate(b",".join(members)))
        self.assertIsNone(parse_tracestate(b",".join([*members, b"extra=v"])))

    def test_length_limit(self) -> None:
        self.assertIsNone(parse_tracestate(b"a=" + b"x" * 255 + b",b=" + b"y" * 255))

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=120))
    def test_never_raises(self, value: bytes) -> None:
        parsed = parse_tracestate(value)
        self.assertIn(parsed, (None, value.strip(b" \t")))


# -- starting and continuing traces -----------------------------------------


class TraceContextsTests(SynchronousTestCase):
    def test_new_traces(self) -> None:
        contexts = TraceContexts(0.5)
        traces = [contexts.for_request([]) for _ in range(200)]
        for trace in traces:
            self.assertRegex(trace.trace_id, r"\A[0-9a-f]{32}\Z")
            self.assertRegex(trace.span_id, r"\A[0-9a-f]{16}\Z")
            self.assertIsNone(trace.parent_id)
            self.assertIsNone(trace.tracestate)
        self.assertEqual(len({t.trace_id for t in traces}), 200)
        # Sampled by the trace id, about half of them.
        self.assertTrue(20 < sum(t.sampled for t in traces) < 180)

    def test_sample_ratio_zero_and_one(self) -> None:
        self.assertFalse(any(TraceContexts(0.0).for_request([]).sampled for _ in range(1000)))
        self.assertTrue(all(TraceContexts(1.0).for_request([]).sampled for _ in range(1000)))

    def test_caller_decides_sampling(self) -> None:
        sampled = TraceContexts(0.0).for_request([(b"traceparent", VALID.encode())])
        self.assertEqual((sampled.trace_id, sampled.parent_id, sampled.sampled), (TRACE, PARENT, True))
        self.assertNotIn(sampled.span_id, (PARENT, "0" * 16))
        unsampled = TraceContexts(1.0).for_request([(b"traceparent", f"00-{TRACE}-{PARENT}-00".encode())])
        self.assertFalse(unsampled.sampled)

    def test_tracestate_needs_a_valid_traceparent(self) -> None:
        contexts = TraceContexts(1.0)
        kept = contexts.for_request(
            [(b"tracestate", b"a=1"), (b"traceparent", VALID.encode()), (b"tracestate", b"b=2")]
        )
        self.assertEqual(kept.tracestate, b"a=1,b=2")
        dropped = contexts.for_request([(b"traceparent", VALID.upper().encode()), (b"tracestate", b"a=1")])
        self.assertNotEqual(dropped.trace_id, TRACE.upper().lower())
        self.assertIsNone(dropped.tracestate)
        self.assertIsNone(dropped.parent_id)

    def test_repeated_traceparent_starts_a_new_trace(self) -> None:
        trace = TraceContexts(1.0).for_request([(b"traceparent", VALID.encode()), (b"traceparent", VALID.encode())])
        self.assertNotEqual(trace.trace_id, TRACE)
        self.assertIsNone(trace.parent_id)

    def test_upstream_headers_make_a_client_span_per_call(self) -> None:
        trace = TraceContext(TRACE, "1111111111111111", PARENT, True, b"a=1")
        first = dict(trace.upstream_headers())
        first_span = trace.client_span_id
        second = dict(trace.upstream_headers())
        self.assertEqual(first[b"traceparent"], f"00-{TRACE}-{first_span}-01".encode())
        self.assertEqual(second[b"traceparent"], f"00-{TRACE}-{trace.client_span_id}-01".encode())
        self.assertNotEqual(first_span, trace.client_span_id)
        self.assertEqual(first[b"tracestate"], b"a=1")
        unsampled = TraceContext(TRACE, "1111111111111111", None, False)
        self.assertEqual(
            unsampled.upstream_headers(), [(b"traceparent", f"00-{TRACE}-{unsampled.client_span_id}-00".encode())]
        )


# -- propagation through the gateway ----------------------------------------


class PropagationTests(SynchronousTestCase):
    def test_new_trace_propagated_and_named_in_the_response(self) -> None:
        traced = Traced(self, config(ratio=1.0))
        response = traced.request()
        self.assertEqual(response.status, 200)
        trace_id, _, flags = upstream_traceparent(traced.upstream.requests[0])
        self.assertEqual(flags, "01")
        self.assertEqual(response.header("x-trace-id"), trace_id)

    def test_unsampled_new_trace_still_propagated(self) -> None:
        traced = Traced(self, config(ratio=0.0))
        response = traced.request()
        trace_id, _, flags = upstream_traceparent(traced.upstream.requests[0])
        self.assertEqual(flags, "00")
        self.assertEqual(response.header("x-trace-id"), trace_id)

    def test_client_traceparent_replaced_not_forwarded(self) -> None:
        traced = Traced(self, config(ratio=0.0))
        response = traced.request(headers=[("traceparent", VALID), ("tracestate", "congo=t61rcWkgMzE")])
        request = traced.upstream.requests[0]
        trace_id, span_id, flags = upstream_traceparent(request)
        self.assertEqual((trace_id, flags), (TRACE, "01"))  # the caller's trace and decision
        self.assertNotEqual(span_id, PARENT)
        self.assertEqual(request.header(b"tracestate"), b"congo=t61rcWkgMzE")
        self.assertEqual(response.header("x-trace-id"), TRACE)

    def test_invalid_client_traceparent_starts_a_new_trace(self) -> None:
        traced = Traced(self, config(ratio=1.0))
        bad = f"00-{TRACE}-{PARENT}-01-extra"
        traced.request(headers=[("traceparent", bad), ("tracestate", "congo=t61rcWkgMzE")])
        request = traced.upstream.requests[0]
        trace_id, _, _ = upstream_traceparent(request)
        self.assertNotEqual(trace_id, TRACE)
        self.assertIsNone(request.header(b"tracestate"))

    def test_each_retry_is_a_new_client_span(self) -> None:
        def answer(request: ReceivedRequest) -> Answer:
            if request.host == "10.0.0.1":
                raise UpstreamConnectError("refused")
            return ok(request)

        traced = Traced(self, config(retry="retry: {attempts: 2, on: [connect_error]}"), answer)
        response = traced.request(headers=[("traceparent", VALID)])
        self.assertEqual(response.status, 200)
        first, second = (upstream_traceparent(r) for r in traced.upstream.requests)
        self.assertEqual(first[0], second[0])
        self.assertNotEqual(first[1], second[1])
        # The exported client span is the try that answered.
        spans = traced.spans()
        (client,) = spans[SpanKind.CLIENT]
        self.assertEqual(hex_id(client.context.span_id, 16), second[1])
        self.assertEqual(dict(client.attributes or {})["server.address"], "10.0.0.2")

    def test_without_export_the_callers_span_is_the_upstreams_parent(self) -> None:
        # No gateway span is exported, so none may be named as a parent: the
        # caller's traceparent reaches the upstream unchanged.
        upstream = MemoryUpstream(ok)
        harness = GatewayHarness(config(enabled=False), upstream)
        response = harness.request("GET", "/api/users/7", headers=[("traceparent", VALID)])
        trace_id, span_id, _ = upstream_traceparent(upstream.requests[0])
        self.assertEqual((trace_id, span_id), (TRACE, PARENT))
        self.assertIsNone(response.header("x-trace-id"))

    def test_without_export_a_request_without_trace_still_gets_one(self) -> None:
        upstream = MemoryUpstream(ok)
        harness = GatewayHarness(config(enabled=False), upstream)
        harness.request("GET", "/api/users/7")
        trace_id, span_id, _ = upstream_traceparent(upstream.requests[0])
        self.assertEqual((len(trace_id), len(span_id)), (32, 16))
        self.assertNotEqual(trace_id, TRACE)

    def test_gateway_errors_carry_the_trace_id(self) -> None:
        traced = Traced(self, config())
        response = traced.request("/nowhere", headers=[("traceparent", VALID)])
        self.assertEqual(response.status, 404)
        self.assertEqual(response.header("x-trace-id"), TRACE)
        self.assertEqual(response.json()["error"], "not_found")

    def test_cache_hits_name_their_own_trace(self) -> None:
        cached = parse_config(
            """
upstreams:
  users: {servers: ["10.0.0.1:9001"]}
routes:
  - {name: r, match: {path: "/c/*"}, upstream: users, cache: {enabled: true, ttl: 30}}
middleware:
  cache: {enabled: true}
observability:
  tracing: {enabled: true, sample_ratio: 1.0}
"""
        )
        traced = Traced(self, cached, lambda request: (200, [(b"cache-control", b"max-age=60")], b"x"))
        responses = [traced.request("/c/a") for _ in range(3)]
        self.assertEqual([r.header("x-cache") for r in responses], ["MISS", "HIT", "HIT"])
        trace_ids = [[v for n, v in r.headers if n == b"x-trace-id"] for r in responses]
        self.assertEqual([len(ids) for ids in trace_ids], [1, 1, 1])
        self.assertEqual(len({ids[0] for ids in trace_ids}), 3)
        # A hit calls no upstream: a server span only.
        spans = traced.spans()
        self.assertEqual((len(spans[SpanKind.SERVER]), len(spans[SpanKind.CLIENT])), (3, 1))

    def test_grpc_errors_carry_the_trace_id(self) -> None:
        error = RateLimited("slow down", [(b"retry-after", b"1"), (b"x-trace-id", TRACE.encode())])
        self.assertIn((b"x-trace-id", TRACE.encode()), render_grpc(error, "r-1"))

    def test_websocket_handshake_carries_a_new_traceparent(self) -> None:
        connector = WebSocketConnector(
            RouteConfig(name="ws", match=RouteMatch(path="/ws/*"), upstream="u", websocket=True),
            None,  # type: ignore[arg-type]
            lambda ip: False,
            MemoryReactor(),
            ConnectionCounts(),
            None,
            WebSocketSettings(),
        )
        headers = [(b"upgrade", b"websocket"), (b"traceparent", VALID.encode()), (b"tracestate", b"a=1")]
        ctx = RequestContext(b"GET", "/ws/x", b"", headers, client_ip="10.0.0.1", protocol="websocket")
        ctx.trace = TraceContexts(1.0).for_request(headers)
        sent = connector.headers_for(ctx)
        self.assertEqual(sent["traceparent"], f"00-{TRACE}-{ctx.trace.client_span_id}-01")
        self.assertEqual(sent["tracestate"], "a=1")


# -- export -------------------------------------------------------------------


class ExportTests(SynchronousTestCase):
    def test_server_and_client_spans(self) -> None:
        traced = Traced(self, config())
        traced.request(headers=[("traceparent", VALID), ("tracestate", "congo=t61rcWkgMzE")])
        _, client_span_id, _ = upstream_traceparent(traced.upstream.requests[0])
        spans = traced.spans()
        (server,) = spans[SpanKind.SERVER]
        (client,) = spans[SpanKind.CLIENT]
        assert server.context is not None and client.context is not None
        assert server.parent is not None and client.parent is not None
        self.assertEqual(hex_id(server.context.trace_id, 32), TRACE)
        self.assertEqual(hex_id(server.parent.span_id, 16), PARENT)
        self.assertTrue(server.parent.is_remote)
        self.assertEqual(client.parent.span_id, server.context.span_id)
        self.assertEqual(hex_id(client.context.span_id, 16), client_span_id)
        self.assertEqual(server.context.trace_state.to_header(), "congo=t61rcWkgMzE")
        self.assertEqual(server.name, "GET users-api")
        self.assertEqual(server.resource.attributes["service.name"], "edge")
        attributes = dict(server.attributes or {})
        self.assertEqual(attributes["http.request.method"], "GET")
        self.assertEqual(attributes["url.path"], "/api/users/7")
        self.assertEqual(attributes["http.route"], "/api/users/{id}")
        self.assertEqual(attributes["txgateway.route"], "users-api")
        self.assertEqual(attributes["http.response.status_code"], 200)
        self.assertEqual(attributes["client.address"], "127.0.0.1")
        self.assertEqual(attributes["txgateway.protocol"], "http/1.1")
        self.assertRegex(str(attributes["txgateway.request_id"]), r".+-\d+")
        client_attributes = dict(client.attributes or {})
        self.assertEqual(client_attributes["server.address"], "10.0.0.1")
        self.assertEqual(client_attributes["server.port"], 9001)
        self.assertEqual(client_attributes["http.response.status_code"], 200)
        self.assertEqual(client_attributes["txgateway.upstream"], "users")
        assert server.start_time is not None and server.end_time is not None
        assert client.start_time is not None and client.end_time is not None
        self.assertTrue(server.start_time <= client.start_time <= client.end_time <= server.end_time)
        self.assertEqual(server.start_time, 1_700_000_000 * 10**9)

    def test_root_span_when_the_trace_starts_here(self) -> None:
        traced = Traced(self, config())
        response = traced.request()
        (server,) = traced.spans()[SpanKind.SERVER]
        assert server.context is not None
        self.assertIsNone(server.parent)
        self.assertEqual(hex_id(server.context.trace_id, 32), response.header("x-trace-id"))

    def test_no_route_no_client_span(self) -> None:
        traced = Traced(self, config())
        traced.request("/nowhere")
        spans = traced.spans()
        (server,) = spans[SpanKind.SERVER]
        self.assertEqual(spans[SpanKind.CLIENT], [])
        self.assertEqual(server.name, "GET")
        self.assertEqual(dict(server.attributes or {})["http.response.status_code"], 404)

    def test_upstream_failure_marks_both_spans(self) -> None:
        def refuse(request: ReceivedRequest) -> Answer:
            raise UpstreamConnectError("refused")

        traced = Traced(self, config(), refuse)
        self.assertEqual(traced.request().status, 502)
        spans = traced.spans()
        (server,) = spans[SpanKind.SERVER]
        (client,) = spans[SpanKind.CLIENT]
        self.assertEqual(server.status.status_code, StatusCode.ERROR)
        self.assertEqual(client.status.status_code, StatusCode.ERROR)
        self.assertNotIn("http.response.status_code", dict(client.attributes or {}))

    def test_only_sampled_exchanges_are_exported(self) -> None:
        traced = Traced(self, config(ratio=1.0))
        traced.request(headers=[("traceparent", f"00-{TRACE}-{PARENT}-00")])
        self.assertEqual(traced.spans(), {SpanKind.SERVER: [], SpanKind.CLIENT: []})
        unsampled = Traced(self, config(ratio=0.0))
        unsampled.request()
        self.assertEqual(unsampled.spans(), {SpanKind.SERVER: [], SpanKind.CLIENT: []})

    def test_failing_export_does_not_affect_traffic_and_is_logged_once(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        collector = Failing()
        traced = Traced(self, config(), exporter=collector)
        for _ in range(3):
            self.assertEqual(traced.request().status, 200)
            traced.export.flush()
        traced.reactor.run()
        failing = [e for e in events if "failing" in e["log_format"]]
        self.assertEqual(len(failing), 1)
        self.assertEqual(traced.export.failed, 6)
        collector.up = True
        self.assertEqual(traced.request().status, 200)
        traced.export.flush()
        traced.reactor.run()
        self.assertEqual(len(collector.received), 2)
        self.assertEqual(len([e for e in events if "recovered" in e["log_format"]]), 1)

    def test_exporter_exception_is_a_failure(self) -> None:
        class Broken(SpanExporter):
            def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
                raise RuntimeError("exporter bug")

        traced = Traced(self, config(), exporter=Broken())
        self.assertEqual(traced.request().status, 200)
        traced.export.flush()
        self.assertEqual(traced.export.failed, 2)
        self.assertEqual(traced.request().status, 200)

    def test_queue_is_bounded(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        collector = Stalled()
        self.addCleanup(collector.release.set)
        traced = Traced(self, config(), exporter=collector, queue_size=4)
        for _ in range(4):
            self.assertEqual(traced.request().status, 200)
        # Two exchanges (two spans each) fill the queue; while the collector
        # holds them, the others are dropped, not queued.
        self.assertEqual((traced.export.handed, traced.export.dropped), (4, 4))
        self.assertEqual(len([e for e in events if "behind" in e["log_format"]]), 1)
        collector.release.set()
        traced.export.flush()
        self.assertEqual(len(collector.received), 4)
        self.assertEqual(traced.request().status, 200)
        self.assertEqual(traced.export.handed, 6)

    def test_shared_across_reloads_and_stopped_with_the_runtime(self) -> None:
        traced = Traced(self, config())
        from txgateway.gateway import Gateway

        again = Gateway(config(), lambda _config: traced.upstream, traced.runtime)
        self.assertIn(traced.export.exchange_done, again.observers)
        traced.request()
        stopped = traced.runtime.stop()
        deadline = time.monotonic() + 10
        while not traced.reactor.from_threads and time.monotonic() < deadline:
            time.sleep(0.01)
        traced.reactor.run()
        self.successResultOf(stopped)
        # What was queued went out at the stop; later exchanges make no spans.
        assert isinstance(traced.exporter, InMemorySpanExporter)
        self.assertEqual(len(traced.exporter.get_finished_spans()), 2)
        traced.export.exchange_done(RequestContext(b"GET", "/", b"", [], client_ip="127.0.0.1"))
        self.assertEqual(traced.export.handed, 2)


class ConfigTests(SynchronousTestCase):
    def test_enabled_without_the_sdk_is_a_config_error(self) -> None:
        name = "opentelemetry.sdk.trace.export"
        saved = sys.modules.get(name)
        sys.modules[name] = None  # type: ignore[assignment]
        try:
            with self.assertRaises(ConfigError) as raised:
                config()
        finally:
            if saved is not None:
                sys.modules[name] = saved
        message = str(raised.exception)
        self.assertIn("observability.tracing.enabled", message)
        self.assertIn("pip install txgateway[tracing]", message)

    def test_disabled_needs_no_sdk(self) -> None:
        name = "opentelemetry.sdk.trace.export"
        saved = sys.modules.get(name)
        sys.modules[name] = None  # type: ignore[assignment]
        try:
            self.assertFalse(config(enabled=False).observability.tracing.enabled)
        finally:
            if saved is not None:
                sys.modules[name] = saved
