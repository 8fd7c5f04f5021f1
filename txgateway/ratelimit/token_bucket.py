"""Token bucket: ``burst_size`` tokens, refilled at ``requests_per_minute``.

A request takes one token or is refused.  Tokens refill continuously (not in
steps), so after a burst a client gets one request every ``60 /
requests_per_minute`` seconds.  A bucket that has refilled to capacity is the
same as one never used, which is what lets stores drop idle keys.

The arithmetic is the same in the Redis script (:mod:`txgateway.ratelimit.redis`);
keep them in step.
"""

from __future__ import annotations

from math import ceil

from txgateway.ratelimit.decision import EPSILON, IDLE_AT, Decision


class TokenBucket:
    """The algorithm and its parameters; the state is ``[tokens, stamp, _, idle_at, slot]``."""

    name = "token_bucket"
    __slots__ = ("arguments", "capacity", "limit", "rate", "tag")

    def __init__(self, requests_per_minute: int, burst_size: int) -> None:
        if requests_per_minute < 1 or burst_size < 1:
            raise ValueError("requests_per_minute and burst_size must be >= 1")
        #: Tokens per second.
        self.rate = requests_per_minute / 60.0
        self.capacity = float(burst_size)
        self.limit = burst_size
        self.tag = f"tb:{requests_per_minute}:{burst_size}"
        self.arguments: tuple[int, ...] = (requests_per_minute, burst_size)

    def __repr__(self) -> str:
        return f"TokenBucket({self.arguments[0]}/min, burst {self.limit})"

    def fresh(self, now: float) -> list[float]:
        return [self.capacity, now, 0.0, now, 0.0]

    def decide(self, state: list[float], now: float) -> Decision:
        capacity = self.capacity
        rate = self.rate
        tokens = state[0]
        if now > state[1]:
            # A clock that steps back neither refills nor drains: the stamp stays.
            tokens += (now - state[1]) * rate
            if tokens > capacity:
                tokens = capacity
            state[1] = now
        if tokens >= 1.0 - EPSILON:
            tokens -= 1.0
            if tokens < 0.0:
                tokens = 0.0
            state[0] = tokens
            full = (capacity - tokens) / rate
            state[IDLE_AT] = now + full
            return Decision(True, int(tokens + EPSILON), ceil(full - EPSILON), 0)
        state[0] = tokens
        full = (capacity - tokens) / rate
        state[IDLE_AT] = now + full
        retry = ceil((1.0 - tokens) / rate - EPSILON)
        return Decision(False, 0, ceil(full - EPSILON), retry if retry > 1 else 1)
