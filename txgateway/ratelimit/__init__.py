"""Rate limiting: token bucket and sliding window, in memory or in Redis.

The pipeline stage is :func:`txgateway.ratelimit.middleware.for_route`; the
pieces are usable on their own::

    store = MemoryStore(reactor)
    bucket = TokenBucket(requests_per_minute=60, burst_size=10)
    decision = store.decide(bucket, "client-42")
    if not decision.allowed:
        ...  # come back in decision.retry_after seconds
"""

from txgateway.ratelimit.decision import Decision, StorageError
from txgateway.ratelimit.memory import MemoryStore
from txgateway.ratelimit.middleware import RateLimit, for_route
from txgateway.ratelimit.redis import RedisStore
from txgateway.ratelimit.sliding_window import SlidingWindow
from txgateway.ratelimit.token_bucket import TokenBucket

__all__ = [
    "Decision",
    "MemoryStore",
    "RateLimit",
    "RedisStore",
    "SlidingWindow",
    "StorageError",
    "TokenBucket",
    "for_route",
]
