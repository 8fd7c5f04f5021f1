"""The downstream HTTP/2 protocol and protocol detection, on fake wires and a fake clock.

The client is a real ``h2`` client connection (or hand-made frames, for what
no well-behaved client sends); the gateway behind the protocol is scripted,
so each test shows one wire behaviour: multiplexing, flow control both ways,
trailers, gRPC errors and deadlines, cancellation, and each protection.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    InformationalResponseReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, PingFrame, SettingsFrame
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from txgateway.body import BytesBody
from txgateway.config.loader import parse_config
from txgateway.config.model import GatewayConfig, HTTP2Config, Limits, ServerConfig
from txgateway.errors import NotFound, PayloadTooLarge, RateLimited, Unauthorized
from txgateway.interfaces import IBody, IBodySink
from txgateway.messages import Response
from txgateway.pipeline.context import RequestContext
from txgateway.pipeline.request_id import RequestIds
from txgateway.protocols.detect import GatewayServerFactory, ProtocolDetector
from txgateway.protocols.http1 import HTTP11ServerProtocol
from txgateway.protocols.http2 import CONNECTION_WINDOW, PREFACE, STREAM_WINDOW, HTTP2ServerProtocol, grpc_timeout
from txgateway.runtime import Runtime
from txgateway.testing import MemoryUpstream, ReceivedRequest

Headers = list[tuple[bytes, bytes]]


class ScriptedGateway:
    """Answers each request with whatever ``answer(ctx)`` returns; enforces the body limit like Gateway."""

    def __init__(
        self,
        answer: Callable[[RequestContext], Deferred[Response]],
        limits: Limits = Limits(),
        http2: HTTP2Config = HTTP2Config(),
    ) -> None:
        self.config = GatewayConfig(server=ServerConfig(limits=limits, http2=http2))
        self.request_ids = RequestIds("err")
        self.answer = answer
        self.seen: list[RequestContext] = []
        self.runtime = Runtime(None)
        #: Every finished exchange, as the protocol reported it (``exchange_done``).
        self.done: list[RequestContext] = []

    def exchange_done(self, ctx: RequestContext) -> None:
        self.done.append(ctx)

    def handle(self, ctx: RequestContext) -> Deferred[Response]:
        ctx.request_id = f"req-{len(self.seen) + 1}"
        self.seen.append(ctx)
        if ctx.body is not None:
            limit = self.config.server.limits.max_body_bytes
            if ctx.body.length is not None and ctx.body.length > limit:
                return fail(PayloadTooLarge())
            ctx.body.max_bytes = limit
        return self.answer(ctx)


@implementer(IBodySink)
class CollectingSink:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.finished = False
        self.aborted: Any = None

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def finish(self) -> None:
        self.finished = True

    def abort(self, reason: object) -> None:
        self.aborted = reason


@implementer(IBody)
class ControlledBody:
    """A response body the test feeds by hand; records producer calls."""

    def __init__(self, length: int | None = None) -> None:
        self.length = length
        self.trailers: Headers = []
        self.sink: IBodySink | None = None
        self.paused = False
        self.pauses = 0
        self.stopped = False

    def deliverTo(self, sink: IBodySink) -> None:
        self.sink = sink

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


def ok(body: bytes = b"hello", status: int = 200) -> Deferred[Response]:
    return succeed(Response(status, [(b"content-type", b"text/plain")], BytesBody(body)))


def waiting() -> Callable[[RequestContext], Deferred[Response]]:
    return lambda ctx: Deferred()


def request_headers(
    path: bytes = b"/", method: bytes = b"GET", authority: bytes = b"gw.test", extra: Sequence[tuple[bytes, bytes]] = ()
) -> Headers:
    return [(b":method", method), (b":path", path), (b":scheme", b"http"), (b":authority", authority), *extra]


GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


class Wire:
    """An h2 client connection to the gateway's protocol over a StringTransport.

    ``pump()`` moves bytes both ways until neither side has more; received
    events collect in ``events``.  The client acknowledges received DATA only
    when ``auto_ack`` (else its window stays closed, like a slow reader).
    """

    def __init__(
        self,
        gateway: ScriptedGateway,
        clock: Clock | None = None,
        factory: GatewayServerFactory | None = None,
        start: bool = True,
    ) -> None:
        self.clock = clock or Clock()
        self.factory = factory or GatewayServerFactory(lambda: gateway, self.clock)  # type: ignore[arg-type,return-value]
        protocol = self.factory.buildProtocol(None)
        assert isinstance(protocol, ProtocolDetector)
        self.detector = protocol
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(self.transport)
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        self.events: list[Event] = []
        self.auto_ack = True
        self.closed_by: ConnectionTerminated | None = None
        if start:
            self.pump()

    @property
    def server(self) -> HTTP2ServerProtocol:
        protocol = self.detector._protocol
        assert isinstance(protocol, HTTP2ServerProtocol)
        return protocol

    def send_raw(self, data: bytes) -> None:
        self.detector.dataReceived(data)

    def pump(self) -> None:
        for _ in range(100):
            moved = False
            data = self.client.data_to_send()
            if data and not self.transport.disconnected:
                self.send_raw(data)
                moved = True
            out = self.transport.value()
            self.transport.clear()
            if out and self.closed_by is None:
                for event in self.client.receive_data(out):
                    self.events.append(event)
                    if isinstance(event, DataReceived) and self.auto_ack:
                        self.client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    if isinstance(event, ConnectionTerminated):
                        self.closed_by = event
                moved = True
            if not moved:
                return
        raise AssertionError("the wire never went quiet")

    def request(
        self, stream_id: int, headers: Headers | None = None, body: bytes | None = None, trailers: Headers | None = None
    ) -> None:
        self.client.send_headers(stream_id, headers or request_headers(), end_stream=body is None and not trailers)
        if body is not None:
            if body:
                self.send_body(stream_id, body, end=not trailers)
            elif not trailers:
                self.client.end_stream(stream_id)
        if trailers:
            self.client.send_headers(stream_id, trailers, end_stream=True)
        self.pump()

    def send_body(self, stream_id: int, data: bytes, end: bool = False) -> None:
        """``data`` in frames of at most 16 KiB."""
        for at in range(0, len(data), 16384):
            self.client.send_data(stream_id, data[at : at + 16384], end_stream=end and at + 16384 >= len(data))

    def of(self, stream_id: int, kind: type[Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and getattr(e, "stream_id", None) == stream_id]

    def head(self, stream_id: int) -> dict[bytes, bytes]:
        [response] = self.of(stream_id, ResponseReceived)
        return dict(response.headers)

    def body(self, stream_id: int) -> bytes:
        return b"".join(e.data for e in self.of(stream_id, DataReceived))

    def ended(self, stream_id: int) -> bool:
        return bool(self.of(stream_id, StreamEnded))

    def reset_code(self, stream_id: int) -> int | None:
        resets = self.of(stream_id, StreamReset)
        return resets[0].error_code if resets else None

    def goaway(self) -> int | None:
        return None if self.closed_by is None else self.closed_by.error_code


def frames(*items: Any) -> bytes:
    return b"".join(frame.serialize() for frame in items)


def started(wire: Wire) -> None:
    """The preface and SETTINGS exchange, by hand (for tests that send raw frames)."""
    wire.send_raw(PREFACE + frames(SettingsFrame(0)))


class RequestTests(SynchronousTestCase):
    def test_get(self) -> None:
        gateway = ScriptedGateway(lambda ctx: ok(b"hello h2"))
        wire = Wire(gateway)
        wire.request(1, request_headers(b"/a/b?x=1&y=2", extra=[(b"x-a", b"1"), (b"x-a", b"2")]))
        head = wire.head(1)
        self.assertEqual((head[b":status"], head[b"content-length"]), (b"200", b"8"))
        self.assertEqual(wire.body(1), b"hello h2")
        self.assertTrue(wire.ended(1))
        [ctx] = gateway.seen
        self.assertEqual((ctx.method, ctx.path, ctx.query, ctx.host), (b"GET", "/a/b", b"x=1&y=2", "gw.test"))
        self.assertEqual((ctx.version, ctx.protocol, ctx.scheme, ctx.client_ip), ((2, 0), "h2", b"http", "127.0.0.1"))
        self.assertEqual([v for n, v in ctx.headers if n == b"x-a"], [b"1", b"2"])
        self.assertFalse([n for n, _ in ctx.headers if n.startswith(b":")])
        # :authority becomes Host for HTTP/1.1 upstreams.
        self.assertEqual(ctx.header(b"host"), b"gw.test")
        self.assertFalse(wire.transport.disconnecting)

    def test_cookie_crumbs_joined(self) -> None:
        gateway = ScriptedGateway(lambda ctx: ok())
        wire = Wire(gateway)
        wire.request(1, request_headers(extra=[(b"cookie", b"a=1"), (b"cookie", b"b=2")]))
        self.assertEqual([v for n, v in gateway.seen[0].headers if n == b"cookie"], [b"a=1; b=2"])

    def test_host_with_authority_not_doubled(self) -> None:
        gateway = ScriptedGateway(lambda ctx: ok())
        wire = Wire(gateway)
        wire.request(1, request_headers(authority=b"a.test", extra=[(b"host", b"a.test")]))
        ctx = gateway.seen[0]
        self.assertEqual((ctx.host, [v for n, v in ctx.headers if n == b"host"]), ("a.test", [b"a.test"]))

    def test_host_without_authority(self) -> None:
        gateway = ScriptedGateway(lambda ctx: ok())
        wire = Wire(gateway)
        wire.request(1, [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b"host", b"h.test")])
        self.assertEqual(gateway.seen[0].host, "h.test")

    def test_https_scheme_from_factory(self) -> None:
        gateway = ScriptedGateway(lambda ctx: ok())
        clock = Clock()
        factory = GatewayServerFactory(lambda: gateway, clock, scheme=b"https")  # type: ignore[arg-type,return-value]
        wire = Wire(gateway, clock, factory)
        wire.request(1)
        self.assertEqual(gateway.seen[0].scheme, b"https")

    def test_streams_are_multiplexed(self) -> None:
        pending: dict[str, Deferred[Response]] = {}

        def answer(ctx: RequestContext) -> Deferred[Response]:
            pending[ctx.path] = Deferred()
            return pending[ctx.path]

        wire = Wire(ScriptedGateway(answer))
        for stream_id, path in ((1, b"/one"), (3, b"/two"), (5, b"/three")):
            wire.client.send_headers(stream_id, request_headers(path), end_stream=True)
        wire.pump()
        # All three run at once; answered out of order, each arrives on its stream.
        self.assertEqual(sorted(pending), ["/one", "/three", "/two"])
        pending["/three"].callback(Response(200, [], BytesBody(b"3")))
        pending["/one"].callback(Response(201, [], BytesBody(b"1")))
        wire.pump()
        self.assertEqual((wire.body(5), wire.body(1), wire.head(1)[b":status"]), (b"3", b"1", b"201"))
        self.assertFalse(wire.of(3, ResponseReceived))
        pending["/two"].callback(Response(202, [], BytesBody(b"2")))
        wire.pump()
        self.assertEqual(wire.body(3), b"2")

    def test_head_204_304_have_no_data(self) -> None:
        statuses = {"/head": 200, "/204": 204, "/304": 304}
        wire = Wire(ScriptedGateway(lambda ctx: ok(b"entity", statuses[ctx.path])))
        wire.request(1, request_headers(b"/head", method=b"HEAD"))
        wire.request(3, request_headers(b"/204"))
        wire.request(5, request_headers(b"/304"))
        for stream_id, status in ((1, b"200"), (3, b"204"), (5, b"304")):
            self.assertEqual(wire.head(stream_id)[b":status"], status)
            self.assertEqual(wire.of(stream_id, DataReceived), [])
            # END_STREAM rides on the HEADERS frame.
            [response] = wire.of(stream_id, ResponseReceived)
            self.assertIsNotNone(response.stream_ended)

    def test_connection_specific_response_headers_dropped(self) -> None:
        headers = [
            (b"connection", b"close"),
            (b"keep-alive", b"5"),
            (b"transfer-encoding", b"chunked"),
            (b"x-ok", b"1"),
        ]
        wire = Wire(ScriptedGateway(lambda ctx: succeed(Response(200, headers, BytesBody(b"x")))))
        wire.request(1)
        head = wire.head(1)
        self.assertEqual(head[b"x-ok"], b"1")
        for name in (b"connection", b"keep-alive", b"transfer-encoding"):
            self.assertNotIn(name, head)

    def test_streamed_body_without_length_ends_with_empty_data(self) -> None:
        body = ControlledBody(length=None)
        wire = Wire(ScriptedGateway(lambda ctx: succeed(Response(200, [], body))))
        wire.request(1)
        self.assertNotIn(b"content-length", wire.head(1))
        assert body.sink is not None
        body.sink.write(b"piece-1 ")
        wire.pump()
        # Streamed as it comes, not held back.
        self.assertEqual(wire.body(1), b"piece-1 ")
        body.sink.write(b"piece-2")
        body.sink.finish()
        wire.pump()
        self.assertEqual(wire.body(1), b"piece-1 piece-2")
        self.assertTrue(wire.ended(1))

    def test_known_length_ends_on_last_data(self) -> None:
        body = ControlledBody(length=6)
        wire = Wire(ScriptedGateway(lambda ctx: succeed(Response(200, [], body))))
        wire.request(1)
        assert body.sink is not None
        body.sink.write(b"abc")
        body.sink.write(b"def")
        body.sink.finish()
        wire.pump()
        data = wire.of(1, DataReceived)
        self.assertEqual(b"".join(e.data for e in data), b"abcdef")
        self.assertIsNotNone(data[-1].stream_ended)
        self.assertEqual(wire.head(1)[b"content-length"], b"6")

    def test_expect_continue(self) -> None:
        gateway = ScriptedGateway(waiting())
        wire = Wire(gateway)
        wire.client.send_headers(1, request_headers(method=b"PUT", extra=[(b"expect", b"100-continue")]))
        wire.pump()
        self.assertEqual(wire.of(1, InformationalResponseReceived), [])
        body = gateway.seen[0].body
        assert body is not None
        body.deliverTo(CollectingSink())
        wire.pump()
        [interim] = wire.of(1, InformationalResponseReceived)
        self.assertEqual(dict(interim.headers)[b":status"], b"100")


class ErrorTests(SynchronousTestCase):
    def test_gateway_error_is_json(self) -> None:
        wire = Wire(ScriptedGateway(lambda ctx: fail(NotFound())))
        wire.request(1, request_headers(b"/nope"))
        head = wire.head(1)
        self.assertEqual((head[b":status"], head[b"x-request-id"]), (b"404", b"req-1"))
        self.assertEqual(json.loads(wire.body(1))["error"], "not_found")
        self.assertFalse(wire.transport.disconnecting)

    def test_grpc_errors_are_trailers_only(self) -> None:
        errors = {"/no": NotFound(), "/auth": Unauthorized(), "/slow": RateLimited(headers=[(b"retry-after", b"3")])}
        wire = Wire(ScriptedGateway(lambda ctx: fail(errors[ctx.path])))
        for stream_id, path, status in ((1, b"/no", b"12"), (3, b"/auth", b"16"), (5, b"/slow", b"8")):
            wire.request(stream_id, request_headers(path, method=b"POST", extra=GRPC), body=b"\0\0\0\0\0")
            [response] = wire.of(stream_id, ResponseReceived)
            head = dict(response.headers)
            self.assertEqual((head[b":status"], head[b"grpc-status"]), (b"200", status))
            self.assertEqual(head[b"content-type"], b"application/grpc")
            # One HEADERS frame with END_STREAM, no DATA: gRPC's Trailers-Only.
            self.assertIsNotNone(response.stream_ended)
            self.assertEqual(wire.of(stream_id, DataReceived), [])
        self.assertEqual(wire.head(5)[b"retry-after"], b"3")

    def test_unexpected_exception_is_500_without_details(self) -> None:
        def boom(ctx: RequestContext) -> Deferred[Response]:
            raise ZeroDivisionError("secret detail")

        wire = Wire(ScriptedGateway(boom))
        wire.request(1)
        self.assertEqual(wire.head(1)[b":status"], b"500")
        self.assertNotIn(b"secret", wire.body(1))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_unexpected_failure_on_grpc_is_internal(self) -> None:
        wire = Wire(ScriptedGateway(lambda ctx: fail(ZeroDivisionError("x"))))
        wire.request(1, request_headers(method=b"POST", extra=GRPC), body=b"")
        self.assertEqual(wire.head(1)[b"grpc-status"], b"13")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_connect_is_not_implemented(self) -> None:
        gateway = ScriptedGateway(lambda ctx: ok())
        wire = Wire(gateway)
        wire.request(1, [(b":method", b"CONNECT"), (b":authority", b"x.test:443")])
        self.assertEqual(wire.head(1)[b":status"], b"501")
        self.assertEqual(gateway.seen, [])


class GrpcDeadlineTests(SynchronousTestCase):
    def test_grpc_timeout_sets_deadline(self) -> None:
        clock = Clock()
        clock.advance(1000)
        gateway = ScriptedGateway(waiting())
        wire = Wire(gateway, clock)
        wire.request(1, request_headers(method=b"POST", extra=[*GRPC, (b"grpc-timeout", b"250m")]))
        ctx = gateway.seen[0]
        self.assertAlmostEqual(ctx.deadline or 0, 1000.25)
        # The header itself still goes on to the upstream.
        self.assertEqual(ctx.header(b"grpc-timeout"), b"250m")

    def test_units(self) -> None:
        self.assertEqual(
            [grpc_timeout(v) for v in (b"1H", b"2M", b"5S", b"100m", b"7u", b"9n")],
            [3600.0, 120.0, 5.0, 0.1, 7e-6, 9e-9],
        )
        for bad in (b"", b"S", b"10", b"10x", b"123456789S", b"-1S"):
            self.assertIsNone(grpc_timeout(bad), bad)

    def test_no_header_no_deadline(self) -> None:
        gateway = ScriptedGateway(waiting())
        Wire(gateway).request(1)
        self.assertIsNone(gateway.seen[0].deadline)


class TrailerTests(SynchronousTestCase):
    def test_response_trailers_sent_as_final_headers(self) -> None:
        body = ControlledBody(length=None)
        wire = Wire(ScriptedGateway(lambda ctx: succeed(Response(200, [(b"content-type", b"application/grpc")], body))))
        wire.request(1, request_headers(method=b"POST", extra=GRPC), body=b"\0\0\0\0\0")
        assert body.sink is not None
        body.sink.write(b"\0\0\0\0\x02hi")
        body.trailers = [(b"grpc-status", b"0"), (b"grpc-message", b""), (b"x-trailing", b"t")]
        body.sink.finish()
        wire.pump()
        self.assertEqual(wire.body(1), b"\0\0\0\0\x02hi")
        [trailers] = wire.of(1, TrailersReceived)
        self.assertEqual(dict(trailers.headers)[b"grpc-status"], b"0")
        self.assertEqual(dict(trailers.headers)[b"x-trailing"], b"t")
        self.assertIsNotNone(trailers.stream_ended)
        # No DATA carried END_STREAM: the trailers did.
        self.assertTrue(all(e.stream_ended is None for e in wire.of(1, DataReceived)))

    def test_upstream_trailers_only_stays_one_headers_frame(self) -> None:
        head = [(b"content-type", b"application/grpc"), (b"grpc-status", b"5"), (b"grpc-message", b"not found")]
        wire = Wire(ScriptedGateway(lambda ctx: succeed(Response(200, head, BytesBody(b"")))))
        wire.request(1, request_headers(method=b"POST", extra=GRPC), body=b"\0\0\0\0\0")
        [response] = wire.of(1, ResponseReceived)
        self.assertEqual(dict(response.headers)[b"grpc-status"], b"5")
        self.assertIsNotNone(response.stream_ended)
        self.assertEqual(wire.of(1, DataReceived), [])

    def test_request_trailers_stored_on_body(self) -> None:
        gateway = ScriptedGateway(waiting())
        wire = Wire(gateway)
        wire.request(1, request_headers(method=b"POST", extra=GRPC), body=b"abc", trailers=[(b"x-checksum", b"42")])
        body = gateway.seen[0].body
        assert body is not None
        sink = CollectingSink()
        body.deliverTo(sink)
        self.assertEqual((b"".join(sink.data), sink.finished), (b"abc", True))
        self.assertEqual(body.trailers, [(b"x-checksum", b"42")])


class RequestFlowControlTests(SynchronousTestCase):
    def test_window_reopens_only_as_consumed(self) -> None:
        gateway = ScriptedGateway(waiting())
        wire = Wire(gateway)
        wire.client.send_headers(1, request_headers(method=b"POST"))
        wire.send_body(1, b"x" * STREAM_WINDOW)
        wire.pump()
        # Nobody consumes it yet: the client's window stays closed.
        self.assertEqual(wire.client.local_flow_control_window(1), 0)
        body = gateway.seen[0].body
        assert body is not None
        sink = CollectingSink()
        body.deliverTo(sink)
        wire.pump()
        self.assertEqual(sum(map(len, sink.data)), STREAM_WINDOW)
        # Reopened (h2 batches WINDOW_UPDATEs: at least half the window).
        self.assertGreaterEqual(wire.client.local_flow_control_window(1), STREAM_WINDOW // 2)

    def test_paused_consumer_closes_the_window(self) -> None:
        gateway = ScriptedGateway(waiting())
        wire = Wire(gateway)
        wire.client.send_headers(1, request_headers(method=b"POST"))
        wire.pump()
        body = gateway.seen[0].body
        assert body is not None
        sink = CollectingSink()
        body.deliverTo(sink)
        body.pauseProducing()  # the upstream socket is full
        window = wire.client.local_flow_control_window(1)
        wire.send_body(1, b"y" * window)
        wire.pump()
        self.assertEqual(sink.data, [])
        self.assertEqual(wire.client.local_flow_control_window(1), 0)
        body.resumeProducing()
        wire.pump()
        self.assertEqual(sum(map(len, sink.data)), window)
        # Reopened (in WINDOW_UPDATE batches of at least half the window).
        self.assertGreaterEqual(wire.client.local_flow_control_window(1), STREAM_WINDOW // 2)

    def test_buffering_bounded_by_connection_window(self) -> None:
        gateway = ScriptedGateway(waiting())
        wire = Wire(gateway)
        self.assertEqual(wire.client.outbound_flow_control_window, CONNECTION_WINDOW)
        sent = 0
        for stream_id in range(1, 2 * (CONNECTION_WINDOW // STREAM_WINDOW) + 2, 2):
            wire.client.send_headers(stream_id, request_headers(method=b"POST"))
            room = wire.client.local_flow_control_window(stream_id)
            if room:
                wire.send_body(stream_id, b"z" * room)
                sent += room
            wire.pump()
        # Nothing consumed: the client cannot send past the connection window.
        self.assertEqual(sent, CONNECTION_WINDOW)
        self.assertEqual(wire.client.outbound_flow_control_window, 0)

    def test_body_over_limit_is_413_and_reset(self) -> None:
        gateway = ScriptedGateway(waiting(), Limits(max_body_bytes=1000))
        wire = Wire(gateway)
        wire.client.send_headers(1, request_headers(method=b"POST"))
        wire.pump()
        body = gateway.seen[0].body
        assert body is not None
        sink = CollectingSink()
        body.deliverTo(sink)
        wire.send_body(1, b"a" * 1001)
        wire.pump()
        self.assertEqual(wire.head(1)[b":status"], b"413")
        self.assertEqual(json.loads(wire.body(1))["error"], "payload_too_large")
        self.assertIsNotNone(sink.aborted)
        # What the client sends meanwhile is drained (and its window handed
        # back); past a window's worth it is told to stop with RST_STREAM(NO_ERROR).
        wire.send_body(1, b"a" * (STREAM_WINDOW - 2000))
        wire.pump()
        self.assertIsNone(wire.reset_code(1))
        wire.send_body(1, b"a" * 3000)
        wire.pump()
        self.assertEqual(wire.reset_code(1), ErrorCodes.NO_ERROR)
        # The connection's window was handed back: another stream can still upload.
        wire.request(3, request_headers(method=b"POST"), body=b"b" * 500)
        self.assertEqual(len(gateway.seen), 2)
        self.assertFalse(wire.transport.disconnecting)

    def test_client_that_stops_after_early_answer_is_not_reset(self) -> None:
        wire = Wire(ScriptedGateway(lambda ctx: fail(NotFound())))
        wire.client.send_headers(1, request_headers(method=b"POST"))
        wire.send_body(1, b"a" * 1000)
        wire.pump()
        self.assertEqual(wire.head(1)[b":status"], b"404")
        wire.client.end_stream(1)
        wire.pump()
        self.assertIsNone(wire.reset_code(1))
        self.assertFalse(wire.transport.disconnecting)

    def test_declared_length_over_limit_is_413(self) -> None:
        wire = Wire(ScriptedGateway(waiting(), Limits(max_body_bytes=10)))
        wire.client.send_headers(1, request_headers(method=b"POST", extra=[(b"content-length", b"11")]))
        wire.pump()
        self.assertEqual(wire.head(1)[b":status"], b"413")


class ResponseFlowControlTests(SynchronousTestCase):
    def test_closed_client_window_pauses_body_until_window_update(self) -> None:
        body = ControlledBody(length=None)
        wire = Wire(ScriptedGateway(lambda ctx: succeed(Response(200, [], body))))
        wire.auto_ack = False
        wire.request(1)
        assert body.sink is not None
        body.sink.write(b"a" * 50_000)
        wire.pump()
        self.assertFalse(body.paused)
        body.sink.write(b"b" * 50_000)
        wire.pump()
        # 65535 is the client's default window: the rest waits, the body is paused.
        self.assertEqual(len(wire.body(1)), 65535)
        self.assertTrue(body.paused)
        wire.client.acknowledge_received_data(65535, 1)
        wire.client.increment_flow_control_window(40_000, 1)
        wire.client.increment_flow_control_window(40_000)
        wire.pump()
        self.assertEqual(len(wire.body(1)), 100_000)
        self.assertFalse(body.paused)
        body.sink.finish()
        wire.pump()
        self.assertTrue(wire.ended(1))

    def test_frames_respect_max_frame_size(self) -> None:
        wire = Wire(ScriptedGateway(lambda ctx: ok(b"q" * 40_000)))
        wire.request(1)
        sizes = [len(e.data) for e in wire.of(1, DataReceived)]
        self.assertEqual(sum(sizes), 40_000)
        self.assertLessEqual(max(sizes), 16384)

    def test_full_socket_pauses_every_response_body(self) -> None:
        bodies = [ControlledBody(), ControlledBody()]
        wire = Wire(ScriptedGateway(lambda ctx: succeed(Response(200, [], bodies[int(ctx.path[1:])]))))
        wire.request(1, request_headers(b"/0"))
        wire.request(3, request_headers(b"/1"))
        producer = wire.transport.producer
        self.assertTrue(wire.transport.streaming)
        producer.pauseProducing()
        self.assertEqual([b.paused for b in bodies], [True, True])
        producer.resumeProducing()
        self.assertEqual([b.paused for b in bodies], [False, False])

    def test_response_body_abort_resets_only_that_stream(self) -> None:
        bodies = [ControlledBody(), ControlledBody()]
        wire = Wire(ScriptedGateway(lambda ctx: succeed(Response(200, [], bodies[int(ctx.path[1:])]))))
        wire.request(1, request_headers(b"/0"))
        wire.request(3, request_headers(b"/1"))
        for body in bodies:
            assert body.sink is not None
            body.sink.write(b"partial")
        assert bodies[0].sink is not None and bodies[1].sink is not None
        bodies[0].sink.abort(Exception("upstream reset"))
        bodies[1].sink.finish()
        wire.pump()
        self.assertEqual(wire.reset_code(1), ErrorCodes.INTERNAL_ERROR)
        self.assertFalse(wire.ended(1))
        self.assertEqual((wire.body(3), wire.ended(3)), (b"partial", True))
        self.assertFalse(wire.transport.disconnecting)


class CancellationTests(SynchronousTestCase):
    def test_client_reset_cancels_pipeline(self) -> None:
        cancelled = []
        wire = Wire(ScriptedGateway(lambda ctx: Deferred(lambda _: cancelled.append(ctx.path))))
        wire.request(1, request_headers(b"/a"))
        wire.request(3, request_headers(b"/b"))
        wire.client.reset_stream(1, ErrorCodes.CANCEL)
        wire.pump()
        self.assertEqual(cancelled, ["/a"])

    def test_client_reset_stops_response_body_and_aborts_upload(self) -> None:
        body = ControlledBody()
        gateway = ScriptedGateway(lambda ctx: succeed(Response(200, [], body)))
        wire = Wire(gateway)
        wire.client.send_headers(1, request_headers(method=b"POST"))
        wire.client.send_data(1, b"part")
        wire.pump()
        request_body = gateway.seen[0].body
        assert request_body is not None
        sink = CollectingSink()
        request_body.deliverTo(sink)
        wire.client.reset_stream(1, ErrorCodes.CANCEL)
        wire.pump()
        self.assertTrue(body.stopped)
        self.assertIsNotNone(sink.aborted)

    def test_client_goaway_cancels_streams_and_closes(self) -> None:
        cancelled = []
        wire = Wire(ScriptedGateway(lambda ctx: Deferred(lambda _: cancelled.append(True))))
        wire.request(1)
        wire.client.close_connection()
        wire.pump()
        self.assertEqual(cancelled, [True])
        self.assertTrue(wire.transport.disconnecting)

    def test_connection_loss_cancels_every_stream(self) -> None:
        cancelled = []
        body = ControlledBody()
        answers = {
            "/wait": lambda: Deferred(lambda _: cancelled.append(True)),
            "/body": lambda: succeed(Response(200, [], body)),
        }
        wire = Wire(ScriptedGateway(lambda ctx: answers[ctx.path]()))  # type: ignore[operator]
        wire.request(1, request_headers(b"/wait"))
        wire.request(3, request_headers(b"/body"))
        wire.detector.connectionLost()
        self.assertEqual((cancelled, body.stopped), ([True], True))
        self.assertEqual(wire.factory.open_connections, 0)


class TimeoutTests(SynchronousTestCase):
    def test_no_request_within_header_timeout(self) -> None:
        clock = Clock()
        wire = Wire(ScriptedGateway(lambda ctx: ok(), Limits(header_timeout=5)), clock)
        clock.advance(4.9)
        self.assertFalse(wire.transport.disconnecting)
        clock.advance(0.2)
        wire.pump()
        self.assertEqual(wire.goaway(), ErrorCodes.NO_ERROR)
        self.assertTrue(wire.transport.disconnecting)

    def test_idle_connection_closed(self) -> None:
        clock = Clock()
        wire = Wire(ScriptedGateway(lambda ctx: ok(), Limits(idle_timeout=30, header_timeout=5)), clock)
        wire.request(1)
        clock.advance(29)
        self.assertFalse(wire.transport.disconnecting)
        wire.request(3)
        clock.advance(29)
        self.assertFalse(wire.transport.disconnecting)
        clock.advance(2)
        wire.pump()
        self.assertEqual(wire.goaway(), ErrorCodes.NO_ERROR)
        self.assertTrue(wire.transport.disconnecting)

    def test_no_timeout_while_streams_are_open(self) -> None:
        clock = Clock()
        wire = Wire(ScriptedGateway(waiting(), Limits(idle_timeout=30, header_timeout=5)), clock)
        wire.request(1)
        clock.advance(100)
        self.assertFalse(wire.transport.disconnecting)

    def test_slow_header_block(self) -> None:
        clock = Clock()
        wire = Wire(ScriptedGateway(lambda ctx: ok(), Limits(header_timeout=5)), clock, start=False)
        started(wire)
        block = Encoder().encode(request_headers())
        wire.send_raw(frames(HeadersFrame(1, data=block[:5], flags=["END_STREAM"])))
        clock.advance(4)
        wire.send_raw(frames(ContinuationFrame(1, data=block[5:8])))
        clock.advance(1.1)
        self.assertTrue(wire.transport.disconnecting)


class ProtectionTests(SynchronousTestCase):
    """Each attack ends its own connection with GOAWAY; a neighbour keeps working."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.gateway = ScriptedGateway(
            lambda ctx: ok(),
            Limits(max_header_bytes=8192),
            HTTP2Config(max_concurrent_streams=10, max_control_frames_per_second=50),
        )
        self.factory = GatewayServerFactory(lambda: self.gateway, self.clock)  # type: ignore[arg-type,return-value]
        self.neighbour = Wire(self.gateway, self.clock, self.factory)

    def wire(self, start: bool = True) -> Wire:
        return Wire(self.gateway, self.clock, self.factory, start=start)

    def assert_goaway(self, wire: Wire, code: int) -> None:
        wire.pump()
        self.assertEqual(wire.goaway(), code)
        self.assertTrue(wire.transport.disconnecting)
        # The other connection is unaffected.
        stream_id = wire_next_stream(self.neighbour)
        self.neighbour.request(stream_id)
        self.assertEqual(self.neighbour.head(stream_id)[b":status"], b"200")
        self.assertFalse(self.neighbour.transport.disconnecting)

    def test_rapid_reset(self) -> None:
        wire = self.wire()
        seen = len(self.gateway.seen)
        for stream_id in range(1, 2 * 60, 2):
            wire.client.send_headers(stream_id, request_headers(), end_stream=True)
            wire.client.reset_stream(stream_id, ErrorCodes.CANCEL)
        wire.pump()
        self.assert_goaway(wire, ErrorCodes.ENHANCE_YOUR_CALM)
        # Streams opened and reset in the same read never reached the pipeline.
        self.assertEqual(len(self.gateway.seen), seen + 1)  # the neighbour's

    def test_rapid_reset_across_reads(self) -> None:
        wire = self.wire()
        cancelled = []
        self.gateway.answer = lambda ctx: Deferred(lambda _: cancelled.append(1))
        for stream_id in range(1, 2 * 60, 2):
            wire.client.send_headers(stream_id, request_headers(), end_stream=True)
            wire.pump()
            wire.client.reset_stream(stream_id, ErrorCodes.CANCEL)
            wire.pump()
            if wire.closed_by is not None:
                break
        self.gateway.answer = lambda ctx: ok()
        self.assert_goaway(wire, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertLessEqual(len(cancelled), 51)

    def test_resets_within_budget_are_fine(self) -> None:
        wire = self.wire()
        self.gateway.answer = lambda ctx: Deferred()
        stream_id = 1
        for _ in range(3):
            for _ in range(40):
                wire.client.send_headers(stream_id, request_headers(), end_stream=True)
                wire.client.reset_stream(stream_id, ErrorCodes.CANCEL)
                stream_id += 2
            wire.pump()
            self.clock.advance(1.0)
        self.assertIsNone(wire.goaway())
        self.assertFalse(wire.transport.disconnecting)

    def test_ping_flood(self) -> None:
        wire = self.wire()
        for n in range(60):
            wire.client.ping(b"%08d" % n)
        self.assert_goaway(wire, ErrorCodes.ENHANCE_YOUR_CALM)

    def test_settings_flood(self) -> None:
        wire = self.wire(start=False)
        started(wire)
        wire.send_raw(frames(*[SettingsFrame(0, settings={0x4: 65535}) for _ in range(60)]))
        self.assert_goaway(wire, ErrorCodes.ENHANCE_YOUR_CALM)

    def test_empty_data_flood(self) -> None:
        wire = self.wire()
        self.gateway.answer = lambda ctx: Deferred()
        wire.client.send_headers(1, request_headers(method=b"POST"))
        wire.pump()
        wire.send_raw(frames(*[DataFrame(1, data=b"") for _ in range(60)]))
        self.gateway.answer = lambda ctx: ok()
        self.assert_goaway(wire, ErrorCodes.ENHANCE_YOUR_CALM)

    def test_too_many_streams(self) -> None:
        self.gateway.answer = lambda ctx: Deferred()
        wire = self.wire(start=False)
        # Sent before the client has seen our SETTINGS, as an attacker would.
        for stream_id in range(1, 2 * 11, 2):
            wire.client.send_headers(stream_id, request_headers(), end_stream=True)
        wire.pump()
        self.gateway.answer = lambda ctx: ok()
        self.assert_goaway(wire, ErrorCodes.PROTOCOL_ERROR)

    def test_concurrency_setting_advertised(self) -> None:
        wire = self.wire()
        self.assertEqual(wire.client.remote_settings.max_concurrent_streams, 10)
        self.assertEqual(wire.client.remote_settings.max_header_list_size, 8192)

    def test_oversized_headers(self) -> None:
        wire = self.wire()
        wire.client.send_headers(1, request_headers(extra=[(b"x-big", b"a" * 9000)]), end_stream=True)
        self.assert_goaway(wire, ErrorCodes.ENHANCE_YOUR_CALM)

    def test_hpack_bomb(self) -> None:
        # One 4 KiB value in the dynamic table, then referenced: a few bytes
        # on the wire each decode to 4 KiB.
        wire = self.wire(start=False)
        started(wire)
        block = Encoder().encode(request_headers(extra=[(b"x-bomb", b"b" * 4000)] * 50))
        self.assertLess(len(block), 4200)
        wire.send_raw(frames(HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"])))
        self.assert_goaway(wire, ErrorCodes.ENHANCE_YOUR_CALM)

    def test_continuation_flood(self) -> None:
        wire = self.wire(start=False)
        started(wire)
        block = Encoder().encode(request_headers())
        flood = [ContinuationFrame(1, data=b"") for _ in range(100)]
        wire.send_raw(frames(HeadersFrame(1, data=block, flags=["END_STREAM"]), *flood))
        self.assert_goaway(wire, ErrorCodes.ENHANCE_YOUR_CALM)

    def test_oversized_header_block_in_continuations(self) -> None:
        wire = self.wire(start=False)
        started(wire)
        block = Encoder().encode(request_headers())
        # Garbage that h2 would buffer whole before decoding: cut off by size first.
        junk = [ContinuationFrame(1, data=b"\0" * 8000) for _ in range(3)]
        wire.send_raw(frames(HeadersFrame(1, data=block, flags=["END_STREAM"]), *junk))
        self.assert_goaway(wire, ErrorCodes.ENHANCE_YOUR_CALM)

    def test_oversized_frame_refused_before_buffering(self) -> None:
        wire = self.wire(start=False)
        started(wire)
        # A header announcing 16 MiB of DATA: refused on its 9 bytes, not after buffering it.
        wire.send_raw(b"\xff\xff\xff\x00\x00\x00\x00\x00\x01" + b"\0" * 100)
        self.assert_goaway(wire, ErrorCodes.FRAME_SIZE_ERROR)

    def test_frames_split_across_reads_are_counted(self) -> None:
        wire = self.wire(start=False)
        started(wire)
        data = frames(*[PingFrame(0, opaque_data=b"%08d" % n) for n in range(60)])
        for at in range(0, len(data), 7):
            wire.send_raw(data[at : at + 7])
            if wire.transport.disconnecting:
                break
        self.assert_goaway(wire, ErrorCodes.ENHANCE_YOUR_CALM)

    def test_garbage_preface_is_not_http2(self) -> None:
        wire = self.wire(start=False)
        wire.send_raw(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")
        self.assertIsInstance(wire.detector._protocol, HTTP11ServerProtocol)
        self.assertTrue(wire.transport.disconnecting)


def wire_next_stream(wire: Wire) -> int:
    return wire.client.get_next_available_stream_id()


class DetectionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gateway = ScriptedGateway(lambda ctx: ok(b"hi"))
        self.factory = GatewayServerFactory(lambda: self.gateway, Clock())  # type: ignore[arg-type,return-value]

    def connect(self) -> tuple[ProtocolDetector, StringTransport]:
        protocol = self.factory.buildProtocol(None)
        assert isinstance(protocol, ProtocolDetector)
        transport = StringTransport()
        transport.protocol = protocol  # type: ignore[attr-defined]
        protocol.makeConnection(transport)
        return protocol, transport

    def test_http1_decided_by_first_byte(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"G")
        # Handed over at once, the transport rewired to the real protocol.
        self.assertIsInstance(transport.protocol, HTTP11ServerProtocol)  # type: ignore[attr-defined]
        transport.protocol.dataReceived(b"ET / HTTP/1.1\r\nHost: h\r\n\r\n")  # type: ignore[attr-defined]
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))

    def test_post_put_patch_not_mistaken(self) -> None:
        for method in (b"POST", b"PUT", b"PATCH", b"PRIX"):
            protocol, transport = self.connect()
            request = method + b" / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n"
            for byte in range(len(request)):
                protocol.dataReceived(request[byte : byte + 1])
            self.assertIsInstance(protocol._protocol, HTTP11ServerProtocol, method)
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 "), method)

    def test_preface_byte_by_byte_is_http2(self) -> None:
        protocol, transport = self.connect()
        for byte in range(len(PREFACE) - 1):
            protocol.dataReceived(PREFACE[byte : byte + 1])
        self.assertIsNone(protocol._protocol)
        protocol.dataReceived(PREFACE[-1:] + SettingsFrame(0).serialize())
        self.assertIsInstance(transport.protocol, HTTP2ServerProtocol)  # type: ignore[attr-defined]
        # The server's SETTINGS went out.
        self.assertEqual(transport.value()[3], 0x4)

    def test_both_protocols_on_one_factory_share_max_connections(self) -> None:
        self.gateway.config = GatewayConfig(server=ServerConfig(limits=Limits(max_connections=2)))
        h1, _ = self.connect()
        h1.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        wire = Wire(self.gateway, factory=self.factory)
        wire.request(1)
        self.assertEqual(wire.head(1)[b":status"], b"200")
        self.assertIsNone(self.factory.buildProtocol(None))
        wire.detector.connectionLost()
        h1.connectionLost()
        self.assertEqual(self.factory.open_connections, 0)
        self.assertIsNotNone(self.factory.buildProtocol(None))

    def test_silent_connection_closed_after_header_timeout(self) -> None:
        clock = Clock()
        factory = GatewayServerFactory(lambda: self.gateway, clock)  # type: ignore[arg-type,return-value]
        protocol = factory.buildProtocol(None)
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"PR")
        clock.advance(Limits().header_timeout + 0.1)
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost()
        self.assertEqual(factory.open_connections, 0)

    def test_tls_listener_counts_in_the_same_budget(self) -> None:
        self.gateway.config = GatewayConfig(server=ServerConfig(limits=Limits(max_connections=1)))
        tls = GatewayServerFactory(lambda: self.gateway, Clock(), scheme=b"https", counted_with=self.factory)  # type: ignore[arg-type,return-value]
        first = tls.buildProtocol(None)
        self.assertIsNotNone(first)
        self.assertIsNone(self.factory.buildProtocol(None))
        assert first is not None
        first.makeConnection(StringTransport())
        first.connectionLost()
        self.assertIsNotNone(self.factory.buildProtocol(None))


class RealGatewayTests(SynchronousTestCase):
    """The real router and forwarder behind the HTTP/2 edge, with an in-memory upstream."""

    def test_proxied_through_the_pipeline(self) -> None:
        from txgateway.gateway import Gateway

        config = parse_config(
            """
upstreams:
  api: {servers: ["127.0.0.1:9001"]}
routes:
  - {name: api, match: {path: /api/*}, upstream: api, strip_prefix: /api, max_body_bytes: 64KiB}
"""
        )

        def answer(request: ReceivedRequest) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            return (
                200,
                [(b"content-type", b"text/plain"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")],
                b"got " + request.body,
            )

        upstream = MemoryUpstream(answer)
        clock = Clock()
        gateway = Gateway(config, lambda _config: upstream, Runtime(clock, clock))
        factory = GatewayServerFactory(lambda: gateway, clock)
        wire = Wire(gateway, clock, factory)  # type: ignore[arg-type]
        wire.request(1, request_headers(b"/api/users?id=7", method=b"POST", authority=b"api.test"), body=b"payload")
        self.assertEqual(wire.head(1)[b":status"], b"200")
        self.assertEqual(wire.body(1), b"got payload")
        [response] = wire.of(1, ResponseReceived)
        self.assertEqual([v for n, v in response.headers if n == b"set-cookie"], [b"a=1", b"b=2"])
        [seen] = upstream.requests
        self.assertEqual((seen.method, seen.target, seen.header(b"host")), (b"POST", b"/users?id=7", b"api.test"))
        self.assertEqual(seen.header(b"x-forwarded-proto"), b"http")
        wire.request(3, request_headers(b"/nowhere"))
        self.assertEqual(wire.head(3)[b":status"], b"404")


class ConfigTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        http2 = parse_config("{}").server.http2
        self.assertEqual(
            (http2.max_concurrent_streams, http2.max_header_list_size, http2.max_control_frames_per_second),
            (100, None, 200),
        )

    def test_values_and_errors(self) -> None:
        http2 = parse_config(
            "server: {http2: {max_concurrent_streams: 32, max_header_list_size: 16KiB, max_control_frames_per_second: 50}}"
        ).server.http2
        self.assertEqual((http2.max_concurrent_streams, http2.max_header_list_size), (32, 16384))
        with self.assertRaises(Exception) as caught:
            parse_config("server: {http2: {max_concurrent_streams: 0, max_streams: 1}}")
        message = str(caught.exception)
        self.assertIn("server.http2.max_concurrent_streams: must be >= 1, got 0", message)
        self.assertIn("server.http2.max_streams: unknown key", message)

    def test_header_list_size_defaults_to_max_header_bytes(self) -> None:
        gateway = ScriptedGateway(lambda ctx: ok(), Limits(max_header_bytes=4096))
        wire = Wire(gateway)
        self.assertEqual(wire.client.remote_settings.max_header_list_size, 4096)
