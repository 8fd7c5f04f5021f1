"""The HTTP/2 upstream client on fake time and fake wires.

``FakeH2Upstream`` runs an ``H2Client`` on a ``MemoryReactorClock``; each
accepted connection gets an :class:`H2Peer`, a server-side ``h2`` connection
on the other end of a ``StringTransport``, and the test plays the upstream
through it (answer, reset, GOAWAY, hold back WINDOW_UPDATEs).  Bytes are
pumped both ways until both sides are quiet.
"""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.settings import SettingCodes, Settings
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionLost, TimeoutError
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from txgateway.body import BytesBody
from txgateway.config.model import PoolConfig
from txgateway.errors import (
    BadRequest,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from txgateway.interfaces import IBody, IBodySink
from txgateway.messages import Response, UpstreamRequest
from txgateway.upstream.http2 import H2Client

from .test_upstream_http1 import CollectingSink, ManualBody


@implementer(IBody)
class TrailerBody(ManualBody):
    """A hand-fed request body with trailers."""

    def __init__(self, length: int | None) -> None:
        super().__init__(length)
        self.trailers: list[tuple[bytes, bytes]] = []


@implementer(IBodySink)
class TrailerSink(CollectingSink):
    """Records the body's trailers at the moment ``finish()`` is called."""

    def __init__(self, body: IBody) -> None:
        super().__init__()
        self.body = body
        self.trailersAtFinish: list[tuple[bytes, bytes]] | None = None

    def finish(self) -> None:
        self.trailersAtFinish = list(self.body.trailers)
        super().finish()


class H2Peer:
    """The upstream end of one connection: a server-side ``h2`` connection."""

    def __init__(
        self,
        transport: StringTransportWithDisconnection,
        settings: dict[SettingCodes | int, int] | None = None,
        auto_ack: bool = True,
    ) -> None:
        self.transport = transport
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        if settings:
            self.h2.local_settings = Settings(client=False, initial_values=settings)
        self.auto_ack = auto_ack
        self.requests: dict[int, list[tuple[bytes, bytes]]] = {}
        self.data: dict[int, bytes] = {}
        self.frames: dict[int, list[int]] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.trailers: dict[int, list[tuple[bytes, bytes]]] = {}
        self.goaway: ConnectionTerminated | None = None
        self.unacked: dict[int, int] = {}

    def start(self) -> None:
        """Send the server preface (SETTINGS) and exchange bytes."""
        self.h2.initiate_connection()
        self.pump()

    def pump(self) -> None:
        """Move bytes both ways until neither side has anything to say."""
        while True:
            moved = False
            outgoing = self.transport.value()
            if outgoing:
                self.transport.clear()
                self._receive(outgoing)
                moved = True
            incoming = self.h2.data_to_send()
            if incoming and self.transport.connected:
                self.transport.protocol.dataReceived(incoming)
                moved = True
            if not moved:
                return

    def _receive(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, RequestReceived):
                self.requests[event.stream_id] = [(bytes(n), bytes(v)) for n, v in event.headers]
                self.data.setdefault(event.stream_id, b"")
            elif isinstance(event, DataReceived):
                self.data[event.stream_id] = self.data.get(event.stream_id, b"") + event.data
                self.frames.setdefault(event.stream_id, []).append(len(event.data))
                if self.auto_ack:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                else:
                    self.unacked[event.stream_id] = self.unacked.get(event.stream_id, 0) + event.flow_controlled_length
            elif isinstance(event, TrailersReceived):
                self.trailers[event.stream_id] = [(bytes(n), bytes(v)) for n, v in event.headers]
            elif isinstance(event, StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, StreamReset):
                self.resets[event.stream_id] = event.error_code
            elif isinstance(event, ConnectionTerminated):
                self.goaway = event

    def ack(self, stream_id: int) -> None:
        """Acknowledge what was held back on ``stream_id`` (auto_ack=False)."""
        size = self.unacked.pop(stream_id, 0)
        if size:
            self.h2.acknowledge_received_data(size, stream_id)
        self.pump()

    def header(self, stream_id: int, name: bytes) -> bytes | None:
        for n, v in self.requests[stream_id]:
            if n == name:
                return v
        return None

    def respond(
        self,
        stream_id: int,
        status: int = 200,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes = b"",
        end: bool = True,
        trailers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.h2.send_headers(stream_id, [(b":status", b"%d" % status), *(headers or [])])
        if body:
            self.send(stream_id, body)
        if trailers is not None:
            self.h2.send_headers(stream_id, trailers, end_stream=True)
        elif end:
            self.h2.end_stream(stream_id)
        self.pump()

    def send(self, stream_id: int, data: bytes, end: bool = False) -> bytes:
        """Send what the client's windows allow of ``data``; return the rest."""
        while data:
            room = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
            if room <= 0:
                break
            self.h2.send_data(stream_id, data[:room])
            data = data[room:]
        if end and not data:
            self.h2.end_stream(stream_id)
        self.pump()
        return data

    def window(self, stream_id: int) -> int:
        """How much more the client lets us send on ``stream_id``."""
        self.pump()
        return self.h2.local_flow_control_window(stream_id)

    def reset(self, stream_id: int, code: int = ErrorCodes.INTERNAL_ERROR) -> None:
        self.h2.reset_stream(stream_id, code)
        self.pump()

    def send_goaway(self, last_stream_id: int, code: int = ErrorCodes.NO_ERROR, pump: bool = True) -> None:
        """GOAWAY, then keep serving the streams up to ``last_stream_id``.

        (h2 refuses to send anything after its own GOAWAY; a real server
        finishes those streams, so the test peer does too.)
        """
        state = self.h2.state_machine.state
        self.h2.close_connection(code, last_stream_id=last_stream_id)
        self.h2.state_machine.state = state
        if pump:
            self.pump()


class FakeH2Upstream:
    """An ``H2Client`` on a ``MemoryReactorClock`` whose connections the test completes."""

    def __init__(self, max_connections: int = 100, idle_timeout: float = 60.0, stream_window: int = 256 * 1024) -> None:
        self.reactor = MemoryReactorClock()
        self.client = H2Client(
            self.reactor,
            PoolConfig(max_connections_per_host=max_connections, idle_timeout=idle_timeout),
            stream_window=stream_window,
        )
        self._accepted = 0

    @property
    def connects(self) -> int:
        return len(self.reactor.tcpClients)

    def accept(
        self,
        index: int | None = None,
        settings: dict[SettingCodes | int, int] | None = None,
        auto_ack: bool = True,
        start: bool = True,
    ) -> H2Peer:
        """Complete connection attempt ``index`` (default: the next one) with an h2 peer."""
        if index is None:
            index = self._accepted
        self._accepted = max(self._accepted, index + 1)
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[index]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransportWithDisconnection(peerAddress=IPv4Address("TCP", host, port))
        transport.protocol = protocol
        protocol.makeConnection(transport)
        peer = H2Peer(transport, settings, auto_ack)
        if start:
            peer.start()
        return peer


def request(
    method: bytes = b"GET",
    target: bytes = b"/",
    body: IBody | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    response_timeout: float = 30.0,
    connect_timeout: float = 2.0,
    host: str = "10.0.0.2",
    port: int = 50051,
) -> UpstreamRequest:
    return UpstreamRequest(
        host=host,
        port=port,
        method=method,
        target=target,
        headers=headers if headers is not None else [(b"host", b"svc.local")],
        body=body,
        connect_timeout=connect_timeout,
        response_timeout=response_timeout,
    )


def read(response: Response) -> CollectingSink:
    sink = CollectingSink()
    assert response.body is not None
    response.body.deliverTo(sink)
    return sink


GRPC_HEADERS = [(b"host", b"grpc.local"), (b"content-type", b"application/grpc"), (b"te", b"trailers")]


class RequestHeadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.up = FakeH2Upstream()

    def test_pseudo_headers_and_fields(self) -> None:
        self.up.client.request(
            request(
                method=b"PUT",
                target=b"/a/b?c=1",
                body=BytesBody(b"abc"),
                headers=[
                    (b"host", b"api.example"),
                    (b"X-Token", b"1"),
                    (b"x-token", b"2"),
                    (b"connection", b"close"),
                    (b"keep-alive", b"5"),
                    (b"upgrade", b"h2c"),
                    (b"transfer-encoding", b"chunked"),
                    (b"content-length", b"99"),
                ],
            )
        )
        peer = self.up.accept()
        self.assertEqual(
            peer.requests[1],
            [
                (b":method", b"PUT"),
                (b":scheme", b"http"),
                (b":authority", b"api.example"),
                (b":path", b"/a/b?c=1"),
                (b"content-length", b"3"),
                (b"x-token", b"1"),
                (b"x-token", b"2"),
            ],
        )
        self.assertEqual(peer.data[1], b"abc")
        self.assertIn(1, peer.ended)

    def test_grpc_gets_te_trailers(self) -> None:
        headers = [(b"host", b"grpc.local"), (b"content-type", b"application/grpc+proto")]
        self.up.client.request(request(method=b"POST", body=BytesBody(b"\0\0\0\0\0"), headers=headers))
        peer = self.up.accept()
        self.assertEqual(peer.header(1, b"te"), b"trailers")
        self.assertIsNone(peer.header(1, b"content-length"), "gRPC is framed by its own prefixes")

    def test_authority_without_host_header(self) -> None:
        self.up.client.request(request(headers=[]))
        peer = self.up.accept()
        self.assertEqual(peer.header(1, b":authority"), b"10.0.0.2:50051")
        self.assertIn(1, peer.ended, "no body: END_STREAM on the HEADERS")

    def test_invalid_header_value_is_refused(self) -> None:
        d = self.up.client.request(request(headers=[(b"host", b"x"), (b"x-a", b"1\r\nx-b: 2")]))
        self.failureResultOf(d, BadRequest)
        self.assertEqual(self.up.connects, 0)


class ResponseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.up = FakeH2Upstream()

    def test_head_fields_and_body(self) -> None:
        d = self.up.client.request(request())
        peer = self.up.accept()
        peer.respond(
            1,
            201,
            [
                (b"content-type", b"text/plain"),
                (b"set-cookie", b"a=1"),
                (b"set-cookie", b"b=2"),
                (b"content-length", b"5"),
            ],
            b"hello",
        )
        response = self.successResultOf(d)
        self.assertEqual((response.status, response.version), (201, (2, 0)))
        self.assertEqual(
            response.headers,
            [
                (b"content-type", b"text/plain"),
                (b"set-cookie", b"a=1"),
                (b"set-cookie", b"b=2"),
                (b"content-length", b"5"),
            ],
        )
        assert response.body is not None
        self.assertEqual(response.body.length, 5)
        sink = read(response)
        self.assertEqual((sink.data, sink.finished), (b"hello", True))

    def test_unknown_length(self) -> None:
        d = self.up.client.request(request())
        peer = self.up.accept()
        peer.respond(1, 200, body=b"abc")
        response = self.successResultOf(d)
        assert response.body is not None
        self.assertIsNone(response.body.length)
        self.assertEqual(read(response).data, b"abc")

    def test_informational_responses_are_skipped(self) -> None:
        d = self.up.client.request(request())
        peer = self.up.accept()
        peer.h2.send_headers(1, [(b":status", b"103"), (b"link", b"</a.css>")])
        peer.pump()
        self.assertNoResult(d)
        peer.respond(1, 204)
        self.assertEqual(self.successResultOf(d).status, 204)

    def test_trailers_reach_the_body_before_finish(self) -> None:
        d = self.up.client.request(request(method=b"POST", body=BytesBody(b"\0\0\0\0\x02hi"), headers=GRPC_HEADERS))
        peer = self.up.accept()
        peer.respond(
            1,
            200,
            [(b"content-type", b"application/grpc")],
            b"\0\0\0\0\x02ok",
            trailers=[(b"grpc-status", b"0"), (b"grpc-message", b"")],
        )
        response = self.successResultOf(d)
        assert response.body is not None
        sink = TrailerSink(response.body)
        response.body.deliverTo(sink)
        self.assertEqual(sink.data, b"\0\0\0\0\x02ok")
        self.assertEqual(sink.trailersAtFinish, [(b"grpc-status", b"0"), (b"grpc-message", b"")])

    def test_trailers_only_response(self) -> None:
        d = self.up.client.request(request(method=b"POST", body=BytesBody(b"\0\0\0\0\0"), headers=GRPC_HEADERS))
        peer = self.up.accept()
        peer.h2.send_headers(
            1,
            [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", b"12"),
                (b"grpc-message", b"unknown method"),
            ],
            end_stream=True,
        )
        peer.pump()
        response = self.successResultOf(d)
        self.assertEqual(response.status, 200)
        self.assertIn((b"grpc-status", b"12"), response.headers)
        assert response.body is not None
        self.assertEqual(response.body.length, 0)
        sink = TrailerSink(response.body)
        response.body.deliverTo(sink)
        self.assertEqual((sink.data, sink.finished, sink.trailersAtFinish), (b"", True, []))

    def test_request_trailers(self) -> None:
        body = TrailerBody(None)
        d = self.up.client.request(request(method=b"POST", body=body, headers=GRPC_HEADERS))
        peer = self.up.accept()
        assert body.sink is not None
        body.sink.write(b"payload")
        body.trailers = [(b"x-checksum", b"abc"), (b"Connection", b"close")]
        body.sink.finish()
        peer.pump()
        self.assertEqual(peer.data[1], b"payload")
        self.assertEqual(peer.trailers[1], [(b"x-checksum", b"abc")])
        self.assertIn(1, peer.ended)
        peer.respond(1, 200)
        self.successResultOf(d)

    def test_response_arrives_while_the_request_streams(self) -> None:
        """Bidirectional streaming: the head and body flow before the upload ends."""
        body = ManualBody(None)
        d = self.up.client.request(request(method=b"POST", body=body, headers=GRPC_HEADERS))
        peer = self.up.accept()
        assert body.sink is not None
        body.sink.write(b"one")
        peer.respond(1, 200, body=b"first", end=False)
        response = self.successResultOf(d)
        sink = read(response)
        body.sink.write(b"two")
        body.sink.finish()
        peer.pump()
        self.assertEqual(peer.data[1], b"onetwo")
        peer.send(1, b"second", end=True)
        self.assertEqual((sink.data, sink.finished), (b"firstsecond", True))

    def test_garbage_is_a_protocol_error(self) -> None:
        d1 = self.up.client.request(request())
        d2 = self.up.client.request(request())
        peer = self.up.accept()
        peer.transport.protocol.dataReceived(b"\xff\xff\xff\x00\x00\x00\x00\x00\x01")
        self.failureResultOf(d1, UpstreamProtocolError)
        self.failureResultOf(d2, UpstreamProtocolError)
        self.assertFalse(peer.transport.connected)

    def test_http1_server_is_a_protocol_error(self) -> None:
        d = self.up.client.request(request())
        peer = self.up.accept(start=False)
        peer.transport.protocol.dataReceived(b"HTTP/1.1 505 HTTP Version Not Supported\r\ncontent-length: 0\r\n\r\n")
        self.failureResultOf(d, UpstreamProtocolError)
        self.assertFalse(peer.transport.connected)

    def test_deliver_twice_is_refused(self) -> None:
        d = self.up.client.request(request())
        self.up.accept().respond(1, body=b"x")
        response = self.successResultOf(d)
        read(response)
        self.assertRaises(RuntimeError, read, response)


class MultiplexingTests(SynchronousTestCase):
    def test_many_streams_on_one_connection(self) -> None:
        up = FakeH2Upstream()
        ds = [up.client.request(request(target=b"/%d" % i)) for i in range(10)]
        self.assertEqual(up.connects, 1, "requests wait for the connection being made")
        peer = up.accept()
        self.assertEqual(sorted(peer.requests), list(range(1, 21, 2)))
        for stream_id in reversed(sorted(peer.requests)):
            peer.respond(stream_id, body=peer.header(stream_id, b":path") or b"")
        self.assertEqual([read(self.successResultOf(d)).data for d in ds], [b"/%d" % i for i in range(10)])
        # Later requests reuse the connection.
        d = up.client.request(request(target=b"/later"))
        peer.pump()
        self.assertEqual(up.connects, 1)
        peer.respond(21, body=b"ok")
        self.assertEqual(read(self.successResultOf(d)).data, b"ok")

    def test_new_connection_when_the_peer_limit_is_reached(self) -> None:
        up = FakeH2Upstream()
        ds = [up.client.request(request(target=b"/%d" % i)) for i in range(3)]
        peer1 = up.accept(settings={SettingCodes.MAX_CONCURRENT_STREAMS: 2})
        self.assertEqual(len(peer1.requests), 2)
        self.assertEqual(up.connects, 2, "the third request needs a second connection")
        peer2 = up.accept(settings={SettingCodes.MAX_CONCURRENT_STREAMS: 2})
        self.assertEqual(peer2.header(1, b":path"), b"/2")
        # Both connections are full now: a fourth request fits the second one...
        d4 = up.client.request(request(target=b"/3"))
        peer2.pump()
        self.assertEqual(peer2.header(3, b":path"), b"/3")
        # ... and a fifth one opens a third connection.
        up.client.request(request(target=b"/4"))
        self.assertEqual(up.connects, 3)
        for peer, stream_id, d in ((peer1, 1, ds[0]), (peer1, 3, ds[1]), (peer2, 1, ds[2]), (peer2, 3, d4)):
            peer.respond(stream_id, body=b"ok")
            self.assertEqual(read(self.successResultOf(d)).data, b"ok")

    def test_queueing_at_the_connection_cap(self) -> None:
        up = FakeH2Upstream(max_connections=1)
        ds = [up.client.request(request(target=b"/%d" % i)) for i in range(4)]
        peer = up.accept(settings={SettingCodes.MAX_CONCURRENT_STREAMS: 1})
        self.assertEqual(up.connects, 1)
        order = []
        for stream_id in (1, 3, 5, 7):
            self.assertEqual(list(peer.requests), [*order, stream_id])
            order.append(stream_id)
            peer.respond(stream_id, body=b"ok")
        self.assertEqual(
            [peer.header(s, b":path") for s in (1, 3, 5, 7)], [b"/0", b"/1", b"/2", b"/3"], "first in, first out"
        )
        for d in ds:
            self.assertEqual(read(self.successResultOf(d)).data, b"ok")

    def test_peer_raising_its_limit_lets_waiters_in(self) -> None:
        up = FakeH2Upstream(max_connections=1)
        ds = [up.client.request(request()) for _ in range(3)]
        peer = up.accept(settings={SettingCodes.MAX_CONCURRENT_STREAMS: 1})
        self.assertEqual(len(peer.requests), 1)
        peer.h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 10})
        peer.pump()
        self.assertEqual(len(peer.requests), 3)
        for stream_id, d in zip((1, 3, 5), ds, strict=True):
            peer.respond(stream_id)
            self.successResultOf(d)

    def test_pools_are_per_host_and_port(self) -> None:
        up = FakeH2Upstream()
        up.client.request(request(port=1))
        up.client.request(request(port=2))
        up.client.request(request(port=1))
        self.assertEqual(up.connects, 2)


class GoAwayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.up = FakeH2Upstream()

    def test_streams_above_last_are_retried_below_finish(self) -> None:
        ds = [self.up.client.request(request(target=b"/%d" % i)) for i in range(3)]
        peer1 = self.up.accept()
        self.assertEqual(sorted(peer1.requests), [1, 3, 5])
        peer1.send_goaway(last_stream_id=1)
        self.assertNoResult(ds[1])
        self.assertNoResult(ds[2])
        self.assertEqual(self.up.connects, 2, "streams 3 and 5 go again on a new connection")
        peer2 = self.up.accept()
        self.assertEqual([peer2.header(s, b":path") for s in (1, 3)], [b"/1", b"/2"])
        # New requests avoid the draining connection.
        d4 = self.up.client.request(request(target=b"/3"))
        peer2.pump()
        self.assertEqual(peer2.header(5, b":path"), b"/3")
        # Stream 1 finishes on the old connection, which then closes.
        self.assertTrue(peer1.transport.connected)
        peer1.respond(1, body=b"zero")
        self.assertEqual(read(self.successResultOf(ds[0])).data, b"zero")
        self.assertFalse(peer1.transport.connected)
        for stream_id, d in ((1, ds[1]), (3, ds[2]), (5, d4)):
            peer2.respond(stream_id, body=b"ok")
            self.assertEqual(read(self.successResultOf(d)).data, b"ok")

    def test_frames_after_goaway_in_the_same_read(self) -> None:
        d = self.up.client.request(request())
        peer = self.up.accept()
        peer.send_goaway(last_stream_id=1, pump=False)
        peer.h2.send_headers(1, [(b":status", b"200")])
        peer.h2.send_data(1, b"late", end_stream=True)
        peer.h2.ping(b"12345678")
        peer.pump()
        self.assertEqual(read(self.successResultOf(d)).data, b"late")
        self.assertFalse(peer.transport.connected)

    def test_started_body_above_last_fails(self) -> None:
        body = ManualBody(None)
        d = self.up.client.request(request(method=b"POST", body=body))
        peer = self.up.accept()
        assert body.sink is not None
        body.sink.write(b"partial")
        peer.pump()
        peer.send_goaway(last_stream_id=0)
        self.failureResultOf(d, UpstreamReset)
        self.assertTrue(body.stopped)
        self.assertEqual(self.up.connects, 1)
        self.assertFalse(peer.transport.connected, "no streams left: closed")

    def test_untouched_body_above_last_is_retried(self) -> None:
        """A body held back by the peer's window went nowhere: it is sent again in full."""
        body = ManualBody(5)
        d = self.up.client.request(request(method=b"POST", body=body))
        peer1 = self.up.accept(settings={SettingCodes.INITIAL_WINDOW_SIZE: 0})
        assert body.sink is not None
        body.sink.write(b"hello")
        body.sink.finish()
        peer1.pump()
        self.assertEqual(peer1.data[1], b"")
        peer1.send_goaway(last_stream_id=0)
        self.assertFalse(body.stopped)
        peer2 = self.up.accept()
        self.assertEqual(peer2.data[1], b"hello")
        self.assertIn(1, peer2.ended)
        peer2.respond(1, body=b"ok")
        self.assertEqual(read(self.successResultOf(d)).data, b"ok")

    def test_refused_stream_is_retried(self) -> None:
        d = self.up.client.request(request())
        peer = self.up.accept()
        peer.reset(1, ErrorCodes.REFUSED_STREAM)
        self.assertEqual(peer.header(3, b":path"), b"/", "sent again on the same connection")
        peer.respond(3, body=b"ok")
        self.assertEqual(read(self.successResultOf(d)).data, b"ok")

    def test_goaway_during_the_handshake(self) -> None:
        up = FakeH2Upstream(max_connections=1)
        d = up.client.request(request())
        peer1 = up.accept(start=False)
        peer1.h2.initiate_connection()
        peer1.send_goaway(last_stream_id=0)
        self.assertFalse(peer1.transport.connected)
        self.assertEqual(up.connects, 2)
        peer2 = up.accept()
        peer2.respond(1)
        self.assertEqual(self.successResultOf(d).status, 200)


class RequestFlowControlTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.up = FakeH2Upstream()

    def test_body_paused_while_the_window_is_shut(self) -> None:
        body = ManualBody(25)
        self.up.client.request(request(method=b"POST", body=body))
        peer = self.up.accept(settings={SettingCodes.INITIAL_WINDOW_SIZE: 10}, auto_ack=False)
        assert body.sink is not None
        body.sink.write(b"a" * 25)
        peer.pump()
        self.assertEqual(peer.data[1], b"a" * 10)
        self.assertEqual((body.pauses, body.resumes), (1, 0))
        peer.ack(1)
        self.assertEqual(peer.data[1], b"a" * 20)
        self.assertEqual((body.pauses, body.resumes), (1, 0))
        peer.ack(1)
        self.assertEqual(peer.data[1], b"a" * 25)
        self.assertEqual((body.pauses, body.resumes), (1, 1))
        body.sink.finish()
        peer.pump()
        self.assertIn(1, peer.ended)

    def test_frames_fit_the_peer_frame_size(self) -> None:
        data = bytes(range(256)) * 160  # 40960 bytes
        self.up.client.request(request(method=b"POST", body=BytesBody(data)))
        peer = self.up.accept()
        self.assertEqual(peer.data[1], data)
        self.assertEqual(max(peer.frames[1]), 16384)
        self.assertIn(1, peer.ended)

    def test_connection_window_shared_by_streams(self) -> None:
        """Two uploads against a small connection window both complete as it reopens."""
        bodies = [BytesBody(b"x" * 50000), BytesBody(b"y" * 50000)]
        for body in bodies:
            self.up.client.request(request(method=b"POST", body=body))
        peer = self.up.accept(auto_ack=False)
        self.assertEqual(len(peer.data[1]) + len(peer.data[3]), 65535)
        for _ in range(4):
            peer.ack(1)
            peer.ack(3)
        self.assertEqual((peer.data[1], peer.data[3]), (b"x" * 50000, b"y" * 50000))
        self.assertEqual(peer.ended, {1, 3})

    def test_window_update_and_reset_in_one_read(self) -> None:
        """h2 has seen the RST_STREAM before we handle the WINDOW_UPDATE that precedes it."""
        body = ManualBody(None)
        d1 = self.up.client.request(request(method=b"POST", body=body))
        d2 = self.up.client.request(request())
        peer = self.up.accept(settings={SettingCodes.INITIAL_WINDOW_SIZE: 0})
        assert body.sink is not None
        body.sink.write(b"held back")
        peer.pump()
        peer.h2.increment_flow_control_window(100, stream_id=1)
        peer.h2.reset_stream(1, ErrorCodes.INTERNAL_ERROR)
        peer.h2.send_headers(3, [(b":status", b"200")], end_stream=True)
        peer.pump()
        self.failureResultOf(d1, UpstreamReset)
        self.assertTrue(body.stopped)
        self.assertEqual(self.successResultOf(d2).status, 200)
        self.assertTrue(peer.transport.connected)

    def test_full_socket_buffer_holds_the_body_back(self) -> None:
        body = ManualBody(None)
        self.up.client.request(request(method=b"POST", body=body))
        peer = self.up.accept()
        producer = peer.transport.producer
        self.assertTrue(peer.transport.streaming)
        producer.pauseProducing()
        assert body.sink is not None
        body.sink.write(b"queued")
        peer.pump()
        self.assertEqual(peer.data[1], b"")
        self.assertEqual(body.pauses, 1)
        producer.resumeProducing()
        peer.pump()
        self.assertEqual(peer.data[1], b"queued")
        self.assertEqual(body.resumes, 1)

    def test_body_longer_than_declared_fails(self) -> None:
        body = ManualBody(3)
        d = self.up.client.request(request(method=b"POST", body=body))
        peer = self.up.accept()
        assert body.sink is not None
        body.sink.write(b"toolong")
        peer.pump()
        self.failureResultOf(d, BadRequest)
        self.assertEqual(peer.resets, {1: ErrorCodes.CANCEL})
        self.assertTrue(body.stopped)

    def test_body_abort_resets_the_stream(self) -> None:
        body = ManualBody(None)
        d = self.up.client.request(request(method=b"POST", body=body))
        peer = self.up.accept()
        assert body.sink is not None
        body.sink.abort(Failure(ConnectionLost("client went away")))
        peer.pump()
        self.failureResultOf(d, ConnectionLost)
        self.assertEqual(peer.resets, {1: ErrorCodes.CANCEL})
        self.assertTrue(peer.transport.connected)


class ResponseFlowControlTests(SynchronousTestCase):
    def test_no_window_update_until_consumed(self) -> None:
        up = FakeH2Upstream(stream_window=1000)
        d = up.client.request(request())
        peer = up.accept()
        peer.respond(1, end=False)
        response = self.successResultOf(d)
        self.assertEqual(peer.send(1, b"a" * 1500), b"a" * 500, "the advertised stream window is 1000")
        self.assertEqual(peer.window(1), 0)
        sink = read(response)
        self.assertEqual(sink.data, b"a" * 1000)
        self.assertEqual(peer.window(1), 1000, "consumed: the window reopens")
        assert response.body is not None
        response.body.pauseProducing()
        self.assertEqual(peer.send(1, b"b" * 1000), b"")
        self.assertEqual(sink.data, b"a" * 1000, "paused: nothing delivered")
        self.assertEqual(peer.window(1), 0, "paused: no WINDOW_UPDATE")
        response.body.resumeProducing()
        self.assertEqual(sink.data, b"a" * 1000 + b"b" * 1000)
        self.assertEqual(peer.window(1), 1000)
        peer.send(1, b"", end=True)
        self.assertTrue(sink.finished)

    def test_a_stalled_stream_does_not_starve_the_others(self) -> None:
        up = FakeH2Upstream(stream_window=40000)
        slow_d = up.client.request(request(target=b"/slow"))
        fast_d = up.client.request(request(target=b"/fast"))
        peer = up.accept()
        peer.respond(1, end=False)
        peer.respond(3, end=False)
        slow = self.successResultOf(slow_d)
        fast = self.successResultOf(fast_d)
        self.assertEqual(peer.send(1, b"s" * 40000), b"", "the slow stream fills its window, unread")
        sink = read(fast)
        rest = b"f" * 200000
        while rest:
            before = len(rest)
            rest = peer.send(3, rest)
            self.assertLess(len(rest), before, "the fast stream always has room")
        peer.send(3, b"", end=True)
        self.assertEqual(len(sink.data), 200000)
        self.assertTrue(sink.finished)
        self.assertEqual(peer.window(1), 0)
        slow_sink = read(slow)
        self.assertEqual(len(slow_sink.data), 40000)


class TimeoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.up = FakeH2Upstream()

    def test_response_timeout_resets_only_that_stream(self) -> None:
        slow = self.up.client.request(request(target=b"/slow", response_timeout=5.0))
        other = self.up.client.request(request(target=b"/other", response_timeout=30.0))
        peer = self.up.accept()
        self.up.reactor.advance(4.9)
        self.assertNoResult(slow)
        self.up.reactor.advance(0.1)
        failure = self.failureResultOf(slow, UpstreamTimeout)
        self.assertIn("10.0.0.2:50051", failure.value.message)
        peer.pump()
        self.assertEqual(peer.resets, {1: ErrorCodes.CANCEL})
        self.assertTrue(peer.transport.connected)
        peer.respond(3, body=b"fine")
        self.assertEqual(read(self.successResultOf(other)).data, b"fine")

    def test_timeout_stops_once_the_head_is_in(self) -> None:
        d = self.up.client.request(request(response_timeout=5.0))
        peer = self.up.accept()
        peer.respond(1, end=False)
        response = self.successResultOf(d)
        self.up.reactor.advance(30)
        sink = read(response)
        peer.send(1, b"late", end=True)
        self.assertEqual((sink.data, sink.finished), (b"late", True))

    def test_upload_longer_than_the_timeout_is_not_cut_off(self) -> None:
        body = ManualBody(None)
        d = self.up.client.request(request(method=b"POST", body=body, response_timeout=5.0))
        peer = self.up.accept()
        assert body.sink is not None
        for _ in range(10):
            self.up.reactor.advance(4.0)
            body.sink.write(b"piece")
            peer.pump()
        self.assertNoResult(d)
        body.sink.finish()
        self.up.reactor.advance(4.9)
        self.assertNoResult(d)
        self.up.reactor.advance(0.1)
        self.failureResultOf(d, UpstreamTimeout)

    def test_stalled_upload_times_out(self) -> None:
        body = ManualBody(100)
        d = self.up.client.request(request(method=b"POST", body=body, response_timeout=5.0))
        peer = self.up.accept()
        assert body.sink is not None
        body.sink.write(b"x" * 10)
        self.up.reactor.advance(5.0)
        self.failureResultOf(d, UpstreamTimeout)
        self.assertTrue(body.stopped)
        peer.pump()
        self.assertEqual(peer.resets, {1: ErrorCodes.CANCEL})

    def test_waiting_for_a_stream_counts(self) -> None:
        up = FakeH2Upstream(max_connections=1)
        first = up.client.request(request(response_timeout=10.0))
        peer = up.accept(settings={SettingCodes.MAX_CONCURRENT_STREAMS: 1})
        second = up.client.request(request(target=b"/second", response_timeout=3.0))
        up.reactor.advance(2.0)
        peer.respond(1)
        self.successResultOf(first)
        self.assertEqual(peer.header(3, b":path"), b"/second")
        up.reactor.advance(1.0)
        self.failureResultOf(second, UpstreamTimeout)

    def test_timeout_while_queued_never_sends(self) -> None:
        up = FakeH2Upstream(max_connections=1)
        up.client.request(request())
        peer = up.accept(settings={SettingCodes.MAX_CONCURRENT_STREAMS: 1})
        waiting = up.client.request(request(target=b"/waiting", response_timeout=3.0))
        up.reactor.advance(3.0)
        self.failureResultOf(waiting, UpstreamTimeout)
        peer.respond(1)
        self.assertEqual(list(peer.requests), [1])

    def test_silent_peer_times_out(self) -> None:
        """A peer that never sends its SETTINGS: the response timeout still runs."""
        d = self.up.client.request(request(response_timeout=5.0))
        self.up.accept(start=False)
        self.up.reactor.advance(5.0)
        self.failureResultOf(d, UpstreamTimeout)

    def test_connect_timeout_is_passed_on_and_reported(self) -> None:
        d = self.up.client.request(request(connect_timeout=1.5))
        host, port, factory, timeout, _ = self.up.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("10.0.0.2", 50051, 1.5))
        factory.clientConnectionFailed(self.up.reactor.connectors[0], Failure(TimeoutError()))
        failure = self.failureResultOf(d, UpstreamConnectError)
        self.assertIn("10.0.0.2:50051", failure.value.message)
        self.flushLoggedErrors()

    def test_connect_failure_fails_everyone_waiting_for_it(self) -> None:
        ds = [self.up.client.request(request()) for _ in range(3)]
        _, _, factory, _, _ = self.up.reactor.tcpClients[0]
        factory.clientConnectionFailed(self.up.reactor.connectors[0], Failure(ConnectionLost("refused")))
        for d in ds:
            self.failureResultOf(d, UpstreamConnectError)
        # The pool is usable afterwards.
        d = self.up.client.request(request())
        self.up.accept(1).respond(1)
        self.assertEqual(self.successResultOf(d).status, 200)


class CancellationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.up = FakeH2Upstream()

    def test_cancel_before_the_head_resets_the_stream(self) -> None:
        d1 = self.up.client.request(request())
        d2 = self.up.client.request(request())
        peer = self.up.accept()
        d1.cancel()
        self.failureResultOf(d1, CancelledError)
        peer.pump()
        self.assertEqual(peer.resets, {1: ErrorCodes.CANCEL})
        self.assertTrue(peer.transport.connected)
        peer.respond(3, body=b"ok")
        self.assertEqual(read(self.successResultOf(d2)).data, b"ok")

    def test_cancel_stops_the_request_body(self) -> None:
        body = ManualBody(None)
        d = self.up.client.request(request(method=b"POST", body=body))
        self.up.accept()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(body.stopped)

    def test_cancel_while_connecting_stops_connecting(self) -> None:
        d = self.up.client.request(request())
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(self.up.reactor.connectors[0].stoppedConnecting)
        d2 = self.up.client.request(request())
        self.assertEqual(self.up.connects, 2)
        self.up.accept(1).respond(1)
        self.successResultOf(d2)

    def test_cancel_while_queued(self) -> None:
        up = FakeH2Upstream(max_connections=1)
        d1 = up.client.request(request())
        peer = up.accept(settings={SettingCodes.MAX_CONCURRENT_STREAMS: 1})
        d2 = up.client.request(request(target=b"/cancelled"))
        d3 = up.client.request(request(target=b"/third"))
        d2.cancel()
        self.failureResultOf(d2, CancelledError)
        peer.respond(1)
        self.successResultOf(d1)
        self.assertEqual(peer.header(3, b":path"), b"/third")
        peer.respond(3)
        self.successResultOf(d3)

    def test_stop_producing_after_the_head_resets_the_stream(self) -> None:
        d1 = self.up.client.request(request())
        d2 = self.up.client.request(request())
        peer = self.up.accept()
        peer.respond(1, end=False)
        peer.send(1, b"some")
        response = self.successResultOf(d1)
        assert response.body is not None
        response.body.stopProducing()
        peer.pump()
        self.assertEqual(peer.resets, {1: ErrorCodes.CANCEL})
        self.assertTrue(peer.transport.connected)
        peer.respond(3, body=b"ok")
        self.assertEqual(read(self.successResultOf(d2)).data, b"ok")

    def test_cancel_after_the_head_is_a_no_op(self) -> None:
        d = self.up.client.request(request())
        peer = self.up.accept()
        peer.respond(1, body=b"ok")
        d.cancel()
        self.assertEqual(read(self.successResultOf(d)).data, b"ok")
        self.assertEqual(peer.resets, {})


class ResetAndLossTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.up = FakeH2Upstream()

    def test_reset_before_the_head(self) -> None:
        d1 = self.up.client.request(request())
        d2 = self.up.client.request(request())
        peer = self.up.accept()
        peer.reset(1, ErrorCodes.INTERNAL_ERROR)
        failure = self.failureResultOf(d1, UpstreamReset)
        self.assertIn("INTERNAL_ERROR", failure.value.message)
        peer.respond(3)
        self.successResultOf(d2)

    def test_reset_mid_body_aborts_the_body(self) -> None:
        d = self.up.client.request(request())
        peer = self.up.accept()
        peer.respond(1, end=False)
        peer.send(1, b"part")
        sink = read(self.successResultOf(d))
        peer.reset(1, ErrorCodes.CANCEL)
        self.assertEqual(sink.data, b"part")
        assert isinstance(sink.failure, Failure)
        sink.failure.trap(UpstreamReset)

    def test_reset_stops_the_request_body(self) -> None:
        body = ManualBody(None)
        d = self.up.client.request(request(method=b"POST", body=body))
        peer = self.up.accept()
        peer.reset(1)
        self.failureResultOf(d, UpstreamReset)
        self.assertTrue(body.stopped)

    def test_connection_loss_fails_every_stream(self) -> None:
        d1 = self.up.client.request(request())
        d2 = self.up.client.request(request())
        peer = self.up.accept()
        peer.respond(1, end=False)
        sink = read(self.successResultOf(d1))
        peer.transport.loseConnection()
        self.failureResultOf(d2, UpstreamReset)
        assert isinstance(sink.failure, Failure)
        sink.failure.trap(UpstreamReset)
        # A new request gets a new connection.
        self.up.client.request(request())
        self.assertEqual(self.up.connects, 2)

    def test_loss_before_the_handshake(self) -> None:
        d = self.up.client.request(request())
        peer = self.up.accept(start=False)
        peer.transport.loseConnection()
        self.failureResultOf(d, UpstreamConnectError)


class IdleAndCloseTests(SynchronousTestCase):
    def test_idle_connection_closed_with_goaway(self) -> None:
        up = FakeH2Upstream(idle_timeout=10.0)
        d = up.client.request(request())
        peer = up.accept()
        up.reactor.advance(5.0)
        peer.respond(1, body=b"ok")
        read(self.successResultOf(d))
        up.reactor.advance(9.9)
        self.assertTrue(peer.transport.connected)
        # Used again: the idle clock starts over.
        d = up.client.request(request())
        peer.pump()
        peer.respond(3)
        self.successResultOf(d)
        up.reactor.advance(9.9)
        self.assertTrue(peer.transport.connected)
        up.reactor.advance(0.1)
        peer._receive(peer.transport.value())
        self.assertIsNotNone(peer.goaway)
        self.assertFalse(peer.transport.connected)
        self.assertEqual(up.reactor.getDelayedCalls(), [])

    def test_busy_connection_is_not_idle(self) -> None:
        up = FakeH2Upstream(idle_timeout=10.0)
        d = up.client.request(request(response_timeout=100.0))
        peer = up.accept()
        up.reactor.advance(50.0)
        self.assertTrue(peer.transport.connected)
        peer.respond(1)
        self.successResultOf(d)

    def test_close_closes_idle_and_refuses_new(self) -> None:
        up = FakeH2Upstream()
        d = up.client.request(request())
        peer = up.accept()
        peer.respond(1)
        self.successResultOf(d)
        closed = up.client.close()
        peer._receive(peer.transport.value())
        self.assertIsNotNone(peer.goaway)
        self.assertFalse(peer.transport.connected)
        self.assertIsNone(self.successResultOf(closed))
        self.failureResultOf(up.client.request(request()), UpstreamConnectError)

    def test_close_lets_busy_streams_finish(self) -> None:
        up = FakeH2Upstream()
        d = up.client.request(request())
        peer = up.accept()
        closed = up.client.close()
        self.successResultOf(closed)
        self.assertTrue(peer.transport.connected)
        peer.respond(1, body=b"ok")
        self.assertEqual(read(self.successResultOf(d)).data, b"ok")
        self.assertFalse(peer.transport.connected, "closed once its last stream ended")

    def test_close_with_nothing_open(self) -> None:
        up = FakeH2Upstream()
        self.assertIsNone(self.successResultOf(up.client.close()))
