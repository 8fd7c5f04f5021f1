"""User middlewares as a gateway user would write them; loaded by dotted path
from test configs (``factory: "tests.example_middleware:tenant"``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, fail

from txgateway.errors import Forbidden
from txgateway.messages import Response
from txgateway.pipeline import Handler, RequestContext


class Tenant:
    """Requires a tenant header and tells the upstream which tenant it is."""

    def __init__(self, header: str) -> None:
        self.header = header.lower().encode("latin-1")

    def wrap(self, next: Handler) -> Handler:
        def handle(ctx: RequestContext) -> Deferred[Response]:
            tenant = ctx.header(self.header)
            if tenant is None:
                return fail(Forbidden("tenant header required"))
            ctx.headers.append((b"x-tenant-id", tenant))
            return next(ctx)

        return handle


def tenant(options: Mapping[str, Any], route: Any, runtime: Any) -> Tenant:
    return Tenant(options.get("header", "x-tenant"))


class Stamp:
    """An ``async def`` middleware that edits the response on its way back."""

    def __init__(self, route_name: str) -> None:
        self.route_name = route_name

    def wrap(self, next: Handler) -> Handler:
        async def handle(ctx: RequestContext) -> Response:
            response = await next(ctx)
            response.headers.append((b"x-served-by-route", self.route_name.encode()))
            return response

        return handle


def stamp(options: Mapping[str, Any], route: Any, runtime: Any) -> Stamp:
    return Stamp(route.name)


def skip_everything(options: Mapping[str, Any], route: Any, runtime: Any) -> None:
    return None
