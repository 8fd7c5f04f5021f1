"""The admin API: every ``/admin/*`` endpoint, the token, redaction, reloads, stats, /metrics.

The control is a double of :class:`~txgateway.control.GatewayControl` around
a real in-memory :class:`~txgateway.gateway.Gateway` (built as
:class:`~txgateway.testing.GatewayHarness` builds it) and a fake clock; the
admin site is the real one, walked with twisted.web's ``DummyRequest``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from txgateway.admin.redaction import REDACTED, looks_secret, redact_url, redacted_config
from txgateway.admin.resource import AdminSite, admin_site
from txgateway.admin.state import route_middlewares
from txgateway.admin.traffic import RouteTotals, quantile, traffic_between
from txgateway.config import GatewayConfig, parse_config
from txgateway.config.model import GatewayConfig as ModelConfig
from txgateway.control import ReloadResult
from txgateway.gateway import Gateway
from txgateway.pipeline.assembly import middlewares_for
from txgateway.testing import GatewayHarness, MemoryUpstream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ControlDouble:
    """A GatewayControl over a real in-memory gateway; ``reload`` swaps in
    ``next_config`` (a new generation) or fails with ``next_errors``."""

    def __init__(self, config: GatewayConfig, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.upstream = MemoryUpstream(lambda request: (200, [], b"ok"))
        self.harness = GatewayHarness(config, self.upstream, self.clock)
        self._gateway = self.harness.gateway
        self.not_ready: str | None = None
        self.results: list[ReloadResult] = [ReloadResult(1, True, "startup", 1000.0, config.source)]
        self.next_config: GatewayConfig | None = None
        self.next_errors: tuple[str, ...] = ()
        self.triggers: list[str] = []

    @property
    def gateway(self) -> Gateway:
        return self._gateway

    def readiness(self) -> str | None:
        return self.not_ready

    def reloads(self) -> Sequence[ReloadResult]:
        return list(self.results)

    def reload(self, trigger: str) -> ReloadResult:
        self.triggers.append(trigger)
        generation = self.results[0].generation
        at = 1000.0 + self.clock.seconds()
        if self.next_config is None:
            result = ReloadResult(generation, False, trigger, at, "gw.yaml", errors=self.next_errors)
        else:
            self._gateway = Gateway(self.next_config, lambda _c: self.upstream, self.harness.runtime)
            result = ReloadResult(generation + 1, True, trigger, at, "gw.yaml", changes=("route extra: added",))
        self.results.insert(0, result)
        return result


class Answer:
    def __init__(self, request: DummyRequest, body: bytes) -> None:
        self.request = request
        self.status = request.responseCode or 200
        self.body = body

    def header(self, name: bytes) -> bytes | None:
        values = self.request.responseHeaders.getRawHeaders(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def call(site: AdminSite, path: str, method: bytes = b"GET", headers: Sequence[tuple[bytes, bytes]] = ()) -> Answer:
    request = DummyRequest(path.lstrip("/").encode("ascii").split(b"/"))
    request.method = method
    for name, value in headers:
        request.requestHeaders.addRawHeader(name, value)
    body = site.getResourceFor(request).render(request)
    assert isinstance(body, bytes)
    return Answer(request, body)


CONFIG = """
upstreams:
  users:
    servers: ["10.0.0.1:80", {address: "10.0.0.2:80", weight: 3}]
    health_check: {enabled: true}
    passive_health: {}
    circuit_breaker: {failure_threshold: 2, recovery_timeout: 30}
  orders:
    protocol: grpc
    servers: ["10.0.1.1:80"]
routes:
  - {name: users, match: {path: "/users/*", methods: [GET, PUT], host: api.example.com}, upstream: users}
  - {name: orders, match: {path: "/orders/*"}, upstream: orders}
"""

TOKEN = "adm-t0ken"
BEARER = (b"authorization", b"Bearer " + TOKEN.encode())


def with_token(text: str, token: str = TOKEN) -> str:
    return text + f"\nadmin: {{token: {token}}}\n"


class AdminTestCase(SynchronousTestCase):
    config_text = CONFIG

    def setUp(self) -> None:
        self.clock = Clock()
        self.control = ControlDouble(parse_config(self.config_text, source="gw.yaml"), self.clock)
        self.site = admin_site(self.control, self.clock, sample_interval=2.0, window=10.0)

    def get(self, path: str, *headers: tuple[bytes, bytes], method: bytes = b"GET") -> Answer:
        return call(self.site, path, method, headers)


class ProbeTests(AdminTestCase):
    def test_health_is_ok_even_when_not_ready(self) -> None:
        self.control.not_ready = "listeners not up"
        answer = self.get("/health")
        self.assertEqual((answer.status, answer.json()), (200, {"status": "ok"}))
        self.assertEqual(answer.header(b"content-type"), b"application/json")

    def test_ready_follows_readiness_and_shows_availability(self) -> None:
        answer = self.get("/ready")
        self.assertEqual(answer.status, 200)
        self.assertEqual(
            answer.json(),
            {
                "status": "ready",
                "upstreams": {"users": {"available": 2, "instances": 2}, "orders": {"available": 1, "instances": 1}},
            },
        )
        self.control.not_ready = "shutting down"
        answer = self.get("/ready")
        self.assertEqual((answer.status, answer.json()["reason"]), (503, "shutting down"))

    def test_probes_refuse_other_methods_in_json(self) -> None:
        answer = self.get("/health", method=b"DELETE")
        self.assertEqual((answer.status, answer.json()["error"]), (405, "method_not_allowed"))
        self.assertEqual(answer.header(b"allow"), b"GET, HEAD")

    def test_unknown_paths_are_json_404(self) -> None:
        for path in ("/nope", "/health/x", "/static/nope.js", "/static/", "/metrics/x", "/favicon.ico"):
            answer = self.get(path)
            self.assertEqual((answer.status, answer.json()["error"]), (404, "not_found"), path)
            self.assertEqual(answer.header(b"content-type"), b"application/json", path)


class MetricsTests(AdminTestCase):
    def test_prometheus_exposition(self) -> None:
        metrics = self.control.gateway.runtime.metrics
        metrics.requests.labels(route="users", method="GET", code="200", protocol="http/1.1").inc(3)
        answer = self.get("/metrics")
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.header(b"content-type"), CONTENT_TYPE_LATEST.encode())
        self.assertIn(
            b'txgateway_requests_total{code="200",method="GET",protocol="http/1.1",route="users"} 3.0', answer.body
        )
        self.assertIn(b"# TYPE txgateway_request_duration_seconds histogram", answer.body)

    def test_metrics_need_no_token(self) -> None:
        control = ControlDouble(parse_config(with_token(CONFIG)), self.clock)
        site = admin_site(control, self.clock)
        self.assertEqual(call(site, "/metrics").status, 200)
        self.assertEqual(call(site, "/admin/stats").status, 401)

    def test_disabled_metrics_are_not_found(self) -> None:
        control = ControlDouble(parse_config(CONFIG + "\nobservability: {metrics: {enabled: false}}\n"))
        answer = call(admin_site(control, self.clock), "/metrics")
        self.assertEqual((answer.status, answer.json()["error"]), (404, "not_found"))
        self.assertIn("observability.metrics.enabled", answer.json()["message"])


class TokenTests(AdminTestCase):
    config_text = with_token(CONFIG)
    ENDPOINTS = ("/admin", "/admin/", "/admin/config", "/admin/routes", "/admin/upstreams", "/admin/breakers",
                 "/admin/ratelimits", "/admin/reloads", "/admin/reload", "/admin/stats", "/admin/nope")  # fmt: skip

    def test_every_admin_path_needs_the_token(self) -> None:
        wrong = (
            None,
            b"Bearer wrong",
            b"Basic " + TOKEN.encode(),
            TOKEN.encode(),
            b"Bearer",
            b"Bearer " + TOKEN.encode() + b"x",
        )
        for path in self.ENDPOINTS:
            for authorization in wrong:
                headers = [] if authorization is None else [(b"authorization", authorization)]
                answer = self.get(path, *headers)
                self.assertEqual(answer.status, 401, (path, authorization))
                self.assertEqual(answer.json()["error"], "unauthorized")
                self.assertEqual(answer.header(b"www-authenticate"), b'Bearer realm="txgateway-admin"')
        self.assertEqual(self.control.triggers, [])  # POST /admin/reload never ran either

    def test_right_token_is_accepted_whatever_the_scheme_case(self) -> None:
        for authorization in (b"Bearer " + TOKEN.encode(), b"bearer " + TOKEN.encode(), b"BEARER  " + TOKEN.encode()):
            answer = self.get("/admin/upstreams", (b"authorization", authorization))
            self.assertEqual(answer.status, 200, authorization)
        self.assertEqual(self.get("/admin/nope", BEARER).status, 404)  # no hint of what exists before the token
        self.assertEqual(self.get("/admin", BEARER).json()["endpoints"][0], "/admin/config")

    def test_the_current_generations_token_applies(self) -> None:
        self.control.next_config = parse_config(with_token(CONFIG, "rotated"))
        self.assertEqual(self.get("/admin/reload", BEARER, method=b"POST").status, 200)
        self.assertEqual(self.get("/admin/routes", BEARER).status, 401)
        self.assertEqual(self.get("/admin/routes", (b"authorization", b"Bearer rotated")).status, 200)

    def test_probes_dashboard_and_metrics_stay_open(self) -> None:
        for path in ("/health", "/ready", "/metrics", "/", "/static/dashboard.js"):
            self.assertEqual(self.get(path).status, 200, path)


class TokenlessHostTests(AdminTestCase):
    """Without a token only an address may name the listener: no DNS rebinding."""

    def test_addresses_are_accepted(self) -> None:
        for host in (b"127.0.0.1:9090", b"localhost:9090", b"localhost", b"[::1]:9090", b"10.1.2.3"):
            self.assertEqual(self.get("/admin/routes", (b"host", host)).status, 200, host)
        self.assertEqual(self.get("/admin/routes").status, 200)  # HTTP/1.0, no Host

    def test_host_names_are_refused(self) -> None:
        for host in (b"evil.example:9090", b"attacker.test", b"127.0.0.1.nip.io"):
            answer = self.get("/admin/config", (b"host", host))
            self.assertEqual((answer.status, answer.json()["error"]), (403, "forbidden"), host)
        self.assertEqual(self.get("/health", (b"host", b"evil.example")).status, 200)

    def test_cross_origin_reload_is_refused(self) -> None:
        self.control.next_config = parse_config(CONFIG)
        host = (b"host", b"127.0.0.1:9090")
        answer = self.get("/admin/reload", host, (b"origin", b"http://evil.example"), method=b"POST")
        self.assertEqual((answer.status, answer.json()["error"]), (403, "forbidden"))
        self.assertEqual(self.control.triggers, [])
        same = self.get("/admin/reload", host, (b"origin", b"http://127.0.0.1:9090"), method=b"POST")
        self.assertEqual(same.status, 200)


SECRETS_CONFIG = """
admin:
  listen_addr: "0.0.0.0:9090"
  token: "admin-token-s3cret"
upstreams:
  users:
    servers: ["127.0.0.1:9001"]
    load_balancer: consistent_hash
    hash_key: "header:x-user-id"
  discovered:
    discovery: {type: consul, name: users, token: "consul-token-s3cret",
                url: "http://consul-user:consul-pw-s3cret@127.0.0.1:8500"}
routes:
  - name: users
    match: {path: "/users/*", headers: {x-internal-token: "match-token-s3cret", x-api-version: "2"}}
    upstream: users
    headers:
      request: {set: {authorization: "Bearer upstream-token-s3cret", x-api-key: "upstream-key-s3cret",
                      cookie: "session=cookie-s3cret", x-gateway: txgateway}}
    rate_limit: {requests_per_minute: 5, redis: {url: "redis://:route-redis-pw-s3cret@127.0.0.1:6379/2"}}
  - {name: other, match: {path: "/other/*"}, upstream: discovered}
middleware:
  auth:
    enabled: true
    jwt_secret: "jwt-secret-s3cret"
    api_keys:
      header: X-API-Key
      keys:
        - {sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", consumer: ci-bot, roles: [premium]}
    forward_claims: {sub: X-User-ID}
  rate_limit:
    requests_per_minute: 60
    key: consumer
    tiers: [{role: premium, requests_per_minute: 300}]
    redis: {url: "redis://:redis-pw-s3cret@127.0.0.1:6379/0"}
  cache:
    redis: {url: "redis://cache-user:cache-pw-s3cret@127.0.0.1:6379/1"}
  custom:
    - name: tenant
      factory: "tests.example_middleware:tenant"
      options: {header: x-tenant, signing_secret: "mw-secret-s3cret", apiKey: "mw-key-s3cret",
                nested: {password: "nested-pw-s3cret", visible: "plain-value"}, list: [{token: "list-token-s3cret"}]}
observability:
  tracing:
    enabled: false
    otlp_endpoint: "http://127.0.0.1:4318/v1/traces?api_key=otlp-key-s3cret&region=eu"
"""

#: Every secret value in SECRETS_CONFIG has this in it.
MARKER = "s3cret"


class ConfigTests(AdminTestCase):
    config_text = SECRETS_CONFIG

    def config(self) -> dict[str, Any]:
        answer = self.get("/admin/config", (b"authorization", b"Bearer admin-token-s3cret"))
        self.assertEqual(answer.status, 200)
        self.assertNotIn(MARKER.encode(), answer.body)
        self.assertNotIn(b"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", answer.body)
        config: dict[str, Any] = answer.json()["config"]
        return config

    def test_no_secret_value_appears(self) -> None:
        config = self.config()
        self.assertEqual(config["admin"], {"listen": "tcp:9090:interface=0.0.0.0", "token": REDACTED})
        auth = config["middleware"]["auth"]
        self.assertEqual(auth["jwt"]["secret"], REDACTED)
        self.assertEqual(auth["api_keys"], [{"sha256": REDACTED, "consumer": "ci-bot", "roles": ["premium"]}])
        self.assertEqual(auth["forward_claims"], {"sub": "x-user-id"})
        self.assertEqual(config["middleware"]["rate_limit"]["redis_url"], "redis://REDACTED@127.0.0.1:6379/0")
        self.assertEqual(config["middleware"]["cache"]["redis_url"], "redis://REDACTED@127.0.0.1:6379/1")
        route = config["routes"][0]
        self.assertEqual(route["match"]["headers"], {"x-internal-token": REDACTED, "x-api-version": "2"})
        self.assertEqual(
            route["request_headers"]["set"],
            {"authorization": REDACTED, "x-api-key": REDACTED, "cookie": REDACTED, "x-gateway": "txgateway"},
        )
        options = config["middleware"]["custom"][0]["options"]
        self.assertEqual(
            options,
            {
                "header": "x-tenant",
                "signing_secret": REDACTED,
                "apiKey": REDACTED,
                "nested": {"password": REDACTED, "visible": "plain-value"},
                "list": [{"token": REDACTED}],
            },
        )
        discovery = config["upstreams"]["discovered"]["discovery"]["options"]
        self.assertEqual(discovery, {"url": "http://REDACTED@127.0.0.1:8500", "token": REDACTED})
        self.assertEqual(
            config["observability"]["tracing"]["otlp_endpoint"],
            "http://127.0.0.1:4318/v1/traces?api_key=REDACTED&region=eu",
        )

    def test_non_secrets_named_like_secrets_stay_visible(self) -> None:
        config = self.config()
        self.assertEqual(config["upstreams"]["users"]["hash_key"], "header:x-user-id")
        self.assertEqual(config["middleware"]["auth"]["api_key_header"], "x-api-key")
        self.assertEqual(config["middleware"]["rate_limit"]["key"], "consumer")
        self.assertEqual(config["routes"][0]["match"]["path"], "/users/*")

    def test_every_model_field_named_like_a_secret_is_decided(self) -> None:
        """A new config field whose name looks secret must be redacted or listed as harmless."""
        import dataclasses

        from txgateway.admin import redaction
        from txgateway.config import model

        named = set()
        for cls in vars(model).values():
            if isinstance(cls, type) and dataclasses.is_dataclass(cls):
                named |= {(cls, f.name) for f in dataclasses.fields(cls) if looks_secret(f.name)}
        harmless = redaction._NOT_SECRET
        redacted = named - harmless
        self.assertEqual(
            {(cls.__name__, name) for cls, name in redacted},
            {("AdminConfig", "token"), ("JWTConfig", "secret")},
        )

    def test_empty_values_are_shown(self) -> None:
        config = redacted_config(ModelConfig())
        self.assertIsNone(config["admin"]["token"])  # type: ignore[index]

    def test_url_redaction(self) -> None:
        self.assertEqual(redact_url("redis://127.0.0.1:6379/0"), "redis://127.0.0.1:6379/0")
        self.assertEqual(redact_url("rediss://u:p@h:6380/0"), "rediss://REDACTED@h:6380/0")
        self.assertEqual(
            redact_url("unix:///run/redis.sock?password=pw&db=1"), "unix:///run/redis.sock?password=REDACTED&db=1"
        )
        self.assertEqual(redact_url("not a url"), "not a url")


ROUTES_CONFIG = """
upstreams:
  users:
    servers: ["127.0.0.1:9001"]
    circuit_breaker: {}
    retry: {attempts: 3}
    fallback: {status: 503, body: "{}"}
  grpc:
    protocol: grpc
    servers: ["127.0.0.1:9002"]
  chat:
    servers: ["127.0.0.1:9003"]
routes:
  - name: users
    match: {path: "/users/{id}", methods: [GET, PUT], host: api.example.com, headers: {x-api-version: "2"}}
    upstream: users
    strip_prefix: /users
    roles: [admin]
    cache: {ttl: 10}
  - {name: grpc, match: {path: "/pkg.Service/*"}, upstream: grpc, auth: none, rate_limit: {enabled: false}}
  - {name: chat, match: {path: "/chat"}, upstream: chat, websocket: true, auth: optional}
middleware:
  auth: {enabled: true, jwt_secret: "x", forward_claims: {sub: X-User-ID}}
  rate_limit: {requests_per_minute: 60, tiers: [{role: premium, requests_per_minute: 600}]}
  cors: {allow_origins: ["https://app.example.com"]}
  custom:
    - {name: tenant, factory: "tests.example_middleware:tenant", routes: [users]}
"""


class RouteTableTests(AdminTestCase):
    config_text = ROUTES_CONFIG

    def test_route_table(self) -> None:
        answer = self.get("/admin/routes")
        self.assertEqual(answer.status, 200)
        users, grpc, chat = answer.json()["routes"]
        self.assertEqual(
            users,
            {
                "name": "users",
                "methods": ["GET", "PUT"],
                "hosts": ["api.example.com"],
                "paths": ["/users/{id}"],
                "headers": ["x-api-version"],
                "upstream": "users",
                "strip_prefix": "/users",
                "rewrite": None,
                "auth": None,
                "roles": ["admin"],
                "middlewares": ["cors", "auth", "rate_limit", "custom:tenant", "cache", "fallback", "breaker", "retry"],
                "websocket": False,
                "grpc": False,
            },
        )
        self.assertEqual((grpc["middlewares"], grpc["grpc"], grpc["methods"], grpc["hosts"]),
                         (["cors", "strip_claim_headers"], True, [], []))  # fmt: skip
        self.assertEqual((chat["middlewares"], chat["websocket"]), (["cors", "auth", "rate_limit"], True))

    def test_listed_stages_are_the_built_ones(self) -> None:
        """The table says what assembly builds: one built middleware per listed pipeline stage."""
        config = self.control.gateway.config
        for route in config.routes:
            listed = [s for s in route_middlewares(route, config) if s not in ("fallback", "breaker", "retry")]
            custom = [s for s in listed if s.startswith("custom:")]
            expected = len(listed) - len(custom) + (1 if custom else 0)  # custom ones chain into one
            self.assertEqual(len(middlewares_for(route, config, self.control.harness.runtime)), expected, route.name)

    def test_ratelimits(self) -> None:
        answer = self.get("/admin/ratelimits")
        self.assertEqual(answer.status, 200)
        body = answer.json()
        tiers = [{"role": "premium", "requests_per_minute": 600, "burst_size": 10}]
        self.assertEqual(body["default"]["tiers"], tiers)
        self.assertEqual(body["default"]["requests_per_minute"], 60)
        users, grpc, chat = body["routes"]
        self.assertEqual((users["route"], users["source"]), ("users", "middleware"))
        self.assertEqual(users["rate_limit"]["algorithm"], "token_bucket")
        self.assertEqual(users["rate_limit"]["key"], "consumer")
        self.assertEqual(grpc, {"route": "grpc", "source": None, "rate_limit": None})
        self.assertEqual(chat["rate_limit"]["tiers"], tiers)


class RouteLimitTests(AdminTestCase):
    config_text = SECRETS_CONFIG.replace('token: "admin-token-s3cret"', "token: t")

    def test_route_override_and_redis_url(self) -> None:
        body = self.get("/admin/ratelimits", (b"authorization", b"Bearer t")).json()
        users = body["routes"][0]
        self.assertEqual(users["source"], "route")
        self.assertEqual(users["rate_limit"]["requests_per_minute"], 5)
        self.assertEqual(users["rate_limit"]["tiers"], [])  # a route's own limit does not inherit tiers
        self.assertNotIn("redis", users["rate_limit"])  # memory storage: no redis settings to show
        self.assertNotIn(MARKER, json.dumps(body))


class UpstreamAndBreakerTests(AdminTestCase):
    def test_upstream_state(self) -> None:
        users = self.control.gateway.upstreams["users"]
        users.instances[0].active_healthy = False
        users.instances[1].ejected_until = 12.0
        self.clock.advance(2)
        users.refresh()
        answer = self.get("/admin/upstreams")
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.header(b"content-type"), b"application/json")
        self.assertEqual(answer.header(b"cache-control"), b"no-store")
        breaker = {"state": "closed", "retry_after": 0.0, "failure_threshold": 2, "recovery_timeout": 30.0,
                   "success_threshold": 1}  # fmt: skip
        self.assertEqual(
            answer.json()["upstreams"],
            [
                {
                    "name": "users",
                    "available": 0,
                    "protocol": "http",
                    "active_checks": True,
                    "passive_health": True,
                    "breaker": breaker,
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
                    "protocol": "grpc",
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

    def test_breakers(self) -> None:
        breaker = self.control.gateway.upstreams["users"].breaker
        assert breaker is not None
        self.assertEqual(self.get("/admin/breakers").json()["breakers"][0]["state"], "closed")
        for _ in range(2):
            breaker.record(breaker.admit(), True)
        self.clock.advance(10)
        answer = self.get("/admin/breakers")
        self.assertEqual(
            answer.json(),
            {
                "breakers": [
                    {"upstream": "users", "state": "open", "retry_after": 20.0, "failure_threshold": 2,
                     "recovery_timeout": 30.0, "success_threshold": 1},
                ]
            },
        )  # fmt: skip

    def test_head_and_wrong_methods(self) -> None:
        self.assertEqual(self.get("/admin/upstreams", method=b"HEAD").status, 200)
        answer = self.get("/admin/routes", method=b"POST")
        self.assertEqual((answer.status, answer.json()["error"]), (405, "method_not_allowed"))
        self.assertEqual(answer.header(b"allow"), b"GET, HEAD")
        self.assertEqual(self.get("/admin/routes/extra").status, 404)


class ReloadTests(AdminTestCase):
    def test_reloads_lists_results_newest_first(self) -> None:
        self.control.next_errors = ("gw.yaml: routes[0].upstream: unknown upstream 'x'",)
        self.get("/admin/reload", method=b"POST")
        reloads = self.get("/admin/reloads").json()["reloads"]
        self.assertEqual([(r["trigger"], r["ok"]) for r in reloads], [("api", False), ("startup", True)])
        self.assertEqual(reloads[1], ReloadResult(1, True, "startup", 1000.0, "gw.yaml").as_json())

    def test_reload_ok(self) -> None:
        self.control.next_config = parse_config(
            CONFIG + '  - {name: extra, match: {path: "/extra"}, upstream: users}\n', source="gw.yaml"
        )
        answer = self.get("/admin/reload", method=b"POST")
        self.assertEqual(answer.status, 200)
        self.assertEqual(self.control.triggers, ["api"])
        body = answer.json()
        self.assertEqual((body["ok"], body["generation"], body["trigger"]), (True, 2, "api"))
        self.assertEqual(body["changes"], ["route extra: added"])
        self.assertEqual([r["name"] for r in self.get("/admin/routes").json()["routes"]], ["users", "orders", "extra"])

    def test_reload_failure_is_422_with_the_errors(self) -> None:
        self.control.next_errors = ("gw.yaml: routes[0].upstream: unknown upstream 'x'",)
        answer = self.get("/admin/reload", method=b"POST")
        self.assertEqual(answer.status, 422)
        body = answer.json()
        self.assertEqual((body["ok"], body["generation"], body["error"]), (False, 1, "invalid_config"))
        self.assertEqual(body["errors"], ["gw.yaml: routes[0].upstream: unknown upstream 'x'"])
        self.assertIn("generation 1 keeps serving", body["message"])
        self.assertEqual(len(self.get("/admin/routes").json()["routes"]), 2)

    def test_get_on_reload_is_405(self) -> None:
        for method in (b"GET", b"HEAD", b"PUT"):
            answer = self.get("/admin/reload", method=method)
            self.assertEqual((answer.status, answer.json()["error"]), (405, "method_not_allowed"))
            self.assertEqual(answer.header(b"allow"), b"POST")
        self.assertEqual(self.control.triggers, [])

    def test_a_failing_page_is_a_json_500(self) -> None:
        def broken() -> Sequence[ReloadResult]:
            raise RuntimeError("boom")

        self.control.reloads = broken  # type: ignore[method-assign]
        answer = self.get("/admin/reloads")
        self.assertEqual((answer.status, answer.json()["error"]), (500, "internal_error"))
        self.assertNotIn(b"boom", answer.body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


def count(control: ControlDouble, route: str, code: str, durations: Sequence[float]) -> None:
    """Record finished requests as the exchange recorder does: batched, applied when collected."""
    metrics = control.gateway.runtime.metrics
    requests = metrics.batched_counter(metrics.requests.labels(route=route, method="GET", code=code, protocol="http/1.1"))
    duration = metrics.batched_histogram(metrics.request_duration.labels(route=route, method="GET", code=code))
    for seconds in durations:
        requests.inc()
        duration.observe(seconds)


class StatsTests(AdminTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.site.doStart()
        self.addCleanup(self.stop)

    def stop(self) -> None:
        if self.site.numPorts:
            self.site.doStop()

    def stats(self) -> dict[str, Any]:
        answer = self.get("/admin/stats")
        self.assertEqual(answer.status, 200)
        body: dict[str, Any] = answer.json()
        return body

    def route(self, stats: dict[str, Any], name: str) -> dict[str, Any]:
        found: dict[str, Any] = next(r for r in stats["routes"] if r["name"] == name)
        return found

    def test_rates_error_rate_and_p99_over_the_window(self) -> None:
        stats = self.stats()
        self.assertIsNone(stats["window"])  # one snapshot: no rate yet
        self.assertIsNone(self.route(stats, "users")["traffic"])
        count(self.control, "users", "200", [0.003] * 95)
        count(self.control, "users", "502", [0.2] * 5)
        count(self.control, "", "404", [0.0002] * 4)  # no route matched
        self.clock.advance(2)
        stats = self.stats()
        self.assertEqual(stats["window"], 2.0)
        users = self.route(stats, "users")
        self.assertEqual(users["traffic"]["request_rate"], 50.0)
        self.assertEqual(users["traffic"]["error_rate"], 0.05)
        self.assertEqual(users["traffic"]["requests"], 100)
        # 99th of 100: in the (0.1, 0.25] bucket, 4 of its 5 requests in: 0.1 + 0.15 * 4/5.
        self.assertAlmostEqual(users["traffic"]["p99"], 0.22)
        self.assertEqual(stats["unmatched"]["request_rate"], 2.0)
        self.assertIsNone(self.route(stats, "orders")["traffic"])  # never seen

    def test_rates_cover_the_window_then_fall_to_zero(self) -> None:
        self.stats()  # someone watches: sampling starts
        count(self.control, "orders", "200", [0.01] * 40)
        self.clock.advance(2)
        self.assertEqual(self.route(self.stats(), "orders")["traffic"]["request_rate"], 20.0)
        for _ in range(5):  # 10 s later the burst is out of the window
            self.clock.advance(2)
        stats = self.stats()
        self.assertEqual((stats["window"], self.route(stats, "orders")["traffic"]["request_rate"]), (10.0, 0.0))
        count(self.control, "orders", "200", [0.01] * 20)
        self.clock.advance(2)
        orders = self.route(self.stats(), "orders")["traffic"]
        self.assertEqual((orders["request_rate"], orders["error_rate"]), (2.0, 0.0))
        for _ in range(5):
            self.clock.advance(2)
        orders = self.route(self.stats(), "orders")["traffic"]
        self.assertEqual((orders["request_rate"], orders["error_rate"], orders["p99"]), (0.0, None, None))

    def test_state_reload_and_generation(self) -> None:
        self.control.gateway.upstreams["users"].instances[0].active_healthy = False
        self.control.gateway.upstreams["users"].refresh()
        stats = self.stats()
        self.assertEqual((stats["generation"], stats["ready"], stats["metrics_enabled"]), (1, True, True))
        self.assertEqual(stats["last_reload"]["trigger"], "startup")
        [users, orders] = stats["upstreams"]
        self.assertEqual([i["status"] for i in users["instances"]], ["down", "healthy"])
        self.assertEqual((orders["name"], orders["breaker"]), ("orders", None))
        self.assertEqual(users["breaker"]["state"], "closed")
        self.assertEqual(stats["breakers"], [{"upstream": "users", **users["breaker"]}])
        self.assertEqual([r["name"] for r in stats["routes"]], ["users", "orders"])
        self.assertEqual(stats["routes"][0]["middlewares"], ["breaker"])
        self.control.next_errors = ("gw.yaml: bad",)
        self.get("/admin/reload", method=b"POST")
        stats = self.stats()
        self.assertEqual((stats["generation"], stats["last_reload"]["ok"]), (1, False))

    def test_sampling_runs_only_while_watched_and_listening(self) -> None:
        self.assertFalse(self.site.sampler.running)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.stats()
        self.assertTrue(self.site.sampler.running)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.site.doStop()
        self.assertFalse(self.site.sampler.running)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_sampling_stops_when_nobody_watches(self) -> None:
        self.stats()
        for _ in range(30):
            self.clock.advance(2)
        self.assertTrue(self.site.sampler.running)  # 60 s: still within idle
        self.clock.advance(2)
        self.assertFalse(self.site.sampler.running)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNone(self.stats()["window"])  # watched again: starts over
        self.assertTrue(self.site.sampler.running)

    def test_sampling_pauses_while_metrics_are_disabled(self) -> None:
        count(self.control, "users", "200", [0.01] * 10)
        self.clock.advance(2)
        self.control.next_config = parse_config(CONFIG + "\nobservability: {metrics: {enabled: false}}\n")
        self.get("/admin/reload", method=b"POST")
        self.clock.advance(2)
        stats = self.stats()
        self.assertEqual((stats["metrics_enabled"], stats["window"]), (False, None))


class QuantileTests(SynchronousTestCase):
    INF = float("inf")

    def test_interpolates_inside_the_bucket(self) -> None:
        self.assertAlmostEqual(quantile(0.5, [(0.1, 50.0), (0.2, 100.0), (self.INF, 100.0)]) or 0, 0.1)
        self.assertAlmostEqual(quantile(0.99, [(0.1, 0.0), (0.2, 100.0), (self.INF, 100.0)]) or 0, 0.199)
        self.assertAlmostEqual(quantile(0.99, [(0.5, 100.0), (self.INF, 100.0)]) or 0, 0.495)

    def test_beyond_the_last_bound_is_the_last_bound(self) -> None:
        self.assertEqual(quantile(0.99, [(0.1, 10.0), (1.0, 10.0), (self.INF, 20.0)]), 1.0)

    def test_no_observations(self) -> None:
        self.assertIsNone(quantile(0.99, [(0.1, 0.0), (self.INF, 0.0)]))
        self.assertIsNone(quantile(0.99, []))

    def test_a_restarted_counter_counts_from_zero(self) -> None:
        old = RouteTotals(100.0, 10.0, ((0.1, 100.0), (self.INF, 100.0)))
        new = RouteTotals(6.0, 0.0, ((0.1, 6.0), (self.INF, 6.0)))
        traffic = traffic_between(old, new, 2.0)
        self.assertEqual((traffic.request_rate, traffic.error_rate, traffic.requests), (3.0, 0.0, 6.0))


MULTIPROCESS_WORKER = textwrap.dedent(
    """
    import json, sys
    from txgateway.observability.metrics import GatewayMetrics
    from txgateway.admin.traffic import read_totals
    metrics = GatewayMetrics()
    for _ in range(int(sys.argv[1])):
        metrics.requests.labels(route="users", method="GET", code=sys.argv[2], protocol="http/1.1").inc()
        metrics.request_duration.labels(route="users", method="GET", code=sys.argv[2]).observe(0.004)
    totals = read_totals(metrics)["users"]
    print(json.dumps([totals.requests, totals.errors, dict(totals.buckets)[0.005]]))
    """
)


class MultiprocessTests(SynchronousTestCase):
    def test_rates_are_the_process_groups(self) -> None:
        """With PROMETHEUS_MULTIPROC_DIR (workers > 1), each worker reads every worker's counts."""
        directory = self.mktemp()
        os.mkdir(directory)
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=directory, PYTHONPATH=ROOT)
        seen = []
        for requests, code in ((7, "200"), (3, "503")):
            done = subprocess.run(
                [sys.executable, "-c", MULTIPROCESS_WORKER, str(requests), code],
                env=env, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            self.assertEqual(done.returncode, 0, done.stderr)
            seen.append(json.loads(done.stdout))
        self.assertEqual(seen, [[7.0, 0.0, 7.0], [10.0, 3.0, 10.0]])


class DashboardFileTests(AdminTestCase):
    def test_index_and_its_files(self) -> None:
        index = self.get("/")
        self.assertEqual(index.status, 200)
        self.assertEqual(index.header(b"content-type"), b"text/html; charset=utf-8")
        policy = index.header(b"content-security-policy") or b""
        self.assertIn(b"default-src 'none'", policy)
        self.assertIn(b"connect-src 'self'", policy)
        self.assertIn(b'src="/static/dashboard.js"', index.body)
        self.assertIn(b'href="/static/dashboard.css"', index.body)
        script = self.get("/static/dashboard.js")
        self.assertEqual(script.header(b"content-type"), b"text/javascript; charset=utf-8")
        self.assertIn(b"/admin/stats", script.body)
        self.assertIn(b"sessionStorage", script.body)
        self.assertEqual(self.get("/static/dashboard.css").header(b"content-type"), b"text/css; charset=utf-8")
        self.assertEqual(self.get("/", method=b"POST").status, 405)

    def test_nothing_is_loaded_from_elsewhere(self) -> None:
        directory = os.path.join(ROOT, "txgateway", "admin", "static")
        for name in os.listdir(directory):
            with open(os.path.join(directory, name), "rb") as file:
                content = file.read()
            for needle in (b"http://", b"https://", b"//cdn", b"innerHTML", b"eval("):
                self.assertNotIn(needle, content, name)
