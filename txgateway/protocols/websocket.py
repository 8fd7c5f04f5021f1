"""The downstream WebSocket side: Autobahn's server protocol relaying to the upstream.

The HTTP/1.1 edge (:mod:`txgateway.protocols.http1`) runs the pipeline on an
``Upgrade: websocket`` request first; the pipeline's terminal
(:class:`txgateway.upstream.websocket.WebSocketConnector`) opens the upstream
connection and answers with a :class:`WebSocketUpgrade`.  Only then does the
HTTP/1.1 protocol call :func:`take_over`: a :class:`RelayServerProtocol`
takes the transport and is fed the original request bytes, so Autobahn
performs the client's handshake itself, selecting the subprotocol the upstream
chose.

The relay passes whole messages (text or binary) both ways; Autobahn answers
pings.  Close codes and reasons are passed on in both directions.
Backpressure: each side's transport is registered as the streaming producer
of the other's, so when one side cannot write fast enough, reading from the
other stops; nothing buffers without bound.

Limits (:class:`WebSocketSettings`): message size (Autobahn closes 1009),
open handshake timeout, idle timeout (no message either way: close 1001),
client message rate (close 1008) and automatic pings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from txgateway.pipeline.context import RequestContext
from txgateway.upstream.websocket import (
    OpenRelays,
    RelayCounters,
    UpstreamWebSocketProtocol,
    WebSocketSettings,
    WebSocketUpgrade,
)

#: Close codes that may not be sent in a Close frame (RFC 6455 7.4.1).
_UNSENDABLE = frozenset({1005, 1006, 1015})
GOING_AWAY = 1001
POLICY_VIOLATION = 1008


def close_websocket(protocol: Any, code: int | None, reason: str | None) -> None:
    """Start the closing handshake on ``protocol`` with ``code``/``reason`` when it is still open."""
    if protocol.state not in (WebSocketProtocol.STATE_OPEN, WebSocketProtocol.STATE_CONNECTING):
        return
    if code == 1005:
        code, reason = None, None
    elif code in _UNSENDABLE:
        code, reason = GOING_AWAY, reason or "peer went away"
    raw = reason.encode("utf-8")[:123] if reason else None
    if code is None:
        protocol.sendClose()
    elif protocol.state == WebSocketProtocol.STATE_CONNECTING:
        protocol.dropConnection(abort=True)
    else:
        # sendCloseFrame, unlike sendClose, accepts the 1001-1014 codes a relay must pass on.
        protocol.sendCloseFrame(code=code, reasonUtf8=raw, isReply=False)


class RelayServerProtocol(WebSocketServerProtocol):
    """The client's WebSocket connection, relayed to one upstream connection.

    With ``ctx`` (the upgrade request's context) the payload bytes of the
    messages relayed are added to its ``bytes_in`` (client to upstream) and
    ``bytes_out``; with ``counters`` the connection and its messages are
    counted in the route's WebSocket metrics.
    """

    def __init__(
        self,
        upstream: UpstreamWebSocketProtocol,
        subprotocol: str | None,
        settings: WebSocketSettings,
        clock: IReactorTime,
        on_lost: Callable[[], None],
        relays: OpenRelays | None = None,
        ctx: RequestContext | None = None,
        counters: RelayCounters | None = None,
    ) -> None:
        super().__init__()
        self.upstream = upstream
        self._ctx = ctx
        self._counters = counters
        self._opened = False
        self._relays = relays
        self._subprotocol = subprotocol
        self._settings = settings
        self._clock = clock
        self._on_lost: Callable[[], None] | None = on_lost
        self._last_activity = clock.seconds()
        self._idle_timer: IDelayedCall | None = None
        self._window_start = 0.0
        self._window_count = 0

    # Handshake.

    def onConnect(self, request: Any) -> str | None:
        return self._subprotocol

    def onOpen(self) -> None:
        downstream, upstream = self.transport, self.upstream.transport
        if downstream is not None and upstream is not None:
            # Each side's reading pauses while the other side's write buffer is full.
            downstream.registerProducer(upstream, True)  # type: ignore[attr-defined]
            upstream.registerProducer(downstream, True)  # type: ignore[attr-defined]
        self._last_activity = self._clock.seconds()
        self._arm_idle(self._settings.idle_timeout)
        counters = self._counters
        if counters is not None:
            self._opened = True
            counters.connections.inc()
            counters.open.inc()
        self.upstream.attach(self)

    # Relaying.

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        now = self._clock.seconds()
        self._last_activity = now
        if now - self._window_start >= 1.0:
            self._window_start, self._window_count = now, 0
        self._window_count += 1
        if self._window_count > self._settings.max_messages_per_second:
            close_websocket(self, POLICY_VIOLATION, "message rate limit exceeded")
            close_websocket(self.upstream, GOING_AWAY, "client closed")
            return
        if self.upstream.state == WebSocketProtocol.STATE_OPEN:
            self.upstream.sendMessage(payload, isBinary)
            if self._ctx is not None:
                self._ctx.bytes_in += len(payload)
            if self._counters is not None:
                self._counters.to_upstream.inc()

    def from_upstream(self, payload: bytes, is_binary: bool) -> None:
        self._last_activity = self._clock.seconds()
        if self.state == WebSocketProtocol.STATE_OPEN:
            self.sendMessage(payload, is_binary)
            if self._ctx is not None:
                self._ctx.bytes_out += len(payload)
            if self._counters is not None:
                self._counters.to_client.inc()

    def upstream_closed(self, code: int | None, reason: str | None) -> None:
        close_websocket(self, code, reason)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._cancel_idle()
        close_websocket(self.upstream, code, reason)

    def going_away(self, reason: str) -> None:
        """Shutdown: close both sides with 1001 (going away)."""
        close_websocket(self, GOING_AWAY, reason)
        close_websocket(self.upstream, GOING_AWAY, reason)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._cancel_idle()
        if self._opened and self._counters is not None:
            self._opened = False
            self._counters.open.dec()
        if self._relays is not None:
            self._relays.discard(self)
        upstream = self.upstream.transport
        if upstream is not None:
            upstream.unregisterProducer()  # type: ignore[attr-defined]
        try:
            super().connectionLost(reason)
        finally:
            close_websocket(self.upstream, GOING_AWAY, "client went away")
            on_lost, self._on_lost = self._on_lost, None
            if on_lost is not None:
                on_lost()

    # Idle timeout.

    def _arm_idle(self, delay: float) -> None:
        if delay > 0:
            self._idle_timer = self._clock.callLater(delay, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        idle = self._settings.idle_timeout
        quiet = self._clock.seconds() - self._last_activity
        if quiet >= idle:
            close_websocket(self, GOING_AWAY, "idle timeout")
            close_websocket(self.upstream, GOING_AWAY, "idle timeout")
        else:
            self._arm_idle(idle - quiet)

    def _cancel_idle(self) -> None:
        timer, self._idle_timer = self._idle_timer, None
        if timer is not None and timer.active():
            timer.cancel()


def server_factory(settings: WebSocketSettings) -> WebSocketServerFactory:
    factory = WebSocketServerFactory()
    factory.setProtocolOptions(
        maxMessagePayloadSize=settings.max_message_bytes,
        maxFramePayloadSize=settings.max_message_bytes,
        openHandshakeTimeout=settings.open_handshake_timeout,
        autoPingInterval=settings.auto_ping_interval,
        autoPingTimeout=max(settings.auto_ping_interval, 1.0),
        # Send the Close frame (1009, 1002...) before dropping, so the client learns why.
        failByDrop=False,
    )
    return factory


def take_over(
    transport: Any,
    upgrade: WebSocketUpgrade,
    raw_request: bytes,
    clock: IReactorTime,
    on_lost: Callable[[], None],
    ctx: RequestContext | None = None,
) -> Protocol:
    """Hand ``transport`` (now carrying an upgrade request) to a new relay protocol.

    Rewires the transport (``tcp.Server.protocol`` or TLS ``wrappedProtocol``)
    when it can; the returned protocol must also be given whatever the old
    protocol still receives when it cannot.  ``ctx``, the upgrade request's
    context, gets the relayed message bytes (see :class:`RelayServerProtocol`).
    """
    protocol = RelayServerProtocol(
        upgrade.upstream_protocol,
        upgrade.subprotocol,
        upgrade.settings,
        clock,
        on_lost,
        upgrade.relays,
        ctx,
        upgrade.counters,
    )
    if upgrade.relays is not None:
        upgrade.relays.add(protocol)
    protocol.factory = server_factory(upgrade.settings)
    protocol.makeConnection(transport)
    protocol.dataReceived(raw_request)
    return protocol
