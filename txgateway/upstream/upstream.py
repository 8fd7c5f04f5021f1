"""An upstream service: its instances, their health, its balancer and client.

``available`` is the list of instances that may take traffic, recomputed only
when health changes (``refresh``), never per request.  ``pick`` chooses among
the available instances not yet tried by this request; ``observe`` tells
passive outlier detection how an attempt went.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txgateway.config.model import UpstreamConfig
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

    def refresh(self) -> None:
        """Recompute ``available`` after a health change."""
        now = self.clock.seconds()
        available = [i for i in self.instances if i.available(now)]
        if available != self.available:
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
