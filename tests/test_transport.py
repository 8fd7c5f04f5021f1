"""The send-at-once TCP transports, on real loopback sockets."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from txgateway.transport import EagerClient, EagerServer, connect_tcp, eager_port

reactor: Any = _reactor


class Recorder(Protocol):
    """Collects what it receives; ``on_data`` reacts to each read."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[bytes] = Deferred()
        self.made: Deferred[Recorder] = Deferred()
        self.on_data: Any = None

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.on_data is not None:
            self.on_data(self, data)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.lost.callback(self.received)


class Pair:
    """An eager server and an eager client connected over loopback."""

    async def open(self, test: TestCase) -> tuple[Recorder, Recorder]:
        self.server: Recorder | None = None
        server_made: Deferred[Recorder] = Deferred()

        def build(addr: object) -> Recorder:
            protocol = Recorder()
            protocol.made.chainDeferred(server_made)
            return protocol

        factory = Factory.forProtocol(Recorder)
        factory.buildProtocol = build  # type: ignore[method-assign]
        port = eager_port(await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory))
        test.addCleanup(port.stopListening)
        client = Recorder()
        client_factory = ClientFactory()
        client_factory.buildProtocol = lambda addr: client  # type: ignore[method-assign]
        connector = connect_tcp(reactor, "127.0.0.1", port.getHost().port, client_factory, 5)
        test.addCleanup(connector.disconnect)
        await client.made
        server = await server_made
        return server, client


class EagerTransportTests(TestCase):
    async def test_transports_are_the_eager_ones_with_nodelay(self) -> None:
        server, client = await Pair().open(self)
        self.assertIsInstance(server.transport, EagerServer)
        self.assertIsInstance(client.transport, EagerClient)
        for transport in (server.transport, client.transport):
            sock = transport.getHandle()  # type: ignore[union-attr]
            self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)

    async def test_writes_in_reaction_to_a_read_go_out_in_order_as_one_send(self) -> None:
        server, client = await Pair().open(self)
        sends: list[bytes] = []
        transport: Any = server.transport
        real_send = transport.socket.send

        def counting_send(data: Any) -> int:
            sends.append(bytes(data))
            return int(real_send(data))

        transport.socket = _SocketSpy(transport.socket, counting_send)

        def respond(protocol: Recorder, data: bytes) -> None:
            protocol.transport.write(b"head;")  # type: ignore[union-attr]
            protocol.transport.write(b"body;")  # type: ignore[union-attr]
            protocol.transport.write(b"end")  # type: ignore[union-attr]

        server.on_data = respond
        client.transport.write(b"request")  # type: ignore[union-attr]
        while client.received != b"head;body;end":
            await _turn()
        self.assertEqual(sends, [b"head;body;end"])

    async def test_write_outside_a_read_is_sent_at_once(self) -> None:
        server, client = await Pair().open(self)
        server.transport.write(b"now")  # type: ignore[union-attr]
        transport: Any = server.transport
        self.assertEqual((transport.dataBuffer, transport._tempDataBuffer), (b"", []))
        while client.received != b"now":
            await _turn()

    async def test_lose_connection_after_held_writes_delivers_them(self) -> None:
        server, client = await Pair().open(self)

        def respond_and_close(protocol: Recorder, data: bytes) -> None:
            protocol.transport.write(b"last words")  # type: ignore[union-attr]
            protocol.transport.loseConnection()  # type: ignore[union-attr]

        server.on_data = respond_and_close
        client.transport.write(b"bye")  # type: ignore[union-attr]
        self.assertEqual(await client.lost, b"last words")

    async def test_more_than_the_socket_takes_is_buffered_and_delivered_whole(self) -> None:
        server, client = await Pair().open(self)
        big = bytes(range(256)) * (32 * 1024)  # 8 MiB: more than the socket buffers hold
        server.transport.write(big)  # type: ignore[union-attr]
        transport: Any = server.transport
        self.assertTrue(transport.dataBuffer or transport._tempDataBuffer)
        while len(client.received) < len(big):
            await _turn()
        self.assertEqual(client.received, big)


class _SocketSpy:
    def __init__(self, sock: socket.socket, send: Any) -> None:
        self._sock = sock
        self.send = send

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _turn() -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(0.001, d.callback, None)
    return d


class FallbackTests(TestCase):
    def test_test_reactors_get_plain_connect_tcp(self) -> None:
        memory = MemoryReactor()
        connect_tcp(memory, "127.0.0.1", 80, ClientFactory(), 3)
        [(host, port, _, timeout, _)] = memory.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 80, 3))
