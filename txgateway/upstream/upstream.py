"""An upstream service: its instances, its balancer and its client."""

from __future__ import annotations

from txgateway.config.model import UpstreamConfig
from txgateway.errors import ServiceUnavailable
from txgateway.interfaces import IUpstreamClient
from txgateway.pipeline.context import RequestContext
from txgateway.upstream.balancer import balancer_for
from txgateway.upstream.instance import Instance


class Upstream:
    """Picks the instance for a request; raises 503 when there is none."""

    def __init__(self, config: UpstreamConfig, client: IUpstreamClient) -> None:
        self.name = config.name
        self.config = config
        self.client = client
        self.instances: list[Instance] = [Instance(s.host, s.port, s.weight) for s in config.servers]
        self._balancer = balancer_for(config.load_balancer)

    def pick(self, ctx: RequestContext) -> Instance:
        instances = self.instances
        if not instances:
            raise ServiceUnavailable(f"upstream '{self.name}' has no servers")
        return self._balancer.pick(instances, ctx)
