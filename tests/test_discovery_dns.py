"""DNS discovery (and what every discovery source shares), on a fake clock.

The records come from :class:`Zone`, an in-memory twisted.names resolver the
tests change as they go; tests/integration/test_discovery.py serves the same
zone as a real DNS server on a loopback UDP port.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.names import common, dns
from twisted.names.error import DNSNameError, DNSServerError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.test_upstream_health import ScriptedClient
from txgateway.config import parse_config
from txgateway.config.model import DiscoveryConfig, UpstreamConfig
from txgateway.gateway import Gateway
from txgateway.observability.metrics import GatewayMetrics
from txgateway.runtime import Runtime
from txgateway.testing import GatewayHarness, MemoryUpstream
from txgateway.upstream.discovery import source_key
from txgateway.upstream.discovery.dns import DNSSource, nameservers
from txgateway.upstream.upstream import Upstream


class Zone(common.ResolverBase):
    """Records by (name, type), changed by the test; answers like a DNS server would.

    A name with no record of any type is NXDOMAIN; ``failing`` makes every
    query fail with that exception (SERVFAIL behind a real server);
    ``hold`` keeps answers back until ``release()``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[tuple[str, int], list[dns.RRHeader]] = {}
        self.failing: Exception | None = None
        self.queries: list[tuple[str, int]] = []
        self.hold = False
        self.held: list[tuple[Deferred[Any], Any]] = []

    def a(self, name: str, *ips: str, ttl: int = 30) -> None:
        self.records[(name, dns.A)] = [
            dns.RRHeader(name.encode(), dns.A, dns.IN, ttl, dns.Record_A(ip, ttl), auth=True) for ip in ips
        ]

    def srv(self, name: str, *targets: tuple[int, int, int, str], ttl: int = 30) -> None:
        """``targets``: (priority, weight, port, target host)."""
        self.records[(name, dns.SRV)] = [
            dns.RRHeader(
                name.encode(), dns.SRV, dns.IN, ttl, dns.Record_SRV(p, w, port, target.encode(), ttl), auth=True
            )
            for p, w, port, target in targets
        ]

    def remove(self, name: str) -> None:
        for key in [key for key in self.records if key[0] == name]:
            del self.records[key]

    def release(self) -> None:
        held, self.held = self.held, []
        for d, result in held:
            d.callback(result) if not isinstance(result, Failure) else d.errback(result)

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        text = name.decode().lower().rstrip(".")
        self.queries.append((text, type))
        if self.failing is not None:
            result: Any = Failure(self.failing)
        elif not any(key[0] == text for key in self.records):
            result = Failure(DNSNameError(text))
        else:
            answers = self.records.get((text, type), [])
            additional = []
            if type == dns.SRV:
                for answer in answers:
                    additional += self.records.get((str(answer.payload.target).lower(), dns.A), [])  # type: ignore[union-attr]
            result = (answers, [], additional)
        if self.hold:
            d: Deferred[Any] = Deferred()
            self.held.append((d, result))
            return d
        return fail(result) if isinstance(result, Failure) else succeed(result)


def discovery(
    name: str, port: int | None = 8080, refresh: float = 10.0, record_type: str | None = None
) -> DiscoveryConfig:
    options: dict[str, object] = {"record_type": record_type or ("SRV" if name.startswith("_") else "A")}
    return DiscoveryConfig(type="dns", name=name, port=port, refresh=refresh, options=options)


def addresses(upstream: Upstream) -> list[str]:
    return [i.address for i in upstream.instances]


def capture_events(case: SynchronousTestCase) -> EventLoggingObserver:
    events = EventLoggingObserver()
    globalLogPublisher.addObserver(events)
    case.addCleanup(globalLogPublisher.removeObserver, events)
    return events


def texts(events: EventLoggingObserver, level: LogLevel) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events if e["log_level"] == level]


class DNSTestCase(SynchronousTestCase):
    def make(self, config: DiscoveryConfig) -> tuple[DNSSource, Upstream, Zone, Clock, GatewayMetrics]:
        clock = Clock()
        zone = Zone()
        metrics = GatewayMetrics()
        source = DNSSource("svc", config, clock, metrics, resolver=zone)
        upstream = Upstream(UpstreamConfig(name="svc", discovery=config), ScriptedClient(), clock)
        source.feed(upstream)
        self.addCleanup(source.stop)
        return source, upstream, zone, clock, metrics

    def sample(self, metrics: GatewayMetrics, name: str, **labels: str) -> float | None:
        value: float | None = metrics.registry.get_sample_value(name, labels)
        return value


class AddressRecordTests(DNSTestCase):
    def test_every_address_is_an_instance_on_the_port(self) -> None:
        source, upstream, zone, _, _ = self.make(discovery("svc.test"))
        zone.a("svc.test", "10.0.0.2", "10.0.0.1")
        source.start()
        self.assertEqual(addresses(upstream), ["10.0.0.1:8080", "10.0.0.2:8080"])

    def test_aaaa(self) -> None:
        source, upstream, zone, _, _ = self.make(discovery("svc.test", record_type="AAAA"))
        zone.records[("svc.test", dns.AAAA)] = [
            dns.RRHeader(b"svc.test", dns.AAAA, dns.IN, 30, dns.Record_AAAA("fd00::1", 30))
        ]
        source.start()
        self.assertEqual([(i.host, i.port) for i in upstream.instances], [("fd00::1", 8080)])

    def test_resolved_again_every_refresh(self) -> None:
        source, upstream, zone, clock, _ = self.make(discovery("svc.test", refresh=10))
        zone.a("svc.test", "10.0.0.1", ttl=300)
        source.start()
        zone.a("svc.test", "10.0.0.1", "10.0.0.3", ttl=300)
        clock.advance(9.9)
        self.assertEqual(addresses(upstream), ["10.0.0.1:8080"])
        clock.advance(0.1)
        self.assertEqual(addresses(upstream), ["10.0.0.1:8080", "10.0.0.3:8080"])
        self.assertEqual(len(zone.queries), 2)

    def test_a_short_ttl_resolves_sooner_but_not_more_than_every_second(self) -> None:
        source, _, zone, clock, _ = self.make(discovery("svc.test", refresh=10))
        zone.a("svc.test", "10.0.0.1", ttl=3)
        source.start()
        clock.advance(3)
        self.assertEqual(len(zone.queries), 2)
        zone.a("svc.test", "10.0.0.1", ttl=0)
        clock.advance(3)
        [call] = clock.getDelayedCalls()
        self.assertEqual(call.getTime() - clock.seconds(), 1.0)

    def test_stop_stops_resolving_and_start_resumes(self) -> None:
        source, upstream, zone, clock, _ = self.make(discovery("svc.test", refresh=5))
        zone.a("svc.test", "10.0.0.1")
        source.start()
        self.successResultOf(source.stop())
        self.assertEqual(clock.getDelayedCalls(), [])
        zone.a("svc.test", "10.0.0.9")
        clock.advance(60)
        self.assertEqual(addresses(upstream), ["10.0.0.1:8080"])
        source.start()
        self.assertEqual(addresses(upstream), ["10.0.0.9:8080"])

    def test_stop_waits_for_the_lookup_in_flight(self) -> None:
        source, upstream, zone, _, _ = self.make(discovery("svc.test"))
        zone.a("svc.test", "10.0.0.1")
        zone.hold = True
        source.start()
        stopped = source.stop()
        self.assertNoResult(stopped)
        zone.release()
        self.successResultOf(stopped)
        self.assertEqual(addresses(upstream), [], "an answer after stop() is not applied")


class SRVTests(DNSTestCase):
    def test_targets_of_the_lowest_priority_with_their_ports_and_weights(self) -> None:
        source, upstream, zone, _, _ = self.make(discovery("_http._tcp.svc.test", port=None))
        zone.srv(
            "_http._tcp.svc.test",
            (10, 5, 8081, "a.svc.test"),
            (10, 0, 8082, "b.svc.test"),
            (20, 1, 8083, "backup.svc.test"),
        )
        zone.a("a.svc.test", "10.0.0.1")
        zone.a("b.svc.test", "10.0.0.2")
        zone.a("backup.svc.test", "10.0.0.3")
        source.start()
        self.assertEqual(
            [(i.address, i.weight) for i in upstream.instances], [("10.0.0.1:8081", 5), ("10.0.0.2:8082", 1)]
        )

    def test_targets_without_additional_records_are_looked_up(self) -> None:
        source, upstream, zone, _, _ = self.make(discovery("_http._tcp.svc.test", port=None))
        zone.srv("_http._tcp.svc.test", (0, 1, 9000, "far.example"))
        source.start()
        self.assertEqual(addresses(upstream), [], "far.example does not resolve: no instance")
        zone.a("far.example", "192.0.2.7")
        source._resolver = _WithoutAdditional(zone)
        source.stop()
        source.start()
        self.assertEqual(addresses(upstream), ["192.0.2.7:9000"])
        self.assertIn(("far.example", dns.A), zone.queries)

    def test_a_target_that_does_not_resolve_is_left_out(self) -> None:
        source, upstream, zone, _, _ = self.make(discovery("_http._tcp.svc.test", port=None))
        zone.srv("_http._tcp.svc.test", (0, 1, 9000, "a.svc.test"), (0, 1, 9001, "gone.svc.test"))
        zone.a("a.svc.test", "10.0.0.1")
        source._resolver = _WithoutAdditional(zone)
        source.start()
        self.assertEqual(addresses(upstream), ["10.0.0.1:9000"])

    def test_srv_is_the_default_for_service_names(self) -> None:
        config = parse_config(
            "upstreams:\n"
            "  a: {discovery: {type: dns, name: _grpc._tcp.a.test}}\n"
            "  b: {discovery: {type: dns, name: b.test, port: 80}}\n"
            "routes: [{name: r, match: {path: /}, upstream: a}]\n"
        )
        a, b = config.upstreams["a"].discovery, config.upstreams["b"].discovery
        assert a is not None and b is not None
        self.assertEqual((a.options["record_type"], b.options["record_type"]), ("SRV", "A"))


class _WithoutAdditional(common.ResolverBase):
    """The zone's answers without the additional section (as many servers send them)."""

    def __init__(self, zone: Zone) -> None:
        super().__init__()
        self.zone = zone

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        return self.zone._lookup(name, cls, type, timeout).addCallback(lambda r: (r[0], r[1], []))


class OutageTests(DNSTestCase):
    def test_failures_keep_the_last_instances_log_once_and_count(self) -> None:
        events = capture_events(self)
        source, upstream, zone, clock, metrics = self.make(discovery("svc.test", refresh=10))
        zone.a("svc.test", "10.0.0.1", ttl=300)
        source.start()
        zone.failing = DNSServerError("SERVFAIL")
        for _ in range(6):
            clock.advance(10)
        self.assertEqual(addresses(upstream), ["10.0.0.1:8080"])
        warnings = [t for t in texts(events, LogLevel.warn) if "discovery" in t]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("failing, keeping the 1 last known instances: svc.test: server failure", warnings[0])
        failed = self.sample(
            metrics, "txgateway_discovery_refreshes_total", upstream="svc", type="dns", result="failure"
        )
        self.assertGreaterEqual(failed or 0, 6)
        self.assertEqual(self.sample(metrics, "txgateway_discovery_instances", upstream="svc"), 1.0)

        zone.failing = None
        zone.a("svc.test", "10.0.0.1", "10.0.0.2", ttl=300)
        clock.advance(10)
        self.assertEqual(addresses(upstream), ["10.0.0.1:8080", "10.0.0.2:8080"])
        recovered = [t for t in texts(events, LogLevel.info) if "recovered" in t]
        self.assertEqual(len(recovered), 1)
        self.assertEqual(self.sample(metrics, "txgateway_discovery_instances", upstream="svc"), 2.0)
        ok = self.sample(metrics, "txgateway_discovery_refreshes_total", upstream="svc", type="dns", result="success")
        self.assertEqual(ok, 2.0)

    def test_retries_back_off_up_to_refresh(self) -> None:
        source, _, zone, clock, _ = self.make(discovery("svc.test", refresh=4))
        zone.failing = DNSServerError("SERVFAIL")
        source.start()
        delays = []
        for _ in range(5):
            [call] = clock.getDelayedCalls()
            delays.append(call.getTime() - clock.seconds())
            clock.advance(delays[-1])
        self.assertEqual(delays, [0.5, 1.0, 2.0, 4.0, 4.0])

    def test_nxdomain_and_empty_answers_keep_the_instances(self) -> None:
        source, upstream, zone, clock, _ = self.make(discovery("svc.test", refresh=10))
        zone.a("svc.test", "10.0.0.1", ttl=300)
        source.start()
        zone.remove("svc.test")
        clock.advance(10)
        self.assertEqual(addresses(upstream), ["10.0.0.1:8080"])
        zone.a("svc.test")
        clock.advance(10)
        self.assertEqual(addresses(upstream), ["10.0.0.1:8080"])
        self.assertEqual(source.failures, 2)

    def test_no_answer_at_first_leaves_no_instances(self) -> None:
        source, upstream, zone, clock, _ = self.make(discovery("svc.test"))
        zone.a("svc.test")
        source.start()
        self.assertEqual(addresses(upstream), [])
        self.assertIsNone(source.failing_since, "an empty first answer is an answer")
        zone.a("svc.test", "10.0.0.1")
        clock.advance(10)
        self.assertEqual(addresses(upstream), ["10.0.0.1:8080"])


class GatewayWiringTests(SynchronousTestCase):
    CONFIG = """
upstreams:
  svc:
    discovery: {type: dns, name: svc.test, port: 8080, refresh: 5}
routes:
  - {name: all, match: {path: "/*"}, upstream: svc}
"""

    def make(self, text: str = CONFIG) -> tuple[GatewayHarness, Zone, MemoryUpstream, Runtime]:
        config = parse_config(text)
        clock = Clock()
        runtime = Runtime(clock, clock)
        zone = Zone()
        self.register(runtime, config.upstreams["svc"], zone)
        upstream = MemoryUpstream(lambda request: (200, [], f"{request.host}:{request.port}".encode()))
        harness = GatewayHarness(config, upstream, clock=clock, runtime=runtime)
        self.addCleanup(runtime.stop)
        return harness, zone, upstream, runtime

    def register(self, runtime: Runtime, upstream: UpstreamConfig, zone: Zone) -> None:
        """Put a source that asks ``zone`` where the gateway will look for ``upstream``'s."""
        config = upstream.discovery
        assert config is not None
        runtime.shared(
            source_key(upstream),
            lambda: DNSSource(upstream.name, config, runtime.clock, runtime.metrics, resolver=zone),
        )

    def test_requests_follow_discovery_without_a_reload(self) -> None:
        harness, zone, _, _ = self.make()
        zone.a("svc.test", "10.0.0.1")
        response = harness.request("GET", "/x")
        self.assertEqual(response.status, 503, "not started: no instances yet")
        harness.gateway.start()
        self.assertEqual(harness.request("GET", "/x").body, b"10.0.0.1:8080")
        zone.a("svc.test", "10.0.0.2")
        harness.clock.advance(5)
        self.assertEqual(harness.request("GET", "/x").body, b"10.0.0.2:8080")

    def test_a_reload_keeps_the_source_and_seeds_a_changed_upstream(self) -> None:
        harness, zone, upstream, runtime = self.make()
        zone.a("svc.test", "10.0.0.1")
        harness.gateway.start()
        old = harness.gateway
        changed = parse_config(self.CONFIG.replace("refresh: 5}", "refresh: 5}\n    timeouts: {request: 7}"))
        new = Gateway(changed, lambda c: upstream, runtime)
        self.assertIsNot(new.upstreams["svc"], old.upstreams["svc"], "the upstream changed")
        self.assertEqual(new.discovery, old.discovery, "the discovery did not")
        self.assertEqual([i.address for i in new.upstreams["svc"].instances], ["10.0.0.1:8080"])
        new.start(old)
        self.assertTrue(new.discovery[0].running)

    def test_a_reload_that_changes_the_discovery_stops_the_old_source(self) -> None:
        harness, zone, upstream, runtime = self.make()
        zone.a("svc.test", "10.0.0.1")
        harness.gateway.start()
        old = harness.gateway
        changed = parse_config(self.CONFIG.replace("refresh: 5", "refresh: 6"))
        self.register(runtime, changed.upstreams["svc"], zone)
        new = Gateway(changed, lambda c: upstream, runtime)
        self.assertNotEqual(new.discovery, old.discovery)
        new.start(old)
        self.assertFalse(old.discovery[0].running)
        self.assertTrue(new.discovery[0].running)


class ResolvConfTests(SynchronousTestCase):
    def test_nameservers(self) -> None:
        path = self.mktemp()
        with open(path, "w") as file:
            file.write("# generated\nsearch svc.cluster.local\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\n")
        self.assertEqual(nameservers(path), [("10.96.0.10", 53), ("fe80::1", 53)])
        self.assertEqual(nameservers(path + ".missing"), [("127.0.0.1", 53)])
