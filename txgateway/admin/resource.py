"""The admin listener: probes, metrics, the admin API and the dashboard.

Served by twisted.web on its own port: it is not on the proxy hot path, and
it must keep answering when the proxy listener is saturated.  Everything it
knows of the gateway comes through :class:`~txgateway.control.GatewayControl`.

========================  =====================================================
``/``, ``/static/*``      the dashboard (:mod:`txgateway.admin.dashboard`)
``/health``, ``/ready``   probes (:mod:`txgateway.admin.probes`), no token
``/metrics``              Prometheus exposition, no token
``/admin/*``              the admin API (:mod:`txgateway.admin.api`), token
========================  =====================================================
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from txgateway.admin.api import AdminAPI
from txgateway.admin.dashboard import dashboard
from txgateway.admin.page import ErrorPage, NoSuchEndpoint
from txgateway.admin.probes import Health, Ready
from txgateway.admin.prometheus import MetricsPage
from txgateway.admin.traffic import TrafficSampler
from txgateway.control import GatewayControl


class _Root(Resource):
    """Unknown admin paths get the gateway's JSON 404, not an HTML page."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return ErrorPage(NoSuchEndpoint())


class AdminSite(Site):
    """The admin listener's site; its :attr:`sampler` runs (while watched) only while it listens.

    twisted.web stops a factory when its last port stops, so the dashboard's
    sampling ends with the admin port (``stopListening`` at service stop) and
    needs no separate stop call; ``/admin/stats`` starts it.
    """

    def __init__(self, resource: Resource, sampler: TrafficSampler) -> None:
        super().__init__(resource)
        self.sampler = sampler
        self.displayTracebacks = False
        self.noisy = False

    def stopFactory(self) -> None:
        self.sampler.stop()
        super().stopFactory()

    def log(self, request: http.Request) -> None:
        """Probes and the dashboard hit this every few seconds: access logging them is noise."""


def admin_site(
    control: GatewayControl,
    clock: IReactorTime | None = None,
    *,
    sample_interval: float = 2.0,
    window: float = 15.0,
) -> AdminSite:
    """The admin listener's site for ``control``.

    ``clock`` (default: the runtime's) paces the dashboard's traffic sampling:
    a snapshot of the request metrics every ``sample_interval`` seconds, rates
    over the last ``window`` seconds.
    """
    sampler = TrafficSampler(
        control, clock if clock is not None else control.gateway.runtime.clock, sample_interval, window
    )
    index, static = dashboard()
    root = _Root()
    root.putChild(b"", index)
    root.putChild(b"static", static)
    root.putChild(b"health", Health())
    root.putChild(b"ready", Ready(control))
    root.putChild(b"metrics", MetricsPage(control))
    root.putChild(b"admin", AdminAPI(control, sampler))
    return AdminSite(root, sampler)
