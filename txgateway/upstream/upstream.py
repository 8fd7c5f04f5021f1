"""An upstream service: its instances, their health, its balancer and client.

``available`` is the list of instances that may take traffic, recomputed only
when health changes (``refresh``), never per request.  ``pick`` chooses among
the available instances not yet tried by this request; ``observe`` tells
passive outlier detection how an attempt went.

The instances are the configured ``servers`` until service discovery replaces
them (``set_instances``): an address that stays keeps its :class:`Instance`,
and with it its health, ejection and in-flight count.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txgateway.config.model import UpstreamConfig, UpstreamServer
from txgateway.errors import ServiceUnavailable
from txgateway.interfaces import IUpstreamClient
from txgateway.pipeline.context import RequestContext
from txgateway.upstream.balancer import balancer_for
from txgateway.upstream.breaker import CircuitBreaker
from txgateway.upstream.instance import Instance
from txgateway.upstream.retry import RetryBudget, RetryPolicy


class Observer(Protocol):
    """Passive health: told the outcome of every attempt."""

    def observe(self, instance: Instance, failure: str | None) -> None:
        """``failure`` is None for success, else "connect_error", "timeout", "reset", "5xx"..."""


class Upstream:
    log = Logger()

    def __init__(self, config: UpstreamConfig, client: IUpstreamClient, clock: IReactorTime) -> None:
        self.name = config.name
        self.config = config
        self.client = client
        self.clock = clock
        self.instances: list[Instance] = [Instance(s.host, s.port, s.weight) for s in config.servers]
        self.available: list[Instance] = list(self.instances)
        self._balancer = balancer_for(config, self.instances)
        self.retry = RetryPolicy(config.retry)
        self.retry_budget = RetryBudget(config.retry.budget_ratio)
        self.breaker = (
            CircuitBreaker(config.name, config.circuit_breaker, clock) if config.circuit_breaker is not None else None
        )
        #: Passive outlier detection, set by the health module when configured.
        self.observer: Observer | None = None
        #: Called after ``available`` changes (readiness, metrics).
        self.on_change: list[Callable[[Upstream], None]] = []
        #: Called with (added, removed) when discovery changes the instance set,
        #: before ``available`` is recomputed (health checks start and stop probes).
        self.on_instances: list[Callable[[Sequence[Instance], Sequence[Instance]], None]] = []

    def set_instances(self, servers: Iterable[UpstreamServer]) -> bool:
        """Make ``servers`` the instance set (service discovery); False when nothing changed.

        An address already known keeps its :class:`Instance` (health, ejection,
        in-flight count; the client's pool is per address, so its connections
        too); a new one starts healthy, like a configured server at start; a
        removed one leaves the balancer at once, while the requests already
        sent to it finish on the Instance they hold.  The balancer is rebuilt
        over the new set (the consistent-hash ring places points by address,
        so only the keys of instances that came or went move).  A repeated
        address is kept once, with its first weight.
        """
        known = {instance.address: instance for instance in self.instances}
        instances: list[Instance] = []
        seen: set[str] = set()
        reweighted = False
        for server in servers:
            address = server.address
            if address in seen:
                continue
            seen.add(address)
            instance = known.get(address)
            if instance is None:
                instance = Instance(server.host, server.port, server.weight)
            elif instance.weight != server.weight:
                instance.weight = server.weight
                reweighted = True
            instances.append(instance)
        added = [i for i in instances if i.address not in known]
        removed = [i for i in self.instances if i.address not in seen]
        if not added and not removed and not reweighted and instances == self.instances:
            return False
        self.instances = instances
        self._balancer = balancer_for(self.config, instances)
        self.log.info(
            "upstream {upstream}: {count} instances, added {added}, removed {removed}",
            upstream=self.name,
            count=len(instances),
            added=_listed(added),
            removed=_listed(removed),
        )
        for callback in self.on_instances:
            callback(added, removed)
        self.refresh(changed=True)
        return True

    def refresh(self, changed: bool = False) -> None:
        """Recompute ``available`` after a health change (``changed``: the instance set changed)."""
        now = self.clock.seconds()
        available = [i for i in self.instances if i.available(now)]
        if changed or available != self.available:
            self.available = available
            self.log.info(
                "upstream {upstream}: {count}/{total} instances available",
                upstream=self.name,
                count=len(available),
                total=len(self.instances),
            )
            for callback in self.on_change:
                callback(self)

    def pick(self, ctx: RequestContext, tried: Collection[Instance] = ()) -> Instance:
        """An available instance, preferring one not in ``tried``; 503 when none is available."""
        available = self.available
        if not available:
            if not self.instances:
                raise ServiceUnavailable(f"upstream '{self.name}' has no servers")
            raise ServiceUnavailable(f"upstream '{self.name}' has no healthy servers")
        if tried:
            untried = [i for i in available if i not in tried]
            if untried:
                return self._balancer.pick(untried, ctx)
        return self._balancer.pick(available, ctx)

    def observe(self, instance: Instance, failure: str | None) -> None:
        observer = self.observer
        if observer is not None:
            observer.observe(instance, failure)

    def state(self) -> dict[str, object]:
        now = self.clock.seconds()
        return {
            "name": self.name,
            "available": len(self.available),
            "instances": [i.state(now) for i in self.instances],
        }


def _listed(instances: Sequence[Instance], most: int = 10) -> str:
    """Addresses for a log line, at most ``most`` of them."""
    shown = ", ".join(i.address for i in instances[:most])
    more = len(instances) - most
    return f"[{shown}{f', and {more} more' if more > 0 else ''}]"
