"""Run requests through a configured gateway in memory, for users' own tests.

Like ``treq.testing.StubTreq``: no sockets, no reactor, a fake clock.  The
request goes through the real HTTP/1.1 protocol, router and pipeline (and so
through your own middlewares); the upstream is a :class:`MemoryUpstream`
that answers from a Python function and records what it received::

    upstream = MemoryUpstream(lambda request: (200, [(b"content-type", b"text/plain")], b"hi"))
    gateway = GatewayHarness(parse_config(YAML), upstream)
    response = gateway.request("GET", "/api/users/7", headers=[("authorization", "Bearer ...")])
    assert response.status == 200
    assert upstream.requests[0].target == b"/users/7"
    assert gateway.access_log.records()[0]["status"] == 200

The access log (when ``observability.access_log.enabled``) is kept in memory,
in ``access_log``, instead of being written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httptools
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from txgateway.body import BytesBody
from txgateway.config.model import GatewayConfig, UpstreamConfig
from txgateway.gateway import Gateway
from txgateway.interfaces import IBodySink, IUpstreamClient
from txgateway.messages import Response, UpstreamRequest
from txgateway.observability.access_log import CollectedLines, output_key
from txgateway.protocols.http1 import HTTP11ServerFactory
from txgateway.runtime import Runtime

Headers = list[tuple[bytes, bytes]]
Answer = tuple[int, Sequence[tuple[bytes, bytes]], bytes]


@dataclass
class ReceivedRequest:
    """What the upstream received: the request and its whole body."""

    host: str
    port: int
    method: bytes
    target: bytes
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


@implementer(IBodySink)
class _Collect:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def finish(self) -> None:
        self.done.callback(b"".join(self.parts))

    def abort(self, reason: object) -> None:
        self.done.errback(reason if isinstance(reason, (Failure, BaseException)) else None)


@implementer(IUpstreamClient)
class MemoryUpstream:
    """An upstream client answering from ``answer(request)``.

    ``answer`` returns ``(status, headers, body)`` or a Deferred of it, or
    raises an ``UpstreamError`` to simulate a failing upstream.
    """

    def __init__(self, answer: Callable[[ReceivedRequest], Answer | Deferred[Answer]]) -> None:
        self._answer = answer
        self.requests: list[ReceivedRequest] = []

    def request(self, request: UpstreamRequest) -> Deferred[Response]:
        collected: Deferred[bytes]
        if request.body is None:
            collected = succeed(b"")
        else:
            sink = _Collect()
            collected = sink.done
            request.body.deliverTo(sink)

        def answer(body: bytes) -> Deferred[Answer]:
            received = ReceivedRequest(
                request.host, request.port, request.method, request.target, list(request.headers), body
            )
            self.requests.append(received)
            return maybeDeferred(self._answer, received)  # type: ignore[call-overload]

        def respond(answer: Answer) -> Response:
            status, headers, body = answer
            return Response(status, list(headers), BytesBody(body))

        return collected.addCallback(answer).addCallback(respond)

    def close(self) -> Deferred[None]:
        return succeed(None)


@dataclass
class HarnessResponse:
    status: int
    headers: Headers
    body: bytes
    raw: bytes = field(repr=False, default=b"")

    def header(self, name: str) -> str | None:
        key = name.lower().encode("latin-1")
        for n, v in self.headers:
            if n == key:
                return v.decode("latin-1")
        return None

    def json(self) -> object:
        import json

        return json.loads(self.body)


class _ResponseReader:
    """Parses the gateway's bytes back into responses."""

    def __init__(self) -> None:
        self.responses: list[HarnessResponse] = []
        self._parser = httptools.HttpResponseParser(self)
        self._headers: Headers = []
        self._body: list[bytes] = []

    def feed(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_message_begin(self) -> None:
        self._headers, self._body = [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_body(self, data: bytes) -> None:
        self._body.append(data)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        if status >= 200:
            self.responses.append(HarnessResponse(status, self._headers, b"".join(self._body)))


class GatewayHarness:
    """A gateway built from ``config`` whose upstreams are all ``upstream``."""

    def __init__(
        self,
        config: GatewayConfig,
        upstream: IUpstreamClient,
        clock: Clock | None = None,
        client_ip: str = "127.0.0.1",
        reactor: object = None,
        runtime: Runtime | None = None,
    ) -> None:
        """``reactor`` is only needed by middlewares that make network calls
        (JWKS fetches, Redis); everything else runs on the fake ``clock``.
        Pass a prepared ``runtime`` to pre-register shared objects (a JWKS key
        set with a stub fetch, a rate-limit store) under their keys."""
        self.clock = clock or Clock()
        if runtime is not None:
            self.runtime = runtime
        elif reactor is not None:
            self.runtime = Runtime(reactor, self.clock)
        else:
            self.runtime = Runtime(self.clock, self.clock)
        #: The access log's lines (``access_log.records()``: the JSON ones parsed).
        self.access_log: CollectedLines = self.runtime.shared(output_key(config), CollectedLines)
        self.gateway = Gateway(config, lambda _config: upstream, self.runtime)
        self._factory = HTTP11ServerFactory(lambda: self.gateway, self.clock)
        self._client_ip = client_ip

    def upstream_for(self, name: str) -> UpstreamConfig:
        return self.gateway.config.upstreams[name]

    def request(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        host: str = "gateway.test",
        max_timers: int = 100,
    ) -> HarnessResponse:
        """Send one request on a fresh connection and return the complete response.

        While no response has come, the fake clock is advanced to the next
        pending timer (up to ``max_timers`` times), so retries with backoff
        complete.  Raises AssertionError when the gateway did not answer (an
        upstream ``answer`` that returned a Deferred nobody fires).
        """
        from twisted.internet.address import IPv4Address

        protocol = self._factory.buildProtocol(IPv4Address("TCP", self._client_ip, 40000))
        if protocol is None:
            raise AssertionError("connection refused (max_connections)")
        transport = StringTransport(peerAddress=IPv4Address("TCP", self._client_ip, 40000))
        protocol.makeConnection(transport)
        lines = [f"{method} {target} HTTP/1.1", f"host: {host}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if body:
            lines.append(f"content-length: {len(body)}")
        protocol.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        reader = _ResponseReader()
        seen = 0
        for _ in range(max_timers):
            raw = transport.value()
            reader.feed(raw[seen:])
            seen = len(raw)
            if reader.responses:
                break
            # Waiting on a timer (a retry backoff, say): let fake time pass
            # to the next one, as much as the gateway asks for.
            pending = [call.getTime() for call in self.clock.getDelayedCalls() if call.active()]
            if not pending:
                break
            self.clock.advance(max(0.0, min(pending) - self.clock.seconds()))
        protocol.connectionLost()
        if not reader.responses:
            raise AssertionError(f"no complete response from the gateway; got {raw!r}")
        response = reader.responses[0]
        response.raw = raw
        return response
