"""Bodies held in memory: small answers the gateway writes itself."""

from __future__ import annotations

from zope.interface import implementer

from txgateway.interfaces import IBody, IBodySink


@implementer(IBody)
class BytesBody:
    """A body whose bytes are all known up front (error pages, tests, demo)."""

    __slots__ = ("_paused", "_sink", "_stopped", "data", "length", "trailers")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length: int | None = len(data)
        self.trailers: list[tuple[bytes, bytes]] = []
        self._sink: IBodySink | None = None
        self._paused = False
        self._stopped = False

    def deliverTo(self, sink: IBodySink) -> None:
        self._sink = sink
        if not self._paused:
            self._deliver()

    def _deliver(self) -> None:
        sink, self._sink = self._sink, None
        if sink is None or self._stopped:
            return
        if self.data:
            sink.write(self.data)
        sink.finish()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._deliver()

    def stopProducing(self) -> None:
        self._stopped = True
        self._sink = None


def whole(body: IBody) -> IBody:
    """``body`` as a :class:`BytesBody` when it has already arrived whole (a small
    upstream response read in one go; see ``ResponseBody.complete``), so an
    edge can send it with its head at once; else ``body`` itself."""
    if isinstance(body, BytesBody):
        return body
    complete = getattr(body, "complete", None)
    data = complete() if complete is not None else None
    return body if data is None else BytesBody(data)


@implementer(IBodySink)
class _DiscardSink:
    """Consumes a body nobody wants (HEAD, 204 and 304 responses)."""

    def write(self, data: bytes) -> None:
        pass

    def finish(self) -> None:
        pass

    def abort(self, reason: object) -> None:
        pass


#: A sink that drops whatever body it is given.
DISCARD: IBodySink = _DiscardSink()
