"""The gateway's metrics, moved by real exchanges through the protocols and the pipeline.

Each test reads the values a Prometheus scrape would see (the registry's
samples) after requests through :class:`txgateway.testing.GatewayHarness`,
the HTTP/1.1, HTTP/2 and WebSocket protocols (with the protocol tests'
scripted gateways) or the pipeline stages, and checks they moved by exactly
what the traffic implies.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import os
import random
from typing import Any

import jwt
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.test_protocol_http1 import Connection, ControlledBody
from tests.test_protocol_http1 import ScriptedGateway as H1Gateway
from tests.test_protocol_http1 import ok as h1_ok
from tests.test_protocol_http2 import GRPC, Wire, request_headers
from tests.test_protocol_http2 import ScriptedGateway as H2Gateway
from txgateway.body import BytesBody
from txgateway.config import parse_config
from txgateway.errors import NotFound, Unauthorized, UpstreamConnectError
from txgateway.gateway import Gateway
from txgateway.messages import Response
from txgateway.observability.metrics import GatewayMetrics, exposition
from txgateway.observability.recorder import ExchangeRecorder
from txgateway.pipeline.context import RequestContext
from txgateway.protocols.http1 import HTTP11ServerFactory, HTTP11ServerProtocol
from txgateway.runtime import Runtime
from txgateway.testing import GatewayHarness, MemoryUpstream, ReceivedRequest
from txgateway.upstream.health import UpstreamHealth
from txgateway.upstream.upstream import Upstream
from txgateway.upstream.websocket import RelayCounters, WebSocketSettings, WebSocketUpgrade

NOW = 1_700_000_000.0
SECRET = "metrics-test-secret-of-at-least-32-bytes"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


CONFIG = f"""
upstreams:
  users: {{servers: ["10.0.0.1:9000"]}}
  flaky:
    servers: ["10.0.0.2:9000", "10.0.0.3:9000"]
    retry: {{attempts: 2, backoff_base: 0.01}}
    circuit_breaker: {{failure_threshold: 2, recovery_timeout: 30}}
    passive_health: {{consecutive_failures: 2, ejection_time: 30}}
routes:
  - {{name: users, match: {{path: "/users/{{id}}"}}, upstream: users, auth: none}}
  - {{name: files, match: {{path: "/files/*"}}, upstream: users, auth: none}}
  - {{name: private, match: {{path: "/private/*"}}, upstream: users, auth: required}}
  - {{name: admin, match: {{path: "/admin/*"}}, upstream: users, roles: [admin]}}
  - name: limited
    match: {{path: "/limited/*"}}
    upstream: users
    auth: none
    rate_limit: {{requests_per_minute: 60, burst_size: 2}}
  - {{name: cached, match: {{path: "/cached/*"}}, upstream: users, auth: none, cache: {{enabled: true, ttl: 60}}}}
  - {{name: flaky, match: {{path: "/flaky/*"}}, upstream: flaky, auth: none}}
middleware:
  auth:
    jwt: {{algorithms: [HS256], secret: "{SECRET}", leeway: 0}}
    api_keys:
      header: X-API-Key
      keys:
        - {{sha256: "{sha("key-1")}", consumer: ci-bot, roles: [reader]}}
"""


def answer(request: ReceivedRequest) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    if request.target.startswith(b"/flaky/"):
        raise UpstreamConnectError("connection refused")
    if request.target.startswith(b"/users/500"):
        return 503, [], b"down"
    return 200, [(b"content-type", b"text/plain"), (b"cache-control", b"max-age=60")], b"hello"


class MetricsTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.upstream = MemoryUpstream(answer)
        self.harness = GatewayHarness(parse_config(CONFIG), self.upstream, clock=self.clock)
        self.metrics = self.harness.runtime.metrics

    def value(self, name: str, **labels: str) -> float:
        """A sample as a scrape shows it; 0 for a series that does not exist (yet)."""
        found = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    def get(self, target: str, *headers: tuple[str, str]) -> int:
        return self.harness.request("GET", target, headers=headers).status

    def token(self, **claims: Any) -> str:
        return jwt.encode({"sub": "alice", "exp": NOW + 60, **claims}, SECRET, algorithm="HS256")


class RequestMetricsTests(MetricsTestCase):
    def test_requests_counted_by_route_method_code_and_protocol(self) -> None:
        for target in ("/users/1", "/users/2", "/users/3", "/users/500", "/nowhere"):
            self.get(target)
        self.harness.request("DELETE", "/users/9")
        self.assertEqual(
            self.value("txgateway_requests_total", route="users", method="GET", code="200", protocol="http/1.1"), 3
        )
        self.assertEqual(
            self.value("txgateway_requests_total", route="users", method="GET", code="503", protocol="http/1.1"), 1
        )
        self.assertEqual(
            self.value("txgateway_requests_total", route="users", method="DELETE", code="200", protocol="http/1.1"), 1
        )
        # No route matched: the route label is empty, never the path.
        self.assertEqual(
            self.value("txgateway_requests_total", route="", method="GET", code="404", protocol="http/1.1"), 1
        )
        self.assertEqual(
            self.value("txgateway_request_duration_seconds_count", route="users", method="GET", code="200"), 3
        )

    def test_duration_histogram_takes_the_time_to_the_response_end(self) -> None:
        def slow(request: ReceivedRequest) -> Deferred[tuple[int, list[tuple[bytes, bytes]], bytes]]:
            d: Deferred[tuple[int, list[tuple[bytes, bytes]], bytes]] = Deferred()
            self.clock.callLater(0.3, d.callback, (200, [], b"late"))
            return d

        harness = GatewayHarness(parse_config(CONFIG), MemoryUpstream(slow), clock=self.clock)
        self.assertEqual(harness.request("GET", "/users/1").status, 200)
        labels = {"route": "users", "method": "GET", "code": "200"}
        sample = harness.runtime.metrics.registry.get_sample_value
        self.assertEqual(sample("txgateway_request_duration_seconds_bucket", {**labels, "le": "0.25"}), 0)
        self.assertEqual(sample("txgateway_request_duration_seconds_bucket", {**labels, "le": "0.5"}), 1)
        self.assertAlmostEqual(sample("txgateway_request_duration_seconds_sum", labels) or 0, 0.3)

    def test_body_bytes_in_and_out_per_route(self) -> None:
        response = self.harness.request("POST", "/files/upload", body=b"x" * 1234)
        self.assertEqual(response.body, b"hello")
        self.get("/files/a")
        self.assertEqual(self.value("txgateway_request_bytes_total", route="files"), 1234)
        self.assertEqual(self.value("txgateway_response_bytes_total", route="files"), 10)

    def test_unknown_methods_count_as_other(self) -> None:
        for method in ("PROPFIND", "PURGE", "MKCOL"):
            self.harness.request(method, "/files/x")
        self.assertEqual(
            self.value("txgateway_requests_total", route="files", method="OTHER", code="200", protocol="http/1.1"), 3
        )

    def test_distinct_paths_do_not_grow_the_label_sets(self) -> None:
        before = exposition(self.metrics).count(b"\n")
        for i in range(500):
            self.get(f"/files/{i}/{os.urandom(4).hex()}")
            self.get(f"/nowhere/{i}")
        recorder = next(o for o in self.harness.gateway.observers if isinstance(o, ExchangeRecorder))
        self.assertEqual(len(recorder._children), 2)
        self.assertEqual(
            self.value("txgateway_requests_total", route="files", method="GET", code="200", protocol="http/1.1"), 500
        )
        self.assertEqual(
            self.value("txgateway_requests_total", route="", method="GET", code="404", protocol="http/1.1"), 500
        )
        text = exposition(self.metrics)
        self.assertNotIn(b"/files/", text)
        self.assertNotIn(b"/nowhere/", text)
        # Two label sets of the request metrics, nothing per path.
        self.assertLess(text.count(b"\n") - before, 80)

    def test_metrics_disabled_means_no_recorder(self) -> None:
        config = parse_config(CONFIG + "observability: {metrics: {enabled: false}}\n")
        harness = GatewayHarness(config, self.upstream, clock=self.clock)
        self.assertFalse(any(isinstance(o, ExchangeRecorder) for o in harness.gateway.observers))
        self.assertEqual(harness.request("GET", "/users/1").status, 200)
        self.assertIsNone(
            harness.runtime.metrics.registry.get_sample_value(
                "txgateway_requests_total", {"route": "users", "method": "GET", "code": "200", "protocol": "http/1.1"}
            )
        )

    def test_one_recorder_per_runtime_across_reloads(self) -> None:
        runtime = self.harness.runtime
        again = Gateway(parse_config(CONFIG), lambda _config: self.upstream, runtime)
        first = [o for o in self.harness.gateway.observers if isinstance(o, ExchangeRecorder)]
        second = [o for o in again.observers if isinstance(o, ExchangeRecorder)]
        self.assertEqual(len(first), 1)
        self.assertIs(first[0], second[0])

    def test_a_failing_observer_does_not_disturb_the_others(self) -> None:
        def broken(ctx: RequestContext) -> None:
            raise RuntimeError("observer bug")

        self.harness.gateway.observers.insert(0, broken)
        self.assertEqual(self.get("/users/1"), 200)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(
            self.value("txgateway_requests_total", route="users", method="GET", code="200", protocol="http/1.1"), 1
        )


class ProcessMetricsTests(SynchronousTestCase):
    def test_the_process_and_its_garbage_collector_are_exported(self) -> None:
        """What every Prometheus client exports: an operator looking at a
        latency spike checks memory, CPU, descriptors and full collections."""
        metrics = GatewayMetrics()
        registry = metrics.registry
        rss = registry.get_sample_value("process_resident_memory_bytes")
        assert rss is not None
        self.assertGreater(rss, 1024 * 1024)
        self.assertGreater(registry.get_sample_value("process_open_fds") or 0, 0)
        full = registry.get_sample_value("python_gc_collections_total", {"generation": "2"})
        assert full is not None
        gc.collect()
        self.assertGreaterEqual(
            registry.get_sample_value("python_gc_collections_total", {"generation": "2"}) or 0, full + 1
        )
        text = exposition(metrics)
        for name in (b"process_cpu_seconds_total", b"process_max_fds", b"python_gc_objects_collected_total"):
            self.assertIn(name, text)


class HTTP11AccountingTests(SynchronousTestCase):
    """Every HTTP/1.1 exchange reaches ``exchange_done`` once, with what it came to."""

    def gauge(self, gateway: H1Gateway, name: str, protocol: str) -> float:
        return gateway.runtime.metrics.registry.get_sample_value(name, {"protocol": protocol}) or 0.0

    def test_finished_exchange(self) -> None:
        pending: list[Deferred[Response]] = []
        gateway = H1Gateway(lambda ctx: pending.append(Deferred()) or pending[-1])  # type: ignore[func-returns-value]
        conn = Connection(gateway)
        conn.clock.advance(5)
        conn.send(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        conn.clock.advance(0.25)
        pending[0].callback(Response(200, [], BytesBody(b"hello")))
        [ctx] = gateway.done
        self.assertEqual((ctx.status, ctx.bytes_in, ctx.bytes_out, ctx.started, ctx.ended), (200, 3, 5, 5.0, 5.25))
        self.assertEqual(self.gauge(gateway, "txgateway_requests_in_flight", "http/1.1"), 0)

    def test_in_flight_and_open_connections(self) -> None:
        pending: list[Deferred[Response]] = []
        gateway = H1Gateway(lambda ctx: pending.append(Deferred()) or pending[-1])  # type: ignore[func-returns-value]
        conn = Connection(gateway)
        self.assertEqual(self.gauge(gateway, "txgateway_connections_open", "http/1.1"), 1)
        conn.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(self.gauge(gateway, "txgateway_requests_in_flight", "http/1.1"), 1)
        self.assertEqual(gateway.done, [])
        pending[0].callback(Response(204, [], None))
        self.assertEqual(self.gauge(gateway, "txgateway_requests_in_flight", "http/1.1"), 0)
        self.assertEqual([c.status for c in gateway.done], [204])
        conn.protocol.connectionLost()
        self.assertEqual(self.gauge(gateway, "txgateway_connections_open", "http/1.1"), 0)

    def test_client_gone_before_the_response_is_499(self) -> None:
        gateway = H1Gateway(lambda ctx: Deferred())
        conn = Connection(gateway)
        conn.send(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabcd")
        conn.clock.advance(2)
        conn.protocol.connectionLost()
        [ctx] = gateway.done
        self.assertEqual((ctx.status, ctx.bytes_in, ctx.bytes_out, ctx.ended), (499, 4, 0, 2.0))
        self.assertEqual(self.gauge(gateway, "txgateway_requests_in_flight", "http/1.1"), 0)

    def test_client_gone_mid_body_is_499_with_the_bytes_sent(self) -> None:
        body = ControlledBody()
        gateway = H1Gateway(lambda ctx: succeed(Response(200, [], body)))
        conn = Connection(gateway)
        conn.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert body.sink is not None
        body.sink.write(b"1234567")
        conn.protocol.connectionLost()
        [ctx] = gateway.done
        self.assertEqual((ctx.status, ctx.bytes_out), (499, 7))
        self.assertTrue(body.stopped)

    def test_aborted_response_keeps_its_status(self) -> None:
        body = ControlledBody()
        gateway = H1Gateway(lambda ctx: succeed(Response(200, [], body)))
        conn = Connection(gateway)
        conn.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert body.sink is not None
        body.sink.write(b"123")
        body.sink.abort(Failure(UpstreamConnectError("gone")))
        conn.protocol.connectionLost()
        [ctx] = gateway.done
        self.assertEqual((ctx.status, ctx.bytes_out), (200, 3))

    def test_errors_before_routing_are_exchanges_too(self) -> None:
        gateway = H1Gateway(lambda ctx: h1_ok())
        conn = Connection(gateway)
        conn.send(b"GET /a HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
        [ctx] = gateway.done
        self.assertEqual((ctx.status, ctx.method, ctx.path, ctx.route), (431, b"-", "-", None))
        self.assertTrue(ctx.request_id)
        gateway = H1Gateway(lambda ctx: h1_ok())
        conn = Connection(gateway)
        conn.send(b"NOT HTTP AT ALL\r\n\r\n")
        self.assertEqual([c.status for c in gateway.done], [400])
        gateway = H1Gateway(lambda ctx: h1_ok())
        conn = Connection(gateway)
        conn.send(b"GET /a HTTP/1.1\r\nHost")
        conn.clock.advance(gateway.config.server.limits.header_timeout)
        self.assertEqual([c.status for c in gateway.done], [408])
        self.assertEqual(self.gauge(gateway, "txgateway_requests_in_flight", "http/1.1"), 0)

    def test_gateway_errors_and_pipelined_requests(self) -> None:
        gateway = H1Gateway(lambda ctx: fail(NotFound()) if ctx.path == "/missing" else h1_ok())
        conn = Connection(gateway)
        conn.send(
            b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /missing HTTP/1.1\r\nHost: x\r\n\r\nGET /3 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        self.assertEqual([(c.path, c.status) for c in gateway.done], [("/1", 200), ("/missing", 404), ("/3", 200)])

    def test_pipelined_requests_left_behind_are_499(self) -> None:
        gateway = H1Gateway(lambda ctx: Deferred())
        conn = Connection(gateway)
        conn.send(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        conn.protocol.connectionLost()
        self.assertEqual(sorted((c.path, c.status) for c in gateway.done), [("/1", 499), ("/2", 499)])
        self.assertEqual(self.gauge(gateway, "txgateway_requests_in_flight", "http/1.1"), 0)


class HTTP2AccountingTests(SynchronousTestCase):
    def gauge(self, gateway: H2Gateway, name: str, protocol: str = "h2") -> float:
        return gateway.runtime.metrics.registry.get_sample_value(name, {"protocol": protocol}) or 0.0

    def test_streams_are_exchanges(self) -> None:
        def answer(ctx: RequestContext) -> Deferred[Response]:
            response = Response(200, [], BytesBody(b"hello h2"))
            if ctx.body is None:
                return succeed(response)
            sink = CollectingSink()
            ctx.body.deliverTo(sink)
            return sink.done.addCallback(lambda _: response)

        gateway = H2Gateway(answer)
        wire = Wire(gateway)
        self.assertEqual(self.gauge(gateway, "txgateway_connections_open"), 1)
        self.assertEqual(self.gauge(gateway, "txgateway_connections_open", "http/1.1"), 0)
        wire.request(1, request_headers(b"/a", method=b"POST"), body=b"abcdef")
        wire.request(3)
        self.assertEqual(
            [(c.status, c.bytes_in, c.bytes_out, c.protocol) for c in gateway.done],
            [(200, 6, 8, "h2"), (200, 0, 8, "h2")],
        )
        self.assertEqual(self.gauge(gateway, "txgateway_requests_in_flight"), 0)
        wire.detector.connectionLost(Failure(Exception("gone")))
        self.assertEqual(self.gauge(gateway, "txgateway_connections_open"), 0)

    def test_reset_stream_is_499(self) -> None:
        gateway = H2Gateway(lambda ctx: Deferred())
        wire = Wire(gateway)
        wire.request(1)
        self.assertEqual(self.gauge(gateway, "txgateway_requests_in_flight"), 1)
        wire.client.reset_stream(1)
        wire.pump()
        self.assertEqual([c.status for c in gateway.done], [499])
        self.assertEqual(self.gauge(gateway, "txgateway_requests_in_flight"), 0)

    def test_connection_lost_ends_every_stream_once(self) -> None:
        gateway = H2Gateway(lambda ctx: Deferred())
        wire = Wire(gateway)
        wire.request(1)
        wire.request(3)
        wire.detector.connectionLost(Failure(Exception("gone")))
        self.assertEqual(sorted(c.status for c in gateway.done), [499, 499])
        self.assertEqual(len(gateway.done), 2)

    def grpc_calls(self, gateway: H2Gateway, grpc_status: str) -> float:
        sample = gateway.runtime.metrics.registry.get_sample_value
        return sample("txgateway_grpc_calls_total", {"route": "", "grpc_status": grpc_status}) or 0.0

    def test_grpc_calls_by_grpc_status(self) -> None:
        body = ControlledBody()

        def answer(ctx: RequestContext) -> Deferred[Response]:
            if ctx.path == "/svc/Missing":
                return succeed(
                    Response(200, [(b"content-type", b"application/grpc"), (b"grpc-status", b"5")], BytesBody(b""))
                )
            if ctx.path == "/svc/Denied":
                return fail(Unauthorized())
            return succeed(Response(200, [(b"content-type", b"application/grpc")], body))

        gateway = H2Gateway(answer)
        wire = Wire(gateway)
        wire.request(1, request_headers(b"/svc/Missing", method=b"POST", extra=GRPC), body=b"")
        wire.request(3, request_headers(b"/svc/Denied", method=b"POST", extra=GRPC), body=b"")
        wire.request(5, request_headers(b"/svc/Ok", method=b"POST", extra=GRPC), body=b"")
        assert body.sink is not None
        body.trailers = [(b"grpc-status", b"0")]  # type: ignore[attr-defined]
        body.sink.write(b"\x00\x00\x00\x00\x00")
        body.sink.finish()
        wire.pump()
        self.assertEqual([c.status for c in gateway.done], [200, 200, 200])
        self.assertEqual(
            [self.grpc_calls(gateway, code) for code in ("0", "5", "16")],
            [1, 1, 1],  # OK, NOT_FOUND, UNAUTHENTICATED
        )

    def test_grpc_call_the_client_cancels(self) -> None:
        gateway = H2Gateway(lambda ctx: Deferred())
        wire = Wire(gateway)
        wire.request(1, request_headers(b"/svc/Slow", method=b"POST", extra=GRPC), body=b"")
        wire.client.reset_stream(1)
        wire.pump()
        self.assertEqual(self.grpc_calls(gateway, "1"), 1)  # CANCELLED


class FakeUpstreamSide:
    """The upstream WebSocket connection, as the relay sees it."""

    transport = None
    state = WebSocketProtocol.STATE_OPEN

    def __init__(self) -> None:
        self.peer: Any = None
        self.sent: list[bytes] = []

    def attach(self, peer: Any) -> None:
        self.peer = peer

    def sendMessage(self, payload: bytes, isBinary: bool = False) -> None:
        self.sent.append(payload)

    def sendCloseFrame(self, code: int | None = None, reasonUtf8: bytes | None = None, isReply: bool = False) -> None:
        self.state = WebSocketProtocol.STATE_CLOSED

    def sendClose(self, code: int | None = None, reason: str | None = None) -> None:
        self.state = WebSocketProtocol.STATE_CLOSED

    def dropConnection(self, abort: bool = False) -> None:
        self.state = WebSocketProtocol.STATE_CLOSED


class CollectingSink:
    """Takes a request body; ``done`` fires with it once it ended."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def finish(self) -> None:
        self.done.callback(b"".join(self.parts))

    def abort(self, reason: object) -> None:
        self.done.errback(Failure(Exception(str(reason))))


def client_frame(payload: bytes) -> bytes:
    """A masked text frame, as a client sends it (payload < 126 bytes)."""
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


class WebSocketAccountingTests(SynchronousTestCase):
    def test_one_exchange_per_connection_ending_at_close(self) -> None:
        upstream = FakeUpstreamSide()
        settings = WebSocketSettings(auto_ping_interval=0, open_handshake_timeout=0, idle_timeout=0)

        def upgrade(ctx: RequestContext) -> Deferred[Response]:
            counters = RelayCounters(gateway.runtime.metrics, "chat")
            return succeed(WebSocketUpgrade(upstream, None, settings, None, counters))  # type: ignore[arg-type]

        gateway = H1Gateway(upgrade)
        sample = gateway.runtime.metrics.registry.get_sample_value
        conn = Connection(gateway)
        key = base64.b64encode(os.urandom(16))
        conn.send(
            b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.assertIn(b"101 Switching Protocols", conn.output())
        self.assertEqual(gateway.done, [])  # open: not over yet
        self.assertEqual(sample("txgateway_connections_open", {"protocol": "websocket"}), 1)
        self.assertEqual(sample("txgateway_connections_open", {"protocol": "http/1.1"}), 0)
        self.assertEqual(sample("txgateway_requests_in_flight", {"protocol": "http/1.1"}), 0)
        self.assertEqual(sample("txgateway_websocket_connections_open", {"route": "chat"}), 1)
        conn.send(client_frame(b"hello") + client_frame(b"again"))
        self.assertEqual(upstream.sent, [b"hello", b"again"])
        upstream.peer.from_upstream(b"welcome!", False)
        conn.clock.advance(42)
        conn.protocol.connectionLost()
        [ctx] = gateway.done
        self.assertEqual((ctx.status, ctx.bytes_in, ctx.bytes_out, ctx.ended), (101, 10, 8, 42.0))
        self.assertEqual(sample("txgateway_connections_open", {"protocol": "websocket"}), 0)
        self.assertEqual(sample("txgateway_websocket_connections_open", {"route": "chat"}), 0)
        self.assertEqual(sample("txgateway_websocket_connections_total", {"route": "chat"}), 1)
        messages = "txgateway_websocket_messages_total"
        self.assertEqual(sample(messages, {"route": "chat", "direction": "client_to_upstream"}), 2)
        self.assertEqual(sample(messages, {"route": "chat", "direction": "upstream_to_client"}), 1)


class PipelineMetricsTests(MetricsTestCase):
    def test_rate_limit_decisions(self) -> None:
        statuses = [self.get("/limited/x") for _ in range(3)]
        self.assertEqual(statuses, [200, 200, 429])
        self.assertEqual(self.value("txgateway_ratelimit_decisions_total", route="limited", decision="allowed"), 2)
        self.assertEqual(self.value("txgateway_ratelimit_decisions_total", route="limited", decision="limited"), 1)
        self.assertEqual([r["rate_limit"] for r in self.harness.access_log.records()], ["allowed", "allowed", "limited"])

    def test_auth_failures_by_reason(self) -> None:
        expired = jwt.encode({"sub": "alice", "exp": NOW - 10}, SECRET, algorithm="HS256")
        self.assertEqual(self.get("/private/a"), 401)
        self.assertEqual(self.get("/private/a", ("authorization", f"Bearer {expired}")), 401)
        self.assertEqual(self.get("/private/a", ("authorization", "Bearer not.a.token")), 401)
        self.assertEqual(self.get("/private/a", ("x-api-key", "wrong")), 401)
        self.assertEqual(self.get("/admin/a", ("x-api-key", "key-1")), 403)
        self.assertEqual(self.get("/private/a", ("x-api-key", "key-1")), 200)
        self.assertEqual(self.get("/private/a", ("authorization", f"Bearer {self.token()}")), 200)
        failures = {
            (route, reason): self.value("txgateway_auth_failures_total", route=route, reason=reason)
            for route, reason in (
                ("private", "missing_token"),
                ("private", "token_expired"),
                ("private", "malformed_token"),
                ("private", "invalid_api_key"),
                ("admin", "insufficient_role"),
            )
        }
        self.assertEqual(set(failures.values()), {1})
        text = exposition(self.metrics).decode()
        self.assertEqual(text.count("txgateway_auth_failures_total{"), 5)

    def test_cache_outcomes_and_bytes(self) -> None:
        self.assertEqual(self.get("/cached/a"), 200)  # miss, stored
        self.assertGreater(self.value("txgateway_cache_stored_bytes"), 5)
        self.assertEqual(self.get("/cached/a"), 200)  # hit
        self.assertEqual(self.get("/cached/a"), 200)  # hit
        self.assertEqual(self.get("/cached/a", ("cache-control", "no-cache")), 200)  # bypass (refetch)
        self.harness.request("POST", "/cached/a", body=b"x")  # bypass
        for result, count in (("hit", 2), ("miss", 1), ("bypass", 2)):
            self.assertEqual(self.value("txgateway_cache_requests_total", route="cached", result=result), count, result)
        self.assertEqual(self.value("txgateway_cache_served_bytes_total", route="cached"), 10)
        self.assertEqual(self.value("txgateway_cache_stored_bytes"), 0)  # the POST invalidated the entry
        self.assertEqual(
            [r["cache"] for r in self.harness.access_log.records()], ["miss", "hit", "hit", "bypass", "bypass"]
        )
        self.clock.advance(61)
        self.assertEqual(self.get("/cached/a"), 200)  # expired: dropped, fetched again
        self.assertEqual(self.value("txgateway_cache_requests_total", route="cached", result="miss"), 2)

    def test_upstream_errors_retries_breaker_and_ejections(self) -> None:
        self.assertEqual(self.get("/flaky/1"), 502)  # both instances refuse: 2 tries, 1 retry
        tries = {
            address: self.value("txgateway_upstream_errors_total", upstream="flaky", address=address, kind="connect")
            for address in ("10.0.0.2:9000", "10.0.0.3:9000")
        }
        self.assertEqual(tries, {"10.0.0.2:9000": 1, "10.0.0.3:9000": 1})
        self.assertEqual(self.value("txgateway_retries_total", route="flaky", upstream="flaky"), 1)
        self.assertEqual(self.value("txgateway_circuit_breaker_state", upstream="flaky"), 0)
        self.assertEqual(self.get("/flaky/2"), 502)  # second failure: the breaker opens
        self.assertEqual(self.value("txgateway_circuit_breaker_state", upstream="flaky"), 2)
        self.assertEqual(self.value("txgateway_circuit_breaker_transitions_total", upstream="flaky", state="open"), 1)
        # Two consecutive failures each: passive health ejected one (never the last).
        healthy = [
            self.value("txgateway_upstream_instance_healthy", upstream="flaky", address=address)
            for address in ("10.0.0.2:9000", "10.0.0.3:9000")
        ]
        self.assertEqual(sorted(healthy), [0, 1])
        self.assertEqual(self.value("txgateway_upstream_instance_healthy", upstream="users", address="10.0.0.1:9000"), 1)
        self.assertEqual(self.get("/flaky/3"), 503)  # refused by the open breaker: no upstream try
        self.assertEqual(sum(tries.values()) + 2, sum(
            self.value("txgateway_upstream_errors_total", upstream="flaky", address=address, kind="connect")
            for address in ("10.0.0.2:9000", "10.0.0.3:9000")
        ))
        self.clock.advance(30)
        self.assertEqual(self.value("txgateway_upstream_instance_healthy", upstream="flaky", address="10.0.0.2:9000"), 1)
        self.assertEqual(self.value("txgateway_upstream_instance_healthy", upstream="flaky", address="10.0.0.3:9000"), 1)

    def test_upstream_duration_and_5xx(self) -> None:
        self.get("/users/1")
        self.get("/users/500")
        labels = {"upstream": "users", "address": "10.0.0.1:9000"}
        self.assertEqual(self.value("txgateway_upstream_request_duration_seconds_count", **labels), 2)
        self.assertEqual(self.value("txgateway_upstream_errors_total", kind="status_5xx", **labels), 1)
        records = self.harness.access_log.records()
        self.assertEqual([r["upstream"] for r in records], ["10.0.0.1:9000"] * 2)
        self.assertEqual([r["upstream_ms"] for r in records], [0.0, 0.0])


    def test_routes_to_one_upstream_share_its_duration_series(self) -> None:
        # Two routes (two forwarders) to the same upstream instance: one
        # series, one batched wrapper behind it, both routes' tries in it.
        self.get("/users/1")
        self.get("/files/a")
        labels = {"upstream": "users", "address": "10.0.0.1:9000"}
        self.assertEqual(self.value("txgateway_upstream_request_duration_seconds_count", **labels), 2)
        child = self.metrics.upstream_duration.labels("users", "10.0.0.1:9000")
        self.assertIs(self.metrics.batched_histogram(child), self.metrics.batched_histogram(child))
        other = self.metrics.upstream_duration.labels("users", "10.0.0.9:9000")
        self.assertIsNot(self.metrics.batched_histogram(other), self.metrics.batched_histogram(child))

class MiddleRandom(random.Random):
    """Jitter in the middle: checks exactly every ``interval``, the first after half of it."""

    def random(self) -> float:
        return 0.5


class ActiveHealthMetricsTests(SynchronousTestCase):
    def test_health_check_results_and_instance_gauge(self) -> None:
        statuses = {"10.0.0.1": 200, "10.0.0.2": 503}

        def health(request: ReceivedRequest) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            return statuses[request.host], [], b""

        clock = Clock()
        metrics = GatewayMetrics()
        config = parse_config(
            """
upstreams:
  users:
    servers: ["10.0.0.1:80", "10.0.0.2:80"]
    health_check: {enabled: true, path: /healthz, interval: 5, timeout: 1, healthy_threshold: 1, unhealthy_threshold: 2}
"""
        )
        upstream = Upstream(config.upstreams["users"], MemoryUpstream(health), clock)
        watch = UpstreamHealth(upstream, clock, MiddleRandom(), metrics=metrics)
        watch.start()
        self.addCleanup(watch.stop)
        sample = metrics.registry.get_sample_value

        def checks(host: str, result: str) -> float:
            return sample("txgateway_health_checks_total", {"upstream": "users", "address": host, "result": result}) or 0

        def healthy(host: str) -> float | None:
            return sample("txgateway_upstream_instance_healthy", {"upstream": "users", "address": host})

        self.assertEqual((healthy("10.0.0.1:80"), healthy("10.0.0.2:80")), (1, 1))
        clock.advance(2.5)
        self.assertEqual((checks("10.0.0.1:80", "success"), checks("10.0.0.2:80", "failure")), (1, 1))
        self.assertEqual(healthy("10.0.0.2:80"), 1)  # one failure: below the threshold
        clock.advance(5)
        self.assertEqual((checks("10.0.0.1:80", "success"), checks("10.0.0.2:80", "failure")), (2, 2))
        self.assertEqual((healthy("10.0.0.1:80"), healthy("10.0.0.2:80")), (1, 0))
        statuses["10.0.0.2"] = 200
        clock.advance(5)
        self.assertEqual((checks("10.0.0.2:80", "success"), healthy("10.0.0.2:80")), (1, 1))


class ExpositionTests(SynchronousTestCase):
    def test_protocol_gauges_exist_before_any_traffic(self) -> None:
        text = exposition(GatewayMetrics()).decode()
        for protocol in ("http/1.1", "h2", "websocket"):
            self.assertIn(f'txgateway_requests_in_flight{{protocol="{protocol}"}} 0.0', text)
            self.assertIn(f'txgateway_connections_open{{protocol="{protocol}"}} 0.0', text)

    def test_gateway_server_factory_counts_h1_connections(self) -> None:
        clock = Clock()
        runtime = Runtime(clock, clock)
        config = parse_config("observability: {access_log: {enabled: false}}\n")
        gateway = Gateway(config, lambda _config: MemoryUpstream(answer), runtime)
        factory = HTTP11ServerFactory(lambda: gateway, clock)
        protocols = [factory.buildProtocol(None) for _ in range(3)]
        for protocol in protocols:
            assert isinstance(protocol, HTTP11ServerProtocol)
            protocol.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1)))
        sample = runtime.metrics.registry.get_sample_value
        self.assertEqual(sample("txgateway_connections_open", {"protocol": "http/1.1"}), 3)
        for protocol in protocols:
            assert protocol is not None
            protocol.connectionLost()
        self.assertEqual(sample("txgateway_connections_open", {"protocol": "http/1.1"}), 0)
