"""``Upstream.set_instances``: the instance set discovery feeds, as balancers, health and traffic see it.

On a fake clock.  An address that stays keeps its :class:`Instance` (health,
ejection, in-flight count); a new one joins healthy; a removed one leaves the
balancer at once while requests already sent to it finish.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.test_upstream_health import FixedRandom, ScriptedClient
from txgateway.body import BytesBody
from txgateway.config import parse_config
from txgateway.config.model import HealthCheckConfig, PassiveHealthConfig, UpstreamConfig, UpstreamServer
from txgateway.errors import ServiceUnavailable
from txgateway.gateway import Gateway
from txgateway.interfaces import IBodySink, IUpstreamClient
from txgateway.messages import Response, UpstreamRequest
from txgateway.pipeline.context import RequestContext
from txgateway.runtime import Runtime
from txgateway.testing import GatewayHarness, MemoryUpstream
from txgateway.upstream.balancer import ConsistentHash
from txgateway.upstream.health import UpstreamHealth
from txgateway.upstream.upstream import Upstream


def server(address: str, weight: int = 1) -> UpstreamServer:
    host, _, port = address.rpartition(":")
    return UpstreamServer(host, int(port), weight)


def servers(*addresses: str) -> list[UpstreamServer]:
    return [server(a) for a in addresses]


def ctx(path: str = "/", headers: list[tuple[bytes, bytes]] | None = None) -> RequestContext:
    return RequestContext(b"GET", path, b"", headers or [], client_ip="192.0.2.1")


def make_upstream(
    *addresses: str, load_balancer: str = "round_robin", hash_key: str | None = None, **extra: Any
) -> tuple[Upstream, Clock]:
    clock = Clock()
    config = UpstreamConfig(
        name="svc", servers=tuple(servers(*addresses)), load_balancer=load_balancer, hash_key=hash_key, **extra
    )
    return Upstream(config, ScriptedClient(), clock), clock


def addresses(instances: Any) -> list[str]:
    return [i.address for i in instances]


class InstanceSetTests(SynchronousTestCase):
    def test_staying_instances_keep_their_state(self) -> None:
        upstream, _clock = make_upstream("10.0.0.1:80", "10.0.0.2:80")
        a, b = upstream.instances
        a.in_flight = 3
        b.active_healthy = False
        upstream.refresh()
        changed = upstream.set_instances(servers("10.0.0.2:80", "10.0.0.1:80", "10.0.0.3:80"))
        self.assertTrue(changed)
        kept = {i.address: i for i in upstream.instances}
        self.assertIs(kept["10.0.0.1:80"], a)
        self.assertIs(kept["10.0.0.2:80"], b)
        self.assertEqual(a.in_flight, 3)
        self.assertFalse(b.active_healthy, "an unhealthy instance stays unhealthy")
        self.assertTrue(kept["10.0.0.3:80"].active_healthy, "a new instance starts healthy")
        self.assertEqual(sorted(addresses(upstream.available)), ["10.0.0.1:80", "10.0.0.3:80"])

    def test_removed_instances_leave_at_once(self) -> None:
        upstream, _ = make_upstream("10.0.0.1:80", "10.0.0.2:80")
        upstream.set_instances(servers("10.0.0.2:80"))
        self.assertEqual(addresses(upstream.instances), ["10.0.0.2:80"])
        picks = {upstream.pick(ctx()).address for _ in range(10)}
        self.assertEqual(picks, {"10.0.0.2:80"})

    def test_same_set_is_no_change(self) -> None:
        upstream, _ = make_upstream("10.0.0.1:80", "10.0.0.2:80")
        told: list[Any] = []
        upstream.on_change.append(told.append)
        upstream.on_instances.append(lambda added, removed: told.append((added, removed)))
        self.assertFalse(upstream.set_instances(servers("10.0.0.1:80", "10.0.0.2:80", "10.0.0.1:80")))
        self.assertEqual(told, [])

    def test_listeners_are_told_what_came_and_went(self) -> None:
        upstream, _ = make_upstream("10.0.0.1:80", "10.0.0.2:80")
        gone = upstream.instances[0]
        told: list[Any] = []
        upstream.on_instances.append(lambda added, removed: told.append((addresses(added), list(removed))))
        upstream.on_change.append(lambda u: told.append(addresses(u.available)))
        upstream.set_instances(servers("10.0.0.2:80", "10.0.0.3:80"))
        self.assertEqual(told, [(["10.0.0.3:80"], [gone]), ["10.0.0.2:80", "10.0.0.3:80"]])

    def test_a_weight_change_is_applied(self) -> None:
        upstream, _ = make_upstream("10.0.0.1:80", "10.0.0.2:80", load_balancer="weighted")
        first = upstream.instances[0]
        self.assertTrue(upstream.set_instances([server("10.0.0.1:80", 3), server("10.0.0.2:80", 1)]))
        self.assertIs(upstream.instances[0], first)
        self.assertEqual(first.weight, 3)
        picks = Counter(upstream.pick(ctx()).address for _ in range(400))
        self.assertEqual(picks, {"10.0.0.1:80": 300, "10.0.0.2:80": 100})

    def test_no_instances_is_a_503(self) -> None:
        upstream, _ = make_upstream("10.0.0.1:80")
        upstream.set_instances([])
        self.assertEqual(upstream.available, [])
        error = self.assertRaises(ServiceUnavailable, upstream.pick, ctx())
        self.assertIn("no servers", str(error))
        upstream.set_instances(servers("10.0.0.9:80"))
        self.assertEqual(upstream.pick(ctx()).address, "10.0.0.9:80")


class BalancerRebuildTests(SynchronousTestCase):
    """Every balancer picks from the new set only, and keeps its promise over it."""

    def test_every_algorithm_uses_only_the_new_set(self) -> None:
        for algorithm in ("round_robin", "weighted", "least_connections", "random", "consistent_hash"):
            key = "header:x-user" if algorithm == "consistent_hash" else None
            upstream, _ = make_upstream("10.0.0.1:80", "10.0.0.2:80", load_balancer=algorithm, hash_key=key)
            upstream.set_instances(servers("10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"))
            seen = Counter(upstream.pick(ctx(headers=[(b"x-user", b"user-%d" % n)])).address for n in range(300))
            self.assertEqual(set(seen), {"10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"}, algorithm)

    def test_round_robin_cycles_the_new_set(self) -> None:
        upstream, _ = make_upstream("10.0.0.1:80", "10.0.0.2:80")
        upstream.set_instances(servers("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"))
        self.assertEqual(
            [upstream.pick(ctx()).address for _ in range(6)],
            ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"] * 2,
        )

    def test_least_connections_sees_kept_in_flight_counts(self) -> None:
        upstream, _ = make_upstream("10.0.0.1:80", "10.0.0.2:80", load_balancer="least_connections")
        upstream.instances[0].in_flight = 5
        upstream.set_instances(servers("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"))
        upstream.instances[1].in_flight = 5
        self.assertEqual({upstream.pick(ctx()).address for _ in range(20)}, {"10.0.0.3:80"})

    def test_consistent_hash_moves_only_the_keys_of_what_changed(self) -> None:
        upstream, _ = make_upstream(
            "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", load_balancer="consistent_hash", hash_key="header:x-user"
        )
        self.assertIsInstance(upstream._balancer, ConsistentHash)
        keys = [b"user-%d" % n for n in range(2000)]

        def owners() -> dict[bytes, str]:
            return {key: upstream.pick(ctx(headers=[(b"x-user", key)])).address for key in keys}

        before = owners()
        upstream.set_instances(servers("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"))
        added = owners()
        moved = [key for key in keys if added[key] != before[key]]
        self.assertTrue(moved, "the new instance takes some keys")
        self.assertEqual({added[key] for key in moved}, {"10.0.0.4:80"}, "only to the new instance")
        self.assertLess(len(moved), len(keys) / 2)

        upstream.set_instances(servers("10.0.0.1:80", "10.0.0.3:80", "10.0.0.4:80"))
        removed = owners()
        for key in keys:
            if added[key] != "10.0.0.2:80":
                self.assertEqual(removed[key], added[key], "keys of staying instances stay")
            else:
                self.assertNotEqual(removed[key], "10.0.0.2:80")


class HealthFollowsTheSetTests(SynchronousTestCase):
    def make(self, *addresses: str, passive: bool = False) -> tuple[Upstream, UpstreamHealth, ScriptedClient, Clock]:
        clock = Clock()
        client = ScriptedClient()
        config = UpstreamConfig(
            name="svc",
            servers=tuple(servers(*addresses)),
            health_check=HealthCheckConfig(
                enabled=True, interval=10.0, timeout=2.0, healthy_threshold=2, unhealthy_threshold=2
            ),
            passive_health=PassiveHealthConfig(consecutive_failures=2, ejection_time=30.0) if passive else None,
        )
        upstream = Upstream(config, client, clock)
        health = UpstreamHealth(upstream, clock, FixedRandom(0.5))
        self.addCleanup(health.stop)
        return upstream, health, client, clock

    def checked(self, client: ScriptedClient) -> Counter[str]:
        return Counter(f"{r.host}:{r.port}" for r in client.requests)

    def test_added_instances_are_checked_and_removed_ones_no_more(self) -> None:
        upstream, health, client, clock = self.make("10.0.0.1:80", "10.0.0.2:80")
        health.start()
        clock.advance(10)
        self.assertEqual(self.checked(client), {"10.0.0.1:80": 1, "10.0.0.2:80": 1})
        upstream.set_instances(servers("10.0.0.2:80", "10.0.0.3:80"))
        client.requests.clear()
        for _ in range(3):
            clock.advance(10)
        self.assertEqual(self.checked(client), {"10.0.0.2:80": 3, "10.0.0.3:80": 3})

    def test_a_new_instance_failing_its_checks_is_taken_out(self) -> None:
        upstream, health, client, clock = self.make("10.0.0.1:80")
        health.start()
        client.set("10.0.0.2:80", "connect")
        upstream.set_instances(servers("10.0.0.1:80", "10.0.0.2:80"))
        self.assertEqual(addresses(upstream.available), ["10.0.0.1:80", "10.0.0.2:80"], "optimistic start")
        clock.advance(5)
        clock.advance(10)
        self.assertEqual(addresses(upstream.available), ["10.0.0.1:80"])

    def test_a_check_in_flight_for_a_removed_instance_gives_no_verdict(self) -> None:
        upstream, health, client, clock = self.make("10.0.0.1:80", "10.0.0.2:80")
        client.set("10.0.0.2:80", "hang")
        health.start()
        clock.advance(5)
        upstream.set_instances(servers("10.0.0.1:80"))
        self.assertEqual(len(client.cancelled), 1, "the hanging check was abandoned")
        clock.advance(100)
        self.assertEqual(self.checked(client)["10.0.0.2:80"], 1)
        self.assertEqual(addresses(upstream.available), ["10.0.0.1:80"])

    def test_while_stopped_nothing_is_checked_and_start_takes_the_current_set(self) -> None:
        upstream, health, client, clock = self.make("10.0.0.1:80")
        upstream.set_instances(servers("10.0.0.5:80"))
        clock.advance(30)
        self.assertEqual(client.requests, [])
        health.start()
        clock.advance(10)
        self.assertEqual(self.checked(client), {"10.0.0.5:80": 1})

    def test_removed_instance_is_not_ejected_nor_brought_back(self) -> None:
        upstream, _health, _, clock = self.make("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", passive=True)
        a, b, _c = upstream.instances
        upstream.observe(a, "5xx")
        upstream.observe(a, "5xx")
        self.assertNotIn(a, upstream.available)
        upstream.set_instances(servers("10.0.0.2:80", "10.0.0.3:80"))
        self.assertEqual(clock.getDelayedCalls(), [], "no return to wait for")
        upstream.observe(b, "5xx")
        upstream.set_instances(servers("10.0.0.3:80"))
        upstream.observe(b, "5xx")  # a request to b that was in flight
        self.assertEqual(b.ejected_until, 0.0)
        self.assertEqual(addresses(upstream.available), ["10.0.0.3:80"])


@implementer(IUpstreamClient)
class HeldClient:
    """Answers each request when the test says so."""

    def __init__(self) -> None:
        self.pending: list[tuple[UpstreamRequest, Deferred[Response]]] = []

    def request(self, request: UpstreamRequest) -> Deferred[Response]:
        d: Deferred[Response] = Deferred()
        self.pending.append((request, d))
        return d

    def close(self) -> Deferred[None]:
        return succeed(None)


@implementer(IBodySink)
class Collect:
    def __init__(self) -> None:
        self.data = b""
        self.finished = False

    def write(self, data: bytes) -> None:
        self.data += data

    def finish(self) -> None:
        self.finished = True

    def abort(self, reason: object) -> None:
        raise AssertionError(f"body aborted: {reason}")


DISCOVERED = """
upstreams:
  svc:
    discovery: {type: dns, name: svc.test, port: 8080, resolver: "127.0.0.1:5353"}
routes:
  - {name: all, match: {path: "/*"}, upstream: svc}
"""


class GatewayTrafficTests(SynchronousTestCase):
    def test_no_instances_yet_is_a_json_503(self) -> None:
        upstream = MemoryUpstream(lambda request: (200, [], b"never"))
        harness = GatewayHarness(parse_config(DISCOVERED), upstream)
        response = harness.request("GET", "/x")
        self.assertEqual(response.status, 503)
        self.assertEqual(response.header("content-type"), "application/json")
        body = response.json()
        assert isinstance(body, dict)
        self.assertIn("no servers", str(body))
        self.assertEqual(upstream.requests, [])

    def test_traffic_follows_the_set_and_in_flight_requests_finish(self) -> None:
        clock = Clock()
        client = HeldClient()
        gateway = Gateway(parse_config(DISCOVERED), lambda c: client, Runtime(clock, clock))
        svc = gateway.upstreams["svc"]
        svc.set_instances(servers("10.0.0.1:8080"))
        first = gateway.handle(ctx("/a"))
        [(request, answer)] = client.pending
        self.assertEqual((request.host, request.port), ("10.0.0.1", 8080))
        old = svc.instances[0]
        self.assertEqual(old.in_flight, 1)

        svc.set_instances(servers("10.0.0.2:8080"))
        second = gateway.handle(ctx("/b"))
        self.assertEqual((client.pending[1][0].host, client.pending[1][0].port), ("10.0.0.2", 8080))

        answer.callback(Response(200, [(b"content-type", b"text/plain")], BytesBody(b"from the old one")))
        response = self.successResultOf(first)
        sink = Collect()
        assert response.body is not None
        response.body.deliverTo(sink)
        self.assertEqual((response.status, sink.data, sink.finished), (200, b"from the old one", True))
        self.assertEqual(old.in_flight, 0)
        self.assertNoResult(second)
        client.pending[1][1].callback(Response(204, [], None))
        self.assertEqual(self.successResultOf(second).status, 204)


class SeededTests(SynchronousTestCase):
    def test_gateway_without_discovery_has_no_sources(self) -> None:
        config = parse_config(
            'upstreams: {a: {servers: ["10.0.0.1:80"]}}\nroutes: [{name: r, match: {path: "/*"}, upstream: a}]'
        )
        clock = Clock()
        gateway = Gateway(config, lambda c: ScriptedClient(), Runtime(clock, clock))
        self.assertEqual(gateway.discovery, [])
