"""What the admin API shows of one generation: routes, upstreams, breakers, rate limits.

Plain functions from a :class:`~txgateway.gateway.Gateway` (or its config)
to JSON-ready data, shared by the ``/admin/*`` pages and ``/admin/stats``.
"""

from __future__ import annotations

from collections.abc import Mapping

from txgateway.admin.redaction import redact_url
from txgateway.config.model import GatewayConfig, RateLimitConfig, RouteConfig
from txgateway.upstream.breaker import CircuitBreaker
from txgateway.upstream.upstream import Upstream


def route_middlewares(route: RouteConfig, config: GatewayConfig) -> list[str]:
    """The stages a request on ``route`` passes, outermost first, as
    :mod:`txgateway.pipeline.assembly` and ``Gateway`` build them.

    ``custom:NAME`` is a user middleware configured for the route (its factory
    may still decline the route); ``fallback``, ``breaker`` and ``retry`` are
    the upstream's, around the forwarder.
    """
    auth = config.middleware.auth
    strip = ["strip_claim_headers"] if auth.forward_claims else []
    stages: list[str] = []
    if not config.middleware.enabled:
        stages += strip
    else:
        if config.middleware.cors is not None:
            stages.append("cors")
        mode = route.auth or ("required" if auth.enabled else "none")
        stages += strip if mode == "none" and not route.roles else ["auth"]
        if effective_rate_limit(route, config) is not None:
            stages.append("rate_limit")
        stages += [f"custom:{c.name}" for c in config.middleware.custom if not c.routes or route.name in c.routes]
        cache = config.middleware.cache
        if route.cache.enabled if route.cache is not None else cache.enabled:
            stages.append("cache")
    upstream = config.upstreams.get(route.upstream)
    if upstream is not None:
        if upstream.fallback is not None:
            stages.append("fallback")
        if upstream.circuit_breaker is not None:
            stages.append("breaker")
        if upstream.retry.attempts > 1:
            stages.append("retry")
    return stages


def route_table(config: GatewayConfig) -> list[dict[str, object]]:
    """Every route in config order (the order of the file)."""
    table: list[dict[str, object]] = []
    for route in config.routes:
        match = route.match
        upstream = config.upstreams.get(route.upstream)
        table.append(
            {
                "name": route.name,
                "methods": list(match.methods),
                "hosts": [match.host] if match.host is not None else [],
                "paths": [match.path],
                "headers": [name for name, _ in match.headers],
                "upstream": route.upstream,
                "strip_prefix": route.strip_prefix,
                "rewrite": route.rewrite,
                "auth": route.auth,
                "roles": list(route.roles),
                "middlewares": route_middlewares(route, config),
                "websocket": route.websocket,
                "grpc": upstream is not None and upstream.protocol == "grpc",
            }
        )
    return table


def breaker_state(breaker: CircuitBreaker | None) -> dict[str, object] | None:
    if breaker is None:
        return None
    config = breaker.config
    return {
        "state": breaker.state,
        "retry_after": round(breaker.retry_after(), 3),
        "failure_threshold": config.failure_threshold,
        "recovery_timeout": config.recovery_timeout,
        "success_threshold": config.success_threshold,
    }


def instance_status(state: Mapping[str, object]) -> str:
    """One word for an instance's state: healthy, ejected (passive) or down (active checks)."""
    if state["healthy"]:
        return "healthy"
    if not state["active_healthy"]:
        return "down"
    return "ejected"


def upstream_states(upstreams: Mapping[str, Upstream]) -> list[dict[str, object]]:
    states = []
    for upstream in upstreams.values():
        config = upstream.config
        state = upstream.state()
        instances = state["instances"]
        assert isinstance(instances, list)
        for instance in instances:
            instance["status"] = instance_status(instance)
        state["protocol"] = config.protocol
        state["active_checks"] = config.health_check.enabled
        state["passive_health"] = config.passive_health is not None
        state["breaker"] = breaker_state(upstream.breaker)
        states.append(state)
    return states


def breaker_states(upstreams: Mapping[str, Upstream]) -> list[dict[str, object]]:
    """The breaker of every upstream that has one."""
    states = []
    for name, upstream in upstreams.items():
        state = breaker_state(upstream.breaker)
        if state is not None:
            states.append({"upstream": name, **state})
    return states


def effective_rate_limit(route: RouteConfig, config: GatewayConfig) -> RateLimitConfig | None:
    """The limit a route runs with (its own or ``middleware.rate_limit``), None when off."""
    if not config.middleware.enabled:
        return None
    limit = route.rate_limit if route.rate_limit is not None else config.middleware.rate_limit
    if limit is None or not limit.enabled:
        return None
    return limit


def rate_limit_settings(limit: RateLimitConfig) -> dict[str, object]:
    settings: dict[str, object] = {
        "enabled": limit.enabled,
        "algorithm": limit.algorithm,
        "requests_per_minute": limit.requests_per_minute,
        "burst_size": limit.burst_size,
        "key": limit.key,
        "storage": limit.storage,
        "tiers": [dict(tier) for tier in limit.tiers],
    }
    if limit.storage == "redis":
        settings["redis"] = {"url": redact_url(limit.redis_url), "timeout": limit.redis_timeout}
        settings["on_storage_error"] = limit.on_storage_error
    return settings


def rate_limits(config: GatewayConfig) -> dict[str, object]:
    """``middleware.rate_limit`` and the limit every route runs with (null: none)."""
    default = config.middleware.rate_limit
    routes = []
    for route in config.routes:
        limit = effective_rate_limit(route, config)
        routes.append(
            {
                "route": route.name,
                "source": None if limit is None else ("route" if route.rate_limit is not None else "middleware"),
                "rate_limit": None if limit is None else rate_limit_settings(limit),
            }
        )
    return {
        "middleware_enabled": config.middleware.enabled,
        "default": None if default is None else rate_limit_settings(default),
        "routes": routes,
    }
