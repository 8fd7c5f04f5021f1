"""The Deferred-based chain every protocol runs.

A *handler* takes a :class:`RequestContext` and returns a Deferred firing
with a :class:`~txgateway.messages.Response` (or failing with a
:class:`~txgateway.errors.GatewayError`).  A *middleware* wraps the next
handler: it may answer itself (401, 429, 503) or pass the context on.

Chains are assembled once per route at config load, never per request, so a
route with a middleware switched off pays nothing for it.  The fixed order is
request id, CORS, auth, rate limit, cache, breaker, upstream; the assembly
lives in :mod:`txgateway.gateway`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from twisted.internet.defer import Deferred

from txgateway.messages import Response
from txgateway.pipeline.context import RequestContext

Handler = Callable[[RequestContext], "Deferred[Response]"]


class Middleware(Protocol):
    """Builds a handler that runs before (and around) ``next``."""

    def wrap(self, next: Handler) -> Handler: ...


def assemble(middlewares: Sequence[Middleware], terminal: Handler) -> Handler:
    """The chain ``middlewares[0] -> ... -> middlewares[-1] -> terminal``."""
    handler = terminal
    for middleware in reversed(middlewares):
        handler = middleware.wrap(handler)
    return handler
