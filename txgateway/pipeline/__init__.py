"""The pipeline every protocol runs: what a middleware author needs.

A middleware is an object with ``wrap(next: Handler) -> Handler``; a handler
takes a :class:`RequestContext` and returns a Deferred of a :class:`Response`
(or is an ``async def``, for user middlewares).  See README "Writing your own
middleware".
"""

from txgateway.pipeline.context import RequestContext
from txgateway.pipeline.pipeline import Handler, Middleware

__all__ = ["Handler", "Middleware", "RequestContext"]
