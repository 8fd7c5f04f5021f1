"""The downstream HTTP/2 protocol (h2c prior knowledge, TLS ALPN h2) on the h2 library.

Twisted's own HTTP/2 buffers bodies, speaks only over TLS and has no Rapid
Reset protection (ARCHITECTURE.md), so this is our own ``Protocol`` around an
``h2.connection.H2Connection``.  Every stream becomes a ``RequestContext`` and
runs ``gateway.handle(ctx)``, concurrently, exactly like an HTTP/1.1 request.

What it promises:
- request bodies stream to the consumer; the client's flow-control window is
  only reopened as the consumer takes the bytes (a slow upstream closes it),
  so what is buffered per connection stays below the windows we grant;
- response bodies are sent within the client's connection and stream windows
  and frame size; a body is paused when its window is exhausted (or the
  socket's buffer is full) and resumed on WINDOW_UPDATE; trailers are relayed
  both ways (gRPC's ``grpc-status`` rides in them);
- a ``GatewayError`` on a gRPC request is a trailers-only gRPC status, on any
  other request the JSON error of HTTP/1.1; never a traceback;
- RST_STREAM from the client cancels that stream's pipeline, upstream request
  and response; losing the connection does it for every stream;
- protection (``server.http2``): concurrent streams, header list size (HPACK
  bomb) and header block size (CONTINUATION flood), a per-second cap on
  control frames (Rapid Reset, PING/SETTINGS floods), header and idle
  timeouts.  An offender gets GOAWAY and its connection closes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txgateway.body import DISCARD, BytesBody, whole
from txgateway.errors import (
    BadRequest,
    GatewayError,
    NotImplementedByGateway,
    PayloadTooLarge,
    error_for,
    render_grpc,
    render_json,
)
from txgateway.interfaces import IBody, IBodySink, IRequestBody
from txgateway.messages import Response
from txgateway.pipeline.context import RequestContext
from txgateway.wire import write_soon

if TYPE_CHECKING:
    from txgateway.gateway import Gateway
    from txgateway.protocols.http1 import HTTP11ServerFactory

Headers = list[tuple[bytes, bytes]]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

KiB = 1024
#: The window each request stream starts with: what one upload may have in
#: flight before its consumer takes it.
STREAM_WINDOW = 256 * KiB
#: The connection's receive window: the most request-body bytes buffered per
#: connection, across its streams.
CONNECTION_WINDOW = 1024 * KiB
_DEFAULT_WINDOW = 65535
#: SETTINGS_MAX_FRAME_SIZE we keep (the protocol's default and minimum).
MAX_FRAME_SIZE = 16384
#: HEADERS plus CONTINUATION frames one header block may take.
MAX_HEADER_BLOCK_FRAMES = 32
#: After GOAWAY, how long a peer that does not read may keep the socket.
CLOSE_GRACE = 5.0

#: Outbound headers are ours (lower-case names by the Response contract, no
#: connection-specific fields after ``_fields``): h2 need not re-check them.
_CONFIG = H2Configuration(
    client_side=False, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False
)

#: Connection-specific fields HTTP/2 forbids (RFC 9113 8.2.2); content-length
#: is written from the body's length.
_NOT_IN_H2 = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te", b"content-length"}
)
_NOT_IN_H2_NO_BODY = _NOT_IN_H2 - {b"content-length"}
_STATUS = {code: b"%d" % code for code in range(100, 600)}
#: The status an exchange is counted and logged with when the client left
#: before its response ended (nginx's "client closed request").
CLIENT_CLOSED_REQUEST = 499
#: Why a stream is cancelled, when it is the client's doing.
_CLIENT_LEFT = frozenset({"client went away", "client reset the stream", "client sent GOAWAY", "stream closed"})
#: The grpc-status values counted as they are (others: 2, UNKNOWN).
_GRPC_STATUSES = frozenset(b"%d" % code for code in range(17))
#: gRPC timeout units as (multiplier, divisor) of seconds.
_GRPC_TIMEOUT_UNITS = {
    b"H": (3600, 1),
    b"M": (60, 1),
    b"S": (1, 1),
    b"m": (1, 10**3),
    b"u": (1, 10**6),
    b"n": (1, 10**9),
}


def grpc_timeout(value: bytes) -> float | None:
    """Seconds of a ``grpc-timeout`` value (``100m``, ``5S``), None when malformed."""
    unit = _GRPC_TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not 0 < len(digits) <= 8 or not digits.isdigit():
        return None
    return int(digits) * unit[0] / unit[1]


def _header(headers: Headers, name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None


def _fields(headers: Headers, drop: frozenset[bytes]) -> Headers:
    return [(n, v) for n, v in headers if n not in drop and not n.startswith(b":")]


class _Abuse(Exception):
    """The client broke a protection limit; the connection ends with ``code``."""

    def __init__(self, code: ErrorCodes, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _FrameGuard:
    """Reads the 9-byte frame headers ahead of h2, before it buffers or acts.

    h2 bounds a header block by frame count only (64 frames of up to the
    frame size) and applies our MAX_HEADER_LIST_SIZE to the decoder only once
    the client acknowledges it; it has no notion of frame rates.  This keeps,
    per ``dataReceived``, the count of control frames (RST_STREAM, PING,
    SETTINGS, PRIORITY, unknown types, empty DATA without END_STREAM) and
    bounds header blocks by bytes and frames and frames by the frame size
    (h2 checks a frame's length only once all of it is buffered).  Integer
    arithmetic only.
    """

    __slots__ = ("_head", "_skip", "block_bytes", "block_frames", "control", "in_block", "max_block_bytes", "resets")

    def __init__(self, max_block_bytes: int) -> None:
        self.max_block_bytes = max_block_bytes
        self._skip = len(PREFACE)  # h2 checks the preface itself
        self._head = b""
        self.in_block = False
        self.block_bytes = 0
        self.block_frames = 0
        self.control = 0
        self.resets = 0

    def scan(self, data: bytes) -> int:
        """The control frames starting in ``data``; raises ``_Abuse``."""
        self.control = self.resets = 0
        end = len(data)
        pos = self._skip
        if self._head:
            need = 9 - len(self._head)
            head = self._head + data[:need]
            if len(head) < 9:
                self._head = head
                return 0
            self._head = b""
            pos = need + self._frame(head, 0)
        while pos + 9 <= end:
            pos += 9 + self._frame(data, pos)
        if pos < end:
            self._head = data[pos:]
            self._skip = 0
        else:
            self._skip = pos - end
        return self.control

    def _frame(self, data: bytes, at: int) -> int:
        length = (data[at] << 16) | (data[at + 1] << 8) | data[at + 2]
        if length > MAX_FRAME_SIZE:
            # h2 would buffer the whole frame before checking its length.
            raise _Abuse(ErrorCodes.FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE")
        kind = data[at + 3]
        if kind == 0:  # DATA: an empty one that does not end the stream does nothing
            if length == 0 and not data[at + 4] & 0x1:
                self.control += 1
        elif kind == 1 or kind == 9:  # HEADERS, CONTINUATION
            if kind == 1:
                self.block_bytes = length
                self.block_frames = 1
            else:
                self.block_bytes += length
                self.block_frames += 1
            if self.block_bytes > self.max_block_bytes:
                raise _Abuse(ErrorCodes.ENHANCE_YOUR_CALM, "header block too large")
            if self.block_frames > MAX_HEADER_BLOCK_FRAMES:
                raise _Abuse(ErrorCodes.ENHANCE_YOUR_CALM, "too many CONTINUATION frames")
            self.in_block = not data[at + 4] & 0x4
        elif kind == 3:  # RST_STREAM
            self.control += 1
            self.resets += 1
        elif kind == 2 or kind == 4 or kind == 6 or kind > 9:  # PRIORITY, SETTINGS, PING, unknown
            self.control += 1
        return length


@implementer(IRequestBody)
class _StreamBody:
    """One stream's request body, streamed to its consumer.

    Bytes are acknowledged to the client (reopening its window) only once
    written to the consumer's sink while it is not paused; until then they
    wait here, which the window bounds.
    """

    __slots__ = (
        "_buffer",
        "_error",
        "_expect_continue",
        "_gone",
        "_padding",
        "_paused",
        "_protocol",
        "_sink",
        "_stream_id",
        "done",
        "length",
        "max_bytes",
        "received",
        "trailers",
    )

    def __init__(self, protocol: HTTP2ServerProtocol, stream_id: int, length: int | None, expect: bool) -> None:
        self.length = length
        #: Set from the route's max_body_bytes once routed; enforced as bytes arrive.
        self.max_bytes: int | None = None
        self.received = 0
        self.done = False
        #: Request trailers (HEADERS after the DATA), for gRPC and friends.
        self.trailers: Headers = []
        self._protocol = protocol
        self._stream_id = stream_id
        self._sink: IBodySink | None = None
        self._buffer: deque[bytes] = deque()
        self._padding = 0
        self._paused = False
        self._error: Failure | None = None
        #: The consumer stopped wanting the body: bytes are acknowledged and dropped.
        self._gone = False
        self._expect_continue = expect

    # From the connection.

    def _data(self, data: bytes, flow: int) -> None:
        self.received += len(data)
        protocol = self._protocol
        if self._error is not None or self._gone:
            protocol.ack(self._stream_id, flow)
            return
        if self.max_bytes is not None and self.received > self.max_bytes:
            protocol.ack(self._stream_id, flow)
            self._failed(Failure(PayloadTooLarge(f"request body exceeds {self.max_bytes} bytes")))
            return
        sink = self._sink
        if sink is not None and not self._paused and not self._buffer:
            sink.write(data)
            protocol.ack(self._stream_id, flow)
        else:
            self._buffer.append(data)
            self._padding += flow - len(data)

    def _end(self) -> None:
        self.done = True
        if self._sink is not None and not self._buffer:
            sink, self._sink = self._sink, None
            sink.finish()

    def _failed(self, reason: Failure) -> None:
        if self._error is not None or self.done:
            return
        self._error = reason
        self._release()
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.abort(reason)
        self._protocol.body_failed(self._stream_id, reason)

    def _release(self) -> None:
        """Acknowledge and drop whatever is buffered."""
        held = sum(len(data) for data in self._buffer) + self._padding
        self._buffer.clear()
        self._padding = 0
        self._protocol.ack(self._stream_id, held)

    def _deliver(self) -> None:
        buffer = self._buffer
        protocol = self._protocol
        while buffer and not self._paused and self._sink is not None:
            data = buffer.popleft()
            self._sink.write(data)
            protocol.ack(self._stream_id, len(data))
        if not buffer:
            if self._padding:
                protocol.ack(self._stream_id, self._padding)
                self._padding = 0
            if self.done and self._sink is not None:
                sink, self._sink = self._sink, None
                sink.finish()
        protocol.flush()

    # IBody, for the consumer.

    def deliverTo(self, sink: IBodySink) -> None:
        if self._error is not None:
            sink.abort(self._error)
            return
        if self._expect_continue and self.received == 0 and not self.done:
            self._protocol.send_continue(self._stream_id)
        self._expect_continue = False
        self._sink = sink
        self._deliver()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if self._paused:
            self._paused = False
            self._deliver()

    def stopProducing(self) -> None:
        """The consumer gives up on the body: what comes is acknowledged and dropped."""
        self._gone = True
        self._sink = None
        self._release()
        self._protocol.flush()


@implementer(IBodySink)
class _Stream:
    """One request/response exchange; the sink its response body is delivered to."""

    __slots__ = (
        "accounted",
        "body",
        "closed",
        "ctx",
        "deferred",
        "ended",
        "gateway",
        "grpc",
        "grpc_status",
        "id",
        "left",
        "paused",
        "pending",
        "protocol",
        "remote_ended",
        "responded",
        "response_body",
        "to_finish",
        "trailers",
    )

    def __init__(
        self, protocol: HTTP2ServerProtocol, stream_id: int, ctx: RequestContext, body: _StreamBody | None, grpc: bool
    ) -> None:
        self.protocol = protocol
        self.id = stream_id
        self.ctx = ctx
        self.body = body
        self.grpc = grpc
        self.deferred: Deferred[Response] | None = None
        self.responded = False
        self.response_body: IBody | None = None
        #: Response bytes waiting for flow-control window.
        self.pending: deque[bytes | memoryview] = deque()
        #: Declared response bytes not yet written (None: length unknown).
        self.left: int | None = None
        #: We paused the response body (window exhausted or socket full).
        self.paused = False
        self.to_finish = False
        self.trailers: Headers = []
        #: END_STREAM has been sent.
        self.ended = False
        self.remote_ended = body is None
        #: The stream is over for us: nothing more is sent on it.
        self.closed = False
        #: The generation that handled it (``exchange_done`` goes there).
        self.gateway: Gateway | None = None
        #: ``exchange_done`` was called: the exchange is over for the observers.
        self.accounted = False
        #: The grpc-status sent (headers of a Trailers-Only answer, or trailers).
        self.grpc_status: bytes | None = None

    def write(self, data: bytes) -> None:
        self.protocol.response_data(self, data)

    def finish(self) -> None:
        self.protocol.response_finished(self)

    def abort(self, reason: object) -> None:
        self.protocol.response_aborted(self, reason)


@implementer(IPushProducer)
class _WriteBackpressure:
    """Registered on the transport: a full socket buffer pauses every response body."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: HTTP2ServerProtocol) -> None:
        self._protocol = protocol

    def pauseProducing(self) -> None:
        self._protocol.writes_paused()

    def resumeProducing(self) -> None:
        self._protocol.writes_resumed()

    def stopProducing(self) -> None:
        pass


class HTTP2ServerProtocol(Protocol):
    log = Logger()

    _handlers: ClassVar[dict[type, Callable[..., None]]]

    def __init__(self, factory: HTTP11ServerFactory) -> None:
        self.factory = factory
        gateway = factory.gateway()
        self.limits = gateway.config.server.limits
        self.settings = gateway.config.server.http2
        self._clock = factory.clock
        self._metrics = gateway.runtime.metrics
        self._in_flight = self._metrics.in_flight["h2"]
        header_list = self.settings.max_header_list_size or self.limits.max_header_bytes
        self._max_header_list = min(header_list, 2**32 - 1)
        self._conn = H2Connection(config=_CONFIG)
        self._guard = _FrameGuard(2 * self._max_header_list + KiB)
        self._streams: dict[int, _Stream] = {}
        #: Streams with response bytes waiting for window.
        self._blocked: dict[int, _Stream] = {}
        #: Answered streams whose request is still arriving: bytes drained so far.
        self._draining: dict[int, int] = {}
        self._client_ip = ""
        self._client_port = 0
        self._receiving = False
        self._reset_here: set[int] | None = None
        self._write_paused = False
        self._closing = False
        self._lost = False
        self._window_start = 0.0
        self._window_count = 0
        #: The header timeout before the first request, then the idle timeout.
        self._timer: IDelayedCall | None = None
        #: A header block spread over CONTINUATION frames must end in time.
        self._block_timer: IDelayedCall | None = None
        self._abort_timer: IDelayedCall | None = None
        #: Graceful shutdown: the last stream id our GOAWAY promised to serve.
        self._drain_last: int | None = None

    # Connection lifecycle.

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        peer = transport.getPeer()
        self._client_ip = getattr(peer, "host", "") or ""
        self._client_port = getattr(peer, "port", 0) or 0
        conn = self._conn
        # Our limits apply from the first frame, not once the client ACKs them.
        conn.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: min(self.settings.max_concurrent_streams, 2**31 - 1),
                SettingCodes.MAX_HEADER_LIST_SIZE: self._max_header_list,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            },
        )
        conn.decoder.max_header_list_size = self._max_header_list
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)
        transport.registerProducer(_WriteBackpressure(self), True)  # type: ignore[attr-defined]
        self._timer = self._clock.callLater(self.limits.header_timeout, self._expired)
        self._metrics.open_connections["h2"].inc()
        self._write_out()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._lost = self._closing = True
        for timer in (self._timer, self._block_timer, self._abort_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._block_timer = self._abort_timer = None
        self._metrics.open_connections["h2"].dec()
        self.factory.connection_closed()
        self._abandon_streams("client went away")

    # Reading.

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        guard = self._guard
        try:
            control = guard.scan(data)
        except _Abuse as abuse:
            self._abuse(abuse.code, abuse.reason)
            return
        if control:
            now = self._clock.seconds()
            if now - self._window_start >= 1.0:
                self._window_start = now
                self._window_count = control
            else:
                self._window_count += control
            if self._window_count > self.settings.max_control_frames_per_second:
                self._abuse(ErrorCodes.ENHANCE_YOUR_CALM, "too many control frames (RST_STREAM, PING, SETTINGS...)")
                return
        if guard.in_block != (self._block_timer is not None):
            self._toggle_block_timer(guard.in_block)
        self._receiving = True
        try:
            events = self._conn.receive_data(data)
        except ProtocolError as error:
            self._receiving = False
            self._protocol_error(error)
            return
        try:
            if guard.resets:
                # A stream reset in the same read is never dispatched (Rapid Reset).
                self._reset_here = {e.stream_id for e in events if type(e) is StreamReset}
            handlers = self._handlers
            for event in events:
                handler = handlers.get(type(event))
                if handler is not None:
                    handler(self, event)
                if self._closing:
                    break
        except Exception:  # noqa: BLE001 - a bug must not leave the connection half-handled
            self.log.failure("error handling HTTP/2 events from {client}", client=self._client_ip)
            self._receiving = False
            self._goaway(ErrorCodes.INTERNAL_ERROR, None)
            return
        finally:
            self._reset_here = None
        self._receiving = False
        self._write_out()

    def _on_request(self, event: RequestReceived) -> None:
        stream_id: int = event.stream_id
        if self._reset_here is not None and stream_id in self._reset_here:
            return
        if self._drain_last is not None and stream_id > self._drain_last:
            # Opened after our GOAWAY: refused, so the client retries it elsewhere.
            try:
                self._conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            except ProtocolError:
                pass
            return
        timer = self._timer
        if timer is not None:
            self._timer = None
            if timer.active():
                timer.cancel()
        method = b""
        target = b""
        authority: bytes | None = None
        headers: Headers = []
        cookies: list[bytes] | None = None
        length: int | None = None
        grpc = False
        timeout: bytes | None = None
        expect = False
        has_host = False
        problem: GatewayError | None = None
        for field in event.headers:
            name = field[0]
            if name[:1] == b":":
                if name == b":method":
                    method = field[1]
                elif name == b":path":
                    target = field[1]
                elif name == b":authority":
                    authority = field[1]
                continue
            if name == b"cookie":
                # Crumbs are one header again for HTTP/1.1 (RFC 9113 8.2.3).
                if cookies is None:
                    cookies = []
                cookies.append(field[1])
                continue
            if name == b"host":
                if authority is not None:
                    continue  # :authority wins, and becomes Host below
                authority = field[1]
                has_host = True
            elif name == b"content-length":
                try:
                    length = int(field[1])
                except ValueError:
                    problem = BadRequest("invalid content-length")
            elif name == b"content-type":
                grpc = field[1].startswith(b"application/grpc")
            elif name == b"grpc-timeout":
                timeout = field[1]
            elif name == b"expect":
                expect = field[1].lower() == b"100-continue"
            headers.append(field)
        if authority is not None and not has_host:
            headers.append((b"host", authority))
        if cookies is not None:
            headers.append((b"cookie", b"; ".join(cookies)))
        path, _, query = target.partition(b"?")
        body: _StreamBody | None = None
        if event.stream_ended is None:
            body = _StreamBody(self, stream_id, length, expect)
        now = self._clock.seconds()
        ctx = RequestContext(
            method,
            path.decode("latin-1"),
            query,
            headers,
            client_ip=self._client_ip,
            client_port=self._client_port,
            version=(2, 0),
            scheme=self.factory.scheme,
            host=authority.decode("latin-1") if authority is not None else None,
            protocol="h2",
            body=body,
            started=now,
        )
        if timeout is not None:
            seconds = grpc_timeout(timeout)
            if seconds is not None:
                ctx.deadline = now + seconds
        stream = _Stream(self, stream_id, ctx, body, grpc)
        self._streams[stream_id] = stream
        self._in_flight.inc()
        gateway = stream.gateway = self.factory.gateway()
        if method == b"CONNECT":
            problem = NotImplementedByGateway("CONNECT is not supported")
        if problem is not None:
            ctx.request_id = gateway.request_ids.next()
            self._respond_error(stream, problem)
            return
        try:
            d = gateway.handle(ctx)
        except Exception:  # noqa: BLE001 - any bug becomes a 500, never a traceback
            self.log.failure("gateway.handle raised")
            self._respond_error(stream, GatewayError())
            return
        stream.deferred = d
        d.addCallbacks(self._respond, self._failed, callbackArgs=(stream,), errbackArgs=(stream,))

    def _on_data(self, event: DataReceived) -> None:
        stream_id: int = event.stream_id
        stream = self._streams.get(stream_id)
        if stream is not None and stream.body is not None:
            stream.body._data(event.data, event.flow_controlled_length)
            return
        self.ack(stream_id, event.flow_controlled_length)
        drained = self._draining.get(stream_id)
        if drained is not None:
            drained += event.flow_controlled_length
            if drained > STREAM_WINDOW:
                del self._draining[stream_id]
                try:
                    self._conn.reset_stream(stream_id, ErrorCodes.NO_ERROR)
                except ProtocolError:
                    pass
            else:
                self._draining[stream_id] = drained

    def _on_trailers(self, event: TrailersReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None and stream.body is not None:
            stream.body.trailers = list(event.headers)

    def _on_stream_ended(self, event: StreamEnded) -> None:
        self._draining.pop(event.stream_id, None)
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.remote_ended = True
            if stream.body is not None:
                stream.body._end()

    def _on_reset(self, event: StreamReset) -> None:
        self._draining.pop(event.stream_id, None)
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            self._cancel(stream, "client reset the stream")

    def _on_window(self, event: WindowUpdated) -> None:
        if event.stream_id == 0:
            self._pump_blocked()
        else:
            stream = self._blocked.get(event.stream_id)
            if stream is not None:
                self._pump(stream)

    def _on_settings(self, event: RemoteSettingsChanged) -> None:
        if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            self._pump_blocked()

    def _on_goaway(self, event: ConnectionTerminated) -> None:
        # h2 sends nothing more once the client said goodbye.
        self._closing = True
        self._abandon_streams("client sent GOAWAY")
        self._lose()

    _handlers = {
        RequestReceived: _on_request,
        DataReceived: _on_data,
        TrailersReceived: _on_trailers,
        StreamEnded: _on_stream_ended,
        StreamReset: _on_reset,
        WindowUpdated: _on_window,
        RemoteSettingsChanged: _on_settings,
        ConnectionTerminated: _on_goaway,
    }

    # Request bodies.

    def ack(self, stream_id: int, size: int) -> None:
        """Hand ``size`` consumed bytes back to the client's windows."""
        if size and not self._closing:
            self._conn.acknowledge_received_data(size, stream_id)

    def send_continue(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None and not stream.responded and not self._closing:
            self._h2(stream, self._conn.send_headers, stream_id, [(b":status", b"100")])
            self.flush()

    def body_failed(self, stream_id: int, reason: Failure) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.closed or not isinstance(reason.value, GatewayError):
            return
        if not stream.responded:
            self._respond_error(stream, reason.value)
            d, stream.deferred = stream.deferred, None
            if d is not None:
                d.cancel()
        else:
            self._reset(stream, ErrorCodes.CANCEL)
            self._cancel(stream, "request body refused")
        self.flush()

    # Responses.

    def _failed(self, failure: Failure, stream: _Stream) -> None:
        if stream.responded or stream.closed:
            return
        self._respond_error(stream, error_for(failure, self.log))

    def _respond_error(self, stream: _Stream, error: GatewayError) -> None:
        request_id = stream.ctx.request_id or None
        if stream.grpc:
            if stream.responded or stream.closed or self._closing:
                return
            stream.responded = True
            headers = render_grpc(error, request_id)
            stream.ctx.status = 200
            stream.grpc_status = _header(headers, b"grpc-status")
            self._send_headers(stream, headers, True)
            self._response_complete(stream)
            self.flush()
            return
        status, headers, payload = render_json(error, request_id)
        if request_id:
            headers.append((b"x-request-id", request_id.encode("ascii")))
        self._respond(Response(status, headers, BytesBody(payload)), stream)

    def _respond(self, response: Response, stream: _Stream) -> None:
        body = response.body
        if stream.responded or stream.closed or self._closing:
            if body is not None:
                body.stopProducing()
            return
        stream.responded = True
        status = stream.ctx.status = response.status
        if stream.grpc:
            stream.grpc_status = _header(response.headers, b"grpc-status")
        if stream.ctx.method == b"HEAD" or status in (204, 304):
            if body is not None:
                body.deliverTo(DISCARD)
            headers = [(b":status", _STATUS[status]), *_fields(response.headers, _NOT_IN_H2_NO_BODY)]
            self._send_headers(stream, headers, True)
            self._response_complete(stream)
        elif body is None or stream.grpc_status is not None:
            # No body, or gRPC's Trailers-Only form: one HEADERS frame ends the stream.
            if body is not None:
                body.deliverTo(DISCARD)
            headers = [(b":status", _STATUS.get(status) or b"%d" % status), *_fields(response.headers, _NOT_IN_H2)]
            self._send_headers(stream, headers, True)
            self._response_complete(stream)
        else:
            body = whole(body)  # then sent without the streaming machinery in between
            headers = [(b":status", _STATUS.get(status) or b"%d" % status), *_fields(response.headers, _NOT_IN_H2)]
            length = body.length
            if length is not None:
                headers.append((b"content-length", b"%d" % length))
            if not self._send_headers(stream, headers, False):
                body.stopProducing()
                return
            stream.left = length
            stream.response_body = body
            if self._write_paused:
                stream.paused = True
                body.pauseProducing()
            body.deliverTo(stream)
        self.flush()

    def response_data(self, stream: _Stream, data: bytes) -> None:
        if stream.closed or not data:
            return
        stream.ctx.bytes_out += len(data)
        stream.pending.append(data)
        left = stream.left
        if left is not None:
            left -= len(data)
            stream.left = left
            if left <= 0:
                # The last bytes wait for finish(), to carry END_STREAM unless trailers follow.
                return
        self._pump(stream)
        self.flush()

    def response_finished(self, stream: _Stream) -> None:
        if stream.closed:
            return
        stream.to_finish = True
        trailers = getattr(stream.response_body, "trailers", None)
        if trailers:
            stream.trailers = _fields(trailers, _NOT_IN_H2)
            if stream.grpc:
                stream.grpc_status = _header(stream.trailers, b"grpc-status")
        self._pump(stream)
        self.flush()

    def response_aborted(self, stream: _Stream, reason: object) -> None:
        """The response body failed midway: this stream is reset, the others go on."""
        if stream.closed:
            return
        self.log.warn(
            "response body aborted for request {request_id}: {reason}",
            request_id=stream.ctx.request_id,
            reason=reason,
        )
        stream.response_body = None
        self._reset(stream, ErrorCodes.INTERNAL_ERROR)
        self._cancel(stream, "response aborted")
        self.flush()

    def _pump(self, stream: _Stream) -> None:
        """Send what the windows allow; pause the body while bytes wait."""
        conn = self._conn
        stream_id = stream.id
        pending = stream.pending
        end_with_data = stream.to_finish and not stream.trailers
        try:
            while pending:
                window = conn.local_flow_control_window(stream_id)
                if window <= 0:
                    break
                size = conn.max_outbound_frame_size
                if window < size:
                    size = window
                data = pending[0]
                if len(data) <= size:
                    pending.popleft()
                    last = end_with_data and not pending
                    conn.send_data(stream_id, data, end_stream=last)
                    if last:
                        stream.ended = True
                else:
                    view = data if isinstance(data, memoryview) else memoryview(data)
                    conn.send_data(stream_id, view[:size])
                    pending[0] = view[size:]
            if pending:
                self._blocked[stream_id] = stream
                body = stream.response_body
                if not stream.paused and body is not None and not stream.to_finish:
                    stream.paused = True
                    body.pauseProducing()
                return
            self._blocked.pop(stream_id, None)
            if stream.to_finish:
                if stream.trailers:
                    conn.send_headers(stream_id, stream.trailers, end_stream=True)
                elif not stream.ended:
                    conn.end_stream(stream_id)
                stream.ended = True
        except ProtocolError:
            self._cancel(stream, "stream closed")
            return
        if stream.to_finish:
            self._response_complete(stream)
        elif stream.paused and not self._write_paused and stream.response_body is not None:
            stream.paused = False
            stream.response_body.resumeProducing()

    def _pump_blocked(self) -> None:
        for stream in list(self._blocked.values()):
            if not stream.closed:
                self._pump(stream)

    def _response_complete(self, stream: _Stream) -> None:
        """The response is out; a request still being sent is no longer wanted.

        The rest of it is drained rather than refused at once: clients that
        treat an RST_STREAM(NO_ERROR) after a complete response as a failure
        (curl 7.x) stop sending on their own when they see an early answer.
        One that goes on past a window's worth gets the reset (RFC 9113 8.1).
        """
        if not stream.remote_ended:
            self._draining[stream.id] = 0
        self._close_stream(stream)
        body = stream.body
        if body is not None and not body.done:
            body._failed(Failure(CancelledError("response sent before the request ended")))
        self._account(stream)

    # Write backpressure, from the transport.

    def writes_paused(self) -> None:
        self._write_paused = True
        for stream in self._streams.values():
            body = stream.response_body
            if body is not None and not stream.paused and not stream.to_finish:
                stream.paused = True
                body.pauseProducing()

    def writes_resumed(self) -> None:
        self._write_paused = False
        for stream in list(self._streams.values()):
            body = stream.response_body
            if stream.paused and body is not None and stream.id not in self._blocked and not stream.closed:
                stream.paused = False
                body.resumeProducing()

    # Streams.

    def _h2(self, stream: _Stream, call: Callable[..., None], *args: object, **kwargs: object) -> bool:
        """One h2 call on a stream; False (and the stream dropped) if h2 says it is gone."""
        try:
            call(*args, **kwargs)
        except ProtocolError:
            self._cancel(stream, "stream closed")
            return False
        return True

    def _send_headers(self, stream: _Stream, headers: Headers, end: bool) -> bool:
        ok = self._h2(stream, self._conn.send_headers, stream.id, headers, end_stream=end)
        if ok and end:
            stream.ended = True
        return ok

    def _reset(self, stream: _Stream, code: ErrorCodes) -> None:
        if not stream.closed and not self._closing:
            try:
                self._conn.reset_stream(stream.id, code)
            except ProtocolError:
                pass

    def _close_stream(self, stream: _Stream) -> None:
        stream.closed = True
        self._blocked.pop(stream.id, None)
        if self._streams.pop(stream.id, None) is not None and not self._streams and not self._closing:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            if self._drain_last is not None:
                # Draining and the last stream is done: close (after this turn's writes).
                self._timer = self._clock.callLater(0, self._expired)
            else:
                self._timer = self._clock.callLater(self.limits.idle_timeout, self._expired)

    def _cancel(self, stream: _Stream, why: str) -> None:
        """Stop everything the stream started: pipeline, upload, response body."""
        if stream.closed:
            return
        self._close_stream(stream)
        self._account(stream, CLIENT_CLOSED_REQUEST if why in _CLIENT_LEFT else None)
        stream.pending.clear()
        body = stream.body
        if body is not None and not body.done:
            body._failed(Failure(CancelledError(why)))
        if stream.response_body is not None and not stream.to_finish:
            stream.response_body.stopProducing()
        elif stream.deferred is not None and not stream.responded:
            stream.responded = True
            stream.deferred.cancel()

    def _account(self, stream: _Stream, status: int | None = None) -> None:
        """The stream is over: fill in what its exchange came to and tell its gateway, once.

        ``status`` overrides the one the response head gave (499: the client
        left first); a stream the gateway ended before any head keeps 0.
        gRPC calls are counted by grpc-status: the one sent, 1 (CANCELLED)
        when the client left, else 2 (UNKNOWN: none was sent).
        """
        if stream.accounted:
            return
        stream.accounted = True
        ctx = stream.ctx
        if status is not None:
            ctx.status = status
        body = stream.body
        if body is not None:
            ctx.bytes_in = body.received
        ctx.ended = self._clock.seconds()
        self._in_flight.dec()
        if stream.grpc:
            sent = stream.grpc_status
            if sent is not None and sent in _GRPC_STATUSES:
                code = sent.decode("ascii")
            else:
                code = "1" if ctx.status == CLIENT_CLOSED_REQUEST else "2"
            route = ctx.route
            self._metrics.grpc_call(route.name if route is not None else "", code)
        gateway = stream.gateway
        if gateway is None:
            gateway = self.factory.gateway()
        gateway.exchange_done(ctx)

    def _abandon_streams(self, why: str) -> None:
        for stream in list(self._streams.values()):
            self._cancel(stream, why)

    # Writing and closing.

    def flush(self) -> None:
        """Write what h2 has for the socket, unless a read is being handled (it writes once at its end)."""
        if not self._receiving:
            self._write_out()

    def _write_out(self) -> None:
        data = self._conn.data_to_send()
        if data and self.transport is not None and not self._lost:
            write_soon(self.transport, data)

    def _abuse(self, code: ErrorCodes, reason: str) -> None:
        self.log.warn("HTTP/2 client {client} {reason}: GOAWAY", client=self._client_ip, reason=reason)
        self._goaway(code, reason)

    def _protocol_error(self, error: ProtocolError) -> None:
        """h2 refused what the client sent and has queued its GOAWAY."""
        self.log.info("HTTP/2 protocol error from {client}: {error}", client=self._client_ip, error=str(error))
        self._closing = True
        self._abandon_streams("protocol error")
        self._write_out()
        self._lose()

    def _goaway(self, code: ErrorCodes, reason: str | None) -> None:
        if self._closing:
            return
        self._closing = True
        try:
            self._conn.close_connection(error_code=code, additional_data=reason.encode() if reason else None)
        except ProtocolError:
            pass
        self._abandon_streams("connection closed by the gateway")
        self._write_out()
        self._lose()

    # Graceful shutdown (from the factory).

    def drain(self) -> None:
        """GOAWAY now, naming the last stream we will serve; those streams finish, then we close.

        h2 allows no frames after its own ``close_connection``, so this first
        GOAWAY is written around it (RFC 9113 6.8 permits several); the final
        one goes through h2 once the last stream is done.
        """
        if self._closing or self._lost or self._drain_last is not None or self.transport is None:
            return
        if not self._streams:
            self._goaway(ErrorCodes.NO_ERROR, None)
            return
        self._drain_last = self._conn.highest_inbound_stream_id
        self._write_out()
        self.transport.write(GoAwayFrame(0, last_stream_id=self._drain_last, error_code=0).serialize())

    def force_close(self) -> None:
        """The grace period is over: the streams still open are cancelled, the connection closed."""
        if self._lost:
            return
        if self._closing:
            self._abort()
        else:
            self._goaway(ErrorCodes.NO_ERROR, None)

    def _lose(self) -> None:
        transport = self.transport
        if transport is None or self._lost or self._abort_timer is not None:
            return
        transport.unregisterProducer()  # type: ignore[attr-defined]
        transport.loseConnection()
        self._abort_timer = self._clock.callLater(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self._abort_timer = None
        if self.transport is not None and not self._lost:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _expired(self) -> None:
        """No request within header_timeout, or no stream for idle_timeout."""
        self._timer = None
        if not self._streams:
            self._goaway(ErrorCodes.NO_ERROR, None)

    def _toggle_block_timer(self, start: bool) -> None:
        if start:
            self._block_timer = self._clock.callLater(self.limits.header_timeout, self._block_expired)
        else:
            timer, self._block_timer = self._block_timer, None
            if timer is not None and timer.active():
                timer.cancel()

    def _block_expired(self) -> None:
        self._block_timer = None
        self._abuse(ErrorCodes.ENHANCE_YOUR_CALM, "header block not completed within header_timeout")
