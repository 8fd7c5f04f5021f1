"""``/admin/*``: the admin API, behind ``admin.token`` when it is set.

With a token, every path below ``/admin/`` (known or not) needs
``Authorization: Bearer <token>``, compared in constant time; the token is
the current generation's, so a reload that changes it applies at once.
Without one (the config allows that only on a loopback or unix socket
bind), requests must name the admin listener by address (``127.0.0.1``,
``localhost``, ``[::1]``...): a web page under another host name that
resolves to 127.0.0.1 (DNS rebinding) cannot read or reload the gateway.
``POST /admin/reload`` also refuses a cross-origin ``Origin`` (a form post
from another site).
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import urlsplit

from twisted.web.resource import Resource
from twisted.web.server import Request

from txgateway.admin.page import Answer, ErrorPage, JSONPage, NoSuchEndpoint, write_error
from txgateway.admin.redaction import redacted_config
from txgateway.admin.state import breaker_states, rate_limits, route_table, upstream_states
from txgateway.admin.traffic import TrafficSampler
from txgateway.control import GatewayControl
from txgateway.errors import Forbidden, Unauthorized

ENDPOINTS = (
    "/admin/config",
    "/admin/routes",
    "/admin/upstreams",
    "/admin/breakers",
    "/admin/ratelimits",
    "/admin/reloads",
    "/admin/reload",
    "/admin/stats",
)


class AdminUnauthorized(Unauthorized):
    default_message = "a valid admin bearer token is required"

    def __init__(self) -> None:
        super().__init__(None, [(b"www-authenticate", b'Bearer realm="txgateway-admin"')])


def _host_is_address(host: bytes | None) -> bool:
    """Whether a Host header names an IP address or localhost (or is absent)."""
    if host is None:
        return True
    name = host.decode("latin-1").strip().lower()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name[1:]
    else:
        name = name.rpartition(":")[0] if ":" in name else name
    if name in ("localhost", "localhost."):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _same_origin(request: Request) -> bool:
    origin = request.getHeader(b"origin")
    if origin is None:
        return True
    host = request.getHeader(b"host")
    try:
        netloc = urlsplit(origin.decode("latin-1")).netloc
    except ValueError:
        return False
    return host is not None and netloc.lower() == host.decode("latin-1").lower()


class AdminAPI(Resource):
    """Routes ``/admin/<name>`` to its page after the token check (no putChild:
    every child, known or not, goes through :meth:`getChild`)."""

    def __init__(self, control: GatewayControl, sampler: TrafficSampler) -> None:
        super().__init__()
        self._control = control
        self._pages: dict[bytes, Resource] = {
            b"config": ConfigPage(control),
            b"routes": RoutesPage(control),
            b"upstreams": UpstreamsPage(control),
            b"breakers": BreakersPage(control),
            b"ratelimits": RateLimitsPage(control),
            b"reloads": ReloadsPage(control),
            b"reload": ReloadPage(control),
            b"stats": StatsPage(control, sampler),
        }

    def refusal(self, request: Request) -> ErrorPage | None:
        """Why ``request`` may not use the admin API, or None when it may."""
        token = self._control.gateway.config.admin.token
        if not token:
            if not _host_is_address(request.getHeader(b"host")):
                return ErrorPage(
                    Forbidden("without admin.token the admin API answers only to an IP address or localhost")
                )
            return None
        scheme, _, credentials = (request.getHeader(b"authorization") or b"").partition(b" ")
        # compare_digest even on a wrong scheme, so timing tells nothing either way.
        matches = hmac.compare_digest(credentials.strip(), token.encode("utf-8"))
        if scheme.lower() == b"bearer" and matches:
            return None
        return ErrorPage(AdminUnauthorized())

    def getChild(self, path: bytes, request: Request) -> Resource:
        refused = self.refusal(request)
        if refused is not None:
            return refused
        if path == b"":
            return self
        return self._pages.get(path) or ErrorPage(NoSuchEndpoint())

    def render(self, request: Request) -> bytes:
        refused = self.refusal(request)
        if refused is not None:
            return refused.render(request)
        return Index().render(request)


class Index(JSONPage):
    def answer(self, request: Request) -> Answer:
        return 200, {"endpoints": list(ENDPOINTS)}


class _ControlPage(JSONPage):
    def __init__(self, control: GatewayControl) -> None:
        super().__init__()
        self._control = control


class ConfigPage(_ControlPage):
    """``GET /admin/config``: the running configuration, secrets redacted."""

    def answer(self, request: Request) -> Answer:
        return 200, {"config": redacted_config(self._control.gateway.config)}


class RoutesPage(_ControlPage):
    """``GET /admin/routes``: the route table in config order."""

    def answer(self, request: Request) -> Answer:
        return 200, {"routes": route_table(self._control.gateway.config)}


class UpstreamsPage(_ControlPage):
    """``GET /admin/upstreams``: every upstream, its instances' health and its breaker."""

    def answer(self, request: Request) -> Answer:
        return 200, {"upstreams": upstream_states(self._control.gateway.upstreams)}


class BreakersPage(_ControlPage):
    """``GET /admin/breakers``: the circuit breaker of every upstream that has one."""

    def answer(self, request: Request) -> Answer:
        return 200, {"breakers": breaker_states(self._control.gateway.upstreams)}


class RateLimitsPage(_ControlPage):
    """``GET /admin/ratelimits``: the default limit and the one each route runs with."""

    def answer(self, request: Request) -> Answer:
        return 200, rate_limits(self._control.gateway.config)


class ReloadsPage(_ControlPage):
    """``GET /admin/reloads``: the recent reload attempts, newest first."""

    def answer(self, request: Request) -> Answer:
        return 200, {"reloads": [result.as_json() for result in self._control.reloads()]}


class ReloadPage(_ControlPage):
    """``POST /admin/reload``: load the config file again now.

    200 with the result when the new config serves (or the file was
    unchanged); 422 with the problems when it was refused and the running
    generation goes on.
    """

    allowed = ("POST",)

    def render(self, request: Request) -> bytes:
        if request.method == b"POST" and not _same_origin(request):
            return write_error(request, Forbidden("cross-origin reload refused"))
        return super().render(request)

    def answer(self, request: Request) -> Answer:
        result = self._control.reload("api")
        payload = result.as_json()
        if result.ok:
            return 200, payload
        payload["error"] = "invalid_config"
        payload["message"] = f"the configuration was not reloaded; generation {result.generation} keeps serving"
        return 422, payload


class StatsPage(_ControlPage):
    """``GET /admin/stats``: everything the dashboard shows, in one answer."""

    def __init__(self, control: GatewayControl, sampler: TrafficSampler) -> None:
        super().__init__(control)
        self._sampler = sampler

    def answer(self, request: Request) -> Answer:
        control = self._control
        gateway = control.gateway
        self._sampler.watch()
        traffic = self._sampler.traffic()
        routes = []
        for route in route_table(gateway.config):
            seen = traffic.get(str(route["name"]))
            route["traffic"] = None if seen is None else seen.as_json()
            routes.append(route)
        reloads = control.reloads()
        last = reloads[0].as_json() if reloads else None
        span = self._sampler.span()
        return 200, {
            "generation": reloads[0].generation if reloads else None,
            "ready": control.readiness() is None,
            "not_ready_reason": control.readiness(),
            "metrics_enabled": gateway.config.observability.metrics_enabled,
            "window": None if span is None else round(span, 3),
            "sample_interval": self._sampler.interval,
            "routes": routes,
            "unmatched": None if "" not in traffic else traffic[""].as_json(),
            "upstreams": upstream_states(gateway.upstreams),
            "breakers": breaker_states(gateway.upstreams),
            "last_reload": last,
        }
