"""The HTTP/1.1 upstream client against real servers on loopback, on the real reactor.

These exist to prove what fakes cannot: that backpressure really stops the
bytes on a socket both ways (a paused consumer pauses the upstream's writes,
a slow upstream pauses the request body), that keep-alive really carries many
requests on one connection, and that late delivery works on a live socket.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from httptools import HttpRequestParser
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.interfaces import IListeningPort, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from txgateway.config.model import PoolConfig
from txgateway.errors import UpstreamConnectError
from txgateway.interfaces import IBody, IBodySink
from txgateway.messages import Response, UpstreamRequest
from txgateway.upstream.pool import HTTP11Client

reactor: Any = _reactor

MiB = 1024 * 1024
BLOCK = b"x" * 65536


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


@implementer(IBodySink)
class WaitingSink:
    """Counts bytes; ``done`` fires with the total (or fails with the abort reason)."""

    def __init__(self, pause_first: IBody | None = None) -> None:
        self.received = 0
        self.done: Deferred[int] = Deferred()
        self._pause_first = pause_first

    def write(self, data: bytes) -> None:
        self.received += len(data)
        body, self._pause_first = self._pause_first, None
        if body is not None:
            body.pauseProducing()

    def finish(self) -> None:
        self.done.callback(self.received)

    def abort(self, reason: object) -> None:
        assert isinstance(reason, Failure)
        self.done.errback(reason)


@implementer(IBody)
class GeneratedBody:
    """``total`` bytes written as fast as the upstream socket takes them."""

    def __init__(self, total: int, known_length: bool = True) -> None:
        self.length = total if known_length else None
        self.total = total
        self.sent = 0
        self.pauses = 0
        self._sink: IBodySink | None = None
        self._paused = False

    def deliverTo(self, sink: IBodySink) -> None:
        self._sink = sink
        self._produce()

    def _produce(self) -> None:
        sink = self._sink
        while sink is not None and not self._paused and self.sent < self.total:
            block = BLOCK[: self.total - self.sent]
            self.sent += len(block)
            sink.write(block)
        if sink is not None and self.sent >= self.total and not self._paused:
            self._sink = None
            sink.finish()

    def pauseProducing(self) -> None:
        self.pauses += 1
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._produce()

    def stopProducing(self) -> None:
        self._sink = None


class UpstreamServer(Protocol):
    """A small HTTP/1.1 upstream on httptools: answers each request via ``answer``.

    ``answer(server, method, target, body_bytes)`` writes the response.  With
    ``stall`` set it stops reading for that many seconds at the first body
    bytes, the way a busy upstream does.
    """

    def __init__(self, owner: UpstreamServers) -> None:
        self.owner = owner
        self.parser = HttpRequestParser(self)
        self.target = b""
        self.body_bytes = 0
        self.stalled = False
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.owner.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback(None)

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_message_begin(self) -> None:
        self.target = b""
        self.body_bytes = 0

    def on_body(self, data: bytes) -> None:
        self.body_bytes += len(data)
        if self.owner.stall and not self.stalled:
            self.stalled = True
            self.transport.pauseProducing()  # type: ignore[union-attr]
            reactor.callLater(self.owner.stall, self.transport.resumeProducing)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        self.owner.requests += 1
        self.owner.answer(self, self.parser.get_method(), self.target, self.body_bytes)


class UpstreamServers(Factory):
    def __init__(self, answer: Callable[[UpstreamServer, bytes, bytes, int], None], stall: float = 0) -> None:
        self.answer = answer
        self.stall = stall
        self.connections: list[UpstreamServer] = []
        self.requests = 0

    def buildProtocol(self, addr: Any) -> UpstreamServer:
        return UpstreamServer(self)


def answer_with_count(server: UpstreamServer, method: bytes, target: bytes, received: int) -> None:
    body = b"%s %s %d" % (method, target, received)
    server.transport.write(  # type: ignore[union-attr]
        b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )


class StreamedAnswer:
    """Answers with ``total`` bytes pushed as a streaming producer; counts its pauses."""

    def __init__(self, total: int, chunked: bool = False) -> None:
        self.total = total
        self.chunked = chunked
        self.pauses = 0
        self.sent = 0

    def __call__(self, server: UpstreamServer, method: bytes, target: bytes, received: int) -> None:
        transport: Any = server.transport
        if self.chunked:
            transport.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        else:
            transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % self.total)
        answer = self

        @implementer(IPushProducer)
        class Producer:
            paused = False

            def pauseProducing(self) -> None:
                answer.pauses += 1
                self.paused = True

            def resumeProducing(self) -> None:
                self.paused = False
                while not self.paused and answer.sent < answer.total:
                    block = BLOCK[: answer.total - answer.sent]
                    answer.sent += len(block)
                    transport.write(b"%x\r\n%s\r\n" % (len(block), block) if answer.chunked else block)
                if answer.sent >= answer.total and not self.paused:
                    if answer.chunked:
                        transport.write(b"0\r\n\r\n")
                    transport.unregisterProducer()

            def stopProducing(self) -> None:
                self.paused = True

        producer = Producer()
        transport.registerProducer(producer, True)
        producer.resumeProducing()


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"hello " + request.path


class CountingSite(Site):
    connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.connections += 1
        return super().buildProtocol(addr)


class SocketTestCase(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.client = HTTP11Client(reactor, PoolConfig(max_connections_per_host=4, idle_timeout=30))
        self.addCleanup(self.client.close)

    def listen(self, factory: Factory) -> int:
        port: IListeningPort = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        if isinstance(factory, UpstreamServers):
            self.addCleanup(self._serverConnectionsGone, factory)
        return port.getHost().port  # type: ignore[no-any-return, attr-defined]

    @inlineCallbacks
    def _serverConnectionsGone(self, factory: UpstreamServers) -> Any:
        # Runs after client.close() (cleanups are LIFO): wait for the server
        # side of every connection to see its end, so the reactor is clean.
        for server in factory.connections:
            if not server.lost.called:
                server.transport.loseConnection()  # type: ignore[union-attr]
            yield server.lost

    def request(self, port: int, method: bytes = b"GET", target: bytes = b"/", body: IBody | None = None) -> Deferred[Response]:
        return self.client.request(
            UpstreamRequest(
                host="127.0.0.1",
                port=port,
                method=method,
                target=target,
                headers=[(b"host", b"127.0.0.1")],
                body=body,
                response_timeout=10.0,
            )
        )


class KeepAliveTests(SocketTestCase):
    @inlineCallbacks
    def test_one_connection_serves_many_requests(self) -> Any:
        site = CountingSite(Hello())
        port = self.listen(site)
        for i in range(20):
            response = yield self.request(port, target=b"/r%d" % i)
            sink = WaitingSink()
            response.body.deliverTo(sink)
            yield sink.done
            self.assertEqual(response.status, 200)
            self.assertEqual(sink.received, len(b"hello /r%d" % i))
        self.assertEqual(site.connections, 1)
        # twisted.web closes its side on our close; wait for it.
        yield self.client.close()
        yield sleep(0.05)

    @inlineCallbacks
    def test_concurrency_is_capped_per_host(self) -> Any:
        servers = UpstreamServers(answer_with_count)
        port = self.listen(servers)
        responses = yield gatherResults([self.request(port, target=b"/%d" % i) for i in range(12)])
        bodies = []
        for response in responses:
            sink = WaitingSink()
            response.body.deliverTo(sink)
            yield sink.done
            bodies.append(sink.received)
        self.assertEqual(len(responses), 12)
        self.assertLessEqual(len(servers.connections), 4)
        self.assertEqual(servers.requests, 12)


class BackpressureTests(SocketTestCase):
    @inlineCallbacks
    def test_paused_consumer_pauses_the_upstream(self) -> Any:
        answer = StreamedAnswer(20 * MiB)
        port = self.listen(UpstreamServers(answer))
        response = yield self.request(port)
        self.assertEqual(response.body.length, 20 * MiB)
        sink = WaitingSink(pause_first=response.body)
        response.body.deliverTo(sink)
        yield sleep(0.5)
        held = sink.received
        sent = answer.sent
        yield sleep(0.3)
        self.assertLess(held, 1 * MiB, "a paused consumer gets (almost) nothing")
        self.assertEqual(sink.received, held, "and nothing more while paused")
        self.assertGreaterEqual(answer.pauses, 1, "the upstream's own writes were paused")
        self.assertEqual(answer.sent, sent, "the upstream is stuck, not sending into memory")
        self.assertLess(answer.sent, 20 * MiB)
        response.body.resumeProducing()
        total = yield sink.done
        self.assertEqual(total, 20 * MiB)

    @inlineCallbacks
    def test_chunked_stream_through(self) -> Any:
        port = self.listen(UpstreamServers(StreamedAnswer(5 * MiB + 3, chunked=True)))
        response = yield self.request(port)
        self.assertIsNone(response.body.length)
        sink = WaitingSink()
        response.body.deliverTo(sink)
        total = yield sink.done
        self.assertEqual(total, 5 * MiB + 3)

    @inlineCallbacks
    def test_slow_upstream_pauses_the_upload(self) -> Any:
        servers = UpstreamServers(answer_with_count, stall=0.5)
        port = self.listen(servers)
        body = GeneratedBody(20 * MiB)
        response = yield self.request(port, method=b"POST", target=b"/up", body=body)
        sink = WaitingSink()
        response.body.deliverTo(sink)
        yield sink.done
        self.assertEqual(response.status, 200)
        self.assertEqual(servers.connections[0].body_bytes, 20 * MiB)
        self.assertGreaterEqual(body.pauses, 1, "the request body was paused by the socket")

    @inlineCallbacks
    def test_chunked_upload(self) -> Any:
        servers = UpstreamServers(answer_with_count)
        port = self.listen(servers)
        body = GeneratedBody(3 * MiB + 1, known_length=False)
        response = yield self.request(port, method=b"POST", body=body)
        sink = WaitingSink()
        response.body.deliverTo(sink)
        yield sink.done
        self.assertEqual(servers.connections[0].body_bytes, 3 * MiB + 1)

    @inlineCallbacks
    def test_late_delivery(self) -> Any:
        answer = StreamedAnswer(20 * MiB)
        port = self.listen(UpstreamServers(answer))
        response = yield self.request(port)
        yield sleep(1.0)
        self.assertLess(answer.sent, 20 * MiB, "the upstream waits while nobody reads")
        sink = WaitingSink()
        response.body.deliverTo(sink)
        total = yield sink.done
        self.assertEqual(total, 20 * MiB)
        # The connection went back to the pool and serves the next request.
        answer.sent = 0
        response = yield self.request(port)
        sink = WaitingSink()
        response.body.deliverTo(sink)
        yield sink.done


class ConnectTests(SocketTestCase):
    @inlineCallbacks
    def test_refused(self) -> Any:
        port: IListeningPort = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        number = port.getHost().port  # type: ignore[attr-defined]
        yield port.stopListening()
        with self.assertRaises(UpstreamConnectError) as caught:
            yield self.request(number)
        self.assertIn(f"127.0.0.1:{number}", caught.exception.message)
        self.flushLoggedErrors()
