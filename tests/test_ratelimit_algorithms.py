"""Token bucket and sliding window under a fake clock: what a client is admitted
and what it is told (remaining, reset, retry-after)."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from txgateway.ratelimit.decision import Algorithm, Decision
from txgateway.ratelimit.memory import MemoryStore
from txgateway.ratelimit.sliding_window import SlidingWindow
from txgateway.ratelimit.token_bucket import TokenBucket


class _Limiter:
    """One key of a memory store, on a clock that starts at an arbitrary time."""

    def __init__(self, algorithm: Algorithm, start: float = 1_000_000.0) -> None:
        self.clock = Clock()
        self.clock.advance(start)
        self.store = MemoryStore(self.clock)
        self.algorithm = algorithm

    def hit(self, key: str = "k") -> Decision:
        return self.store.decide(self.algorithm, key)

    def admitted(self, count: int, key: str = "k") -> int:
        return sum(self.hit(key).allowed for _ in range(count))


class TokenBucketTests(SynchronousTestCase):
    def test_burst_then_refused(self) -> None:
        limiter = _Limiter(TokenBucket(requests_per_minute=60, burst_size=5))
        decisions = [limiter.hit() for _ in range(7)]
        self.assertEqual([d.allowed for d in decisions], [True] * 5 + [False] * 2)
        self.assertEqual([d.remaining for d in decisions], [4, 3, 2, 1, 0, 0, 0])

    def test_refill_one_token_per_interval(self) -> None:
        limiter = _Limiter(TokenBucket(requests_per_minute=60, burst_size=2))
        limiter.admitted(2)
        self.assertFalse(limiter.hit().allowed)
        limiter.clock.advance(0.999)
        self.assertFalse(limiter.hit().allowed)
        limiter.clock.advance(0.001)
        self.assertTrue(limiter.hit().allowed)
        self.assertFalse(limiter.hit().allowed)
        # Ten idle seconds refill only up to the burst size.
        limiter.clock.advance(10)
        self.assertEqual(limiter.admitted(5), 2)

    def test_sustained_rate(self) -> None:
        limiter = _Limiter(TokenBucket(requests_per_minute=120, burst_size=1))
        admitted = 0
        for _ in range(600):  # one attempt every 0.1 s for 60 s
            admitted += limiter.hit().allowed
            limiter.clock.advance(0.1)
        self.assertEqual(admitted, 120)

    def test_retry_after_and_reset(self) -> None:
        limiter = _Limiter(TokenBucket(requests_per_minute=6, burst_size=3))  # a token every 10 s
        first = limiter.hit()
        self.assertEqual((first.allowed, first.remaining, first.reset, first.retry_after), (True, 2, 10, 0))
        limiter.admitted(2)
        refused = limiter.hit()
        self.assertEqual((refused.allowed, refused.remaining, refused.reset, refused.retry_after), (False, 0, 30, 10))
        limiter.clock.advance(7.5)
        refused = limiter.hit()
        self.assertEqual((refused.reset, refused.retry_after), (23, 3))  # 22.5 and 2.5 rounded up
        limiter.clock.advance(2.5)
        self.assertTrue(limiter.hit().allowed)

    def test_retry_after_is_at_least_one_second(self) -> None:
        limiter = _Limiter(TokenBucket(requests_per_minute=6000, burst_size=1))  # a token every 10 ms
        limiter.hit()
        refused = limiter.hit()
        self.assertFalse(refused.allowed)
        self.assertEqual(refused.retry_after, 1)
        self.assertGreaterEqual(refused.reset, 1)

    def test_waiting_what_retry_after_says_is_enough(self) -> None:
        limiter = _Limiter(TokenBucket(requests_per_minute=7, burst_size=2))
        limiter.admitted(2)
        for _ in range(5):
            refused = limiter.hit()
            self.assertFalse(refused.allowed)
            limiter.clock.advance(refused.retry_after)
            self.assertTrue(limiter.hit().allowed)

    def test_keys_are_independent(self) -> None:
        limiter = _Limiter(TokenBucket(requests_per_minute=60, burst_size=1))
        self.assertTrue(limiter.hit("a").allowed)
        self.assertFalse(limiter.hit("a").allowed)
        self.assertTrue(limiter.hit("b").allowed)

    def test_clock_stepping_back_neither_refills_nor_drains(self) -> None:
        limiter = _Limiter(TokenBucket(requests_per_minute=60, burst_size=2))
        limiter.admitted(2)
        limiter.clock.rightNow -= 3600
        self.assertFalse(limiter.hit().allowed)
        limiter.clock.advance(3600 + 1)
        self.assertTrue(limiter.hit().allowed)


class SlidingWindowTests(SynchronousTestCase):
    def test_exactly_the_limit_within_one_window(self) -> None:
        limiter = _Limiter(SlidingWindow(requests_per_minute=10), start=600.0)  # a window start
        self.assertEqual(limiter.admitted(25), 10)
        limiter.clock.advance(59.9)
        self.assertFalse(limiter.hit().allowed)

    def test_previous_window_weighs_in_proportionally(self) -> None:
        limiter = _Limiter(SlidingWindow(requests_per_minute=10), start=600.0)
        limiter.admitted(10)
        # 15 s into the next window the previous 10 still count as 7.5: 2 more fit.
        limiter.clock.advance(75)
        self.assertEqual(limiter.admitted(5), 2)
        # Half way: previous counts 5, current 2 -> 3 more.
        limiter.clock.advance(15)
        self.assertEqual(limiter.admitted(5), 3)

    def test_window_edge(self) -> None:
        limiter = _Limiter(SlidingWindow(requests_per_minute=4), start=600.0)
        limiter.clock.advance(59.999)
        self.assertEqual(limiter.admitted(4), 4)  # all in the last instant of a window
        limiter.clock.advance(0.001)
        # A new window started, but the whole previous one still counts.
        self.assertFalse(limiter.hit().allowed)

    def test_two_windows_later_everything_is_forgotten(self) -> None:
        limiter = _Limiter(SlidingWindow(requests_per_minute=3), start=600.0)
        limiter.admitted(3)
        limiter.clock.advance(120)
        self.assertEqual(limiter.admitted(5), 3)

    def test_remaining_and_reset(self) -> None:
        limiter = _Limiter(SlidingWindow(requests_per_minute=10), start=600.0)
        limiter.clock.advance(20)
        first = limiter.hit()
        # Counted until the end of the next window: 40 s + 60 s.
        self.assertEqual((first.allowed, first.remaining, first.reset, first.retry_after), (True, 9, 100, 0))

    def test_retry_after_within_the_window(self) -> None:
        limiter = _Limiter(SlidingWindow(requests_per_minute=10), start=600.0)
        limiter.admitted(10)
        limiter.clock.advance(60)  # previous = 10, weight 1: full
        refused = limiter.hit()
        self.assertFalse(refused.allowed)
        self.assertEqual(refused.retry_after, 6)  # previous must fade to 9: 6 s
        limiter.clock.advance(5.9)
        self.assertFalse(limiter.hit().allowed)
        limiter.clock.advance(0.1)
        self.assertTrue(limiter.hit().allowed)

    def test_retry_after_into_the_next_window(self) -> None:
        limiter = _Limiter(SlidingWindow(requests_per_minute=4), start=600.0)
        limiter.clock.advance(30)
        limiter.admitted(4)
        refused = limiter.hit()
        # 30 s to the window's end, then current (4) must fade to 3: 15 s more.
        self.assertEqual(refused.retry_after, 45)
        limiter.clock.advance(44.9)
        self.assertFalse(limiter.hit().allowed)
        limiter.clock.advance(0.1)
        self.assertTrue(limiter.hit().allowed)

    def test_waiting_what_retry_after_says_is_enough(self) -> None:
        limiter = _Limiter(SlidingWindow(requests_per_minute=3), start=613.7)
        for _ in range(8):
            while limiter.hit().allowed:
                pass
            refused = limiter.hit()
            limiter.clock.advance(refused.retry_after)
            self.assertTrue(limiter.hit().allowed)
            limiter.clock.advance(4.3)
