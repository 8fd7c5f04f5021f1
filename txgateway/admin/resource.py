"""The admin listener: liveness, readiness (and later metrics and the admin API).

Served by twisted.web on its own port: it is not on the proxy hot path, and
it must keep answering when the proxy listener is saturated.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from twisted.web.resource import Resource
from twisted.web.server import Request, Site


def _json(request: Request, status: int, payload: dict[str, object]) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(payload).encode("utf-8")


class Health(Resource):
    """Liveness: 200 while the process serves requests at all."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return _json(request, 200, {"status": "ok"})

    render_HEAD = render_GET


class Ready(Resource):
    """Readiness: 200 only with a loaded config and listening proxies."""

    isLeaf = True

    def __init__(self, readiness: Callable[[], str | None]) -> None:
        super().__init__()
        self._readiness = readiness

    def render_GET(self, request: Request) -> bytes:
        reason = self._readiness()
        if reason is None:
            return _json(request, 200, {"status": "ready"})
        return _json(request, 503, {"status": "not_ready", "reason": reason})

    render_HEAD = render_GET


class _Root(Resource):
    """Unknown admin paths get the gateway's JSON 404, not an HTML page."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NotFound()

    def render_GET(self, request: Request) -> bytes:
        return _json(request, 200, {"endpoints": ["/health", "/ready"]})


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return _json(request, 404, {"error": "not_found", "message": "no such admin endpoint"})


def admin_site(readiness: Callable[[], str | None]) -> Site:
    """``readiness()`` returns None when ready, else why not."""
    root = _Root()
    root.putChild(b"health", Health())
    root.putChild(b"ready", Ready(readiness))
    site = Site(root)
    site.displayTracebacks = False
    site.noisy = False
    # Probes hit these every few seconds; access logging them is noise.
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
