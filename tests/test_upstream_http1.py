"""The HTTP/1.1 upstream client on fake time and fake wires.

``FakeUpstream`` runs an ``HTTP11Client`` on a ``MemoryReactorClock``; the
test plays the upstream by accepting connections and writing response bytes.
The doubles at the top are shared with the real-socket tests.
"""

from __future__ import annotations

import weakref
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionLost, TimeoutError
from twisted.internet.testing import (
    EventLoggingObserver,
    MemoryReactorClock,
    StringTransportWithDisconnection,
)
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.collector import collector_off, referrers
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
from txgateway.upstream.pool import HTTP11Client


@implementer(IBodySink)
class CollectingSink:
    """Keeps what a body delivers; can pause its body on the first write."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.finished = False
        self.failure: object = None

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def write(self, data: bytes) -> None:
        assert not self.finished and self.failure is None, "write after the end"
        self.chunks.append(data)

    def finish(self) -> None:
        assert not self.finished and self.failure is None, "finished twice"
        self.finished = True

    def abort(self, reason: object) -> None:
        assert not self.finished and self.failure is None, "ended twice"
        self.failure = reason


@implementer(IBody)
class ManualBody:
    """A request body the test feeds by hand, recording producer calls."""

    def __init__(self, length: int | None) -> None:
        self.length = length
        self.sink: IBodySink | None = None
        self.pauses = 0
        self.resumes = 0
        self.stopped = False

    def deliverTo(self, sink: IBodySink) -> None:
        assert self.sink is None, "delivered twice"
        self.sink = sink

    def pauseProducing(self) -> None:
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.resumes += 1

    def stopProducing(self) -> None:
        self.stopped = True


class FakeUpstream:
    """An ``HTTP11Client`` on a ``MemoryReactorClock`` whose connections the test completes."""

    def __init__(self, max_connections: int = 100, idle_timeout: float = 60.0) -> None:
        self.reactor = MemoryReactorClock()
        self.client = HTTP11Client(
            self.reactor,
            PoolConfig(max_connections_per_host=max_connections, idle_timeout=idle_timeout),
        )
        self._accepted = 0

    @property
    def connects(self) -> int:
        """How many TCP connections the client asked for."""
        return len(self.reactor.tcpClients)

    def accept(self, index: int | None = None) -> StringTransportWithDisconnection:
        """Complete connection attempt ``index`` (default: the next one) and return its wire."""
        if index is None:
            index = self._accepted
        self._accepted = max(self._accepted, index + 1)
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[index]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransportWithDisconnection(
            peerAddress=IPv4Address("TCP", host, port)
        )
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return transport


def request(
    method: bytes = b"GET",
    target: bytes = b"/",
    body: IBody | None = None,
    host: str = "10.0.0.1",
    port: int = 8080,
    headers: list[tuple[bytes, bytes]] | None = None,
    response_timeout: float = 30.0,
    connect_timeout: float = 2.0,
) -> UpstreamRequest:
    return UpstreamRequest(
        host=host,
        port=port,
        method=method,
        target=target,
        headers=headers if headers is not None else [(b"host", b"svc")],
        body=body,
        connect_timeout=connect_timeout,
        response_timeout=response_timeout,
    )


OK_HELLO = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"


def result(d: Deferred[Any]) -> list[Any]:
    """Collect what ``d`` fires with (a value or a Failure), without consuming errors twice."""
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def read(response: Response) -> CollectingSink:
    sink = CollectingSink()
    assert response.body is not None
    response.body.deliverTo(sink)
    return sink


class RequestFramingTests(SynchronousTestCase):
    """What goes on the wire for each kind of request body."""

    def setUp(self) -> None:
        self.up = FakeUpstream()

    def test_get_without_body(self) -> None:
        self.up.client.request(
            request(target=b"/a?b=1", headers=[(b"host", b"svc"), (b"x-a", b"1"), (b"x-a", b"2")])
        )
        wire = self.up.accept()
        self.assertEqual(wire.value(), b"GET /a?b=1 HTTP/1.1\r\nhost: svc\r\nx-a: 1\r\nx-a: 2\r\n\r\n")

    def test_post_without_body_says_length_zero(self) -> None:
        for method in (b"POST", b"PUT", b"PATCH"):
            up = FakeUpstream()
            up.client.request(request(method=method))
            wire = up.accept()
            self.assertEqual(
                wire.value(), method + b" / HTTP/1.1\r\nhost: svc\r\ncontent-length: 0\r\n\r\n"
            )

    def test_known_length_body(self) -> None:
        self.up.client.request(request(method=b"POST", body=BytesBody(b"payload")))
        wire = self.up.accept()
        self.assertEqual(
            wire.value(), b"POST / HTTP/1.1\r\nhost: svc\r\ncontent-length: 7\r\n\r\npayload"
        )
        self.assertIsNone(wire.producer, "the body is unregistered once sent")

    def test_unknown_length_body_is_chunked_and_registered_as_producer(self) -> None:
        body = ManualBody(None)
        self.up.client.request(request(method=b"POST", body=body))
        wire = self.up.accept()
        self.assertIs(wire.producer, body)
        self.assertTrue(wire.streaming)
        assert body.sink is not None
        body.sink.write(b"abc")
        body.sink.write(b"")
        body.sink.write(b"0123456789abcdef!")
        body.sink.finish()
        self.assertEqual(
            wire.value(),
            b"POST / HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n11\r\n0123456789abcdef!\r\n0\r\n\r\n",
        )
        self.assertIsNone(wire.producer)

    def test_streamed_body_of_known_length(self) -> None:
        body = ManualBody(6)
        d = self.up.client.request(request(method=b"PUT", body=body))
        wire = self.up.accept()
        assert body.sink is not None
        body.sink.write(b"abc")
        body.sink.write(b"def")
        body.sink.finish()
        self.assertTrue(wire.value().endswith(b"content-length: 6\r\n\r\nabcdef"))
        wire.protocol.dataReceived(OK_HELLO)
        self.assertEqual(self.successResultOf(d).status, 200)

    def test_body_longer_than_declared_aborts(self) -> None:
        body = ManualBody(3)
        d = self.up.client.request(request(method=b"POST", body=body))
        wire = self.up.accept()
        assert body.sink is not None
        body.sink.write(b"abcd")
        self.failureResultOf(d, BadRequest)
        self.assertTrue(wire.disconnected)
        self.assertNotIn(b"abcd", wire.value())

    def test_body_shorter_than_declared_aborts(self) -> None:
        body = ManualBody(10)
        d = self.up.client.request(request(method=b"POST", body=body))
        wire = self.up.accept()
        assert body.sink is not None
        body.sink.write(b"abc")
        body.sink.finish()
        self.failureResultOf(d, BadRequest)
        self.assertTrue(wire.disconnected)

    def test_body_abort_aborts_upstream_and_fails(self) -> None:
        body = ManualBody(None)
        d = self.up.client.request(request(method=b"POST", body=body))
        wire = self.up.accept()
        assert body.sink is not None
        body.sink.write(b"abc")
        body.sink.abort(Failure(ConnectionLost("client went away")))
        self.failureResultOf(d, ConnectionLost)
        self.assertTrue(wire.disconnected)
        # Writes after the abort go nowhere.
        size = len(wire.value())
        body.sink.write(b"more")
        self.assertEqual(len(wire.value()), size)

    def test_response_before_body_finished_closes_connection(self) -> None:
        """An early answer (413, say) is delivered; the connection is not reused."""
        body = ManualBody(None)
        d = self.up.client.request(request(method=b"POST", body=body))
        wire = self.up.accept()
        wire.protocol.dataReceived(b"HTTP/1.1 413 Too Large\r\ncontent-length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d).status, 413)
        self.assertTrue(wire.disconnecting or not wire.connected)
        self.up.client.request(request())
        self.assertEqual(self.up.connects, 2)


class ResponseTests(SynchronousTestCase):
    """Heads, bodies and their framings as the gateway sees them."""

    def setUp(self) -> None:
        self.up = FakeUpstream()

    def exchange(self, answer: bytes, method: bytes = b"GET") -> tuple[Response, StringTransportWithDisconnection]:
        d = self.up.client.request(request(method=method))
        wire = self.up.accept()
        wire.protocol.dataReceived(answer)
        return self.successResultOf(d), wire

    def test_head_fields(self) -> None:
        response, _ = self.exchange(
            b"HTTP/1.1 201 Made It\r\nContent-Type: text/plain\r\nSet-Cookie: a=1\r\n"
            b"set-cookie: b=2\r\nContent-Length: 5\r\n\r\nhello"
        )
        self.assertEqual(response.status, 201)
        self.assertEqual(response.reason, b"Made It")
        self.assertEqual(response.version, (1, 1))
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

    def test_head_split_across_reads(self) -> None:
        d = self.up.client.request(request())
        wire = self.up.accept()
        answer = b"HTTP/1.1 200 Fine\r\nx-long: " + b"v" * 100 + b"\r\ncontent-length: 3\r\n\r\nabc"
        for i in range(len(answer)):
            wire.protocol.dataReceived(answer[i : i + 1])
        response = self.successResultOf(d)
        self.assertEqual(response.reason, b"Fine")
        self.assertEqual(response.headers[0], (b"x-long", b"v" * 100))
        self.assertEqual(read(response).data, b"abc")

    def test_chunked(self) -> None:
        response, wire = self.exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        assert response.body is not None
        self.assertIsNone(response.body.length)
        sink = read(response)
        wire.protocol.dataReceived(b"6\r\n world\r\n0\r\n\r\n")
        self.assertEqual((sink.data, sink.finished), (b"hello world", True))
        self.up.client.request(request())
        self.assertEqual(self.up.connects, 1, "a complete chunked answer keeps the connection")

    def test_close_delimited(self) -> None:
        response, wire = self.exchange(b"HTTP/1.1 200 OK\r\n\r\nsome")
        assert response.body is not None
        self.assertIsNone(response.body.length)
        sink = read(response)
        wire.protocol.dataReceived(b" bytes")
        self.assertFalse(sink.finished)
        wire.loseConnection()
        self.assertEqual((sink.data, sink.finished), (b"some bytes", True))
        self.up.client.request(request())
        self.assertEqual(self.up.connects, 2)

    def test_close_delimited_reset_is_an_error(self) -> None:
        response, wire = self.exchange(b"HTTP/1.1 200 OK\r\n\r\nsome")
        sink = read(response)
        wire.protocol.connectionLost(Failure(ConnectionLost("reset")))
        self.assertIsInstance(sink.failure, Failure)
        assert isinstance(sink.failure, Failure)
        self.assertTrue(sink.failure.check(UpstreamReset))

    def test_head_request_has_empty_body_and_keeps_parsing(self) -> None:
        """HEAD answers carry Content-Length but no body; the next answer parses fine."""
        response, wire = self.exchange(
            b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n", method=b"HEAD"
        )
        assert response.body is not None
        self.assertEqual(response.body.length, 0)
        self.assertEqual(response.headers, [(b"content-length", b"1234")])
        sink = read(response)
        self.assertEqual((sink.data, sink.finished), (b"", True))
        d = self.up.client.request(request())
        self.assertEqual(self.up.connects, 1, "connection reused after HEAD")
        wire.protocol.dataReceived(OK_HELLO)
        self.assertEqual(read(self.successResultOf(d)).data, b"hello")

    def test_head_request_chunked_answer(self) -> None:
        response, wire = self.exchange(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", method=b"HEAD"
        )
        self.assertTrue(read(response).finished)
        d = self.up.client.request(request())
        wire.protocol.dataReceived(OK_HELLO)
        self.assertEqual(read(self.successResultOf(d)).data, b"hello")
        self.assertEqual(self.up.connects, 1)

    def test_no_content_and_not_modified(self) -> None:
        for status in (204, 304):
            up = FakeUpstream()
            d = up.client.request(request())
            wire = up.accept()
            wire.protocol.dataReceived(b"HTTP/1.1 %d X\r\ncontent-length: 10\r\n\r\n" % status)
            response = self.successResultOf(d)
            assert response.body is not None
            self.assertEqual((response.status, response.body.length), (status, 0))
            self.assertTrue(read(response).finished)
            d = up.client.request(request())
            wire.protocol.dataReceived(OK_HELLO)
            self.assertEqual(read(self.successResultOf(d)).data, b"hello")
            self.assertEqual(up.connects, 1)

    def test_informational_responses_are_skipped(self) -> None:
        d = self.up.client.request(request(method=b"POST", body=BytesBody(b"x")))
        wire = self.up.accept()
        wire.protocol.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertNoResult(d)
        wire.protocol.dataReceived(b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\n")
        self.assertNoResult(d)
        wire.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nx-final: 1\r\ncontent-length: 2\r\n\r\nok")
        response = self.successResultOf(d)
        self.assertEqual((response.status, response.headers[0]), (200, (b"x-final", b"1")))
        self.assertEqual(read(response).data, b"ok")

    def test_informational_and_final_in_one_read(self) -> None:
        response, _ = self.exchange(b"HTTP/1.1 100 Continue\r\n\r\n" + OK_HELLO)
        self.assertEqual(response.status, 200)
        self.assertEqual(read(response).data, b"hello")

    def test_switching_protocols_is_a_protocol_error(self) -> None:
        d = self.up.client.request(request())
        wire = self.up.accept()
        wire.protocol.dataReceived(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: x\r\n\r\n"
        )
        self.failureResultOf(d, UpstreamProtocolError)
        self.assertTrue(wire.disconnected)

    def test_garbage_is_a_protocol_error(self) -> None:
        d = self.up.client.request(request())
        wire = self.up.accept()
        wire.protocol.dataReceived(b"SSH-2.0-OpenSSH_9.2\r\n")
        self.failureResultOf(d, UpstreamProtocolError)
        self.assertTrue(wire.disconnected)
        self.up.client.request(request())
        self.assertEqual(self.up.connects, 2)

    def test_close_before_head_is_a_reset(self) -> None:
        d = self.up.client.request(request())
        wire = self.up.accept()
        wire.protocol.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-le")
        wire.loseConnection()
        self.failureResultOf(d, UpstreamReset)

    def test_close_mid_body_aborts_the_body(self) -> None:
        response, wire = self.exchange(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        sink = read(response)
        wire.loseConnection()
        self.assertEqual(sink.data, b"abc")
        assert isinstance(sink.failure, Failure)
        self.assertTrue(sink.failure.check(UpstreamReset))

    def test_garbage_mid_body_aborts_the_body(self) -> None:
        response, wire = self.exchange(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n"
        )
        sink = read(response)
        wire.protocol.dataReceived(b"zz\r\nnot a chunk\r\n")
        self.assertEqual(sink.data, b"abc")
        assert isinstance(sink.failure, Failure)
        self.assertTrue(sink.failure.check(UpstreamProtocolError))
        self.assertTrue(wire.disconnected)

    def test_http10_answer_is_not_reused(self) -> None:
        response, _ = self.exchange(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok")
        self.assertEqual(response.version, (1, 0))
        self.assertTrue(read(response).finished)
        self.up.client.request(request())
        self.assertEqual(self.up.connects, 2)

    def test_connection_close_is_not_reused(self) -> None:
        response, wire = self.exchange(
            b"HTTP/1.1 200 OK\r\nConnection: Close\r\ncontent-length: 2\r\n\r\nok"
        )
        self.assertTrue(read(response).finished)
        self.assertFalse(wire.connected)
        self.up.client.request(request())
        self.assertEqual(self.up.connects, 2)

    def test_extra_bytes_after_response_are_not_reused(self) -> None:
        response, wire = self.exchange(OK_HELLO + b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        self.assertEqual(read(response).data, b"hello")
        self.assertFalse(wire.connected)
        self.up.client.request(request())
        self.assertEqual(self.up.connects, 2)

    def test_unsolicited_bytes_on_idle_connection_close_it(self) -> None:
        response, wire = self.exchange(OK_HELLO)
        read(response)
        wire.protocol.dataReceived(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        self.assertTrue(wire.disconnected)
        self.up.client.request(request())
        self.assertEqual(self.up.connects, 2)


class ResponseBodyFlowTests(SynchronousTestCase):
    """Backpressure and late delivery of response bodies."""

    def setUp(self) -> None:
        self.up = FakeUpstream()

    def start(self, answer: bytes) -> tuple[Response, StringTransportWithDisconnection]:
        d = self.up.client.request(request())
        wire = self.up.accept()
        wire.protocol.dataReceived(answer)
        return self.successResultOf(d), wire

    def test_bytes_before_delivery_are_held_and_the_socket_paused(self) -> None:
        response, wire = self.start(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc")
        self.assertEqual(wire.producerState, "paused")
        wire.protocol.dataReceived(b"def")  # already in flight when the pause hit
        self.up.reactor.advance(1.0)  # the consumer takes its time
        sink = read(response)
        self.assertEqual(wire.producerState, "producing")
        self.assertEqual(sink.data, b"abcdef")
        wire.protocol.dataReceived(b"ghi")
        self.assertEqual((sink.data, sink.finished), (b"abcdefghi", True))

    def test_whole_response_before_delivery_frees_the_connection(self) -> None:
        response, wire = self.start(OK_HELLO)
        self.assertEqual(wire.producerState, "producing")
        d = self.up.client.request(request())
        self.assertEqual(self.up.connects, 1)
        wire.protocol.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nbye")
        self.assertEqual(read(response).data, b"hello")
        self.assertEqual(read(self.successResultOf(d)).data, b"bye")

    def test_consumer_pause_pauses_the_socket(self) -> None:
        response, wire = self.start(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n")
        assert response.body is not None
        sink = read(response)
        wire.protocol.dataReceived(b"abc")
        response.body.pauseProducing()
        self.assertEqual(wire.producerState, "paused")
        wire.protocol.dataReceived(b"def")
        self.assertEqual(sink.data, b"abc", "nothing is written to a paused consumer")
        response.body.resumeProducing()
        self.assertEqual(wire.producerState, "producing")
        self.assertEqual(sink.data, b"abcdef")
        wire.protocol.dataReceived(b"ghi")
        self.assertEqual((sink.data, sink.finished), (b"abcdefghi", True))

    def test_finish_waits_for_a_paused_consumer(self) -> None:
        response, wire = self.start(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nabc")
        assert response.body is not None
        sink = read(response)
        response.body.pauseProducing()
        wire.protocol.dataReceived(b"def")
        self.assertFalse(sink.finished)
        self.assertEqual(wire.producerState, "producing", "a finished response frees the socket")
        response.body.resumeProducing()
        self.assertEqual((sink.data, sink.finished), (b"abcdef", True))

    def test_stop_producing_aborts_and_never_reuses(self) -> None:
        response, wire = self.start(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc")
        assert response.body is not None
        sink = read(response)
        response.body.stopProducing()
        self.assertTrue(wire.disconnected)
        self.assertFalse(sink.finished)
        self.assertIsNone(sink.failure)
        self.up.client.request(request())
        self.assertEqual(self.up.connects, 2)

    def test_stop_producing_after_completion_leaves_the_connection_alone(self) -> None:
        response, wire = self.start(OK_HELLO)
        assert response.body is not None
        read(response)
        response.body.stopProducing()
        self.assertTrue(wire.connected)
        self.up.client.request(request())
        self.assertEqual(self.up.connects, 1)

    def test_deliver_twice_is_refused(self) -> None:
        response, _ = self.start(OK_HELLO)
        read(response)
        self.assertRaises(RuntimeError, read, response)


class TimeoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.up = FakeUpstream(max_connections=1)

    def test_response_timeout(self) -> None:
        d = self.up.client.request(request(response_timeout=5.0))
        wire = self.up.accept()
        self.up.reactor.advance(4.9)
        self.assertNoResult(d)
        self.up.reactor.advance(0.1)
        self.failureResultOf(d, UpstreamTimeout)
        self.assertTrue(wire.disconnected)

    def test_timeout_stops_once_the_head_is_in(self) -> None:
        d = self.up.client.request(request(response_timeout=5.0))
        wire = self.up.accept()
        wire.protocol.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")
        response = self.successResultOf(d)
        self.up.reactor.advance(60)
        sink = read(response)
        wire.protocol.dataReceived(b"0123456789")
        self.assertTrue(sink.finished)
        self.assertEqual(len(self.up.reactor.getDelayedCalls()), 1, "only the idle timer")
        self.assertEqual(self.up.reactor.getDelayedCalls()[0].getTime(), 120.0)

    def second_request(self, first_timeout: float, answered_after: float, timeout: float) -> tuple[Any, Any]:
        """A request answered after ``answered_after`` s, then a second one on the same connection."""
        d = self.up.client.request(request(response_timeout=first_timeout))
        wire = self.up.accept()
        self.up.reactor.advance(answered_after)
        wire.protocol.dataReceived(OK_HELLO)
        read(self.successResultOf(d))
        second = self.up.client.request(request(response_timeout=timeout))
        self.assertEqual(self.up.connects, 1)
        return second, wire

    def test_a_reused_connection_times_out_each_request_at_its_own_deadline(self) -> None:
        # The connection's one timer is left at the first request's deadline
        # (t=5); the second request's (t=8) is later: the timer waits on.
        d, wire = self.second_request(5.0, 3, 5.0)
        self.up.reactor.advance(4.9)
        self.assertNoResult(d)
        self.up.reactor.advance(0.1)
        self.failureResultOf(d, UpstreamTimeout)
        self.assertTrue(wire.disconnected)

    def test_a_shorter_deadline_brings_the_connection_timer_forward(self) -> None:
        d, _ = self.second_request(30.0, 1, 1.0)
        self.up.reactor.advance(0.9)
        self.assertNoResult(d)
        self.up.reactor.advance(0.1)
        self.failureResultOf(d, UpstreamTimeout)

    def test_upload_longer_than_the_timeout_is_not_cut_off(self) -> None:
        body = ManualBody(length=None)
        d = self.up.client.request(request(method=b"POST", body=body, response_timeout=5.0))
        self.up.accept()
        assert body.sink is not None
        for _ in range(10):  # 40 s of upload, a piece every 4 s
            self.up.reactor.advance(4.0)
            body.sink.write(b"piece")
        self.assertNoResult(d)
        body.sink.finish()
        # The full timeout runs again from the end of the body.
        self.up.reactor.advance(4.9)
        self.assertNoResult(d)
        self.up.reactor.advance(0.1)
        self.failureResultOf(d, UpstreamTimeout)

    def test_stalled_upload_times_out(self) -> None:
        body = ManualBody(length=100)
        d = self.up.client.request(request(method=b"POST", body=body, response_timeout=5.0))
        wire = self.up.accept()
        assert body.sink is not None
        body.sink.write(b"x" * 10)
        self.up.reactor.advance(5.0)
        self.failureResultOf(d, UpstreamTimeout)
        self.assertTrue(wire.disconnected)

    def test_waiting_for_a_connection_counts(self) -> None:
        first = self.up.client.request(request(response_timeout=10.0))
        wire = self.up.accept()
        second = self.up.client.request(request(response_timeout=3.0))
        self.up.reactor.advance(2.0)
        wire.protocol.dataReceived(OK_HELLO)
        read(self.successResultOf(first))
        self.assertEqual(self.up.connects, 1, "the waiter got the freed connection")
        self.up.reactor.advance(1.0)
        self.failureResultOf(second, UpstreamTimeout)
        self.assertTrue(wire.disconnected)

    def test_timeout_while_queued(self) -> None:
        self.up.client.request(request())
        wire = self.up.accept()
        waiting = self.up.client.request(request(response_timeout=3.0))
        self.up.reactor.advance(3.0)
        self.failureResultOf(waiting, UpstreamTimeout)
        wire.protocol.dataReceived(OK_HELLO)
        self.assertEqual(wire.value().count(b"GET /"), 1, "the timed-out request was never sent")

    def test_connect_timeout_is_passed_on_and_reported(self) -> None:
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        d = self.up.client.request(request(connect_timeout=1.5))
        host, port, factory, timeout, _ = self.up.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("10.0.0.1", 8080, 1.5))
        factory.clientConnectionFailed(self.up.reactor.connectors[0], Failure(TimeoutError()))
        failure = self.failureResultOf(d, UpstreamConnectError)
        self.assertIn("10.0.0.1:8080", failure.value.message)
        self.assertIn("timeout", failure.value.message)
        warnings = [e for e in observer if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["address"], "10.0.0.1:8080")

    def test_connect_failure_frees_the_slot(self) -> None:
        self.flushLoggedErrors()
        EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        d1 = self.up.client.request(request())
        d2 = self.up.client.request(request())
        self.assertEqual(self.up.connects, 1)
        _, _, factory, _, _ = self.up.reactor.tcpClients[0]
        factory.clientConnectionFailed(self.up.reactor.connectors[0], Failure(ConnectionLost("refused")))
        self.failureResultOf(d1, UpstreamConnectError)
        self.assertEqual(self.up.connects, 2, "the waiter connects in the freed slot")
        wire = self.up.accept(1)
        wire.protocol.dataReceived(OK_HELLO)
        self.assertEqual(self.successResultOf(d2).status, 200)


class PoolTests(SynchronousTestCase):
    def test_keep_alive_reuse(self) -> None:
        up = FakeUpstream()
        wire = None
        for i in range(5):
            d = up.client.request(request(target=b"/%d" % i))
            if wire is None:
                wire = up.accept()
            wire.protocol.dataReceived(OK_HELLO)
            self.assertEqual(read(self.successResultOf(d)).data, b"hello")
        assert wire is not None
        self.assertEqual(up.connects, 1)
        self.assertEqual(wire.value().count(b"GET /"), 5)

    def test_next_request_from_body_finish_gets_the_same_connection(self) -> None:
        """A consumer chaining its next request from ``finish()`` reuses the connection."""
        up = FakeUpstream()
        chained: list[Deferred[Response]] = []

        class ChainingSink(CollectingSink):
            def finish(self) -> None:
                super().finish()
                chained.append(up.client.request(request(target=b"/next")))

        d = up.client.request(request())
        wire = up.accept()
        d.addCallback(lambda response: response.body.deliverTo(ChainingSink()))
        wire.protocol.dataReceived(OK_HELLO)
        self.assertEqual(len(chained), 1)
        self.assertEqual(up.connects, 1)
        self.assertIn(b"GET /next ", wire.value())

    def test_next_request_from_a_bodiless_head_gets_the_same_connection(self) -> None:
        up = FakeUpstream()
        chained: list[Deferred[Response]] = []
        d = up.client.request(request(method=b"HEAD"))
        wire = up.accept()
        d.addCallback(lambda _: chained.append(up.client.request(request(target=b"/next"))))
        wire.protocol.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")
        self.assertEqual(len(chained), 1)
        self.assertEqual(up.connects, 1)
        self.assertIn(b"GET /next ", wire.value())
        wire.protocol.dataReceived(OK_HELLO)
        self.assertEqual(read(self.successResultOf(chained[0])).data, b"hello")

    def test_pools_are_per_host_and_port(self) -> None:
        up = FakeUpstream()
        for port in (1, 2):
            d = up.client.request(request(port=port))
            up.accept().protocol.dataReceived(OK_HELLO)
            read(self.successResultOf(d))
        up.client.request(request(port=3))
        self.assertEqual(up.connects, 3)
        up.client.request(request(port=1))
        self.assertEqual(up.connects, 3)

    def test_idle_connections_are_reused_last_in_first_out(self) -> None:
        up = FakeUpstream()
        d1 = up.client.request(request())
        d2 = up.client.request(request())
        wire1, wire2 = up.accept(), up.accept()
        wire1.protocol.dataReceived(OK_HELLO)
        wire2.protocol.dataReceived(OK_HELLO)
        read(self.successResultOf(d1))
        read(self.successResultOf(d2))
        up.client.request(request(target=b"/next"))
        self.assertIn(b"/next", wire2.value())
        self.assertNotIn(b"/next", wire1.value())

    def test_idle_timeout(self) -> None:
        up = FakeUpstream(idle_timeout=10.0)
        d = up.client.request(request())
        wire = up.accept()
        wire.protocol.dataReceived(OK_HELLO)
        read(self.successResultOf(d))
        up.reactor.advance(6)
        d = up.client.request(request())  # reuse at t=6 restarts the idle clock
        wire.protocol.dataReceived(OK_HELLO)
        read(self.successResultOf(d))
        up.reactor.advance(9.9)
        self.assertTrue(wire.connected)
        up.reactor.advance(0.1)
        self.assertFalse(wire.connected)
        up.client.request(request())
        self.assertEqual(up.connects, 2)

    def test_idle_connection_closed_by_upstream_is_dropped(self) -> None:
        up = FakeUpstream()
        d = up.client.request(request())
        wire = up.accept()
        wire.protocol.dataReceived(OK_HELLO)
        read(self.successResultOf(d))
        wire.loseConnection()
        self.assertEqual(up.reactor.getDelayedCalls(), [], "its idle timer is gone too")
        up.client.request(request())
        self.assertEqual(up.connects, 2)

    def test_max_connections_queue_in_order(self) -> None:
        up = FakeUpstream(max_connections=2)
        ds = [up.client.request(request(target=b"/%d" % i)) for i in range(5)]
        self.assertEqual(up.connects, 2)
        wire1, wire2 = up.accept(), up.accept()
        wire1.protocol.dataReceived(OK_HELLO)
        read(self.successResultOf(ds[0]))
        self.assertIn(b"GET /2 ", wire1.value(), "the oldest waiter goes first")
        wire2.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
        read(self.successResultOf(ds[1]))
        self.assertEqual(up.connects, 3, "a closed connection's slot goes to the next waiter")
        wire3 = up.accept()
        self.assertIn(b"GET /3 ", wire3.value())
        ds[4].cancel()
        self.failureResultOf(ds[4], CancelledError)
        wire1.protocol.dataReceived(OK_HELLO)
        wire3.protocol.dataReceived(OK_HELLO)
        self.assertEqual(up.connects, 3)
        self.assertEqual([wire1.value().count(b"GET"), wire3.value().count(b"GET")], [2, 1])

    def test_stale_connection_retried_once_on_a_fresh_one(self) -> None:
        up = FakeUpstream()
        d = up.client.request(request())
        wire = up.accept()
        wire.protocol.dataReceived(OK_HELLO)
        read(self.successResultOf(d))
        d = up.client.request(request(target=b"/again"))
        self.assertIn(b"/again", wire.value())
        wire.loseConnection()  # the upstream had closed it meanwhile
        self.assertNoResult(d)
        self.assertEqual(up.connects, 2)
        fresh = up.accept()
        self.assertIn(b"GET /again ", fresh.value())
        fresh.protocol.dataReceived(OK_HELLO)
        self.assertEqual(read(self.successResultOf(d)).data, b"hello")

    def test_stale_retry_sends_an_empty_body_again(self) -> None:
        up = FakeUpstream()
        d = up.client.request(request())
        wire = up.accept()
        wire.protocol.dataReceived(OK_HELLO)
        read(self.successResultOf(d))
        d = up.client.request(request(method=b"POST", body=BytesBody(b"")))
        wire.loseConnection()
        fresh = up.accept()
        self.assertEqual(fresh.value(), b"POST / HTTP/1.1\r\nhost: svc\r\ncontent-length: 0\r\n\r\n")
        fresh.protocol.dataReceived(OK_HELLO)
        self.assertEqual(self.successResultOf(d).status, 200)

    def test_fresh_connection_lost_is_not_retried(self) -> None:
        up = FakeUpstream()
        d = up.client.request(request())
        up.accept().loseConnection()
        self.failureResultOf(d, UpstreamReset)
        self.assertEqual(up.connects, 1)

    def test_stale_retry_happens_once(self) -> None:
        up = FakeUpstream()
        d = up.client.request(request())
        wire = up.accept()
        wire.protocol.dataReceived(OK_HELLO)
        read(self.successResultOf(d))
        d2 = up.client.request(request())
        d3 = up.client.request(request())  # second connection
        wire.loseConnection()
        retry = up.accept(2)
        other = up.accept(1)
        other.protocol.dataReceived(OK_HELLO)
        read(self.successResultOf(d3))
        retry.loseConnection()
        self.failureResultOf(d2, UpstreamReset)
        self.assertEqual(up.connects, 3)

    def test_no_retry_with_a_body(self) -> None:
        up = FakeUpstream()
        d = up.client.request(request())
        wire = up.accept()
        wire.protocol.dataReceived(OK_HELLO)
        read(self.successResultOf(d))
        d = up.client.request(request(method=b"POST", body=BytesBody(b"data")))
        wire.loseConnection()
        self.failureResultOf(d, UpstreamReset)
        self.assertEqual(up.connects, 1)

    def test_no_retry_once_bytes_arrived(self) -> None:
        up = FakeUpstream()
        d = up.client.request(request())
        wire = up.accept()
        wire.protocol.dataReceived(OK_HELLO)
        read(self.successResultOf(d))
        d = up.client.request(request())
        wire.protocol.dataReceived(b"HTTP/1.1 2")
        wire.loseConnection()
        self.failureResultOf(d, UpstreamReset)
        self.assertEqual(up.connects, 1)


class CancellationTests(SynchronousTestCase):
    def test_cancel_on_a_connection_aborts_it(self) -> None:
        up = FakeUpstream()
        d = up.client.request(request())
        wire = up.accept()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(wire.disconnected)
        wire.protocol.dataReceived(OK_HELLO)  # late answer: ignored
        up.client.request(request())
        self.assertEqual(up.connects, 2)

    def test_cancel_while_connecting(self) -> None:
        up = FakeUpstream(max_connections=1)
        d = up.client.request(request())
        waiting = up.client.request(request(target=b"/second"))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(up.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(up.connects, 2, "the freed slot serves the waiter")
        wire = up.accept(1)
        self.assertIn(b"/second", wire.value())
        wire.protocol.dataReceived(OK_HELLO)
        self.assertEqual(self.successResultOf(waiting).status, 200)

    def test_cancel_after_the_head_is_a_no_op(self) -> None:
        up = FakeUpstream()
        d = up.client.request(request())
        wire = up.accept()
        wire.protocol.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        response = self.successResultOf(d)
        d.cancel()
        sink = read(response)
        wire.protocol.dataReceived(b"ok")
        self.assertEqual((sink.data, sink.finished), (b"ok", True))

    def test_cancel_from_a_timeout_does_not_double_fire(self) -> None:
        up = FakeUpstream()
        d = up.client.request(request(response_timeout=1.0))
        up.accept()
        d.cancel()
        up.reactor.advance(2.0)
        self.failureResultOf(d, CancelledError)


class FreedByReferenceCountingTests(SynchronousTestCase):
    def test_a_closed_upstream_connection_is_freed_without_a_garbage_collection(self) -> None:
        """An upstream that closes after each response (``Connection: close``)
        must not leave a reference cycle per connection for the collector."""
        up = FakeUpstream()
        d = up.client.request(request())
        wire = up.accept()
        protocol = wire.protocol
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nhello")
        self.assertEqual(read(self.successResultOf(d)).data, b"hello")
        self.assertFalse(wire.connected)
        del wire.protocol  # as Twisted's TCP transport lets go of its protocol once closed
        gone = weakref.ref(protocol)
        with collector_off():
            del protocol, wire, d
            self.assertIsNone(gone(), referrers(gone))


class CloseTests(SynchronousTestCase):
    def test_close_closes_idle_and_refuses_new(self) -> None:
        up = FakeUpstream()
        d1, d2 = up.client.request(request()), up.client.request(request())
        wire1, wire2 = up.accept(), up.accept()
        wire1.protocol.dataReceived(OK_HELLO)
        read(self.successResultOf(d1))
        closed = up.client.close()
        self.assertIsNone(self.successResultOf(closed))
        self.assertFalse(wire1.connected)
        self.assertTrue(wire2.connected, "in-flight requests are not aborted")
        self.failureResultOf(up.client.request(request()), UpstreamConnectError)
        wire2.protocol.dataReceived(OK_HELLO)
        read(self.successResultOf(d2))
        self.assertFalse(wire2.connected, "closed instead of pooled")
        self.assertEqual(up.reactor.getDelayedCalls(), [])

    def test_close_waits_for_connections_to_go(self) -> None:
        up = FakeUpstream()
        d = up.client.request(request())
        wire = up.accept()
        wire.protocol.dataReceived(OK_HELLO)
        read(self.successResultOf(d))
        wire.loseConnection = lambda: setattr(wire, "disconnecting", True)  # type: ignore[method-assign]
        closed = up.client.close()
        self.assertNoResult(closed)
        wire.protocol.connectionLost(Failure(ConnectionLost()))
        self.successResultOf(closed)

    def test_close_with_nothing_open(self) -> None:
        self.successResultOf(FakeUpstream().client.close())
