"""The memory store stays bounded: idle keys expire on the clock, a hard cap
holds under a flood of new keys, and nothing is left scheduled when it is idle
or stopped."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from txgateway.ratelimit.memory import MemoryStore
from txgateway.ratelimit.sliding_window import SlidingWindow
from txgateway.ratelimit.token_bucket import TokenBucket


class ExpiryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore(self.clock, sweep_interval=10.0)

    def test_full_bucket_is_dropped(self) -> None:
        bucket = TokenBucket(requests_per_minute=2, burst_size=30)  # full again 30 s after one hit
        self.store.decide(bucket, "idle")
        self.clock.advance(20)
        self.assertIn("idle", self.store)
        self.clock.advance(20)
        self.assertNotIn("idle", self.store)
        self.assertEqual(len(self.store), 0)

    def test_a_used_bucket_is_kept_until_it_is_full(self) -> None:
        bucket = TokenBucket(requests_per_minute=60, burst_size=30)
        for _ in range(20):  # two a second, one refilled: 9 tokens left after 20 s
            self.store.decide(bucket, "busy")
            self.store.decide(bucket, "busy")
            self.clock.advance(1)
        self.assertIn("busy", self.store)
        # Full again 21 s after the last request (then swept within 10 s).
        self.clock.advance(15)
        self.assertIn("busy", self.store)
        self.clock.advance(20)
        self.assertNotIn("busy", self.store)

    def test_dropping_a_full_bucket_changes_nothing_for_the_client(self) -> None:
        bucket = TokenBucket(requests_per_minute=60, burst_size=3)
        admitted = [self.store.decide(bucket, "c").allowed for _ in range(4)]
        self.clock.advance(100)
        self.assertNotIn("c", self.store)
        admitted += [self.store.decide(bucket, "c").allowed for _ in range(4)]
        self.assertEqual(admitted, [True, True, True, False] * 2)

    def test_sliding_window_keys_expire_after_two_windows(self) -> None:
        window = SlidingWindow(requests_per_minute=10)
        self.clock.advance(600)
        self.store.decide(window, "w")
        self.clock.advance(115)
        self.assertIn("w", self.store)
        self.clock.advance(20)
        self.assertNotIn("w", self.store)

    def test_many_keys_come_and_go(self) -> None:
        bucket = TokenBucket(requests_per_minute=600, burst_size=10)  # full 1 s after one hit
        for round_ in range(5):
            for i in range(2000):
                self.store.decide(bucket, f"client-{round_}-{i}")
            self.clock.advance(30)
            self.assertEqual(len(self.store), 0)

    def test_no_timer_while_empty(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.store.decide(TokenBucket(60, 1), "k")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(60)
        self.assertEqual(len(self.store), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_cancels_the_sweep(self) -> None:
        self.store.decide(TokenBucket(60, 10), "k")
        self.store.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.store), 0)


class CapTests(SynchronousTestCase):
    def test_flood_of_new_keys_stays_under_the_cap_and_spares_established_ones(self) -> None:
        clock = Clock()
        store = MemoryStore(clock, max_keys=100)
        bucket = TokenBucket(requests_per_minute=1, burst_size=2)  # keys stay for two minutes
        for _ in range(2):
            store.decide(bucket, "established")
        for i in range(10_000):
            store.decide(bucket, f"spoofed-{i}")
            self.assertLessEqual(len(store), 100)
        self.assertFalse(store.decide(bucket, "established").allowed)

    def test_untracked_keys_are_logged_once_per_sweep(self) -> None:
        clock = Clock()
        store = MemoryStore(clock, sweep_interval=5.0, max_keys=10)
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

        def warnings() -> list[dict[str, object]]:
            return [e for e in observer if e.get("log_namespace", "").startswith("txgateway.ratelimit")]

        for i in range(50):
            store.decide(TokenBucket(1, 1), f"k{i}")
        self.assertEqual(warnings(), [])
        clock.advance(5)
        self.assertEqual([(e["count"], e["max_keys"]) for e in warnings()], [(40, 10)])
        clock.advance(5)
        self.assertEqual(len(warnings()), 1)
