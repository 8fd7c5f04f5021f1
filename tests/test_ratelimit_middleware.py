"""The rate-limit stage through the real gateway in memory: statuses, headers on
allowed, limited and failed responses, per-route counts, tiers, reloads, and
what ``on_storage_error`` does when the shared store cannot decide."""

from __future__ import annotations

from typing import Any, ClassVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from txgateway.auth.identity import Identity
from txgateway.config import parse_config
from txgateway.config.model import RateLimitConfig
from txgateway.errors import UpstreamConnectError
from txgateway.gateway import Gateway
from txgateway.messages import Response
from txgateway.pipeline.context import RequestContext
from txgateway.ratelimit import middleware
from txgateway.ratelimit.decision import Algorithm, Decision, StorageError
from txgateway.ratelimit.keys import key_function
from txgateway.ratelimit.memory import MemoryStore
from txgateway.ratelimit.middleware import RateLimit
from txgateway.testing import GatewayHarness, HarnessResponse, MemoryUpstream, ReceivedRequest

RATE_HEADERS = (
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
)

CONFIG = """
server:
  trusted_proxies: ["10.0.0.0/8"]
upstreams:
  app: {servers: ["10.1.1.1:9001"]}
routes:
  - name: api
    match: {path: "/api/*"}
    upstream: app
  - name: other
    match: {path: "/other/*"}
    upstream: app
  - name: per-tenant
    match: {path: "/tenants/*"}
    upstream: app
    rate_limit: {requests_per_minute: 60, burst_size: 2, key: "header:X-Tenant"}
  - name: window
    match: {path: "/window/*"}
    upstream: app
    rate_limit: {algorithm: sliding_window, requests_per_minute: 3}
  - name: unlimited
    match: {path: "/free/*"}
    upstream: app
    rate_limit: {enabled: false}
middleware:
  rate_limit:
    requests_per_minute: 60
    burst_size: 3
    key: ip
"""


def ok(request: ReceivedRequest) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return 200, [(b"content-type", b"text/plain")], b"ok"


def rate_headers(response: HarnessResponse) -> dict[str, str | None]:
    return {name: response.header(name) for name in RATE_HEADERS}


def counts(response: HarnessResponse) -> tuple[int, str | None, str | None, str | None]:
    return (
        response.status,
        response.header("ratelimit-limit"),
        response.header("ratelimit-remaining"),
        response.header("ratelimit-reset"),
    )


class HeadersAndStatusTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.upstream = MemoryUpstream(ok)
        self.gateway = GatewayHarness(parse_config(CONFIG), self.upstream, client_ip="10.0.0.1")

    def get(self, path: str, client: str = "203.0.113.1", **headers: str) -> HarnessResponse:
        sent = [("x-forwarded-for", client), *((k.replace("_", "-"), v) for k, v in headers.items())]
        return self.gateway.request("GET", path, headers=sent)

    def test_allowed_responses_count_down(self) -> None:
        responses = [self.get("/api/x") for _ in range(3)]
        self.assertEqual(
            [counts(r) for r in responses],
            [(200, "3", "2", "1"), (200, "3", "1", "2"), (200, "3", "0", "3")],
        )
        for response in responses:
            self.assertEqual(response.header("x-ratelimit-limit"), response.header("ratelimit-limit"))
            self.assertEqual(response.header("x-ratelimit-remaining"), response.header("ratelimit-remaining"))
            self.assertEqual(response.header("x-ratelimit-reset"), response.header("ratelimit-reset"))
        self.assertEqual(len(self.upstream.requests), 3)

    def test_limited_response(self) -> None:
        for _ in range(3):
            self.get("/api/x")
        self.gateway.clock.advance(0.25)
        response = self.get("/api/x")
        self.assertEqual(response.status, 429)
        self.assertEqual(response.json(), {
            "error": "rate_limited",
            "message": "rate limit exceeded, retry in 1 s",
            "request_id": response.header("x-request-id"),
        })  # fmt: skip
        self.assertEqual(response.header("retry-after"), "1")
        self.assertEqual(
            rate_headers(response),
            dict.fromkeys(("ratelimit-limit", "x-ratelimit-limit"), "3")
            | dict.fromkeys(("ratelimit-remaining", "x-ratelimit-remaining"), "0")
            | dict.fromkeys(("ratelimit-reset", "x-ratelimit-reset"), "3"),
        )
        self.assertEqual(len(self.upstream.requests), 3)

    def test_admitted_again_after_retry_after(self) -> None:
        for _ in range(4):
            response = self.get("/api/x")
        self.assertEqual(response.status, 429)
        self.gateway.clock.advance(int(response.header("retry-after") or 0))
        self.assertEqual(self.get("/api/x").status, 200)

    def test_gateway_errors_carry_the_headers_too(self) -> None:
        def broken(request: ReceivedRequest) -> Any:
            raise UpstreamConnectError()

        gateway = GatewayHarness(parse_config(CONFIG), MemoryUpstream(broken), client_ip="198.51.100.1")
        response = gateway.request("GET", "/api/x")
        self.assertEqual(counts(response), (502, "3", "2", "1"))

    def test_upstream_copies_are_replaced(self) -> None:
        def own_headers(request: ReceivedRequest) -> Any:
            return 200, [(b"ratelimit-limit", b"5000"), (b"x-ratelimit-remaining", b"4999"), (b"x-other", b"1")], b""

        gateway = GatewayHarness(parse_config(CONFIG), MemoryUpstream(own_headers), client_ip="198.51.100.1")
        response = gateway.request("GET", "/api/x")
        self.assertEqual([v for n, v in response.headers if n == b"ratelimit-limit"], [b"3"])
        self.assertEqual([v for n, v in response.headers if n == b"x-ratelimit-remaining"], [b"2"])
        self.assertEqual(response.header("x-other"), "1")

    def test_each_client_has_its_own_bucket(self) -> None:
        for _ in range(3):
            self.get("/api/x", client="203.0.113.1")
        self.assertEqual(self.get("/api/x", client="203.0.113.1").status, 429)
        self.assertEqual(self.get("/api/x", client="203.0.113.2").status, 200)

    def test_spoofed_forwarded_for_gets_no_fresh_bucket(self) -> None:
        for _ in range(3):
            self.get("/api/x", client="203.0.113.1")
        for forged in ("1.2.3.4, 203.0.113.1", "10.0.0.7, 203.0.113.1"):
            self.assertEqual(self.get("/api/x", client=forged).status, 429)

    def test_each_route_has_its_own_limit(self) -> None:
        for _ in range(3):
            self.get("/api/x")
        self.assertEqual(self.get("/api/x").status, 429)
        self.assertEqual(counts(self.get("/other/x")), (200, "3", "2", "1"))

    def test_route_override_and_header_key(self) -> None:
        statuses = [self.get("/tenants/x", x_tenant="acme").status for _ in range(3)]
        self.assertEqual(statuses, [200, 200, 429])
        self.assertEqual(self.get("/tenants/x", x_tenant="globex").status, 200)
        # Without the header: per client address.
        self.assertEqual([self.get("/tenants/x").status for _ in range(3)], [200, 200, 429])

    def test_sliding_window_route(self) -> None:
        responses = [self.get("/window/x") for _ in range(4)]
        self.assertEqual([r.status for r in responses], [200, 200, 200, 429])
        self.assertEqual(responses[0].header("ratelimit-limit"), "3")
        self.assertEqual(responses[2].header("ratelimit-remaining"), "0")

    def test_disabled_route_has_no_limit_and_no_headers(self) -> None:
        responses = [self.get("/free/x") for _ in range(10)]
        self.assertEqual({r.status for r in responses}, {200})
        self.assertEqual(rate_headers(responses[0]), dict.fromkeys(RATE_HEADERS))

    def test_no_rate_limit_configured(self) -> None:
        config = parse_config(
            "upstreams: {app: {servers: ['10.1.1.1:1']}}\nroutes: [{match: {path: /*}, upstream: app}]"
        )
        gateway = GatewayHarness(config, MemoryUpstream(ok))
        self.assertIsNone(middleware.for_route(config.routes[0], config, gateway.runtime))
        self.assertIsNone(gateway.request("GET", "/x").header("ratelimit-limit"))

    def test_idle_buckets_expire(self) -> None:
        for i in range(50):
            self.get("/api/x", client=f"203.0.113.{i}")
        store = self.gateway.runtime.shared(middleware.MEMORY_STORE, lambda: None)
        assert isinstance(store, MemoryStore)
        self.assertEqual(len(store), 50)
        self.gateway.clock.advance(60)
        self.assertEqual(len(store), 0)

    def test_reload_keeps_the_counts_of_unchanged_routes(self) -> None:
        for _ in range(3):
            self.get("/api/x")
        self.gateway.gateway = Gateway(parse_config(CONFIG), lambda _: self.upstream, self.gateway.runtime)
        self.assertEqual(self.get("/api/x").status, 429)
        changed = CONFIG.replace("burst_size: 3", "burst_size: 5")
        self.gateway.gateway = Gateway(parse_config(changed), lambda _: self.upstream, self.gateway.runtime)
        self.assertEqual(counts(self.get("/api/x")), (200, "5", "4", "1"))

    def test_runtime_stop_leaves_nothing_scheduled(self) -> None:
        self.get("/api/x")
        self.assertNotEqual(self.gateway.clock.getDelayedCalls(), [])
        self.gateway.runtime.stop()
        self.assertEqual(self.gateway.clock.getDelayedCalls(), [])


TIERS = """
upstreams:
  app: {servers: ["10.1.1.1:9001"]}
routes:
  - name: api
    match: {path: "/api/*"}
    upstream: app
    auth: optional
middleware:
  auth:
    api_keys:
      keys:
        # sha256 of "premium-key", "admin-key", "both-key"
        - {sha256: "%s", consumer: paying, roles: [premium]}
        - {sha256: "%s", consumer: boss, roles: [admin]}
        - {sha256: "%s", consumer: both, roles: [premium, admin]}
  rate_limit:
    requests_per_minute: 100
    burst_size: 10
    key: consumer
    tiers:
      - {role: admin, requests_per_minute: 1000, burst_size: 100}
      - {permission: "rate:premium", requests_per_minute: 300, burst_size: 30}
      - {role: premium, requests_per_minute: 300, burst_size: 30}
"""


def sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


class TierTests(SynchronousTestCase):
    def limiter(self) -> RateLimit:
        config = parse_config(TIERS % (sha256("premium-key"), sha256("admin-key"), sha256("both-key")))
        rate_limit = config.middleware.rate_limit
        assert rate_limit is not None
        return RateLimit("api", rate_limit, key_function("consumer"), MemoryStore(Clock()))

    def test_first_matching_tier_wins(self) -> None:
        limiter = self.limiter()
        cases = [
            (None, "default", 10),
            (Identity("x"), "default", 10),
            (Identity("x", roles=frozenset({"premium"})), "role=premium", 30),
            (Identity("x", permissions=frozenset({"rate:premium"})), "permission=rate%3Apremium", 30),
            (Identity("x", roles=frozenset({"premium", "admin"})), "role=admin", 100),
            (Identity("x", roles=frozenset({"admin"}), permissions=frozenset({"rate:premium"})), "role=admin", 100),
            (Identity("x", roles=frozenset({"viewer"})), "default", 10),
        ]
        for identity, label, limit in cases:
            with self.subTest(identity=identity):
                policy = limiter.policy(identity)
                self.assertEqual((policy.label, policy.algorithm.limit), (label, limit))

    def test_tiers_end_to_end_with_api_keys(self) -> None:
        config = parse_config(TIERS % (sha256("premium-key"), sha256("admin-key"), sha256("both-key")))
        gateway = GatewayHarness(config, MemoryUpstream(ok))
        for key, limit in ((None, "10"), ("premium-key", "30"), ("admin-key", "100"), ("both-key", "100")):
            with self.subTest(key=key):
                headers = [("x-api-key", key)] if key else []
                response = gateway.request("GET", "/api/x", headers=headers)
                self.assertEqual((response.status, response.header("ratelimit-limit")), (200, limit))

    def test_tier_limits_are_enforced_per_consumer(self) -> None:
        config = parse_config(TIERS % (sha256("premium-key"), sha256("admin-key"), sha256("both-key")))
        gateway = GatewayHarness(config, MemoryUpstream(ok))
        statuses = [gateway.request("GET", "/api/x", headers=[("x-api-key", "premium-key")]).status for _ in range(31)]
        self.assertEqual(statuses.count(200), 30)
        self.assertEqual(statuses[-1], 429)
        # Anonymous requests from the same address are counted separately (by address).
        self.assertEqual(gateway.request("GET", "/api/x").status, 200)


class FakeRedisStore:
    """Stands in for RedisStore: fails, or answers from a memory store."""

    instances: ClassVar[list[FakeRedisStore]] = []

    def __init__(self, url: str, reactor: object, clock: Clock) -> None:
        self.url = url
        self.failing = True
        self.backing = MemoryStore(clock)
        self.calls: list[tuple[str, float]] = []
        FakeRedisStore.instances.append(self)

    def decide(self, algorithm: Algorithm, key: str, timeout: float) -> Deferred[Decision]:
        self.calls.append((key, timeout))
        if self.failing:
            return fail(StorageError("connection refused"))
        return succeed(self.backing.decide(algorithm, key))


REDIS = """
upstreams:
  app: {servers: ["10.1.1.1:9001"]}
routes:
  - name: api
    match: {path: "/api/*"}
    upstream: app
middleware:
  rate_limit:
    requests_per_minute: 60
    burst_size: 2
    storage: redis
    redis: {url: "redis://127.0.0.1:6390/0", timeout: 0.02}
    on_storage_error: %s
"""


class StorageErrorTests(SynchronousTestCase):
    def setUp(self) -> None:
        FakeRedisStore.instances = []
        self.patch(middleware, "RedisStore", FakeRedisStore)
        self.upstream = MemoryUpstream(ok)

    def gateway(self, on_error: str) -> tuple[GatewayHarness, FakeRedisStore]:
        gateway = GatewayHarness(parse_config(REDIS % on_error), self.upstream)
        [store] = FakeRedisStore.instances
        self.assertEqual(store.url, "redis://127.0.0.1:6390/0")
        return gateway, store

    def test_healthy_store_decides(self) -> None:
        gateway, store = self.gateway("deny")
        store.failing = False
        responses = [gateway.request("GET", "/api/x") for _ in range(3)]
        self.assertEqual(
            [counts(r) for r in responses], [(200, "2", "1", "1"), (200, "2", "0", "2"), (429, "2", "0", "2")]
        )
        self.assertEqual(store.calls[0], ("api:tb:60:2:default:ip:127.0.0.1", 0.02))

    def test_allow(self) -> None:
        gateway, _ = self.gateway("allow")
        responses = [gateway.request("GET", "/api/x") for _ in range(5)]
        self.assertEqual({r.status for r in responses}, {200})
        self.assertEqual(rate_headers(responses[0]), dict.fromkeys(RATE_HEADERS))
        self.assertEqual(len(self.upstream.requests), 5)

    def test_deny(self) -> None:
        gateway, _ = self.gateway("deny")
        response = gateway.request("GET", "/api/x")
        self.assertEqual(response.status, 503)
        self.assertEqual(response.json(), {
            "error": "service_unavailable",
            "message": "rate limit storage unavailable",
            "request_id": response.header("x-request-id"),
        })  # fmt: skip
        self.assertEqual(response.header("retry-after"), "1")
        self.assertEqual(self.upstream.requests, [])

    def test_local(self) -> None:
        gateway, _ = self.gateway("local")
        responses = [gateway.request("GET", "/api/x") for _ in range(3)]
        self.assertEqual(
            [counts(r) for r in responses], [(200, "2", "1", "1"), (200, "2", "0", "2"), (429, "2", "0", "2")]
        )
        self.assertEqual(responses[2].header("retry-after"), "1")

    def test_back_to_the_store_when_it_recovers(self) -> None:
        gateway, store = self.gateway("deny")
        self.assertEqual(gateway.request("GET", "/api/x").status, 503)
        store.failing = False
        self.assertEqual(counts(gateway.request("GET", "/api/x")), (200, "2", "1", "1"))

    def test_one_connection_for_every_route_and_reload(self) -> None:
        config = parse_config(
            (REDIS % "deny").replace("routes:", "routes:\n  - {name: b, match: {path: /b}, upstream: app}")
        )
        gateway = GatewayHarness(config, self.upstream)
        gateway.gateway = Gateway(config, lambda _: self.upstream, gateway.runtime)
        self.assertEqual(len(FakeRedisStore.instances), 1)

    def test_other_failures_are_not_storage_errors(self) -> None:
        config = RateLimitConfig(storage="redis", on_storage_error="allow", key="route")

        class Broken:
            def decide(self, algorithm: Algorithm, key: str, timeout: float) -> Deferred[Decision]:
                return fail(ZeroDivisionError())

        limiter = RateLimit("r", config, key_function("route"), MemoryStore(Clock()), Broken())

        def terminal(ctx: RequestContext) -> Deferred[Response]:
            raise AssertionError("must not be reached")

        d = limiter.wrap(terminal)(RequestContext(b"GET", "/", b"", [], client_ip="127.0.0.1"))
        self.failureResultOf(d, ZeroDivisionError)
