"""Request bodies that a retry can send again.

A retry may resend a request body only if the gateway still has all of it.
:class:`ReplayableBody` streams the client's body to the first try while
keeping a copy of up to ``limit`` bytes (64 KiB by default).  Past the limit
the copy is dropped and the body is no longer replayable, so big uploads are
never held in memory and never retried after they started.  A try that
failed before it read any of the body (a connect error) leaves the body
untouched, so it can always be retried.
"""

from __future__ import annotations

from zope.interface import implementer

from txgateway.interfaces import IBody, IBodySink, IRequestBody

REPLAY_LIMIT = 64 * 1024


@implementer(IRequestBody)
class ReplayableBody:
    """Wraps the client's body; ``fresh()`` gives each further try its own view."""

    def __init__(self, original: IRequestBody, limit: int = REPLAY_LIMIT) -> None:
        self._original = original
        self.length = original.length
        self._limit = limit
        self._kept: list[bytes] | None = []
        self._kept_bytes = 0
        self._started = False
        self._done = False
        self._failed: object = None
        self._sink: IBodySink | None = None

    @property
    def max_bytes(self) -> int | None:
        return self._original.max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int | None) -> None:
        self._original.max_bytes = value

    @property
    def replayable(self) -> bool:
        """True while another try could still get the whole body."""
        return not self._started or (self._kept is not None and self._failed is None)

    def fresh(self) -> IBody:
        """The body for the next try: this one if untouched, else a replay of the copy."""
        if not self._started:
            return self
        if not self.replayable:
            raise RuntimeError("request body can no longer be replayed")
        return _Replay(self)

    # IBody, for the first try.

    @property
    def trailers(self) -> list[tuple[bytes, bytes]]:
        return getattr(self._original, "trailers", [])

    def deliverTo(self, sink: IBodySink) -> None:
        self._started = True
        self._sink = sink
        self._original.deliverTo(_Tee(self))

    def pauseProducing(self) -> None:
        self._original.pauseProducing()

    def resumeProducing(self) -> None:
        self._original.resumeProducing()

    def stopProducing(self) -> None:
        # A failed try lets go of the body; the client's body keeps flowing
        # into the copy so a retry can have it.  Detach the dead sink only.
        self._sink = None
        self._original.resumeProducing()

    # From the tee.

    def _data(self, data: bytes) -> None:
        if self._kept is not None:
            self._kept_bytes += len(data)
            if self._kept_bytes > self._limit:
                self._kept = None
            else:
                self._kept.append(data)
        if self._sink is not None:
            self._sink.write(data)

    def _end(self) -> None:
        self._done = True
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.finish()

    def _abort(self, reason: object) -> None:
        self._failed = reason
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.abort(reason)


@implementer(IBodySink)
class _Tee:
    __slots__ = ("_body",)

    def __init__(self, body: ReplayableBody) -> None:
        self._body = body

    def write(self, data: bytes) -> None:
        self._body._data(data)

    def finish(self) -> None:
        self._body._end()

    def abort(self, reason: object) -> None:
        self._body._abort(reason)


@implementer(IBody)
class _Replay:
    """A later try's view: the copy so far, then the rest as it arrives."""

    def __init__(self, body: ReplayableBody) -> None:
        self._body = body
        self.length = body.length

    @property
    def trailers(self) -> list[tuple[bytes, bytes]]:
        return getattr(self._body, "trailers", [])

    def deliverTo(self, sink: IBodySink) -> None:
        body = self._body
        kept = body._kept or []
        for data in list(kept):
            sink.write(data)
        if body._done:
            sink.finish()
        elif body._failed is not None:
            sink.abort(body._failed)
        else:
            body._sink = sink

    def pauseProducing(self) -> None:
        self._body.pauseProducing()

    def resumeProducing(self) -> None:
        self._body.resumeProducing()

    def stopProducing(self) -> None:
        self._body.stopProducing()
