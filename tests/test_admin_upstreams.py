"""The admin API's view of upstream health, its bearer token, and /ready's information."""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from tests.test_admin_api import ControlDouble
from txgateway.admin.resource import admin_site
from txgateway.config import parse_config

CONFIG = """
upstreams:
  users:
    servers: ["10.0.0.1:80", {address: "10.0.0.2:80", weight: 3}]
    health_check: {enabled: true}
    passive_health: {}
  orders:
    servers: ["10.0.1.1:80"]
routes:
  - {match: {path: "/users/*"}, upstream: users}
  - {match: {path: "/orders/*"}, upstream: orders}
"""


class AdminUpstreamsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def control(self, token: str | None = None) -> ControlDouble:
        text = CONFIG if token is None else CONFIG + f"\nadmin: {{token: '{token}'}}\n"
        return ControlDouble(parse_config(text), self.clock)

    def get(
        self,
        path: bytes,
        token: str | None = None,
        authorization: bytes | None = None,
        control: ControlDouble | None = None,
    ) -> tuple[int, dict[str, object], DummyRequest]:
        site = admin_site(control or self.control(token), self.clock)
        request = DummyRequest(path.lstrip(b"/").split(b"/"))
        if authorization is not None:
            request.requestHeaders.setRawHeaders(b"authorization", [authorization])
        body = site.getResourceFor(request).render(request)
        return request.responseCode or 200, json.loads(body), request

    def test_upstream_state(self) -> None:
        control = self.control()
        users = control.gateway.upstreams["users"]
        users.instances[0].active_healthy = False
        users.instances[1].ejected_until = 12.0
        self.clock.advance(2)
        users.refresh()
        status, body, request = self.get(b"/admin/upstreams", control=control)
        self.assertEqual(status, 200)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(
            body["upstreams"],
            [
                {
                    "name": "users",
                    "available": 0,
                    "protocol": "http",
                    "active_checks": True,
                    "passive_health": True,
                    "breaker": None,
                    "instances": [
                        {"address": "10.0.0.1:80", "weight": 1, "healthy": False, "active_healthy": False,
                         "ejected_for": 0.0, "in_flight": 0, "status": "down"},
                        {"address": "10.0.0.2:80", "weight": 3, "healthy": False, "active_healthy": True,
                         "ejected_for": 10.0, "in_flight": 0, "status": "ejected"},
                    ],
                },
                {
                    "name": "orders",
                    "available": 1,
                    "protocol": "http",
                    "active_checks": False,
                    "passive_health": False,
                    "breaker": None,
                    "instances": [
                        {"address": "10.0.1.1:80", "weight": 1, "healthy": True, "active_healthy": True,
                         "ejected_for": 0.0, "in_flight": 0, "status": "healthy"},
                    ],
                },
            ],
        )  # fmt: skip

    def test_token_required_when_set(self) -> None:
        for authorization in (None, b"Bearer wrong", b"Basic s3cret", b"s3cret", b"Bearer", b"Bearer s3cret2"):
            status, body, request = self.get(b"/admin/upstreams", "s3cret", authorization)
            self.assertEqual(status, 401, authorization)
            self.assertEqual(body["error"], "unauthorized")
            self.assertEqual(
                request.responseHeaders.getRawHeaders(b"www-authenticate"), [b'Bearer realm="txgateway-admin"']
            )

    def test_right_token_is_accepted(self) -> None:
        for authorization in (b"Bearer s3cret", b"bearer s3cret"):
            status, body, _ = self.get(b"/admin/upstreams", "s3cret", authorization)
            self.assertEqual(status, 200, authorization)
            self.assertEqual(len(body["upstreams"]), 2)  # type: ignore[arg-type]

    def test_token_guards_every_admin_path(self) -> None:
        self.assertEqual(self.get(b"/admin/nope", "s3cret")[0], 401)  # no hint of what exists
        self.assertEqual(self.get(b"/admin", "s3cret")[0], 401)
        self.assertEqual(self.get(b"/admin/nope", "s3cret", b"Bearer s3cret")[0], 404)
        self.assertEqual(self.get(b"/admin", "s3cret", b"Bearer s3cret")[0], 200)

    def test_no_token_configured_means_open(self) -> None:
        self.assertEqual(self.get(b"/admin/upstreams")[0], 200)
        self.assertEqual(self.get(b"/admin/upstreams", "")[0], 200)  # ${ADMIN_TOKEN:-} unset

    def test_probes_never_need_the_token(self) -> None:
        self.assertEqual(self.get(b"/health", "s3cret")[0], 200)
        self.assertEqual(self.get(b"/ready", "s3cret")[0], 200)

    def test_ready_shows_availability_but_stays_about_the_gateway(self) -> None:
        control = self.control()
        for instance in control.gateway.upstreams["users"].instances:
            instance.active_healthy = False
        control.gateway.upstreams["users"].refresh()
        status, body, _ = self.get(b"/ready", control=control)
        self.assertEqual(status, 200)  # a dead backend does not pull the gateway out of service
        self.assertEqual(
            body,
            {
                "status": "ready",
                "upstreams": {"users": {"available": 0, "instances": 2}, "orders": {"available": 1, "instances": 1}},
            },
        )
        control.not_ready = "shutting down"
        status, body, _ = self.get(b"/ready", control=control)
        self.assertEqual((status, body["status"], body["reason"]), (503, "not_ready", "shutting down"))
        self.assertIn("upstreams", body)
