"""``/health`` and ``/ready``: what kubelet (and load balancers) probe, never behind the token.

``/ready`` is about this gateway only (config loaded, listeners up).  It
shows how many instances of each upstream are available, as information, but
never fails because an upstream is down: a readiness probe that failed then
would take every gateway pod out of service at once for one dead backend.
That state is for ``/admin/upstreams``, behind ``admin.token`` when set.
"""

from __future__ import annotations

from twisted.web.server import Request

from txgateway.admin.page import Answer, JSONPage
from txgateway.control import GatewayControl


class Health(JSONPage):
    """Liveness: 200 while the process serves requests at all."""

    def answer(self, request: Request) -> Answer:
        return 200, {"status": "ok"}


class Ready(JSONPage):
    """Readiness: 200 only with a loaded config and listening proxies."""

    def __init__(self, control: GatewayControl) -> None:
        super().__init__()
        self._control = control

    def answer(self, request: Request) -> Answer:
        reason = self._control.readiness()
        if reason is None:
            payload: dict[str, object] = {"status": "ready"}
        else:
            payload = {"status": "not_ready", "reason": reason}
        payload["upstreams"] = {
            name: {"available": len(upstream.available), "instances": len(upstream.instances)}
            for name, upstream in self._control.gateway.upstreams.items()
        }
        return (200 if reason is None else 503), payload
