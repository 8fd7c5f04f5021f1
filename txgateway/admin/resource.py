"""The admin listener: liveness, readiness and the admin API (``/admin/*``).

Served by twisted.web on its own port: it is not on the proxy hot path, and
it must keep answering when the proxy listener is saturated.

``/ready`` is about this gateway only (config loaded, listeners up).  It
shows how many instances of each upstream are available, as information, but
never fails because an upstream is down: a readiness probe that failed then
would take every gateway pod out of service at once for one dead backend.
That state is for ``/admin/upstreams``, behind ``admin.token`` when set.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Mapping

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from txgateway.upstream.upstream import Upstream

#: The current generation's upstreams, by name.
Upstreams = Callable[[], Mapping[str, Upstream]]


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

    def __init__(self, readiness: Callable[[], str | None], upstreams: Upstreams | None = None) -> None:
        super().__init__()
        self._readiness = readiness
        self._upstreams = upstreams

    def render_GET(self, request: Request) -> bytes:
        reason = self._readiness()
        if reason is None:
            payload: dict[str, object] = {"status": "ready"}
        else:
            payload = {"status": "not_ready", "reason": reason}
        if self._upstreams is not None:
            payload["upstreams"] = {
                name: {"available": len(upstream.available), "instances": len(upstream.instances)}
                for name, upstream in self._upstreams().items()
            }
        return _json(request, 200 if reason is None else 503, payload)

    render_HEAD = render_GET


class _Root(Resource):
    """Unknown admin paths get the gateway's JSON 404, not an HTML page."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NotFound()

    def render_GET(self, request: Request) -> bytes:
        return _json(request, 200, {"endpoints": ["/health", "/ready", "/admin/upstreams"]})


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return _json(request, 404, {"error": "not_found", "message": "no such admin endpoint"})


class _Unauthorized(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setHeader(b"www-authenticate", b'Bearer realm="txgateway-admin"')
        return _json(request, 401, {"error": "unauthorized", "message": "a valid admin bearer token is required"})


class AdminAPI(Resource):
    """``/admin/*``: with ``token`` set, every path below it (known or not)
    requires ``Authorization: Bearer <token>``, compared in constant time."""

    def __init__(self, upstreams: Upstreams, token: str | None) -> None:
        super().__init__()
        self._token = token.encode("utf-8") if token else None
        self._upstreams = upstreams

    def _authorized(self, request: Request) -> bool:
        if self._token is None:
            return True
        scheme, _, credentials = (request.getHeader(b"authorization") or b"").partition(b" ")
        # compare_digest even on a wrong scheme, so timing tells nothing either way.
        matches = hmac.compare_digest(credentials.strip(), self._token)
        return scheme.lower() == b"bearer" and matches

    def getChild(self, path: bytes, request: Request) -> Resource:
        # No putChild: every child goes through the token check here.
        if not self._authorized(request):
            return _Unauthorized()
        if path == b"upstreams":
            return UpstreamsState(self._upstreams)
        if path == b"":
            return self
        return _NotFound()

    def render_GET(self, request: Request) -> bytes:
        if not self._authorized(request):
            return _Unauthorized().render(request)
        return _json(request, 200, {"endpoints": ["/admin/upstreams"]})


class UpstreamsState(Resource):
    """``GET /admin/upstreams``: every upstream, its available count and its instances' health."""

    isLeaf = True

    def __init__(self, upstreams: Upstreams) -> None:
        super().__init__()
        self._upstreams = upstreams

    def render_GET(self, request: Request) -> bytes:
        if request.postpath and request.postpath != [b""]:
            return _NotFound().render(request)
        states = []
        for upstream in self._upstreams().values():
            config = upstream.config
            state = upstream.state()
            state["active_checks"] = config.health_check.enabled
            state["passive_health"] = config.passive_health is not None
            states.append(state)
        return _json(request, 200, {"upstreams": states})

    render_HEAD = render_GET


def admin_site(
    readiness: Callable[[], str | None], upstreams: Upstreams | None = None, token: str | None = None
) -> Site:
    """``readiness()`` returns None when ready, else why not; ``upstreams()`` the
    current generation's upstreams; ``token``, when set, guards ``/admin/*``."""
    root = _Root()
    root.putChild(b"health", Health())
    root.putChild(b"ready", Ready(readiness, upstreams))
    root.putChild(b"admin", AdminAPI(upstreams or dict, token))
    site = Site(root)
    site.displayTracebacks = False
    site.noisy = False
    # Probes hit these every few seconds; access logging them is noise.
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
