"""Active health checks and passive outlier detection, on a fake clock.

The upstream client is :class:`ScriptedClient`: each instance answers the
checks as its script says (a status, a connect error, silence), so every
test reads as "this instance does this, the gateway does that".
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from txgateway.config import parse_config
from txgateway.config.model import HealthCheckConfig, PassiveHealthConfig, UpstreamConfig, UpstreamServer
from txgateway.errors import UpstreamConnectError
from txgateway.gateway import Gateway
from txgateway.interfaces import IBodySink, IUpstreamClient
from txgateway.messages import Response, UpstreamRequest
from txgateway.runtime import Runtime
from txgateway.testing import GatewayHarness, MemoryUpstream, ReceivedRequest
from txgateway.upstream.health import ActiveHealthCheck, PassiveHealth
from txgateway.upstream.upstream import Upstream

A, B, C = "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"

#: What an instance does with a check: a status, "connect" (refused) or "hang" (never answers).
Outcome = int | str


class FixedRandom(random.Random):
    """``random()`` always returns ``value``."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


class ScriptedBody:
    """A response body of ``data``, that ends after it or (``ends=False``) never."""

    length = None

    def __init__(self, data: bytes = b"ok\n", ends: bool = True) -> None:
        self.data = data
        self.ends = ends
        self.delivered = False
        self.stopped = False

    def deliverTo(self, sink: IBodySink) -> None:
        self.delivered = True
        sink.write(self.data)
        if self.ends:
            sink.finish()

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped = True


def EndlessBody() -> ScriptedBody:
    return ScriptedBody(b"x" * 10, ends=False)


@implementer(IUpstreamClient)
class ScriptedClient:
    """Answers each instance (``host:port``) from its script, then its last outcome forever."""

    def __init__(self, scripts: dict[str, list[Outcome]] | None = None, default: Outcome = 200) -> None:
        self.scripts = scripts or {}
        self.default = default
        self.requests: list[UpstreamRequest] = []
        self.cancelled: list[UpstreamRequest] = []
        self.bodies: list[Any] = []
        self.body: Callable[[], Any] = ScriptedBody

    def set(self, address: str, *outcomes: Outcome) -> None:
        self.scripts[address] = list(outcomes)

    def request(self, request: UpstreamRequest) -> Deferred[Response]:
        self.requests.append(request)
        script = self.scripts.get(f"{request.host}:{request.port}")
        outcome = (script.pop(0) if len(script) > 1 else script[0]) if script else self.default
        if outcome == "connect":
            return fail(UpstreamConnectError("connection refused"))
        if outcome == "hang":
            return Deferred(lambda d: self.cancelled.append(request))
        assert isinstance(outcome, int)
        body = self.body()
        self.bodies.append(body)
        return succeed(Response(outcome, [(b"content-type", b"text/plain")], body))

    def close(self) -> Deferred[None]:
        return succeed(None)


def upstream_config(
    *addresses: str, passive: PassiveHealthConfig | None = None, **health: Any
) -> UpstreamConfig:
    servers = tuple(UpstreamServer(a.rpartition(":")[0], int(a.rpartition(":")[2])) for a in addresses)
    options: dict[str, Any] = {"enabled": True, "interval": 10.0, "timeout": 2.0, "healthy_threshold": 2, "unhealthy_threshold": 3}
    options.update(health)
    return UpstreamConfig(
        name="users", servers=servers, health_check=HealthCheckConfig(**options), passive_health=passive
    )


def capture_events(case: SynchronousTestCase) -> EventLoggingObserver:
    events = EventLoggingObserver()
    globalLogPublisher.addObserver(events)
    case.addCleanup(globalLogPublisher.removeObserver, events)
    return events


def available(upstream: Upstream) -> list[str]:
    return [i.address for i in upstream.available]


class ActiveCheckTestCase(SynchronousTestCase):
    def make(
        self, *addresses: str, rand: random.Random | None = None, **health: Any
    ) -> tuple[ActiveHealthCheck, Upstream, ScriptedClient, Clock]:
        clock = Clock()
        client = ScriptedClient()
        upstream = Upstream(upstream_config(*addresses, **health), client, clock)
        checker = ActiveHealthCheck(upstream, client, clock, upstream.config.health_check, rand or FixedRandom(0.5))
        self.addCleanup(checker.stop)
        return checker, upstream, client, clock

    def rounds(self, clock: Clock, count: int, interval: float = 10.0) -> None:
        """Advance through ``count`` check rounds (FixedRandom(0.5): every ``interval``)."""
        for _ in range(count):
            clock.advance(interval)


class ScheduleTests(ActiveCheckTestCase):
    def test_first_check_after_jitter_within_the_interval(self) -> None:
        for value, expected in ((0.0, 0.0), (0.25, 2.5), (0.999, 9.99)):
            checker, _, client, clock = self.make(A, rand=FixedRandom(value))
            checker.start()
            [call] = clock.getDelayedCalls()
            self.assertAlmostEqual(call.getTime(), expected)
            clock.advance(expected)
            self.assertEqual(len(client.requests), 1)
            checker.stop()

    def test_instances_are_not_checked_in_lockstep(self) -> None:
        checker, _, _, clock = self.make(A, B, C, rand=random.Random(7))
        checker.start()
        times = [call.getTime() for call in clock.getDelayedCalls()]
        self.assertEqual(len(set(times)), 3)
        for time in times:
            self.assertGreaterEqual(time, 0.0)
            self.assertLess(time, 10.0)

    def test_later_checks_every_interval_within_ten_percent(self) -> None:
        checker, _, client, clock = self.make(A, rand=random.Random(3))
        checker.start()
        clock.advance(10)  # the first check, whatever its jitter
        starts = []
        for _ in range(200):
            [call] = clock.getDelayedCalls()
            starts.append(call.getTime())
            clock.advance(call.getTime() - clock.seconds())
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        self.assertGreaterEqual(min(gaps), 9.0)
        self.assertLessEqual(max(gaps), 11.0)
        self.assertGreater(max(gaps) - min(gaps), 1.0)  # jittered, not fixed
        self.assertEqual(len(client.requests), 201)

    def test_interval_without_jitter(self) -> None:
        checker, _, client, clock = self.make(A, rand=FixedRandom(0.5), interval=4.0)
        checker.start()
        clock.advance(2.0)
        self.assertEqual(len(client.requests), 1)
        clock.advance(3.9)
        self.assertEqual(len(client.requests), 1)
        clock.advance(0.1)
        self.assertEqual(len(client.requests), 2)
        clock.advance(4.0)
        self.assertEqual(len(client.requests), 3)

    def test_the_check_request(self) -> None:
        checker, _, client, clock = self.make(A, path="/healthz", timeout=1.5)
        checker.start()
        clock.advance(10)
        [request] = client.requests
        self.assertEqual((request.host, request.port, request.method, request.target), ("10.0.0.1", 80, b"GET", b"/healthz"))
        self.assertIn((b"host", b"10.0.0.1:80"), request.headers)
        self.assertEqual(request.response_timeout, 1.5)
        self.assertLessEqual(request.connect_timeout, 1.5)
        self.assertIsNone(request.body)

    def test_stop_cancels_timers_and_checks_in_flight(self) -> None:
        checker, _, client, clock = self.make(A, B)
        client.set(A, "hang")
        checker.start()
        clock.advance(5)
        self.assertEqual(len(client.requests), 2)
        checker.stop()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(len(client.cancelled), 1)
        clock.advance(100)
        self.assertEqual(len(client.requests), 2)

    def test_restart_after_stop(self) -> None:
        checker, _, client, clock = self.make(A)
        checker.start()
        checker.stop()
        checker.start()
        checker.start()  # idempotent
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(5)
        self.assertEqual(len(client.requests), 1)


class ThresholdTests(ActiveCheckTestCase):
    def test_unhealthy_after_threshold_failures_in_a_row(self) -> None:
        checker, upstream, client, clock = self.make(A, B)
        client.set(A, 503)
        checker.start()
        clock.advance(5)
        self.rounds(clock, 1)
        self.assertEqual(available(upstream), [A, B])  # two failures: not yet
        self.assertTrue(upstream.instances[0].active_healthy)
        self.rounds(clock, 1)
        self.assertEqual(available(upstream), [B])
        self.assertFalse(upstream.instances[0].active_healthy)

    def test_a_success_resets_the_failure_streak(self) -> None:
        checker, upstream, client, clock = self.make(A, B)
        client.set(A, 500, 500, 200, 500, 500, 200)
        checker.start()
        clock.advance(5)
        self.rounds(clock, 6)
        self.assertEqual(available(upstream), [A, B])

    def test_healthy_again_after_threshold_successes(self) -> None:
        checker, upstream, client, clock = self.make(A, B)
        client.set(A, "connect", "connect", "connect", 200, 500, 200, 200)
        checker.start()
        clock.advance(5)
        self.rounds(clock, 2)
        self.assertEqual(available(upstream), [B])
        self.rounds(clock, 2)  # 200, then 500: the success streak is broken
        self.assertEqual(available(upstream), [B])
        self.rounds(clock, 1)
        self.assertEqual(available(upstream), [B])
        self.rounds(clock, 1)
        self.assertEqual(available(upstream), [A, B])

    def test_what_counts_as_success(self) -> None:
        for status, ok in ((200, True), (204, True), (301, True), (304, True), (404, False), (401, False), (500, False), (503, False)):
            checker, upstream, client, clock = self.make(A, B, unhealthy_threshold=1)
            client.set(A, status)
            checker.start()
            clock.advance(5)
            self.assertEqual(upstream.instances[0].active_healthy, ok, status)
            checker.stop()

    def test_timeout_is_a_failure(self) -> None:
        checker, upstream, client, clock = self.make(A, B, timeout=2.0, unhealthy_threshold=2)
        client.set(A, "hang")
        checker.start()
        clock.advance(5)
        clock.advance(1.9)
        self.assertEqual(client.cancelled, [])
        clock.advance(0.1)
        self.assertEqual(len(client.cancelled), 1)  # the request is abandoned, not left pending
        self.assertEqual(available(upstream), [A, B])
        clock.advance(8)  # the next check, 10 s after the first started
        clock.advance(2)
        self.assertEqual(available(upstream), [B])
        self.assertEqual(len(client.cancelled), 2)

    def test_response_body_is_read_to_the_end(self) -> None:
        checker, _, client, clock = self.make(A)
        checker.start()
        clock.advance(5)
        [body] = client.bodies
        self.assertTrue(body.delivered)
        self.assertFalse(body.stopped)  # read to its end: the connection can be reused

    def test_big_body_is_abandoned(self) -> None:
        checker, _, client, clock = self.make(A)
        client.body = lambda: ScriptedBody(b"x" * 100_000)
        checker.start()
        clock.advance(5)
        self.assertTrue(client.bodies[0].stopped)
        self.assertEqual(len(clock.getDelayedCalls()), 1)  # the next check only

    def test_endless_body_is_abandoned_at_the_timeout(self) -> None:
        checker, upstream, client, clock = self.make(A, timeout=2.0, unhealthy_threshold=1)
        client.body = EndlessBody
        checker.start()
        clock.advance(5)
        [body] = client.bodies
        self.assertFalse(body.stopped)
        clock.advance(2)
        self.assertTrue(body.stopped)
        self.assertEqual(available(upstream), [A])  # the head said 200: a success
        clock.advance(8)
        self.assertEqual(len(client.requests), 2)

    def test_stop_abandons_a_body_being_read(self) -> None:
        checker, _, client, clock = self.make(A)
        client.body = EndlessBody
        checker.start()
        clock.advance(5)
        checker.stop()
        self.assertTrue(client.bodies[0].stopped)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_all_instances_can_be_unhealthy(self) -> None:
        checker, upstream, client, clock = self.make(A, B, unhealthy_threshold=1)
        client.default = 503
        checker.start()
        clock.advance(10)
        self.assertEqual(available(upstream), [])

    def test_on_change_is_told(self) -> None:
        checker, upstream, client, clock = self.make(A, B, unhealthy_threshold=1, healthy_threshold=1)
        seen: list[list[str]] = []
        upstream.on_change.append(lambda u: seen.append(available(u)))
        client.set(A, 500, 200)
        checker.start()
        clock.advance(5)
        clock.advance(10)
        self.assertEqual(seen, [[B], [A, B]])


class CheckLoggingTests(ActiveCheckTestCase):
    def test_transitions_are_structured_events(self) -> None:
        events = capture_events(self)
        checker, _, client, clock = self.make(A, B)
        client.set(A, 500, 500, 500, 200, 200)
        checker.start()
        clock.advance(5)
        self.rounds(clock, 4)
        transitions = [e for e in events if e.get("address") == A and e["log_level"] >= LogLevel.info]
        self.assertEqual(len(transitions), 2)
        down, up = transitions
        self.assertEqual(down["log_level"], LogLevel.warn)
        self.assertEqual(down["log_format"], "upstream {upstream} instance {address} unhealthy after {failures} failed checks")
        self.assertEqual((down["upstream"], down["failures"]), ("users", 3))
        self.assertEqual(up["log_level"], LogLevel.info)
        self.assertEqual((up["upstream"], up["successes"]), ("users", 2))


class PassiveTestCase(SynchronousTestCase):
    def make(self, *addresses: str, failures: int = 3, ejection: float = 30.0) -> tuple[PassiveHealth, Upstream, Clock]:
        clock = Clock()
        config = upstream_config(*addresses, enabled=False)
        upstream = Upstream(config, ScriptedClient(), clock)
        passive = PassiveHealth(upstream, clock, PassiveHealthConfig(failures, ejection))
        upstream.observer = passive
        self.addCleanup(passive.stop)
        return passive, upstream, clock

    def test_ejected_after_consecutive_failures_and_back_after_ejection_time(self) -> None:
        _, upstream, clock = self.make(A, B, C)
        a = upstream.instances[0]
        upstream.observe(a, "connect_error")
        upstream.observe(a, "5xx")
        self.assertEqual(available(upstream), [A, B, C])
        upstream.observe(a, "timeout")
        self.assertEqual(available(upstream), [B, C])
        self.assertEqual(a.state(clock.seconds())["ejected_for"], 30.0)
        clock.advance(29.9)
        self.assertEqual(available(upstream), [B, C])
        clock.advance(0.1)
        self.assertEqual(available(upstream), [A, B, C])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_every_counted_kind(self) -> None:
        for kind in ("connect_error", "timeout", "reset", "protocol_error", "5xx"):
            _, upstream, _ = self.make(A, B, failures=1)
            upstream.observe(upstream.instances[0], kind)
            self.assertEqual(available(upstream), [B], kind)

    def test_success_resets_the_count(self) -> None:
        _, upstream, _ = self.make(A, B)
        a = upstream.instances[0]
        for outcome in ("5xx", "5xx", None, "5xx", "5xx", None, "reset", "reset"):
            upstream.observe(a, outcome)
        self.assertEqual(available(upstream), [A, B])

    def test_other_outcomes_neither_count_nor_reset(self) -> None:
        _, upstream, _ = self.make(A, B)
        a = upstream.instances[0]
        for outcome in ("5xx", "4xx", "cancelled", "5xx", "4xx"):
            upstream.observe(a, outcome)
        self.assertEqual(available(upstream), [A, B])
        upstream.observe(a, "5xx")
        self.assertEqual(available(upstream), [B])

    def test_failures_while_ejected_do_not_extend_it(self) -> None:
        _, upstream, clock = self.make(A, B, failures=1)
        a = upstream.instances[0]
        upstream.observe(a, "5xx")
        clock.advance(20)
        for _ in range(5):
            upstream.observe(a, "5xx")  # in flight when it was ejected
        clock.advance(10)
        self.assertEqual(available(upstream), [A, B])

    def test_never_ejects_the_last_available_instance(self) -> None:
        events = capture_events(self)
        _, upstream, clock = self.make(A, B, failures=2)
        a, b = upstream.instances
        upstream.observe(a, "connect_error")
        upstream.observe(a, "connect_error")
        self.assertEqual(available(upstream), [B])
        for _ in range(10):
            upstream.observe(b, "connect_error")
        self.assertEqual(available(upstream), [B])
        stays = [e for e in events if "last available" in e.get("log_format", "")]
        self.assertEqual(len(stays), 1)  # once per streak, not per request
        self.assertEqual(stays[0]["address"], B)
        clock.advance(30)  # A is back: B's streak goes on and now ejects it
        upstream.observe(b, "connect_error")
        self.assertEqual(available(upstream), [A])

    def test_single_instance_is_never_ejected(self) -> None:
        _, upstream, _ = self.make(A, failures=1)
        for _ in range(5):
            upstream.observe(upstream.instances[0], "5xx")
        self.assertEqual(available(upstream), [A])

    def test_ejection_and_return_are_logged(self) -> None:
        events = capture_events(self)
        _, upstream, clock = self.make(A, B, failures=2, ejection=5)
        a = upstream.instances[0]
        upstream.observe(a, "reset")
        upstream.observe(a, "5xx")
        clock.advance(5)
        mine = [e for e in events if e.get("address") == A]
        self.assertEqual([e["log_level"] for e in mine], [LogLevel.warn, LogLevel.info])
        ejected, back = mine
        self.assertEqual((ejected["upstream"], ejected["seconds"], ejected["failures"], ejected["failure"]), ("users", 5, 2, "5xx"))
        self.assertIn("ejected", ejected["log_format"])
        self.assertIn("back", back["log_format"])

    def test_stop_leaves_no_timers_and_start_rearms(self) -> None:
        passive, upstream, clock = self.make(A, B, failures=1)
        upstream.observe(upstream.instances[0], "5xx")
        passive.stop()
        self.assertEqual(clock.getDelayedCalls(), [])
        upstream.observe(upstream.instances[1], "5xx")  # stopped: ignored
        self.assertEqual(available(upstream), [B])
        clock.advance(10)
        passive.start()
        [call] = clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 30.0)
        clock.advance(20)
        self.assertEqual(available(upstream), [A, B])


CONFIG = """
upstreams:
  users:
    servers: ["10.0.0.1:80", "10.0.0.2:80"]
    health_check: {enabled: true, path: /healthz, interval: 5, timeout: 1, healthy_threshold: 1, unhealthy_threshold: 1}
    passive_health: {consecutive_failures: 2, ejection_time: 30}
  orders:
    servers: ["10.0.1.1:80"]
routes:
  - {name: users, match: {path: "/users/*"}, upstream: users}
  - {name: orders, match: {path: "/orders/*"}, upstream: orders}
"""


class WiringTests(SynchronousTestCase):
    """The gateway generation builds, shares and starts the health objects."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.runtime = Runtime(self.clock, self.clock)
        self.addCleanup(self.runtime.stop)
        self.client = ScriptedClient()

    def gateway(self, text: str = CONFIG) -> Gateway:
        return Gateway(parse_config(text), lambda _config: self.client, self.runtime)

    def test_health_as_configured(self) -> None:
        gateway = self.gateway()
        users, orders = gateway.upstreams["users"], gateway.upstreams["orders"]
        self.assertIsInstance(users.observer, PassiveHealth)
        self.assertIsNone(orders.observer)
        by_upstream = {h.upstream.name: h for h in gateway.health}
        self.assertIsInstance(by_upstream["users"].active, ActiveHealthCheck)
        self.assertIsNone(by_upstream["orders"].active)
        self.assertIsNone(by_upstream["orders"].passive)

    def test_checks_run_only_once_started(self) -> None:
        gateway = self.gateway()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        gateway.start()
        self.clock.advance(5)
        self.assertEqual(sorted(r.host for r in self.client.requests), ["10.0.0.1", "10.0.0.2"])
        self.assertEqual({r.target for r in self.client.requests}, {b"/healthz"})

    def test_runtime_stop_leaves_no_timers(self) -> None:
        gateway = self.gateway()
        gateway.start()
        self.client.set("10.0.0.1:80", "hang")
        self.clock.advance(5)
        upstream = gateway.upstreams["users"]
        upstream.observe(upstream.instances[1], "5xx")
        upstream.observe(upstream.instances[1], "5xx")
        self.assertTrue(self.clock.getDelayedCalls())
        self.runtime.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.client.cancelled), 1)

    def test_reload_keeps_health_of_unchanged_upstreams(self) -> None:
        first = self.gateway()
        first.start()
        self.client.set("10.0.0.1:80", 503)
        self.clock.advance(5)
        self.assertEqual([i.address for i in first.upstreams["users"].available], ["10.0.0.2:80"])
        changed = CONFIG.replace("10.0.1.1:80", "10.0.1.9:80")
        second = self.gateway(changed)
        second.start(previous=first)
        self.assertIs(second.upstreams["users"], first.upstreams["users"])
        self.assertEqual([i.address for i in second.upstreams["users"].available], ["10.0.0.2:80"])
        self.assertIsNot(second.upstreams["orders"], first.upstreams["orders"])
        # One checker per instance still: the shared one was not started twice.
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)

    def test_reload_stops_checks_of_a_changed_upstream(self) -> None:
        first = self.gateway()
        first.start()
        second = self.gateway(CONFIG.replace("interval: 5", "interval: 7"))
        self.assertIsNot(second.upstreams["users"], first.upstreams["users"])
        second.start(previous=first)
        old = first.health[0].active
        new = second.health[0].active
        assert old is not None and new is not None
        self.assertEqual((old.running, new.running), (False, True))
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)  # only the new checks' timers
        self.clock.advance(7)
        self.assertEqual(len(self.client.requests), 2)


class ThroughTheGatewayTests(SynchronousTestCase):
    """In memory, through the real protocol and pipeline: traffic follows health."""

    def setUp(self) -> None:
        self.down: set[str] = set()

        def answer(request: ReceivedRequest) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            if request.host in self.down:
                raise UpstreamConnectError(f"{request.host} refused")
            return 200, [(b"content-type", b"text/plain")], request.host.encode()

        self.upstream = MemoryUpstream(answer)
        self.harness = GatewayHarness(parse_config(CONFIG), self.upstream)
        self.addCleanup(self.harness.runtime.stop)

    def served_by(self, count: int) -> list[str]:
        hosts = []
        for _ in range(count):
            response = self.harness.request("GET", "/users/1")
            hosts.append(response.body.decode() if response.status == 200 else str(response.status))
        return hosts

    def test_active_checks_take_traffic_away_and_back(self) -> None:
        self.harness.gateway.start()
        self.assertEqual(sorted(set(self.served_by(4))), ["10.0.0.1", "10.0.0.2"])
        self.down.add("10.0.0.1")
        self.harness.clock.advance(5)  # one round of checks (unhealthy_threshold 1)
        self.assertEqual(self.served_by(6), ["10.0.0.2"] * 6)
        self.down.clear()
        self.harness.clock.advance(5.5)
        self.assertEqual(sorted(set(self.served_by(4))), ["10.0.0.1", "10.0.0.2"])

    def test_passive_ejection_from_real_traffic(self) -> None:
        self.down.add("10.0.0.1")
        first = self.served_by(4)  # round robin: two tries reach 10.0.0.1 and fail
        self.assertEqual(sorted(first), ["10.0.0.2", "10.0.0.2", "502", "502"])
        self.assertEqual(self.served_by(6), ["10.0.0.2"] * 6)
        self.down.clear()
        self.harness.clock.advance(30)
        self.assertEqual(sorted(set(self.served_by(4))), ["10.0.0.1", "10.0.0.2"])


class ServiceTests(SynchronousTestCase):
    """The twistd service starts the checks with its listeners and leaves no timer behind."""

    def test_checks_between_start_and_stop(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from txgateway.service import GatewayService

        reactor = MemoryReactorClock()
        service = GatewayService(parse_config(CONFIG), reactor)
        self.assertEqual(reactor.getDelayedCalls(), [])
        service.startService()
        checks = [c for c in reactor.getDelayedCalls() if c.getTime() < 5]
        self.assertEqual(len(checks), 2)
        reactor.advance(5)
        self.assertEqual(len(reactor.tcpClients), 2)  # one check connection per instance
        self.successResultOf(service.stopService())
        self.assertEqual(reactor.getDelayedCalls(), [])
