"""Loading configuration files: the seed and full examples, files and YAML."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from txgateway.config import ConfigError, ConfigProblem, load_config, parse_config
from txgateway.config.model import GatewayConfig, JWTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "etc", "examples")

#: The "Configuration Example" of the Fechatter Gateway seed, verbatim.
SEED = """\
# Production-ready configuration
server:
  listen_addr: "0.0.0.0:8080"
  worker_threads: 4

upstreams:
  fechatter-server:
    name: "fechatter-server"
    servers:
      - address: "fechatter-server:6688"
        weight: 1
    health_check:
      enabled: true
      path: "/health"
      interval: 10
    circuit_breaker:
      failure_threshold: 5
      recovery_timeout: 30

middleware:
  enabled: true
  auth:
    jwt_secret: "${JWT_SECRET}"
    exclude_paths: ["/health", "/metrics"]
  rate_limit:
    enabled: true
    requests_per_minute: 100
    burst_size: 10
"""


def problem_lines(text: str, environ: dict[str, str] | None = None) -> list[str]:
    try:
        parse_config(text, source="gw.yaml", environ=environ or {})
    except ConfigError as error:
        return str(error).splitlines()
    raise AssertionError("the configuration was accepted")


class SeedExampleTests(SynchronousTestCase):
    """The seed's README example loads unchanged and keeps its meaning."""

    def test_example_file_is_the_seed_verbatim(self) -> None:
        with open(os.path.join(EXAMPLES, "fechatter.yaml"), encoding="utf-8") as stream:
            self.assertEqual(stream.read(), SEED)

    def test_loads_with_jwt_secret(self) -> None:
        config = load_config(os.path.join(EXAMPLES, "fechatter.yaml"), {"JWT_SECRET": "s3cret"})
        self.assertEqual(config.server.listen, ("tcp:8080:interface=0.0.0.0",))
        self.assertEqual(config.server.workers, 4)
        self.assertEqual(list(config.upstreams), ["fechatter-server"])
        upstream = config.upstreams["fechatter-server"]
        self.assertEqual(upstream.name, "fechatter-server")
        self.assertEqual([(s.host, s.port, s.weight) for s in upstream.servers], [("fechatter-server", 6688, 1)])
        self.assertEqual(upstream.servers[0].address, "fechatter-server:6688")
        self.assertTrue(upstream.health_check.enabled)
        self.assertEqual(upstream.health_check.path, "/health")
        self.assertEqual(upstream.health_check.interval, 10.0)
        assert upstream.circuit_breaker is not None
        self.assertEqual(upstream.circuit_breaker.failure_threshold, 5)
        self.assertEqual(upstream.circuit_breaker.recovery_timeout, 30.0)
        self.assertEqual(config.routes, ())
        middleware = config.middleware
        self.assertTrue(middleware.enabled)
        self.assertTrue(middleware.auth.enabled)
        self.assertEqual(middleware.auth.jwt, JWTConfig(algorithms=("HS256",), secret="s3cret"))
        self.assertEqual(middleware.auth.exclude_paths, ("/health", "/metrics"))
        assert middleware.rate_limit is not None
        self.assertTrue(middleware.rate_limit.enabled)
        self.assertEqual(middleware.rate_limit.requests_per_minute, 100)
        self.assertEqual(middleware.rate_limit.burst_size, 10)
        self.assertEqual(config.source, os.path.join(EXAMPLES, "fechatter.yaml"))

    def test_fails_naming_jwt_secret_when_unset(self) -> None:
        path = os.path.join(EXAMPLES, "fechatter.yaml")
        with self.assertRaises(ConfigError) as raised:
            load_config(path, {})
        self.assertEqual(
            raised.exception.problems,
            [
                ConfigProblem(
                    "middleware.auth.jwt_secret",
                    "environment variable JWT_SECRET is not set (set it, or give a default: ${JWT_SECRET:-default})",
                )
            ],
        )
        self.assertEqual(raised.exception.source, path)
        self.assertEqual(
            str(raised.exception),
            f"{path}: middleware.auth.jwt_secret: environment variable JWT_SECRET is not set"
            " (set it, or give a default: ${JWT_SECRET:-default})",
        )

    def test_empty_jwt_secret_refused(self) -> None:
        self.assertEqual(
            problem_lines(SEED, {"JWT_SECRET": ""}),
            ["gw.yaml: middleware.auth.jwt_secret: must not be empty"],
        )


class FullExampleTests(SynchronousTestCase):
    """etc/examples/full.yaml: every section of the contract."""

    def load(self) -> GatewayConfig:
        return load_config(os.path.join(EXAMPLES, "full.yaml"), {})

    def test_server(self) -> None:
        server = self.load().server
        self.assertEqual(server.listen, ("tcp:8080:interface=0.0.0.0",))
        self.assertEqual(server.workers, 1)
        self.assertIsNone(server.tls)
        self.assertEqual(server.limits.max_header_bytes, 65536)
        self.assertEqual(server.limits.max_body_bytes, 10 * 1024 * 1024)
        self.assertEqual(server.limits.max_connections, 10000)
        self.assertEqual(server.limits.header_timeout, 10.0)
        self.assertEqual(server.limits.idle_timeout, 60.0)
        self.assertEqual(server.trusted_proxies, ("10.0.0.0/8",))
        self.assertEqual(server.shutdown_grace, 30.0)

    def test_admin(self) -> None:
        admin = self.load().admin
        self.assertEqual(admin.listen, "tcp:9090:interface=127.0.0.1")
        self.assertIsNone(admin.token)

    def test_upstream(self) -> None:
        users = self.load().upstreams["users"]
        self.assertEqual(users.protocol, "http")
        self.assertEqual(users.hash_key, "header:x-user-id")
        self.assertEqual(users.retry.attempts, 3)
        self.assertEqual(users.retry.on, ("connect_error", "timeout", "502", "503", "504"))
        self.assertEqual(users.retry.methods, ("GET", "HEAD", "OPTIONS", "PUT", "DELETE"))
        self.assertEqual(users.retry.budget_ratio, 0.2)
        assert users.passive_health is not None and users.fallback is not None
        self.assertEqual(users.passive_health.ejection_time, 30.0)
        self.assertEqual(users.fallback.body, '{"error":"users service degraded"}')
        self.assertEqual(users.fallback.status, 503)
        self.assertEqual(users.timeouts.connect, 2.0)
        self.assertEqual(users.pool.max_connections_per_host, 100)

    def test_discovery(self) -> None:
        orders = self.load().upstreams["orders"]
        assert orders.discovery is not None
        self.assertEqual(orders.servers, ())
        self.assertEqual(
            (orders.discovery.type, orders.discovery.name, orders.discovery.port, orders.discovery.refresh),
            ("dns", "localhost", 9001, 10.0),
        )

    def test_route(self) -> None:
        route = self.load().routes[0]
        self.assertEqual(route.name, "users-api")
        self.assertEqual(route.match.path, "/api/users/{id}")
        self.assertEqual(route.match.methods, ("GET", "PUT"))
        self.assertEqual(route.match.host, "api.example.com")
        self.assertEqual(route.match.headers, (("x-api-version", "2"),))
        self.assertEqual((route.upstream, route.strip_prefix, route.rewrite), ("users", "/api", "/v2/users/{id}"))
        self.assertEqual((route.timeout, route.auth, route.roles), (5.0, "required", ("admin", "support")))
        assert route.rate_limit is not None and route.cache is not None
        self.assertEqual((route.rate_limit.requests_per_minute, route.rate_limit.burst_size), (50, 5))
        self.assertEqual((route.cache.enabled, route.cache.ttl), (True, 30.0))
        self.assertTrue(route.websocket)
        self.assertEqual(route.max_body_bytes, 1024 * 1024)
        self.assertEqual(route.request_headers.set, (("x-gateway", "txgateway"),))
        self.assertEqual(route.request_headers.remove, ("x-debug",))
        self.assertEqual(route.response_headers.set, (("x-frame-options", "DENY"),))
        self.assertEqual(route.response_headers.remove, ("server",))

    def test_middleware(self) -> None:
        middleware = self.load().middleware
        auth = middleware.auth
        assert auth.jwt is not None and middleware.rate_limit is not None and middleware.cors is not None
        self.assertEqual(auth.jwt.algorithms, ("HS256", "RS256", "ES256"))
        self.assertEqual(auth.jwt.secret, "change-me-not-a-secret")
        self.assertEqual(auth.jwt.jwks_url, "https://idp.example.com/.well-known/jwks.json")
        self.assertEqual(auth.jwt.audience, "orders-api")
        self.assertEqual(auth.jwt.query_param, "access_token")
        self.assertEqual(auth.api_key_header, "x-api-key")
        self.assertEqual(auth.api_keys[0].consumer, "ci-bot")
        self.assertEqual(auth.api_keys[0].roles, ("premium",))
        self.assertEqual(auth.forward_claims, (("sub", "x-user-id"), ("roles", "x-user-roles")))
        self.assertEqual(
            [dict(tier) for tier in middleware.rate_limit.tiers],
            [
                {"role": "admin", "requests_per_minute": 1000, "burst_size": 10},
                {"role": "premium", "requests_per_minute": 300, "burst_size": 10},
            ],
        )
        self.assertEqual(middleware.rate_limit.on_storage_error, "local")
        self.assertEqual(middleware.cache.max_bytes, 64 * 1024 * 1024)
        self.assertFalse(middleware.cache.enabled)
        self.assertEqual(middleware.cors.allow_origins, ("https://app.example.com",))
        self.assertEqual(middleware.cors.max_age, 600)

    def test_observability(self) -> None:
        observability = self.load().observability
        self.assertEqual(observability.access_log.format, "json")
        self.assertTrue(observability.metrics_enabled)
        self.assertFalse(observability.tracing.enabled)
        self.assertEqual(observability.tracing.sample_ratio, 0.1)


class FileTests(SynchronousTestCase):
    """What can be wrong with the file itself is a ConfigError, never a traceback."""

    def write(self, content: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as stream:
            stream.write(content)
        return path

    def assertFileProblem(self, path: str, message: str) -> None:
        with self.assertRaises(ConfigError) as raised:
            load_config(path, {})
        self.assertEqual(str(raised.exception), f"{path}: {message}")

    def test_missing_file(self) -> None:
        self.assertFileProblem("/nonexistent/gateway.yaml", "no such file")

    def test_directory(self) -> None:
        path = self.mktemp()
        os.mkdir(path)
        self.assertFileProblem(path, "is a directory, not a configuration file")

    def test_binary_file(self) -> None:
        self.assertFileProblem(self.write(b"\x7fELF\xff\xfe\x00"), "not a UTF-8 text file (invalid byte at offset 4)")

    def test_empty_file(self) -> None:
        self.assertFileProblem(
            self.write(b""), "the configuration is empty: expected a mapping with server, upstreams, routes, ..."
        )

    def test_top_level_not_a_mapping(self) -> None:
        self.assertFileProblem(
            self.write(b"- server\n- routes\n"),
            "the top level must be a mapping (server, upstreams, routes, ...), got a list",
        )
        self.assertFileProblem(
            self.write(b"just text\n"),
            "the top level must be a mapping (server, upstreams, routes, ...), got a string ('just text')",
        )

    def test_utf8_with_bom(self) -> None:
        config = load_config(self.write(b"\xef\xbb\xbfserver: {workers: 3}\n"), {})
        self.assertEqual(config.server.workers, 3)


class YAMLTests(SynchronousTestCase):
    def test_syntax_error_has_line_and_column(self) -> None:
        self.assertEqual(
            problem_lines("server:\n  workers: 2\n   limits: {}\n"),
            ["gw.yaml: line 3, column 10: invalid YAML: mapping values are not allowed here"],
        )

    def test_tab_indentation(self) -> None:
        [line] = problem_lines("server:\n\tworkers: 2\n")
        self.assertTrue(line.startswith("gw.yaml: line 2, column 1: invalid YAML:"), line)
        self.assertIn("'\\t'", line)

    def test_unclosed_quote(self) -> None:
        [line] = problem_lines('server:\n  listen_addr: "0.0.0.0:80\n')
        self.assertTrue(line.startswith("gw.yaml: line 3, column 1: invalid YAML:"), line)
        self.assertIn("quoted scalar (line 2)", line)

    def test_several_documents(self) -> None:
        [line] = problem_lines("server: {}\n---\nroutes: []\n")
        self.assertIn("line 2, column 1: invalid YAML: expected a single document", line)

    def test_duplicate_keys(self) -> None:
        self.assertEqual(
            problem_lines("server: {workers: 1}\nserver: {workers: 2}\nroutes: []\nroutes: []\n"),
            [
                "gw.yaml: line 2, column 1: duplicate key 'server' (first given at line 1)",
                "gw.yaml: line 4, column 1: duplicate key 'routes' (first given at line 3)",
            ],
        )

    def test_merge_keys_may_be_overridden(self) -> None:
        text = """
upstreams:
  a: &base {servers: ["127.0.0.1:1"], load_balancer: random}
  b:
    <<: *base
    load_balancer: weighted
"""
        config = parse_config(text, environ={})
        self.assertEqual(config.upstreams["b"].load_balancer, "weighted")
        self.assertEqual(config.upstreams["b"].servers, config.upstreams["a"].servers)

    def test_no_python_objects(self) -> None:
        [line] = problem_lines("server: !!python/object/apply:os.system ['true']\n")
        self.assertIn("line 1, column 9: invalid YAML: could not determine a constructor", line)

    def test_only_true_and_false_are_booleans(self) -> None:
        # YAML 1.1 would read `on:` as True and `yes` as a boolean.
        text = """
upstreams:
  users:
    servers: ["127.0.0.1:9001"]
    retry: {on: [connect_error, 503]}
    health_check: {enabled: True}
"""
        upstream = parse_config(text, environ={}).upstreams["users"]
        self.assertEqual(upstream.retry.on, ("connect_error", "503"))
        self.assertTrue(upstream.health_check.enabled)
        self.assertEqual(
            problem_lines("routes: []\nobservability: {metrics: {enabled: yes}}\n"),
            ["gw.yaml: observability.metrics.enabled: expected true or false, got a string ('yes')"],
        )

    def test_recursive_alias(self) -> None:
        lines = problem_lines("server: &a {limits: *a}\n")
        self.assertIn("gw.yaml: server.limits: a YAML alias refers to its own parent (recursive structure)", lines)
