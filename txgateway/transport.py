"""TCP transports that send at once instead of on the next writable event.

Twisted's ``transport.write`` only appends to a buffer and registers the
socket for writability; the reactor's next poll then sends it and
unregisters.  For a proxy, where nearly every write is one small response or
request that the socket accepts whole, that costs two ``epoll_ctl`` calls and
one more trip through the reactor per write: about an eighth of the
gateway's CPU time in the plain-proxy benchmark (bench/README.md).

Here ``write`` tries ``send`` right away when nothing is buffered; only what
the socket does not take is buffered the usual way (so ordering,
``loseConnection`` flushing and producer backpressure are Twisted's own).
The classes are used for the proxy listeners (``eager_port``) and the
upstream connections (``connect_tcp``); under a test reactor that is not a
real one both fall back to plain Twisted.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import abstract, tcp
from twisted.internet.interfaces import IConnector, IListeningPort
from twisted.internet.posixbase import PosixReactorBase

#: Connections with writes held back while one read is handled (see _SendAtOnce).
_batch: list[_SendAtOnce] | None = None

#: Held-back bytes past this go out at once (a big upload chunk, a large body).
_BATCH_LIMIT = 64 * 1024


class _SendAtOnce:
    """``write`` and ``doRead`` for a :class:`twisted.internet.tcp.Connection`.

    While the reactor hands one connection its readable data, what the
    gateway writes in reaction (to this or other connections: a response
    head and its body, relayed as they are parsed from one upstream read) is
    held per connection and sent with one ``send`` when the read is done.
    Outside a read (timers), writes go out at once.
    """

    dataBuffer: bytes
    _tempDataBuffer: list[bytes]
    connected: int
    disconnecting: int
    _writeDisconnected: bool
    TLS: bool
    socket: Any
    _held: list[bytes] | None = None
    _held_bytes = 0

    def doRead(self) -> Any:
        global _batch
        if _batch is not None:
            return super().doRead()  # type: ignore[misc]
        batch = _batch = []
        try:
            return super().doRead()  # type: ignore[misc]
        finally:
            _batch = None
            for connection in batch:
                connection._release()

    def write(self, data: bytes) -> None:
        if not data:
            return
        held = self._held
        if held is not None:
            held.append(data)
            self._held_bytes += len(data)
            if self._held_bytes > _BATCH_LIMIT:
                self._release()
            return
        if _batch is not None and self.connected and not self.disconnecting:
            self._held = [data]
            self._held_bytes = len(data)
            _batch.append(self)
            return
        self._send(data)

    def _release(self) -> None:
        held = self._held
        if held is None:
            return
        self._held = None
        self._held_bytes = 0
        self._send(held[0] if len(held) == 1 else b"".join(held))

    def _send(self, data: bytes) -> None:
        if (
            not self.dataBuffer
            and not self._tempDataBuffer
            and self.connected
            and not self.disconnecting
            and not self._writeDisconnected
            and not self.TLS
        ):
            try:
                sent = self.socket.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                # A broken connection: the usual path finds and reports it.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        abstract.FileDescriptor.write(self, data)  # type: ignore[arg-type]

    def writeSequence(self, iovec: Any) -> None:
        for data in iovec:
            self.write(data)

    def loseConnection(self, *args: Any, **kwargs: Any) -> Any:
        self._release()  # what was written before goes first
        return super().loseConnection(*args, **kwargs)  # type: ignore[misc]

    def abortConnection(self) -> Any:
        self._held = None  # an abort sends nothing more
        self._held_bytes = 0
        return super().abortConnection()  # type: ignore[misc]

    def registerProducer(self, producer: Any, streaming: bool) -> Any:
        self._release()
        return super().registerProducer(producer, streaming)  # type: ignore[misc]

    def unregisterProducer(self) -> Any:
        self._release()
        return super().unregisterProducer()  # type: ignore[misc]


class EagerServer(_SendAtOnce, tcp.Server):
    """An accepted connection that sends at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _no_delay(self.socket)


class EagerClient(_SendAtOnce, tcp.Client):
    """An outgoing connection that sends at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.socket is not None:
            _no_delay(self.socket)


def _no_delay(sock: Any) -> None:
    """Sending at once, a response head and its body go out as two segments:
    with Nagle's algorithm the second would wait for the peer's delayed ACK (40 ms)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


class EagerConnector(tcp.Connector):
    def _makeTransport(self) -> tcp.Client:
        return EagerClient(self.host, self.port, self.bindAddress, self, self.reactor)


def connect_tcp(reactor: Any, host: str, port: int, factory: Any, timeout: float) -> IConnector:
    """``reactor.connectTCP``, with an eager-sending transport on a real reactor."""
    if isinstance(reactor, PosixReactorBase):
        connector = EagerConnector(host, port, factory, timeout, None, reactor)
        connector.connect()
        return connector
    result: IConnector = reactor.connectTCP(host, port, factory, timeout=timeout)
    return result


def eager_port(port: IListeningPort) -> IListeningPort:
    """Make the connections a TCP listening port accepts from now on send at once."""
    if type(port) is tcp.Port:
        port.transport = EagerServer
    return port
