"""The gateway's Prometheus metrics: one registry, every name in one place.

Names follow Prometheus conventions with a ``txgateway_`` prefix.  Labels are
bounded by configuration, never by traffic: a route's *name* (``""`` for
requests no route matched), a method from a fixed set (others count as
``OTHER``), a status code, an upstream and instance from the config or
discovery, a protocol from a fixed set.  deploy/ (Grafana, alert rules) and
the dashboard use exactly these names.

One :class:`GatewayMetrics` lives in the :class:`~txgateway.runtime.Runtime`
and outlives reloads.  With ``server.workers > 1`` the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` for its workers and prometheus-client writes
every value to per-process files there; :func:`exposition` then reports the
whole process group from any worker.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

#: Seconds; from sub-millisecond gateway answers to long upstream calls.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: Methods counted under their own name; anything else is "OTHER".
METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)
_METHOD_BYTES = frozenset(m.encode("ascii") for m in METHODS)

#: The ``protocol`` label values: how the client talks to the gateway.
PROTOCOLS = ("http/1.1", "h2", "websocket")


def multiprocess() -> bool:
    """Whether values go to the shared multiprocess directory (workers > 1)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class GatewayMetrics:
    """Every metric the gateway exports, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry(auto_describe=True)
            if not multiprocess():
                # The process's own figures, as every Prometheus client exports
                # them: process_resident_memory_bytes, process_cpu_seconds_total,
                # process_open_fds..., and python_gc_collections_total by
                # generation.  Read at scrape time only.  With workers they
                # would describe whichever worker answers the scrape, so not then.
                ProcessCollector(registry=registry)
                GCCollector(registry=registry)
        self.registry = registry
        r = self.registry
        #: Batched children with updates not yet in their metric (see ``flush``).
        self._dirty: list[_Batched] = []
        #: The batched wrapper of each child (see ``batched_counter``).
        self._batched: dict[Any, _Batched] = {}
        # Registered before the metrics, so collected before them: every
        # collection (a scrape, the dashboard, a test's get_sample_value) flushes.
        r.register(_FlushFirst(self))

        # Requests at the edge.
        self.requests = Counter(
            "txgateway_requests",
            "Requests answered, by route name, method, status code and protocol.",
            ["route", "method", "code", "protocol"],
            registry=r,
        )
        self.request_duration = Histogram(
            "txgateway_request_duration_seconds",
            "Time from request head received to response end, by route, method and status code.",
            ["route", "method", "code"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.requests_in_flight = Gauge(
            "txgateway_requests_in_flight",
            "Requests being handled now, by protocol.",
            ["protocol"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.connections_open = Gauge(
            "txgateway_connections_open",
            "Open client connections, by protocol (http/1.1, h2, websocket).",
            ["protocol"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.request_bytes = Counter(
            "txgateway_request_bytes",
            "Request body bytes received from clients, by route.",
            ["route"],
            registry=r,
        )
        self.response_bytes = Counter(
            "txgateway_response_bytes",
            "Response body bytes sent to clients, by route.",
            ["route"],
            registry=r,
        )

        # Upstreams.
        self.upstream_duration = Histogram(
            "txgateway_upstream_request_duration_seconds",
            "Time from request sent upstream to response head received, by upstream and instance.",
            ["upstream", "address"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "txgateway_upstream_errors",
            "Failed upstream attempts, by upstream, instance and kind "
            "(connect, timeout, reset, protocol, status_5xx).",
            ["upstream", "address", "kind"],
            registry=r,
        )
        self.retries = Counter(
            "txgateway_retries",
            "Upstream attempts retried, by route and upstream.",
            ["route", "upstream"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "txgateway_circuit_breaker_state",
            "Circuit breaker state by upstream: 0 closed, 1 half-open, 2 open.",
            ["upstream"],
            multiprocess_mode="max",
            registry=r,
        )
        self.breaker_transitions = Counter(
            "txgateway_circuit_breaker_transitions",
            "Circuit breaker state changes, by upstream and the state entered (closed, half_open, open).",
            ["upstream", "state"],
            registry=r,
        )
        self.health_checks = Counter(
            "txgateway_health_checks",
            "Active health check probes, by upstream, instance and result (success, failure).",
            ["upstream", "address", "result"],
            registry=r,
        )
        self.instance_healthy = Gauge(
            "txgateway_upstream_instance_healthy",
            "1 while an upstream instance takes traffic, 0 while it is down or ejected.",
            ["upstream", "address"],
            multiprocess_mode="min",
            registry=r,
        )
        self.discovery_refreshes = Counter(
            "txgateway_discovery_refreshes",
            "Service discovery refreshes, by upstream, provider type and result (success, failure).",
            ["upstream", "type", "result"],
            registry=r,
        )
        self.discovery_instances = Gauge(
            "txgateway_discovery_instances",
            "Instances the last successful discovery refresh returned, by upstream.",
            ["upstream"],
            multiprocess_mode="max",
            registry=r,
        )

        # Pipeline decisions.
        self.ratelimit_decisions = Counter(
            "txgateway_ratelimit_decisions",
            "Rate-limit decisions, by route and decision (allowed, limited, storage_error).",
            ["route", "decision"],
            registry=r,
        )
        self.auth_failures = Counter(
            "txgateway_auth_failures",
            "Refused authentications, by route and reason code (missing_token, invalid_token, token_expired, "
            "malformed_token, invalid_api_key, insufficient_role, multiple_credentials, keys_unavailable, ...).",
            ["route", "reason"],
            registry=r,
        )
        self.cache_requests = Counter(
            "txgateway_cache_requests",
            "Response cache lookups, by route and result (hit, miss, bypass; stale is reserved: "
            "expired entries are never served, their lookup is a miss).",
            ["route", "result"],
            registry=r,
        )
        self.cache_served_bytes = Counter(
            "txgateway_cache_served_bytes",
            "Response body bytes served from the cache, by route.",
            ["route"],
            registry=r,
        )
        self.cache_stored_bytes = Gauge(
            "txgateway_cache_stored_bytes",
            "Bytes held by the in-memory response cache.",
            [],
            multiprocess_mode="livesum",
            registry=r,
        )

        # Protocol specifics.
        self.websocket_connections = Counter(
            "txgateway_websocket_connections",
            "WebSocket connections opened through the gateway, by route.",
            ["route"],
            registry=r,
        )
        self.websocket_open = Gauge(
            "txgateway_websocket_connections_open",
            "WebSocket connections open now, by route.",
            ["route"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.websocket_messages = Counter(
            "txgateway_websocket_messages",
            "WebSocket messages relayed, by route and direction (client_to_upstream, upstream_to_client).",
            ["route", "direction"],
            registry=r,
        )
        self.grpc_calls = Counter(
            "txgateway_grpc_calls",
            "gRPC calls answered, by route and grpc-status code.",
            ["route", "grpc_status"],
            registry=r,
        )

        # Configuration.
        self.config_reloads = Counter(
            "txgateway_config_reloads",
            "Configuration reload attempts, by result (success, failure).",
            ["result"],
            registry=r,
        )
        self.config_generation = Gauge(
            "txgateway_config_generation",
            "Generation number of the configuration serving traffic.",
            [],
            multiprocess_mode="max",
            registry=r,
        )
        self.config_last_reload_success = Gauge(
            "txgateway_config_last_reload_successful",
            "1 when the last reload attempt succeeded, 0 when it failed.",
            [],
            multiprocess_mode="min",
            registry=r,
        )

        # Children the protocols touch per request or connection, resolved once;
        # created up front so every protocol shows 0 rather than nothing.
        #: Per protocol: the ``requests_in_flight`` child.
        self.in_flight = {
            protocol: self.batched_gauge(self.requests_in_flight.labels(protocol)) for protocol in PROTOCOLS
        }
        #: Per protocol: the ``connections_open`` child.
        self.open_connections = {protocol: self.connections_open.labels(protocol) for protocol in PROTOCOLS}
        self._grpc_calls: dict[tuple[str, str], Any] = {}

    # Batching.  prometheus-client takes a lock for every update (it is built
    # for threads); the gateway updates from the reactor thread only, several
    # times per request.  The per-request metrics are therefore kept in plain
    # numbers and applied to their children when anything collects the
    # registry (a scrape, the dashboard, a test), or every second with
    # workers (multiprocess mode, where other processes read the files).

    #
    # One batched wrapper per child, whoever asks: every route's forwarder
    # asks for its upstream's duration child, and 10,000 routes must share one
    # wrapper (one place a request touches, one thing to flush) rather than
    # hold 10,000 copies.

    def batched_counter(self, child: Any) -> BatchedCounter:
        return self._batched_wrapper(child, BatchedCounter)

    def batched_gauge(self, child: Any) -> BatchedGauge:
        return self._batched_wrapper(child, BatchedGauge)

    def batched_histogram(self, child: Any) -> BatchedHistogram:
        return self._batched_wrapper(child, BatchedHistogram)

    def _batched_wrapper(self, child: Any, kind: type[_B]) -> _B:
        batched = self._batched.get(child)
        if batched is None:
            batched = self._batched[child] = kind(child, self._dirty)
        assert isinstance(batched, kind)
        return batched

    def flush(self) -> None:
        """Apply every batched update to its metric."""
        dirty = self._dirty
        while dirty:
            dirty.pop().flush()

    def prune(
        self, instances: Mapping[str, Collection[str]], breakers: Collection[str], discovered: Collection[str]
    ) -> None:
        """Drop the gauge series of what the running configuration no longer has.

        After a reload removed an upstream, an instance, a breaker or a
        discovery source, its last gauge value would stay exported for good,
        and an "instance down" or "breaker open" alert on it would never
        resolve.  ``instances`` maps each upstream to its instance addresses.
        Counters and histograms are left: they simply stop moving.  (With
        workers, prometheus-client cannot remove series; they stay.)
        """
        if multiprocess():
            return
        rules: list[tuple[Gauge, Callable[[dict[str, str]], bool]]] = [
            (
                self.instance_healthy,
                lambda labels: labels["address"] in instances.get(labels["upstream"], ()),
            ),
            (self.breaker_state, lambda labels: labels["upstream"] in breakers),
            (self.discovery_instances, lambda labels: labels["upstream"] in discovered),
        ]
        for gauge, keep in rules:
            names = gauge._labelnames
            for family in gauge.collect():
                for sample in family.samples:
                    if not keep(sample.labels):
                        try:
                            gauge.remove(*(sample.labels[name] for name in names))
                        except KeyError:
                            pass

    def grpc_call(self, route: str, grpc_status: str) -> None:
        """Count one answered gRPC call (children cached: one dict lookup)."""
        key = (route, grpc_status)
        child = self._grpc_calls.get(key)
        if child is None:
            child = self._grpc_calls[key] = self.grpc_calls.labels(route, grpc_status)
        child.inc()


class _FlushFirst:
    """A collector yielding nothing: collecting it flushes the batched updates."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> list[Metric]:
        self._metrics.flush()
        return []

    def describe(self) -> list[Metric]:
        return []


class _Batched:
    __slots__ = ("_child", "_dirty", "_pending")

    def __init__(self, child: Any, dirty: list[_Batched]) -> None:
        self._child = child
        self._dirty = dirty
        self._pending = False

    def _touch(self) -> None:
        self._pending = True
        self._dirty.append(self)

    def flush(self) -> None:
        raise NotImplementedError


_B = TypeVar("_B", bound=_Batched)


class BatchedCounter(_Batched):
    """A counter child's increments, applied at the next flush."""

    __slots__ = ("_amount",)

    def __init__(self, child: Any, dirty: list[_Batched]) -> None:
        super().__init__(child, dirty)
        self._amount = 0.0

    def inc(self, amount: float = 1) -> None:
        self._amount += amount
        if not self._pending:
            self._touch()

    def flush(self) -> None:
        self._pending = False
        amount, self._amount = self._amount, 0.0
        if amount:
            self._child.inc(amount)


class BatchedGauge(_Batched):
    """A gauge child's increments and decrements, applied at the next flush."""

    __slots__ = ("_delta",)

    def __init__(self, child: Any, dirty: list[_Batched]) -> None:
        super().__init__(child, dirty)
        self._delta = 0.0

    def inc(self, amount: float = 1) -> None:
        self._delta += amount
        if not self._pending:
            self._touch()

    def dec(self, amount: float = 1) -> None:
        self._delta -= amount
        if not self._pending:
            self._touch()

    def flush(self) -> None:
        self._pending = False
        delta, self._delta = self._delta, 0.0
        if delta:
            self._child.inc(delta)


#: Interned bucket bounds of the batched histograms.
_BOUNDS: dict[tuple[float, ...], tuple[float, ...]] = {}


class BatchedHistogram(_Batched):
    """A histogram child's observations, counted per bucket and applied at the next flush."""

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, child: Any, dirty: list[_Batched]) -> None:
        super().__init__(child, dirty)
        bounds = tuple(child._upper_bounds)
        #: The same bounds object for every child of a histogram (all share them).
        self._bounds = _BOUNDS.setdefault(bounds, bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        self._counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount
        if not self._pending:
            self._touch()

    def flush(self) -> None:
        self._pending = False
        child = self._child
        counts, self._counts = self._counts, [0] * len(self._bounds)
        total, self._sum = self._sum, 0.0
        # What Histogram.observe does per observation (count in the first
        # bucket whose bound holds it, add to the sum), once per bucket.
        child._sum.inc(total)
        buckets = child._buckets
        for index, count in enumerate(counts):
            if count:
                buckets[index].inc(count)


def method_bytes_label(method: bytes) -> bytes:
    """``method`` itself when it is in :data:`METHODS`, else ``b"OTHER"``: a bounded cache key."""
    return method if method in _METHOD_BYTES else b"OTHER"


def method_label(method: bytes) -> str:
    """The ``method`` label of a request method: bounded to :data:`METHODS`."""
    name = method.decode("latin-1")
    return name if name in METHODS else "OTHER"


def exposition(metrics: GatewayMetrics) -> bytes:
    """The text exposition for ``/metrics``: this process, or with workers the group."""
    metrics.flush()
    if multiprocess():
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(metrics.registry)
