"""The gateway core in memory, through txgateway.testing: what the upstream
receives and what the client gets back, for each forwarding rule."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from txgateway.config import parse_config
from txgateway.errors import UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout
from txgateway.testing import GatewayHarness, MemoryUpstream, ReceivedRequest

CONFIG = """
server:
  trusted_proxies: ["10.0.0.0/8"]
  limits: {max_body_bytes: 100}
upstreams:
  users: {servers: ["10.1.1.1:9001", "10.1.1.2:9001"]}
routes:
  - name: users
    match: {path: "/api/users/{id}", methods: [GET, PUT]}
    upstream: users
    rewrite: /v2/users/{id}
    headers:
      request: {set: {x-gateway: txgateway}, remove: [x-debug]}
      response: {set: {x-frame-options: DENY}, remove: [server]}
  - name: files
    match: {path: "/files/*"}
    upstream: users
    strip_prefix: /files
    max_body_bytes: 10
  - name: big
    match: {path: "/big/*"}
    upstream: users
    max_body_bytes: 1000
"""


def echo(request: ReceivedRequest) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return 200, [(b"server", b"upstream/1"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")], b"ok"


class ForwardingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.upstream = MemoryUpstream(echo)
        self.gateway = GatewayHarness(parse_config(CONFIG), self.upstream, client_ip="192.0.2.7")

    def test_rewrite_with_params_keeps_query(self) -> None:
        response = self.gateway.request("GET", "/api/users/42?expand=1")
        self.assertEqual(response.status, 200)
        self.assertEqual(self.upstream.requests[0].target, b"/v2/users/42?expand=1")

    def test_strip_prefix(self) -> None:
        self.gateway.request("GET", "/files/a/b.txt")
        self.assertEqual(self.upstream.requests[0].target, b"/a/b.txt")

    def test_round_robin_over_servers(self) -> None:
        for _ in range(4):
            self.gateway.request("GET", "/files/x")
        self.assertEqual(
            [(r.host, r.port) for r in self.upstream.requests],
            [("10.1.1.1", 9001), ("10.1.1.2", 9001)] * 2,
        )

    def test_route_header_rules(self) -> None:
        response = self.gateway.request("GET", "/api/users/1", headers=[("x-debug", "1")])
        sent = self.upstream.requests[0]
        self.assertIsNone(sent.header(b"x-debug"))
        self.assertEqual(sent.header(b"x-gateway"), b"txgateway")
        self.assertIsNone(response.header("server"))
        self.assertEqual(response.header("x-frame-options"), "DENY")

    def test_repeated_response_headers_kept(self) -> None:
        response = self.gateway.request("GET", "/files/x")
        self.assertEqual([v for n, v in response.headers if n == b"set-cookie"], [b"a=1", b"b=2"])

    def test_untrusted_forwarded_for_replaced(self) -> None:
        self.gateway.request("GET", "/files/x", headers=[("x-forwarded-for", "6.6.6.6")], host="api.test")
        sent = self.upstream.requests[0]
        self.assertEqual(sent.header(b"x-forwarded-for"), b"192.0.2.7")
        self.assertEqual(sent.header(b"x-forwarded-host"), b"api.test")
        self.assertEqual(sent.header(b"x-forwarded-proto"), b"http")
        self.assertEqual(sent.header(b"host"), b"api.test")

    def test_trusted_proxy_chain_extended(self) -> None:
        gateway = GatewayHarness(parse_config(CONFIG), self.upstream, client_ip="10.0.0.5")
        gateway.request("GET", "/files/x", headers=[("x-forwarded-for", "203.0.113.9"), ("x-forwarded-proto", "https")])
        sent = self.upstream.requests[0]
        self.assertEqual(sent.header(b"x-forwarded-for"), b"203.0.113.9, 10.0.0.5")
        self.assertEqual(sent.header(b"x-forwarded-proto"), b"https")

    def test_request_id_generated_forwarded_and_returned(self) -> None:
        response = self.gateway.request("GET", "/files/x")
        request_id = response.header("x-request-id")
        self.assertTrue(request_id)
        self.assertEqual(self.upstream.requests[0].header(b"x-request-id"), request_id.encode())  # type: ignore[union-attr]

    def test_sane_client_request_id_kept(self) -> None:
        response = self.gateway.request("GET", "/files/x", headers=[("x-request-id", "abc-123")])
        self.assertEqual(response.header("x-request-id"), "abc-123")
        self.assertEqual(self.upstream.requests[0].header(b"x-request-id"), b"abc-123")

    def test_via_added_both_ways(self) -> None:
        response = self.gateway.request("GET", "/files/x", headers=[("via", "1.0 edge")])
        self.assertEqual(self.upstream.requests[0].header(b"via"), b"1.0 edge, 1.1 txgateway")
        self.assertEqual(response.header("via"), "1.1 txgateway")

    def test_hop_by_hop_request_headers_removed(self) -> None:
        self.gateway.request(
            "GET",
            "/files/x",
            headers=[("connection", "x-private"), ("x-private", "1"), ("te", "trailers"), ("keep-alive", "5"),
                     ("proxy-authorization", "Basic x"), ("upgrade", "h2c")],
        )
        names = {n for n, _ in self.upstream.requests[0].headers}
        for name in (b"connection", b"x-private", b"te", b"keep-alive", b"proxy-authorization", b"upgrade"):
            self.assertNotIn(name, names)

    def test_hop_by_hop_response_headers_removed(self) -> None:
        upstream = MemoryUpstream(
            lambda r: (200, [(b"connection", b"x-up"), (b"x-up", b"1"), (b"keep-alive", b"timeout=5"), (b"x-kept", b"y")], b"")
        )
        response = GatewayHarness(parse_config(CONFIG), upstream).request("GET", "/files/x")
        names = {n for n, _ in response.headers}
        self.assertNotIn(b"x-up", names)
        self.assertNotIn(b"keep-alive", names)
        self.assertIn(b"x-kept", names)

    def test_request_body_forwarded(self) -> None:
        self.gateway.request("PUT", "/api/users/1", body=b"payload")
        self.assertEqual(self.upstream.requests[0].body, b"payload")


class ErrorMappingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.upstream = MemoryUpstream(echo)
        self.gateway = GatewayHarness(parse_config(CONFIG), self.upstream)

    def test_no_route_404(self) -> None:
        response = self.gateway.request("GET", "/nowhere")
        self.assertEqual(response.status, 404)
        body = response.json()
        assert isinstance(body, dict)
        self.assertEqual(body["error"], "not_found")
        self.assertEqual(body["request_id"], response.header("x-request-id"))

    def test_method_not_allowed_405_with_allow(self) -> None:
        response = self.gateway.request("DELETE", "/api/users/1")
        self.assertEqual(response.status, 405)
        self.assertEqual(response.header("allow"), "GET, HEAD, PUT")

    def test_route_body_limit_overrides_server_limit(self) -> None:
        self.assertEqual(self.gateway.request("POST", "/files/x", body=b"x" * 11).status, 413)
        self.assertEqual(self.gateway.request("POST", "/big/x", body=b"x" * 500).status, 200)
        self.assertEqual(self.gateway.request("POST", "/api/users/1", body=b"x" * 101).status, 405)

    def test_grpc_streams_exempt_from_default_limit_but_not_a_routes_own(self) -> None:
        grpc = [("content-type", "application/grpc")]
        # Server-wide default (100 bytes) does not cap a gRPC stream's total...
        self.assertEqual(self.gateway.request("PUT", "/api/users/1", headers=grpc, body=b"x" * 150).status, 200)
        self.assertEqual(self.gateway.request("PUT", "/api/users/1", body=b"x" * 150).status, 413)
        # ...a route's own max_body_bytes does.
        self.assertEqual(self.gateway.request("POST", "/files/x", headers=grpc, body=b"x" * 11).status, 413)

    def test_upstream_failures_map_to_statuses(self) -> None:
        cases = [
            (UpstreamConnectError("refused"), 502, "bad_gateway"),
            (UpstreamProtocolError("garbage"), 502, "bad_gateway"),
            (UpstreamTimeout("slow"), 504, "gateway_timeout"),
        ]
        for error, status, code in cases:

            def fail(request: ReceivedRequest, error: Exception = error) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
                raise error

            response = GatewayHarness(parse_config(CONFIG), MemoryUpstream(fail)).request("GET", "/files/x")
            self.assertEqual(response.status, status)
            self.assertEqual(response.json(), {"error": code, "message": str(error), "request_id": response.header("x-request-id")})

    def test_unexpected_upstream_exception_is_opaque_500(self) -> None:
        def bug(request: ReceivedRequest) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            raise KeyError("internal detail")

        response = GatewayHarness(parse_config(CONFIG), MemoryUpstream(bug)).request("GET", "/files/x")
        self.assertEqual(response.status, 500)
        self.assertNotIn(b"internal detail", response.raw)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_dot_segments_cannot_escape_route(self) -> None:
        response = self.gateway.request("GET", "/files/../api/users/1")
        # Normalised to /api/users/1 and routed there, rewritten for the upstream.
        self.assertEqual(response.status, 200)
        self.assertEqual(self.upstream.requests[0].target, b"/v2/users/1")


HASHED = """
server:
  trusted_proxies: ["10.0.0.0/8"]
upstreams:
  shards:
    servers: ["10.1.0.1:80", "10.1.0.2:80", "10.1.0.3:80", "10.1.0.4:80"]
    load_balancer: consistent_hash
    hash_key: ip
routes:
  - {name: all, match: {path: "/*"}, upstream: shards}
"""


class ClientAddressTests(SynchronousTestCase):
    def test_ip_hash_uses_the_client_behind_a_trusted_proxy(self) -> None:
        upstream = MemoryUpstream(echo)
        gateway = GatewayHarness(parse_config(HASHED), upstream, client_ip="10.0.0.5")
        for client in range(40):
            for _ in range(2):
                gateway.request("GET", "/x", headers=[("x-forwarded-for", f"203.0.113.{client}")])
        hosts = [r.host for r in upstream.requests]
        # The same client always lands on the same shard...
        self.assertTrue(all(hosts[i] == hosts[i + 1] for i in range(0, len(hosts), 2)))
        # ...and different clients behind the one proxy spread over the shards.
        self.assertGreater(len(set(hosts)), 1)
