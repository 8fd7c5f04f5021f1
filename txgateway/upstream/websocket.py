"""The upstream end of a WebSocket route: dial the upstream before answering the client.

:class:`WebSocketConnector` is the pipeline terminal of an ``Upgrade:
websocket`` request (``Gateway._terminal`` dispatches to it instead of the
HTTP forwarder).  It picks an instance (balancer, health; the breaker stage
wraps it like the forwarder) and opens an Autobahn client connection to
``ws://instance/path?query`` offering the client's subprotocols and passing a
few headers on.  Only once the upstream handshake has succeeded does it
answer, with a :class:`WebSocketUpgrade` (status 101) carrying the connected
upstream protocol; the HTTP/1.1 edge then lets Autobahn complete the client's
handshake (:mod:`txgateway.protocols.websocket`).  Connection refused or a
failed upstream handshake is a 502, no instance a 503, so a refused client
gets a plain HTTP error, never an open-then-close.

Messages the upstream sends before the client side is open are held (the
upstream's socket is paused meanwhile).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTCP
from twisted.python.failure import Failure

from txgateway.config.model import RouteConfig, WebSocketConfig
from txgateway.errors import Forbidden, GatewayError, RateLimited, UpstreamConnectError, UpstreamProtocolError
from txgateway.messages import Response
from txgateway.observability.metrics import GatewayMetrics
from txgateway.pipeline.context import RequestContext
from txgateway.pipeline.forwarded import forwarded_headers
from txgateway.upstream.instance import Instance
from txgateway.upstream.upstream import Upstream

#: Client headers passed on to the upstream handshake (when the pipeline left them).
FORWARD_HEADERS = frozenset(
    {
        b"authorization",
        b"cookie",
        b"x-request-id",
        b"user-agent",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
    }
)

#: Default maximum WebSocket message (and frame) payload, both directions.
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
#: Default seconds for an opening handshake (upstream and downstream).
DEFAULT_OPEN_HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class WebSocketSettings:
    """WebSocket limits (``server.websocket``, README "WebSocket")."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    open_handshake_timeout: float = DEFAULT_OPEN_HANDSHAKE_TIMEOUT
    #: Seconds without a message either way before both sides are closed (1001).
    idle_timeout: float = 300.0
    #: Seconds between keep-alive pings to the client (0: none).
    auto_ping_interval: float = 30.0
    #: Messages per second the client may send before it is closed with 1008.
    max_messages_per_second: int = 1000
    #: Open WebSocket connections per consumer (or client address when anonymous).
    max_connections_per_consumer: int = 100

    @classmethod
    def from_config(cls, config: WebSocketConfig) -> WebSocketSettings:
        return cls(
            max_message_bytes=config.max_message_bytes,
            open_handshake_timeout=config.open_handshake_timeout,
            idle_timeout=config.idle_timeout,
            auto_ping_interval=config.ping_interval,
            max_messages_per_second=config.max_messages_per_second,
            max_connections_per_consumer=config.max_connections_per_consumer,
        )


class ConnectionCounts:
    """Open WebSocket connections per consumer key, across routes."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def acquire(self, key: str, limit: int) -> bool:
        count = self.counts.get(key, 0)
        if count >= limit:
            return False
        self.counts[key] = count + 1
        return True

    def release(self, key: str) -> None:
        count = self.counts.get(key, 0) - 1
        if count <= 0:
            self.counts.pop(key, None)
        else:
            self.counts[key] = count


class OpenRelays:
    """The open downstream WebSocket relays of a process, so shutdown can close them."""

    def __init__(self) -> None:
        self.relays: set[Any] = set()

    def add(self, relay: Any) -> None:
        self.relays.add(relay)

    def discard(self, relay: Any) -> None:
        self.relays.discard(relay)

    def __len__(self) -> int:
        return len(self.relays)

    def close_all(self, reason: str = "server shutting down") -> None:
        """Close every open relay with 1001 (going away) on both sides."""
        for relay in list(self.relays):
            relay.going_away(reason)


class RelayCounters:
    """A WebSocket route's metric children, resolved once per route: the relay
    counts its connection and every message it passes with them."""

    __slots__ = ("connections", "open", "to_client", "to_upstream")

    def __init__(self, metrics: GatewayMetrics, route: str) -> None:
        self.connections = metrics.websocket_connections.labels(route)
        self.open = metrics.websocket_open.labels(route)
        self.to_upstream = metrics.websocket_messages.labels(route, "client_to_upstream")
        self.to_client = metrics.websocket_messages.labels(route, "upstream_to_client")


class WebSocketUpgrade(Response):
    """The pipeline's answer to a successful upgrade: 101 plus the open upstream."""

    __slots__ = ("counters", "relays", "settings", "subprotocol", "upstream_protocol")

    def __init__(
        self,
        upstream_protocol: UpstreamWebSocketProtocol,
        subprotocol: str | None,
        settings: WebSocketSettings,
        relays: OpenRelays | None = None,
        counters: RelayCounters | None = None,
    ) -> None:
        Response.__init__(self, 101, [])
        self.upstream_protocol = upstream_protocol
        self.subprotocol = subprotocol
        self.settings = settings
        #: Where the relay registers itself while open (None: untracked).
        self.relays = relays
        #: The route's WebSocket metrics (None: not counted).
        self.counters = counters


class UpstreamWebSocketProtocol(WebSocketClientProtocol):
    """The gateway's client connection to the upstream; relays to ``peer`` once set."""

    factory: _ConnectorFactory

    def __init__(self) -> None:
        super().__init__()
        #: The downstream side, once the client handshake has completed.
        self.peer: Any = None
        self._early: list[tuple[bytes, bool]] = []
        self.opened = False
        self.closed_with: tuple[int | None, str | None] | None = None
        self.subprotocol: str | None = None

    def onConnect(self, response: Any) -> None:
        self.subprotocol = response.protocol

    def onOpen(self) -> None:
        self.opened = True
        self.factory.opened(self)

    def attach(self, peer: Any) -> None:
        """The downstream is open: deliver what arrived meanwhile, then relay live."""
        self.peer = peer
        early, self._early = self._early, []
        for payload, is_binary in early:
            peer.from_upstream(payload, is_binary)
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        if self.closed_with is not None:
            peer.upstream_closed(*self.closed_with)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.peer is not None:
            self.peer.from_upstream(payload, isBinary)
        else:
            self._early.append((payload, isBinary))
            if self.transport is not None:
                self.transport.pauseProducing()  # type: ignore[attr-defined]

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened:
            self.factory.failed(f"upstream WebSocket handshake failed: {reason or 'connection closed'}")
            return
        self.closed_with = (code, reason)
        self.factory.released()
        if self.peer is not None:
            self.peer.upstream_closed(code, reason)


class _ConnectorFactory(WebSocketClientFactory):
    protocol = UpstreamWebSocketProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        result: Deferred[UpstreamWebSocketProtocol],
        release: Callable[[str | None], None],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._result: Deferred[UpstreamWebSocketProtocol] | None = result
        self._release: Callable[[str | None], None] | None = release

    def opened(self, protocol: UpstreamWebSocketProtocol) -> None:
        result, self._result = self._result, None
        if result is not None:
            result.callback(protocol)

    def failed(self, message: str, error: type[GatewayError] = UpstreamProtocolError) -> None:
        self.released("reset" if error is UpstreamProtocolError else "connect_error")
        result, self._result = self._result, None
        if result is not None:
            result.errback(Failure(error(message)))

    def released(self, failure: str | None = None) -> None:
        release, self._release = self._release, None
        if release is not None:
            release(failure)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.failed(f"cannot connect to the upstream: {reason.getErrorMessage()}", UpstreamConnectError)


class WebSocketConnector:
    """Pipeline terminal for WebSocket upgrades on one route."""

    def __init__(
        self,
        route: RouteConfig,
        upstream: Upstream,
        is_trusted: Callable[[str], bool],
        reactor: IReactorTCP,
        counts: ConnectionCounts,
        allow_origins: tuple[str, ...] | None = None,
        settings: WebSocketSettings = WebSocketSettings(),
        relays: OpenRelays | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        """``allow_origins``: the CORS allow-list when CORS is configured (None: any origin);
        ``metrics``: where the route's connections and messages are counted (None: nowhere)."""
        self.route = route
        self._counters = RelayCounters(metrics, route.name) if metrics is not None else None
        self.upstream = upstream
        self._is_trusted = is_trusted
        self._reactor = reactor
        self._counts = counts
        self.settings = settings
        self._relays = relays
        self._origins: frozenset[bytes] | None = None
        if allow_origins is not None and "*" not in allow_origins:
            self._origins = frozenset(o.lower().rstrip("/").encode("latin-1") for o in allow_origins)

    def __call__(self, ctx: RequestContext) -> Deferred[Response]:
        origin = ctx.header(b"origin")
        if self._origins is not None and origin is not None and origin.lower().rstrip(b"/") not in self._origins:
            return fail(Forbidden("origin not allowed for WebSocket"))
        identity = getattr(ctx, "identity", None)
        consumer = getattr(identity, "consumer", None)
        key = f"consumer:{consumer}" if consumer else f"ip:{ctx.client_address}"
        if not self._counts.acquire(key, self.settings.max_connections_per_consumer):
            return fail(RateLimited("too many open WebSocket connections"))
        try:
            instance = self.upstream.pick(ctx)
        except GatewayError as error:
            self._counts.release(key)
            return fail(error)
        return self._dial(ctx, instance, key)

    def headers_for(self, ctx: RequestContext) -> dict[str, str]:
        headers = forwarded_headers(
            [(n, v) for n, v in ctx.headers if n in FORWARD_HEADERS and not n.startswith(b"x-forwarded-")],
            ctx.client_ip,
            ctx.scheme,
            ctx.host,
            self._is_trusted(ctx.client_ip),
        )
        out: dict[str, str] = {}
        for name, value in headers:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            out[key] = (
                f"{out[key]}, {text}"
                if key in out and key != "cookie"
                else (f"{out[key]}; {text}" if key in out else text)
            )
        if ctx.request_id:
            out["x-request-id"] = ctx.request_id
        if ctx.trace is not None:  # the handshake is the client span; never the client's own traceparent
            for name, value in ctx.trace.upstream_headers():
                out[name.decode("ascii")] = value.decode("latin-1")
        return out

    def _dial(self, ctx: RequestContext, instance: Instance, key: str) -> Deferred[Response]:
        upstream = self.upstream
        counts = self._counts
        settings = self.settings
        instance.in_flight += 1
        ctx.upstream_address = f"{instance.host}:{instance.port}"

        def release(failure: str | None) -> None:
            instance.in_flight -= 1
            counts.release(key)
            upstream.observe(instance, failure)

        path = ctx.upstream_path or ctx.path
        target = path + ("?" + ctx.query.decode("latin-1") if ctx.query else "")
        offered = [
            p.strip()
            for name, value in ctx.headers
            if name == b"sec-websocket-protocol"
            for p in value.decode("latin-1").split(",")
            if p.strip()
        ]
        result: Deferred[UpstreamWebSocketProtocol] = Deferred()
        factory = _ConnectorFactory(
            result,
            release,
            url=f"ws://{instance.host}:{instance.port}{target}",
            protocols=offered or None,
            headers=self.headers_for(ctx),
        )
        factory.setProtocolOptions(
            maxMessagePayloadSize=settings.max_message_bytes,
            maxFramePayloadSize=settings.max_message_bytes,
            openHandshakeTimeout=settings.open_handshake_timeout,
            autoPingInterval=0,
        )
        timeouts = upstream.config.timeouts
        connector = self._reactor.connectTCP(instance.host, instance.port, factory, timeout=timeouts.connect)

        def cancelled(_: Deferred[UpstreamWebSocketProtocol]) -> None:
            connector.disconnect()
            factory.released()

        final: Deferred[UpstreamWebSocketProtocol] = Deferred(cancelled)
        result.chainDeferred(final)
        relays = self._relays
        counters = self._counters
        return final.addCallback(lambda proto: WebSocketUpgrade(proto, proto.subprotocol, settings, relays, counters))
