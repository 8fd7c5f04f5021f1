"""One generation of the running gateway: router, upstreams and route chains.

Everything here is built once from a validated :class:`GatewayConfig`; a
config reload builds a new ``Gateway`` and the protocols pick up the new one
for new requests while in-flight requests finish on the one they started on.
``handle`` is the protocol-neutral entry every wire protocol calls.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from txgateway.config.model import GatewayConfig, RouteConfig, UpstreamConfig
from txgateway.errors import GatewayError, PayloadTooLarge
from txgateway.interfaces import IUpstreamClient
from txgateway.messages import Response
from txgateway.observability import tracing
from txgateway.observability.access_log import access_log_for
from txgateway.observability.recorder import recorder_for
from txgateway.pipeline.assembly import middlewares_for
from txgateway.pipeline.breaker import BreakerStage
from txgateway.pipeline.context import RequestContext
from txgateway.pipeline.fallback import FallbackStage
from txgateway.pipeline.forward import Forwarder
from txgateway.pipeline.forwarded import client_address, trust_check
from txgateway.pipeline.pipeline import Handler, assemble
from txgateway.pipeline.request_id import RequestIds
from txgateway.routing import Router
from txgateway.runtime import Runtime
from txgateway.upstream.discovery import InstanceSource, source_for, source_key
from txgateway.upstream.health import UpstreamHealth
from txgateway.upstream.upstream import Upstream
from txgateway.upstream.websocket import ConnectionCounts, OpenRelays, WebSocketConnector, WebSocketSettings


def _is_grpc(ctx: RequestContext) -> bool:
    content_type = ctx.header(b"content-type")
    return content_type is not None and content_type.startswith(b"application/grpc")


class Gateway:
    log = Logger()

    def __init__(
        self,
        config: GatewayConfig,
        client_for: Callable[[UpstreamConfig], IUpstreamClient],
        runtime: Runtime,
        request_ids: RequestIds | None = None,
    ) -> None:
        """``client_for(upstream)`` gives the client (and its pool) for an upstream;
        ``runtime`` holds what outlives this generation (shared stores, clock)."""
        self.config = config
        self.runtime = runtime
        self._preflight_routing = config.middleware.enabled and config.middleware.cors is not None
        self.request_ids = request_ids or RequestIds()
        #: Called once per finished exchange with its context (status, bytes and
        #: times filled in): metrics, access log, tracing.  Each must be cheap
        #: and must not raise; ``exchange_done`` logs and drops what does.
        self.observers: list[Callable[[RequestContext], None]] = []
        tracing_config = config.observability.tracing
        #: Every request's W3C trace context (propagation is always on).
        self.trace_contexts = tracing.TraceContexts(tracing_config.sample_ratio, exported=tracing_config.enabled)
        self._tag_trace = tracing_config.enabled
        if tracing_config.enabled:
            export = runtime.shared(
                tracing.export_key(tracing_config), lambda: tracing.trace_export(tracing_config, runtime.reactor)
            )
            self.observers.append(export.exchange_done)
        recorder = recorder_for(config, runtime)
        if recorder is not None:
            self.observers.append(recorder)
        access_log = access_log_for(config, runtime)
        if access_log is not None:
            self.observers.append(access_log)
        self.router = Router(config.routes)
        #: Health checking of each upstream; active checks run once ``start()`` is called.
        self.health: list[UpstreamHealth] = []
        #: Service discovery of the upstreams that use it; runs once ``start()`` is called.
        self.discovery: list[InstanceSource] = []
        self.upstreams: Mapping[str, Upstream] = {
            name: self._upstream(upstream, client_for) for name, upstream in config.upstreams.items()
        }
        is_trusted = trust_check(config.server.trusted_proxies)
        self._behind_proxies = is_trusted if config.server.trusted_proxies else None
        default_limit = config.server.limits.max_body_bytes
        #: Open WebSocket connections per consumer, shared by this generation's routes.
        self.websocket_counts: ConnectionCounts = runtime.shared(("websocket-counts",), ConnectionCounts)
        #: Open WebSocket relays (downstream protocols), closed with 1001 at shutdown.
        self.websocket_relays: OpenRelays = runtime.shared(("websocket-relays",), OpenRelays)
        #: Per route name: its assembled chain, its request body limit, and
        #: whether that limit also bounds gRPC streams (only a route's own).
        self._routes: dict[str, tuple[Handler, int, bool]] = {}
        for route in config.routes:
            terminal = self._terminal(route, is_trusted)
            limit = route.max_body_bytes if route.max_body_bytes is not None else default_limit
            chain = assemble(middlewares_for(route, config, runtime), terminal)
            self._routes[route.name] = (chain, limit, route.max_body_bytes is not None)

    def _upstream(self, config: UpstreamConfig, client_for: Callable[[UpstreamConfig], IUpstreamClient]) -> Upstream:
        """The upstream for ``config``, shared by every generation with the same config
        (in ``runtime.shared``), so a reload keeps its instances' health and its checks."""
        runtime = self.runtime
        upstream = runtime.shared(("upstream", config), lambda: Upstream(config, client_for(config), runtime.clock))
        self.health.append(
            runtime.shared(
                ("upstream-health", config), lambda: UpstreamHealth(upstream, runtime.clock, metrics=runtime.metrics)
            )
        )
        if (discovery := config.discovery) is not None:
            source = runtime.shared(source_key(config), lambda: source_for(config.name, discovery, runtime))
            source.feed(upstream)
            self.discovery.append(source)
        return upstream

    def start(self, previous: Gateway | None = None) -> None:
        """Start this generation's active health checks (once its listeners are up) and
        stop those of ``previous``, the generation it replaces, that it does not share."""
        for health in self.health:
            health.start()
        for source in self.discovery:
            source.start()
        if previous is not None:
            for health in previous.health:
                if health not in self.health:
                    health.stop()
            for source in previous.discovery:
                if source not in self.discovery:
                    source.stop()

    def _terminal(self, route: RouteConfig, is_trusted: Callable[[str], bool]) -> Handler:
        """The upstream end of a route's chain: forwarder, inside its breaker, inside its fallback."""
        upstream = self.upstreams[route.upstream]
        clock = self.runtime.clock
        handler: Handler = Forwarder(route, upstream, is_trusted, clock, self.runtime.metrics)
        if upstream.breaker is not None:
            handler = BreakerStage(upstream.breaker).wrap(handler)
        fallback = upstream.config.fallback
        if fallback is not None:
            other: Handler | None = None
            if fallback.upstream is not None:
                other = Forwarder(route, self.upstreams[fallback.upstream], is_trusted, clock, self.runtime.metrics)
            handler = FallbackStage(fallback, other).wrap(handler)
        if route.websocket:
            handler = self._websocket_dispatch(route, upstream, is_trusted, handler)
        return handler

    def _websocket_dispatch(
        self, route: RouteConfig, upstream: Upstream, is_trusted: Callable[[str], bool], http: Handler
    ) -> Handler:
        """On a websocket route, upgrades end at the WebSocket connector (inside the
        upstream's breaker), everything else at the HTTP forwarder."""
        from twisted.internet import reactor

        cors = self.config.middleware.cors if self.config.middleware.enabled else None
        connector: Handler = WebSocketConnector(
            route,
            upstream,
            is_trusted,
            reactor,
            self.websocket_counts,
            cors.allow_origins if cors is not None else None,
            WebSocketSettings.from_config(self.config.server.websocket),
            self.websocket_relays,
            self.runtime.metrics,
        )
        if upstream.breaker is not None:
            connector = BreakerStage(upstream.breaker).wrap(connector)

        def dispatch(ctx: RequestContext) -> Deferred[Response]:
            if ctx.protocol == "websocket":
                return connector(ctx)
            return http(ctx)

        return dispatch

    def handle(self, ctx: RequestContext) -> Deferred[Response]:
        """Route and run the chain; fails only with a GatewayError.

        Unexpected exceptions are logged with their traceback and become a 500
        without details, so no client ever sees a traceback.
        """
        ctx.request_id = self.request_ids.for_request(ctx.header(b"x-request-id"))
        ctx.trace = self.trace_contexts.for_request(ctx.headers)
        if self._tag_trace:
            return self._route(ctx).addCallbacks(
                tracing.tag_response, tracing.tag_error, callbackArgs=(ctx,), errbackArgs=(ctx,)
            )
        return self._route(ctx)

    def _route(self, ctx: RequestContext) -> Deferred[Response]:
        if self._behind_proxies is not None:
            ctx.client_address = client_address(ctx.client_ip, ctx.headers, self._behind_proxies)
        method = ctx.method
        if self._preflight_routing and method == b"OPTIONS":
            # A CORS preflight is routed by the method it asks about, so it
            # reaches the route (and CORS policy) of the real request.
            requested = ctx.header(b"access-control-request-method")
            if requested is not None and ctx.header(b"origin") is not None:
                method = requested
        try:
            match = self.router.match(method.decode("latin-1"), ctx.host, ctx.path, ctx.headers)
            ctx.route = match.route
            if ctx.protocol == "websocket" and not match.route.websocket:
                ctx.protocol = "http/1.1"  # served as plain HTTP, as before
            ctx.params = match.params
            ctx.upstream_path = match.upstream_path
            chain, limit, own_limit = self._routes[match.route.name]
            body = ctx.body
            if body is not None and (own_limit or not _is_grpc(ctx)):
                # A gRPC stream is relayed message by message, never held, and
                # may live for hours: the server-wide default does not cap its
                # total; a route's own max_body_bytes does.
                if body.length is not None and body.length > limit:
                    raise PayloadTooLarge(f"request body of {body.length} bytes exceeds {limit}")
                body.max_bytes = limit
            d = chain(ctx)
        except GatewayError as error:
            return fail(error)
        except Exception:  # noqa: BLE001 - any bug becomes a 500, never a traceback
            return fail(self._internal(Failure(), ctx))
        return d.addErrback(self._unexpected, ctx)

    def exchange_done(self, ctx: RequestContext) -> None:
        """The protocol finished an exchange this generation handled: tell the observers.

        Called exactly once per request context by every protocol (HTTP/1.1,
        HTTP/2, WebSocket at close), after ``ctx.status``, ``ctx.bytes_in``,
        ``ctx.bytes_out`` and ``ctx.ended`` are set.
        """
        for observer in self.observers:
            try:
                observer(ctx)
            except Exception:  # noqa: BLE001 - an observer bug must not break traffic
                self.log.failure("exchange observer {observer!r} failed", observer=observer)

    def _unexpected(self, failure: Failure, ctx: RequestContext) -> Failure:
        if failure.check(GatewayError):
            return failure
        return Failure(self._internal(failure, ctx))

    def _internal(self, failure: Failure, ctx: RequestContext) -> GatewayError:
        if failure.check(CancelledError):
            return GatewayError("request cancelled")
        self.log.failure(
            "internal error on request {request_id} {method} {path}",
            failure,
            request_id=ctx.request_id,
            method=ctx.method,
            path=ctx.path,
        )
        return GatewayError()
