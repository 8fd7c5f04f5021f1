"""``discovery.type: dns``: A, AAAA or SRV records, resolved with twisted.names.

- ``record_type: A`` / ``AAAA``: every address of ``name`` is an instance on
  ``port``.
- ``record_type: SRV`` (the default when ``name`` looks like
  ``_service._proto.domain``): every target of the lowest priority is an
  instance on the record's port, weighted by the record's weight (0 counts
  as 1); each target's addresses come from the answer's additional section
  or, failing that, from an A (then AAAA) lookup of the target.

The name is resolved again every ``refresh`` seconds, sooner when the records'
TTL runs out first (never more often than every second).  ``resolver: ip:port``
asks that DNS server only; without it the nameservers of /etc/resolv.conf are
asked, after /etc/hosts (so ``localhost`` works).  Names are looked up as
written: give the fully qualified name (``users.shop.svc.cluster.local``),
search domains are not applied.

Failures (timeouts, SERVFAIL, NXDOMAIN) keep the last known instances and are
retried with a backoff of at most ``refresh``.  An answer with no usable
record also keeps them while there are some: an empty DNS answer more often
means a registry hiccup than a service gone; before the first answer it
leaves the upstream without instances (503).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.names import client, dns, hosts, resolve
from twisted.names.error import DNSNameError, DNSServerError, DomainError
from twisted.python.failure import Failure

from txgateway.config.model import DiscoveryConfig, UpstreamServer
from txgateway.observability.metrics import GatewayMetrics
from txgateway.upstream.discovery.source import InstanceSource

__all__ = ["DNSSource", "system_resolver"]

#: Per-try timeouts of one DNS query (resent on each): a lost server fails a lookup in 3 s.
QUERY_TIMEOUT = (1, 2)
#: Never resolve more often than this, whatever the TTL.
MIN_REFRESH = 1.0

RESOLV_CONF = "/etc/resolv.conf"
HOSTS = b"/etc/hosts"


def nameservers(path: str = RESOLV_CONF) -> list[tuple[str, int]]:
    """The ``nameserver`` lines of a resolv.conf(5) file; 127.0.0.1 when there are none."""
    servers = []
    try:
        with open(path) as file:
            for line in file:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    servers.append((fields[1].partition("%")[0], 53))
    except OSError:
        pass
    return servers or [("127.0.0.1", 53)]


def system_resolver(reactor: Any, resolver: str | None = None) -> IResolver:
    """The resolver ``discovery.resolver`` asks for: that server (``ip:port``), else /etc/hosts
    then the nameservers of /etc/resolv.conf (read once, here)."""
    if resolver is not None:
        host, _, port = resolver.rpartition(":")
        dns_client = client.Resolver(servers=[(host.strip("[]"), int(port))], reactor=reactor)
        result: IResolver = dns_client
        return result
    chain: IResolver = resolve.ResolverChain(
        [hosts.Resolver(file=HOSTS), client.Resolver(servers=nameservers(), reactor=reactor)]
    )
    return chain


class DNSSource(InstanceSource):
    kind = "dns"

    def __init__(
        self,
        upstream: str,
        config: DiscoveryConfig,
        clock: IReactorTime,
        metrics: GatewayMetrics | None = None,
        *,
        resolver: IResolver | None = None,
        reactor: Any = None,
    ) -> None:
        """``resolver`` answers the lookups (tests pass one); without it one is made at
        ``start()`` on ``reactor`` as :func:`system_resolver` says."""
        super().__init__(upstream, config, clock, metrics)
        #: An IResolver (its stubs type the answers wrongly, hence Any).
        self._resolver: Any = resolver
        self._reactor = reactor
        self.record_type = str(config.options.get("record_type") or "A")
        self._pending: Deferred[None] | None = None
        self._settled: list[Deferred[None]] = []

    def _begin(self) -> None:
        if self._resolver is None:
            try:
                self._resolver = system_resolver(self._reactor, _optional_str(self.config.options.get("resolver")))
            except Exception as error:  # noqa: BLE001 - e.g. no usable nameserver: an outage, retried
                self._lost(f"no resolver: {error}")
                self._later(self._retry_delay(), self._begin)
                return
        self._resolve()

    def _halt(self) -> Deferred[None]:
        # twisted.names lookups cannot be cancelled: wait for the one in
        # flight (at most the query timeout), so nothing outlives the stop.
        if self._pending is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._settled.append(d)
        return d

    def _resolve(self) -> None:
        if self._pending is not None:
            return
        d = maybeDeferred(self._lookup)
        pending = self._pending = d.addCallbacks(self._answered, self._failed)
        pending.addBoth(self._done)

    def _done(self, result: object) -> None:
        if isinstance(result, Failure):
            self.log.failure("dns discovery of upstream {upstream} broke", result, upstream=self.upstream)
        self._pending = None
        settled, self._settled = self._settled, []
        for d in settled:
            d.callback(None)

    def _lookup(self) -> Deferred[Any]:
        assert self._resolver is not None
        name = self.config.name
        lookup: Deferred[Any]
        if self.record_type == "SRV":
            lookup = self._resolver.lookupService(name, QUERY_TIMEOUT)
            return lookup.addCallback(self._services)
        if self.record_type == "AAAA":
            lookup = self._resolver.lookupIPV6Address(name, QUERY_TIMEOUT)
        else:
            lookup = self._resolver.lookupAddress(name, QUERY_TIMEOUT)
        port = self.config.port or 0
        return lookup.addCallback(lambda result: _addresses(name, result[0], port, 1))

    def _services(self, result: tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]) -> Any:
        answers, _, additional = result
        records: list[tuple[float, dns.Record_SRV]] = []
        for answer in answers:
            payload = answer.payload
            if isinstance(payload, dns.Record_SRV) and str(payload.target) not in ("", "."):
                records.append((answer.ttl, payload))
        if not records:
            return [], _ttl(answers)
        best = min(srv.priority for _, srv in records)
        lookups: list[Deferred[tuple[list[UpstreamServer], float]]] = []
        for ttl, srv in records:
            if srv.priority != best:
                continue
            target = str(srv.target)
            port, weight = srv.port, max(1, srv.weight)
            known = [r for r in additional if r.type in (dns.A, dns.AAAA) and str(r.name) == target]
            if known:
                lookups.append(succeed(_addresses(target, known, port, weight, ttl)))
            else:
                lookups.append(self._target(target, port, weight, ttl))
        return _gather(lookups, _ttl(answers))

    def _target(self, target: str, port: int, weight: int, ttl: float) -> Deferred[tuple[list[UpstreamServer], float]]:
        assert self._resolver is not None
        resolver = self._resolver

        def ipv6(failure: Failure) -> Deferred[Any]:
            return resolver.lookupIPV6Address(target, QUERY_TIMEOUT)

        def empty_then_ipv6(result: Any) -> Any:
            if not any(r.type == dns.A for r in result[0]):
                return resolver.lookupIPV6Address(target, QUERY_TIMEOUT)
            return result

        d: Deferred[Any] = resolver.lookupAddress(target, QUERY_TIMEOUT)
        d.addCallbacks(empty_then_ipv6, ipv6)
        return d.addCallback(lambda result: _addresses(target, result[0], port, weight, ttl))

    def _answered(self, result: tuple[list[UpstreamServer], float]) -> None:
        servers, ttl = result
        if not self.running:
            return
        if not servers and self.servers:
            self._lost(f"no {self.record_type} records for {self.config.name}")
            self._later(self._retry_delay(), self._resolve)
            return
        self._found(servers)
        self._later(min(self.config.refresh, max(ttl, MIN_REFRESH)), self._resolve)

    def _failed(self, failure: Failure) -> None:
        if not self.running:
            return
        self._lost(_reason(failure, self.config.name))
        self._later(self._retry_delay(), self._resolve)


def _addresses(
    name: str, records: Sequence[dns.RRHeader], port: int, weight: int, ttl: float | None = None
) -> tuple[list[UpstreamServer], float]:
    """Instances of the A/AAAA records of ``name`` in ``records`` (CNAMEs followed by the resolver)."""
    servers: list[UpstreamServer] = []
    for record in records:
        payload = record.payload
        if isinstance(payload, dns.Record_A):
            servers.append(UpstreamServer(payload.dottedQuad(), port, weight))
        elif isinstance(payload, dns.Record_AAAA):
            servers.append(UpstreamServer(socket.inet_ntop(socket.AF_INET6, payload.address), port, weight))
    lowest = _ttl(records)
    return servers, lowest if ttl is None else min(ttl, lowest)


def _ttl(records: Sequence[dns.RRHeader]) -> float:
    ttls = [record.ttl for record in records]
    return float(min(ttls)) if ttls else float("inf")


def _gather(
    lookups: list[Deferred[tuple[list[UpstreamServer], float]]], ttl: float
) -> Deferred[tuple[list[UpstreamServer], float]]:
    """All targets' instances; a target that does not resolve is left out, unless none does."""

    def combine(results: list[tuple[bool, Any]]) -> tuple[list[UpstreamServer], float]:
        servers: list[UpstreamServer] = []
        lowest = ttl
        failures = [value for ok, value in results if not ok]
        if failures and len(failures) == len(results):
            failures[0].raiseException()
        for ok, value in results:
            if ok:
                servers.extend(value[0])
                lowest = min(lowest, value[1])
        return servers, lowest

    return DeferredList(lookups, consumeErrors=True).addCallback(combine)


def _reason(failure: Failure, name: str) -> str:
    if failure.check(DNSServerError):
        return f"{name}: server failure"
    if failure.check(DNSNameError, DomainError):
        return f"{name}: no such name"
    if failure.check(DeferredTimeout, dns.DNSQueryTimeoutError):
        return f"{name}: timed out"
    message = failure.getErrorMessage()
    return f"{name}: {failure.type.__name__}: {message}" if message else f"{name}: {failure.type.__name__}"  # type: ignore[union-attr]


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)
