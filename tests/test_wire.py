"""Writing on real loopback sockets: wire.write_soon, and TCP_NODELAY on the client connections."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from txgateway.wire import write_soon

reactor: Any = _reactor


class Peer(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.made: Deferred[Peer] = Deferred()
        self.lost: Deferred[bytes] = Deferred()
        self._wanted: tuple[int, Deferred[bytes]] | None = None

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self._wanted is not None and len(self.received) >= self._wanted[0]:
            d = self._wanted[1]
            self._wanted = None
            d.callback(self.received)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(self.received)

    def receive(self, size: int) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        if len(self.received) >= size:
            d.callback(self.received)
        else:
            self._wanted = (size, d)
        return d


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


async def connected_pair(test: TestCase) -> tuple[Peer, Peer]:
    """A server-side and a client-side protocol on one loopback TCP connection."""
    server: Deferred[Peer] = Deferred()

    def build(addr: object) -> Peer:
        peer = Peer()
        peer.made.chainDeferred(server)
        return peer

    factory = Factory()
    factory.buildProtocol = build  # type: ignore[method-assign]
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    test.addCleanup(port.stopListening)
    client = Peer()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(Factory.forProtocol(lambda: client))
    accepted = await server

    def close() -> Deferred[Any]:
        waits = []
        for peer in (client, accepted):
            if not peer.lost.called:
                waits.append(peer.lost)
                peer.transport.abortConnection()  # type: ignore[union-attr]
        from twisted.internet.defer import gatherResults

        return gatherResults(waits)

    test.addCleanup(close)
    return accepted, client


def turn() -> Deferred[None]:
    return deferLater(reactor, 0, lambda: None)


class WriteSoonTests(TestCase):
    async def test_sent_when_the_turn_ends_without_registering_the_socket(self) -> None:
        server, client = await connected_pair(self)
        write_soon(server.transport, b"head;")
        write_soon(server.transport, b"body")
        self.assertNotIn(server.transport, reactor.getWriters(), "no epoll registration for the write")
        self.assertEqual(await client.receive(9), b"head;body")
        self.assertEqual(server.transport.dataBuffer, b"")  # type: ignore[union-attr]
        self.assertEqual(server.transport._tempDataLen, 0)  # type: ignore[union-attr]

    async def test_order_is_kept_with_plain_writes_in_between(self) -> None:
        server, client = await connected_pair(self)
        write_soon(server.transport, b"1;")
        server.transport.write(b"2;")  # type: ignore[union-attr]
        write_soon(server.transport, b"3")
        self.assertEqual(await client.receive(5), b"1;2;3")

    async def test_more_than_the_socket_takes_is_delivered_whole_by_the_reactor(self) -> None:
        server, client = await connected_pair(self)
        big = bytes(range(256)) * (32 * 1024)  # 8 MiB: more than loopback buffers hold
        write_soon(server.transport, big)
        write_soon(server.transport, b"end")
        await turn()
        transport: Any = server.transport
        self.assertTrue(transport.dataBuffer or transport._tempDataLen, "the rest waits in Twisted's queue")
        self.assertIn(transport, reactor.getWriters(), "and the reactor sends it")
        received = await client.receive(len(big) + 3)
        self.assertEqual(received, big + b"end")

    async def test_lose_connection_after_a_queued_write_delivers_it_first(self) -> None:
        server, client = await connected_pair(self)
        write_soon(server.transport, b"last words")
        server.transport.loseConnection()  # type: ignore[union-attr]
        self.assertEqual(await client.lost, b"last words")

    async def test_a_closed_connection_drops_the_bytes_quietly(self) -> None:
        server, client = await connected_pair(self)
        server.transport.abortConnection()  # type: ignore[union-attr]
        await server.lost
        write_soon(server.transport, b"too late")
        await turn()
        self.assertEqual(await client.lost, b"")

    async def test_a_peer_gone_before_the_turn_ends_closes_through_the_reactor(self) -> None:
        server, client = await connected_pair(self)
        client.transport.abortConnection()  # type: ignore[union-attr]
        await client.lost
        for _ in range(50):  # RST: the server's send fails, the reactor closes it
            if server.lost.called:
                break
            write_soon(server.transport, b"x" * 65536)
            await turn()
        self.assertTrue(server.lost.called)

    async def test_a_full_queue_pauses_a_streaming_producer_until_it_drains(self) -> None:
        server, client = await connected_pair(self)
        producer = Producer()
        server.transport.registerProducer(producer, True)  # type: ignore[union-attr]
        big = b"p" * (4 * 1024 * 1024)
        write_soon(server.transport, big)
        self.assertEqual(producer.events, ["pause"], "paused at once, as transport.write does")
        await client.receive(len(big))
        while producer.events[-1] != "resume":
            await turn()
        self.assertEqual(producer.events, ["pause", "resume"])
        server.transport.unregisterProducer()  # type: ignore[union-attr]

    def test_other_transports_are_written_as_usual(self) -> None:
        transport = StringTransport()
        write_soon(transport, b"abc")
        write_soon(transport, b"def")
        self.assertEqual(transport.value(), b"abcdef")


class ClientConnectionTests(TestCase):
    async def test_accepted_connections_send_without_nagle_delay(self) -> None:
        from txgateway.config.model import GatewayConfig
        from txgateway.protocols.detect import GatewayServerFactory

        class Generation:
            config = GatewayConfig()

        factory = GatewayServerFactory(lambda: Generation, reactor)  # type: ignore[arg-type,return-value]
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        client = Peer()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(Factory.forProtocol(lambda: client))
        while not factory.live:
            await turn()
        [accepted] = list(factory.live)
        sock = accepted.transport.getHandle()
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
        client.transport.abortConnection()  # type: ignore[union-attr]
        await client.lost
        while factory.open_connections:
            await turn()
