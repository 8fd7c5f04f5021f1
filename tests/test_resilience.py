"""Circuit breaker, retries, body replay and fallbacks, under a fake clock."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from txgateway.config import parse_config
from txgateway.config.model import CircuitBreakerConfig, RetryConfig
from txgateway.errors import UpstreamConnectError, UpstreamReset, UpstreamTimeout
from txgateway.interfaces import IBodySink
from txgateway.testing import GatewayHarness, MemoryUpstream, ReceivedRequest
from txgateway.upstream.breaker import CLOSED, HALF_OPEN, OPEN, BreakerOpen, CircuitBreaker
from txgateway.upstream.replay import ReplayableBody
from txgateway.upstream.retry import BUDGET_CAP, RetryBudget, RetryPolicy

Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


class BreakerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.transitions: list[tuple[str, str]] = []
        self.breaker = CircuitBreaker(
            "users", CircuitBreakerConfig(failure_threshold=3, recovery_timeout=10, success_threshold=2), self.clock
        )
        self.breaker.listeners.append(lambda name, old, new: self.transitions.append((old, new)))

    def fail_n(self, n: int) -> None:
        for _ in range(n):
            self.breaker.record(self.breaker.admit(), True)

    def test_opens_after_consecutive_failures_only(self) -> None:
        self.fail_n(2)
        self.breaker.record(self.breaker.admit(), False)  # a success resets the count
        self.fail_n(2)
        self.assertEqual(self.breaker.state, CLOSED)
        self.fail_n(1)
        self.assertEqual(self.breaker.state, OPEN)
        self.assertEqual(self.transitions, [(CLOSED, OPEN)])

    def test_open_refuses_with_retry_after(self) -> None:
        self.fail_n(3)
        self.clock.advance(3.5)
        with self.assertRaises(BreakerOpen) as raised:
            self.breaker.admit()
        self.assertEqual(raised.exception.status, 503)
        self.assertIn((b"retry-after", b"7"), raised.exception.headers)

    def test_half_open_after_recovery_timeout_with_bounded_probes(self) -> None:
        self.fail_n(3)
        self.clock.advance(10)
        first = self.breaker.admit()
        second = self.breaker.admit()
        self.assertEqual(self.breaker.state, HALF_OPEN)
        # The probe budget (success_threshold = 2) is used: a third is refused, not queued.
        self.assertRaises(BreakerOpen, self.breaker.admit)
        self.breaker.record(first, False)
        self.assertEqual(self.breaker.state, HALF_OPEN)
        self.breaker.record(second, False)
        self.assertEqual(self.breaker.state, CLOSED)
        self.assertEqual(self.transitions, [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)])

    def test_one_failed_probe_reopens(self) -> None:
        self.fail_n(3)
        self.clock.advance(10)
        probe = self.breaker.admit()
        self.breaker.record(probe, True)
        self.assertEqual(self.breaker.state, OPEN)
        self.clock.advance(9.9)
        self.assertRaises(BreakerOpen, self.breaker.admit)
        self.clock.advance(0.1)
        self.breaker.admit()
        self.assertEqual(self.breaker.state, HALF_OPEN)

    def test_results_from_an_older_state_do_not_count(self) -> None:
        early = self.breaker.admit()  # admitted while closed
        self.fail_n(3)
        self.clock.advance(10)
        probe = self.breaker.admit()
        self.breaker.record(early, True)  # a late failure from before opening
        self.assertEqual(self.breaker.state, HALF_OPEN)
        self.breaker.record(probe, False)

    def test_outcomes_that_do_not_count(self) -> None:
        for _ in range(10):
            self.breaker.record(self.breaker.admit(), None)
        self.assertEqual(self.breaker.state, CLOSED)


class RetryPolicyTests(SynchronousTestCase):
    def test_full_jitter_backoff_bounds(self) -> None:
        policy = RetryPolicy(RetryConfig(attempts=5, backoff_base=0.1, backoff_max=0.5), random.Random(7))
        for retry, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (8, 0.5)]:
            waits = [policy.backoff(retry) for _ in range(500)]
            self.assertTrue(all(0 <= w <= ceiling for w in waits))
            self.assertGreater(max(waits), ceiling * 0.9)
            self.assertLess(min(waits), ceiling * 0.1)

    def test_methods_and_conditions(self) -> None:
        policy = RetryPolicy(RetryConfig(attempts=3, on=("connect_error", "503"), methods=("GET",)))
        self.assertTrue(policy.applies_to(b"GET"))
        self.assertFalse(policy.applies_to(b"POST"))
        self.assertTrue(policy.retry_kind("connect_error"))
        self.assertFalse(policy.retry_kind("timeout"))
        self.assertTrue(policy.retry_status(503))
        self.assertFalse(policy.retry_status(500))
        self.assertFalse(RetryPolicy(RetryConfig(attempts=1)).applies_to(b"GET"))

    def test_budget_limits_retries_to_ratio_of_requests(self) -> None:
        budget = RetryBudget(0.2)
        retries = 0
        for _ in range(1000):
            budget.earn()
            if budget.spend():
                retries += 1
        # At most 20% of requests, plus the initial balance.
        self.assertLessEqual(retries, 200 + BUDGET_CAP)
        self.assertGreaterEqual(retries, 200)


@implementer(IBodySink)
class Collect:
    def __init__(self) -> None:
        self.data = b""
        self.done = False

    def write(self, data: bytes) -> None:
        self.data += data

    def finish(self) -> None:
        self.done = True

    def abort(self, reason: object) -> None:
        pass


class FakeClientBody:
    """Stands in for the client's request body: the test pushes bytes."""

    def __init__(self, length: int | None) -> None:
        self.length = length
        self.max_bytes: int | None = None
        self.sink: IBodySink | None = None

    def deliverTo(self, sink: IBodySink) -> None:
        self.sink = sink

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class ReplayTests(SynchronousTestCase):
    def test_untouched_body_is_itself(self) -> None:
        body = ReplayableBody(FakeClientBody(3))  # type: ignore[arg-type]
        self.assertIs(body.fresh(), body)

    def test_replay_gets_what_was_sent_and_the_rest(self) -> None:
        client = FakeClientBody(10)
        body = ReplayableBody(client)  # type: ignore[arg-type]
        first = Collect()
        body.deliverTo(first)
        assert client.sink is not None
        client.sink.write(b"01234")
        body.stopProducing()  # the first try's connection died
        second = Collect()
        body.fresh().deliverTo(second)
        client.sink.write(b"56789")
        client.sink.finish()
        self.assertEqual(first.data, b"01234")
        self.assertEqual((second.data, second.done), (b"0123456789", True))

    def test_big_body_is_not_replayable(self) -> None:
        client = FakeClientBody(None)
        body = ReplayableBody(client, limit=8)  # type: ignore[arg-type]
        body.deliverTo(Collect())
        assert client.sink is not None
        client.sink.write(b"x" * 9)
        self.assertFalse(body.replayable)
        self.assertRaises(RuntimeError, body.fresh)


RESILIENT = """
upstreams:
  users:
    servers: ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
    retry: {{attempts: {attempts}, backoff_base: 0.1, backoff_max: 1.0, on: [connect_error, timeout, "503"]}}
    circuit_breaker: {{failure_threshold: 2, recovery_timeout: 30}}
{fallback}
  spare:
    servers: ["10.9.9.9:80"]
routes:
  - {{name: users, match: {{path: "/users/*"}}, upstream: users}}
"""


def config(attempts: int = 3, fallback: str = "") -> str:
    return RESILIENT.format(attempts=attempts, fallback=fallback)


class RetryThroughGatewayTests(SynchronousTestCase):
    def test_connect_error_retried_on_another_instance(self) -> None:
        def answer(request: ReceivedRequest) -> Answer:
            if request.host == "10.0.0.1":
                raise UpstreamConnectError("refused")
            return 200, [], request.host.encode()

        upstream = MemoryUpstream(answer)
        harness = GatewayHarness(parse_config(config()), upstream)
        response = harness.request("GET", "/users/1")
        self.assertEqual(response.status, 200)
        hosts = [r.host for r in upstream.requests]
        self.assertEqual(len(hosts), 2)
        self.assertEqual(hosts[0], "10.0.0.1")
        self.assertNotEqual(hosts[1], "10.0.0.1")
        self.assertEqual(response.body, hosts[1].encode())

    def test_attempts_are_a_total_and_each_goes_elsewhere(self) -> None:
        def answer(request: ReceivedRequest) -> Answer:
            raise UpstreamTimeout("slow")

        upstream = MemoryUpstream(answer)
        harness = GatewayHarness(parse_config(config(attempts=3)), upstream)
        response = harness.request("GET", "/users/1")
        self.assertEqual(response.status, 504)
        self.assertEqual(sorted(r.host for r in upstream.requests), ["10.0.0.1", "10.0.0.2", "10.0.0.3"])

    def test_retry_waits_for_backoff(self) -> None:
        times: list[float] = []
        clock = Clock()

        def answer(request: ReceivedRequest) -> Answer:
            times.append(clock.seconds())
            raise UpstreamConnectError("refused")

        harness = GatewayHarness(parse_config(config(attempts=3)), MemoryUpstream(answer), clock=clock)
        harness.request("GET", "/users/1")
        self.assertEqual(times[0], 0.0)
        self.assertLessEqual(times[1] - times[0], 0.1)
        self.assertLessEqual(times[2] - times[1], 0.2)

    def test_listed_status_retried_others_passed_on(self) -> None:
        statuses = iter([503, 500])
        upstream = MemoryUpstream(lambda request: (next(statuses), [], b""))
        response = GatewayHarness(parse_config(config()), upstream).request("GET", "/users/1")
        self.assertEqual(response.status, 500)
        self.assertEqual(len(upstream.requests), 2)

    def test_non_idempotent_method_not_retried(self) -> None:
        def answer(request: ReceivedRequest) -> Answer:
            raise UpstreamReset("reset")

        upstream = MemoryUpstream(answer)
        response = GatewayHarness(parse_config(config()), upstream).request("POST", "/users/1", body=b"x")
        self.assertEqual(response.status, 502)
        self.assertEqual(len(upstream.requests), 1)

    def test_small_body_replayed_on_retry(self) -> None:
        calls = []

        def answer(request: ReceivedRequest) -> Answer:
            calls.append(request.body)
            if len(calls) == 1:
                raise UpstreamTimeout("slow")
            return 200, [], b"ok"

        upstream = MemoryUpstream(answer)
        response = GatewayHarness(parse_config(config()), upstream).request("PUT", "/users/1", body=b"payload")
        self.assertEqual(response.status, 200)
        self.assertEqual(calls, [b"payload", b"payload"])


class BreakerStageTests(SynchronousTestCase):
    def test_failure_raised_at_once_counts_and_gives_the_probe_back(self) -> None:
        from txgateway.errors import ServiceUnavailable
        from txgateway.pipeline.breaker import BreakerStage

        clock = Clock()
        breaker = CircuitBreaker("users", CircuitBreakerConfig(failure_threshold=1, recovery_timeout=10), clock)

        def no_instance(ctx: object) -> Any:
            raise ServiceUnavailable("no healthy instance of users")

        guarded = BreakerStage(breaker).wrap(no_instance)  # type: ignore[arg-type]
        self.failureResultOf(guarded(object()), ServiceUnavailable)  # type: ignore[arg-type]
        self.assertEqual(breaker.state, OPEN)
        clock.advance(10)
        # Half-open: the probe fails the same way and must not keep its slot.
        self.failureResultOf(guarded(object()), ServiceUnavailable)  # type: ignore[arg-type]
        self.assertEqual(breaker.state, OPEN)
        clock.advance(10)
        breaker.record(breaker.admit(), False)
        self.assertEqual(breaker.state, CLOSED)


class BreakerThroughGatewayTests(SynchronousTestCase):
    def test_open_breaker_answers_fast_without_upstream(self) -> None:
        def answer(request: ReceivedRequest) -> Answer:
            raise UpstreamConnectError("refused")

        upstream = MemoryUpstream(answer)
        harness = GatewayHarness(parse_config(config(attempts=1)), upstream)
        for _ in range(2):
            self.assertEqual(harness.request("GET", "/users/1").status, 502)
        sent = len(upstream.requests)
        response = harness.request("GET", "/users/1")
        self.assertEqual(response.status, 503)
        self.assertEqual(response.header("retry-after"), "30")
        self.assertEqual(len(upstream.requests), sent, "no upstream call while open")

    def test_breaker_recovers_through_half_open(self) -> None:
        healthy = [False]

        def answer(request: ReceivedRequest) -> Answer:
            if not healthy[0]:
                raise UpstreamConnectError("refused")
            return 200, [], b"ok"

        clock = Clock()
        harness = GatewayHarness(parse_config(config(attempts=1)), MemoryUpstream(answer), clock=clock)
        harness.request("GET", "/users/1")
        harness.request("GET", "/users/1")
        self.assertEqual(harness.request("GET", "/users/1").status, 503)
        healthy[0] = True
        clock.advance(30)
        self.assertEqual(harness.request("GET", "/users/1").status, 200)
        self.assertEqual(harness.request("GET", "/users/1").status, 200)


class FallbackTests(SynchronousTestCase):
    STATIC = """    fallback:
      status: 503
      body: '{"error":"users degraded"}'
      content_type: application/json"""

    def test_static_fallback_when_every_try_failed_and_when_open(self) -> None:
        def answer(request: ReceivedRequest) -> Answer:
            raise UpstreamConnectError("refused")

        harness = GatewayHarness(parse_config(config(attempts=1, fallback=self.STATIC)), MemoryUpstream(answer))
        first = harness.request("GET", "/users/1")
        self.assertEqual((first.status, first.body), (503, b'{"error":"users degraded"}'))
        self.assertEqual(first.header("x-fallback"), "static")
        harness.request("GET", "/users/1")
        opened = harness.request("GET", "/users/1")
        self.assertEqual(opened.header("x-fallback"), "static")
        self.assertEqual(opened.header("retry-after"), "30")

    def test_fallback_to_another_upstream(self) -> None:
        def answer(request: ReceivedRequest) -> Answer:
            if request.host == "10.9.9.9":
                return 200, [], b"from spare"
            raise UpstreamConnectError("refused")

        fallback = "    fallback: {upstream: spare}"
        harness = GatewayHarness(parse_config(config(attempts=1, fallback=fallback)), MemoryUpstream(answer))
        response = harness.request("GET", "/users/1")
        self.assertEqual((response.status, response.body), (200, b"from spare"))
        self.assertEqual(response.header("x-fallback"), "upstream")

    def test_client_errors_are_not_replaced(self) -> None:
        upstream = MemoryUpstream(lambda request: (404, [], b"no such user"))
        harness = GatewayHarness(parse_config(config(attempts=1, fallback=self.STATIC)), upstream)
        response = harness.request("GET", "/users/1")
        self.assertEqual((response.status, response.body), (404, b"no such user"))


@implementer(IBodySink)
class Sink:
    def __init__(self) -> None:
        self.data = b""
        self.finished = False
        self.aborted: object = None

    def write(self, data: bytes) -> None:
        self.data += data

    def finish(self) -> None:
        self.finished = True

    def abort(self, reason: object) -> None:
        self.aborted = reason


class HeldBody:
    """An upstream response body the test feeds by hand."""

    def __init__(self) -> None:
        self.length: int | None = None
        self.sink: IBodySink | None = None
        self.stopped = False

    def deliverTo(self, sink: IBodySink) -> None:
        self.sink = sink

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped = True


class ResponseTimeoutTests(SynchronousTestCase):
    """timeouts.idle and timeouts.total on a streaming response."""

    def respond(self, timeouts: str) -> tuple[Clock, HeldBody, Sink, object]:
        from twisted.internet.defer import succeed

        from txgateway.gateway import Gateway
        from txgateway.messages import Response
        from txgateway.pipeline.context import RequestContext
        from txgateway.runtime import Runtime

        clock = Clock()
        body = HeldBody()

        class Client:
            def request(self, request: object) -> object:
                return succeed(Response(200, [], body))  # type: ignore[arg-type]

            def close(self) -> object:
                return succeed(None)

        config = parse_config(
            f"""
upstreams:
  up: {{servers: ["10.0.0.1:80"], timeouts: {timeouts}}}
routes:
  - {{name: all, match: {{path: "/*"}}, upstream: up}}
"""
        )
        gateway = Gateway(config, lambda c: Client(), Runtime(clock, clock))  # type: ignore[arg-type,return-value]
        ctx = RequestContext(b"GET", "/x", b"", [], client_ip="192.0.2.1", started=clock.seconds())
        response = self.successResultOf(gateway.handle(ctx))
        sink = Sink()
        response.body.deliverTo(sink)  # type: ignore[union-attr]
        return clock, body, sink, gateway.upstreams["up"].instances[0]

    def test_idle_upstream_body_is_cut(self) -> None:
        clock, body, sink, instance = self.respond("{idle: 5}")
        assert body.sink is not None
        for _ in range(4):  # 16 s of a slow but live stream
            clock.advance(4)
            body.sink.write(b"tick")
        self.assertIsNone(sink.aborted)
        clock.advance(5)
        self.assertIsInstance(sink.aborted.value, UpstreamTimeout)  # type: ignore[attr-defined]
        self.assertTrue(body.stopped, "the upstream connection is given up, not pooled")
        self.assertEqual(instance.in_flight, 0)  # type: ignore[attr-defined]
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_total_cuts_a_live_stream(self) -> None:
        clock, body, sink, _ = self.respond("{idle: 5, total: 10}")
        assert body.sink is not None
        for _ in range(3):
            clock.advance(3)
            body.sink.write(b"tick")
        self.assertIsNone(sink.aborted)
        clock.advance(1)
        self.assertIn("exchange timeout", str(sink.aborted.value))  # type: ignore[attr-defined]

    def test_finished_body_leaves_no_timer(self) -> None:
        clock, body, sink, instance = self.respond("{idle: 5}")
        assert body.sink is not None
        body.sink.write(b"all")
        body.sink.finish()
        self.assertTrue(sink.finished)
        self.assertEqual(instance.in_flight, 0)  # type: ignore[attr-defined]
        self.assertEqual(clock.getDelayedCalls(), [])
