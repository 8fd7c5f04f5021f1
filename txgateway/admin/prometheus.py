"""``/metrics``: the Prometheus text exposition, open like ``/health`` (Prometheus scrapes it).

The registry is the runtime's, so the numbers survive reloads; with
``server.workers > 1`` :func:`~txgateway.observability.metrics.exposition`
reports the whole process group.  With ``observability.metrics.enabled:
false`` the page does not exist (JSON 404), read per request so a reload
turns it on or off.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.web.resource import Resource
from twisted.web.server import Request

from txgateway.admin.page import NoSuchEndpoint, write_error
from txgateway.control import GatewayControl
from txgateway.errors import MethodNotAllowed
from txgateway.observability.metrics import exposition


class MetricsPage(Resource):
    isLeaf = True

    def __init__(self, control: GatewayControl) -> None:
        super().__init__()
        self._control = control

    def render(self, request: Request) -> bytes:
        gateway = self._control.gateway
        if request.postpath and request.postpath != [b""]:
            return write_error(request, NoSuchEndpoint())
        if not gateway.config.observability.metrics_enabled:
            return write_error(request, NoSuchEndpoint("metrics are disabled (observability.metrics.enabled)"))
        if request.method not in (b"GET", b"HEAD"):
            return write_error(request, MethodNotAllowed(("GET", "HEAD")))
        body = exposition(gateway.runtime.metrics)
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body
