"""When a failed try is tried again, and how long to wait first.

- Only methods in ``retry.methods`` (idempotent ones by default) and only
  outcomes in ``retry.on`` (``connect_error``, ``timeout``, ``reset``,
  ``protocol_error`` or a status code) are retried, up to ``attempts`` tries in
  all.
- Waits are exponential with full jitter: a uniform draw in
  ``[0, min(backoff_max, backoff_base * 2**(n-1))]`` before retry n.
- A budget keeps retries from multiplying load during an outage: every
  request earns ``budget_ratio`` of a retry, a retry spends one, and the
  balance is capped at 10, so over time retries add at most ``budget_ratio``
  to the upstream's load while a quiet upstream still gets a few.
"""

from __future__ import annotations

import random

from txgateway.config.model import RetryConfig

BUDGET_CAP = 10.0


class RetryPolicy:
    __slots__ = ("_kinds", "_methods", "_random", "_statuses", "attempts", "backoff_base", "backoff_max")

    def __init__(self, config: RetryConfig, rng: random.Random | None = None) -> None:
        self.attempts = max(1, config.attempts)
        self._methods = frozenset(m.upper().encode("ascii") for m in config.methods)
        self._statuses = frozenset(int(o) for o in config.on if o.isdigit())
        self._kinds = frozenset(o for o in config.on if not o.isdigit())
        self.backoff_base = config.backoff_base
        self.backoff_max = config.backoff_max
        self._random = rng or random.Random()

    def applies_to(self, method: bytes) -> bool:
        """Whether requests with this method may be tried more than once."""
        return self.attempts > 1 and method in self._methods

    def retry_status(self, status: int) -> bool:
        return status in self._statuses

    def retry_kind(self, kind: str) -> bool:
        return kind in self._kinds

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** (retry - 1)))
        return self._random.uniform(0.0, ceiling)


class RetryBudget:
    """Per upstream: retries may add at most ``ratio`` to its load."""

    __slots__ = ("_balance", "_ratio")

    def __init__(self, ratio: float) -> None:
        self._ratio = ratio
        self._balance = BUDGET_CAP

    def earn(self) -> None:
        """A request was sent (first tries only)."""
        balance = self._balance + self._ratio
        self._balance = balance if balance < BUDGET_CAP else BUDGET_CAP

    def spend(self) -> bool:
        """Take one retry from the budget; False when it is exhausted."""
        if self._balance >= 1.0:
            self._balance -= 1.0
            return True
        return False
