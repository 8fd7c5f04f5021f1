"""The downstream HTTP/1.1 protocol, on fake wires and a fake clock.

The gateway behind the protocol is scripted here so each test shows one wire
behaviour: framing, pipelining order, 100-continue, limits, timeouts, and
what happens when either side goes away.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.collector import collector_off, referrers
from txgateway.body import BytesBody
from txgateway.config.model import GatewayConfig, Limits, ServerConfig
from txgateway.errors import GatewayError, NotFound, PayloadTooLarge
from txgateway.interfaces import IBody, IBodySink
from txgateway.messages import Response
from txgateway.pipeline.context import RequestContext
from txgateway.pipeline.request_id import RequestIds
from txgateway.protocols.http1 import HTTP11ServerFactory, HTTP11ServerProtocol
from txgateway.runtime import Runtime


class ScriptedGateway:
    """Answers each request with whatever ``answer(ctx)`` returns."""

    def __init__(self, answer: Callable[[RequestContext], Deferred[Response]], limits: Limits = Limits()) -> None:
        self.config = GatewayConfig(server=ServerConfig(limits=limits))
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
                from twisted.internet.defer import fail

                return fail(PayloadTooLarge())
            ctx.body.max_bytes = limit
        return self.answer(ctx)


@implementer(IBodySink)
class CollectingSink:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.finished = False
        self.aborted: object = None

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
        self.sink: IBodySink | None = None
        self.paused = 0
        self.resumed = 0
        self.stopped = False

    def deliverTo(self, sink: IBodySink) -> None:
        self.sink = sink

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        self.stopped = True


def ok(body: bytes = b"hello", status: int = 200) -> Deferred[Response]:
    return succeed(Response(status, [(b"content-type", b"text/plain")], BytesBody(body)))


class Connection:
    def __init__(self, gateway: ScriptedGateway, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.factory = HTTP11ServerFactory(lambda: gateway, self.clock)  # type: ignore[arg-type,return-value]
        self.protocol = self.factory.buildProtocol(None)
        assert isinstance(self.protocol, HTTP11ServerProtocol)
        self.transport = StringTransport(peerAddress=None)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def output(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value


def responses(raw: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Split simple Content-Length framed responses (enough for these tests)."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b": ")
            headers[name.lower()] = value
        length = int(headers.get(b"content-length", b"0"))
        out.append((status, headers, rest[:length]))
        raw = rest[length:]
    return out


class FramingTests(SynchronousTestCase):
    def test_simple_get(self) -> None:
        conn = Connection(ScriptedGateway(lambda ctx: ok()))
        conn.send(b"GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\n\r\n")
        [(status, headers, body)] = responses(conn.output())
        self.assertEqual((status, body), (200, b"hello"))
        self.assertEqual(headers[b"content-length"], b"5")
        self.assertFalse(conn.transport.disconnecting)

    def test_context_carries_request(self) -> None:
        gateway = ScriptedGateway(lambda ctx: ok())
        conn = Connection(gateway)
        conn.send(b"GET /p/q?x=1&y=2 HTTP/1.1\r\nHost: h.test\r\nX-A: 1\r\nX-A: 2\r\n\r\n")
        [ctx] = gateway.seen
        self.assertEqual((ctx.method, ctx.path, ctx.query, ctx.host), (b"GET", "/p/q", b"x=1&y=2", "h.test"))
        self.assertEqual([v for n, v in ctx.headers if n == b"x-a"], [b"1", b"2"])

    def test_absolute_form_target(self) -> None:
        gateway = ScriptedGateway(lambda ctx: ok())
        conn = Connection(gateway)
        conn.send(b"GET http://other.test:81/x?q HTTP/1.1\r\nHost: h.test\r\n\r\n")
        [ctx] = gateway.seen
        self.assertEqual((ctx.path, ctx.query, ctx.host), ("/x", b"q", "other.test:81"))

    def test_head_has_no_body(self) -> None:
        conn = Connection(ScriptedGateway(lambda ctx: ok(b"abcdef")))
        conn.send(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n")
        out = conn.output()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK\r\n"))
        head, _, rest = out.partition(b"\r\n\r\n")
        self.assertNotIn(b"content-length: 6", head)
        # The next response follows the first head directly.
        self.assertTrue(rest.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(rest.endswith(b"abcdef"))

    def test_204_and_304_have_no_body(self) -> None:
        for status in (204, 304):
            conn = Connection(ScriptedGateway(lambda ctx, s=status: succeed(Response(s, [], None))))  # type: ignore[misc]
            conn.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            out = conn.output()
            self.assertTrue(out.startswith(b"HTTP/1.1 %d " % status))
            self.assertTrue(out.endswith(b"\r\n\r\n"))
            self.assertNotIn(b"content-length", out)
            self.assertNotIn(b"transfer-encoding", out)

    def test_streamed_response_is_chunked_for_http11(self) -> None:
        body = ControlledBody(length=None)
        conn = Connection(ScriptedGateway(lambda ctx: succeed(Response(200, [], body))))
        conn.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertIn(b"transfer-encoding: chunked", conn.output())
        assert body.sink is not None
        body.sink.write(b"hello")
        body.sink.write(b"")
        body.sink.write(b"world!")
        self.assertEqual(conn.output(), b"5\r\nhello\r\n6\r\nworld!\r\n")
        body.sink.finish()
        self.assertEqual(conn.output(), b"0\r\n\r\n")
        self.assertFalse(conn.transport.disconnecting)

    def test_streamed_response_is_close_delimited_for_http10(self) -> None:
        body = ControlledBody(length=None)
        conn = Connection(ScriptedGateway(lambda ctx: succeed(Response(200, [], body))))
        conn.send(b"GET / HTTP/1.0\r\n\r\n")
        head = conn.output()
        self.assertNotIn(b"chunked", head)
        self.assertIn(b"connection: close", head)
        assert body.sink is not None
        body.sink.write(b"data")
        body.sink.finish()
        self.assertEqual(conn.output(), b"data")
        self.assertTrue(conn.transport.disconnecting)

    def test_http10_keep_alive(self) -> None:
        conn = Connection(ScriptedGateway(lambda ctx: ok()))
        conn.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        self.assertIn(b"connection: keep-alive", conn.output())
        self.assertFalse(conn.transport.disconnecting)

    def test_connection_close_is_honoured(self) -> None:
        conn = Connection(ScriptedGateway(lambda ctx: ok()))
        conn.send(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        self.assertIn(b"connection: close", conn.output())
        self.assertTrue(conn.transport.disconnecting)

    def test_response_backpressure_registers_producer(self) -> None:
        body = ControlledBody(length=10)
        conn = Connection(ScriptedGateway(lambda ctx: succeed(Response(200, [], body))))
        conn.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertIs(conn.transport.producer, body)
        self.assertTrue(conn.transport.streaming)
        assert body.sink is not None
        body.sink.write(b"0123456789")
        body.sink.finish()
        self.assertIsNone(conn.transport.producer)


class PipeliningTests(SynchronousTestCase):
    def test_pipelined_requests_answered_in_order(self) -> None:
        pending: list[Deferred[Response]] = []

        def answer(ctx: RequestContext) -> Deferred[Response]:
            d: Deferred[Response] = Deferred()
            pending.append(d)
            return d

        gateway = ScriptedGateway(answer)
        conn = Connection(gateway)
        conn.send(
            b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"
            b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n"
            b"GET /3 HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        # One at a time: the second is not dispatched until the first is answered.
        self.assertEqual(len(pending), 1)
        self.assertEqual(conn.transport.producerState, "paused")
        pending[0].callback(Response(200, [], BytesBody(b"one")))
        pending[1].callback(Response(200, [], BytesBody(b"two")))
        pending[2].callback(Response(200, [], BytesBody(b"three")))
        bodies = [b for _, _, b in responses(conn.output())]
        self.assertEqual(bodies, [b"one", b"two", b"three"])
        self.assertEqual([c.path for c in gateway.seen], ["/1", "/2", "/3"])
        self.assertEqual(conn.transport.producerState, "producing")


class RequestBodyTests(SynchronousTestCase):
    def _consume(self, gateway_seen: list[RequestContext]) -> CollectingSink:
        sink = CollectingSink()
        body = gateway_seen[-1].body
        assert body is not None
        body.deliverTo(sink)
        return sink

    def test_content_length_body_streams(self) -> None:
        pending: list[Deferred[Response]] = []
        gateway = ScriptedGateway(lambda ctx: pending.append(Deferred()) or pending[-1])  # type: ignore[func-returns-value]
        conn = Connection(gateway)
        conn.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n01234")
        body = gateway.seen[0].body
        assert body is not None
        self.assertEqual(body.length, 10)
        sink = self._consume(gateway.seen)
        self.assertEqual(b"".join(sink.data), b"01234")
        conn.send(b"56789")
        self.assertEqual(b"".join(sink.data), b"0123456789")
        self.assertTrue(sink.finished)

    def test_chunked_body_streams(self) -> None:
        gateway = ScriptedGateway(lambda ctx: Deferred())
        conn = Connection(gateway)
        conn.send(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        body = gateway.seen[0].body
        assert body is not None
        self.assertIsNone(body.length)
        sink = self._consume(gateway.seen)
        conn.send(b"1\r\n!\r\n0\r\n\r\n")
        self.assertEqual(b"".join(sink.data), b"hello!")
        self.assertTrue(sink.finished)

    def test_consumer_backpressure_pauses_reading(self) -> None:
        gateway = ScriptedGateway(lambda ctx: Deferred())
        conn = Connection(gateway)
        conn.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n")
        body = gateway.seen[0].body
        assert body is not None
        body.deliverTo(CollectingSink())
        body.pauseProducing()
        self.assertEqual(conn.transport.producerState, "paused")
        body.resumeProducing()
        self.assertEqual(conn.transport.producerState, "producing")

    def test_unconsumed_body_is_bounded(self) -> None:
        gateway = ScriptedGateway(lambda ctx: Deferred())
        conn = Connection(gateway)
        conn.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\n")
        conn.send(b"x" * 70000)
        # Nobody reads yet: the connection stops reading instead of buffering on.
        self.assertEqual(conn.transport.producerState, "paused")
        sink = self._consume(gateway.seen)
        self.assertEqual(sum(map(len, sink.data)), 70000)
        self.assertEqual(conn.transport.producerState, "producing")

    def test_expect_continue_sent_only_when_body_wanted(self) -> None:
        gateway = ScriptedGateway(lambda ctx: Deferred())
        conn = Connection(gateway)
        conn.send(b"PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        self.assertEqual(conn.output(), b"")
        self._consume(gateway.seen)
        self.assertEqual(conn.output(), b"HTTP/1.1 100 Continue\r\n\r\n")

    def test_expect_continue_refused_without_reading(self) -> None:
        conn = Connection(ScriptedGateway(lambda ctx: _fail(NotFound())))
        conn.send(b"PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        out = conn.output()
        self.assertTrue(out.startswith(b"HTTP/1.1 404 "))
        self.assertNotIn(b"100 Continue", out)
        # The body was never read, so the connection cannot be reused.
        self.assertIn(b"connection: close", out)
        self.assertTrue(conn.transport.disconnecting)

    def test_declared_body_over_limit_is_413(self) -> None:
        gateway = ScriptedGateway(lambda ctx: ok(), Limits(max_body_bytes=10))
        conn = Connection(gateway)
        conn.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n")
        [(status, _, body)] = responses(conn.output())
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(body)["error"], "payload_too_large")

    def test_chunked_body_over_limit_is_413_and_aborts_consumer(self) -> None:
        gateway = ScriptedGateway(lambda ctx: Deferred(), Limits(max_body_bytes=10))
        conn = Connection(gateway)
        conn.send(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
        sink = self._consume(gateway.seen)
        conn.send(b"8\r\n12345678\r\n8\r\n12345678\r\n")
        self.assertIsNotNone(sink.aborted)
        [(status, headers, _)] = responses(conn.output())
        self.assertEqual(status, 413)
        self.assertEqual(headers[b"connection"], b"close")
        self.assertTrue(conn.transport.disconnecting)


def _fail(error: GatewayError) -> Deferred[Response]:
    from twisted.internet.defer import fail

    return fail(error)


class ErrorTests(SynchronousTestCase):
    def test_garbage_is_400_json(self) -> None:
        conn = Connection(ScriptedGateway(lambda ctx: ok()))
        conn.send(b"\x16\x03\x01 not http\r\n\r\n")
        [(status, headers, body)] = responses(conn.output())
        self.assertEqual(status, 400)
        self.assertEqual(headers[b"content-type"], b"application/json")
        self.assertEqual(json.loads(body)["error"], "bad_request")
        self.assertTrue(conn.transport.disconnecting)

    def test_protocol_errors_carry_a_request_id(self) -> None:
        conn = Connection(ScriptedGateway(lambda ctx: ok()))
        conn.send(b"NOT HTTP AT ALL\r\n\r\n")
        [(status, headers, body)] = responses(conn.output())
        self.assertEqual(status, 400)
        request_id = json.loads(body)["request_id"]
        self.assertTrue(request_id)
        self.assertEqual(headers[b"x-request-id"], request_id.encode())

    def test_unknown_transfer_coding_is_501_and_not_forwarded(self) -> None:
        gateway = ScriptedGateway(lambda ctx: ok())
        conn = Connection(gateway)
        conn.send(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        [(status, _, body)] = responses(conn.output())
        self.assertEqual(status, 501)
        self.assertEqual(json.loads(body)["error"], "not_implemented")
        self.assertEqual(gateway.seen, [])
        self.assertTrue(conn.transport.disconnecting)

    def test_head_too_large_is_431(self) -> None:
        conn = Connection(ScriptedGateway(lambda ctx: ok(), Limits(max_header_bytes=200)))
        conn.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 300 + b"\r\n\r\n")
        [(status, _, body)] = responses(conn.output())
        self.assertEqual(status, 431)
        self.assertEqual(json.loads(body)["error"], "headers_too_large")

    def test_gateway_error_rendered_as_json_with_request_id(self) -> None:
        conn = Connection(ScriptedGateway(lambda ctx: _fail(NotFound())))
        conn.send(b"GET /nope HTTP/1.1\r\nHost: h\r\n\r\n")
        [(status, headers, body)] = responses(conn.output())
        self.assertEqual(status, 404)
        self.assertEqual(json.loads(body), {"error": "not_found", "message": NotFound.default_message, "request_id": "req-1"})
        self.assertEqual(headers[b"x-request-id"], b"req-1")
        # A 404 keeps the connection open.
        self.assertFalse(conn.transport.disconnecting)

    def test_unexpected_exception_is_500_without_details(self) -> None:
        def boom(ctx: RequestContext) -> Deferred[Response]:
            raise ZeroDivisionError("secret detail")

        conn = Connection(ScriptedGateway(boom))
        conn.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        out = conn.output()
        self.assertTrue(out.startswith(b"HTTP/1.1 500 "))
        self.assertNotIn(b"secret", out)
        self.assertNotIn(b"Traceback", out)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class TimeoutTests(SynchronousTestCase):
    def test_slow_head_gets_408(self) -> None:
        clock = Clock()
        conn = Connection(ScriptedGateway(lambda ctx: ok(), Limits(header_timeout=5)), clock)
        conn.send(b"GET / HTTP/1.1\r\nHo")
        clock.advance(4.9)
        self.assertEqual(conn.output(), b"")
        clock.advance(0.2)
        [(status, _, _)] = responses(conn.output())
        self.assertEqual(status, 408)
        self.assertTrue(conn.transport.disconnecting)

    def test_silent_connection_closed_after_header_timeout(self) -> None:
        clock = Clock()
        conn = Connection(ScriptedGateway(lambda ctx: ok(), Limits(header_timeout=5)), clock)
        clock.advance(5.1)
        self.assertEqual(conn.output(), b"")
        self.assertTrue(conn.transport.disconnecting)

    def test_idle_keep_alive_closed_after_idle_timeout(self) -> None:
        clock = Clock()
        conn = Connection(ScriptedGateway(lambda ctx: ok(), Limits(idle_timeout=30, header_timeout=5)), clock)
        conn.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        conn.output()
        clock.advance(29)
        self.assertFalse(conn.transport.disconnecting)
        clock.advance(2)
        self.assertTrue(conn.transport.disconnecting)

    def test_no_timeout_while_upstream_works(self) -> None:
        clock = Clock()
        conn = Connection(ScriptedGateway(lambda ctx: Deferred(), Limits(idle_timeout=30, header_timeout=5)), clock)
        conn.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        clock.advance(100)
        self.assertFalse(conn.transport.disconnecting)


class DisconnectTests(SynchronousTestCase):
    def test_client_disconnect_cancels_pipeline(self) -> None:
        cancelled = []
        d: Deferred[Response] = Deferred(lambda _: cancelled.append(True))
        conn = Connection(ScriptedGateway(lambda ctx: d))
        conn.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        conn.protocol.connectionLost()
        self.assertEqual(cancelled, [True])

    def test_client_disconnect_stops_response_body(self) -> None:
        body = ControlledBody(length=None)
        conn = Connection(ScriptedGateway(lambda ctx: succeed(Response(200, [], body))))
        conn.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        conn.protocol.connectionLost()
        self.assertTrue(body.stopped)

    def test_client_disconnect_aborts_request_body(self) -> None:
        gateway = ScriptedGateway(lambda ctx: Deferred())
        conn = Connection(gateway)
        conn.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n123")
        sink = CollectingSink()
        body = gateway.seen[0].body
        assert body is not None
        body.deliverTo(sink)
        conn.protocol.connectionLost()
        self.assertIsNotNone(sink.aborted)

    def test_upstream_body_failure_closes_after_partial_framed_body(self) -> None:
        body = ControlledBody(length=100)
        conn = Connection(ScriptedGateway(lambda ctx: succeed(Response(200, [], body))))
        conn.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        assert body.sink is not None
        body.sink.write(b"partial")
        body.sink.abort(Exception("upstream reset"))
        # Content-Length framing shows the truncation: the head and the bytes
        # so far are delivered, then the connection closes.
        self.assertTrue(conn.transport.disconnecting)
        self.assertFalse(conn.transport.disconnected)
        self.assertTrue(conn.output().endswith(b"partial"))

    def test_upstream_body_failure_resets_close_delimited_body(self) -> None:
        body = ControlledBody(length=None)
        conn = Connection(ScriptedGateway(lambda ctx: succeed(Response(200, [], body))))
        conn.send(b"GET / HTTP/1.0\r\n\r\n")
        assert body.sink is not None
        body.sink.write(b"partial")
        body.sink.abort(Exception("upstream reset"))
        # A clean close would make a truncated close-delimited body look whole.
        self.assertTrue(conn.transport.disconnected)


class FreedByReferenceCountingTests(SynchronousTestCase):
    """Clients without keep-alive close a connection per request: a reference
    cycle per connection made the collector run a full pass about once a
    second under such a load (26-45 ms each, bench/loop_stalls.py --close)."""

    def test_a_closed_connection_is_freed_without_a_garbage_collection(self) -> None:
        conn = Connection(ScriptedGateway(lambda ctx: ok()))
        conn.send(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        [(status, _, _)] = responses(conn.output())
        self.assertEqual(status, 200)
        conn.protocol.connectionLost()
        gone = weakref.ref(conn.protocol)
        with collector_off():
            del conn
            self.assertIsNone(gone(), referrers(gone))


class ConnectionLimitTests(SynchronousTestCase):
    def test_connections_past_max_are_refused(self) -> None:
        gateway = ScriptedGateway(lambda ctx: ok(), Limits(max_connections=2))
        factory = HTTP11ServerFactory(lambda: gateway, Clock())  # type: ignore[arg-type,return-value]
        first = factory.buildProtocol(None)
        second = factory.buildProtocol(None)
        self.assertIsNotNone(first)
        self.assertIsNotNone(second)
        self.assertIsNone(factory.buildProtocol(None))
        assert first is not None
        first.makeConnection(StringTransport())
        first.connectionLost()
        self.assertIsNotNone(factory.buildProtocol(None))
