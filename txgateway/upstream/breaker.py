"""The circuit breaker of one upstream: stop calling a service that is down.

States (the seeds' state machine):

- closed: requests pass; ``failure_threshold`` consecutive failed requests
  open the breaker.
- open: requests are refused at once (503 with Retry-After, or the
  fallback) and no upstream connection is attempted; after
  ``recovery_timeout`` seconds the next request finds it half-open.
- half-open: at most ``success_threshold`` probe requests run at a time;
  concurrent requests beyond that budget are refused, not queued.
  ``success_threshold`` successful probes close it; one failed probe reopens
  it for another ``recovery_timeout``.

A *failure* is a request (after its retries) that ended in a connect error,
a reset, a protocol error, a timeout, or a 5xx status from the upstream.
Client-side outcomes (client went away, 4xx, body too large) are neither
success nor failure.  A request counts once, however many tries it took.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txgateway.config.model import CircuitBreakerConfig
from txgateway.errors import ServiceUnavailable
from txgateway.observability.metrics import GatewayMetrics

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


#: ``txgateway_circuit_breaker_state`` value of each state.
STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class BreakerOpen(ServiceUnavailable):
    default_message = "upstream circuit breaker is open"


class CircuitBreaker:
    log = Logger()

    def __init__(self, upstream: str, config: CircuitBreakerConfig, clock: IReactorTime) -> None:
        self.upstream = upstream
        self.config = config
        self._clock = clock
        self.state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probes = 0
        self._successes = 0
        #: Bumped on every state change, so results of requests admitted
        #: under an older state do not move the new one.
        self._generation = 0
        self._budget = max(1, config.success_threshold)
        #: Called with (upstream, old state, new state) on every transition (metrics).
        self.listeners: list[Callable[[str, str, str], None]] = []

    def admit(self) -> int:
        """Let a request through, or raise :class:`BreakerOpen`; returns a ticket for :meth:`record`."""
        state = self.state
        if state == CLOSED:
            return self._generation
        if state == OPEN:
            waited = self._clock.seconds() - self._opened_at
            if waited < self.config.recovery_timeout:
                raise self._refusal(self.config.recovery_timeout - waited)
            self._move(HALF_OPEN)
        if self._probes >= self._budget:
            raise self._refusal(1.0, "upstream circuit breaker is half-open and its probes are busy")
        self._probes += 1
        return -self._generation - 1  # negative: a half-open probe ticket

    def record(self, ticket: int, failed: bool | None) -> None:
        """The outcome of an admitted request: ``failed`` None means it does not count."""
        if ticket < 0:
            generation = -ticket - 1
            if generation != self._generation or self.state != HALF_OPEN:
                return
            self._probes -= 1
            if failed is None:
                return
            if failed:
                self._open()
            else:
                self._successes += 1
                if self._successes >= self.config.success_threshold:
                    self._move(CLOSED)
            return
        if ticket != self._generation or self.state != CLOSED or failed is None:
            return
        if failed:
            self._failures += 1
            if self._failures >= self.config.failure_threshold:
                self._open()
        else:
            self._failures = 0

    def retry_after(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self.config.recovery_timeout - (self._clock.seconds() - self._opened_at))

    def _refusal(self, seconds: float, message: str | None = None) -> BreakerOpen:
        retry_after = str(max(1, math.ceil(seconds))).encode("ascii")
        return BreakerOpen(message, [(b"retry-after", retry_after)])

    def _open(self) -> None:
        self._opened_at = self._clock.seconds()
        self._move(OPEN)

    def _move(self, state: str) -> None:
        old, self.state = self.state, state
        self._generation += 1
        self._failures = 0
        self._probes = 0
        self._successes = 0
        if state == OPEN:
            self.log.warn(
                "circuit breaker of upstream {upstream} {old} -> open for {seconds}s",
                upstream=self.upstream,
                old=old,
                seconds=self.config.recovery_timeout,
            )
        else:
            self.log.info(
                "circuit breaker of upstream {upstream} {old} -> {new}", upstream=self.upstream, old=old, new=state
            )
        for listener in self.listeners:
            listener(self.upstream, old, state)


class BreakerMetrics:
    """A breaker listener keeping ``txgateway_circuit_breaker_state`` and
    ``txgateway_circuit_breaker_transitions`` of its upstream."""

    def __init__(self, breaker: CircuitBreaker, metrics: GatewayMetrics) -> None:
        self._state = metrics.breaker_state.labels(breaker.upstream)
        self._transitions = metrics.breaker_transitions
        self._state.set(STATE_VALUES[breaker.state])
        breaker.listeners.append(self)

    def __call__(self, upstream: str, old: str, new: str) -> None:
        self._state.set(STATE_VALUES[new])
        self._transitions.labels(upstream, new).inc()
