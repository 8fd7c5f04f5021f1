"""What every discovery provider shares: feeding upstreams, outages, metrics.

A provider (DNS, Kubernetes, Consul, etcd) is an :class:`InstanceSource`
subclass.  It implements ``_begin()`` (start asking, on ``start()``) and
``_halt()`` (stop asking, on ``stop()``) and reports what it learns with
``_found(servers)`` (a complete answer: the instance set as it is now) or
``_lost(reason)`` (the registry could not be asked or made no sense).

The source promises:

- every upstream it feeds (:meth:`InstanceSource.feed`) gets each new answer
  through :meth:`Upstream.set_instances`, and gets the last known answer at
  once when it starts being fed (a reloaded upstream does not wait);
- an outage keeps the last known instances; it is logged once when it starts
  and once when it ends, not on every failed attempt;
- ``txgateway_discovery_refreshes{upstream,type,result}`` counts each answer
  (``success``) and each failed attempt (``failure``);
  ``txgateway_discovery_instances{upstream}`` is the size of the last answer.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import Interface, implementer

from txgateway.config.model import DiscoveryConfig, UpstreamServer
from txgateway.observability.metrics import GatewayMetrics

if TYPE_CHECKING:
    from txgateway.upstream.upstream import Upstream

__all__ = ["FIRST_RETRY", "IInstanceSource", "InstanceSource"]

#: Seconds before the first retry after a failure; doubled per failure in a
#: row, up to the discovery's ``refresh``.
FIRST_RETRY = 0.5


class IInstanceSource(Interface):
    """Where an upstream's instances come from, kept current while it runs."""

    def feed(upstream: Upstream) -> None:
        """Keep ``upstream``'s instances to this source's answers (the last known one at once)."""

    def start() -> None:
        """Start asking the registry; again after ``stop()`` is fine."""

    def stop() -> Deferred[None]:
        """Stop asking; fires once nothing of it is left running."""


@implementer(IInstanceSource)
class InstanceSource:
    log = Logger()

    #: The provider's ``discovery.type``, for logs and metrics.
    kind: ClassVar[str] = ""

    def __init__(
        self, upstream: str, config: DiscoveryConfig, clock: IReactorTime, metrics: GatewayMetrics | None = None
    ) -> None:
        #: The name of the upstream this source discovers (several generations may be fed).
        self.upstream = upstream
        self.config = config
        self.clock = clock
        #: The last answer (sorted by address), None until the first.
        self.servers: tuple[UpstreamServer, ...] | None = None
        self.running = False
        #: When the current outage started (None: not in one).
        self.failing_since: float | None = None
        #: Failed attempts in a row.
        self.failures = 0
        self._targets: weakref.WeakSet[Upstream] = weakref.WeakSet()
        self._timer: IDelayedCall | None = None
        metrics = metrics if metrics is not None else GatewayMetrics()
        self._refreshed = metrics.discovery_refreshes.labels(upstream, self.kind, "success")
        self._refresh_failed = metrics.discovery_refreshes.labels(upstream, self.kind, "failure")
        self._count = metrics.discovery_instances.labels(upstream)

    def feed(self, upstream: Upstream) -> None:
        self._targets.add(upstream)
        if self.servers is not None:
            upstream.set_instances(self.servers)

    def start(self) -> None:
        if self.running:
            return
        self.running = True
        self.log.info(
            "discovering upstream {upstream} instances by {type} ({name})",
            upstream=self.upstream,
            type=self.kind,
            name=self.config.name,
        )
        self._begin()

    def stop(self) -> Deferred[None]:
        if not self.running:
            return succeed(None)
        self.running = False
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        return self._halt()

    # -- for providers ------------------------------------------------------

    def _begin(self) -> None:
        raise NotImplementedError

    def _halt(self) -> Deferred[None]:
        """Stop whatever request or stream is going; fire once it has ended."""
        raise NotImplementedError

    def _found(self, servers: Sequence[UpstreamServer]) -> None:
        """A complete answer: the instances are these, now."""
        if not self.running:
            return
        answer = tuple(sorted(set(servers), key=_order))
        self._refreshed.inc()
        self._count.set(len(answer))
        self.failures = 0
        if self.failing_since is not None:
            self.log.info(
                "discovery of upstream {upstream} ({type}) recovered after {seconds:.1f}s: {count} instances",
                upstream=self.upstream,
                type=self.kind,
                seconds=self.clock.seconds() - self.failing_since,
                count=len(answer),
            )
            self.failing_since = None
        if answer == self.servers:
            return
        if not answer:
            self.log.warn(
                "discovery of upstream {upstream} ({type}, {name}) found no instances",
                upstream=self.upstream,
                type=self.kind,
                name=self.config.name,
            )
        self.servers = answer
        for upstream in list(self._targets):
            upstream.set_instances(answer)

    def _lost(self, reason: str) -> None:
        """An attempt failed: keep the last known instances, log if an outage starts."""
        if not self.running:
            return
        self._refresh_failed.inc()
        self.failures += 1
        if self.failing_since is None:
            self.failing_since = self.clock.seconds()
            kept = len(self.servers) if self.servers is not None else 0
            self.log.warn(
                "discovery of upstream {upstream} ({type}, {name}) failing, keeping the {kept} last known"
                " instances: {reason}",
                upstream=self.upstream,
                type=self.kind,
                name=self.config.name,
                kept=kept,
                reason=reason,
            )

    def _retry_delay(self) -> float:
        """Seconds before the next attempt after ``failures`` failures in a row."""
        exponent = min(max(self.failures - 1, 0), 30)
        return min(self.config.refresh, FIRST_RETRY * 2.0**exponent)

    def _later(self, delay: float, call: Callable[..., Any], *args: object) -> None:
        """Call ``call(*args)`` after ``delay`` seconds unless stopped first (one pending call at a time)."""
        if not self.running:
            return
        previous = self._timer
        if previous is not None and previous.active():
            previous.cancel()
        self._timer = self.clock.callLater(max(0.0, delay), self._fire, call, args)

    def _fire(self, call: Callable[..., Any], args: tuple[object, ...]) -> None:
        self._timer = None
        if self.running:
            call(*args)


def _order(server: UpstreamServer) -> tuple[str, int, int]:
    return (server.host, server.port, server.weight)
