"""GatewayService: the twistd service that owns listeners, pools and the gateway.

Listeners bind synchronously at start (before twistd drops privileges), so a
port in use stops the process at once with a clear message and exit status 1
instead of a gateway that runs without its listener.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from txgateway.admin.resource import admin_site
from txgateway.config.model import GatewayConfig, UpstreamConfig
from txgateway.gateway import Gateway
from txgateway.interfaces import IUpstreamClient
from txgateway.protocols.detect import GatewayServerFactory, tls_endpoint
from txgateway.runtime import Runtime
from txgateway.upstream.http2 import H2Client
from txgateway.upstream.pool import HTTP11Client


class ListenError(Exception):
    """A listener could not bind; carries the endpoint and the reason."""


class GatewayService(MultiService):
    log = Logger()

    def __init__(self, config: GatewayConfig, reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.config = config
        self._clients: dict[str, IUpstreamClient] = {}
        self.runtime = Runtime(reactor)
        self.gateway = Gateway(config, self._client_for, self.runtime)
        self.proxy_factory = GatewayServerFactory(lambda: self.gateway, reactor)
        self.tls_factory = GatewayServerFactory(
            lambda: self.gateway, reactor, scheme=b"https", counted_with=self.proxy_factory
        )
        self.ports: list[IListeningPort] = []
        self.admin_port: IListeningPort | None = None
        self._listening = False
        self._stopping = False

    def _client_for(self, upstream: UpstreamConfig) -> IUpstreamClient:
        client = self._clients.get(upstream.name)
        if client is None:
            if upstream.protocol in ("h2c", "grpc"):
                client = H2Client(self.reactor, upstream.pool)
            else:
                client = HTTP11Client(self.reactor, upstream.pool)
            self._clients[upstream.name] = client
        return client

    def readiness(self) -> str | None:
        """None when ready to take traffic, else the reason (for /ready)."""
        if self._stopping:
            return "shutting down"
        if not self._listening:
            return "listeners not up"
        return None

    def _listen(
        self, description: str, factory: Any, endpoint: IStreamServerEndpoint | None = None
    ) -> IListeningPort:
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

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        try:
            admin = admin_site(self.readiness, lambda: self.gateway.upstreams, self.config.admin.token)
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
        self._stopping = True
        self._listening = False
        # Open WebSockets first, while their sockets are still up: 1001 to client and upstream.
        self.gateway.websocket_relays.close_all()
        stops: list[Deferred[Any]] = [super().stopService()]
        ports, self.ports = self.ports, []
        for port in ports:
            stops.append(_stop_port(port))
        if self.admin_port is not None:
            stops.append(_stop_port(self.admin_port))
            self.admin_port = None
        for client in self._clients.values():
            stops.append(client.close())
        stops.append(self.runtime.stop())
        return DeferredList(stops, consumeErrors=True)


def _stop_port(port: IListeningPort) -> Deferred[Any]:
    result = port.stopListening()
    return result if isinstance(result, Deferred) else succeed(None)
