"""The admin listener's liveness and readiness answers."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from txgateway.admin.resource import admin_site


def get(readiness: object, path: bytes) -> tuple[int, dict[str, object]]:
    site = admin_site(readiness)  # type: ignore[arg-type]
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    resource = site.getResourceFor(request)
    body = resource.render(request)
    return request.responseCode or 200, json.loads(body)


class AdminTests(SynchronousTestCase):
    def test_health_is_always_ok(self) -> None:
        self.assertEqual(get(lambda: "listeners not up", b"/health"), (200, {"status": "ok"}))

    def test_ready_follows_readiness(self) -> None:
        self.assertEqual(get(lambda: None, b"/ready"), (200, {"status": "ready"}))
        self.assertEqual(
            get(lambda: "shutting down", b"/ready"), (503, {"status": "not_ready", "reason": "shutting down"})
        )

    def test_unknown_path_is_json_404(self) -> None:
        status, body = get(lambda: None, b"/nope")
        self.assertEqual(status, 404)
        self.assertEqual(body["error"], "not_found")
