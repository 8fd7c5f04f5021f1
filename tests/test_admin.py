"""The admin listener's liveness and readiness answers."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from tests.test_admin_api import ControlDouble
from txgateway.admin.resource import admin_site
from txgateway.config import parse_config


def get(readiness: str | None, path: bytes) -> tuple[int, dict[str, object]]:
    control = ControlDouble(parse_config("{}"))
    control.not_ready = readiness
    site = admin_site(control)
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    resource = site.getResourceFor(request)
    body = resource.render(request)
    return request.responseCode or 200, json.loads(body)


class AdminTests(SynchronousTestCase):
    def test_health_is_always_ok(self) -> None:
        self.assertEqual(get("listeners not up", b"/health"), (200, {"status": "ok"}))

    def test_ready_follows_readiness(self) -> None:
        self.assertEqual(get(None, b"/ready"), (200, {"status": "ready", "upstreams": {}}))
        self.assertEqual(
            get("shutting down", b"/ready"),
            (503, {"status": "not_ready", "reason": "shutting down", "upstreams": {}}),
        )

    def test_unknown_path_is_json_404(self) -> None:
        status, body = get(None, b"/nope")
        self.assertEqual(status, 404)
        self.assertEqual(body["error"], "not_found")
