"""Placeholder while the middleware is being written: off for every route."""

from __future__ import annotations

from txgateway.config.model import GatewayConfig, RouteConfig
from txgateway.pipeline.pipeline import Middleware
from txgateway.runtime import Runtime


def for_route(route: RouteConfig, config: GatewayConfig, runtime: Runtime) -> Middleware | None:
    return None
