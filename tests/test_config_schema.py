"""Validation: every mistake is reported with its path, all of them at once."""

from __future__ import annotations

import os
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from txgateway.config import ConfigError, GatewayConfig, parse_config

UPSTREAMS = """
upstreams:
  users:
    servers: ["127.0.0.1:9001"]
  orders:
    servers: ["127.0.0.1:9002"]
"""


def load(text: str, with_upstreams: bool = True) -> GatewayConfig:
    text = textwrap.dedent(text)
    return parse_config((UPSTREAMS if with_upstreams else "") + text, source="gw.yaml", environ={})


def problems(text: str, with_upstreams: bool = True) -> list[str]:
    """The problem lines, without the ``gw.yaml: `` prefix."""
    try:
        load(text, with_upstreams)
    except ConfigError as error:
        return [line.removeprefix("gw.yaml: ") for line in str(error).splitlines()]
    raise AssertionError("the configuration was accepted")


class ProblemTestCase(SynchronousTestCase):
    def assertProblems(self, text: str, *expected: str, with_upstreams: bool = True) -> None:
        self.assertEqual(problems(text, with_upstreams), list(expected))


class GeneralTests(ProblemTestCase):
    def test_minimal_config_gets_model_defaults(self) -> None:
        config = load("{}", with_upstreams=False)
        self.assertEqual(config, GatewayConfig(source="gw.yaml"))

    def test_unknown_top_level_key_with_hint(self) -> None:
        self.assertProblems("upstream: {}", "upstream: unknown key (did you mean 'upstreams'?)")
        self.assertProblems("tracing: {}", "tracing: unknown key (did you mean 'observability.tracing'?)")

    def test_unknown_key_did_you_mean(self) -> None:
        self.assertProblems("server: {limts: {}}", "server.limts: unknown key (did you mean 'limits'?)")

    def test_unknown_key_without_close_match_lists_keys(self) -> None:
        self.assertProblems(
            "admin: {colour: blue}",
            "admin.colour: unknown key (expected one of: listen_addr, listen, token)",
        )

    def test_section_of_wrong_type(self) -> None:
        self.assertProblems("server: [1, 2]", "server: expected a mapping, got a list")
        self.assertProblems("routes: {a: 1}", "routes: expected a list of routes, got a mapping")
        self.assertProblems(
            "upstreams: [a]",
            "upstreams: expected a mapping of upstream names to settings, got a list",
            with_upstreams=False,
        )

    def test_null_means_default(self) -> None:
        config = load("server:\n  workers:\nadmin:\n")
        self.assertEqual(config.server.workers, 1)

    def test_non_string_key(self) -> None:
        self.assertProblems("server: {1: x}", "server.1: keys must be strings, got an integer (1)")

    def test_all_problems_reported_together(self) -> None:
        text = """
        server:
          workers: 0
          limts: {}
        admin: {listen_addr: nowhere}
        routes:
          - match: {path: /a}
            upstream: userz
          - match: {path: b}
            upstream: users
        middleware:
          rate_limit: {algorithm: leaky_bucket}
        observability:
          access_log: {format: xml}
        """
        self.assertProblems(
            text,
            "server.limts: unknown key (did you mean 'limits'?)",
            "server.workers: must be >= 1, got 0",
            "admin.listen_addr: expected 'host:port' (e.g. '0.0.0.0:8080'), got 'nowhere'",
            "routes[0].upstream: unknown upstream 'userz' (known: orders, users) (did you mean 'users'?)",
            "routes[1].match.path: must start with '/', got 'b'",
            "middleware.rate_limit.algorithm: expected one of token_bucket, sliding_window,"
            " got a string ('leaky_bucket')",
            "observability.access_log.format: expected one of json, combined, got a string ('xml')",
        )

    def test_problems_follow_the_files_section_order(self) -> None:
        lines = problems("observability: {metrics: {enabled: 1}}\nserver: {workers: x}\n")
        self.assertEqual(
            lines,
            [
                "observability.metrics.enabled: expected true or false, got an integer (1)",
                "server.workers: expected an integer, got a string ('x')",
            ],
        )

    def test_error_fields(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            parse_config("server: {workers: x}", environ={})
        error = raised.exception
        self.assertEqual(error.source, "<string>")
        self.assertEqual([(p.path, p.message) for p in error.problems],
                         [("server.workers", "expected an integer, got a string ('x')")])
        self.assertEqual(str(error), "<string>: server.workers: expected an integer, got a string ('x')")


class ServerTests(ProblemTestCase):
    def test_listen_addr(self) -> None:
        self.assertEqual(load("server: {listen_addr: '127.0.0.1:8081'}").server.listen,
                         ("tcp:8081:interface=127.0.0.1",))
        self.assertEqual(load("server: {listen_addr: ':8081'}").server.listen, ("tcp:8081:interface=0.0.0.0",))
        self.assertEqual(load("server: {listen_addr: 'localhost:0'}").server.listen, ("tcp:0:interface=localhost",))

    def test_listen_addr_ipv6(self) -> None:
        self.assertEqual(load("server: {listen_addr: '[::]:8080'}").server.listen, ("tcp6:8080:interface=\\:\\:",))
        self.assertEqual(load("server: {listen_addr: '[::1]:80'}").server.listen, ("tcp6:80:interface=\\:\\:1",))

    def test_listen_addr_problems(self) -> None:
        self.assertProblems(
            "server: {listen_addr: '0.0.0.0:99999'}",
            "server.listen_addr: invalid port '99999' in '0.0.0.0:99999': expected 1-65535",
        )
        self.assertProblems(
            "server: {listen_addr: '::1:80'}",
            "server.listen_addr: IPv6 addresses need brackets, e.g. '[::1]:80'",
        )
        self.assertProblems(
            "server: {listen_addr: '[nope]:80'}",
            "server.listen_addr: 'nope' in brackets is not an IPv6 address",
        )
        self.assertProblems("server: {listen_addr: 8080}", "server.listen_addr: expected a string, got an integer (8080)")

    def test_listen_endpoints(self) -> None:
        config = load("server: {listen: ['tcp:8080:interface=0.0.0.0', 'unix:/tmp/gw.sock', 'tcp6:port=8081']}")
        self.assertEqual(config.server.listen, ("tcp:8080:interface=0.0.0.0", "unix:/tmp/gw.sock", "tcp6:port=8081"))
        self.assertEqual(load("server: {listen: 'tcp:8080'}").server.listen, ("tcp:8080",))

    def test_listen_endpoint_problems(self) -> None:
        self.assertProblems(
            "server: {listen: ['tpc:8080', 'tcp:http', 'ssl:443', 'unix:']}",
            "server.listen[0]: unknown endpoint type 'tpc' in 'tpc:8080' (known: tcp, tcp6, ssl, unix, systemd)"
            " (did you mean 'tcp'?)",
            "server.listen[1]: endpoint 'tcp:http' needs a port 0-65535, got 'http'",
            "server.listen[2]: ssl endpoint 'ssl:443' needs privateKey=FILE",
            "server.listen[3]: unix endpoint 'unix:' needs a socket path",
        )
        self.assertProblems("server: {listen: []}", "server.listen: needs at least one endpoint")

    def test_listen_and_listen_addr_exclusive(self) -> None:
        self.assertProblems(
            "server: {listen_addr: ':80', listen: ['tcp:80']}",
            "server.listen: give either listen_addr or listen, not both",
        )

    def test_workers_and_alias(self) -> None:
        self.assertEqual(load("server: {workers: 3}").server.workers, 3)
        self.assertEqual(load("server: {worker_threads: 4}").server.workers, 4)
        self.assertProblems(
            "server: {workers: 2, worker_threads: 4}",
            "server.worker_threads: 'workers' is also given; 'worker_threads' is another name for it: keep one",
        )
        self.assertProblems("server: {worker_threads: 0}", "server.worker_threads: must be >= 1, got 0")

    def test_limits(self) -> None:
        limits = load(
            "server: {limits: {max_header_bytes: 16KiB, max_body_bytes: 1GiB, max_connections: 5,"
            " header_timeout: 2.5, idle_timeout: 1m}}"
        ).server.limits
        self.assertEqual(
            (limits.max_header_bytes, limits.max_body_bytes, limits.max_connections),
            (16 * 1024, 1024**3, 5),
        )
        self.assertEqual((limits.header_timeout, limits.idle_timeout), (2.5, 60.0))

    def test_websocket(self) -> None:
        self.assertEqual(load("{}", with_upstreams=False).server.websocket.max_message_bytes, 1024 * 1024)
        ws = load(
            "server: {websocket: {max_message_bytes: 64KiB, open_handshake_timeout: 5, idle_timeout: 2m,"
            " ping_interval: 0, max_messages_per_second: 50, max_connections_per_consumer: 3}}"
        ).server.websocket
        self.assertEqual(
            (
                ws.max_message_bytes,
                ws.open_handshake_timeout,
                ws.idle_timeout,
                ws.ping_interval,
                ws.max_messages_per_second,
                ws.max_connections_per_consumer,
            ),
            (64 * 1024, 5.0, 120.0, 0.0, 50, 3),
        )

    def test_websocket_problems(self) -> None:
        self.assertProblems(
            "server: {websocket: {idle_timout: 5, max_messages_per_second: 0}}",
            "server.websocket.idle_timout: unknown key (did you mean 'idle_timeout'?)",
            "server.websocket.max_messages_per_second: must be >= 1, got 0",
        )
        self.assertProblems(
            "server: {websockets: {}}", "server.websockets: unknown key (did you mean 'websocket'?)"
        )

    def test_limit_problems(self) -> None:
        self.assertProblems(
            "server: {limits: {max_body_bytes: lots, max_header_bytes: 0, max_connections: 1.5,"
            " header_timeout: -1, idle_timeout: true, max_requests: 3}}",
            "server.limits.max_requests: unknown key (expected one of: max_header_bytes, max_body_bytes,"
            " max_connections, header_timeout, idle_timeout)",
            "server.limits.max_header_bytes: must be > 0 bytes, got 0",
            "server.limits.max_body_bytes: invalid size 'lots': expected bytes as an integer or a number with a"
            " unit (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB), e.g. 10MiB",
            "server.limits.max_connections: expected an integer, got a number (1.5)",
            "server.limits.header_timeout: invalid duration -1: must be >= 0",
            "server.limits.idle_timeout: expected a duration in seconds, got a boolean (true)",
        )

    def test_trusted_proxies(self) -> None:
        config = load("server: {trusted_proxies: ['10.0.0.0/8', '192.168.1.7', 'fd00::/8']}")
        self.assertEqual(config.server.trusted_proxies, ("10.0.0.0/8", "192.168.1.7/32", "fd00::/8"))
        self.assertProblems(
            "server: {trusted_proxies: ['10.0.0.1/8', 'intranet', 7]}",
            "server.trusted_proxies[0]: '10.0.0.1/8' has host bits set (did you mean '10.0.0.0/8'?)",
            "server.trusted_proxies[1]: expected an IP address or CIDR network (e.g. 10.0.0.0/8), got 'intranet'",
            "server.trusted_proxies[2]: expected a string, got an integer (7)",
        )
        self.assertProblems(
            "server: {trusted_proxies: 10.0.0.0/8}",
            "server.trusted_proxies: expected a list, got a string ('10.0.0.0/8')",
        )

    def test_tls(self) -> None:
        cert, key = self.mktemp(), self.mktemp()
        for path in (cert, key):
            with open(path, "w") as stream:
                stream.write("pem")
        tls = load(f"server: {{tls: {{listen_addr: '127.0.0.1:8443', cert: '{cert}', key: '{key}'}}}}").server.tls
        assert tls is not None
        self.assertEqual((tls.cert, tls.key), (cert, key))
        escaped_cert, escaped_key = (p.replace(":", "\\:") for p in (cert, key))
        self.assertEqual(
            tls.listen, f"ssl:8443:interface=127.0.0.1:certKey={escaped_cert}:privateKey={escaped_key}"
        )
        default = load(f"server: {{tls: {{cert: '{cert}', key: '{key}'}}}}").server.tls
        assert default is not None
        self.assertTrue(default.listen.startswith("ssl:8443:interface=0.0.0.0:"))

    def test_tls_files_must_exist(self) -> None:
        missing = os.path.abspath(self.mktemp())
        self.assertProblems(
            f"server: {{tls: {{listen_addr: '0.0.0.0:8443', cert: '{missing}'}}}}",
            f"server.tls.cert: file not found: {missing}",
            "server.tls.key: required",
        )

    def test_shutdown_grace(self) -> None:
        self.assertEqual(load("server: {shutdown_grace: 0}").server.shutdown_grace, 0.0)
        self.assertProblems(
            "server: {shutdown_grace: forever}",
            "server.shutdown_grace: invalid duration 'forever': expected seconds as a number,"
            " or a number with a unit (ms, s, m, h), e.g. 30 or 500ms",
        )


class AdminTests(ProblemTestCase):
    def test_admin(self) -> None:
        admin = load("admin: {listen_addr: '0.0.0.0:9191', token: abc}").admin
        self.assertEqual((admin.listen, admin.token), ("tcp:9191:interface=0.0.0.0", "abc"))
        self.assertIsNone(load("admin: {token: ''}").admin.token)
        self.assertEqual(load("admin: {listen: 'unix:/run/gw-admin.sock'}").admin.listen, "unix:/run/gw-admin.sock")

    def test_admin_problems(self) -> None:
        self.assertProblems("admin: {token: 123}", "admin.token: expected a string, got an integer (123)")


class UpstreamTests(ProblemTestCase):
    def test_servers_forms(self) -> None:
        text = """
        upstreams:
          api:
            servers:
              - "10.0.0.1:80"
              - {address: "backend.internal:8080", weight: 3}
              - "[fd00::1]:81"
        """
        servers = load(text, with_upstreams=False).upstreams["api"].servers
        self.assertEqual(
            [(s.host, s.port, s.weight) for s in servers],
            [("10.0.0.1", 80, 1), ("backend.internal", 8080, 3), ("fd00::1", 81, 1)],
        )

    def test_server_problems(self) -> None:
        text = """
        upstreams:
          api:
            servers:
              - "10.0.0.1"
              - {address: "10.0.0.2:0"}
              - {weight: 2}
              - {address: "10.0.0.3:80", weight: 0, wieght: 1}
              - "bad host!:80"
              - ":80"
              - "10.0.0.4:80"
              - "10.0.0.4:80"
              - 42
        """
        self.assertProblems(
            text,
            "upstreams.api.servers[0]: expected 'host:port' (e.g. '10.0.0.5:8080' or 'users.internal:8080'),"
            " got '10.0.0.1'",
            "upstreams.api.servers[1].address: invalid port '0' in '10.0.0.2:0': expected 1-65535",
            "upstreams.api.servers[2].address: required",
            "upstreams.api.servers[3].wieght: unknown key (did you mean 'weight'?)",
            "upstreams.api.servers[3].weight: must be >= 1, got 0",
            "upstreams.api.servers[4]: 'bad host!' is not a valid host name or IP address",
            "upstreams.api.servers[5]: a host is required (e.g. '10.0.0.5:8080' or 'users.internal:8080'),"
            " got ':80'",
            "upstreams.api.servers[7]: duplicate server 10.0.0.4:80",
            "upstreams.api.servers[8]: expected a mapping, got an integer (42)",
            with_upstreams=False,
        )

    def test_servers_or_discovery_required(self) -> None:
        self.assertProblems(
            "upstreams: {api: {protocol: http}, empty: {servers: []}, bare: }",
            "upstreams.api: needs servers or discovery",
            "upstreams.empty.servers: is empty and there is no discovery: give at least one server",
            "upstreams.bare: needs servers or discovery",
            with_upstreams=False,
        )

    def test_inner_name_must_match_key(self) -> None:
        self.assertEqual(
            load("upstreams: {api: {name: api, servers: ['h:1']}}", with_upstreams=False).upstreams["api"].name,
            "api",
        )
        self.assertProblems(
            "upstreams: {api: {name: apis, servers: ['h:1']}}",
            "upstreams.api.name: must match its key 'api', got 'apis'",
            with_upstreams=False,
        )

    def test_odd_upstream_names_are_quoted_in_paths(self) -> None:
        self.assertProblems(
            "upstreams: {'users.v2': {servers: ['h:1'], protocol: http3}}",
            'upstreams["users.v2"].protocol: expected one of http, h2c, grpc, got a string (\'http3\')'
            " (did you mean 'http'?)",
            with_upstreams=False,
        )

    def test_choices(self) -> None:
        self.assertProblems(
            "upstreams: {api: {servers: ['h:1'], protocol: grcp, load_balancer: round_robbin}}",
            "upstreams.api.protocol: expected one of http, h2c, grpc, got a string ('grcp') (did you mean 'grpc'?)",
            "upstreams.api.load_balancer: expected one of round_robin, weighted, least_connections,"
            " consistent_hash, random, got a string ('round_robbin') (did you mean 'round_robin'?)",
            with_upstreams=False,
        )

    def test_hash_key(self) -> None:
        def hash_key(value: str) -> str | None:
            text = f"upstreams: {{api: {{servers: ['h:1'], load_balancer: consistent_hash, hash_key: '{value}'}}}}"
            return load(text, with_upstreams=False).upstreams["api"].hash_key

        self.assertEqual(hash_key("header:X-User-Id"), "header:x-user-id")
        self.assertEqual(hash_key("cookie:session"), "cookie:session")
        self.assertEqual(hash_key("ip"), "ip")
        self.assertEqual(hash_key("path"), "path")
        self.assertProblems(
            "upstreams: {api: {servers: ['h:1'], load_balancer: consistent_hash}, b: {servers: ['h:1'], hash_key: x}}",
            "upstreams.api.hash_key: required when load_balancer is consistent_hash",
            "upstreams.b.hash_key: expected header:NAME, cookie:NAME, ip or path, got 'x'",
            with_upstreams=False,
        )

    def test_discovery(self) -> None:
        text = """
        upstreams:
          a: {discovery: {type: dns, name: a.svc, port: 80}}
          b: {discovery: {type: dns, name: _http._tcp.b.svc, record_type: SRV, refresh: 30}}
          c: {discovery: {type: kubernetes, name: c, namespace: shop, port: 8080}}
          d: {discovery: {type: consul, name: d, datacenter: dc1, tag: v2}}
          e: {discovery: {type: etcd, name: e, url: "http://etcd:2379", prefix: /svc/}}
        """
        upstreams = load(text, with_upstreams=False).upstreams
        discoveries = {name: upstream.discovery for name, upstream in upstreams.items()}
        a, b, c, d, e = (discoveries[n] for n in "abcde")
        assert a is not None and b is not None and c is not None and d is not None and e is not None
        self.assertEqual((a.type, a.name, a.port, a.refresh, dict(a.options)), ("dns", "a.svc", 80, 10.0,
                                                                               {"record_type": "A"}))
        self.assertEqual((b.port, b.refresh, dict(b.options)), (None, 30.0, {"record_type": "SRV"}))
        self.assertEqual(dict(c.options), {"namespace": "shop"})
        self.assertEqual(dict(d.options), {"url": "http://127.0.0.1:8500", "datacenter": "dc1", "tag": "v2"})
        self.assertEqual(dict(e.options), {"url": "http://etcd:2379", "prefix": "/svc/"})

    def test_discovery_problems(self) -> None:
        text = """
        upstreams:
          a: {discovery: {type: zookeeper, name: a}}
          b: {discovery: {type: dns, name: b, namespace: x, port: 70000}}
          c: {discovery: {type: dns}}
          d: {discovery: {type: consul, name: d, refesh: 5, url: "consul:8500"}}
          e: {discovery: "dns:e"}
        """
        self.assertProblems(
            text,
            "upstreams.a.discovery.type: expected one of dns, kubernetes, consul, etcd, got a string ('zookeeper')",
            "upstreams.b.discovery.port: must be between 1 and 65535, got 70000",
            "upstreams.b.discovery.namespace: only applies to discovery type kubernetes, not dns",
            "upstreams.c.discovery.name: required",
            "upstreams.c.discovery.port: required for dns discovery (unless record_type is SRV)",
            "upstreams.d.discovery.refesh: unknown key (did you mean 'refresh'?)",
            "upstreams.d.discovery.url: expected a http or https URL, got 'consul:8500'",
            "upstreams.e.discovery: expected a mapping, got a string ('dns:e')",
            with_upstreams=False,
        )

    def test_health_and_breaker(self) -> None:
        text = """
        upstreams:
          a:
            servers: ["h:1"]
            health_check: {path: /healthz}
            passive_health: {consecutive_failures: 2}
            circuit_breaker: {}
        """
        upstream = load(text, with_upstreams=False).upstreams["a"]
        self.assertTrue(upstream.health_check.enabled)  # a health_check block turns it on
        self.assertEqual(upstream.health_check.path, "/healthz")
        assert upstream.passive_health is not None and upstream.circuit_breaker is not None
        self.assertEqual(upstream.passive_health.consecutive_failures, 2)
        self.assertEqual(upstream.circuit_breaker.failure_threshold, 5)
        self.assertFalse(load("routes: []").upstreams["users"].health_check.enabled)
        self.assertIsNone(load("routes: []").upstreams["users"].circuit_breaker)

    def test_health_and_breaker_problems(self) -> None:
        text = """
        upstreams:
          a:
            servers: ["h:1"]
            health_check: {enabled: on, path: health, interval: 0, unhealthy_threshold: 0}
            circuit_breaker: {failure_threshold: -1, recovery_timeout: 0, success_treshold: 1}
            passive_health: {ejection_time: 1h, consecutive_failures: "3"}
        """
        self.assertProblems(
            text,
            "upstreams.a.health_check.enabled: expected true or false, got a string ('on')",
            "upstreams.a.health_check.path: must start with '/', got 'health'",
            "upstreams.a.health_check.interval: must be > 0 seconds, got 0",
            "upstreams.a.health_check.unhealthy_threshold: must be >= 1, got 0",
            "upstreams.a.passive_health.consecutive_failures: expected an integer, got a string ('3')",
            "upstreams.a.circuit_breaker.success_treshold: unknown key (did you mean 'success_threshold'?)",
            "upstreams.a.circuit_breaker.failure_threshold: must be >= 1, got -1",
            "upstreams.a.circuit_breaker.recovery_timeout: must be > 0 seconds, got 0",
            with_upstreams=False,
        )

    def test_retry(self) -> None:
        text = """
        upstreams:
          a:
            servers: ["h:1"]
            retry: {attempts: 2, on: [reset, 429, "503"], methods: [get, post], backoff_base: 50ms}
        """
        retry = load(text, with_upstreams=False).upstreams["a"].retry
        self.assertEqual((retry.attempts, retry.on, retry.methods), (2, ("reset", "429", "503"), ("GET", "POST")))
        self.assertEqual(retry.backoff_base, 0.05)

    def test_retry_problems(self) -> None:
        text = """
        upstreams:
          a:
            servers: ["h:1"]
            retry: {attempts: 0, on: [timeuot, 99, 600], methods: ["GET /"], backoff_base: 2, backoff_max: 1,
                    budget_ratio: 1.5}
        """
        self.assertProblems(
            text,
            "upstreams.a.retry.backoff_max: must be >= backoff_base (2), got 1",
            "upstreams.a.retry.attempts: must be between 1 and 100, got 0",
            "upstreams.a.retry.on[0]: expected connect_error, timeout, reset or an HTTP status code,"
            " got a string ('timeuot') (did you mean 'timeout'?)",
            "upstreams.a.retry.on[1]: expected connect_error, timeout, reset or an HTTP status code,"
            " got an integer (99)",
            "upstreams.a.retry.on[2]: expected connect_error, timeout, reset or an HTTP status code,"
            " got an integer (600)",
            "upstreams.a.retry.methods[0]: 'GET /' is not a valid HTTP token (letters, digits and !#$%&'*+.^_`|~-)",
            "upstreams.a.retry.budget_ratio: must be between 0 and 1, got 1.5",
            with_upstreams=False,
        )

    def test_timeouts_and_pool(self) -> None:
        self.assertProblems(
            "upstreams: {a: {servers: ['h:1'], timeouts: {connect: 0, read: 5}, pool: {max_connections_per_host: 0}}}",
            "upstreams.a.timeouts.read: unknown key (expected one of: connect, request, idle, total)",
            "upstreams.a.timeouts.connect: must be > 0 seconds, got 0",
            "upstreams.a.pool.max_connections_per_host: must be >= 1, got 0",
            with_upstreams=False,
        )

    def test_fallback(self) -> None:
        config = load("upstreams: {a: {servers: ['h:1'], fallback: {upstream: b}}, b: {servers: ['h:2']}}",
                      with_upstreams=False)
        fallback = config.upstreams["a"].fallback
        assert fallback is not None
        self.assertEqual(fallback.upstream, "b")
        self.assertProblems(
            """
            upstreams:
              a: {servers: ["h:1"], fallback: {upstream: a}}
              b: {servers: ["h:1"], fallback: {upstream: cc, status: 99}}
              c: {servers: ["h:1"], fallback: {upstream: d}}
              d: {servers: ["h:1"], fallback: {upstream: c}}
            """,
            "upstreams.a.fallback.upstream: an upstream cannot fall back to itself",
            "upstreams.b.fallback.upstream: unknown upstream 'cc' (known: a, b, c, d) (did you mean 'c'?)",
            "upstreams.b.fallback.status: must be between 100 and 599, got 99",
            "upstreams.c.fallback.upstream: fallback cycle: c -> d -> c",
            with_upstreams=False,
        )


class RouteTests(ProblemTestCase):
    def test_route_defaults(self) -> None:
        config = load("routes: [{match: {path: /a}, upstream: users}, {match: {path: /b}, upstream: orders}]")
        self.assertEqual([r.name for r in config.routes], ["route-0", "route-1"])
        route = config.routes[0]
        self.assertEqual(
            (route.match.methods, route.match.host, route.match.headers, route.auth, route.websocket),
            ((), None, (), None, False),
        )

    def test_empty_routes(self) -> None:
        self.assertEqual(load("routes: []").routes, ())

    def test_unknown_upstream(self) -> None:
        self.assertProblems(
            """
            routes:
              - {match: {path: /a}, upstream: users}
              - {match: {path: /b}, upstream: orders}
              - {match: {path: /c}, upstream: userz}
            """,
            "routes[2].upstream: unknown upstream 'userz' (known: orders, users) (did you mean 'users'?)",
        )
        self.assertProblems(
            "routes: [{match: {path: /a}, upstream: x}]",
            "routes[0].upstream: unknown upstream 'x' (known: none configured)",
            with_upstreams=False,
        )

    def test_required_parts(self) -> None:
        self.assertProblems(
            "routes: [{name: a}, {name: b, match: {methods: [GET]}, upstream: users}, 5]",
            "routes[0].match.path: required",
            "routes[0].upstream: required",
            "routes[1].match.path: required",
            "routes[2]: expected a mapping, got an integer (5)",
        )

    def test_match_keys_at_route_level_hinted(self) -> None:
        self.assertProblems(
            "routes: [{path: /a, methods: [GET], upstream: users, match: {path: /a, method: GET}}]",
            "routes[0].path: unknown key (did you mean 'match.path'?)",
            "routes[0].methods: unknown key (did you mean 'match.methods'?)",
            "routes[0].match.method: unknown key (did you mean 'methods'?)",
        )

    def test_duplicate_names(self) -> None:
        self.assertProblems(
            """
            routes:
              - {name: api, match: {path: /a}, upstream: users}
              - {match: {path: /b}, upstream: users}
              - {name: api, match: {path: /c}, upstream: users}
              - {name: route-1, match: {path: /d}, upstream: users}
            """,
            "routes[2].name: duplicate route name 'api' (also routes[0])",
            "routes[3].name: duplicate route name 'route-1' (also routes[1])",
        )

    def test_match(self) -> None:
        route = load(
            "routes: [{match: {path: '/api/{id}', methods: [get, Put], host: API.Example.com,"
            " headers: {X-Version: 2, X-Tenant: acme}}, upstream: users}]"
        ).routes[0]
        self.assertEqual(route.match.methods, ("GET", "PUT"))
        self.assertEqual(route.match.host, "api.example.com")
        self.assertEqual(route.match.headers, (("x-version", "2"), ("x-tenant", "acme")))
        wildcard = load("routes: [{match: {path: /a, host: '*.example.com'}, upstream: users}]").routes[0]
        self.assertEqual(wildcard.match.host, "*.example.com")

    def test_match_problems(self) -> None:
        self.assertProblems(
            "routes: [{match: {path: '/files/{name}.json', methods: GET, host: 'a b', headers: {x-on: true},"
            " query: {a: b}}, upstream: users}]",
            "routes[0].match.query: unknown key (expected one of: path, methods, host, headers)",
            "routes[0].match.path: a parameter must be a whole segment, like /{id}/:"
            " '{name}.json' in '/files/{name}.json'",
            "routes[0].match.methods: expected a list, got a string ('GET')",
            "routes[0].match.host: expected a host name such as api.example.com or *.example.com, got 'a b'",
            "routes[0].match.headers.x-on: expected a string (quote it to send it as text), got a boolean (true)",
        )
        self.assertProblems(
            "routes: [{match: {path: /a, methods: ['GE T', 3]}, upstream: users}]",
            "routes[0].match.methods[0]: 'GE T' is not a valid HTTP token (letters, digits and !#$%&'*+.^_`|~-)",
            "routes[0].match.methods[1]: expected a string, got an integer (3)",
        )

    def test_rewrite(self) -> None:
        route = load(
            "routes: [{match: {path: '/api/users/{id}/{rest:*}'}, upstream: users,"
            " strip_prefix: /api, rewrite: '/v2/{id}/{rest}'}]"
        ).routes[0]
        self.assertEqual((route.strip_prefix, route.rewrite), ("/api", "/v2/{id}/{rest}"))

    def test_rewrite_unknown_parameter(self) -> None:
        self.assertProblems(
            "routes: [{match: {path: '/api/users/{id}'}, upstream: users, rewrite: '/v2/users/{user_id}'}]",
            "routes[0].rewrite: uses {user_id} but the path pattern has no such parameter (available: id)",
        )
        self.assertProblems(
            "routes: [{match: {path: '/a/{id}/{name}'}, upstream: users, rewrite: '/b/{idd}'}]",
            "routes[0].rewrite: uses {idd} but the path pattern has no such parameter (available: id, name)"
            " (did you mean 'id'?)",
        )
        self.assertProblems(
            "routes: [{match: {path: /static}, upstream: users, rewrite: '/x/{id}'}]",
            "routes[0].rewrite: uses {id} but the path pattern has no such parameter (the path has no parameters)",
        )

    def test_rewrite_and_strip_prefix_problems(self) -> None:
        self.assertProblems(
            "routes: [{match: {path: '/api/{id}'}, upstream: users, strip_prefix: api, rewrite: v2}]",
            "routes[0].strip_prefix: must start with '/', got 'api'",
            "routes[0].rewrite: must start with '/', got 'v2'",
        )
        self.assertProblems(
            "routes: [{match: {path: '/api/users/{id}'}, upstream: users, strip_prefix: /v1}]",
            "routes[0].strip_prefix: '/v1' is not a prefix of the route's path '/api/users/{id}',"
            " so it would never apply",
        )
        self.assertProblems(
            "routes: [{match: {path: '/apix/{id}'}, upstream: users, strip_prefix: /api}]",
            "routes[0].strip_prefix: '/api' is not a prefix of the route's path '/apix/{id}', so it would never apply",
        )
        self.assertEqual(
            load("routes: [{match: {path: '/api/'}, upstream: users, strip_prefix: /api/}]").routes[0].strip_prefix,
            "/api/",
        )

    def test_route_options(self) -> None:
        text = """
        middleware:
          rate_limit: {requests_per_minute: 100, storage: redis, tiers: [{role: admin, requests_per_minute: 9}]}
        routes:
          - match: {path: /a}
            upstream: users
            timeout: 1.5
            auth: none
            roles: [admin]
            rate_limit: {requests_per_minute: 10, key: "header:X-Tenant"}
            cache: {ttl: 5}
            websocket: true
            max_body_bytes: 2MiB
            headers:
              request: {set: {X-From: gw}, remove: [Cookie]}
        """
        route = load(text).routes[0]
        self.assertEqual((route.timeout, route.auth, route.roles), (1.5, "none", ("admin",)))
        assert route.rate_limit is not None and route.cache is not None
        self.assertEqual(route.rate_limit.requests_per_minute, 10)
        self.assertEqual(route.rate_limit.key, "header:x-tenant")
        self.assertEqual(route.rate_limit.storage, "redis")  # inherited from middleware.rate_limit
        self.assertEqual(route.rate_limit.tiers, ())  # tiers are not inherited
        self.assertEqual((route.cache.enabled, route.cache.ttl), (True, 5.0))
        self.assertEqual(route.max_body_bytes, 2 * 1024 * 1024)
        self.assertEqual(route.request_headers.set, (("x-from", "gw"),))
        self.assertEqual(route.request_headers.remove, ("cookie",))

    def test_route_option_problems(self) -> None:
        text = """
        routes:
          - match: {path: /a}
            upstream: users
            timeout: 0
            auth: yes
            roles: admin
            rate_limit: {requests_per_minute: 0, key: user}
            cache: {enabled: true, ttl: -1}
            websocket: "true"
            max_body_bytes: big
            headers:
              request: {set: {"bad name": x}, remove: [ok], add: {}}
              reply: {}
        """
        self.assertProblems(
            text,
            "routes[0].timeout: must be > 0 seconds, got 0",
            "routes[0].auth: expected one of required, optional, none, got a string ('yes')",
            "routes[0].roles: expected a list, got a string ('admin')",
            "routes[0].rate_limit.requests_per_minute: must be >= 1, got 0",
            "routes[0].rate_limit.key: expected consumer, ip, route or header:NAME, got 'user'",
            "routes[0].cache.ttl: invalid duration -1: must be >= 0",
            "routes[0].websocket: expected true or false, got a string ('true')",
            "routes[0].max_body_bytes: invalid size 'big': expected bytes as an integer or a number with a unit"
            " (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB), e.g. 10MiB",
            "routes[0].headers.reply: unknown key (expected one of: request, response)",
            "routes[0].headers.request.add: unknown key (expected one of: set, remove)",
            'routes[0].headers.request.set["bad name"]: \'bad name\' is not a valid HTTP token'
            " (letters, digits and !#$%&'*+.^_`|~-)",
        )


class MiddlewareTests(ProblemTestCase):
    def test_defaults_without_middleware(self) -> None:
        middleware = load("routes: []").middleware
        self.assertTrue(middleware.enabled)
        self.assertFalse(middleware.auth.enabled)
        self.assertIsNone(middleware.rate_limit)
        self.assertIsNone(middleware.cors)

    def test_auth_block_enables_auth(self) -> None:
        auth = load("middleware: {auth: {jwt_secret: s}}").middleware.auth
        self.assertTrue(auth.enabled)
        self.assertFalse(load("middleware: {auth: {enabled: false, jwt_secret: s}}").middleware.auth.enabled)

    def test_auth_needs_credentials(self) -> None:
        self.assertProblems(
            "middleware: {auth: {exclude_paths: [/health]}}",
            "middleware.auth: enabled, but nothing can authenticate a request: set jwt_secret, jwt or api_keys"
            " (or enabled: false)",
        )
        self.assertFalse(load("middleware: {auth: {enabled: false}}").middleware.auth.enabled)

    def test_jwt_block(self) -> None:
        jwt = load(
            "middleware: {auth: {jwt: {algorithms: [RS256, es256], jwks_url: 'https://idp/jwks', issuer: i,"
            " audience: a, leeway: 5, query_param: token}}}"
        ).middleware.auth.jwt
        assert jwt is not None
        self.assertEqual(jwt.algorithms, ("RS256", "ES256"))
        self.assertIsNone(jwt.secret)
        self.assertEqual((jwt.jwks_url, jwt.issuer, jwt.audience, jwt.leeway), ("https://idp/jwks", "i", "a", 5.0))

    def test_jwt_secret_merged_with_jwt_block(self) -> None:
        jwt = load("middleware: {auth: {jwt_secret: s, jwt: {algorithms: [RS256], jwks_url: 'https://i/k'}}}")
        merged = jwt.middleware.auth.jwt
        assert merged is not None
        self.assertEqual((merged.algorithms, merged.secret), (("HS256", "RS256"), "s"))
        hs512 = load("middleware: {auth: {jwt_secret: s, jwt: {algorithms: [HS512]}}}").middleware.auth.jwt
        assert hs512 is not None
        self.assertEqual((hs512.algorithms, hs512.secret), (("HS512",), "s"))

    def test_jwt_problems(self) -> None:
        self.assertProblems(
            "middleware: {auth: {jwt: {algorithms: [none, RS257, HS256]}}}",
            "middleware.auth.jwt.algorithms[0]: alg none is never allowed",
            "middleware.auth.jwt.algorithms[1]: unknown algorithm 'RS257' (allowed: HS256, HS384, HS512, RS256,"
            " RS384, RS512, PS256, PS384, PS512, ES256, ES384, ES512, EdDSA) (did you mean 'RS256'?)",
            "middleware.auth.jwt.algorithms: HS256 needs a shared secret: set jwt.secret or jwt_secret",
        )
        self.assertProblems(
            "middleware: {auth: {jwt: {algorithms: [ES256], jwks_url: 'ftp://x', audiance: a}}}",
            "middleware.auth.jwt.audiance: unknown key (did you mean 'audience'?)",
            "middleware.auth.jwt.jwks_url: expected a https or http URL, got 'ftp://x'",
        )
        self.assertProblems(
            "middleware: {auth: {jwt: {algorithms: [ES256]}}}",
            "middleware.auth.jwt.algorithms: ES256 needs keys: set jwt.jwks_url or jwt.public_key_file",
        )
        self.assertProblems(
            "middleware: {auth: {jwt_secret: a, jwt: {secret: b}}}",
            "middleware.auth.jwt.secret: differs from middleware.auth.jwt_secret: give one of them",
        )

    def test_jwt_public_key_file_must_exist(self) -> None:
        missing = os.path.abspath(self.mktemp())
        self.assertProblems(
            f"middleware: {{auth: {{jwt: {{algorithms: [RS256], public_key_file: '{missing}'}}}}}}",
            f"middleware.auth.jwt.public_key_file: file not found: {missing}",
        )

    def test_api_keys(self) -> None:
        digest = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08"
        auth = load(
            f"middleware: {{auth: {{api_keys: {{header: X-Key, keys: [{{sha256: {digest}, consumer: ci,"
            " roles: [premium]}]}}}"
        ).middleware.auth
        self.assertEqual(auth.api_key_header, "x-key")
        self.assertEqual(len(auth.api_keys), 1)
        self.assertEqual(
            (auth.api_keys[0].sha256, auth.api_keys[0].consumer, auth.api_keys[0].roles),
            (digest.lower(), "ci", ("premium",)),
        )

    def test_api_key_problems(self) -> None:
        digest = "a" * 64
        self.assertProblems(
            f"middleware: {{auth: {{api_keys: {{keys: [{{sha256: abc, consumer: x}}, {{key: secret}},"
            f" {{sha256: '{digest}', consumer: a}}, {{sha256: '{digest}', consumer: b}}]}}}}}}",
            "middleware.auth.api_keys.keys[0].sha256: expected the key's SHA-256 as 64 hex characters"
            " (e.g. from: printf %s KEY | sha256sum)",
            "middleware.auth.api_keys.keys[1].key: unknown key (did you mean 'sha256'?)",
            "middleware.auth.api_keys.keys[1].sha256: required",
            "middleware.auth.api_keys.keys[1].consumer: required",
            "middleware.auth.api_keys.keys[3].sha256: duplicate key",
        )

    def test_exclude_paths_and_forward_claims(self) -> None:
        auth = load(
            "middleware: {auth: {jwt_secret: s, exclude_paths: [/health], forward_claims: {sub: X-User-ID}}}"
        ).middleware.auth
        self.assertEqual(auth.exclude_paths, ("/health",))
        self.assertEqual(auth.forward_claims, (("sub", "x-user-id"),))
        self.assertProblems(
            "middleware: {auth: {jwt_secret: s, exclude_paths: [health], forward_claims: {sub: 'X User'}}}",
            "middleware.auth.exclude_paths[0]: must start with '/', got 'health'",
            "middleware.auth.forward_claims.sub: 'X User' is not a valid HTTP token"
            " (letters, digits and !#$%&'*+.^_`|~-)",
        )

    def test_rate_limit(self) -> None:
        rate_limit = load(
            "middleware: {rate_limit: {algorithm: sliding_window, storage: redis, on_storage_error: deny,"
            " redis: {url: 'rediss://cache:6380/1', timeout: 0.2}, key: ip,"
            " tiers: [{role: vip, requests_per_minute: 600, burst_size: 50}]}}"
        ).middleware.rate_limit
        assert rate_limit is not None
        self.assertEqual(
            (rate_limit.enabled, rate_limit.algorithm, rate_limit.storage, rate_limit.on_storage_error),
            (True, "sliding_window", "redis", "deny"),
        )
        self.assertEqual((rate_limit.redis_url, rate_limit.redis_timeout), ("rediss://cache:6380/1", 0.2))
        self.assertEqual(rate_limit.key, "ip")
        self.assertEqual([dict(t) for t in rate_limit.tiers],
                         [{"role": "vip", "requests_per_minute": 600, "burst_size": 50}])

    def test_rate_limit_problems(self) -> None:
        self.assertProblems(
            "middleware: {rate_limit: {storage: postgres, on_storage_error: ignore, burst_size: 0,"
            " redis: {url: 'http://x', timout: 1}, tiers: [{role: a, requests_per_minute: 0}, {requests_per_minute: 5}]}}",
            "middleware.rate_limit.burst_size: must be >= 1, got 0",
            "middleware.rate_limit.redis.timout: unknown key (did you mean 'timeout'?)",
            "middleware.rate_limit.tiers[0].requests_per_minute: must be >= 1, got 0",
            "middleware.rate_limit.tiers[1].role: required",
            "middleware.rate_limit.storage: expected one of memory, redis, got a string ('postgres')",
            "middleware.rate_limit.redis.url: expected a redis or rediss or unix URL, got 'http://x'",
            "middleware.rate_limit.on_storage_error: expected one of allow, deny, local, got a string ('ignore')",
        )

    def test_cache(self) -> None:
        cache = load("middleware: {cache: {enabled: true, max_bytes: 1GiB, max_object_bytes: 10MiB}}").middleware.cache
        self.assertEqual((cache.enabled, cache.max_bytes, cache.max_object_bytes), (True, 1024**3, 10 * 1024**2))
        self.assertProblems(
            "middleware: {cache: {max_bytes: 1MiB, max_object_bytes: 2MiB, storage: disk}}",
            "middleware.cache.max_object_bytes: must be <= max_bytes (1048576), got 2097152",
            "middleware.cache.storage: expected one of memory, redis, got a string ('disk')",
        )

    def test_cors(self) -> None:
        cors = load(
            "middleware: {cors: {allow_origins: ['https://app.example.com', '*'], allow_methods: [get],"
            " allow_headers: [Authorization]}}"
        ).middleware.cors
        assert cors is not None
        self.assertEqual(cors.allow_origins, ("https://app.example.com", "*"))
        self.assertEqual(cors.allow_methods, ("GET",))
        self.assertEqual(cors.allow_headers, ("authorization",))
        self.assertEqual(cors.max_age, 600)
        self.assertProblems(
            "middleware: {cors: {allow_origins: [app.example.com], max_age: -1, allow_credentials: true}}",
            "middleware.cors.allow_credentials: unknown key (expected one of: allow_origins, allow_methods,"
            " allow_headers, max_age)",
            "middleware.cors.allow_origins[0]: expected '*' or an origin such as https://app.example.com (no path),"
            " got 'app.example.com'",
            "middleware.cors.max_age: must be >= 0, got -1",
        )


class ObservabilityTests(ProblemTestCase):
    def test_observability(self) -> None:
        observability = load(
            "observability: {access_log: {format: combined, path: /var/log/gw.log}, metrics: {enabled: false},"
            " tracing: {otlp_endpoint: 'http://otel:4318/v1/traces', sample_ratio: 1}}"
        ).observability
        self.assertEqual((observability.access_log.format, observability.access_log.path),
                         ("combined", "/var/log/gw.log"))
        self.assertFalse(observability.metrics_enabled)
        self.assertTrue(observability.tracing.enabled)  # a tracing block turns it on
        self.assertEqual(observability.tracing.sample_ratio, 1.0)

    def test_observability_problems(self) -> None:
        self.assertProblems(
            "observability: {metrics: {enabled: true, path: /m}, tracing: {sample_ratio: -0.1,"
            " otlp_endpoint: 'otel:4318', service_name: ''}}",
            "observability.metrics.path: unknown key (expected one of: enabled)",
            "observability.tracing.otlp_endpoint: expected a http or https URL, got 'otel:4318'",
            "observability.tracing.sample_ratio: must be between 0 and 1, got -0.1",
            "observability.tracing.service_name: must not be empty",
        )
