"""The auth stage through the real gateway in memory: what the client gets
(status, WWW-Authenticate, JSON) and what the upstream receives (identity
headers, stripped credentials, the query)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from txgateway.auth import api_keys as api_keys_module
from txgateway.auth.jwks import JWKSKeySet
from txgateway.auth.middleware import AuthMiddleware, ClaimHeaderStrip, for_route
from txgateway.config import parse_config
from txgateway.gateway import Gateway
from txgateway.messages import Response
from txgateway.observability.access_log import CollectedLines, output_key
from txgateway.pipeline.context import RequestContext
from txgateway.pipeline.pipeline import Handler
from txgateway.runtime import Runtime
from txgateway.testing import GatewayHarness, HarnessResponse, MemoryUpstream, ReceivedRequest

NOW = 1_700_000_000
SECRET = "middleware-test-secret-0123456789abcdef"
KEYS = {"key-1": "ci-bot", "key-2": "admin-bot"}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


CONFIG = f"""
server:
  limits: {{max_header_bytes: 300000}}
upstreams:
  app: {{servers: ["10.0.0.1:9000"]}}
routes:
  - {{name: required, match: {{path: "/api/*"}}, upstream: app}}
  - {{name: admin, match: {{path: "/admin/*"}}, upstream: app, roles: [admin, support]}}
  - {{name: optional, match: {{path: "/maybe/*"}}, upstream: app, auth: optional}}
  - {{name: open, match: {{path: "/open/*"}}, upstream: app, auth: none}}
  - {{name: public, match: {{path: "/public/*"}}, upstream: app}}
  - {{name: publicity, match: {{path: "/publicity"}}, upstream: app}}
  - {{name: health, match: {{path: "/health"}}, upstream: app}}
  - {{name: pinned, match: {{path: "/health/deep"}}, upstream: app, auth: required}}
  - {{name: events, match: {{path: "/events"}}, upstream: app}}
middleware:
  auth:
    jwt:
      algorithms: [HS256]
      secret: "{SECRET}"
      query_param: access_token
      leeway: 0
    api_keys:
      header: X-API-Key
      keys:
        - {{sha256: "{sha("key-1")}", consumer: ci-bot, roles: [premium]}}
        - {{sha256: "{sha("key-2")}", consumer: admin-bot, roles: [admin]}}
    exclude_paths: ["/health", "/public/*"]
    forward_claims: {{sub: X-User-ID, roles: X-User-Roles, tenant: X-Tenant}}
  custom:
    - {{name: seen, factory: "tests.test_auth_middleware:record_identity"}}
"""

#: Identities later middlewares saw on ctx.identity (by record_identity).
SEEN: list[Any] = []


class _Record:
    def wrap(self, next: Handler) -> Handler:
        def record(ctx: RequestContext) -> Deferred[Response]:
            SEEN.append(ctx.identity)
            return next(ctx)

        return record


def record_identity(options: object, route: object, runtime: object) -> _Record:
    return _Record()


def make_token(**claims: Any) -> str:
    payload: dict[str, Any] = {"sub": "user-1", "exp": NOW + 300, "roles": ["ops", "dev"], "tenant": "t1"}
    payload.update(claims)
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, SECRET, algorithm="HS256")


def bearer(tok: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {tok}")


def ok(request: ReceivedRequest) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return 200, [], b"ok"


class GatewayCase(SynchronousTestCase):
    config = CONFIG

    def setUp(self) -> None:
        del SEEN[:]
        self.clock = Clock()
        self.clock.advance(NOW)
        self.upstream = MemoryUpstream(ok)
        self.gateway = GatewayHarness(parse_config(self.config), self.upstream, clock=self.clock)

    def get(self, target: str, *headers: tuple[str, str]) -> HarnessResponse:
        self.forwarded_before = len(self.upstream.requests)
        return self.gateway.request("GET", target, headers=headers)

    def received(self) -> ReceivedRequest:
        self.assertEqual(len(self.upstream.requests), 1)
        return self.upstream.requests[-1]

    def assertUnauthorized(self, response: HarnessResponse, code: str | None) -> None:
        self.assertEqual(response.status, 401)
        body = response.json()
        assert isinstance(body, dict)
        self.assertEqual(body["error"], "unauthorized")
        challenge = 'Bearer realm="txgateway"'
        if code is None:
            self.assertEqual(response.header("www-authenticate"), challenge)
        else:
            self.assertEqual(body["message"], code)
            self.assertEqual(
                response.header("www-authenticate"),
                f'{challenge}, error="invalid_token", error_description="{code}"',
            )
        self.assertEqual(len(self.upstream.requests), self.forwarded_before, "the upstream was called")


class JWTTests(GatewayCase):
    def test_no_credentials_is_401_with_a_bare_challenge(self) -> None:
        response = self.get("/api/x")
        self.assertUnauthorized(response, None)
        self.assertEqual(response.json()["message"], "authentication required")  # type: ignore[index]

    def test_valid_token_sets_identity_for_upstream_and_later_middlewares(self) -> None:
        tok = make_token()
        self.assertEqual(self.get("/api/x", bearer(tok)).status, 200)
        received = self.received()
        self.assertEqual(received.header(b"x-user-id"), b"user-1")
        self.assertEqual(received.header(b"x-user-roles"), b"ops,dev")
        self.assertEqual(received.header(b"x-tenant"), b"t1")
        self.assertEqual(received.header(b"authorization"), f"Bearer {tok}".encode())
        self.assertEqual(SEEN[0].consumer, "user-1")
        self.assertEqual(SEEN[0].roles, {"ops", "dev"})
        self.assertEqual(SEEN[0].method, "jwt")

    def test_rejections_carry_the_short_code(self) -> None:
        cases = {
            "token expired": make_token(exp=NOW - 1),
            "token not yet valid": make_token(nbf=NOW + 60),
            "invalid claims": make_token(exp=None),
            "malformed token": "not-a-token",
            "invalid token": jwt.encode({"sub": "u", "exp": NOW + 60}, "x" * 40, algorithm="HS256"),
        }
        for code, tok in cases.items():
            self.assertUnauthorized(self.get("/api/x", bearer(tok)), code)
        self.assertUnauthorized(self.get("/api/x", ("authorization", "Bearer")), "malformed token")
        self.assertUnauthorized(self.get("/api/x", ("authorization", "bearer   ")), "malformed token")

    def test_scheme_is_case_insensitive(self) -> None:
        self.assertEqual(self.get("/api/x", ("authorization", f"bEaReR {make_token()}")).status, 200)

    def test_huge_authorization_header_is_rejected_cheaply(self) -> None:
        response = self.get("/api/x", ("authorization", "Bearer " + "A" * 100_000))
        self.assertUnauthorized(response, "token too large")
        self.assertLess(len(response.body), 200)

    def test_two_authorization_headers_are_a_bad_request(self) -> None:
        response = self.get("/api/x", bearer(make_token()), bearer(make_token(sub="admin")))
        self.assertEqual(response.status, 400)
        self.assertEqual(self.upstream.requests, [])

    def test_other_schemes_count_as_no_token(self) -> None:
        self.assertUnauthorized(self.get("/api/x", ("authorization", "Basic dTpw")), None)
        self.assertEqual(self.get("/maybe/x", ("authorization", "Basic dTpw")).status, 200)
        self.assertEqual(self.received().header(b"authorization"), b"Basic dTpw")

    def test_unsafe_claim_values_are_not_forwarded(self) -> None:
        tok = make_token(tenant="t1\r\nx-admin: yes", roles=["a"])
        self.assertEqual(self.get("/api/x", bearer(tok)).status, 200)
        received = self.received()
        self.assertIsNone(received.header(b"x-tenant"))
        self.assertIsNone(received.header(b"x-admin"))
        self.assertEqual(received.header(b"x-user-roles"), b"a")

    def test_claim_values_of_other_types(self) -> None:
        self.assertEqual(self.get("/api/x", bearer(make_token(tenant=7, roles="a b"))).status, 200)
        self.assertEqual(self.received().header(b"x-tenant"), b"7")
        self.assertEqual(self.received().header(b"x-user-roles"), b"a,b")
        del self.upstream.requests[:]
        self.assertEqual(self.get("/api/x", bearer(make_token(tenant={"id": 1}, roles=[]))).status, 200)
        self.assertIsNone(self.received().header(b"x-tenant"))
        self.assertIsNone(self.received().header(b"x-user-roles"))


class QueryTokenTests(GatewayCase):
    def test_query_token_is_accepted_and_removed(self) -> None:
        tok = make_token()
        response = self.get(f"/events?a=1&access_token={tok}&b=%20x&&c")
        self.assertEqual(response.status, 200)
        received = self.received()
        self.assertEqual(received.target, b"/events?a=1&b=%20x&&c")
        self.assertEqual(received.header(b"x-user-id"), b"user-1")
        self.assertNotIn(tok.encode(), b"".join(v for _, v in received.headers))

    def test_only_parameter_leaves_no_query(self) -> None:
        self.assertEqual(self.get(f"/events?access_token={make_token()}").status, 200)
        self.assertEqual(self.received().target, b"/events")

    def test_encoded_parameter_name_is_removed_too(self) -> None:
        self.assertEqual(self.get(f"/events?x=1&access%5Ftoken={make_token()}").status, 200)
        self.assertEqual(self.received().target, b"/events?x=1")

    def test_header_wins_and_query_token_is_still_removed(self) -> None:
        self.assertEqual(self.get("/events?access_token=garbage&k=v", bearer(make_token())).status, 200)
        self.assertEqual(self.received().target, b"/events?k=v")

    def test_bad_or_repeated_query_token(self) -> None:
        self.assertUnauthorized(self.get("/events?access_token=garbage"), "malformed token")
        tok = make_token()
        self.assertEqual(self.get(f"/events?access_token={tok}&access_token={tok}").status, 400)

    def test_similar_names_are_kept(self) -> None:
        self.assertEqual(self.get(f"/events?access_tokens=1&xaccess_token=2&access_token={make_token()}").status, 200)
        self.assertEqual(self.received().target, b"/events?access_tokens=1&xaccess_token=2")

    def test_query_untouched_where_auth_is_none(self) -> None:
        self.assertEqual(self.get("/open/x?access_token=abc&z=1").status, 200)
        self.assertEqual(self.received().target, b"/open/x?access_token=abc&z=1")


class ForwardedHeaderStripTests(GatewayCase):
    SPOOF = (("x-user-id", "admin"), ("X-User-Roles", "admin"), ("x-tenant", "other"))

    def assertNoSpoof(self, received: ReceivedRequest) -> None:
        self.assertNotIn(b"admin", [received.header(b"x-user-id"), received.header(b"x-user-roles")])
        self.assertNotEqual(received.header(b"x-tenant"), b"other")

    def test_stripped_when_authenticated(self) -> None:
        self.assertEqual(self.get("/api/x", bearer(make_token()), *self.SPOOF).status, 200)
        received = self.received()
        self.assertNoSpoof(received)
        self.assertEqual([v for n, v in received.headers if n == b"x-user-id"], [b"user-1"])

    def test_stripped_on_routes_without_auth(self) -> None:
        for target in ("/open/x", "/public/x", "/health", "/maybe/x"):
            del self.upstream.requests[:]
            self.assertEqual(self.get(target, *self.SPOOF).status, 200, target)
            received = self.received()
            for name in (b"x-user-id", b"x-user-roles", b"x-tenant"):
                self.assertIsNone(received.header(name), (target, name))

    def test_route_with_auth_none_and_no_forward_claims_has_no_stage(self) -> None:
        config = parse_config(
            CONFIG.replace("    forward_claims: {sub: X-User-ID, roles: X-User-Roles, tenant: X-Tenant}\n", "")
        )
        runtime = Runtime(self.clock, self.clock)
        stages = {route.name: for_route(route, config, runtime) for route in config.routes}
        self.assertIsNone(stages["open"])
        self.assertIsInstance(stages["required"], AuthMiddleware)
        with_claims = parse_config(CONFIG)
        self.assertIsInstance(for_route(with_claims.routes[3], with_claims, runtime), ClaimHeaderStrip)

    def test_routes_share_one_authenticator_per_configuration(self) -> None:
        config = parse_config(CONFIG)
        runtime = Runtime(self.clock, self.clock)
        stages = [for_route(route, config, runtime) for route in config.routes]
        authenticators = {id(s.authenticator) for s in stages if isinstance(s, AuthMiddleware)}
        self.assertEqual(len(authenticators), 1)
        reloaded = parse_config(CONFIG)
        again = for_route(reloaded.routes[0], reloaded, runtime)
        assert isinstance(again, AuthMiddleware)
        self.assertNotIn(id(again.authenticator), authenticators)


class APIKeyTests(GatewayCase):
    def test_right_key(self) -> None:
        self.assertEqual(self.get("/api/x", ("X-API-Key", "key-1")).status, 200)
        received = self.received()
        self.assertIsNone(received.header(b"x-api-key"))
        self.assertEqual(received.header(b"x-user-id"), b"ci-bot")
        self.assertEqual(received.header(b"x-user-roles"), b"premium")
        self.assertEqual((SEEN[0].consumer, SEEN[0].method, SEEN[0].claims), ("ci-bot", "api_key", {}))

    def test_wrong_and_missing_key(self) -> None:
        response = self.get("/api/x", ("x-api-key", "key-3"))
        self.assertUnauthorized(response, None)
        self.assertEqual(response.json()["message"], "invalid api key")  # type: ignore[index]
        self.assertUnauthorized(self.get("/api/x", ("x-api-key", "k" * 10_000)), None)
        self.assertUnauthorized(self.get("/api/x"), None)

    def test_every_key_is_compared_even_after_a_match(self) -> None:
        calls: list[tuple[bytes, bytes]] = []
        real = api_keys_module.compare_digest

        def counting(a: bytes, b: bytes) -> bool:
            calls.append((a, b))
            return real(a, b)

        self.patch(api_keys_module, "compare_digest", counting)
        self.assertEqual(self.get("/api/x", ("x-api-key", "key-1")).status, 200)  # the first key
        self.assertEqual(len(calls), len(KEYS))
        self.assertEqual({len(a) for a, _ in calls}, {32})

    def test_token_wins_over_api_key_and_the_key_is_removed(self) -> None:
        self.assertEqual(self.get("/api/x", bearer(make_token()), ("x-api-key", "wrong")).status, 200)
        self.assertEqual(self.received().header(b"x-user-id"), b"user-1")
        self.assertIsNone(self.received().header(b"x-api-key"))

    def test_key_passes_through_where_nothing_is_authenticated(self) -> None:
        self.assertEqual(self.get("/open/x", ("x-api-key", "key-1")).status, 200)
        self.assertEqual(self.received().header(b"x-api-key"), b"key-1")

    def test_two_key_headers_are_a_bad_request(self) -> None:
        self.assertEqual(self.get("/api/x", ("x-api-key", "key-1"), ("x-api-key", "key-2")).status, 400)


class RoleTests(GatewayCase):
    def test_any_of_the_roles(self) -> None:
        self.assertEqual(self.get("/admin/x", bearer(make_token(roles=["support"]))).status, 200)
        self.assertEqual(self.get("/admin/x", ("x-api-key", "key-2")).status, 200)

    def test_missing_role_is_403(self) -> None:
        response = self.get("/admin/x", bearer(make_token(roles=["ops"])))
        self.assertEqual(response.status, 403)
        body = response.json()
        assert isinstance(body, dict)
        self.assertEqual((body["error"], body["message"]), ("forbidden", "insufficient role"))
        self.assertEqual(response.header("www-authenticate"), 'Bearer realm="txgateway", error="insufficient_scope"')
        self.assertEqual(self.get("/admin/x", ("x-api-key", "key-1")).status, 403)
        self.assertEqual(self.upstream.requests, [])

    def test_anonymous_on_a_role_route_is_401(self) -> None:
        self.assertUnauthorized(self.get("/admin/x"), None)


class OptionalAndExclusionTests(GatewayCase):
    def test_optional_without_credentials_is_anonymous(self) -> None:
        self.assertEqual(self.get("/maybe/x").status, 200)
        self.assertIsNone(self.received().header(b"x-user-id"))
        self.assertEqual(SEEN, [None])

    def test_optional_with_credentials_authenticates(self) -> None:
        self.assertEqual(self.get("/maybe/x", bearer(make_token())).status, 200)
        self.assertEqual(self.received().header(b"x-user-id"), b"user-1")

    def test_optional_with_bad_credentials_is_still_401(self) -> None:
        self.assertUnauthorized(self.get("/maybe/x", bearer(make_token(exp=NOW - 5))), "token expired")
        self.assertUnauthorized(self.get("/maybe/x", ("x-api-key", "nope")), None)

    def test_excluded_paths_need_no_credentials(self) -> None:
        for target in ("/health", "/public/a", "/public/a/b/c.css"):
            self.assertEqual(self.get(target).status, 200, target)
        self.assertUnauthorized(self.get("/publicity"), None)

    def test_exclusion_sees_the_normalized_path(self) -> None:
        self.assertUnauthorized(self.get("/public/../api/x"), None)
        self.assertUnauthorized(self.get("/public/%2e%2e/api/x"), None)

    def test_a_route_own_auth_setting_wins_over_exclusion(self) -> None:
        self.assertUnauthorized(self.get("/health/deep"), None)


class DisabledAuthTests(GatewayCase):
    config = CONFIG.replace("  auth:\n    jwt:", "  auth:\n    enabled: false\n    jwt:")

    def test_routes_default_to_no_auth_but_explicit_ones_authenticate(self) -> None:
        self.assertEqual(self.get("/api/x").status, 200)
        self.assertUnauthorized(self.get("/health/deep"), None)
        self.assertEqual(self.get("/health/deep", bearer(make_token())).status, 200)


JWKS_URL = "https://idp.test/jwks.json"
JWKS_CONFIG = f"""
upstreams:
  app: {{servers: ["10.0.0.1:9000"]}}
routes:
  - {{name: api, match: {{path: "/api/*"}}, upstream: app}}
middleware:
  auth:
    jwt: {{algorithms: [RS256], jwks_url: "{JWKS_URL}"}}
"""
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


class JWKSGatewayTests(SynchronousTestCase):
    """A JWKS-configured gateway with the key set's fetch replaced."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.documents: list[Any] = []
        runtime = Runtime(self.clock, self.clock)
        runtime.shared(("jwks", JWKS_URL), self.key_set)
        self.addCleanup(runtime.stop)
        self.upstream = MemoryUpstream(ok)
        config = parse_config(JWKS_CONFIG)
        runtime.shared(output_key(config), CollectedLines)  # the access log in memory, not on stdout
        self.harness = GatewayHarness(
            parse_config("upstreams: {app: {servers: ['10.0.0.1:9000']}}"), self.upstream, clock=self.clock
        )
        self.harness.gateway = Gateway(config, lambda _upstream: self.upstream, runtime)

    def key_set(self) -> JWKSKeySet:
        def fetch(url: str) -> Deferred[bytes]:
            if not self.documents:
                return fail(ConnectionRefusedError())
            return succeed(json.dumps({"keys": self.documents}).encode())

        key_set = JWKSKeySet(JWKS_URL, self.clock, fetch)
        key_set.start()
        return key_set

    def test_jwks_unreachable_is_503(self) -> None:
        tok = jwt.encode({"sub": "u", "exp": NOW + 60}, RSA_KEY, algorithm="RS256", headers={"kid": "k"})
        response = self.harness.request("GET", "/api/x", headers=[bearer(tok)])
        self.assertEqual(response.status, 503)
        self.assertEqual(response.json()["message"], "authentication keys unavailable")  # type: ignore[index]
        self.assertEqual(self.upstream.requests, [])

    def test_keys_arriving_later_are_used(self) -> None:
        self.documents.append(RSAAlgorithm.to_jwk(RSA_KEY.public_key(), as_dict=True) | {"kid": "k"})
        self.clock.advance(1)  # the first retry after the failed initial fetch
        tok = jwt.encode({"sub": "u", "exp": NOW + 60}, RSA_KEY, algorithm="RS256", headers={"kid": "k"})
        self.assertEqual(self.harness.request("GET", "/api/x", headers=[bearer(tok)]).status, 200)
