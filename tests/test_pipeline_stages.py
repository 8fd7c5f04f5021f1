"""CORS and user middlewares, through the real gateway in memory."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from txgateway.config import ConfigError, parse_config
from txgateway.testing import GatewayHarness, HarnessResponse, MemoryUpstream, ReceivedRequest


def ok(request: ReceivedRequest) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return 200, [(b"content-type", b"text/plain")], b"ok"


CORS_CONFIG = """
upstreams:
  app: {servers: ["127.0.0.1:9001"]}
routes:
  - {name: items, match: {path: "/items/{id}", methods: [GET, PUT]}, upstream: app}
  - {name: any, match: {path: "/any/*"}, upstream: app}
middleware:
  cors:
    allow_origins: ["https://app.example.com"]
    allow_methods: [GET, PUT]
    allow_headers: [authorization, content-type]
    max_age: 600
"""


class CORSTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.upstream = MemoryUpstream(ok)
        self.gateway = GatewayHarness(parse_config(CORS_CONFIG), self.upstream)

    def preflight(self, origin: str, method: str = "PUT", path: str = "/items/1") -> HarnessResponse:
        return self.gateway.request(
            "OPTIONS",
            path,
            headers=[("origin", origin), ("access-control-request-method", method)],
        )

    def test_preflight_answered_at_the_gateway(self) -> None:
        response = self.preflight("https://app.example.com")
        self.assertEqual(response.status, 204)
        self.assertEqual(response.header("access-control-allow-origin"), "https://app.example.com")
        self.assertEqual(response.header("access-control-allow-methods"), "GET, PUT")
        self.assertEqual(response.header("access-control-allow-headers"), "authorization, content-type")
        self.assertEqual(response.header("access-control-max-age"), "600")
        # The route does not list OPTIONS, yet the preflight reaches it, and
        # the upstream never sees it.
        self.assertEqual(self.upstream.requests, [])

    def test_preflight_from_unknown_origin_refused(self) -> None:
        response = self.preflight("https://evil.example")
        self.assertEqual(response.status, 403)
        self.assertIsNone(response.header("access-control-allow-origin"))

    def test_preflight_for_method_the_route_refuses_is_405(self) -> None:
        response = self.preflight("https://app.example.com", "DELETE")
        self.assertEqual(response.status, 405)
        self.assertEqual(response.header("allow"), "GET, HEAD, PUT")

    def test_preflight_for_method_cors_refuses_is_403(self) -> None:
        response = self.preflight("https://app.example.com", "DELETE", path="/any/thing")
        self.assertEqual(response.status, 403)
        self.assertIsNone(response.header("access-control-allow-origin"))

    def test_allowed_origin_gets_header_on_responses_and_errors(self) -> None:
        response = self.gateway.request("GET", "/items/1", headers=[("origin", "https://app.example.com")])
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("access-control-allow-origin"), "https://app.example.com")
        self.assertEqual(response.header("vary"), "origin")
        error = self.gateway.request("DELETE", "/items/1", headers=[("origin", "https://app.example.com")])
        self.assertEqual(error.status, 405)

    def test_error_from_the_chain_carries_cors_headers(self) -> None:
        from txgateway.errors import UpstreamConnectError

        def refuse(request: ReceivedRequest) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            raise UpstreamConnectError()

        gateway = GatewayHarness(parse_config(CORS_CONFIG), MemoryUpstream(refuse))
        response = gateway.request("GET", "/items/1", headers=[("origin", "https://app.example.com")])
        self.assertEqual(response.status, 502)
        self.assertEqual(response.header("access-control-allow-origin"), "https://app.example.com")

    def test_other_origins_pass_without_cors_headers(self) -> None:
        response = self.gateway.request("GET", "/items/1", headers=[("origin", "https://other.example")])
        self.assertEqual(response.status, 200)
        self.assertIsNone(response.header("access-control-allow-origin"))

    def test_plain_options_without_preflight_headers_is_routed_normally(self) -> None:
        self.assertEqual(self.gateway.request("OPTIONS", "/items/1").status, 405)


CUSTOM_CONFIG = """
upstreams:
  app: {servers: ["127.0.0.1:9001"]}
routes:
  - {name: orders, match: {path: "/orders/*"}, upstream: app}
  - {name: public, match: {path: "/public/*"}, upstream: app}
middleware:
  custom:
    - name: tenant
      factory: "tests.example_middleware:tenant"
      options: {header: X-Org}
      routes: [orders]
    - name: stamp
      factory: "tests.example_middleware:stamp"
"""


class CustomMiddlewareTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.upstream = MemoryUpstream(ok)
        self.gateway = GatewayHarness(parse_config(CUSTOM_CONFIG), self.upstream)

    def test_user_middleware_can_refuse(self) -> None:
        response = self.gateway.request("GET", "/orders/1")
        self.assertEqual(response.status, 403)
        self.assertEqual(response.json(), {"error": "forbidden", "message": "tenant header required",
                                           "request_id": response.header("x-request-id")})
        self.assertEqual(self.upstream.requests, [])

    def test_user_middleware_edits_request_with_options(self) -> None:
        self.gateway.request("GET", "/orders/1", headers=[("x-org", "acme")])
        self.assertEqual(self.upstream.requests[0].header(b"x-tenant-id"), b"acme")

    def test_routes_filter_and_async_middleware(self) -> None:
        response = self.gateway.request("GET", "/public/x")
        # tenant applies only to "orders"; the async stamp applies everywhere.
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("x-served-by-route"), "public")

    def test_factory_may_skip_a_route(self) -> None:
        config = parse_config(CUSTOM_CONFIG.replace("tests.example_middleware:stamp", "tests.example_middleware:skip_everything"))
        response = GatewayHarness(config, MemoryUpstream(ok)).request("GET", "/public/x")
        self.assertEqual(response.status, 200)
        self.assertIsNone(response.header("x-served-by-route"))

    def test_bad_factory_reference_is_a_config_error(self) -> None:
        bad = CUSTOM_CONFIG.replace("tests.example_middleware:stamp", "tests.example_middleware:stmp").replace(
            "routes: [orders]", "routes: [ordres]"
        )
        with self.assertRaises(ConfigError) as raised:
            parse_config(bad, source="gw.yaml")
        text = str(raised.exception)
        self.assertIn("gw.yaml: middleware.custom[1].factory: module 'tests.example_middleware' has no attribute 'stmp'", text)
        self.assertIn("middleware.custom[0].routes[0]: unknown route 'ordres'", text)

    def test_unknown_entry_point_is_a_config_error(self) -> None:
        bad = CUSTOM_CONFIG.replace("tests.example_middleware:stamp", "no-such-plugin")
        with self.assertRaises(ConfigError) as raised:
            parse_config(bad)
        self.assertIn("no entry point 'no-such-plugin' in group 'txgateway.middleware'", str(raised.exception))

    def test_middleware_disabled_globally(self) -> None:
        config = parse_config(CUSTOM_CONFIG + "  enabled: false\n")
        response = GatewayHarness(config, MemoryUpstream(ok)).request("GET", "/orders/1")
        self.assertEqual(response.status, 200)


STRIP_CONFIG = """
upstreams:
  app: {servers: ["127.0.0.1:9001"]}
routes:
  - {name: open, match: {path: "/open/*"}, upstream: app, auth: none}
middleware:
  enabled: false
  auth:
    jwt_secret: "not-used-here-but-configured"
    forward_claims: {sub: X-User-ID}
"""


class ClaimHeaderStripTests(SynchronousTestCase):
    def test_client_copies_stripped_even_with_middleware_disabled(self) -> None:
        upstream = MemoryUpstream(ok)
        gateway = GatewayHarness(parse_config(STRIP_CONFIG), upstream)
        response = gateway.request("GET", "/open/x", headers=[("x-user-id", "admin"), ("x-other", "kept")])
        self.assertEqual(response.status, 200)
        sent = upstream.requests[0]
        self.assertIsNone(sent.header(b"x-user-id"))
        self.assertEqual(sent.header(b"x-other"), b"kept")
