"""A response body that streams to the client and keeps a copy for the cache.

The client gets every piece as it arrives (the tee never holds bytes back);
the copy grows only up to ``limit`` bytes and is dropped, with its memory,
the moment the body turns out bigger.  The copy is handed over only when the
body ended completely; an abort on either side (the upstream broke, the
client went away) hands over nothing.  Producer calls go straight to the
source, so backpressure is untouched.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger
from zope.interface import implementer

from txgateway.interfaces import IBody, IBodySink


@implementer(IBody, IBodySink)
class TeeBody:
    """Wraps ``source``: an IBody to its consumer and the IBodySink of ``source``."""

    log = Logger()

    __slots__ = ("_abandoned", "_complete", "_limit", "_parts", "_sink", "_size", "_source", "length")

    def __init__(
        self,
        source: IBody,
        limit: int,
        complete: Callable[[bytes], None],
        abandoned: Callable[[], None],
    ) -> None:
        """``complete(body)`` runs once the whole body passed, before the
        consumer hears ``finish``; ``abandoned()`` runs instead, at most once,
        as soon as no copy can be made."""
        self._source = source
        self._limit = limit
        self._complete = complete
        self._abandoned = abandoned
        self._parts: list[bytes] | None = []
        self._size = 0
        self._sink: IBodySink | None = None
        self.length = source.length

    def _give_up(self) -> None:
        if self._parts is not None:
            self._parts = None
            self._abandoned()

    # IBody: the consumer's side.

    @property
    def trailers(self) -> list[tuple[bytes, bytes]]:
        return getattr(self._source, "trailers", [])

    def deliverTo(self, sink: IBodySink) -> None:
        self._sink = sink
        self._source.deliverTo(self)

    def pauseProducing(self) -> None:
        self._source.pauseProducing()

    def resumeProducing(self) -> None:
        self._source.resumeProducing()

    def stopProducing(self) -> None:
        self._sink = None
        self._give_up()
        self._source.stopProducing()

    # IBodySink: the source's side.

    def write(self, data: bytes) -> None:
        parts = self._parts
        if parts is not None:
            self._size += len(data)
            if self._size > self._limit:
                self._give_up()
            else:
                parts.append(data)
        sink = self._sink
        if sink is not None:
            sink.write(data)

    def finish(self) -> None:
        parts, self._parts = self._parts, None
        if parts is not None:
            try:
                self._complete(b"".join(parts))
            except Exception:  # noqa: BLE001 - storing must never break the response
                self.log.failure("storing a response in the cache failed")
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.finish()

    def abort(self, reason: object) -> None:
        self._give_up()
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.abort(reason)
