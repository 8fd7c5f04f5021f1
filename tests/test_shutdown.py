"""Graceful shutdown: how each connection drains, and the shutdown sequence, on fake wires and a Clock.

The process-level behaviour (SIGTERM under load, exit status 0) is in
tests/integration/test_shutdown.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from hyperframe.frame import HeadersFrame, RstStreamFrame
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.test_protocol_http1 import Connection, ok, responses
from tests.test_protocol_http1 import ScriptedGateway as H1Gateway
from tests.test_protocol_http2 import ScriptedGateway as H2Gateway
from tests.test_protocol_http2 import Wire, request_headers, waiting
from txgateway.body import BytesBody
from txgateway.messages import Response
from txgateway.pipeline.context import RequestContext
from txgateway.protocols.http1 import HTTP11ServerFactory
from txgateway.shutdown import CLOSE_WAIT, GracefulShutdown
from txgateway.upstream.websocket import OpenRelays

GET = b"GET /a HTTP/1.1\r\nHost: gw\r\n\r\n"


def held_answers() -> tuple[Callable[[RequestContext], Deferred[Response]], list[Deferred[Response]]]:
    """A gateway answer that holds every request, and the held answers in order."""
    pending: list[Deferred[Response]] = []

    def answer(ctx: RequestContext) -> Deferred[Response]:
        d: Deferred[Response] = Deferred()
        pending.append(d)
        return d

    return answer, pending


class HTTP11DrainTests(SynchronousTestCase):
    def test_idle_keep_alive_connection_closes_at_once(self) -> None:
        connection = Connection(H1Gateway(lambda ctx: ok()))
        connection.send(GET)
        [(status, headers, _)] = responses(connection.output())
        self.assertEqual(status, 200)
        self.assertNotIn(b"connection", headers)
        self.assertFalse(connection.transport.disconnecting)
        connection.factory.drain()
        self.assertTrue(connection.transport.disconnecting)

    def test_request_in_progress_is_answered_with_connection_close(self) -> None:
        answer, pending = held_answers()
        connection = Connection(H1Gateway(answer))
        connection.send(GET)
        connection.factory.drain()
        self.assertFalse(connection.transport.disconnecting)
        pending[0].callback(Response(200, [], BytesBody(b"done")))
        [(status, headers, body)] = responses(connection.output())
        self.assertEqual((status, body), (200, b"done"))
        self.assertEqual(headers[b"connection"], b"close")
        self.assertTrue(connection.transport.disconnecting)

    def test_pipelined_requests_are_all_answered_the_last_one_closes(self) -> None:
        answer, pending = held_answers()
        connection = Connection(H1Gateway(answer))
        connection.send(GET + GET)
        connection.factory.drain()
        pending[0].callback(Response(200, [], BytesBody(b"one")))
        pending[1].callback(Response(200, [], BytesBody(b"two")))
        [first, second] = responses(connection.output())
        self.assertEqual((first[0], first[2]), (200, b"one"))
        self.assertNotIn(b"connection", first[1])
        self.assertEqual((second[0], second[2], second[1][b"connection"]), (200, b"two", b"close"))
        self.assertTrue(connection.transport.disconnecting)

    def test_streaming_response_whose_head_said_keep_alive_closes_after_its_end(self) -> None:
        bodies: list[Any] = []

        def answer(ctx: RequestContext) -> Deferred[Response]:
            from tests.test_protocol_http1 import ControlledBody

            body = ControlledBody()
            bodies.append(body)
            return succeed(Response(200, [], body))

        connection = Connection(H1Gateway(answer))
        connection.send(GET)
        connection.factory.drain()  # the head is out already, without Connection: close
        self.assertFalse(connection.transport.disconnecting)
        sink = bodies[0].sink
        sink.write(b"chunk")
        sink.finish()
        self.assertTrue(connection.transport.disconnecting)

    def test_force_close_aborts(self) -> None:
        connection = Connection(H1Gateway(lambda ctx: Deferred()))
        connection.send(GET)
        connection.factory.drain()
        self.assertFalse(connection.transport.disconnecting)
        connection.factory.force_close()
        self.assertTrue(connection.transport.disconnected)

    def test_when_idle_fires_as_the_last_connection_closes(self) -> None:
        factory = HTTP11ServerFactory(lambda: H1Gateway(lambda ctx: ok()), Clock())  # type: ignore[arg-type,return-value]
        self.successResultOf(factory.when_idle())
        self.assertTrue(factory.admit() and factory.admit())
        idle = factory.when_idle()
        factory.connection_closed()
        self.assertNoResult(idle)
        factory.connection_closed()
        self.successResultOf(idle)


class HTTP2DrainTests(SynchronousTestCase):
    def test_idle_connection_gets_goaway_and_closes(self) -> None:
        wire = Wire(H2Gateway(lambda ctx: ok()))
        wire.request(1)
        self.assertTrue(wire.ended(1))
        wire.factory.drain()
        wire.pump()
        self.assertEqual(wire.goaway(), ErrorCodes.NO_ERROR)
        self.assertEqual(wire.closed_by.last_stream_id, 1)  # type: ignore[union-attr]
        self.assertTrue(wire.transport.disconnecting)

    def test_started_streams_finish_later_ones_are_refused(self) -> None:
        answer, pending = held_answers()
        wire = Wire(H2Gateway(answer))
        wire.request(1)
        wire.request(3)
        wire.factory.drain()
        wire.pump()
        # The first GOAWAY promises streams up to 3; the connection stays up for them.
        self.assertEqual(wire.goaway(), ErrorCodes.NO_ERROR)
        self.assertEqual(wire.closed_by.last_stream_id, 3)  # type: ignore[union-attr]
        self.assertFalse(wire.transport.disconnecting)
        # A stream opened after it (a client that missed the GOAWAY; our h2
        # client won't send one, so the frame is built by hand) is refused.
        block = wire.client.encoder.encode(request_headers())
        wire.send_raw(HeadersFrame(5, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize())
        refused = RstStreamFrame(5, error_code=ErrorCodes.REFUSED_STREAM).serialize()
        self.assertIn(refused, wire.transport.value())
        wire.transport.clear()
        self.assertEqual(len(pending), 2)
        # h2 (our test client) closes its connection state on a GOAWAY and
        # then refuses the streams' remaining frames; real clients (nghttp2,
        # grpc) read the promised streams to their end.  Reopen it to do so.
        wire.closed_by = None
        wire.client.state_machine.state = ConnectionState.CLIENT_OPEN
        pending[0].callback(Response(200, [], BytesBody(b"one")))
        wire.pump()
        self.assertEqual(wire.body(1), b"one")
        self.assertFalse(wire.transport.disconnecting)
        pending[1].callback(Response(200, [], BytesBody(b"three")))
        wire.pump()
        self.assertEqual(wire.body(3), b"three")
        self.assertTrue(wire.ended(3))
        wire.clock.advance(0)
        self.assertTrue(wire.transport.disconnecting)

    def test_force_close_cancels_open_streams(self) -> None:
        wire = Wire(H2Gateway(waiting()))
        wire.request(1)
        [ctx] = wire.factory.gateway().seen  # type: ignore[attr-defined]
        self.assertIsNotNone(ctx)
        wire.factory.drain()
        wire.factory.force_close()
        wire.pump()
        self.assertTrue(wire.transport.disconnecting)


class FakeRelay:
    def __init__(self, relays: OpenRelays) -> None:
        self.relays = relays
        self.closed_with: str | None = None
        relays.add(self)

    def going_away(self, reason: str) -> None:
        self.closed_with = reason
        self.relays.discard(self)


class SequenceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.factory = HTTP11ServerFactory(lambda: H1Gateway(lambda ctx: ok()), self.clock)  # type: ignore[arg-type,return-value]
        self.relays = OpenRelays()
        self.events: list[str] = []

    def stop_listening(self) -> Deferred[None]:
        self.events.append(f"stop listening at {self.clock.seconds():g}")
        return succeed(None)

    def test_accepts_for_the_delay_then_stops_listening_and_drains(self) -> None:
        self.assertTrue(self.factory.admit())
        shutdown = GracefulShutdown(self.clock, self.factory, self.relays, delay=2.0, grace=10.0)
        done = shutdown.run(self.stop_listening)
        self.clock.advance(1.9)
        self.assertEqual(self.events, [])
        self.assertFalse(self.factory.draining)
        self.clock.advance(0.1)
        self.assertEqual(self.events, ["stop listening at 2"])
        self.assertTrue(self.factory.draining)
        self.assertNoResult(done)
        self.clock.advance(3)
        self.factory.connection_closed()
        self.successResultOf(done)

    def test_websockets_get_1001_when_the_grace_period_ends(self) -> None:
        relay = FakeRelay(self.relays)
        self.assertTrue(self.factory.admit())  # the WebSocket's connection
        done = GracefulShutdown(self.clock, self.factory, self.relays, delay=0.0, grace=5.0).run(self.stop_listening)
        self.clock.advance(4.9)
        self.assertIsNone(relay.closed_with)
        self.clock.advance(0.1)
        self.assertEqual(relay.closed_with, "server shutting down")
        self.assertNoResult(done)
        self.factory.connection_closed()  # the close handshake completed
        self.successResultOf(done)

    def test_gives_up_waiting_after_the_close_wait(self) -> None:
        self.assertTrue(self.factory.admit())
        done = GracefulShutdown(self.clock, self.factory, self.relays, delay=0.0, grace=1.0).run(self.stop_listening)
        self.clock.advance(1.0)
        self.assertNoResult(done)
        self.clock.advance(CLOSE_WAIT)
        self.successResultOf(done)
        self.assertEqual(self.factory.open_connections, 1)
        self.assertFalse(self.clock.getDelayedCalls())
