"""The interfaces the gateway's parts meet at.

Bodies are streams: a body is an ``IPushProducer`` that delivers its bytes to
one ``IBodySink``.  Whoever consumes a body registers it as the producer on the
transport it writes to, so a slow reader pauses the writer all the way back
(a slow client pauses the upstream read; a slow upstream pauses the client
read).  Nothing on the proxy path holds a whole body in memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IPushProducer
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from txgateway.messages import Response, UpstreamRequest


class IBodySink(Interface):
    """Receives the bytes of one body, in order."""

    def write(data: bytes) -> None:
        """Take the next piece of the body."""

    def finish() -> None:
        """The body ended completely."""

    def abort(reason: object) -> None:
        """The body ended early; ``reason`` is a Failure."""


class IBody(IPushProducer):
    """A request or response body, streamed to one sink.

    ``pauseProducing``/``resumeProducing`` pause the source of the bytes (a
    transport); ``stopProducing`` abandons the body and its source.
    """

    length = Attribute("Total length in bytes if known in advance (0: empty), else None.")
    trailers = Attribute(
        "Trailer fields [(lower-case name, value)] that followed the body; read once the sink's "
        "finish() is called (empty when none). HTTP/2 and gRPC carry grpc-status here."
    )

    def deliverTo(sink: IBodySink) -> None:
        """Start delivering to ``sink``; called at most once."""


class IRequestBody(IBody):
    """A downstream request body: the route's size limit is enforced as bytes arrive."""

    max_bytes = Attribute("The most bytes the route accepts (413 past it); None: no limit.")


class IUpstreamClient(Interface):
    """Sends one request to one upstream instance and returns the response head.

    The only way the gateway talks to an upstream over HTTP/1.1; the proxy
    never touches sockets itself, so the client can change behind this.
    """

    def request(request: UpstreamRequest) -> Deferred[Response]:
        """Send an ``UpstreamRequest``; return a Deferred firing with a ``Response``.

        Cancelling the Deferred before the head arrives aborts the attempt.
        After the head, ``response.body.stopProducing()`` abandons the body.
        Fails with an ``UpstreamError`` (connect_error, reset, protocol_error)
        or ``UpstreamTimeout``.
        """

    def close() -> Deferred[None]:
        """Close idle connections and refuse new requests; return a Deferred."""
