"""Unit tests of the WebSocket pieces that need no sockets."""

from __future__ import annotations

import struct
from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from txgateway.config.model import CircuitBreakerConfig, GatewayConfig, RouteConfig, RouteMatch, ServerConfig
from txgateway.errors import Forbidden, RateLimited, ServiceUnavailable
from txgateway.pipeline.breaker import BreakerStage
from txgateway.pipeline.context import RequestContext
from txgateway.protocols.http1 import _is_websocket_upgrade
from txgateway.protocols.websocket import RelayServerProtocol, close_websocket, server_factory
from txgateway.service import GatewayService
from txgateway.upstream.breaker import CircuitBreaker
from txgateway.upstream.websocket import ConnectionCounts, OpenRelays, WebSocketConnector, WebSocketSettings


class FakeSide:
    def __init__(self, state: int = WebSocketProtocol.STATE_OPEN) -> None:
        self.state = state
        self.calls: list[tuple[str, Any]] = []

    def sendClose(self, code: int | None = None, reason: str | None = None) -> None:
        self.calls.append(("sendClose", (code, reason)))

    def sendCloseFrame(self, code: int | None = None, reasonUtf8: bytes | None = None, isReply: bool = False) -> None:
        self.calls.append(("sendCloseFrame", (code, reasonUtf8)))

    def dropConnection(self, abort: bool = False) -> None:
        self.calls.append(("drop", abort))


class CloseTests(SynchronousTestCase):
    def test_code_and_reason_passed_on(self) -> None:
        side = FakeSide()
        close_websocket(side, 4001, "bye")
        self.assertEqual(side.calls, [("sendCloseFrame", (4001, b"bye"))])

    def test_protocol_codes_passed_on(self) -> None:
        side = FakeSide()
        close_websocket(side, 1008, "policy")
        self.assertEqual(side.calls, [("sendCloseFrame", (1008, b"policy"))])

    def test_no_status_becomes_plain_close(self) -> None:
        side = FakeSide()
        close_websocket(side, 1005, "")
        self.assertEqual(side.calls, [("sendClose", (None, None))])

    def test_abnormal_becomes_going_away(self) -> None:
        side = FakeSide()
        close_websocket(side, 1006, None)
        self.assertEqual(side.calls, [("sendCloseFrame", (1001, b"peer went away"))])

    def test_long_reason_truncated(self) -> None:
        side = FakeSide()
        close_websocket(side, 4000, "x" * 500)
        self.assertEqual(len(side.calls[0][1][1]), 123)

    def test_closed_side_left_alone(self) -> None:
        side = FakeSide(WebSocketProtocol.STATE_CLOSING)
        close_websocket(side, 1000, "x")
        self.assertEqual(side.calls, [])


class CountsTests(SynchronousTestCase):
    def test_limit_and_release(self) -> None:
        counts = ConnectionCounts()
        self.assertTrue(counts.acquire("a", 2))
        self.assertTrue(counts.acquire("a", 2))
        self.assertFalse(counts.acquire("a", 2))
        self.assertTrue(counts.acquire("b", 2))
        counts.release("a")
        self.assertTrue(counts.acquire("a", 2))
        counts.release("a")
        counts.release("a")
        counts.release("b")
        self.assertEqual(counts.counts, {})


class UpgradeDetectionTests(SynchronousTestCase):
    def test_websocket_upgrade(self) -> None:
        self.assertTrue(_is_websocket_upgrade([(b"upgrade", b"WebSocket")]))
        self.assertFalse(_is_websocket_upgrade([(b"upgrade", b"h2c")]))
        self.assertFalse(_is_websocket_upgrade([]))


# -- relay limits and shutdown (Clock, StringTransport) ----------------------


class FakeUpstreamSide(FakeSide):
    transport = None

    def attach(self, peer: Any) -> None:
        self.peer = peer


def close_code(written: bytes) -> int:
    """The status code of the (unmasked, server-sent) Close frame in ``written``."""
    start = written.index(b"\x88")
    return int(struct.unpack("!H", written[start + 2 : start + 4])[0])


def open_relay(
    clock: Clock, settings: WebSocketSettings, relays: OpenRelays | None = None
) -> tuple[RelayServerProtocol, FakeUpstreamSide, StringTransport, list[str]]:
    upstream = FakeUpstreamSide()
    lost: list[str] = []
    relay = RelayServerProtocol(upstream, None, settings, clock, lambda: lost.append("lost"), relays)  # type: ignore[arg-type]
    factory = server_factory(settings)
    # No timers on the global reactor: the test drives time with ``clock``.
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0, autoPingInterval=0)
    relay.factory = factory
    transport = StringTransport()
    relay.makeConnection(transport)
    if relays is not None:
        relays.add(relay)
    relay.state = WebSocketProtocol.STATE_OPEN
    relay.onOpen()
    return relay, upstream, transport, lost


class IdleTimeoutTests(SynchronousTestCase):
    def test_idle_closes_1001_both_sides(self) -> None:
        clock = Clock()
        _, upstream, transport, _ = open_relay(clock, WebSocketSettings(idle_timeout=300))
        clock.advance(299)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(upstream.calls, [])
        clock.advance(1)
        self.assertEqual(close_code(transport.value()), 1001)
        self.assertEqual(upstream.calls, [("sendCloseFrame", (1001, b"idle timeout"))])

    def test_activity_postpones_idle(self) -> None:
        clock = Clock()
        relay, upstream, transport, _ = open_relay(clock, WebSocketSettings(idle_timeout=300))
        clock.advance(200)
        relay.from_upstream(b"hi", False)
        transport.clear()
        clock.advance(200)
        self.assertEqual(transport.value(), b"")
        clock.advance(100)
        self.assertEqual(close_code(transport.value()), 1001)
        self.assertEqual(upstream.calls, [("sendCloseFrame", (1001, b"idle timeout"))])


class ShutdownTests(SynchronousTestCase):
    def test_close_all_sends_1001_and_forgets_closed_relays(self) -> None:
        clock = Clock()
        relays = OpenRelays()
        relay, upstream, transport, lost = open_relay(clock, WebSocketSettings(), relays)
        self.assertEqual(len(relays), 1)
        relays.close_all()
        self.assertEqual(close_code(transport.value()), 1001)
        self.assertEqual(upstream.calls, [("sendCloseFrame", (1001, b"server shutting down"))])
        relay.connectionLost()
        self.assertEqual(len(relays), 0)
        self.assertEqual(lost, ["lost"])

    def test_stop_service_sends_1001_to_connected_clients_after_the_grace_period(self) -> None:
        reactor = MemoryReactorClock()
        config = GatewayConfig(server=ServerConfig(shutdown_grace=5.0))
        service = GatewayService(config, reactor)
        relays = service.gateway.websocket_relays
        first = open_relay(Clock(), WebSocketSettings(), relays)
        second = open_relay(Clock(), WebSocketSettings(), relays)
        # Their connections, as the listener counts them.
        factory = service.proxy_factory
        self.assertTrue(factory.admit() and factory.admit())
        stopped = service.stopService()
        reactor.advance(4.9)
        for _, upstream, transport, _ in (first, second):
            self.assertEqual(upstream.calls, [])
            self.assertEqual(transport.value(), b"")
        reactor.advance(0.2)
        for _, upstream, transport, _ in (first, second):
            self.assertEqual(close_code(transport.value()), 1001)
            self.assertEqual(upstream.calls, [("sendCloseFrame", (1001, b"server shutting down"))])
        self.assertNoResult(stopped)
        factory.connection_closed()
        factory.connection_closed()
        self.successResultOf(stopped)


# -- refusals before the upgrade ---------------------------------------------


class FakeInstance:
    host = "127.0.0.1"
    port = 1
    in_flight = 0


class FakeTimeouts:
    connect = 1.0


class FakeUpstreamConfig:
    timeouts = FakeTimeouts()


class FakeUpstream:
    config = FakeUpstreamConfig()

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.observed: list[str | None] = []

    def pick(self, ctx: Any) -> FakeInstance:
        if self.error is not None:
            raise self.error
        return FakeInstance()

    def observe(self, instance: Any, failure: str | None) -> None:
        self.observed.append(failure)


def upgrade_ctx(origin: bytes | None = None, client_ip: str = "10.0.0.1") -> RequestContext:
    headers = [(b"upgrade", b"websocket"), (b"connection", b"upgrade")]
    if origin is not None:
        headers.append((b"origin", origin))
    ctx = RequestContext(b"GET", "/ws/x", b"", headers, client_ip=client_ip, protocol="websocket")
    return ctx


class RefusalTests(SynchronousTestCase):
    def connector(
        self,
        upstream: FakeUpstream,
        counts: ConnectionCounts | None = None,
        origins: tuple[str, ...] | None = None,
        limit: int = 100,
    ) -> tuple[WebSocketConnector, MemoryReactor, ConnectionCounts]:
        reactor = MemoryReactor()
        counts = counts if counts is not None else ConnectionCounts()
        connector = WebSocketConnector(
            RouteConfig(name="ws", match=RouteMatch(path="/ws/*"), upstream="u", websocket=True),
            upstream,  # type: ignore[arg-type]
            lambda ip: False,
            reactor,
            counts,
            origins,
            WebSocketSettings(max_connections_per_consumer=limit),
        )
        return connector, reactor, counts

    def test_origin_outside_cors_list_is_403_before_dialling(self) -> None:
        connector, reactor, counts = self.connector(FakeUpstream(), origins=("https://app.example",))
        failure = self.failureResultOf(connector(upgrade_ctx(b"https://evil.example")), Forbidden)
        self.assertEqual(failure.value.status, 403)
        self.assertEqual(reactor.tcpClients, [])
        self.assertEqual(counts.counts, {})
        # The listed origin (any case, trailing slash) is dialled.
        self.assertNoResult(connector(upgrade_ctx(b"HTTPS://app.example/")))
        self.assertEqual(len(reactor.tcpClients), 1)

    def test_per_consumer_cap_is_429_and_released_on_close(self) -> None:
        connector, reactor, counts = self.connector(FakeUpstream(), limit=2)
        connector(upgrade_ctx())
        connector(upgrade_ctx())
        failure = self.failureResultOf(connector(upgrade_ctx()), RateLimited)
        self.assertEqual(failure.value.status, 429)
        self.assertEqual(len(reactor.tcpClients), 2)
        # Another client address has its own count.
        self.assertNoResult(connector(upgrade_ctx(client_ip="10.0.0.2")))
        # One of the first client's connections closes: the count is released.
        factory = reactor.tcpClients[0][2]
        factory.released()
        self.assertEqual(counts.counts["ip:10.0.0.1"], 1)
        self.assertNoResult(connector(upgrade_ctx()))
        self.assertEqual(len(reactor.tcpClients), 4)

    def test_no_available_instance_is_503_and_count_released(self) -> None:
        connector, reactor, counts = self.connector(FakeUpstream(ServiceUnavailable("no healthy servers")))
        failure = self.failureResultOf(connector(upgrade_ctx()), ServiceUnavailable)
        self.assertEqual(failure.value.status, 503)
        self.assertEqual(reactor.tcpClients, [])
        self.assertEqual(counts.counts, {})

    def test_open_breaker_is_503_before_dialling(self) -> None:
        clock = Clock()
        breaker = CircuitBreaker("u", CircuitBreakerConfig(failure_threshold=1, recovery_timeout=10), clock)
        breaker.record(breaker.admit(), True)
        connector, reactor, counts = self.connector(FakeUpstream())
        guarded = BreakerStage(breaker).wrap(connector)
        failure = self.failureResultOf(guarded(upgrade_ctx()), ServiceUnavailable)
        self.assertEqual(failure.value.status, 503)
        self.assertEqual(reactor.tcpClients, [])
        self.assertEqual(counts.counts, {})
