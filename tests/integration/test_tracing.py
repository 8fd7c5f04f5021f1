"""Tracing end to end: a real gateway exporting spans over OTLP/HTTP to a tiny
local receiver, with ``traceparent`` propagated to a real upstream.

The receiver is a twisted.web resource on a free loopback port that accepts
``POST /v1/traces`` bodies and decodes them with opentelemetry-proto's
``ExportTraceServiceRequest``.  The gateway runs with ``sample_ratio: 1.0``
and ``OTEL_BSP_SCHEDULE_DELAY=100`` (milliseconds) so spans arrive quickly.
"""

from __future__ import annotations

import gzip
import os
import re
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.trial.unittest import FailTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tests.integration.harness import (
    LOCALHOST,
    CurlResult,
    EchoUpstream,
    GatewayProcess,
    curl,
    free_port,
    reactor,
    sleep,
)

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01\Z")


class TraceReceiver(Resource):
    """``POST /v1/traces``: OTLP/HTTP protobuf, spans kept with their resource attributes."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[tuple[dict[str, Any], Span]] = []
        self.posts = 0

    def render_POST(self, request: Request) -> bytes:
        self.posts += 1
        assert request.content is not None
        body = request.content.read()
        if request.getHeader("content-encoding") == "gzip":
            body = gzip.decompress(body)
        if request.path != b"/v1/traces" or request.getHeader("content-type") != "application/x-protobuf":
            request.setResponseCode(400)
            return b""
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append((resource, span))
        request.setHeader("content-type", "application/x-protobuf")
        return bytes(ExportTraceServiceResponse().SerializeToString())

    def of_trace(self, trace_id: str) -> dict[int, list[Span]]:
        found: dict[int, list[Span]] = {Span.SPAN_KIND_SERVER: [], Span.SPAN_KIND_CLIENT: []}
        for _, span in self.spans:
            if span.trace_id.hex() == trace_id:
                found.setdefault(span.kind, []).append(span)
        return found


def attributes(values: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        kind = item.value.WhichOneof("value")
        out[item.key] = getattr(item.value, kind) if kind is not None else None
    return out


def gateway_config(upstream_port: int, collector_port: int) -> dict[str, Any]:
    return {
        "upstreams": {
            "echo": {
                "servers": [{"address": f"{LOCALHOST}:{upstream_port}"}],
                "timeouts": {"connect": 2, "request": 10},
            }
        },
        "routes": [{"name": "echo-api", "match": {"path": "/api/{name}"}, "upstream": "echo"}],
        "observability": {
            "access_log": {"enabled": False},
            "tracing": {
                "enabled": True,
                "otlp_endpoint": f"http://{LOCALHOST}:{collector_port}/v1/traces",
                "sample_ratio": 1.0,
                "service_name": "it-gateway",
            },
        },
    }


def upstream_traceparent(result: CurlResult) -> tuple[str, str]:
    """The trace and parent span ids of the traceparent the echo upstream received."""
    headers = [value for name, value in result.json()["headers"] if name.lower() == "traceparent"]
    if len(headers) != 1:
        raise FailTest(f"the upstream got {len(headers)} traceparent headers: {headers}")
    match = TRACEPARENT.match(headers[0])
    if match is None:
        raise FailTest(f"malformed traceparent at the upstream: {headers[0]!r}")
    return match.group(1), match.group(2)


class TracingTests(TestCase):
    timeout = 120

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return ensureDeferred(self._set_up())

    async def _set_up(self) -> None:
        self.upstream = EchoUpstream()
        self.upstream.listen(free_port())
        self.addCleanup(self.upstream.stop)
        self.receiver = TraceReceiver()
        site = Site(self.receiver)
        site.noisy = False
        listening: IListeningPort = reactor.listenTCP(0, site, interface=LOCALHOST)
        self.collector_port = listening.getHost().port  # type: ignore[attr-defined]
        self.addCleanup(listening.stopListening)

    async def start_gateway(self, collector_port: int, **environment: str) -> GatewayProcess:
        upstream_port = self.upstream.port.getHost().port  # type: ignore[union-attr]
        gateway = GatewayProcess(gateway_config(upstream_port, collector_port))
        # The exporter settings are the SDK's standard environment variables,
        # read by the gateway process at startup.
        extra = {"OTEL_BSP_SCHEDULE_DELAY": "100", **environment}
        saved = {name: os.environ.get(name) for name in extra}
        os.environ.update(extra)
        try:
            started = gateway.start()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        self.addCleanup(gateway.stop)
        await started
        return gateway

    async def spans_of(self, trace_id: str, count: int = 2) -> dict[int, list[Span]]:
        for _ in range(200):
            found = self.receiver.of_trace(trace_id)
            if sum(len(spans) for spans in found.values()) >= count:
                return found
            await sleep(0.05)
        raise FailTest(f"no spans of trace {trace_id} after 10 s; received {len(self.receiver.spans)} spans")

    def check_log(self, gateway: GatewayProcess) -> None:
        log = gateway.log()
        if "Traceback (most recent call last)" in log or "Unhandled error" in log:
            raise FailTest(f"the gateway logged an error:\n{log}")

    def test_continues_the_callers_trace(self) -> Deferred[None]:
        async def run() -> None:
            gateway = await self.start_gateway(self.collector_port)
            result = await curl(
                "-H", f"traceparent: 00-{TRACE}-{PARENT}-01",
                "-H", "tracestate: congo=t61rcWkgMzE",
                gateway.url("/api/users?q=1"),
            )  # fmt: skip
            self.assertEqual(result.status, 200)
            self.assertEqual(result.header(b"x-trace-id"), TRACE.encode())
            trace_id, client_span_id = upstream_traceparent(result)
            self.assertEqual(trace_id, TRACE)
            self.assertNotEqual(client_span_id, PARENT)
            tracestate = [v for n, v in result.json()["headers"] if n.lower() == "tracestate"]
            self.assertEqual(tracestate, ["congo=t61rcWkgMzE"])

            found = await self.spans_of(TRACE)
            (server,) = found[Span.SPAN_KIND_SERVER]
            (client,) = found[Span.SPAN_KIND_CLIENT]
            self.assertEqual(server.parent_span_id.hex(), PARENT)
            self.assertEqual(client.parent_span_id, server.span_id)
            self.assertEqual(client.span_id.hex(), client_span_id)
            self.assertEqual(server.trace_state, "congo=t61rcWkgMzE")
            self.assertEqual(server.name, "GET echo-api")
            server_attributes = attributes(server.attributes)
            self.assertEqual(server_attributes["http.request.method"], "GET")
            self.assertEqual(server_attributes["url.path"], "/api/users")
            self.assertEqual(server_attributes["http.route"], "/api/{name}")
            self.assertEqual(server_attributes["txgateway.route"], "echo-api")
            self.assertEqual(server_attributes["http.response.status_code"], 200)
            self.assertEqual(server_attributes["client.address"], LOCALHOST)
            self.assertEqual(server_attributes["txgateway.protocol"], "http/1.1")
            self.assertEqual(server_attributes["txgateway.request_id"], result.header(b"x-request-id").decode())  # type: ignore[union-attr]
            client_attributes = attributes(client.attributes)
            self.assertEqual(client_attributes["server.address"], LOCALHOST)
            self.assertEqual(client_attributes["server.port"], self.upstream.port.getHost().port)  # type: ignore[union-attr]
            self.assertEqual(client_attributes["http.response.status_code"], 200)
            self.assertEqual(client_attributes["txgateway.upstream"], "echo")
            self.assertTrue(
                server.start_time_unix_nano
                <= client.start_time_unix_nano
                <= client.end_time_unix_nano
                <= server.end_time_unix_nano
            )
            resource = next(r for r, span in self.receiver.spans if span.span_id == server.span_id)
            self.assertEqual(resource["service.name"], "it-gateway")
            self.check_log(gateway)

        return ensureDeferred(run())

    def test_starts_a_trace_and_h2_too(self) -> Deferred[None]:
        async def run() -> None:
            gateway = await self.start_gateway(self.collector_port)
            for args in [(), ("--http2-prior-knowledge",)]:
                result = await curl(*args, gateway.url("/api/new"))
                self.assertEqual(result.status, 200)
                trace_id, client_span_id = upstream_traceparent(result)
                self.assertEqual(result.header(b"x-trace-id"), trace_id.encode())
                found = await self.spans_of(trace_id)
                (server,) = found[Span.SPAN_KIND_SERVER]
                (client,) = found[Span.SPAN_KIND_CLIENT]
                self.assertEqual(server.parent_span_id, b"")  # the trace starts at the gateway
                self.assertEqual(client.parent_span_id, server.span_id)
                self.assertEqual(client.span_id.hex(), client_span_id)
                protocol = attributes(server.attributes)["txgateway.protocol"]
                self.assertEqual(protocol, "h2" if args else "http/1.1")
            # A request no route matches: a server span only, with the gateway's 404.
            missing = await curl("-H", f"traceparent: 00-{TRACE}-{PARENT}-01", gateway.url("/elsewhere"))
            self.assertEqual(missing.status, 404)
            self.assertEqual(missing.header(b"x-trace-id"), TRACE.encode())
            found = await self.spans_of(TRACE, 1)
            (server,) = found[Span.SPAN_KIND_SERVER]
            self.assertEqual(attributes(server.attributes)["http.response.status_code"], 404)
            self.assertEqual(found[Span.SPAN_KIND_CLIENT], [])
            self.check_log(gateway)

        return ensureDeferred(run())

    def test_collector_down_leaves_traffic_alone(self) -> Deferred[None]:
        async def run() -> None:
            nothing_there = free_port()
            # Each export gives up after 2 s of retries (seconds in this SDK).
            gateway = await self.start_gateway(nothing_there, OTEL_EXPORTER_OTLP_TRACES_TIMEOUT="2")
            for _ in range(3):
                results = [await curl(gateway.url(f"/api/n{i}")) for i in range(10)]
                self.assertEqual([r.status for r in results], [200] * 10)
                await sleep(0.5)
            for _ in range(200):
                if "span export" in gateway.log() and "failing" in gateway.log():
                    break
                await sleep(0.1)
            log = gateway.log()
            self.assertEqual(log.count("failing"), 1, log)
            # The exporter's own per-retry warnings are not printed, only our one line.
            self.assertEqual(
                [line for line in log.splitlines() if "retrying" in line and "TraceExport" not in line], []
            )
            self.assertTrue(gateway.running)
            self.check_log(gateway)
            self.assertEqual(await gateway.stop(), 0)

        return ensureDeferred(run())
