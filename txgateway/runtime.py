"""What outlives one configuration generation: reactor, clock, shared state.

A reload builds a new :class:`~txgateway.gateway.Gateway` but keeps the
``Runtime``.  Middlewares keep anything that must survive a reload (JWKS key
caches, rate-limit buckets, Redis connections, upstream pools) in
:meth:`Runtime.shared` under a key derived from the config that owns it, so
an unchanged route keeps its buckets and a changed one starts fresh.

What a generation asks for while it is built is recorded
(:meth:`Runtime.generation`); after a reload, :meth:`Runtime.retire` takes out
what the old generation used and the new one does not (the JWKS set of a
removed issuer, the health checks of a removed upstream, a Redis connection no
route names any more) and stops it once the old generation's requests have had
time to finish.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from txgateway.observability.metrics import GatewayMetrics, multiprocess

T = TypeVar("T")


class Runtime:
    log = Logger()

    def __init__(self, reactor: Any, clock: IReactorTime | None = None, metrics: GatewayMetrics | None = None) -> None:
        #: Provides IReactorTCP, IReactorTime... (injected; tests pass fakes).
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        #: The one metrics registry; outlives reloads like everything here.
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        #: With workers, other processes read the metric files: batched
        #: updates are written every second, not only when this one collects.
        self._flusher: LoopingCall | None = None
        if multiprocess():
            self._flusher = LoopingCall(self.metrics.flush)
            self._flusher.clock = self.clock
            self._flusher.start(1.0, now=False)
        self._shared: dict[Hashable, Any] = {}
        #: Keys asked for while a generation is being built (see ``generation``).
        self._recording: set[Hashable] | None = None
        #: Retired objects waiting for their delayed stop.
        self._retiring: dict[int, tuple[Any, IDelayedCall]] = {}

    def shared(self, key: Hashable, build: Callable[[], T]) -> T:
        """The object stored under ``key``, built by ``build()`` the first time."""
        if self._recording is not None:
            self._recording.add(key)
        try:
            return self._shared[key]
        except KeyError:
            value = self._shared[key] = build()
            return value

    def generation(self, build: Callable[[], T]) -> tuple[T, frozenset[Hashable]]:
        """Run ``build()`` (a generation's construction) and return what it gave
        with the keys of the shared objects it asked for."""
        outer, self._recording = self._recording, set()
        try:
            value = build()
            used = frozenset(self._recording)
        finally:
            self._recording = outer
        return value, used

    def retire(self, old: frozenset[Hashable], new: frozenset[Hashable], delay: float) -> list[Hashable]:
        """Take out what generation ``old`` used and ``new`` does not; stop it after ``delay``.

        Until then the old generation's in-flight requests keep using it; a
        later generation asking for the same key builds a fresh one.
        """
        gone = [key for key in old - new if key in self._shared]
        for key in gone:
            value = self._shared.pop(key)
            if hasattr(value, "stop"):
                token = id(value)
                call = self.clock.callLater(delay, self._stop_retired, token)
                self._retiring[token] = (value, call)
        if gone:
            self.log.info("released {count} shared object(s) of the previous configuration", count=len(gone))
        return gone

    def _stop_retired(self, token: int) -> None:
        value, _ = self._retiring.pop(token)
        maybeDeferred(value.stop).addErrback(
            lambda failure: self.log.failure("stopping a retired {value!r} failed", failure, value=value)
        )

    def stop(self) -> Deferred[Any]:
        """Stop every shared object that has a ``stop()`` (connections, timers)."""
        if self._flusher is not None and self._flusher.running:
            self._flusher.stop()
            self.metrics.flush()
        values = list(self._shared.values())
        for value, call in self._retiring.values():
            if call.active():
                call.cancel()
            values.append(value)
        self._retiring.clear()
        self._shared.clear()
        stops = [maybeDeferred(value.stop) for value in values if hasattr(value, "stop")]
        return DeferredList(stops, consumeErrors=True)
