"""Load balancers: which instance of an upstream serves the next request.

Only round robin exists yet; weighted, least-connections, consistent-hash and
power-of-two-choices arrive with the resilience work, each behind the same
``pick`` so the forwarder never knows which one it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from txgateway.pipeline.context import RequestContext
from txgateway.upstream.instance import Instance


class Balancer(Protocol):
    def pick(self, instances: Sequence[Instance], ctx: RequestContext) -> Instance: ...


class RoundRobin:
    """Each instance in turn; ``instances`` must be non-empty."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, instances: Sequence[Instance], ctx: RequestContext) -> Instance:
        index = self._next % len(instances)
        self._next = index + 1
        return instances[index]


def balancer_for(name: str) -> Balancer:
    """The balancer a config names; unknown names were rejected at load."""
    if name == "round_robin":
        return RoundRobin()
    # The other algorithms are validated config but not yet built: fall back
    # to round robin rather than refuse a valid file.
    return RoundRobin()
