"""What outlives one configuration generation: reactor, clock, shared state.

A reload builds a new :class:`~txgateway.gateway.Gateway` but keeps the
``Runtime``.  Middlewares keep anything that must survive a reload (JWKS key
caches, rate-limit buckets, Redis connections, upstream pools) in
:meth:`Runtime.shared` under a key derived from the config that owns it, so
an unchanged route keeps its buckets and a changed one starts fresh.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txgateway.observability.metrics import GatewayMetrics

T = TypeVar("T")


class Runtime:
    log = Logger()

    def __init__(self, reactor: Any, clock: IReactorTime | None = None, metrics: GatewayMetrics | None = None) -> None:
        #: Provides IReactorTCP, IReactorTime... (injected; tests pass fakes).
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        #: The one metrics registry; outlives reloads like everything here.
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        self._shared: dict[Hashable, Any] = {}

    def shared(self, key: Hashable, build: Callable[[], T]) -> T:
        """The object stored under ``key``, built by ``build()`` the first time."""
        try:
            return self._shared[key]
        except KeyError:
            value = self._shared[key] = build()
            return value

    def stop(self) -> Deferred[Any]:
        """Stop every shared object that has a ``stop()`` (connections, timers)."""
        stops = [maybeDeferred(value.stop) for value in self._shared.values() if hasattr(value, "stop")]
        self._shared.clear()
        return DeferredList(stops, consumeErrors=True)
