"""Service discovery: where an upstream's instances come from when it has no fixed ``servers``.

``upstreams.X.discovery.type`` names the provider; each is an
:class:`~txgateway.upstream.discovery.source.InstanceSource` that keeps the
instance set of the upstreams it feeds current through
:meth:`~txgateway.upstream.upstream.Upstream.set_instances`, the set the
balancers and the health checks use:

- ``dns`` (:mod:`.dns`): A/AAAA/SRV records, re-resolved every ``refresh``;
- ``kubernetes`` (:mod:`.kubernetes`): EndpointSlices, list + watch;
- ``consul`` (:mod:`.consul`): passing instances, blocking queries;
- ``etcd`` (:mod:`.etcd`): keys under a prefix, range + watch.

One source per upstream name and discovery config lives in
``Runtime.shared``: a reload that keeps the discovery keeps the source, and a
new generation's upstream gets the last known instances at once.  Before the
first answer an upstream has its configured ``servers`` (usually none: 503).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

from txgateway.config.model import DiscoveryConfig, UpstreamConfig
from txgateway.upstream.discovery.source import IInstanceSource, InstanceSource

if TYPE_CHECKING:
    from txgateway.runtime import Runtime

__all__ = ["IInstanceSource", "InstanceSource", "source_for", "source_key"]


def source_key(upstream: UpstreamConfig) -> Hashable:
    """The ``Runtime.shared`` key of ``upstream``'s source: one per upstream name and discovery
    config, so a reload that changes other settings of the upstream keeps it.  Tests register
    a source with a stub registry under it before building the gateway."""
    return ("upstream-discovery", upstream.name, upstream.discovery)


def source_for(upstream: str, config: DiscoveryConfig, runtime: Runtime) -> InstanceSource:
    """The provider ``config.type`` names for upstream ``upstream``, not started.

    Building one does no I/O: the network (resolver, HTTP pool) is set up by
    ``start()``, on ``runtime.reactor``.
    """
    if config.type == "dns":
        from txgateway.upstream.discovery.dns import DNSSource

        return DNSSource(upstream, config, runtime.clock, runtime.metrics, reactor=runtime.reactor)
    if config.type == "kubernetes":
        from txgateway.upstream.discovery.kubernetes import KubernetesSource

        return KubernetesSource(upstream, config, runtime.clock, runtime.metrics, reactor=runtime.reactor)
    if config.type == "consul":
        from txgateway.upstream.discovery.consul import ConsulSource

        return ConsulSource(upstream, config, runtime.clock, runtime.metrics, reactor=runtime.reactor)
    if config.type == "etcd":
        from txgateway.upstream.discovery.etcd import EtcdSource

        return EtcdSource(upstream, config, runtime.clock, runtime.metrics, reactor=runtime.reactor)
    raise ValueError(f"upstream {upstream!r}: unknown discovery type {config.type!r}")
