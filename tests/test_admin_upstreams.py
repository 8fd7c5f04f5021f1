"""The admin API's view of upstream health, its bearer token, and /ready's information."""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from txgateway.admin.resource import admin_site
from txgateway.config import parse_config
from txgateway.testing import MemoryUpstream
from txgateway.upstream.upstream import Upstream

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
        config = parse_config(CONFIG)
        client = MemoryUpstream(lambda request: (200, [], b""))
        self.upstreams = {name: Upstream(c, client, self.clock) for name, c in config.upstreams.items()}
        self.ready: str | None = None

    def get(
        self, path: bytes, token: str | None = None, authorization: bytes | None = None
    ) -> tuple[int, dict[str, object], DummyRequest]:
        site = admin_site(lambda: self.ready, lambda: self.upstreams, token)
        request = DummyRequest(path.lstrip(b"/").split(b"/"))
        if authorization is not None:
            request.requestHeaders.setRawHeaders(b"authorization", [authorization])
        body = site.getResourceFor(request).render(request)
        return request.responseCode or 200, json.loads(body), request

    def test_upstream_state(self) -> None:
        users = self.upstreams["users"]
        users.instances[0].active_healthy = False
        users.instances[1].ejected_until = 12.0
        self.clock.advance(2)
        users.refresh()
        status, body, request = self.get(b"/admin/upstreams")
        self.assertEqual(status, 200)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(
            body["upstreams"],
            [
                {
                    "name": "users",
                    "available": 0,
                    "active_checks": True,
                    "passive_health": True,
                    "instances": [
                        {"address": "10.0.0.1:80", "weight": 1, "healthy": False, "active_healthy": False,
                         "ejected_for": 0.0, "in_flight": 0},
                        {"address": "10.0.0.2:80", "weight": 3, "healthy": False, "active_healthy": True,
                         "ejected_for": 10.0, "in_flight": 0},
                    ],
                },
                {
                    "name": "orders",
                    "available": 1,
                    "active_checks": False,
                    "passive_health": False,
                    "instances": [
                        {"address": "10.0.1.1:80", "weight": 1, "healthy": True, "active_healthy": True,
                         "ejected_for": 0.0, "in_flight": 0},
                    ],
                },
            ],
        )

    def test_token_required_when_set(self) -> None:
        for authorization in (None, b"Bearer wrong", b"Basic s3cret", b"s3cret", b"Bearer", b"Bearer s3cret2"):
            status, body, request = self.get(b"/admin/upstreams", "s3cret", authorization)
            self.assertEqual(status, 401, authorization)
            self.assertEqual(body["error"], "unauthorized")
            self.assertEqual(request.responseHeaders.getRawHeaders(b"www-authenticate"), [b'Bearer realm="txgateway-admin"'])

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
        for instance in self.upstreams["users"].instances:
            instance.active_healthy = False
        self.upstreams["users"].refresh()
        status, body, _ = self.get(b"/ready")
        self.assertEqual(status, 200)  # a dead backend does not pull the gateway out of service
        self.assertEqual(
            body,
            {
                "status": "ready",
                "upstreams": {"users": {"available": 0, "instances": 2}, "orders": {"available": 1, "instances": 1}},
            },
        )
        self.ready = "shutting down"
        status, body, _ = self.get(b"/ready")
        self.assertEqual((status, body["status"], body["reason"]), (503, "not_ready", "shutting down"))
        self.assertIn("upstreams", body)
