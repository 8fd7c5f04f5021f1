"""Upstream health: active checks and passive outlier detection.

Both only write an :class:`~txgateway.upstream.instance.Instance`'s health
fields and then call :meth:`Upstream.refresh`, which recomputes the list of
instances that take traffic; no request ever filters instances itself.

- :class:`ActiveHealthCheck` asks each instance ``GET <path>`` every
  ``interval`` seconds through the upstream's own :class:`IUpstreamClient`
  (the same pools as the traffic), and flips ``active_healthy`` after
  ``unhealthy_threshold`` failures / ``healthy_threshold`` successes in a row.
- :class:`PassiveHealth` watches the outcome of real requests and ejects an
  instance for ``ejection_time`` after ``consecutive_failures`` in a row.

Instances start healthy (optimistic start): a gateway that has just started
serves traffic at once instead of refusing it until a first round of checks
has passed; the first failing checks (or requests) eject what is down.  An
instance that service discovery adds later starts the same way, and its
checks start with it; a removed instance's checks stop.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Sequence

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txgateway import __version__
from txgateway.config.model import HealthCheckConfig, PassiveHealthConfig
from txgateway.errors import UpstreamError, UpstreamTimeout
from txgateway.interfaces import IBody, IBodySink, IUpstreamClient
from txgateway.messages import Response, UpstreamRequest
from txgateway.observability.metrics import GatewayMetrics
from txgateway.upstream.breaker import BreakerMetrics
from txgateway.upstream.instance import Instance
from txgateway.upstream.upstream import Upstream

__all__ = ["COUNTED_FAILURES", "ActiveHealthCheck", "PassiveHealth", "UpstreamHealth"]

#: Request outcomes passive detection counts against an instance.  Anything
#: else reported (a 4xx, a client that went away) neither counts nor resets.
COUNTED_FAILURES = frozenset({"connect_error", "timeout", "reset", "protocol_error", "5xx"})

#: A check response body is read (so its connection goes back to the pool) up
#: to this many bytes; past it the connection is dropped instead.
_DRAIN_LIMIT = 64 * 1024

#: Later checks are spread over interval * (1 ± this).
_JITTER = 0.1

_USER_AGENT = f"txgateway-health-check/{__version__}".encode("ascii")


def _abandon(response: Response) -> None:
    if response.body is not None:
        response.body.stopProducing()


@implementer(IBodySink)
class _Drain:
    """Reads and discards a check response's body; ``done()`` once it has ended."""

    def __init__(self, body: IBody, done: Callable[[], None]) -> None:
        self._body = body
        self._done: Callable[[], None] | None = done
        self._received = 0

    def write(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > _DRAIN_LIMIT:
            self.stop()

    def finish(self) -> None:
        self._end()

    def abort(self, reason: object) -> None:
        self._end()

    def stop(self) -> None:
        """Abandon the body (its connection is closed, not reused)."""
        if self._done is not None:
            self._body.stopProducing()
            self._end()

    def _end(self) -> None:
        done, self._done = self._done, None
        if done is not None:
            done()


class _Probe:
    """The active checking of one instance: its streaks, its timer, its check in flight."""

    __slots__ = (
        "deadline", "drain", "failures", "instance", "pending", "removed", "started", "successes", "timed_out", "timer",
    )  # fmt: skip

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        #: The instance left the upstream (discovery): whatever of a check is still going gives no verdict.
        self.removed = False
        self.successes = 0
        self.failures = 0
        #: The next check, while waiting for it.
        self.timer: IDelayedCall | None = None
        #: The check request, until its response head or failure.
        self.pending: Deferred[Response] | None = None
        #: Bounds the whole check, head and body, to ``timeout``.
        self.deadline: IDelayedCall | None = None
        self.drain: _Drain | None = None
        self.timed_out = False
        self.started = 0.0


class ActiveHealthCheck:
    """Checks every instance of ``upstream`` with ``GET path`` every ``interval`` seconds.

    A check succeeds on a 2xx or 3xx response head within ``timeout``; a
    connect error, a timeout, a reset or any other status is a failure.  The
    first check of each instance comes after a random delay in
    ``[0, interval)`` and later ones ``interval ± 10%`` after the previous
    one started, so gateways started together do not check in lockstep.

    The requests go through ``client`` (the upstream's own client): they use
    and keep warm the same connection pools as the traffic, and a pool so
    saturated that a check waits past ``timeout`` counts against the
    instance.  ``random`` (a :class:`random.Random`) is injected for tests.
    """

    log = Logger()

    def __init__(
        self,
        upstream: Upstream,
        client: IUpstreamClient,
        clock: IReactorTime,
        config: HealthCheckConfig,
        random: _random.Random | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.upstream = upstream
        self.client = client
        self.clock = clock
        self.config = config
        #: ``txgateway_health_checks`` (None: checks are not counted).
        self._results = metrics.health_checks if metrics is not None else None
        self.random = random if random is not None else _random.Random()
        self._target = config.path.encode("latin-1")
        self._probes: list[_Probe] = []
        self.running = False

    def start(self) -> None:
        """Schedule the first check of every instance; again after ``stop()`` is fine."""
        if self.running:
            return
        self.running = True
        self._probes = [_Probe(instance) for instance in self.upstream.instances]
        for probe in self._probes:
            self._schedule(probe, self.random.random() * self.config.interval)

    def stop(self) -> None:
        """Cancel every scheduled check and abandon those in flight."""
        self.running = False
        for probe in self._probes:
            self._cancel(probe)

    def instances_changed(self, added: Sequence[Instance], removed: Sequence[Instance]) -> None:
        """Discovery changed the instance set: check the new instances (first check within
        ``interval``, as at start), stop checking the removed ones.  Nothing to do while stopped:
        ``start()`` takes the instances as they are then."""
        if not self.running:
            return
        if removed:
            gone = {id(instance) for instance in removed}
            keep = []
            for probe in self._probes:
                if id(probe.instance) in gone:
                    probe.removed = True
                    self._cancel(probe)
                else:
                    keep.append(probe)
            self._probes = keep
        for instance in added:
            probe = _Probe(instance)
            self._probes.append(probe)
            self._schedule(probe, self.random.random() * self.config.interval)

    def _cancel(self, probe: _Probe) -> None:
        timer, probe.timer = probe.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self._end(probe)

    def _live(self, probe: _Probe) -> bool:
        return self.running and not probe.removed

    def _schedule(self, probe: _Probe, delay: float) -> None:
        probe.timer = self.clock.callLater(max(0.0, delay), self._check, probe)

    def _check(self, probe: _Probe) -> None:
        probe.timer = None
        instance = probe.instance
        probe.started = self.clock.seconds()
        probe.timed_out = False
        probe.deadline = self.clock.callLater(self.config.timeout, self._expire, probe)
        request = UpstreamRequest(
            host=instance.host,
            port=instance.port,
            method=b"GET",
            target=self._target,
            headers=[
                (b"host", instance.address.encode("latin-1")),
                (b"user-agent", _USER_AGENT),
                (b"accept", b"*/*"),
            ],
            connect_timeout=self.config.timeout,
            response_timeout=self.config.timeout,
        )
        try:
            d = self.client.request(request)
        except Exception:  # noqa: BLE001 - a broken client is a failed check, not a dead checker
            d = Deferred()
            d.errback(Failure())
        if probe.deadline is None:  # stopped while the request was being made
            d.addCallbacks(_abandon, lambda _: None)
            d.cancel()
            return
        probe.pending = d
        d.addCallbacks(self._response, self._failed, callbackArgs=(probe,), errbackArgs=(probe,))

    def _response(self, response: Response, probe: _Probe) -> None:
        probe.pending = None
        status = response.status
        if 200 <= status < 400:
            self._succeeded(probe)
        else:
            self._failure(probe, f"status {status}")
        body = response.body
        if self._live(probe) and body is not None and body.length != 0:
            drain = probe.drain = _Drain(body, lambda: self._drained(probe))
            body.deliverTo(drain)
            return
        if body is not None and body.length != 0:
            body.stopProducing()
        self._finished(probe)

    def _failed(self, failure: Failure, probe: _Probe) -> None:
        probe.pending = None
        if not self._live(probe):
            return
        if probe.timed_out or failure.check(CancelledError):
            reason = "timeout"
        elif isinstance(failure.value, UpstreamError | UpstreamTimeout):
            reason = f"{failure.value.kind}: {failure.value.message}"
        else:
            reason = failure.getErrorMessage()
        self._failure(probe, reason)
        self._finished(probe)

    def _drained(self, probe: _Probe) -> None:
        probe.drain = None
        if self._live(probe):
            self._finished(probe)

    def _expire(self, probe: _Probe) -> None:
        """The check ran out of ``timeout``: a failure if no head came, else stop reading the body."""
        probe.deadline = None
        probe.timed_out = True
        pending = probe.pending
        if pending is not None:
            pending.cancel()
        drain = probe.drain
        if drain is not None:
            drain.stop()

    def _end(self, probe: _Probe) -> None:
        """Abandon whatever of a check is still going, without a verdict."""
        deadline, probe.deadline = probe.deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()
        pending, probe.pending = probe.pending, None
        if pending is not None:
            pending.cancel()
        drain, probe.drain = probe.drain, None
        if drain is not None:
            drain.stop()

    def _finished(self, probe: _Probe) -> None:
        self._end(probe)
        if self._live(probe) and probe.timer is None:
            jittered = self.config.interval * (1.0 - _JITTER + 2 * _JITTER * self.random.random())
            self._schedule(probe, probe.started + jittered - self.clock.seconds())

    def _succeeded(self, probe: _Probe) -> None:
        if not self._live(probe):
            return
        probe.failures = 0
        probe.successes += 1
        instance = probe.instance
        if self._results is not None:
            self._results.labels(self.upstream.name, instance.address, "success").inc()
        if not instance.active_healthy and probe.successes >= self.config.healthy_threshold:
            instance.active_healthy = True
            self.log.info(
                "upstream {upstream} instance {address} healthy again after {successes} successful checks",
                upstream=self.upstream.name,
                address=instance.address,
                successes=probe.successes,
            )
            self.upstream.refresh()

    def _failure(self, probe: _Probe, reason: str) -> None:
        if not self._live(probe):
            return
        probe.successes = 0
        probe.failures += 1
        instance = probe.instance
        if self._results is not None:
            self._results.labels(self.upstream.name, instance.address, "failure").inc()
        self.log.debug(
            "health check of upstream {upstream} instance {address} failed: {reason}",
            upstream=self.upstream.name,
            address=instance.address,
            reason=reason,
        )
        if instance.active_healthy and probe.failures >= self.config.unhealthy_threshold:
            instance.active_healthy = False
            self.log.warn(
                "upstream {upstream} instance {address} unhealthy after {failures} failed checks",
                upstream=self.upstream.name,
                address=instance.address,
                failures=probe.failures,
                reason=reason,
            )
            self.upstream.refresh()


class PassiveHealth:
    """Outlier detection from real traffic (the upstream's ``observer``).

    ``consecutive_failures`` counted failures in a row (connect error,
    timeout, reset, protocol error, 5xx) eject an instance for
    ``ejection_time`` seconds; a success resets the count.  The last available
    instance is never ejected: with one instance left, sending it traffic that
    may fail beats answering 503 for certain.  There is no setting for this;
    it always holds.
    """

    log = Logger()

    def __init__(self, upstream: Upstream, clock: IReactorTime, config: PassiveHealthConfig) -> None:
        self.upstream = upstream
        self.clock = clock
        self.config = config
        #: Per ejected instance, the timer that brings it back.
        self._returns: dict[Instance, IDelayedCall] = {}
        self._stopped = False

    def observe(self, instance: Instance, failure: str | None) -> None:
        if self._stopped:
            return
        if failure is None:
            instance.consecutive_failures = 0
            return
        if failure not in COUNTED_FAILURES:
            return
        now = self.clock.seconds()
        if instance.ejected_until > now:
            return  # requests that were in flight when it was ejected
        instance.consecutive_failures += 1
        failures = instance.consecutive_failures
        threshold = self.config.consecutive_failures
        if failures < threshold:
            return
        if instance not in self.upstream.instances:
            return  # removed by discovery while this request was in flight
        if not any(other is not instance for other in self.upstream.available):
            if failures == threshold:
                self.log.warn(
                    "upstream {upstream} instance {address} failed {failures} times in a row"
                    " but stays: it is the last available instance",
                    upstream=self.upstream.name,
                    address=instance.address,
                    failures=failures,
                    failure=failure,
                )
            return
        instance.consecutive_failures = 0
        instance.ejected_until = now + self.config.ejection_time
        self.log.warn(
            "upstream {upstream} instance {address} ejected for {seconds}s after {failures} failures in a row",
            upstream=self.upstream.name,
            address=instance.address,
            seconds=self.config.ejection_time,
            failures=failures,
            failure=failure,
        )
        self._arm(instance, self.config.ejection_time)
        self.upstream.refresh()

    def _arm(self, instance: Instance, delay: float) -> None:
        previous = self._returns.get(instance)
        if previous is not None and previous.active():
            previous.cancel()
        self._returns[instance] = self.clock.callLater(delay, self._return, instance)

    def _return(self, instance: Instance) -> None:
        self._returns.pop(instance, None)
        self.log.info(
            "upstream {upstream} instance {address} back from ejection",
            upstream=self.upstream.name,
            address=instance.address,
        )
        self.upstream.refresh()

    def forget(self, removed: Sequence[Instance]) -> None:
        """Discovery removed these instances: no return from ejection to wait for."""
        for instance in removed:
            timer = self._returns.pop(instance, None)
            if timer is not None and timer.active():
                timer.cancel()

    def start(self) -> None:
        """Resume after ``stop()``: re-arm the return of instances still ejected."""
        self._stopped = False
        now = self.clock.seconds()
        for instance in self.upstream.instances:
            if instance.ejected_until > now and instance not in self._returns:
                self._arm(instance, instance.ejected_until - now)
        self.upstream.refresh()

    def stop(self) -> None:
        """Stop ejecting and cancel the return timers (``start()`` re-arms them)."""
        self._stopped = True
        returns, self._returns = self._returns, {}
        for timer in returns.values():
            if timer.active():
                timer.cancel()


class UpstreamHealth:
    """What watches one upstream, as its config asks: active checks, passive detection, both or neither.

    Built once per upstream config and kept in ``Runtime.shared`` beside the
    :class:`Upstream`, so a reload that leaves the upstream unchanged keeps
    both the instances' health and the checks' streaks.  Passive detection
    works from construction; active checks run between ``start()`` and
    ``stop()``.
    """

    def __init__(
        self,
        upstream: Upstream,
        clock: IReactorTime,
        random: _random.Random | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        """With ``metrics``, the upstream's health is reported there: check results,
        ``txgateway_upstream_instance_healthy`` (1 while an instance takes traffic:
        active checks and passive ejections both move it) and its breaker's state."""
        config = upstream.config
        self.upstream = upstream
        self.active: ActiveHealthCheck | None = None
        self.passive: PassiveHealth | None = None
        self._healthy = metrics.instance_healthy if metrics is not None else None
        if config.health_check.enabled:
            self.active = ActiveHealthCheck(upstream, upstream.client, clock, config.health_check, random, metrics)
        if config.passive_health is not None:
            self.passive = PassiveHealth(upstream, clock, config.passive_health)
            upstream.observer = self.passive
        upstream.on_instances.append(self._instances_changed)
        if metrics is not None:
            upstream.on_change.append(self._report_health)
            self._report_health(upstream)
            if upstream.breaker is not None:
                BreakerMetrics(upstream.breaker, metrics)

    def _report_health(self, upstream: Upstream) -> None:
        healthy = self._healthy
        assert healthy is not None
        available = upstream.available
        for instance in upstream.instances:
            healthy.labels(upstream.name, instance.address).set(1 if instance in available else 0)

    def _instances_changed(self, added: Sequence[Instance], removed: Sequence[Instance]) -> None:
        if self._healthy is not None:
            for instance in removed:
                try:
                    self._healthy.remove(self.upstream.name, instance.address)
                except KeyError:
                    pass
        if self.active is not None:
            self.active.instances_changed(added, removed)
        if self.passive is not None:
            self.passive.forget(removed)

    def start(self) -> None:
        if self.passive is not None:
            self.passive.start()
        if self.active is not None:
            self.active.start()

    def stop(self) -> None:
        if self.active is not None:
            self.active.stop()
        if self.passive is not None:
            self.passive.stop()
