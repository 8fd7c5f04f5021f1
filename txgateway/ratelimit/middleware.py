"""The rate-limit stage: one decision per request, headers on every response.

Built once per route at config load (``for_route``): the route's policies
(the default and one per tier), the key extractor and the store.  Per
request: pick the policy (tiers by role or permission, first match wins),
extract the key, one decision.

- Allowed: the request goes on; the response, or the gateway error that
  replaces it, carries ``RateLimit-Limit``, ``RateLimit-Remaining``,
  ``RateLimit-Reset`` (IETF draft, delta seconds) and the same values as
  ``X-RateLimit-*``.  Copies of these headers sent by the upstream are
  replaced: the client is subject to the gateway's limit.
- Limited: 429 ``rate_limited`` with the same headers and ``Retry-After``.

What the numbers mean: Limit is the quota (the bucket's ``burst_size``; the
window's ``requests_per_minute``), Remaining what is left of it now, Reset
the seconds until all of it is back.

Counts are kept per route (every key starts with the route name, so each
route has its own limit even for the same client), per tier (a tier is a
class of service: ``key: route`` with tiers gives each tier its own pool)
and per policy parameters (a reload that changes a route's numbers starts it
afresh, as ``Runtime.shared`` promises; an unchanged route keeps its counts).

With ``storage: redis``, when Redis cannot decide within ``redis.timeout``
the route's ``on_storage_error`` applies to that request: ``allow`` lets it
through (without RateLimit headers: there are no numbers to report),
``deny`` answers 503 ``service_unavailable`` with ``Retry-After: 1`` (the
client did nothing wrong, so not a 429), ``local`` decides in this process's
memory store with the same policy (so N gateways admit up to N times the
limit while Redis is away).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from txgateway.config.model import GatewayConfig, RateLimitConfig, RouteConfig
from txgateway.errors import GatewayError, RateLimited, ServiceUnavailable
from txgateway.messages import Response
from txgateway.observability.metrics import GatewayMetrics
from txgateway.pipeline.context import RequestContext
from txgateway.pipeline.pipeline import Handler
from txgateway.ratelimit.decision import Algorithm, Decision, LocalStore, SharedStore, StorageError
from txgateway.ratelimit.keys import KeyFunction, key_function
from txgateway.ratelimit.memory import MemoryStore
from txgateway.ratelimit.redis import RedisStore
from txgateway.ratelimit.sliding_window import SlidingWindow
from txgateway.ratelimit.token_bucket import TokenBucket
from txgateway.runtime import Runtime

Headers = list[tuple[bytes, bytes]]

#: The headers this stage owns on a response.
HEADER_NAMES = frozenset(
    {
        b"ratelimit-limit",
        b"ratelimit-remaining",
        b"ratelimit-reset",
        b"x-ratelimit-limit",
        b"x-ratelimit-remaining",
        b"x-ratelimit-reset",
    }
)

#: ``Runtime.shared`` keys of the stores.
MEMORY_STORE = ("txgateway.ratelimit", "memory")


def redis_store_key(url: str) -> tuple[str, str, str]:
    return ("txgateway.ratelimit", "redis", url)


def algorithm_for(name: str, requests_per_minute: int, burst_size: int) -> Algorithm:
    if name == "token_bucket":
        return TokenBucket(requests_per_minute, burst_size)
    if name == "sliding_window":
        return SlidingWindow(requests_per_minute)
    raise ValueError(f"unknown rate limit algorithm {name!r}")


class Policy:
    """One tier's limit on one route: its algorithm, key prefix and header bytes."""

    __slots__ = ("algorithm", "label", "limit", "prefix")

    def __init__(self, route: str, label: str, algorithm: Algorithm) -> None:
        self.algorithm = algorithm
        self.label = label
        self.prefix = f"{quote(route, safe='')}:{algorithm.tag}:{label}:"
        self.limit = b"%d" % algorithm.limit

    def __repr__(self) -> str:
        return f"Policy({self.label}, {self.algorithm!r})"

    def headers(self, decision: Decision) -> Headers:
        limit = self.limit
        remaining = b"%d" % decision.remaining
        reset = b"%d" % decision.reset
        return [
            (b"ratelimit-limit", limit),
            (b"ratelimit-remaining", remaining),
            (b"ratelimit-reset", reset),
            (b"x-ratelimit-limit", limit),
            (b"x-ratelimit-remaining", remaining),
            (b"x-ratelimit-reset", reset),
        ]


def _tier(route: str, config: RateLimitConfig, tier: Mapping[str, object]) -> tuple[bool, str, Policy]:
    """(is a role, the role or permission, its policy) of one ``tiers`` entry."""
    role = tier.get("role")
    permission = tier.get("permission")
    if isinstance(role, str) and role:
        is_role, name = True, role
    elif isinstance(permission, str) and permission:
        is_role, name = False, permission
    else:
        raise ValueError(f"rate limit tier {dict(tier)!r} names neither a role nor a permission")
    rpm = tier.get("requests_per_minute", config.requests_per_minute)
    burst = tier.get("burst_size", config.burst_size)
    if not isinstance(rpm, int) or not isinstance(burst, int):
        raise ValueError(f"rate limit tier {dict(tier)!r}: requests_per_minute and burst_size must be integers")
    label = ("role=" if is_role else "permission=") + quote(name, safe="")
    return is_role, name, Policy(route, label, algorithm_for(config.algorithm, rpm, burst))


class RateLimit:
    """The middleware of one route."""

    def __init__(
        self,
        route: str,
        config: RateLimitConfig,
        key: KeyFunction,
        local: LocalStore,
        shared: SharedStore | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        """``local`` decides for ``storage: memory`` and for ``on_storage_error: local``;
        ``shared``, when given, decides first; ``metrics`` counts the decisions
        (``storage_error`` replaces the decision made without the storage)."""
        self.route = route
        self._decisions: _Decisions | None = None
        self._storage_errors: Any = None
        if metrics is not None:
            counter = metrics.ratelimit_decisions
            self._decisions = _Decisions(
                metrics.batched_counter(counter.labels(route, "allowed")),
                metrics.batched_counter(counter.labels(route, "limited")),
            )
            self._storage_errors = counter.labels(route, "storage_error")
        self.config = config
        self.default = Policy(
            route, "default", algorithm_for(config.algorithm, config.requests_per_minute, config.burst_size)
        )
        self.tiers = tuple(_tier(route, config, tier) for tier in config.tiers)
        self._key = key
        self._local = local
        self._shared = shared
        self._timeout = config.redis_timeout
        self._on_storage_error = config.on_storage_error

    def policy(self, identity: object) -> Policy:
        """The first tier whose role or permission ``identity`` has, else the default."""
        if identity is None or not self.tiers:
            return self.default
        roles = getattr(identity, "roles", ())
        permissions = getattr(identity, "permissions", ())
        for is_role, name, policy in self.tiers:
            if name in (roles if is_role else permissions):
                return policy
        return self.default

    def wrap(self, next: Handler) -> Handler:
        key_of = self._key
        policy_for = self.policy
        shared = self._shared
        decisions = self._decisions
        if shared is None:
            decide = self._local.decide

            def rate_limit(ctx: RequestContext) -> Deferred[Response]:
                policy = policy_for(ctx.identity)
                return _apply(decide(policy.algorithm, policy.prefix + key_of(ctx)), policy, ctx, next, decisions)

            return rate_limit

        timeout = self._timeout
        fallback = self._fallback

        def shared_rate_limit(ctx: RequestContext) -> Deferred[Response]:
            policy = policy_for(ctx.identity)
            key = policy.prefix + key_of(ctx)
            decided = shared.decide(policy.algorithm, key, timeout)
            return decided.addCallbacks(
                _apply, fallback, callbackArgs=(policy, ctx, next, decisions), errbackArgs=(policy, key, ctx, next)
            )

        return shared_rate_limit

    def _fallback(
        self, failure: Failure, policy: Policy, key: str, ctx: RequestContext, next: Handler
    ) -> Deferred[Response] | Failure:
        if not failure.check(StorageError):
            return failure
        _note(ctx, "storage_error")
        if self._storage_errors is not None:
            self._storage_errors.inc()
        action = self._on_storage_error
        if action == "allow":
            return next(ctx)
        if action == "deny":
            return fail(ServiceUnavailable("rate limit storage unavailable", [(b"retry-after", b"1")]))
        return _apply(self._local.decide(policy.algorithm, key), policy, ctx, next)


class _Decisions:
    """A route's ``allowed`` and ``limited`` decision counters."""

    __slots__ = ("allowed", "limited")

    def __init__(self, allowed: Any, limited: Any) -> None:
        self.allowed = allowed
        self.limited = limited


def _apply(
    decision: Decision, policy: Policy, ctx: RequestContext, next: Handler, decisions: _Decisions | None = None
) -> Deferred[Response]:
    headers = policy.headers(decision)
    if not decision.allowed:
        _note(ctx, "limited")
        if decisions is not None:
            decisions.limited.inc()
        headers.append((b"retry-after", b"%d" % decision.retry_after))
        return fail(RateLimited(f"rate limit exceeded, retry in {decision.retry_after} s", headers))
    if decisions is not None:
        decisions.allowed.inc()
    notes = ctx.notes
    if notes is None:
        ctx.notes = {"rate_limit": "allowed"}
    else:
        notes.setdefault("rate_limit", "allowed")  # a storage_error note stays
    return next(ctx).addCallbacks(_add_headers, _add_headers_to_error, callbackArgs=(headers,), errbackArgs=(headers,))


def _add_headers(response: Response, headers: Headers) -> Response:
    own = response.headers
    for name, _ in own:
        if name in HEADER_NAMES:
            response.headers = own = [(n, v) for n, v in own if n not in HEADER_NAMES]
            break
    own.extend(headers)
    return response


def _add_headers_to_error(failure: Failure, headers: Headers) -> Failure:
    if isinstance(failure.value, GatewayError):
        failure.value.headers.extend(headers)
    return failure


def _note(ctx: RequestContext, what: str) -> None:
    """Tell the access log what the rate limit did to this request."""
    if ctx.notes is None:
        ctx.notes = {"rate_limit": what}
    else:
        ctx.notes["rate_limit"] = what


def for_route(route: RouteConfig, config: GatewayConfig, runtime: Runtime) -> RateLimit | None:
    """The route's rate limit (its own ``rate_limit`` or ``middleware.rate_limit``), None when off."""
    rate_limit = route.rate_limit if route.rate_limit is not None else config.middleware.rate_limit
    if rate_limit is None or not rate_limit.enabled:
        return None
    key = key_function(rate_limit.key)
    local = runtime.shared(MEMORY_STORE, lambda: MemoryStore(runtime.clock))
    shared: SharedStore | None = None
    if rate_limit.storage == "redis":
        url = rate_limit.redis_url
        shared = runtime.shared(redis_store_key(url), lambda: RedisStore(url, runtime.reactor, runtime.clock))
    return RateLimit(route.name, rate_limit, key, local, shared, runtime.metrics)
