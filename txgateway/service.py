"""GatewayService: the twistd service that owns listeners, pools and the gateway.

Listeners bind synchronously at start (before twistd drops privileges), so a
port in use stops the process at once with a clear message and exit status 1
instead of a gateway that runs without its listener.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from txgateway.admin.resource import admin_site
from txgateway.config.model import GatewayConfig, UpstreamConfig
from txgateway.control import ReloadResult
from txgateway.gateway import Gateway
from txgateway.heap import Heap
from txgateway.interfaces import IUpstreamClient
from txgateway.protocols.detect import GatewayServerFactory, tls_context, tls_endpoint
from txgateway.reload import Reloader
from txgateway.runtime import Runtime
from txgateway.shutdown import GracefulShutdown
from txgateway.upstream.http2 import H2Client
from txgateway.upstream.pool import HTTP11Client


class ListenError(Exception):
    """A listener could not bind; carries the endpoint and the reason."""


class GatewayService(MultiService):
    """Listeners, the current gateway generation, reloads and the shutdown sequence.

    Implements :class:`txgateway.control.GatewayControl` for the admin listener.
    ``watch`` (twistd sets it) installs the SIGHUP handler and polls the
    config file for changes; in-process tests leave it off and call ``reload``.
    """

    log = Logger()

    def __init__(
        self,
        config: GatewayConfig,
        reactor: Any = None,
        *,
        watch: bool = False,
        inherited: Mapping[str, int] | None = None,
        heap: Heap | None = None,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        #: The configuration of the current generation.
        self.config = config
        self._clients: dict[Hashable, IUpstreamClient] = {}
        self.runtime = Runtime(reactor)
        self._gateway, self._generation_keys = self.runtime.generation(
            lambda: Gateway(config, self._client_for, self.runtime)
        )
        self._watch = watch
        #: Freezes the long-lived heap after start-up and reloads (twistd
        #: passes one; in-process tests leave the test runner's heap alone).
        self.heap = heap
        #: A worker's listening sockets, inherited from its supervisor: file
        #: descriptor by endpoint description (txgateway.workers).
        self._inherited = inherited
        self.reloader: Reloader | None = None
        if config.source is not None and not config.source.startswith("<"):
            self.reloader = Reloader(config.source, self.switch, reactor, self.runtime.metrics)
            self.reloader.started()
        self.proxy_factory = GatewayServerFactory(lambda: self.gateway, reactor)
        self.tls_factory = GatewayServerFactory(
            lambda: self.gateway, reactor, scheme=b"https", counted_with=self.proxy_factory
        )
        self.ports: list[IListeningPort] = []
        self.admin_port: IListeningPort | None = None
        self._listening = False
        self._stopping = False

    def _client_for(self, upstream: UpstreamConfig) -> IUpstreamClient:
        """The client (and connection pool) of an upstream: kept across reloads
        while its name, protocol and pool settings stay the same."""
        key = (upstream.name, upstream.protocol, upstream.pool)
        client = self._clients.get(key)
        if client is None:
            if upstream.protocol in ("h2c", "grpc"):
                client = H2Client(self.reactor, upstream.pool)
            else:
                client = HTTP11Client(self.reactor, upstream.pool)
            self._clients[key] = client
        return client

    # GatewayControl.

    @property
    def gateway(self) -> Gateway:
        """The current generation: what new requests run on."""
        return self._gateway

    def readiness(self) -> str | None:
        """None when ready to take traffic, else the reason (for /ready)."""
        if self._stopping:
            return "shutting down"
        if not self._listening:
            return "listeners not up"
        return None

    def reloads(self) -> Sequence[ReloadResult]:
        return list(self.reloader.history) if self.reloader is not None else []

    def reload(self, trigger: str) -> ReloadResult:
        if self.reloader is None:
            import time

            return ReloadResult(
                1, False, trigger, time.time(), None, errors=("the configuration was not loaded from a file",)
            )
        result = self.reloader.reload(trigger)
        from txgateway.workers import SUPERVISOR_PID_ENV

        supervisor = os.environ.get(SUPERVISOR_PID_ENV)
        if trigger == "api" and result.ok and not result.unchanged and supervisor:
            # A worker: the other workers reload too (the supervisor forwards
            # SIGHUP to all; this one then finds its file unchanged).
            try:
                os.kill(int(supervisor), signal.SIGHUP)
            except (OSError, ValueError) as error:
                self.log.warn("cannot ask the supervisor to reload the other workers: {error}", error=error)
        return result

    # Reloading.

    def switch(self, config: GatewayConfig) -> list[str]:
        """Build a generation from ``config`` and make it current.

        Requests already running finish on the generation they started on;
        new ones get the new one.  What both generations share (an unchanged
        upstream's instances, health and breaker, an unchanged route's rate
        limit buckets, pools, JWKS sets, WebSockets) carries over; what only
        the old one used is released once ``shutdown_grace`` has passed.
        Raises when the new generation cannot be built: nothing changes then.
        """
        previous = self._gateway
        gateway, keys = self.runtime.generation(lambda: Gateway(config, self._client_for, self.runtime))
        changes = describe_changes(self.config, config)
        old_keys, self._generation_keys = self._generation_keys, keys
        self._gateway, self.config = gateway, config
        if self._listening:
            gateway.start(previous)
        grace = config.server.shutdown_grace
        self.runtime.retire(old_keys, keys, grace)
        if self.heap is not None:
            self.heap.reloaded(grace)
        upstreams = gateway.upstreams
        self.runtime.metrics.prune(
            {name: {instance.address for instance in upstream.instances} for name, upstream in upstreams.items()},
            {name for name, upstream in upstreams.items() if upstream.breaker is not None},
            {name for name, upstream in upstreams.items() if upstream.config.discovery is not None},
        )
        in_use = {id(upstream.client) for upstream in gateway.upstreams.values()}
        for key, client in list(self._clients.items()):
            if id(client) not in in_use:
                del self._clients[key]
                self.reactor.callLater(grace, client.close)
        return changes

    def _install_signal_handlers(self) -> None:
        if self.reloader is not None:
            signal.signal(signal.SIGHUP, self._sighup)
        # Twisted's own SIGTERM handler makes twistd re-raise the signal after
        # a clean stop (exit status 143); a graceful shutdown is a success:
        # exit status 0.
        signal.signal(signal.SIGTERM, self._sigterm)

    def _sighup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.reload, "sighup")

    def _sigterm(self, signum: int, frame: object) -> None:
        self.log.info("Received SIGTERM, shutting down.")
        self.reactor.callFromThread(self.reactor.stop)

    def _listen(
        self, description: str, factory: Any, endpoint: IStreamServerEndpoint | None = None
    ) -> IListeningPort:
        if self._inherited is not None:
            return self._adopt(description, factory)
        result: list[Any] = []
        if endpoint is None:
            endpoint = serverFromString(self.reactor, description)
        endpoint.listen(factory).addBoth(result.append)
        if not result:
            raise ListenError(f"{description}: listener did not start synchronously")
        if isinstance(result[0], Failure):
            raise ListenError(f"cannot listen on {description}: {result[0].getErrorMessage()}")
        port: IListeningPort = result[0]
        return port

    def _adopt(self, description: str, factory: Any) -> IListeningPort:
        """A worker's listener: the supervisor's socket for ``description``, never a new bind."""
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from txgateway.workers import adopt_listener

        assert self._inherited is not None
        fd = self._inherited.get(description)
        if fd is None:
            raise ListenError(
                f"cannot listen on {description}: the supervisor holds no socket for it "
                "(changed since the supervisor started? restart it)"
            )
        tls = self.config.server.tls
        if tls is not None and description == tls.listen:
            factory = TLSMemoryBIOFactory(tls_context(tls), False, factory)
        try:
            return adopt_listener(self.reactor, fd, factory)
        except OSError as error:
            raise ListenError(f"cannot listen on {description} (inherited fd {fd}): {error}") from None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        try:
            admin = admin_site(self, self.reactor)
            self.admin_port = self._listen(self.config.admin.listen, admin)
            for description in self.config.server.listen:
                self.ports.append(self._listen(description, self.proxy_factory))
            tls = self.config.server.tls
            if tls is not None:
                try:
                    endpoint = tls_endpoint(self.reactor, tls)
                except Exception as error:  # noqa: BLE001 - unreadable cert/key: refuse to start
                    raise ListenError(f"cannot load the TLS certificate/key of {tls.listen}: {error}") from None
                self.ports.append(self._listen(tls.listen, self.tls_factory, endpoint))
        except ListenError as error:
            self.log.critical("{error}", error=error)
            print(f"txgateway: {error}", file=sys.stderr)
            for port in self.ports:
                port.stopListening()
            raise SystemExit(1) from None

    def startService(self) -> None:
        if not self.ports:
            self.privilegedStartService()
        super().startService()
        self._listening = True
        self.gateway.start()
        if self.heap is not None:
            self.heap.settle("start")
        if self._watch:
            if self.reloader is not None:
                self.reloader.start()
            if threading.current_thread() is threading.main_thread():
                # After the reactor's own handlers (installed as it starts running).
                self.reactor.callWhenRunning(self._install_signal_handlers)
        for port in self.ports:
            host = port.getHost()
            self.log.info(
                "txgateway listening on {host}:{port} (routes: {routes}, upstreams: {upstreams})",
                host=getattr(host, "host", "?"),
                port=getattr(host, "port", "?"),
                routes=len(self.config.routes),
                upstreams=len(self.config.upstreams),
            )

    def stopService(self) -> Deferred[Any]:
        """The graceful shutdown (see txgateway.shutdown), then pools and shared state."""
        self._stopping = True
        if self.reloader is not None:
            self.reloader.stop()
        server = self.config.server
        shutdown = GracefulShutdown(
            self.reactor,
            self.proxy_factory,
            self.gateway.websocket_relays,
            server.shutdown_delay,
            server.shutdown_grace,
        )
        d: Deferred[Any] = shutdown.run(self._stop_listening)
        d.addErrback(lambda failure: self.log.failure("graceful shutdown failed", failure))
        d.addCallback(lambda _: self._release())
        return d

    def _stop_listening(self) -> Deferred[Any]:
        self._listening = False
        ports, self.ports = self.ports, []
        return DeferredList([_stop_port(port) for port in ports], consumeErrors=True)

    def _release(self) -> Deferred[Any]:
        stops: list[Deferred[Any]] = [super().stopService()]
        if self.heap is not None:
            self.heap.stop()
        if self.admin_port is not None:
            stops.append(_stop_port(self.admin_port))
            self.admin_port = None
        for client in self._clients.values():
            stops.append(client.close())
        stops.append(self.runtime.stop())
        return DeferredList(stops, consumeErrors=True)


def describe_changes(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """What a reload changes, for the log and ``/admin/reloads``."""
    changes: list[str] = []
    old_routes = {route.name: route for route in old.routes}
    new_routes = {route.name: route for route in new.routes}
    for kind, before, after in (
        ("route", old_routes, new_routes),
        ("upstream", dict(old.upstreams), dict(new.upstreams)),
    ):
        for name in after.keys() - before.keys():
            changes.append(f"{kind} {name}: added")
        for name in before.keys() - after.keys():
            changes.append(f"{kind} {name}: removed")
        for name in before.keys() & after.keys():
            if before[name] != after[name]:
                changes.append(f"{kind} {name}: changed")
    if old.middleware != new.middleware:
        changes.append("middleware: changed")
    if old.server.listen != new.server.listen:
        changes.append("server.listen: changed, takes effect at restart")
    if old.server.tls != new.server.tls:
        changes.append("server.tls: changed, takes effect at restart")
    if old.server.workers != new.server.workers:
        changes.append("server.workers: changed, takes effect at restart")
    if old.admin != new.admin:
        changes.append("admin: changed, takes effect at restart")
    if old.observability != new.observability:
        changes.append("observability: changed")
    for field in ("limits", "http2", "websocket", "trusted_proxies"):
        if getattr(old.server, field) != getattr(new.server, field):
            changes.append(f"server.{field}: changed, applies to new connections")
    return sorted(changes)


def _stop_port(port: IListeningPort) -> Deferred[Any]:
    result = port.stopListening()
    return result if isinstance(result, Deferred) else succeed(None)
