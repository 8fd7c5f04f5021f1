"""Live request rate, error rate and p99 per route, for the dashboard.

A :class:`TrafficSampler` reads the request counters and duration buckets
(``txgateway_requests_total``, ``txgateway_request_duration_seconds``) every
``interval`` seconds and keeps the snapshots of the last ``window`` seconds;
rates are the difference between the newest and the oldest one, as
Prometheus's ``rate()`` and ``histogram_quantile()`` would compute them.  The
per-request path pays nothing, and the sampler only runs while someone
watches: the first ``/admin/stats`` request starts it (rates appear one
interval later), and it stops ``idle`` seconds after the last one.  Reading
the registry costs time in proportion to the routes (about 2 s per sample
with 10,000 routes that all had traffic, measured in bench/suite.py row 4),
which a gateway nobody looks at should not pay.

It reads the samples the way the exposition does, so with ``server.workers
> 1`` (prometheus-client's multiprocess mode) the rates are the whole
process group's.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from txgateway.control import GatewayControl
from txgateway.observability.metrics import GatewayMetrics, multiprocess

REQUESTS = "txgateway_requests"
DURATION = "txgateway_request_duration_seconds"


@dataclass(frozen=True, slots=True)
class RouteTotals:
    """One route's counters at one moment, summed over method, code and protocol."""

    requests: float = 0.0
    errors: float = 0.0
    #: Cumulative duration bucket counts by upper bound (``math.inf`` last).
    buckets: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True, slots=True)
class RouteTraffic:
    """One route over the sampler's window."""

    #: Requests answered per second.
    request_rate: float
    #: Share of those answered with a 5xx (0..1); None without requests.
    error_rate: float | None
    #: 99th percentile of the request duration in seconds; None without requests.
    p99: float | None
    requests: float

    def as_json(self) -> dict[str, object]:
        return {
            "request_rate": round(self.request_rate, 3),
            "error_rate": None if self.error_rate is None else round(self.error_rate, 4),
            "p99": None if self.p99 is None else round(self.p99, 6),
            "requests": round(self.requests),
        }


def _families(metrics: GatewayMetrics) -> Iterable[Metric]:
    metrics.flush()  # the batched per-request updates first
    if multiprocess():
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return registry.collect()
    return [*metrics.requests.collect(), *metrics.request_duration.collect()]


def read_totals(metrics: GatewayMetrics) -> dict[str, RouteTotals]:
    """Every route's request counters and duration buckets now."""
    requests: dict[str, float] = {}
    errors: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for family in _families(metrics):
        if family.name == REQUESTS:
            for sample in family.samples:
                if sample.name != REQUESTS + "_total":
                    continue
                route = sample.labels.get("route", "")
                requests[route] = requests.get(route, 0.0) + sample.value
                if sample.labels.get("code", "").startswith("5"):
                    errors[route] = errors.get(route, 0.0) + sample.value
        elif family.name == DURATION:
            for sample in family.samples:
                if sample.name != DURATION + "_bucket":
                    continue
                route = sample.labels.get("route", "")
                bound = float(sample.labels["le"])
                per_route = buckets.setdefault(route, {})
                per_route[bound] = per_route.get(bound, 0.0) + sample.value
    return {
        route: RouteTotals(
            requests.get(route, 0.0),
            errors.get(route, 0.0),
            tuple(sorted(buckets.get(route, {}).items())),
        )
        for route in requests.keys() | buckets.keys()
    }


def quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """``histogram_quantile(q, ...)`` of cumulative ``(upper bound, count)`` buckets.

    Linear interpolation inside the bucket holding the rank, from 0 for the
    first one; the highest finite bound when the rank is in ``+Inf``.
    """
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _increase(new: float, old: float) -> float:
    """A counter's increase; a smaller value means it restarted from zero."""
    return new - old if new >= old else new


def traffic_between(old: RouteTotals | None, new: RouteTotals, seconds: float) -> RouteTraffic:
    old = old or RouteTotals()
    requests = _increase(new.requests, old.requests)
    errors = _increase(new.errors, old.errors)
    before = dict(old.buckets)
    increase = [(bound, _increase(count, before.get(bound, 0.0))) for bound, count in new.buckets]
    return RouteTraffic(
        request_rate=requests / seconds if seconds > 0 else 0.0,
        error_rate=errors / requests if requests > 0 else None,
        p99=quantile(0.99, increase) if requests > 0 else None,
        requests=requests,
    )


class TrafficSampler:
    """Snapshots of the request metrics every ``interval`` seconds on ``clock``."""

    log = Logger()

    def __init__(
        self,
        control: GatewayControl,
        clock: IReactorTime,
        interval: float = 2.0,
        window: float = 15.0,
        idle: float = 60.0,
    ) -> None:
        self._control = control
        self._clock = clock
        self.interval = interval
        self.window = window
        #: Sampling stops this long after the last ``watch()``.
        self.idle = idle
        self._watched = 0.0
        self._snapshots: deque[tuple[float, dict[str, RouteTotals]]] = deque()
        self._loop: LoopingCall | None = None

    def watch(self) -> None:
        """Someone looks at the rates (``/admin/stats``): sample, starting now if idle."""
        self._watched = self._clock.seconds()
        self.start()

    @property
    def running(self) -> bool:
        return self._loop is not None and self._loop.running

    def start(self) -> None:
        if self.running:
            return
        self._loop = LoopingCall(self.sample)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self._snapshots.clear()

    def sample(self) -> None:
        """Take one snapshot (and forget those older than the window needs)."""
        if self._clock.seconds() - self._watched > self.idle:
            self.stop()  # nobody is looking
            return
        gateway = self._control.gateway
        if not gateway.config.observability.metrics_enabled:
            self._snapshots.clear()
            return
        try:
            totals = read_totals(gateway.runtime.metrics)
        except Exception:  # noqa: BLE001 - an unreadable sample must not stop the loop
            self.log.failure("reading the request metrics for the dashboard failed")
            return
        now = self._clock.seconds()
        snapshots = self._snapshots
        snapshots.append((now, totals))
        while len(snapshots) > 2 and now - snapshots[1][0] >= self.window:
            snapshots.popleft()

    def span(self) -> float | None:
        """Seconds the current rates cover; None before two snapshots."""
        if len(self._snapshots) < 2:
            return None
        return self._snapshots[-1][0] - self._snapshots[0][0]

    def traffic(self) -> dict[str, RouteTraffic]:
        """Each route's traffic over the window; empty before two snapshots."""
        span = self.span()
        if span is None:
            return {}
        (_, oldest), (_, newest) = self._snapshots[0], self._snapshots[-1]
        return {route: traffic_between(oldest.get(route), totals, span) for route, totals in newest.items()}
