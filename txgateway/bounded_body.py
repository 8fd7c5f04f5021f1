"""Reading a control-plane HTTP response body, whole, up to a size limit.

The gateway's own outgoing calls (JWKS fetches, service-discovery APIs) go
through treq/Agent and want the body as one document; a peer that sends
more than the limit must not grow the gateway's memory, so the connection
is dropped past it.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss


class BoundedBody(Protocol):
    """Collects a response body (``response.deliverBody(it)``) into ``done``.

    Past ``limit`` bytes, on :meth:`abort` or when ``done`` is cancelled, the
    connection is dropped; ``done`` then fails with ``too_large(limit)``, the
    cancellation, or the connection's reason.
    """

    def __init__(self, limit: int, too_large: Callable[[int], Exception]) -> None:
        self.limit = limit
        self._too_large = too_large
        self.parts: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred(lambda _: self.abort())

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.abort()
            self.done.errback(self._too_large(self.limit))
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)
