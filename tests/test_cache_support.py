"""Shared pieces of the cache tests (no tests here): a gateway in memory driven
connection by connection, so a response may still be in flight while other
requests arrive, and an upstream whose answers the test scripts and streams.

:class:`txgateway.testing.GatewayHarness` covers one synchronous request at
a time; coalescing, streaming and disconnects need open connections.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from txgateway.body import BytesBody
from txgateway.config import parse_config
from txgateway.gateway import Gateway
from txgateway.interfaces import IBody, IBodySink, IUpstreamClient
from txgateway.messages import Response, UpstreamRequest
from txgateway.observability.access_log import CollectedLines, output_key
from txgateway.protocols.http1 import HTTP11ServerFactory, HTTP11ServerProtocol
from txgateway.runtime import Runtime

Headers = list[tuple[bytes, bytes]]

#: A wall-clock-like start for the fake clock, so Date/Expires make sense.
EPOCH = 1_700_000_000.0


def http_date(seconds: float) -> bytes:
    from email.utils import formatdate

    return formatdate(seconds, usegmt=True).encode("ascii")


@implementer(IBody)
class StreamedBody:
    """A response body the test feeds piece by piece; records producer calls."""

    def __init__(self, length: int | None = None) -> None:
        self.length = length
        self.sink: IBodySink | None = None
        self.paused = 0
        self.resumed = 0
        self.stopped = False

    def deliverTo(self, sink: IBodySink) -> None:
        self.sink = sink

    def write(self, data: bytes) -> None:
        assert self.sink is not None, "nobody reads the body yet"
        self.sink.write(data)

    def finish(self) -> None:
        assert self.sink is not None
        self.sink.finish()

    def abort(self) -> None:
        assert self.sink is not None
        self.sink.abort(Failure(ConnectionDone("upstream went away")))

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        self.stopped = True


def answer(status: int = 200, headers: Sequence[tuple[bytes, bytes]] = (), body: bytes = b"hello") -> Response:
    """A complete upstream response (text/plain unless ``headers`` says otherwise)."""
    all_headers = list(headers)
    if not any(name == b"content-type" for name, _ in all_headers):
        all_headers.insert(0, (b"content-type", b"text/plain"))
    return Response(status, all_headers, BytesBody(body))


@implementer(IUpstreamClient)
class ScriptedUpstream:
    """Answers each request with ``respond(request)``: a Response or a Deferred of one."""

    def __init__(self, respond: Callable[[UpstreamRequest], Response | Deferred[Response]] | None = None) -> None:
        self.respond = respond or (lambda request: answer())
        self.requests: list[UpstreamRequest] = []

    def request(self, request: UpstreamRequest) -> Deferred[Response]:
        self.requests.append(request)
        result = self.respond(request)
        return result if isinstance(result, Deferred) else succeed(result)

    def close(self) -> Deferred[None]:
        return succeed(None)


class Reply:
    """One parsed response."""

    def __init__(self, status: int, headers: Headers, body: bytes, complete: bool) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.complete = complete

    def header(self, name: str) -> str | None:
        key = name.encode("latin-1")
        for n, v in self.headers:
            if n == key:
                return v.decode("latin-1")
        return None

    def all(self, name: str) -> list[str]:
        key = name.encode("latin-1")
        return [v.decode("latin-1") for n, v in self.headers if n == key]

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.headers!r} {self.body!r} complete={self.complete}>"


def parse_reply(raw: bytes, head_only: bool) -> Reply | None:
    """The first response in ``raw`` (Content-Length or chunked), None before its head is complete."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers: Headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    framing = dict(headers)
    if head_only or status in (204, 304):
        return Reply(status, headers, b"", True)
    if framing.get(b"transfer-encoding") == b"chunked":
        body = b""
        while True:
            size_line, crlf, after = rest.partition(b"\r\n")
            if not crlf:
                return Reply(status, headers, body, False)
            size = int(size_line, 16)
            if size == 0:
                return Reply(status, headers, body, True)
            if len(after) < size + 2:
                return Reply(status, headers, body + after[:size], False)
            body += after[:size]
            rest = after[size + 2 :]
    length = int(framing.get(b"content-length", b"0"))
    return Reply(status, headers, rest[:length], len(rest) >= length)


class ClientConnection:
    """One downstream connection carrying one request."""

    def __init__(self, factory: HTTP11ServerFactory, method: str, request: bytes) -> None:
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        protocol = factory.buildProtocol(address)
        assert isinstance(protocol, HTTP11ServerProtocol)
        self.protocol = protocol
        self.transport = StringTransport(peerAddress=address)
        protocol.makeConnection(self.transport)
        self.method = method
        protocol.dataReceived(request)

    @property
    def reply(self) -> Reply | None:
        return parse_reply(self.transport.value(), self.method == "HEAD")

    def response(self) -> Reply:
        """The complete response; fails the test when there is none yet."""
        reply = self.reply
        assert reply is not None and reply.complete, f"no complete response: {self.transport.value()!r}"
        return reply

    def disconnect(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone("client went away")))


class CacheGateway:
    """A gateway built from YAML in front of ``upstream``, on a fake clock starting at :data:`EPOCH`."""

    def __init__(self, config: str, upstream: IUpstreamClient, runtime: Runtime | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(EPOCH)
        self.runtime = runtime or Runtime(self.clock, self.clock)
        self.upstream = upstream
        # The access log in memory: not on the test's output, no flush timer.
        self.runtime.shared(output_key(parse_config(config)), CollectedLines)
        self.load(config)
        self.factory = HTTP11ServerFactory(lambda: self.gateway, self.runtime.clock)

    def load(self, config: str) -> None:
        """Build a new generation from ``config`` (a reload), keeping the runtime."""
        self.gateway = Gateway(parse_config(config), lambda _config: self.upstream, self.runtime)

    def open(
        self, method: str, target: str, headers: Sequence[tuple[str, str]] = (), host: str = "gateway.test"
    ) -> ClientConnection:
        lines = [f"{method} {target} HTTP/1.1", f"host: {host}", *(f"{n}: {v}" for n, v in headers)]
        return ClientConnection(self.factory, method, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def request(
        self, method: str, target: str, headers: Sequence[tuple[str, str]] = (), host: str = "gateway.test"
    ) -> Reply:
        return self.open(method, target, headers, host).response()

    def get(self, target: str, *headers: tuple[str, str]) -> Reply:
        return self.request("GET", target, headers)
