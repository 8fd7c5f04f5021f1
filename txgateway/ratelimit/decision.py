"""What a rate-limit decision says, and the two kinds of store that make one.

A :class:`Decision` is the answer for one request: admitted or not, and the
numbers the ``RateLimit-*`` headers and ``Retry-After`` report.  All times
are whole seconds, rounded up, so a client that waits what it was told is
never refused again for the same reason.

A *local* store (:class:`~txgateway.ratelimit.memory.MemoryStore`) decides
synchronously; a *shared* store (:class:`~txgateway.ratelimit.redis.RedisStore`)
answers with a Deferred that fails with :class:`StorageError` when it cannot
decide in time, and the route's ``on_storage_error`` takes over.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from twisted.internet.defer import Deferred

#: Layout of the per-key state list a memory store keeps (see the algorithms):
#: items 0-2 belong to the algorithm; ``IDLE_AT`` is the time from which the
#: state is indistinguishable from a fresh one (so it may be dropped);
#: ``SLOT`` is the memory store's bookkeeping of when it looks at it again.
IDLE_AT = 3
SLOT = 4

#: Floating point slack when comparing token counts and window estimates.
EPSILON = 1e-9


class Decision(NamedTuple):
    allowed: bool
    #: Requests still admitted right now after this one.
    remaining: int
    #: Seconds until the whole quota is available again (RateLimit-Reset).
    reset: int
    #: Seconds until a refused request would be admitted (Retry-After); 0 when allowed.
    retry_after: int


class StorageError(Exception):
    """A shared store could not decide (connection down, timeout, error reply)."""


class Algorithm(Protocol):
    """A limiting algorithm with its parameters, deciding on a memory state."""

    #: ``token_bucket`` or ``sliding_window``: which script a shared store runs.
    name: str
    #: Short tag used in storage keys, e.g. ``tb:100:10`` or ``sw:100``.
    tag: str
    #: The quota reported as RateLimit-Limit.
    limit: int
    #: The integer parameters a shared store passes to its script.
    arguments: tuple[int, ...]

    def fresh(self, now: float) -> list[float]:
        """The state of a key never seen before (or idle long enough)."""

    def decide(self, state: list[float], now: float) -> Decision:
        """Count one request against ``state`` (updated in place, with IDLE_AT)."""


class LocalStore(Protocol):
    def decide(self, algorithm: Algorithm, key: str) -> Decision: ...


class SharedStore(Protocol):
    def decide(self, algorithm: Algorithm, key: str, timeout: float) -> Deferred[Decision]:
        """Fires with the decision, or fails with StorageError within ``timeout`` seconds."""
