"""Users' own middlewares, written in plain Python and named in the config.

::

    middleware:
      custom:
        - name: tenant
          factory: "mycompany.gateway:tenant_middleware"   # or an entry point name
          options: {header: x-tenant}
          routes: [orders-api]                             # optional; default every route

``factory(options, route, runtime)`` is called once per route at config load
and returns an object with ``wrap(next) -> handler`` (or None to skip that
route).  The handler takes the :class:`RequestContext` and returns a Deferred
of the :class:`Response`, or is an ``async def`` that awaits ``next(ctx)``.
Entry points are looked up in the ``txgateway.middleware`` group, so a
package can ship middlewares that configs name without a module path.

User middlewares run after authentication and rate limiting (the identity is
on ``ctx.identity``) and before the cache, breaker and upstream stages.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Coroutine
from importlib.metadata import entry_points
from inspect import iscoroutine
from typing import Any

from twisted.internet.defer import Deferred

from txgateway.config.model import CustomMiddlewareConfig, GatewayConfig, RouteConfig
from txgateway.messages import Response
from txgateway.pipeline.context import RequestContext
from txgateway.pipeline.pipeline import Handler, Middleware, assemble
from txgateway.runtime import Runtime

ENTRY_POINT_GROUP = "txgateway.middleware"

Factory = Callable[..., Any]


def resolve_factory(reference: str) -> Factory:
    """``package.module:attribute`` or an entry point name; raises ValueError."""
    if ":" in reference:
        module_name, _, attribute = reference.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # noqa: BLE001 - any import failure is a config problem
            raise ValueError(f"cannot import module '{module_name}': {error}") from None
        target: Any = module
        for part in attribute.split("."):
            try:
                target = getattr(target, part)
            except AttributeError:
                raise ValueError(f"module '{module_name}' has no attribute '{attribute}'") from None
    else:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == reference]
        if not found:
            raise ValueError(
                f"no entry point '{reference}' in group '{ENTRY_POINT_GROUP}' (use 'package.module:factory')"
            )
        try:
            target = found[0].load()
        except Exception as error:  # noqa: BLE001 - any import failure is a config problem
            raise ValueError(f"cannot load entry point '{reference}': {error}") from None
    if not callable(target):
        raise ValueError(f"'{reference}' is not callable")
    return target


class _Adapted:
    """Lets a user handler be an ``async def`` or return a plain Deferred."""

    def __init__(self, middleware: Any, name: str) -> None:
        self._middleware = middleware
        self.name = name

    def wrap(self, next: Handler) -> Handler:
        handler = self._middleware.wrap(next)

        def run(ctx: RequestContext) -> Deferred[Response]:
            result = handler(ctx)
            if iscoroutine(result):
                coroutine: Coroutine[Any, Any, Response] = result
                return Deferred.fromCoroutine(coroutine)
            return result

        return run


class _Chain:
    def __init__(self, middlewares: list[Middleware]) -> None:
        self._middlewares = middlewares

    def wrap(self, next: Handler) -> Handler:
        return assemble(self._middlewares, next)


def build(entry: CustomMiddlewareConfig, route: RouteConfig, runtime: Runtime) -> Middleware | None:
    factory = resolve_factory(entry.factory)
    middleware = factory(dict(entry.options), route, runtime)
    if middleware is None:
        return None
    if not callable(getattr(middleware, "wrap", None)):
        raise TypeError(f"middleware '{entry.name}': {entry.factory} returned {middleware!r}, which has no wrap()")
    return _Adapted(middleware, entry.name)


def for_route(route: RouteConfig, config: GatewayConfig, runtime: Runtime) -> Middleware | None:
    chain = [
        m
        for entry in config.middleware.custom
        if not entry.routes or route.name in entry.routes
        if (m := build(entry, route, runtime)) is not None
    ]
    if not chain:
        return None
    return chain[0] if len(chain) == 1 else _Chain(chain)
