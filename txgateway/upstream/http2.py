"""``H2Client``: the gateway's HTTP/2 cleartext upstream client (h2c and gRPC).

Prior-knowledge HTTP/2 over TCP, on the ``h2`` state machine.  Per (host,
port) a pool of connections, each multiplexing as many streams as the peer's
``SETTINGS_MAX_CONCURRENT_STREAMS`` allows; a new connection only when every
open one is full, at most ``max_connections_per_host`` of them, requests
beyond that waiting first-in first-out (their wait counts toward the response
timeout).  Connections without streams are closed after ``idle_timeout``.

What is promised, stream by stream:

- The request body is sent only as the peer's windows allow; its producer is
  paused while bytes are held back and resumed when a WINDOW_UPDATE makes
  room.  Request trailers (``body.trailers`` after ``finish()``) go out as a
  final HEADERS frame.
- The response body is acknowledged to the peer (WINDOW_UPDATE) only as its
  consumer takes the bytes: a paused or not-yet-attached consumer holds at
  most one stream window, and the connection window is kept large enough that
  a stalled stream never starves the others.
- A GOAWAY stops new streams on the connection; streams it did process finish,
  streams it did not are sent again on another connection when not a byte of
  their body went out (otherwise they fail with ``UpstreamReset``).
- Cancelling, timing out or abandoning one exchange resets its stream only
  (RST_STREAM CANCEL); the connection and its other streams carry on.

``h2`` treats a received GOAWAY as the end of all traffic; the subclasses at
the top keep the connection open for the streams the peer still serves
(RFC 9113 section 6.8).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable
from typing import Any

from h2.config import H2Configuration
from h2.connection import ConnectionInputs, ConnectionState, H2Connection, H2ConnectionStateMachine
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.error import ConnectionDone, NotConnectingError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txgateway.config.model import PoolConfig
from txgateway.errors import (
    BadRequest,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from txgateway.interfaces import IBody, IBodySink, IUpstreamClient
from txgateway.messages import Headers, Response, UpstreamRequest
from txgateway.wire import write_soon

__all__ = ["H2Client"]

#: The receive window advertised per stream (SETTINGS_INITIAL_WINDOW_SIZE):
#: the most a stream whose consumer is slow or absent ever holds in memory.
STREAM_WINDOW = 256 * 1024
#: Streams assumed per connection before the peer's SETTINGS say otherwise.
_ASSUMED_CONCURRENCY = 100
#: How often one request is sent again after GOAWAY / REFUSED_STREAM.
_MAX_RETRIES = 3
_MAX_WINDOW = 2**31 - 1
_DEFAULT_WINDOW = 65535

# Connection states.
_CONNECTING = 0  # TCP connect in progress
_HANDSHAKING = 1  # preface sent, waiting for the peer's SETTINGS
_READY = 2  # takes new streams
_DRAINING = 3  # GOAWAY received: no new streams, closes when the last one ends
_CLOSING = 4  # we sent GOAWAY and are closing
_CLOSED = 5

#: Request header fields that mean nothing (or harm) on an HTTP/2 stream.
_CONNECTION_SPECIFIC = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"trailer",
        b"content-length",
        b"host",
        b"http2-settings",
    }
)
_BAD_VALUE = re.compile(rb"[\r\n\x00]")
_TE_TRAILERS = (b"te", b"trailers")
_CONNECTION_DONE = Failure(ConnectionDone())


class _GracefulGoAway(H2ConnectionStateMachine):
    """``h2``'s connection state machine, except that a received GOAWAY keeps it open.

    The peer may still finish the streams up to its ``last_stream_id``; the
    client makes sure no new stream is opened.
    """

    def process_input(self, input_: ConnectionInputs) -> list[Event]:
        if input_ is ConnectionInputs.RECV_GOAWAY and self.state in (
            ConnectionState.IDLE,
            ConnectionState.CLIENT_OPEN,
        ):
            return []
        return super().process_input(input_)


class _UpstreamH2(H2Connection):
    """An ``H2Connection`` that survives a GOAWAY (see :class:`_GracefulGoAway`)."""

    def __init__(self, config: H2Configuration) -> None:
        super().__init__(config)
        self.state_machine = _GracefulGoAway()

    def clear_outbound_data_buffer(self) -> None:
        # Called by h2 on GOAWAY only: keep the SETTINGS/PING acknowledgements
        # queued before it, since the connection lives on.
        pass


class _FrameGuard:
    """Walks the frame headers of the incoming bytes ahead of ``h2``.

    ``h2`` buffers a whole frame before it checks its length, so a peer that
    is not speaking HTTP/2 (an HTTP/1.1 server answering the preface) or that
    announces an oversized frame would make it wait for up to 16 MiB.  The
    guard refuses both at once: the first frame must be SETTINGS, none may
    exceed our SETTINGS_MAX_FRAME_SIZE.
    """

    __slots__ = ("_first", "_header", "_maxFrame", "_skip")

    def __init__(self, maxFrame: int) -> None:
        self._maxFrame = maxFrame
        self._header = b""
        self._skip = 0
        self._first = True

    def check(self, data: bytes) -> str | None:
        """None if ``data`` may be HTTP/2 frames, else what is wrong with it."""
        position = 0
        size = len(data)
        while position < size:
            if self._skip:
                taken = min(self._skip, size - position)
                self._skip -= taken
                position += taken
                continue
            needed = 9 - len(self._header)
            self._header += data[position : position + needed]
            position += needed
            if len(self._header) < 9:
                return None
            header, self._header = self._header, b""
            length = int.from_bytes(header[:3], "big")
            if self._first:
                self._first = False
                if header[3] != 0x4:
                    return f"the peer does not speak HTTP/2 (it began with {header!r})"
            if length > self._maxFrame:
                return f"frame of {length} bytes exceeds the {self._maxFrame}-byte limit"
            self._skip = length
        return None


def _request_headers(request: UpstreamRequest) -> Headers:
    """The HEADERS block of ``request``: pseudo-headers first, then its fields.

    Raises ``BadRequest`` for a field no HTTP/2 peer may receive.
    """
    authority: bytes | None = None
    grpc = False
    te_trailers = False
    fields: Headers = []
    for name, value in request.headers:
        name = name.lower()
        if _BAD_VALUE.search(value) is not None or not name or _BAD_VALUE.search(name) is not None:
            raise BadRequest(f"header {name!r} cannot be sent upstream")
        if name in _CONNECTION_SPECIFIC or name[:1] == b":":
            if name == b"host" and authority is None:
                authority = value.strip()
            elif name == b"te" and value.strip().lower() == b"trailers":
                te_trailers = True
            continue
        if name == b"content-type" and value.startswith(b"application/grpc"):
            grpc = True
        fields.append((name, value))
    if authority is None:
        authority = f"{request.host}:{request.port}".encode("idna")
    headers: Headers = [
        (b":method", request.method),
        (b":scheme", b"http"),
        (b":authority", authority),
        (b":path", request.target),
    ]
    if grpc or te_trailers:
        headers.append(_TE_TRAILERS)
    body = request.body
    if body is not None and body.length is not None and not grpc:
        headers.append((b"content-length", b"%d" % body.length))
    headers.extend(fields)
    return headers


def _trailer_fields(body: IBody) -> Headers:
    """The request trailers ``body`` ended with, fit for an HTTP/2 HEADERS frame."""
    trailers: Iterable[tuple[bytes, bytes]] = getattr(body, "trailers", None) or ()
    return [
        (name.lower(), value)
        for name, value in trailers
        if name[:1] != b":" and name.lower() not in _CONNECTION_SPECIFIC
    ]


def _error_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


@implementer(IBodySink)
class _RequestBodyWriter:
    """Takes a request body from its producer; holds what the windows don't let out yet.

    While anything is held the producer is paused, so at most one write's
    worth waits here.  Survives a retry: its exchange moves to a new stream
    and the held bytes go there, as long as none went out before.
    """

    __slots__ = ("body", "buffer", "ended", "exchange", "finished", "offset", "paused", "remaining", "sent")

    def __init__(self, exchange: _Exchange, body: IBody) -> None:
        self.exchange: _Exchange | None = exchange
        self.body = body
        self.buffer: deque[bytes] = deque()
        #: Bytes of ``buffer[0]`` already sent.
        self.offset = 0
        #: Bytes still owed for a body of declared length; None if unknown.
        self.remaining = body.length
        #: The producer called finish().
        self.finished = False
        #: END_STREAM went out.
        self.ended = False
        #: Body bytes on the wire.
        self.sent = 0
        #: We paused the producer.
        self.paused = False

    def write(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None or not data or self.finished:
            return
        if self.remaining is not None:
            self.remaining -= len(data)
            if self.remaining < 0:
                exchange.requestBodyFailed(Failure(BadRequest("request body is longer than its declared length")))
                return
        self.buffer.append(data)
        exchange.requestBodyReady()

    def finish(self) -> None:
        exchange = self.exchange
        if exchange is None or self.finished:
            return
        if self.remaining:
            exchange.requestBodyFailed(Failure(BadRequest("request body is shorter than its declared length")))
            return
        self.finished = True
        exchange.requestBodyReady()

    def abort(self, reason: object) -> None:
        exchange = self.exchange
        if exchange is None or self.finished:
            return
        if not isinstance(reason, Failure):
            reason = Failure(UpstreamReset(f"request body aborted: {reason}"))
        exchange.requestBodyFailed(reason)

    def settle(self) -> None:
        """Pause the producer while bytes are held, resume it once they are out."""
        if self.buffer:
            if not self.paused and not self.finished:
                self.paused = True
                self.body.pauseProducing()
        elif self.paused:
            self.paused = False
            if not self.finished and self.exchange is not None:
                self.body.resumeProducing()

    def detach(self) -> None:
        """The stream is gone: drop what is held; stop the producer if it is not done."""
        self.exchange = None
        self.buffer.clear()
        if not self.finished:
            self.finished = True
            self.body.stopProducing()


@implementer(IBody)
class _ResponseBody:
    """The body of one upstream response stream.

    DATA is handed to the sink as it arrives and acknowledged to the peer as
    the sink takes it; what arrives before ``deliverTo`` or while paused is
    kept (at most one stream window, since nothing is acknowledged
    meanwhile).  ``stopProducing`` resets the stream.
    """

    __slots__ = (
        "_buffer",
        "_connection",
        "_failure",
        "_finished",
        "_paused",
        "_sink",
        "_started",
        "_stopped",
        "_streamId",
        "length",
        "trailers",
    )

    def __init__(self, connection: _Connection | None, streamId: int, length: int | None) -> None:
        self.length = length
        self.trailers: Headers = []
        self._connection = connection
        self._streamId = streamId
        self._sink: IBodySink | None = None
        self._buffer: deque[bytes] = deque()
        self._paused = False
        self._started = False
        self._stopped = False
        self._finished = False
        self._failure: Failure | None = None

    # The connection's side.

    def _write(self, data: bytes) -> bool:
        """Take a DATA payload; False when nobody will ever read it (acknowledge it now)."""
        if self._stopped:
            return False
        sink = self._sink
        if sink is not None and not self._paused and not self._buffer:
            self._consumed(len(data))
            sink.write(data)
        else:
            self._buffer.append(data)
        return True

    def _finish(self) -> None:
        self._finished = True
        self._flush()

    def _abort(self, reason: Failure) -> None:
        if self._finished or self._failure is not None:
            return
        self._failure = reason
        self._flush()

    def _consumed(self, size: int) -> None:
        connection = self._connection
        if connection is not None:
            connection._consumed(self._streamId, size)

    def _flush(self) -> None:
        sink = self._sink
        if sink is None:
            return
        buffer = self._buffer
        while buffer and not self._paused:
            data = buffer.popleft()
            self._consumed(len(data))
            sink.write(data)
            if self._sink is not sink:
                return  # stopped, or ended by a nested flush, while writing
        if self._paused or buffer:
            return
        if self._finished:
            self._sink = None
            self._connection = None
            sink.finish()
        elif self._failure is not None:
            self._sink = None
            self._connection = None
            sink.abort(self._failure)

    # The consumer's side (IBody).

    def deliverTo(self, sink: IBodySink) -> None:
        if self._started:
            raise RuntimeError("a response body is delivered at most once")
        self._started = True
        self._sink = sink
        self._flush()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._flush()

    def stopProducing(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._started = True
        self._sink = None
        unread = sum(map(len, self._buffer))
        self._buffer.clear()
        connection, self._connection = self._connection, None
        if connection is not None:
            connection._responseBodyStopped(self, self._streamId, unread)


class _Exchange:
    """One call to :meth:`H2Client.request`: queued, on a stream, retried, answered."""

    __slots__ = (
        "body",
        "client",
        "connection",
        "deferred",
        "headReceived",
        "headers",
        "host",
        "queued",
        "request",
        "requestEnded",
        "responseEnded",
        "retries",
        "streamId",
        "timer",
        "writer",
    )

    def __init__(self, client: H2Client, host: _HostPool, request: UpstreamRequest, headers: Headers) -> None:
        self.client = client
        self.host = host
        self.request = request
        self.headers = headers
        self.deferred: Deferred[Response] | None = None
        self.timer: DelayedCall | None = None
        #: The connection being made for it (it is in ``pending``) or carrying its stream.
        self.connection: _Connection | None = None
        self.streamId = 0
        self.queued = False
        self.writer: _RequestBodyWriter | None = None
        self.body: _ResponseBody | None = None
        self.headReceived = False
        self.requestEnded = False
        self.responseEnded = False
        self.retries = 0

    def startTimer(self) -> None:
        if self.timer is None and self.deferred is not None:
            self.timer = self.client._reactor.callLater(self.request.response_timeout, self.timedOut)

    def requestProgress(self) -> None:
        timer = self.timer
        if timer is not None and timer.active():
            timer.reset(self.request.response_timeout)

    def retryable(self) -> bool:
        """True while the request can go again elsewhere: no head, no body byte sent."""
        writer = self.writer
        return (
            not self.headReceived
            and self.deferred is not None
            and self.retries < _MAX_RETRIES
            and (writer is None or (writer.sent == 0 and writer.exchange is self))
        )

    def responseReceived(self, response: Response) -> None:
        d, self.deferred = self.deferred, None
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if d is not None:
            d.callback(response)

    def fail(self, reason: Failure) -> None:
        d, self.deferred = self.deferred, None
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if d is not None:
            d.errback(reason)

    # The request body writer's side.

    def requestBodyReady(self) -> None:
        connection = self.connection
        writer = self.writer
        if connection is not None and self.streamId:
            connection._sendRequestBody(self)
        elif writer is not None:
            writer.settle()  # between streams (a retry): hold and pause

    def requestBodyFailed(self, reason: Failure) -> None:
        self.client.log.debug("request body failed: {reason}", reason=reason.getErrorMessage())
        connection = self.connection
        if connection is not None and self.streamId:
            connection._resetStream(self, ErrorCodes.CANCEL)
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.detach()
        if self.queued:
            self.queued = False
            self.host.waiters.remove(self)
        if not self.headReceived:
            self.fail(reason)
        elif self.body is not None:
            self.body._abort(reason)

    # Endings.

    def timedOut(self) -> None:
        self.timer = None
        if self.deferred is None:
            return
        self._abandon()
        address = self.host.address
        timeout = self.request.response_timeout
        self.client.log.debug(
            "no response head from upstream {address} within {timeout}s", address=address, timeout=timeout
        )
        self.fail(Failure(UpstreamTimeout(f"upstream {address} sent no response within {timeout:g}s")))

    def cancel(self, d: Deferred[Response]) -> None:
        """The Deferred's canceller; the Deferred then fails with CancelledError."""
        if self.deferred is None:
            return
        self.deferred = None
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self._abandon()

    def _abandon(self) -> None:
        """Leave the queue, the connection being made, or reset the stream."""
        if self.queued:
            self.queued = False
            self.host.waiters.remove(self)
        connection = self.connection
        if connection is not None:
            connection._abandon(self)
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.detach()


class _HostPool:
    """The connections to one (host, port) and the requests waiting for a stream."""

    __slots__ = ("address", "again", "concurrency", "connections", "dispatching", "key", "waiters")

    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key
        self.address = f"{key[0]}:{key[1]}"
        #: Every connection counted against the cap, oldest first.
        self.connections: list[_Connection] = []
        #: Requests without a stream or a connection being made for them, oldest first.
        self.waiters: deque[_Exchange] = deque()
        #: The peer's last SETTINGS_MAX_CONCURRENT_STREAMS: how many requests a
        #: connection being made is expected to take.
        self.concurrency = _ASSUMED_CONCURRENCY
        self.dispatching = False
        self.again = False


class _ConnectionFactory(ClientFactory):
    """Connects one :class:`_Connection`."""

    noisy = False

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection

    def startedConnecting(self, connector: Any) -> None:
        self.connection.connector = connector

    def buildProtocol(self, addr: Any) -> _Connection:
        return self.connection

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.connection._connectFailed(reason)


@implementer(IPushProducer)
class _Connection(Protocol):
    """The client side of one upstream HTTP/2 connection, carrying many exchanges.

    It is its transport's producer: while the socket's send buffer is full no
    request body DATA is written, so the bodies get paused.
    """

    #: A TCP transport.
    transport: Any

    def __init__(self, client: H2Client, host: _HostPool) -> None:
        self._client = client
        self._host = host
        self.state = _CONNECTING
        self.connector: Any = None
        #: Exchanges waiting for this connection's handshake, oldest first.
        self.pending: list[_Exchange] = []
        #: Exchanges with an open stream, by stream id.
        self.streams: dict[int, _Exchange] = {}
        self._h2: _UpstreamH2 | None = None
        self._guard = _FrameGuard(0)
        self._writePaused = False
        self._inEvents = False
        self._settleLater = False
        #: The connection receive window granted so far.
        self._granted = _DEFAULT_WINDOW
        self._lastStreamId = _MAX_WINDOW
        self.idle = False
        self.idleSince = 0.0
        self.idleTimer: DelayedCall | None = None
        self._closedWaiters: list[Deferred[None]] = []
        self.lost = False

    # The pool's side.

    def capacity(self) -> int:
        """How many more streams the connection takes now."""
        h2 = self._h2
        if self.state != _READY or h2 is None:
            return 0
        return min(h2.remote_settings.max_concurrent_streams, _MAX_WINDOW) - len(self.streams)

    def startStream(self, exchange: _Exchange) -> bool:
        """Open a stream for ``exchange``; False if the connection cannot take one after all."""
        h2 = self._h2
        assert h2 is not None
        body = exchange.request.body
        try:
            streamId = h2.get_next_available_stream_id()
            h2.send_headers(streamId, exchange.headers, end_stream=body is None)
        except ProtocolError as error:
            # Out of stream ids, or h2 counts the streams differently: stop
            # using this connection; it closes once its streams are done.
            self._client.log.debug("upstream connection takes no more streams: {error}", error=error)
            self.state = _DRAINING
            if not self.streams:
                self._closeGracefully()
            return False
        self.idle = False
        self.streams[streamId] = exchange
        exchange.connection = self
        exchange.streamId = streamId
        exchange.requestEnded = body is None
        self._growWindow()
        exchange.startTimer()
        if body is not None:
            writer = exchange.writer
            if writer is None:
                writer = exchange.writer = _RequestBodyWriter(exchange, body)
                self._flushOutbound()
                body.deliverTo(writer)
            else:
                self._sendRequestBody(exchange)
        self._flushOutbound()
        return True

    def whenClosed(self) -> Deferred[None]:
        if self.lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._closedWaiters.append(d)
        return d

    # Twisted.

    def connectionMade(self) -> None:
        if self.state != _CONNECTING:
            self.transport.abortConnection()  # nobody wants it any more
            return
        setTcpNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setTcpNoDelay is not None:
            setTcpNoDelay(True)
        self.state = _HANDSHAKING
        h2 = self._h2 = _UpstreamH2(
            H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False)
        )
        h2.local_settings = Settings(
            client=True,
            initial_values={
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.INITIAL_WINDOW_SIZE: self._client._streamWindow,
                SettingCodes.MAX_CONCURRENT_STREAMS: 100,
                SettingCodes.MAX_HEADER_LIST_SIZE: H2Connection.DEFAULT_MAX_HEADER_LIST_SIZE,
            },
        )
        h2.initiate_connection()
        self._guard = _FrameGuard(h2.max_inbound_frame_size)
        self._growWindow()
        self.transport.registerProducer(self, True)
        self._flushOutbound()
        for exchange in self.pending:
            exchange.startTimer()

    def dataReceived(self, data: bytes) -> None:
        h2 = self._h2
        if h2 is None or self.state >= _CLOSING:
            return
        problem = self._guard.check(data)
        if problem is not None:
            self._protocolFailed(problem, goAway=True)
            return
        try:
            events = h2.receive_data(data)
        except ProtocolError as error:
            self._protocolFailed(str(error), goAway=False)  # h2 queued its GOAWAY
            return
        if self.state < _DRAINING and any(type(event) is ConnectionTerminated for event in events):
            self.state = _DRAINING  # before anything in this read can open a stream
        self._inEvents = True
        try:
            for event in events:
                handler = _HANDLERS.get(type(event))
                if handler is not None:
                    handler(self, event)
                if self.state == _CLOSED:
                    return
        finally:
            self._inEvents = False
        self._flushOutbound()
        if self._settleLater:
            self._settleLater = False
            self._settle()

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        state = self.state
        self.state = _CLOSED
        self.lost = True
        self._writePaused = False
        if state != _CLOSED:
            address = self._host.address
            if self.streams or self.pending:
                self._client.log.debug(
                    "upstream connection to {address} lost: {reason}",
                    address=address,
                    reason=reason.getErrorMessage(),
                )
            self._failAll(
                lambda: UpstreamConnectError(f"upstream {address} closed the connection before the HTTP/2 handshake"),
                lambda: UpstreamReset(f"upstream {address} closed the connection before responding"),
                lambda: UpstreamReset(f"upstream {address} closed the connection mid-body"),
            )
        self._client._connectionClosed(self)
        waiters, self._closedWaiters = self._closedWaiters, []
        for d in waiters:
            d.callback(None)

    # IPushProducer: the transport's send buffer.

    def pauseProducing(self) -> None:
        self._writePaused = True

    def resumeProducing(self) -> None:
        self._writePaused = False
        self._sendAll()
        self._flushOutbound()

    def stopProducing(self) -> None:
        self._writePaused = True

    # h2 events.

    def _onSettings(self, event: RemoteSettingsChanged) -> None:
        changed = event.changed_settings
        if self.state == _HANDSHAKING:
            self._ready()
            return
        if SettingCodes.MAX_CONCURRENT_STREAMS in changed:
            assert self._h2 is not None
            self._host.concurrency = max(1, min(self._h2.remote_settings.max_concurrent_streams, _MAX_WINDOW))
            self._settleLater = True
        if SettingCodes.INITIAL_WINDOW_SIZE in changed:
            self._sendAll()

    def _onResponse(self, event: ResponseReceived) -> None:
        exchange = self.streams.get(event.stream_id)
        if exchange is None or exchange.headReceived:
            return
        status = b""
        headers: Headers = []
        length: int | None = None
        for name, value in event.headers:
            if name[:1] == b":":
                if name == b":status":
                    status = value
                continue
            headers.append((name, value))
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
        try:
            code = int(status)
        except ValueError:
            self._streamFailed(exchange, UpstreamProtocolError(f"upstream sent an invalid :status {status!r}"))
            return
        if event.stream_ended is not None:
            length = 0
        body = exchange.body = _ResponseBody(self, event.stream_id, length)
        exchange.headReceived = True
        exchange.responseReceived(Response(code, headers, body, b"", (2, 0)))

    def _onData(self, event: DataReceived) -> None:
        streamId = event.stream_id
        size = event.flow_controlled_length
        exchange = self.streams.get(streamId)
        body = exchange.body if exchange is not None else None
        data = event.data
        if body is None or not data or not body._write(data):
            self._consumed(streamId, size)
            return
        if size > len(data):
            self._consumed(streamId, size - len(data))  # padding

    def _onTrailers(self, event: TrailersReceived) -> None:
        exchange = self.streams.get(event.stream_id)
        if exchange is not None and exchange.body is not None:
            exchange.body.trailers = [(name, value) for name, value in event.headers if name[:1] != b":"]

    def _onStreamEnded(self, event: StreamEnded) -> None:
        exchange = self.streams.get(event.stream_id)
        if exchange is None:
            return
        exchange.responseEnded = True
        if exchange.requestEnded:
            self._streamDone(exchange)
        body = exchange.body
        if body is not None:
            body._finish()

    def _onReset(self, event: StreamReset) -> None:
        exchange = self.streams.pop(event.stream_id, None)
        if exchange is None:
            return
        code = event.error_code
        if event.remote_reset:
            if code == ErrorCodes.REFUSED_STREAM and exchange.retryable():
                self._retry([exchange])
                self._streamGone()
                return
            error: Exception = UpstreamReset(f"upstream {self._host.address} reset the stream ({_error_name(code)})")
        else:
            error = UpstreamProtocolError(f"upstream {self._host.address} broke the HTTP/2 stream rules")
        self._client.log.debug(
            "upstream {address} stream {stream} reset: {code}",
            address=self._host.address,
            stream=event.stream_id,
            code=_error_name(code),
        )
        self._endExchange(exchange, error)
        self._streamGone()

    def _onWindow(self, event: WindowUpdated) -> None:
        if event.stream_id == 0:
            self._sendAll()
        else:
            exchange = self.streams.get(event.stream_id)
            if exchange is not None:
                self._sendRequestBody(exchange)

    def _onGoAway(self, event: ConnectionTerminated) -> None:
        last = event.last_stream_id or 0
        self._lastStreamId = min(self._lastStreamId, last)
        code = event.error_code or 0
        (self._client.log.debug if code == ErrorCodes.NO_ERROR else self._client.log.warn)(
            "upstream {address} sent GOAWAY ({code}, last stream {last}); draining the connection",
            address=self._host.address,
            code=_error_name(code),
            last=last,
        )
        if self.state < _DRAINING:
            self.state = _DRAINING
        pending, self.pending = self.pending, []
        for exchange in pending:
            exchange.connection = None
        retried: list[_Exchange] = []
        for streamId in sorted(s for s in self.streams if s > self._lastStreamId):
            exchange = self.streams.pop(streamId)
            if exchange.retryable():
                retried.append(exchange)
            else:
                self._endExchange(
                    exchange,
                    UpstreamReset(f"upstream {self._host.address} went away without processing the request"),
                )
        self._retry(retried)
        self._client._requeue(self._host, pending)
        self._streamGone()

    # Sending request bodies.

    def _sendRequestBody(self, exchange: _Exchange) -> None:
        """Send what the windows allow of ``exchange``'s held body, then END_STREAM."""
        writer = exchange.writer
        h2 = self._h2
        streamId = exchange.streamId
        if writer is None or writer.ended or h2 is None or self.streams.get(streamId) is not exchange:
            return
        sent = 0
        buffer = writer.buffer
        try:
            if buffer and not self._writePaused:
                window = h2.local_flow_control_window(streamId)
                frame = h2.max_outbound_frame_size
                while buffer and window > 0:
                    head = buffer[0]
                    offset = writer.offset
                    room = min(window, frame)
                    if len(head) - offset <= room:
                        piece = head if offset == 0 else head[offset:]
                        buffer.popleft()
                        writer.offset = 0
                    else:
                        piece = head[offset : offset + room]
                        writer.offset = offset + room
                    last = not buffer and writer.finished and not _trailer_fields(writer.body)
                    h2.send_data(streamId, piece, end_stream=last)
                    if last:
                        writer.ended = True
                    sent += len(piece)
                    window -= len(piece)
            if not buffer and writer.finished and not writer.ended:
                trailers = _trailer_fields(writer.body)
                if trailers:
                    h2.send_headers(streamId, trailers, end_stream=True)
                else:
                    h2.end_stream(streamId)
                writer.ended = True
        except StreamClosedError:
            # A RST_STREAM later in the read being handled closed the stream
            # already; its event ends the exchange.
            writer.sent += sent
            return
        writer.sent += sent
        if not self._inEvents:
            self._flushOutbound()
        if sent or writer.ended:
            exchange.requestProgress()
        if writer.ended:
            exchange.requestEnded = True
            if exchange.responseEnded:
                self._streamDone(exchange)
        else:
            writer.settle()

    def _sendAll(self) -> None:
        for exchange in list(self.streams.values()):
            writer = exchange.writer
            if writer is not None and not writer.ended and (writer.buffer or writer.finished):
                self._sendRequestBody(exchange)

    # Receiving: flow control.

    def _consumed(self, streamId: int, size: int) -> None:
        """``size`` flow-controlled bytes of ``streamId`` were taken: let the peer send more."""
        h2 = self._h2
        if h2 is None or self.state == _CLOSED or size <= 0:
            return
        try:
            h2.acknowledge_received_data(size, streamId)
        except ProtocolError:
            return
        if not self._inEvents:
            self._flushOutbound()

    def _growWindow(self) -> None:
        """Keep the connection window above one stream window per stream.

        The peer can fill at most a stream window on a stream whose consumer
        does not read, so the others always have room to flow.
        """
        h2 = self._h2
        if h2 is None:
            return
        target = min(_MAX_WINDOW, self._client._streamWindow * (len(self.streams) + len(self.pending) + 1))
        if target > self._granted:
            h2.increment_flow_control_window(target - self._granted)
            self._granted = target

    def _responseBodyStopped(self, body: _ResponseBody, streamId: int, unread: int) -> None:
        """The consumer abandoned a response body: reset its stream, release its window."""
        self._consumed(streamId, unread)
        exchange = self.streams.get(streamId)
        if exchange is not None and exchange.body is body:
            self._resetStream(exchange, ErrorCodes.CANCEL)
            writer, exchange.writer = exchange.writer, None
            if writer is not None:
                writer.detach()

    # Stream endings.

    def _abandon(self, exchange: _Exchange) -> None:
        """``exchange`` gave up before its head (cancelled, timed out)."""
        if exchange in self.pending:
            self.pending.remove(exchange)
            exchange.connection = None
            if not self.pending and self.state == _CONNECTING:
                self._client._stopConnecting(self)
            return
        if exchange.streamId and self.streams.get(exchange.streamId) is exchange:
            self._resetStream(exchange, ErrorCodes.CANCEL)

    def _resetStream(self, exchange: _Exchange, code: ErrorCodes) -> None:
        """Reset ``exchange``'s stream (RST_STREAM); the connection carries on."""
        streamId = exchange.streamId
        if self.streams.get(streamId) is not exchange:
            return
        del self.streams[streamId]
        exchange.connection = None
        h2 = self._h2
        if h2 is not None and self.state < _CLOSING:
            try:
                h2.reset_stream(streamId, code)
            except ProtocolError:
                pass
            if not self._inEvents:
                self._flushOutbound()
        self._streamGone()

    def _streamDone(self, exchange: _Exchange) -> None:
        """Both directions of ``exchange``'s stream ended."""
        if self.streams.get(exchange.streamId) is exchange:
            del self.streams[exchange.streamId]
            exchange.connection = None
            exchange.writer = None
            self._streamGone()

    def _streamFailed(self, exchange: _Exchange, error: Exception) -> None:
        """A stream-level fault of the peer: reset that stream and fail its exchange."""
        self._resetStream(exchange, ErrorCodes.PROTOCOL_ERROR)
        self._endExchange(exchange, error)

    def _endExchange(self, exchange: _Exchange, error: Exception) -> None:
        """``exchange`` is off this connection for good: stop its upload, fail what is left."""
        exchange.connection = None
        writer, exchange.writer = exchange.writer, None
        if writer is not None:
            writer.detach()
        if not exchange.headReceived:
            exchange.fail(Failure(error))
        elif not exchange.responseEnded and exchange.body is not None:
            exchange.body._abort(Failure(error))

    def _retry(self, exchanges: list[_Exchange]) -> None:
        """Send ``exchanges`` (which the peer did not process) again, ahead of the queue."""
        if not exchanges:
            return
        for exchange in exchanges:
            exchange.retries += 1
            exchange.connection = None
            exchange.streamId = 0
            writer = exchange.writer
            if writer is not None:
                writer.ended = False
                exchange.requestEnded = False
        self._client.log.debug(
            "sending {count} request(s) the upstream {address} did not process again",
            count=len(exchanges),
            address=self._host.address,
        )
        self._client._requeue(self._host, exchanges)

    def _streamGone(self) -> None:
        if self._inEvents:
            self._settleLater = True
        else:
            self._settle()

    def _settle(self) -> None:
        """Hand freed capacity to waiters; then idle, or close a drained connection."""
        self._client._dispatch(self._host)
        if self.streams:
            return
        if self.state == _DRAINING:
            self._closeGracefully()
        elif self.state == _READY:
            self._becameIdle()

    def _ready(self) -> None:
        """The peer's SETTINGS arrived: the connection takes streams."""
        h2 = self._h2
        assert h2 is not None
        self.state = _READY
        self._host.concurrency = max(1, min(h2.remote_settings.max_concurrent_streams, _MAX_WINDOW))
        pending, self.pending = self.pending, []
        for exchange in pending:
            exchange.connection = None
        self._client._requeue(self._host, pending)
        self._settleLater = True

    def _becameIdle(self) -> None:
        if self.idle:
            return
        client = self._client
        if client._closed:
            self._closeGracefully()
            return
        self.idle = True
        self.idleSince = client._reactor.seconds()
        if self.idleTimer is None:
            self.idleTimer = client._reactor.callLater(client._idleTimeout, self._idleCheck)

    def _idleCheck(self) -> None:
        """Close the connection if idle long enough, else look again later (one timer, re-armed lazily)."""
        self.idleTimer = None
        if not self.idle or self.state != _READY:
            return
        client = self._client
        left = self.idleSince + client._idleTimeout - client._reactor.seconds()
        if left > 0:
            self.idleTimer = client._reactor.callLater(left, self._idleCheck)
            return
        client.log.debug("closing idle upstream connection to {address}", address=self._host.address)
        self._closeGracefully()

    def _closeGracefully(self) -> None:
        """GOAWAY, then close."""
        if self.state >= _CLOSING:
            return
        self.state = _CLOSING
        self.idle = False
        timer, self.idleTimer = self.idleTimer, None
        if timer is not None and timer.active():
            timer.cancel()
        h2 = self._h2
        if h2 is not None:
            try:
                h2.close_connection()
            except ProtocolError:
                pass
            self._flushOutbound()
        if self.transport is not None:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def _protocolFailed(self, error: str, goAway: bool) -> None:
        """The peer broke HTTP/2: fail everything on the connection and close it."""
        address = self._host.address
        self._client.log.debug("invalid HTTP/2 from upstream {address}: {error}", address=address, error=error)
        self.state = _CLOSING
        h2 = self._h2
        if h2 is not None and goAway:
            try:
                h2.close_connection(ErrorCodes.PROTOCOL_ERROR)
            except ProtocolError:
                pass
        self._flushOutbound()
        message = f"upstream {address} sent invalid HTTP/2: {error}"
        self._failAll(
            lambda: UpstreamProtocolError(message),
            lambda: UpstreamProtocolError(message),
            lambda: UpstreamProtocolError(message),
        )
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _failAll(self, beforeHandshake: Any, beforeHead: Any, midBody: Any) -> None:
        pending, self.pending = self.pending, []
        streams, self.streams = self.streams, {}
        for exchange in pending:
            exchange.connection = None
            exchange.fail(Failure(beforeHandshake()))
        for exchange in streams.values():
            self._endExchange(exchange, beforeHead() if not exchange.headReceived else midBody())

    def _connectFailed(self, reason: Failure) -> None:
        if self.state != _CONNECTING:
            return
        self.state = _CLOSED
        self.lost = True
        address = self._host.address
        why = reason.getErrorMessage()
        self._client.log.warn("upstream connect failed {address}: {reason}", address=address, reason=why)
        pending, self.pending = self.pending, []
        for exchange in pending:
            exchange.connection = None
            exchange.fail(Failure(UpstreamConnectError(f"could not connect to upstream {address}: {why}")))
        self._client._connectionClosed(self)

    def _flushOutbound(self) -> None:
        h2 = self._h2
        if h2 is None or self.state == _CLOSED:
            return
        data = h2.data_to_send()
        if data:
            write_soon(self.transport, data)


_HANDLERS: dict[type, Any] = {
    RemoteSettingsChanged: _Connection._onSettings,
    ResponseReceived: _Connection._onResponse,
    DataReceived: _Connection._onData,
    TrailersReceived: _Connection._onTrailers,
    StreamEnded: _Connection._onStreamEnded,
    StreamReset: _Connection._onReset,
    WindowUpdated: _Connection._onWindow,
    ConnectionTerminated: _Connection._onGoAway,
}


@implementer(IUpstreamClient)
class H2Client:
    """Sends requests to upstreams over pooled, multiplexed HTTP/2 cleartext connections.

    ``reactor`` provides ``IReactorTCP`` and ``IReactorTime``.
    ``stream_window`` is the receive window advertised per stream.
    """

    log = Logger()

    def __init__(self, reactor: Any, pool: PoolConfig, stream_window: int = STREAM_WINDOW) -> None:
        self._reactor = reactor
        self._maxConnections = max(1, pool.max_connections_per_host)
        self._idleTimeout = pool.idle_timeout
        self._streamWindow = max(1, min(stream_window, _MAX_WINDOW))
        self._hosts: dict[tuple[str, int], _HostPool] = {}
        self._closed = False

    def request(self, request: UpstreamRequest) -> Deferred[Response]:
        if self._closed:
            return fail(UpstreamConnectError("the upstream client is closed"))
        try:
            headers = _request_headers(request)
        except BadRequest as error:
            return fail(error)
        key = (request.host, request.port)
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _HostPool(key)
        exchange = _Exchange(self, host, request, headers)
        d: Deferred[Response] = Deferred(exchange.cancel)
        exchange.deferred = d
        exchange.queued = True
        host.waiters.append(exchange)
        self._dispatch(host)
        if exchange.queued:
            exchange.startTimer()  # waiting for a connection slot counts
        return d

    def close(self) -> Deferred[None]:
        """Refuse new requests and close idle connections (GOAWAY); fires when they are closed.

        Requests in flight (and those already queued) carry on; their
        connections close once their last stream ends.
        """
        self._closed = True
        closing: list[Deferred[None]] = []
        for host in list(self._hosts.values()):
            for connection in list(host.connections):
                if connection.state == _READY and not connection.streams:
                    closing.append(connection.whenClosed())
                    connection._closeGracefully()
        if not closing:
            return succeed(None)
        return gatherResults(closing).addCallback(lambda _: None)

    # Internals, called by _Exchange and _Connection.

    def _dispatch(self, host: _HostPool) -> None:
        """Give waiting requests a stream, a connection being made, or a new connection, in order."""
        if host.dispatching:
            host.again = True
            return
        host.dispatching = True
        try:
            host.again = True
            while host.again:
                host.again = False
                self._dispatchOnce(host)
        finally:
            host.dispatching = False
        if not host.connections and not host.waiters and self._hosts.get(host.key) is host:
            del self._hosts[host.key]

    def _dispatchOnce(self, host: _HostPool) -> None:
        waiters = host.waiters
        while waiters:
            exchange = waiters[0]
            connection = self._withRoom(host)
            if connection is not None:
                waiters.popleft()
                exchange.queued = False
                if not connection.startStream(exchange):
                    exchange.queued = True
                    waiters.appendleft(exchange)
                continue
            connection = self._connectingWithRoom(host)
            if connection is None:
                if len(host.connections) >= self._maxConnections:
                    return
                connection = self._connect(host, exchange.request)
            waiters.popleft()
            exchange.queued = False
            exchange.connection = connection
            connection.pending.append(exchange)
            if connection.state == _HANDSHAKING:
                exchange.startTimer()

    def _withRoom(self, host: _HostPool) -> _Connection | None:
        for connection in host.connections:
            if connection.state == _READY and connection.capacity() > 0:
                return connection
        return None

    def _connectingWithRoom(self, host: _HostPool) -> _Connection | None:
        for connection in host.connections:
            if connection.state <= _HANDSHAKING and len(connection.pending) < host.concurrency:
                return connection
        return None

    def _connect(self, host: _HostPool, request: UpstreamRequest) -> _Connection:
        connection = _Connection(self, host)
        host.connections.append(connection)
        connector = self._reactor.connectTCP(
            request.host, request.port, _ConnectionFactory(connection), timeout=request.connect_timeout
        )
        if connection.connector is None:
            connection.connector = connector
        return connection

    def _requeue(self, host: _HostPool, exchanges: list[_Exchange]) -> None:
        """Put ``exchanges`` back at the head of the queue, in order."""
        for exchange in reversed(exchanges):
            if exchange.deferred is None and not exchange.headReceived:
                continue  # given up meanwhile
            exchange.queued = True
            host.waiters.appendleft(exchange)
            exchange.startTimer()
            writer = exchange.writer
            if writer is not None:
                writer.settle()

    def _stopConnecting(self, connection: _Connection) -> None:
        connection.state = _CLOSED
        connection.lost = True
        connector = connection.connector
        if connector is not None:
            try:
                connector.stopConnecting()
            except NotConnectingError:
                pass
        self._connectionClosed(connection)

    def _connectionClosed(self, connection: _Connection) -> None:
        host = connection._host
        timer, connection.idleTimer = connection.idleTimer, None
        if timer is not None and timer.active():
            timer.cancel()
        connection.idle = False
        if connection in host.connections:
            host.connections.remove(connection)
        self._dispatch(host)
