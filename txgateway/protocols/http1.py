"""The downstream HTTP/1.1 protocol: bytes in, pipeline, bytes out.

Our own Twisted protocol on httptools (llhttp) rather than twisted.web's
Site: Site spools whole request bodies before ``render`` and costs about a
third of the throughput budget (ARCHITECTURE.md, README "Architecture").

What it promises:
- request and response bodies stream with backpressure in both directions
  (see ``txgateway.interfaces``); memory per connection stays bounded;
- pipelined requests are answered in order, one at a time, and reading is
  paused while a request waits, so a pipelining client cannot queue unbounded
  work;
- ``Expect: 100-continue`` is answered only when the upstream actually asks
  for the body, so a request the pipeline refuses never uploads it;
- slowloris (``header_timeout``), idle keep-alive (``idle_timeout``), head
  size (``max_header_bytes``, 431) and body size (413) limits;
- every failure becomes a JSON error or, once a response has started, an
  aborted connection: never a traceback, never a hung socket.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from weakref import WeakSet

import httptools
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txgateway.body import DISCARD, BytesBody, whole
from txgateway.config.model import Limits
from txgateway.errors import (
    BadRequest,
    GatewayError,
    HeadersTooLarge,
    NotImplementedByGateway,
    PayloadTooLarge,
    RequestTimeout,
    error_for,
    render_json,
)
from txgateway.http11 import (
    CONTINUE_100,
    LAST_CHUNK,
    body_forbidden,
    chunk,
    encode_headers,
    status_line,
)
from txgateway.interfaces import IBody, IBodySink, IRequestBody
from txgateway.messages import Response
from txgateway.pipeline.context import RequestContext
from txgateway.protocols.websocket import take_over
from txgateway.upstream.websocket import WebSocketUpgrade
from txgateway.wire import write_soon

if TYPE_CHECKING:
    from txgateway.gateway import Gateway

Headers = list[tuple[bytes, bytes]]

#: Request body bytes held while nobody consumes them yet, before reading pauses.
_BODY_BUFFER_HIGH = 64 * 1024
#: The status an exchange is counted and logged with when the client went away
#: before its response ended (nginx's "client closed request").
CLIENT_CLOSED_REQUEST = 499
#: What a closed connection's parser is replaced with: one without callbacks
#: (so without a reference back to the protocol), never fed.
_DETACHED_PARSER = httptools.HttpRequestParser(object())


@implementer(IRequestBody)
class RequestBody:
    """The body of a downstream request, streamed to whoever consumes it."""

    __slots__ = (
        "_buffer",
        "_buffered",
        "_channel",
        "_error",
        "_expect_continue",
        "_sink",
        "done",
        "length",
        "max_bytes",
        "received",
        "trailers",
    )

    def __init__(self, channel: HTTP11ServerProtocol, length: int | None, expect_continue: bool) -> None:
        self.length = length
        #: Set from the route's max_body_bytes once routed; enforced as bytes arrive.
        self.max_bytes: int | None = None
        self.received = 0
        self.done = False
        self._channel: HTTP11ServerProtocol | None = channel
        self._sink: IBodySink | None = None
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._error: Failure | None = None
        self._expect_continue = expect_continue
        #: Chunked request trailers are not relayed over HTTP/1.1.
        self.trailers: list[tuple[bytes, bytes]] = []

    # From the connection.

    def _data(self, data: bytes) -> None:
        self.received += len(data)
        if self.max_bytes is not None and self.received > self.max_bytes:
            self._failed(Failure(PayloadTooLarge(f"request body exceeds {self.max_bytes} bytes")))
            return
        if self._sink is not None:
            self._sink.write(data)
        elif self._error is None:
            self._buffer.append(data)
            self._buffered += len(data)
            if self._buffered > _BODY_BUFFER_HIGH and self._channel is not None:
                self._channel.pause_reading("body")

    def _end(self) -> None:
        self.done = True
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.finish()

    def _failed(self, reason: Failure) -> None:
        if self._error is not None or self.done:
            return
        self._error = reason
        self._buffer = []
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.abort(reason)
        if self._channel is not None:
            self._channel.body_failed(self, reason)

    # IBody, for the consumer (the upstream client).

    def deliverTo(self, sink: IBodySink) -> None:
        if self._error is not None:
            sink.abort(self._error)
            return
        if self._expect_continue and self.received == 0 and not self.done and self._channel is not None:
            self._channel.write_continue()
        self._expect_continue = False
        buffered, self._buffer = self._buffer, []
        self._buffered = 0
        for data in buffered:
            sink.write(data)
        if self.done:
            sink.finish()
        else:
            self._sink = sink
            if self._channel is not None:
                self._channel.resume_reading("body")

    def pauseProducing(self) -> None:
        if self._channel is not None:
            self._channel.pause_reading("body")

    def resumeProducing(self) -> None:
        if self._channel is not None:
            self._channel.resume_reading("body")

    def stopProducing(self) -> None:
        """The consumer gives up on the body: the connection cannot be reused."""
        self._sink = None
        self._buffer = []
        if self._channel is not None:
            self._channel.body_abandoned(self)


@implementer(IBodySink)
class _ResponseWriter:
    """Streams one response body to the client connection."""

    __slots__ = ("_channel", "_chunked", "_exchange")

    def __init__(self, channel: HTTP11ServerProtocol, exchange: _Exchange, chunked: bool) -> None:
        self._channel = channel
        self._exchange = exchange
        self._chunked = chunked

    def write(self, data: bytes) -> None:
        if data and self._channel.transport is not None:
            self._exchange.ctx.bytes_out += len(data)
            write_soon(self._channel.transport, chunk(data) if self._chunked else data)

    def finish(self) -> None:
        channel = self._channel
        if self._chunked and channel.transport is not None:
            write_soon(channel.transport, LAST_CHUNK)
        channel.response_finished(self._exchange)

    def abort(self, reason: object) -> None:
        self._channel.response_aborted(self._exchange, reason)


class _Exchange:
    """One request/response on the connection."""

    __slots__ = (
        "accounted",
        "body",
        "close_delimited",
        "ctx",
        "deferred",
        "finished",
        "gateway",
        "keep_alive",
        "raw",
        "responded",
        "response_body",
    )

    def __init__(self, ctx: RequestContext, body: RequestBody | None, keep_alive: bool) -> None:
        self.ctx = ctx
        #: The generation that handled it (``exchange_done`` goes there), once dispatched.
        self.gateway: Gateway | None = None
        #: ``exchange_done`` was called: the exchange is over for the observers.
        self.accounted = False
        self.body = body
        self.keep_alive = keep_alive
        self.deferred: Deferred[Response] | None = None
        self.responded = False
        self.response_body: IBody | None = None
        self.finished = False
        #: The body ends when the connection closes: truncation must be a reset.
        self.close_delimited = False
        #: A WebSocket upgrade: the request's bytes as received, for Autobahn's handshake.
        self.raw: bytes | None = None


class HTTP11ServerProtocol(Protocol):
    log = Logger()

    def __init__(self, factory: HTTP11ServerFactory) -> None:
        self.factory = factory
        self.limits: Limits = factory.limits()
        self._clock = factory.clock
        metrics = factory.gateway().runtime.metrics
        self._in_flight = metrics.in_flight["http/1.1"]
        self._connections = metrics.open_connections
        self._parser = httptools.HttpRequestParser(self)
        self._client_ip = ""
        self._client_port = 0
        self._current: _Exchange | None = None
        self._queue: deque[_Exchange] = deque()
        self._incoming: _Exchange | None = None  # the exchange whose request is being parsed
        self._url: bytes = b""
        self._headers: Headers = []
        self._head_bytes = 0
        self._in_head = False
        self._pause_reasons: set[str] = set()
        self._timer: IDelayedCall | None = None
        self._deadline: float | None = None
        self._on_deadline: Callable[[], None] | None = None
        self._timer_step = min(self.limits.header_timeout, self.limits.idle_timeout)
        self._closing = False
        self._lost = False
        #: Graceful shutdown: the last request answered ends the connection.
        self._draining = False
        self._pending_error: GatewayError | None = None
        #: Raw bytes since the last message boundary (for WebSocket upgrades), and
        #: whether they start exactly at the request being parsed.
        self._raw = b""
        self._raw_begins = 0
        self._upgrade: _Exchange | None = None
        #: The WebSocket protocol that took this connection over.
        self._handoff: Protocol | None = None

    # Connection lifecycle.

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self._client_ip = getattr(peer, "host", "") or ""
        self._client_port = getattr(peer, "port", 0) or 0
        self._connections["http/1.1"].inc()
        self._set_timer(self.limits.header_timeout, self._idle_expired)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self._handoff is not None:
            # The transport could not be rewired: relay.
            self._handoff.connectionLost(reason)
            return
        self._lost = True
        self._cancel_timer()
        self._connections["http/1.1"].dec()
        self.factory.connection_closed()
        gone = Failure(CancelledError("client went away"))
        exchanges = [self._current, *self._queue]
        if self._incoming is not None and self._incoming not in exchanges:
            exchanges.append(self._incoming)
        self._queue.clear()
        self._current = self._incoming = None
        for exchange in exchanges:
            if exchange is None:
                continue
            # The client left before the response ended: 499, like nginx.
            self._account(exchange, CLIENT_CLOSED_REQUEST)
            if exchange.body is not None and not exchange.body.done:
                exchange.body._channel = None
                exchange.body._failed(gone)
            if exchange.response_body is not None and not exchange.finished:
                exchange.response_body.stopProducing()
            elif exchange.deferred is not None and not exchange.responded:
                exchange.responded = True
                exchange.deferred.cancel()
        # The parser holds this protocol's bound callbacks: a reference cycle
        # that only a garbage collection would free, 15 objects per closed
        # connection.  Without it the connection is freed at once.
        self._parser = _DETACHED_PARSER

    # Reading.

    def dataReceived(self, data: bytes) -> None:
        if self._handoff is not None:
            self._handoff.dataReceived(data)
            return
        upgrading = self._upgrade
        if upgrading is not None and upgrading.raw is not None:
            # Bytes after an upgrade request, before the pipeline decided: held
            # for the WebSocket protocol (reading is paused meanwhile).
            upgrading.raw += data
            return
        if self._closing:
            return
        if self._in_head:
            self._raw += data
        elif self._incoming is None:
            self._raw, self._raw_begins = data, 0
        else:
            self._raw, self._raw_begins = b"", 2  # mid-body: not usable, rebuilt if needed
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            rest = data[upgrade.args[0] :] if upgrade.args else b""
            exchange, self._upgrade = self._upgrade, None
            if exchange is not None and exchange.ctx.protocol == "websocket" and not self._closing:
                # A WebSocket upgrade on a WebSocket route: HTTP parsing ends
                # here; the pipeline's answer decides what the bytes become.
                end = len(self._raw) - len(rest)
                exchange.raw = (self._raw[:end] if self._raw_begins == 1 else self._rebuild(exchange)) + rest
                self._upgrade = exchange
                self._raw = b""
                self.pause_reading("upgrade")
                return
            # An Upgrade this route does not take: the request was served as
            # plain HTTP, go on parsing what follows as HTTP.
            self._raw = b""
            if rest and not self._closing:
                self.dataReceived(rest)
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            if isinstance(cause, GatewayError):
                self._reject(cause)
            else:
                self.log.failure("error handling request data", Failure(cause or error))
                self._reject(GatewayError())
        except httptools.HttpParserError as error:
            self._reject(BadRequest(f"malformed request: {error.args[0] if error.args else 'parse error'}"))

    def on_message_begin(self) -> None:
        self._raw_begins += 1
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._in_head = True
        self._set_timer(self.limits.header_timeout, self._head_expired)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))
        self._count_head(len(name) + len(value) + 4)

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.limits.max_header_bytes:
            raise HeadersTooLarge(f"request head exceeds {self.limits.max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._clear_deadline()
        parser = self._parser
        method = parser.get_method()
        version = (1, 1) if parser.get_http_version() == "1.1" else (1, 0)
        headers = self._headers
        url = self._url
        host: str | None = None
        content_length: int | None = None
        chunked = False
        expect_continue = False
        for name, value in headers:
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"content-length":
                content_length = int(value)  # llhttp validated it
            elif name == b"transfer-encoding":
                if chunked or value.strip().lower() != b"chunked":
                    # RFC 9112 6.1: a coding we cannot decode must not be
                    # passed on as if it were the plain body.
                    raise NotImplementedByGateway(f"transfer coding not supported: {value.decode('latin-1')}")
                chunked = True
            elif name == b"expect":
                expect_continue = value.lower() == b"100-continue"
        if url[:1] == b"/":
            path, _, query = url.partition(b"?")
        else:
            path, query, host = self._absolute_form(url, host)
        body: RequestBody | None = None
        if chunked:
            body = RequestBody(self, None, expect_continue)
        elif content_length:
            body = RequestBody(self, content_length, expect_continue)
        ctx = RequestContext(
            method,
            path.decode("latin-1"),
            query,
            headers,
            client_ip=self._client_ip,
            client_port=self._client_port,
            version=version,
            scheme=self.factory.scheme,
            host=host,
            body=body,
            started=self._clock.seconds(),
        )
        exchange = _Exchange(ctx, body, parser.should_keep_alive())
        self._in_flight.inc()
        if parser.should_upgrade() and method == b"GET" and _is_websocket_upgrade(headers):
            # Gateway.handle turns it back into plain HTTP on a route without websocket.
            ctx.protocol = "websocket"
            self._upgrade = exchange
        self._incoming = exchange if body is not None else None
        if self._current is None:
            self._dispatch(exchange)
        else:
            self._queue.append(exchange)
            self.pause_reading("pipeline")

    def _rebuild(self, exchange: _Exchange) -> bytes:
        """The upgrade request's head, when its raw bytes could not be kept (pipelined)."""
        ctx = exchange.ctx
        target = self._url
        return (
            ctx.method
            + b" "
            + target
            + b" HTTP/1.1\r\n"
            + b"".join(name + b": " + value + b"\r\n" for name, value in ctx.headers)
            + b"\r\n"
        )

    def _absolute_form(self, url: bytes, host: str | None) -> tuple[bytes, bytes, str | None]:
        """``http://host/path?q`` (RFC 9112 3.2.2): the URL's host wins over Host."""
        try:
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError:
            raise BadRequest("invalid request target") from None
        if not parsed.host:
            raise BadRequest("invalid request target")
        authority = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
        return parsed.path or b"/", parsed.query or b"", authority.decode("latin-1")

    def on_body(self, data: bytes) -> None:
        exchange = self._incoming
        if exchange is not None and exchange.body is not None:
            exchange.body._data(data)

    def on_message_complete(self) -> None:
        exchange, self._incoming = self._incoming, None
        if exchange is not None and exchange.body is not None:
            exchange.body._end()

    # Flow control of reading.

    def pause_reading(self, reason: str) -> None:
        if not self._pause_reasons and self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        self._pause_reasons.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason in self._pause_reasons:
            self._pause_reasons.discard(reason)
            if not self._pause_reasons and self.transport is not None and not self._lost:
                self.transport.resumeProducing()  # type: ignore[attr-defined]

    def write_continue(self) -> None:
        if self.transport is not None and not self._lost:
            self.transport.write(CONTINUE_100)

    # Running the pipeline.

    def _dispatch(self, exchange: _Exchange) -> None:
        self._current = exchange
        try:
            gateway = exchange.gateway = self.factory.gateway()
            d = gateway.handle(exchange.ctx)
        except Exception:  # noqa: BLE001 - any bug becomes a 500, never a traceback
            self.log.failure("gateway.handle raised")
            self._respond_error(exchange, GatewayError())
            return
        exchange.deferred = d
        d.addCallbacks(self._respond, self._failed, callbackArgs=(exchange,), errbackArgs=(exchange,))

    def _failed(self, failure: Failure, exchange: _Exchange) -> None:
        if exchange.responded or self._lost:
            return
        self._respond_error(exchange, error_for(failure, self.log))

    def _respond_error(self, exchange: _Exchange, error: GatewayError) -> None:
        status, headers, payload = render_json(error, exchange.ctx.request_id or None)
        if exchange.ctx.request_id:
            headers.append((b"x-request-id", exchange.ctx.request_id.encode("ascii")))
        self._respond(Response(status, headers, BytesBody(payload)), exchange)

    def _respond(self, response: Response, exchange: _Exchange) -> None:
        if exchange.responded or self._lost or self.transport is None:
            if response.body is not None:
                response.body.stopProducing()
            if isinstance(response, WebSocketUpgrade):
                response.upstream_protocol.dropConnection(abort=True)
            return
        if isinstance(response, WebSocketUpgrade):
            self._take_over(exchange, response)
            return
        if exchange.ctx.protocol == "websocket":
            # A refused upgrade: the connection carries nothing after the answer.
            exchange.keep_alive = False
            self._upgrade = None
        exchange.responded = True
        ctx = exchange.ctx
        body = response.body
        keep_alive = exchange.keep_alive and not self._closing and not (self._draining and not self._queue)
        request_body = exchange.body
        if request_body is not None and not request_body.done:
            # The request body was not (fully) read: the connection cannot
            # carry another request.
            keep_alive = False
        chunked = False
        framing: bytes
        if body is not None:
            body = whole(body)  # then sent with its head in one write, without a producer
        if body_forbidden(ctx.method, response.status):
            framing = b""
            if body is not None:
                body.deliverTo(DISCARD)
                body = None
        elif body is None:
            framing = b"content-length: 0\r\n"
        elif body.length is not None:
            framing = b"content-length: %d\r\n" % body.length
        elif ctx.version >= (1, 1):
            framing = b"transfer-encoding: chunked\r\n"
            chunked = True
        else:
            framing = b""
            keep_alive = False
            exchange.close_delimited = True
        if not keep_alive:
            framing += b"connection: close\r\n"
        elif ctx.version == (1, 0):
            framing += b"connection: keep-alive\r\n"
        exchange.keep_alive = keep_alive
        ctx.status = response.status
        transport = self.transport
        head = status_line(response.status, response.reason) + encode_headers(response.headers) + framing + b"\r\n"
        if body is None:
            write_soon(transport, head)
            self.response_finished(exchange)
        elif isinstance(body, BytesBody):
            ctx.bytes_out = len(body.data)
            write_soon(transport, head + body.data)
            self.response_finished(exchange)
        else:
            write_soon(transport, head)
            exchange.response_body = body
            transport.registerProducer(body, True)  # type: ignore[attr-defined]
            body.deliverTo(_ResponseWriter(self, exchange, chunked))

    def _take_over(self, exchange: _Exchange, upgrade: WebSocketUpgrade) -> None:
        """The pipeline accepted a WebSocket upgrade: Autobahn gets the connection.

        The request is no longer in flight; its exchange (status 101) ends,
        for the observers, when the WebSocket connection closes.
        """
        exchange.responded = exchange.finished = exchange.accounted = True
        self._closing = True
        self._cancel_timer()
        self._upgrade = None
        for queued in self._queue:  # never answered: status 0
            self._account(queued)
        self._queue.clear()
        self._current = None
        transport = self.transport
        raw = exchange.raw or self._rebuild(exchange)
        ctx = exchange.ctx
        ctx.status = 101
        self._in_flight.dec()
        connections = self._connections
        connections["http/1.1"].dec()
        connections["websocket"].inc()
        gateway = exchange.gateway or self.factory.gateway()
        clock = self._clock
        closed = self.factory.connection_closed

        def lost() -> None:
            connections["websocket"].dec()
            ctx.ended = clock.seconds()
            gateway.exchange_done(ctx)
            closed()

        protocol = take_over(transport, upgrade, raw, clock, lost, ctx)
        self._handoff = protocol
        # tcp.Server calls .protocol, TLSMemoryBIOProtocol .wrappedProtocol.
        if getattr(transport, "protocol", None) is self:
            transport.protocol = protocol  # type: ignore[union-attr]
        elif getattr(transport, "wrappedProtocol", None) is self:
            transport.wrappedProtocol = protocol  # type: ignore[union-attr]
        if self._pause_reasons and transport is not None:
            self._pause_reasons.clear()
            transport.resumeProducing()  # type: ignore[attr-defined]

    def response_finished(self, exchange: _Exchange) -> None:
        if exchange.finished:
            return
        exchange.finished = True
        if exchange.response_body is not None and self.transport is not None and not self._lost:
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
        self._account(exchange)
        if self._lost:
            return
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            pending = self._error_exchange()
            self._current = pending
            self._respond_error(pending, error)
            return
        if not exchange.keep_alive:
            self._close()
            return
        self._next()

    def response_aborted(self, exchange: _Exchange, reason: object) -> None:
        """The response body failed midway: the client must see a broken message.

        With Content-Length or chunked framing a close after the bytes sent so
        far shows the truncation (and keeps the head the client may still be
        reading); a close-delimited body would look complete, so it is reset.
        The exchange keeps the status its head said, with the bytes sent.
        """
        exchange.finished = True
        self._account(exchange)
        if self.transport is not None and not self._lost:
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
            self.log.warn(
                "response body aborted for request {request_id}: {reason}",
                request_id=exchange.ctx.request_id,
                reason=reason,
            )
            self._closing = True
            if exchange.close_delimited:
                self.transport.abortConnection()  # type: ignore[attr-defined]
            else:
                self.transport.loseConnection()

    def _next(self) -> None:
        self._current = None
        if self._queue:
            exchange = self._queue.popleft()
            if not self._queue:
                self.resume_reading("pipeline")
            self._dispatch(exchange)
        elif self._draining and not self._in_head:
            self._close()  # answered everything it was sent: the shutdown may go on
        else:
            self.resume_reading("pipeline")
            if not self._in_head:
                self._set_timer(self.limits.idle_timeout, self._idle_expired)

    # Body events from RequestBody.

    def body_failed(self, body: RequestBody, reason: Failure) -> None:
        exchange = self._current
        if exchange is None or exchange.body is not body or self._lost:
            return
        if isinstance(reason.value, GatewayError) and not exchange.responded:
            self._closing = True
            self._respond_error(exchange, reason.value)

    def body_abandoned(self, body: RequestBody) -> None:
        # Whatever the consumer did not read can't be skipped reliably.
        self.resume_reading("body")
        if self._current is not None and self._current.body is body:
            self._current.keep_alive = False

    # Graceful shutdown (from the factory).

    def drain(self) -> None:
        """Close now if idle, else after the response to the last request received."""
        if self._lost or self._handoff is not None or self._draining:
            return
        self._draining = True
        if self._current is None and not self._queue and self._incoming is None and not self._in_head:
            self._close()
        elif self._current is not None and self._current.finished and not self._queue:
            self._close()

    def force_close(self) -> None:
        if self._lost or self._handoff is not None or self.transport is None:
            return
        self._closing = True
        self._cancel_timer()
        self.transport.abortConnection()  # type: ignore[attr-defined]

    # Errors and closing.

    def _reject(self, error: GatewayError) -> None:
        """A protocol-level error: stop reading, answer it in order, then close."""
        self._closing = True
        self._cancel_timer()
        incoming = self._incoming
        if incoming is not None and incoming.body is not None and not incoming.body.done:
            # Aborts the upload to the upstream; answers if that request is current.
            incoming.body._failed(Failure(error))
        current = self._current
        if current is None:
            exchange = self._error_exchange()
            self._current = exchange
            self._respond_error(exchange, error)
        elif current.responded:
            if current.finished:
                self._close()
            else:
                current.keep_alive = False
        elif current is not incoming:
            # The error belongs to a later pipelined request: answer it after
            # the current response, then close.
            self._pending_error = error

    def _error_exchange(self) -> _Exchange:
        """An exchange for an error found before a request could be built.

        Its method and path are "-" (nothing usable was read); it counts and
        is logged like any exchange, with no route.
        """
        gateway = self.factory.gateway()
        ctx = RequestContext(
            b"-", "-", b"", [], client_ip=self._client_ip, client_port=self._client_port, started=self._clock.seconds()
        )
        ctx.request_id = gateway.request_ids.next()
        exchange = _Exchange(ctx, None, False)
        exchange.gateway = gateway
        self._in_flight.inc()
        return exchange

    def _account(self, exchange: _Exchange, status: int | None = None) -> None:
        """The exchange is over: fill in what it came to and tell its gateway, once.

        ``status`` overrides the one the response head gave (499: the client
        went away first).
        """
        if exchange.accounted:
            return
        exchange.accounted = True
        ctx = exchange.ctx
        if status is not None:
            ctx.status = status
        body = exchange.body
        if body is not None:
            ctx.bytes_in = body.received
        ctx.ended = self._clock.seconds()
        self._in_flight.dec()
        gateway = exchange.gateway
        if gateway is None:  # never dispatched (a pipelined request the client left behind)
            gateway = self.factory.gateway()
        gateway.exchange_done(ctx)

    def _close(self) -> None:
        self._closing = True
        self._cancel_timer()
        if self.transport is not None and not self._lost:
            self.transport.loseConnection()

    def _head_expired(self) -> None:
        self.log.info("request head timed out from {client}", client=self._client_ip)
        self._reject(RequestTimeout(f"request head not received within {self.limits.header_timeout:g}s"))

    def _idle_expired(self) -> None:
        if self._current is None and not self._queue:
            self._close()

    # Timeouts.  One connection has one deadline at a time (the request head's,
    # or the keep-alive idle one), kept as a time and a function.  The one
    # reactor timer is not moved for each request: it fires at most every
    # ``header_timeout`` (or ``idle_timeout``, if shorter) seconds, acts when
    # the deadline has passed, and otherwise waits again; a request on a
    # keep-alive connection costs no timer operation at all.

    def _set_timer(self, seconds: float, call: Callable[[], None]) -> None:
        now = self._clock.seconds()
        self._deadline = now + seconds
        self._on_deadline = call
        timer = self._timer
        if timer is None:
            self._timer = self._clock.callLater(min(seconds, self._timer_step), self._tick)
        elif timer.getTime() > self._deadline:
            timer.reset(seconds)

    def _clear_deadline(self) -> None:
        """No deadline for now; the timer stays armed (it is cheaper to let it tick once)."""
        self._deadline = None

    def _tick(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return
        left = deadline - self._clock.seconds()
        if left > 0:
            self._timer = self._clock.callLater(min(left, self._timer_step), self._tick)
            return
        call = self._on_deadline
        self._deadline = self._on_deadline = None
        if call is not None:
            call()

    def _cancel_timer(self) -> None:
        """No deadline and no timer (the connection is closing)."""
        self._deadline = self._on_deadline = None
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None


def _is_websocket_upgrade(headers: Headers) -> bool:
    return any(name == b"upgrade" and b"websocket" in value.lower() for name, value in headers)


class HTTP11ServerFactory(Factory):
    """Builds HTTP/1.1 connections; refuses new ones past ``max_connections``."""

    log = Logger()
    protocol = HTTP11ServerProtocol
    noisy = False

    def __init__(self, gateway: Callable[[], Gateway], clock: IReactorTime, scheme: bytes = b"http") -> None:
        #: The current gateway generation; read per request so reloads apply.
        self.gateway = gateway
        self.clock = clock
        self.scheme = scheme
        self.open_connections = 0
        self._refused_logged = False
        #: The connections' protocols, for a graceful shutdown to reach them
        #: (weak: a closed connection's protocol goes when nothing else holds it).
        self.live: WeakSet[Any] = WeakSet()
        #: Set by ``drain()``: responses end their connections, idle ones close.
        self.draining = False
        self._idle_waiters: list[Deferred[None]] = []

    def limits(self) -> Limits:
        return self.gateway().config.server.limits

    def buildProtocol(self, addr: object) -> Protocol | None:
        if not self.admit():
            return None
        protocol = HTTP11ServerProtocol(self)
        self.live.add(protocol)
        return protocol

    # Graceful shutdown.

    def drain(self) -> None:
        """Ask every connection to finish what it started and close.

        Idle keep-alive connections close now; a connection with a request
        in progress answers it with ``Connection: close`` (HTTP/2: GOAWAY,
        then the started streams finish); WebSocket relays are left to the
        shutdown, which closes them with 1001 when the grace period ends.
        """
        self.draining = True
        for protocol in list(self.live):
            protocol.drain()

    def force_close(self) -> None:
        """The grace period is over: close every connection still open, now."""
        for protocol in list(self.live):
            protocol.force_close()

    def when_idle(self) -> Deferred[None]:
        """Fires once no connection is open."""
        if self.open_connections <= 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def admit(self) -> bool:
        """Count a new connection, or refuse it past ``max_connections``."""
        if self.open_connections >= self.limits().max_connections:
            if not self._refused_logged:
                self.log.warn(
                    "refusing connections: {count} open, max_connections reached",
                    count=self.open_connections,
                )
                self._refused_logged = True
            return False
        self._refused_logged = False
        self.open_connections += 1
        return True

    def connection_closed(self) -> None:
        self.open_connections -= 1
        if self.open_connections <= 0 and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)
