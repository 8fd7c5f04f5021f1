"""One port, two protocols: the first bytes say HTTP/2 or HTTP/1.1.

A connection that starts with the HTTP/2 connection preface (h2c with prior
knowledge, as gRPC clients and ``curl --http2-prior-knowledge`` send it, or
h2 after TLS ALPN) gets :class:`HTTP2ServerProtocol`; anything else is
HTTP/1.1.  Nothing is buffered when the first byte decides (anything but
``P``); only while the bytes could still be the preface (``PRI`` versus
``POST``/``PUT``/``PATCH``), at most 23 bytes.  The chosen protocol then
takes the transport over, so the detector costs nothing afterwards.

:class:`GatewayServerFactory` is what the listeners use: one
``max_connections`` budget for both protocols (and for the TLS listener,
which shares the cleartext listener's count).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate
from twisted.python.failure import Failure

from txgateway.config.model import HTTP2Config, TLSConfig
from txgateway.config.schema import split_endpoint
from txgateway.protocols.http1 import HTTP11ServerFactory, HTTP11ServerProtocol
from txgateway.protocols.http2 import PREFACE, HTTP2ServerProtocol

if TYPE_CHECKING:
    from txgateway.gateway import Gateway

_P = PREFACE[0]
_PREFACE_LENGTH = len(PREFACE)
#: What the TLS listener offers in ALPN, preferred first.
ALPN_PROTOCOLS = [b"h2", b"http/1.1"]


class ProtocolDetector(Protocol):
    """Reads the first bytes of a connection and hands it to the right protocol."""

    def __init__(self, factory: GatewayServerFactory) -> None:
        self.factory = factory
        self._buffer = b""
        self._protocol: Protocol | None = None
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        # Responses, SSE events and gRPC messages go out as soon as they are
        # written: without TCP_NODELAY a small write behind an unacknowledged
        # one waits for the client's delayed ACK (up to 40 ms).  nginx and
        # Envoy set it on client connections too.  (TLS: the wrapper passes
        # the call to the TCP transport.)
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        # A connection that never sends a byte is closed like an idle HTTP/1.1 one.
        self._timer = self.factory.clock.callLater(self.factory.limits().header_timeout, self._expired)

    def dataReceived(self, data: bytes) -> None:
        if self._protocol is not None:
            # The transport could not be rewired (a test transport): keep relaying.
            self._protocol.dataReceived(data)
            return
        if not data:
            return
        if not self._buffer and data[0] != _P:
            self._switch(HTTP11ServerProtocol(self.factory), data)
            return
        data = self._buffer + data
        seen = min(len(data), _PREFACE_LENGTH)
        if data[:seen] != PREFACE[:seen]:
            self._switch(HTTP11ServerProtocol(self.factory), data)
        elif seen == _PREFACE_LENGTH:
            self._switch(HTTP2ServerProtocol(self.factory), data)
        else:
            self._buffer = data

    def _switch(self, protocol: Protocol, data: bytes) -> None:
        self._cancel_timer()
        self._buffer = b""
        self._protocol = protocol
        # Once the transport is rewired nothing holds the detector, so the
        # chosen protocol takes its place among the live connections (weak)
        # for the graceful shutdown to reach it.
        live = self.factory._counter.live
        live.discard(self)
        live.add(protocol)
        transport = self.transport
        protocol.makeConnection(transport)
        # tcp.Server calls .protocol, TLSMemoryBIOProtocol .wrappedProtocol.
        if getattr(transport, "protocol", None) is self:
            transport.protocol = protocol  # type: ignore[union-attr]
        elif getattr(transport, "wrappedProtocol", None) is self:
            transport.wrappedProtocol = protocol  # type: ignore[union-attr]
        protocol.dataReceived(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self._protocol is not None:
            self._protocol.connectionLost(reason)
            return
        self._cancel_timer()
        self.factory.connection_closed()

    def _expired(self) -> None:
        self._timer = None
        if self.transport is not None:
            self.transport.loseConnection()

    def drain(self) -> None:
        """Graceful shutdown: the chosen protocol's drain; undecided, nothing was asked yet: close."""
        if self._protocol is not None:
            self._protocol.drain()  # type: ignore[attr-defined]
        elif self.transport is not None:
            self._cancel_timer()
            self.transport.loseConnection()

    def force_close(self) -> None:
        if self._protocol is not None:
            self._protocol.force_close()  # type: ignore[attr-defined]
        elif self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()


class GatewayServerFactory(HTTP11ServerFactory):
    """Builds gateway connections (HTTP/1.1 or HTTP/2); refuses new ones past ``max_connections``.

    ``counted_with`` makes this factory count its connections in another one's
    budget (the TLS listener in the cleartext listener's), so the limit holds
    for the process.
    """

    def __init__(
        self,
        gateway: Callable[[], Gateway],
        clock: IReactorTime,
        scheme: bytes = b"http",
        counted_with: HTTP11ServerFactory | None = None,
    ) -> None:
        super().__init__(gateway, clock, scheme)
        self._counter: HTTP11ServerFactory = counted_with or self

    def http2(self) -> HTTP2Config:
        return self.gateway().config.server.http2

    def buildProtocol(self, addr: object) -> Protocol | None:
        if self._counter is not self:
            if not self._counter.admit():
                return None
        elif not self.admit():
            return None
        detector = ProtocolDetector(self)
        self._counter.live.add(detector)
        return detector

    def connection_closed(self) -> None:
        if self._counter is self:
            super().connection_closed()
        else:
            self._counter.connection_closed()


def tls_endpoint(reactor: object, tls: TLSConfig) -> SSL4ServerEndpoint:
    """The TLS listener of ``server.tls``: ALPN offers h2 then http/1.1.

    Twisted's ``ssl:`` endpoint strings cannot ask for ALPN, so the endpoint
    is built here from the same description (port, interface) and files.
    Raises ``ValueError`` (or OpenSSL's errors) for unreadable certificates.
    """
    parts = split_endpoint(tls.listen)
    port = int(parts[1])
    options = dict(part.split("=", 1) for part in parts[2:] if "=" in part)
    return SSL4ServerEndpoint(reactor, port, tls_context(tls), interface=options.get("interface", ""))


def tls_context(tls: TLSConfig) -> CertificateOptions:
    """The TLS settings of ``server.tls`` (certificate chain, key, ALPN h2 then
    http/1.1), also for a worker wrapping an inherited socket in TLS.
    Raises like :func:`tls_endpoint` for unreadable certificates."""
    with open(tls.cert, "rb") as cert_file:
        cert_pem = cert_file.read()
    with open(tls.key, "rb") as key_file:
        key_pem = key_file.read()
    leaf = PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    marker = b"-----BEGIN CERTIFICATE-----"
    chain = [Certificate.loadPEM(marker + block) for block in cert_pem.split(marker)[2:]]
    return CertificateOptions(
        privateKey=leaf.privateKey.original,
        certificate=leaf.original,
        extraCertChain=[cert.original for cert in chain],
        acceptableProtocols=ALPN_PROTOCOLS,
    )
