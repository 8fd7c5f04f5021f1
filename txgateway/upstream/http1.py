"""One HTTP/1.1 connection to an upstream: request writer, response parser, body.

:class:`HTTP11Connection` carries one request at a time (no pipelining).  It
writes the request head with :func:`txgateway.http11.request_head`, streams
the request body with backpressure (the body is the transport's producer),
parses the answer with httptools' ``HttpResponseParser`` and hands the head
over as soon as it is complete; the body follows as a :class:`ResponseBody`
that pauses the upstream socket whenever its consumer is slow or not there yet.

What happens around the connection (connecting, timeouts, pooling, retries)
is the owner's business: it hears about the connection through a
:class:`ConnectionListener` and about each request through a
:class:`ResponseHandler`.  This module does no per-request work beyond
parsing: headers stay a list, nothing is logged above debug.
"""

from __future__ import annotations

from collections import deque
from typing import Any
from typing import Protocol as _TypingProtocol

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpResponseParser,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txgateway.errors import BadRequest, UpstreamProtocolError, UpstreamReset
from txgateway.http11 import LAST_CHUNK, chunk, request_head
from txgateway.interfaces import IBody, IBodySink
from txgateway.messages import Headers, Response, UpstreamRequest
from txgateway.wire import write_soon

__all__ = ["ConnectionListener", "HTTP11Connection", "ResponseBody", "ResponseHandler"]

# Connection states.
_IDLE = 0  # no request: any byte from the upstream is a protocol violation
_WAITING = 1  # request sent (its body maybe still streaming), no final head yet
_BODY = 2  # final head handed over, response body arriving
_DONE = 3  # response complete; settled at the end of the current dataReceived
_CLOSED = 4  # closing or closed: never used again

_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
_CONTENT_LENGTH_0 = (b"content-length", b"0")
_CHUNKED = (b"transfer-encoding", b"chunked")
#: Response headers the connection looks at (framing and reuse), lower-case.
_WATCHED = frozenset({b"content-length", b"transfer-encoding", b"connection"})
_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0), "0.9": (0, 9)}
_CONNECTION_DONE = Failure(ConnectionDone())
#: What a closed connection's parser is replaced with: one without callbacks
#: (so without a reference back to the protocol), never fed.
_DETACHED_PARSER = HttpResponseParser(object())


class ConnectionListener(_TypingProtocol):
    """The owner of a connection (its pool), told about its life."""

    def connectionMade(self, connection: HTTP11Connection) -> None:
        """The TCP connection is up and can take its first request."""

    def connectionIdle(self, connection: HTTP11Connection) -> None:
        """The exchange completed cleanly and the connection can take another request."""

    def connectionClosed(self, connection: HTTP11Connection) -> None:
        """The connection is gone; called exactly once, last."""


class ResponseHandler(_TypingProtocol):
    """Whoever waits for the response head of one request; told exactly once."""

    def responseReceived(self, response: Response) -> None:
        """The final (non-1xx) response head arrived."""

    def requestProgress(self) -> None:
        """A piece of the request body went out (or the last one did).

        The response timeout counts from the last progress, so a large upload
        is not cut off by a timeout meant for the upstream's answer.
        """

    def requestFailed(self, reason: Failure, stale: bool) -> None:
        """The request failed before the final head.

        ``stale`` is true when the connection had served a request before and
        was lost before a single response byte came back: the upstream most
        likely closed an idle keep-alive connection while the request was on
        its way, so a request without a body can safely go again elsewhere.
        """


class _Unexpected101(Exception):
    """A 101 Switching Protocols answer, which this client never asks for."""


@implementer(IBodySink)
class _RequestBodyWriter:
    """Writes a request body to the upstream, framed by length or in chunks."""

    __slots__ = ("_connection", "_remaining")

    def __init__(self, connection: HTTP11Connection, length: int | None) -> None:
        self._connection: HTTP11Connection | None = connection
        #: Bytes still owed for a body of known length; None for chunked.
        self._remaining = length

    def write(self, data: bytes) -> None:
        connection = self._connection
        if connection is None or not data:
            return
        remaining = self._remaining
        if remaining is None:
            write_soon(connection.transport, chunk(data))
            connection._requestBodyProgress()
            return
        remaining -= len(data)
        if remaining < 0:
            self._connection = None
            connection._requestBodyFailed(
                Failure(BadRequest("request body is longer than its declared length"))
            )
            return
        self._remaining = remaining
        write_soon(connection.transport, data)
        connection._requestBodyProgress()

    def finish(self) -> None:
        connection = self._connection
        if connection is None:
            return
        self._connection = None
        remaining = self._remaining
        if remaining is None:
            write_soon(connection.transport, LAST_CHUNK)
        elif remaining:
            connection._requestBodyFailed(
                Failure(BadRequest("request body is shorter than its declared length"))
            )
            return
        connection._requestBodySent()

    def abort(self, reason: object) -> None:
        connection = self._connection
        if connection is None:
            return
        self._connection = None
        if not isinstance(reason, Failure):
            reason = Failure(UpstreamReset(f"request body aborted: {reason}"))
        connection._requestBodyFailed(reason)

    def _detach(self) -> None:
        self._connection = None


@implementer(IBody)
class ResponseBody:
    """The body of one upstream response, streamed from the socket.

    Bytes that arrive while there is no sink yet, or while the consumer is
    paused, are kept in order and the upstream socket is paused, so at most a
    read's worth is ever held.  ``stopProducing`` abandons the body and aborts
    the upstream connection (it never goes back to the pool).
    """

    __slots__ = ("_buffer", "_connection", "_failure", "_finished", "_paused", "_sink", "_started", "length", "trailers")

    def __init__(self, connection: HTTP11Connection | None, length: int | None) -> None:
        self.length = length
        self._connection = connection
        self._sink: IBodySink | None = None
        self._buffer: deque[bytes] | None = None
        self._paused = False
        self._started = False
        self._finished = connection is None
        self._failure: Failure | None = None
        #: HTTP/1.1 chunked trailers are not relayed (httptools does not report them).
        self.trailers: list[tuple[bytes, bytes]] = []

    # The connection's side.

    def _write(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None and not self._paused and not self._buffer:
            sink.write(data)
            return
        buffer = self._buffer
        if buffer is None:
            buffer = self._buffer = deque()
        buffer.append(data)

    def _finish(self) -> None:
        self._connection = None
        self._finished = True
        self._flush()

    def _abort(self, reason: Failure) -> None:
        self._connection = None
        self._failure = reason
        self._flush()

    def _waiting(self) -> bool:
        """True while bytes must not flow: no sink yet, or the consumer paused."""
        return self._sink is None or self._paused

    def _flush(self) -> None:
        sink = self._sink
        if sink is None:
            return
        buffer = self._buffer
        while buffer and not self._paused:
            sink.write(buffer.popleft())
            if self._sink is not sink:
                return  # stopped, or finished by a nested flush, while writing
        if self._paused or buffer:
            return
        if self._finished:
            self._sink = None
            sink.finish()
        elif self._failure is not None:
            self._sink = None
            sink.abort(self._failure)

    # The consumer's side (IBody).

    def complete(self) -> bytes | None:
        """The whole body, when it has all arrived and nothing was delivered yet
        (then it is consumed, like ``deliverTo``); else None."""
        if not self._finished or self._started or self._failure is not None:
            return None
        self._started = True
        buffer, self._buffer = self._buffer, None
        if not buffer:
            return b""
        return buffer[0] if len(buffer) == 1 else b"".join(buffer)

    def deliverTo(self, sink: IBodySink) -> None:
        if self._started:
            raise RuntimeError("a response body is delivered at most once")
        self._started = True
        self._sink = sink
        self._flush()
        connection = self._connection
        if connection is not None and not self._paused and self._sink is sink:
            connection._resumeReading()

    def pauseProducing(self) -> None:
        self._paused = True
        connection = self._connection
        if connection is not None:
            connection._pauseReading()

    def resumeProducing(self) -> None:
        self._paused = False
        sink = self._sink
        if sink is None:
            return
        self._flush()
        connection = self._connection
        if connection is not None and not self._paused and self._sink is sink:
            connection._resumeReading()

    def stopProducing(self) -> None:
        self._sink = None
        self._buffer = None
        self._started = True
        connection, self._connection = self._connection, None
        if connection is not None:
            connection._bodyStopped()


class HTTP11Connection(Protocol):
    """The client side of one upstream HTTP/1.1 connection.

    Call :meth:`request` when the connection is new or idle; the handler hears
    back once.  The connection tells its listener when it is idle again (the
    request body was fully sent, the response fully read, and both sides keep
    the connection alive over HTTP/1.1) and when it is gone.
    """

    log = Logger()
    #: A TCP transport: ITCPTransport, IConsumer and IPushProducer at once.
    transport: Any

    def __init__(self, listener: ConnectionListener) -> None:
        self._listener = listener
        self._parser = HttpResponseParser(self)
        self._state = _IDLE
        self._handler: ResponseHandler | None = None
        self._method = b""
        self._reused = False
        self._gotBytes = False
        self._requestWriter: _RequestBodyWriter | None = None
        self._requestDone = True
        self._body: ResponseBody | None = None
        #: A body whose last byte arrived, finished once the connection is settled.
        self._completedBody: ResponseBody | None = None
        #: The head of a bodiless answer, handed over once the connection is settled.
        self._completedHead: tuple[ResponseHandler, Response] | None = None
        #: The head of a response with a body, handed over once the read it came in is parsed.
        self._pendingHead: tuple[ResponseHandler, Response] | None = None
        self._readPaused = False
        self._keepAlive = False
        self._broken = False
        self._replaceParser = False
        self._http11 = True
        # The message being parsed.
        self._headers: Headers = []
        self._reason = b""
        self._contentLength: int | None = None
        self._transferEncoding = False
        self._chunked = False
        self._connectionClose = False

    # Owner API.

    def request(self, request: UpstreamRequest, handler: ResponseHandler, reused: bool) -> None:
        """Send ``request``; ``handler`` hears about the response head or the failure.

        ``reused`` says the connection served a request before, which makes
        an early loss "stale" (see :meth:`ResponseHandler.requestFailed`).
        """
        if self._state != _IDLE:
            raise RuntimeError("an upstream connection carries one request at a time")
        self._state = _WAITING
        self._handler = handler
        method = self._method = request.method
        self._reused = reused
        self._gotBytes = False
        self._broken = False
        self._keepAlive = False
        transport = self.transport
        body = request.body
        headers = request.headers
        if body is None:
            if method in _BODY_METHODS:
                headers = [*headers, _CONTENT_LENGTH_0]
            self._requestDone = True
            write_soon(transport, request_head(method, request.target, headers))
            return
        length = body.length
        if length is None:
            headers = [*headers, _CHUNKED]
        else:
            headers = [*headers, (b"content-length", b"%d" % length)]
        self._requestDone = False
        write_soon(transport, request_head(method, request.target, headers))
        writer = self._requestWriter = _RequestBodyWriter(self, length)
        transport.registerProducer(body, True)
        body.deliverTo(writer)

    def abort(self) -> None:
        """Abandon the request in progress (cancelled, timed out) and the connection.

        The handler is not told: the caller already knows.
        """
        self._handler = None
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self._detachRequestBody()
        self.transport.abortConnection()

    def close(self) -> None:
        """Close an idle connection gracefully."""
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self.transport.loseConnection()

    # Twisted.

    def connectionMade(self) -> None:
        setTcpNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setTcpNoDelay is not None:
            setTcpNoDelay(True)
        self._listener.connectionMade(self)

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _WAITING or state == _BODY:
            self._gotBytes = True
            try:
                self._parser.feed_data(data)
            except (HttpParserError, HttpParserUpgrade) as e:
                self._handOverHead()  # the head was sound: its body then fails
                self._parseFailed(e)
                return
            state = self._state
            if state == _DONE:
                self._exchangeDone()
            elif state == _BODY:
                self._handOverHead()
                if not self._readPaused:
                    body = self._body
                    if body is not None and body._waiting():
                        self._readPaused = True
                        self.transport.pauseProducing()
        elif state == _IDLE:
            self.log.debug("unsolicited bytes on an idle upstream connection; closing it")
            self._state = _CLOSED
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        state = self._state
        self._state = _CLOSED
        self._detachRequestBody()
        if state == _WAITING:
            handler, self._handler = self._handler, None
            if handler is not None:
                stale = self._reused and not self._gotBytes
                self.log.debug(
                    "upstream connection lost before the response head: {reason}",
                    reason=reason.getErrorMessage(),
                )
                handler.requestFailed(
                    Failure(UpstreamReset("upstream closed the connection before responding")), stale
                )
        elif state == _BODY:
            body, self._body = self._body, None
            assert body is not None
            closeDelimited = not self._chunked and (self._transferEncoding or self._contentLength is None)
            if closeDelimited and reason.check(ConnectionDone):
                body._finish()
            else:
                self.log.debug(
                    "upstream connection lost mid-body: {reason}", reason=reason.getErrorMessage()
                )
                body._abort(Failure(UpstreamReset("upstream closed the connection mid-body")))
        elif state == _DONE:
            self._deliverCompleted()
        self._listener.connectionClosed(self)
        # Break the parser <-> protocol reference cycle (its callbacks are our
        # bound methods), so a closed connection is freed without a collection.
        self._parser = _DETACHED_PARSER

    # httptools callbacks.

    def on_message_begin(self) -> None:
        if self._state != _WAITING:
            self._broken = True  # a second response to one request
        self._headers = []
        self._reason = b""
        self._contentLength = None
        self._transferEncoding = False
        self._chunked = False
        self._connectionClose = False

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self._headers.append((name, value))
        if name in _WATCHED:
            if name == b"content-length":
                self._contentLength = int(value)
            elif name == b"transfer-encoding":
                self._transferEncoding = True
                self._chunked = value.rstrip().lower().endswith(b"chunked")
            elif b"close" in value.lower():
                self._connectionClose = any(
                    token.strip() == b"close" for token in value.lower().split(b",")
                )

    def on_headers_complete(self) -> None:
        if self._state != _WAITING:
            self._broken = True
            return
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                raise _Unexpected101()
            return  # 100 Continue, 103 Early Hints...: wait for the final answer
        version = parser.get_http_version()
        self._http11 = version == "1.1"
        method = self._method
        handler, self._handler = self._handler, None
        assert handler is not None
        versionTuple = _VERSIONS.get(version) or _parseVersion(version)
        if method == b"HEAD" or status == 204 or status == 304:
            self._keepAlive = self._http11 and not self._connectionClose
            self._state = _DONE
            # httptools cannot be told that a HEAD answer has no body: its
            # parser would wait for Content-Length bytes.  Start afresh.
            self._replaceParser = method == b"HEAD"
            # Complete already: handed over once the connection is settled.
            self._completedHead = (
                handler,
                Response(status, self._headers, ResponseBody(None, 0), self._reason, versionTuple),
            )
            return
        body = self._body = ResponseBody(
            self, None if self._transferEncoding else self._contentLength
        )
        self._state = _BODY
        # Handed over once this read is parsed: a small response is then
        # complete when its consumer gets it, and can be sent on whole.
        self._pendingHead = (handler, Response(status, self._headers, body, self._reason, versionTuple))

    def on_body(self, data: bytes) -> None:
        body = self._body
        if body is not None:
            body._write(data)
        else:
            self._broken = True  # bytes after a bodiless (HEAD) answer

    def on_message_complete(self) -> None:
        if self._state != _BODY:
            return  # end of a 1xx, of a bodiless answer, or of garbage we flagged
        self._keepAlive = (
            self._http11 and not self._connectionClose and self._parser.should_keep_alive()
        )
        # The body is finished only once the connection is settled (back in
        # the pool), so a consumer that sends its next request from
        # ``finish()`` can have this very connection.
        self._completedBody, self._body = self._body, None
        self._state = _DONE

    # Internals.

    def _exchangeDone(self) -> None:
        """Settle a complete response: back to the pool, or closed; then hand it over."""
        if self._replaceParser:
            self._replaceParser = False
            self._parser = HttpResponseParser(self)
        if self._readPaused:
            self._readPaused = False
            self.transport.resumeProducing()
        if self._keepAlive and self._requestDone and not self._broken:
            self._state = _IDLE
            self._listener.connectionIdle(self)
        else:
            # If the request body is still streaming, Twisted closes once the
            # producer unregisters (or the upstream gives up reading it).
            self._state = _CLOSED
            self.transport.loseConnection()
        self._deliverCompleted()

    def _handOverHead(self) -> None:
        head, self._pendingHead = self._pendingHead, None
        if head is not None:
            head[0].responseReceived(head[1])

    def _deliverCompleted(self) -> None:
        """Hand over a response that is complete (its head, or its body's end)."""
        head, self._completedHead = self._completedHead, None
        if head is not None:
            head[0].responseReceived(head[1])
        body, self._completedBody = self._completedBody, None
        if body is not None:
            body._finish()
        # After the body's end: its consumer gets it complete.
        self._handOverHead()

    def _parseFailed(self, error: Exception) -> None:
        state = self._state
        self._state = _CLOSED
        self._detachRequestBody()
        cause = error.__context__
        if isinstance(error, HttpParserUpgrade) or isinstance(cause, _Unexpected101):
            self.log.debug("upstream answered 101 Switching Protocols unasked")
            failure = Failure(UpstreamProtocolError("upstream switched protocols unasked"))
        elif isinstance(error, HttpParserCallbackError) and cause is not None:
            # Not the upstream's fault: code called from a parser callback (a
            # body consumer's write, say) raised.  Fail the exchange all the same.
            self.log.failure(
                "response callback raised", Failure(cause, type(cause), cause.__traceback__)
            )
            failure = Failure(UpstreamProtocolError("response processing failed"))
        else:
            self.log.debug("invalid response from upstream: {error}", error=error)
            failure = Failure(UpstreamProtocolError(f"upstream sent an invalid response: {error}"))
        self.transport.abortConnection()
        if state == _WAITING:
            handler, self._handler = self._handler, None
            if handler is not None:
                handler.requestFailed(failure, False)
        elif state == _BODY:
            body, self._body = self._body, None
            if body is not None:
                body._abort(failure)
        elif state == _DONE:
            self._deliverCompleted()  # garbage after a complete response: it stands

    def _detachRequestBody(self) -> None:
        writer = self._requestWriter
        if writer is not None:
            self._requestWriter = None
            writer._detach()

    def _requestBodyProgress(self) -> None:
        handler = self._handler
        if handler is not None:
            handler.requestProgress()

    def _requestBodySent(self) -> None:
        self._requestWriter = None
        self._requestDone = True
        self.transport.unregisterProducer()
        self._requestBodyProgress()

    def _requestBodyFailed(self, reason: Failure) -> None:
        """The request body broke (client went away, wrong length): give up the exchange."""
        self._requestWriter = None
        state = self._state
        self._state = _CLOSED
        self.log.debug("request body failed: {reason}", reason=reason.getErrorMessage())
        self.transport.unregisterProducer()
        self.transport.abortConnection()
        if state == _WAITING:
            handler, self._handler = self._handler, None
            if handler is not None:
                handler.requestFailed(reason, False)
        elif state == _BODY:
            body, self._body = self._body, None
            if body is not None:
                body._abort(reason)

    def _pauseReading(self) -> None:
        if self._state == _BODY and not self._readPaused:
            self._readPaused = True
            self.transport.pauseProducing()

    def _resumeReading(self) -> None:
        if self._state == _BODY and self._readPaused:
            self._readPaused = False
            self.transport.resumeProducing()

    def _bodyStopped(self) -> None:
        """The consumer abandoned the response body: the connection cannot be reused."""
        if self._state != _BODY:
            return
        self._body = None
        self._state = _CLOSED
        self._detachRequestBody()
        self.transport.abortConnection()


def _parseVersion(version: str) -> tuple[int, int]:
    major, _, minor = version.partition(".")
    return int(major), int(minor or 0)
