"""``discovery.type: consul``: a service's passing instances, by blocking queries.

``GET /v1/health/service/<name>?passing=true`` lists the service's instances
whose every check passes.  The first query answers at once; each next one is
a blocking query (``index=<X-Consul-Index>&wait=5m``) that Consul holds until
the set changes or the wait ends, so a change reaches the gateway within
milliseconds without polling.  As Consul asks of its clients, the index is
reset when it goes backwards, and a query that comes back within a second
with nothing changed is not repeated for a second.

``datacenter`` (``dc=``), ``tag`` (only instances with that tag) and ``token``
(``X-Consul-Token``; ACLs) are optional.  An instance's address is its
service address, else its node's; its port the registered service port
(``port`` only when the service registered none); its weight the service's
``Weights.Passing``.  An empty answer is an answer: no instance passes, the
upstream has none (503).  Failures keep the last known instances and are
retried with a backoff of at most ``refresh`` seconds.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from txgateway.config.model import DiscoveryConfig, UpstreamServer
from txgateway.observability.metrics import GatewayMetrics
from txgateway.upstream.discovery._http import APIError, RegistryClient, Reply, failure_reason
from txgateway.upstream.discovery.source import InstanceSource

__all__ = ["ConsulSource", "service_servers"]

#: Seconds Consul may hold a blocking query.
BLOCKING_WAIT = 300
#: Seconds for a non-blocking query; a blocking one gets the wait on top,
#: plus the up to wait/16 of jitter Consul adds.
REQUEST_TIMEOUT = 30.0
#: A query answered sooner than this with the index unchanged is repeated only after this.
MIN_INTERVAL = 1.0


class ConsulSource(InstanceSource):
    kind = "consul"

    def __init__(
        self,
        upstream: str,
        config: DiscoveryConfig,
        clock: IReactorTime,
        metrics: GatewayMetrics | None = None,
        *,
        reactor: Any = None,
    ) -> None:
        super().__init__(upstream, config, clock, metrics)
        self._reactor = reactor
        options = config.options
        self.url = str(options.get("url") or "http://127.0.0.1:8500").rstrip("/")
        self.datacenter = options.get("datacenter")
        self.tag = options.get("tag")
        self.token = options.get("token")
        #: The X-Consul-Index the next query blocks on (0: answer at once).
        self.index = 0
        self._client: RegistryClient | None = None
        self._call: Deferred[Any] | None = None
        self._asked = 0.0

    def _begin(self) -> None:
        if self._client is None:
            self._client = RegistryClient(self._reactor, self.clock)
        self.index = 0
        self._query()

    def _halt(self) -> Deferred[None]:
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        client, self._client = self._client, None
        return client.close() if client is not None else succeed(None)

    def query_url(self) -> str:
        query: dict[str, str] = {"passing": "true"}
        if self.index > 0:
            query["index"] = str(self.index)
            query["wait"] = f"{BLOCKING_WAIT}s"
        if self.datacenter is not None:
            query["dc"] = str(self.datacenter)
        if self.tag is not None:
            query["tag"] = str(self.tag)
        return f"{self.url}/v1/health/service/{quote(self.config.name, safe='')}?{urlencode(query)}"

    def _query(self) -> None:
        if not self.running or self._client is None:
            return
        headers = {"x-consul-token": str(self.token)} if self.token is not None else {}
        timeout = REQUEST_TIMEOUT + (BLOCKING_WAIT * 17 / 16 if self.index > 0 else 0)
        self._asked = self.clock.seconds()
        d = self._call = self._client.document("GET", self.query_url(), headers=headers, timeout=timeout)
        d.addCallback(self._answered).addErrback(self._failed)

    def _answered(self, reply: Reply) -> None:
        if not self.running:
            return
        if reply.status != 200 or not isinstance(reply.document, list):
            detail = f": {reply.document}" if isinstance(reply.document, str) else ""
            raise APIError(f"HTTP {reply.status}{detail}", reply.status)
        try:
            index = int(reply.header("x-consul-index") or 0)
        except ValueError:
            index = 0
        previous = self.index
        self._found(service_servers(reply.document, self.config.port))
        if index < previous:
            index = 0  # Consul's index went backwards (a restored snapshot): start over
        elif index < 1:
            index = 1
        self.index = index
        quick = self.clock.seconds() - self._asked < MIN_INTERVAL
        self._later(MIN_INTERVAL if quick and index == previous else 0.0, self._query)

    def _failed(self, failure: Failure) -> None:
        if not self.running:
            return
        self._lost(failure_reason(failure))
        self.index = 0
        self._later(self._retry_delay(), self._query)


def service_servers(entries: list[Any], port: int | None = None) -> list[UpstreamServer]:
    """The instances of a ``/v1/health/service`` answer."""
    servers = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        service = entry.get("Service") or {}
        node = entry.get("Node") or {}
        address = service.get("Address") or node.get("Address")
        number = service.get("Port") or port
        if not address or not isinstance(number, int) or not 0 < number < 65536:
            continue
        weights = service.get("Weights") or {}
        passing = weights.get("Passing")
        weight = passing if isinstance(passing, int) and passing > 0 else 1
        servers.append(UpstreamServer(str(address), number, weight))
    return servers
