"""Which middlewares a route runs, in the one fixed order.

Order: (request id, routing: done by ``Gateway.handle`` for every request)
-> CORS -> auth -> rate limit -> user middlewares -> [cache -> breaker: the
resilience work] -> upstream.  Each stage is a factory that returns the
route's middleware, or None when the stage is off for that route, so a route
pays nothing for what it does not use.

Adding a built-in middleware is one module with a ``for_route`` factory and
one line in ``STAGES``.
"""

from __future__ import annotations

from collections.abc import Callable

from txgateway.config.model import GatewayConfig, RouteConfig
from txgateway.pipeline.pipeline import Middleware
from txgateway.runtime import Runtime

StageFactory = Callable[[RouteConfig, GatewayConfig, Runtime], "Middleware | None"]


def _stages() -> tuple[tuple[str, StageFactory], ...]:
    from txgateway.auth.middleware import for_route as auth
    from txgateway.cache.middleware import for_route as cache
    from txgateway.pipeline.cors import for_route as cors
    from txgateway.pipeline.custom import for_route as custom
    from txgateway.ratelimit.middleware import for_route as rate_limit

    return (
        ("cors", cors),
        ("auth", auth),
        ("rate_limit", rate_limit),
        ("custom", custom),
        ("cache", cache),
    )


def middlewares_for(route: RouteConfig, config: GatewayConfig, runtime: Runtime) -> list[Middleware]:
    """The route's middlewares, outermost first."""
    if not config.middleware.enabled:
        from txgateway.auth.middleware import claim_header_strip

        strip = claim_header_strip(config)
        return [strip] if strip is not None else []
    chain: list[Middleware] = []
    for _name, factory in _stages():
        middleware = factory(route, config, runtime)
        if middleware is not None:
            chain.append(middleware)
    return chain
