"""Load balancers: where 10,000 requests go, for each ``load_balancer``.

Every random choice runs on a seeded ``random.Random``, so each count below
is the same on every run; the tolerances say how far a count may be from
the ideal for the balancer to still be doing its job, not how lucky a seed
was.  Chi-square bounds are the 0.1% critical values: a correct balancer
exceeds them once in a thousand seeds.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from itertools import pairwise

from twisted.trial.unittest import SynchronousTestCase

from txgateway.config import parse_config
from txgateway.config.model import UpstreamConfig
from txgateway.pipeline.context import RequestContext
from txgateway.testing import GatewayHarness, MemoryUpstream, ReceivedRequest
from txgateway.upstream.balancer import Balancer, balancer_for
from txgateway.upstream.instance import Instance

PICKS = 10_000

#: Chi-square critical values at p = 0.001, by degrees of freedom.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}


def servers(*weights: int) -> list[Instance]:
    return [Instance(f"10.0.0.{i + 1}", 8080, weight) for i, weight in enumerate(weights)]


def balancer(name: str, instances: Sequence[Instance], hash_key: str | None = None, seed: int = 7) -> Balancer:
    config = UpstreamConfig(name="users", load_balancer=name, hash_key=hash_key)
    return balancer_for(config, instances, random.Random(seed))


def request(
    headers: Sequence[tuple[bytes, bytes]] = (), client_ip: str = "192.0.2.1", path: str = "/api/users/1"
) -> RequestContext:
    return RequestContext(b"GET", path, b"", list(headers), client_ip=client_ip)


class BalancerTestCase(SynchronousTestCase):
    def assertWithin(self, value: int, expected: int, tolerance: int) -> None:
        """``value`` is ``expected`` ± ``tolerance``."""
        if abs(value - expected) > tolerance:
            self.fail(f"{value} is not within {expected} ± {tolerance}")


def chi_square(counts: Counter[Instance], expected: dict[Instance, float]) -> float:
    return sum((counts[i] - e) ** 2 / e for i, e in expected.items())


def simulate(instances: Sequence[Instance], pick: Callable[[], Instance]) -> tuple[Counter[Instance], float]:
    """10,000 requests, one a step, each finishing with probability 0.2 a
    step: how many each instance got, and the mean busiest-minus-idlest in flight."""
    world = random.Random(11)
    counts: Counter[Instance] = Counter()
    spread = 0
    for _ in range(PICKS):
        chosen = pick()
        chosen.in_flight += 1
        counts[chosen] += 1
        for instance in instances:
            if instance.in_flight and world.random() < 0.2:
                instance.in_flight -= 1
        loads = [i.in_flight for i in instances]
        spread += max(loads) - min(loads)
    return counts, spread / PICKS


def longest_run(sequence: Sequence[Instance]) -> int:
    longest = run = 1
    for before, after in pairwise(sequence):
        run = run + 1 if before is after else 1
        longest = max(longest, run)
    return longest


class RoundRobinTests(BalancerTestCase):
    def test_exactly_even(self) -> None:
        """Tolerance: none; 10,000 picks over 4 instances are 2,500 each."""
        instances = servers(1, 1, 1, 1)
        lb = balancer("round_robin", instances)
        ctx = request()
        counts = Counter(lb.pick(instances, ctx) for _ in range(PICKS))
        self.assertEqual([counts[i] for i in instances], [2500] * 4)


class WeightedTests(BalancerTestCase):
    def test_interleaved_not_bunched(self) -> None:
        """Weights 5, 1, 1 give nginx's a a b a c a a, cycle after cycle."""
        a, b, c = instances = servers(5, 1, 1)
        lb = balancer("weighted", instances)
        ctx = request()
        picks = [lb.pick(instances, ctx) for _ in range(70)]
        self.assertEqual(picks, [a, a, b, a, c, a, a] * 10)

    def test_interleaved_among_fewer_candidates(self) -> None:
        """The same with a fourth instance out of the candidates."""
        a, b, c, _out = instances = servers(5, 1, 1, 4)
        lb = balancer("weighted", instances)
        ctx = request()
        picks = [lb.pick([a, b, c], ctx) for _ in range(70)]
        self.assertEqual(picks, [a, a, b, a, c, a, a] * 10)

    def test_exactly_proportional_and_smooth(self) -> None:
        """Tolerance: none over full cycles (10,000 picks = 1,000 cycles of
        weight 10); no run longer than ceil(w / (total - w)) + 1 for the
        heaviest, where picking by weight in blocks would give runs of w."""
        for weights in [(5, 3, 2), (5, 1, 1, 2, 1), (7, 2, 1)]:
            instances = servers(*weights)
            lb = balancer("weighted", instances)
            ctx = request()
            picks = [lb.pick(instances, ctx) for _ in range(PICKS)]
            counts = Counter(picks)
            self.assertEqual([counts[i] for i in instances], [PICKS // 10 * w for w in weights], weights)
            heaviest = max(weights)
            self.assertLessEqual(longest_run(picks), math.ceil(heaviest / (10 - heaviest)) + 1, weights)

    def test_instance_out_of_the_candidates(self) -> None:
        """While one instance is out (ejected, or tried already) the others
        keep their proportions exactly; when it is back it gets its share."""
        instances = servers(3, 2, 1)
        lb = balancer("weighted", instances)
        ctx = request()
        out = [lb.pick(instances[:2], ctx) for _ in range(5000)]
        self.assertEqual(Counter(out), {instances[0]: 3000, instances[1]: 2000})
        back = Counter(lb.pick(instances, ctx) for _ in range(6000))
        self.assertEqual([back[i] for i in instances], [3000, 2000, 1000])


class LeastConnectionsTests(BalancerTestCase):
    def test_goes_to_the_least_loaded(self) -> None:
        """Requests start and finish at random; every pick is an instance
        with the fewest in flight, and the one that finishes its requests
        four times more slowly ends up with under half the traffic of the others."""
        instances = servers(1, 1, 1, 1)
        finish = {instances[0]: 0.1, instances[1]: 0.4, instances[2]: 0.4, instances[3]: 0.4}
        lb = balancer("least_connections", instances)
        world = random.Random(3)
        ctx = request()
        counts: Counter[Instance] = Counter()
        for _ in range(PICKS):
            chosen = lb.pick(instances, ctx)
            self.assertEqual(chosen.in_flight, min(i.in_flight for i in instances))
            chosen.in_flight += 1
            counts[chosen] += 1
            for instance in instances:
                if instance.in_flight and world.random() < finish[instance]:
                    instance.in_flight -= 1
        slow, *fast = instances
        self.assertLess(counts[slow], min(counts[i] for i in fast) / 2)

    def test_weights_divide_the_load(self) -> None:
        """3 in flight on weight 3 is a lighter load than 2 on weight 1."""
        heavy, light = instances = servers(3, 1)
        heavy.in_flight, light.in_flight = 3, 2
        lb = balancer("least_connections", instances)
        self.assertIs(lb.pick(instances, request()), heavy)
        heavy.in_flight = 7
        self.assertIs(lb.pick(instances, request()), light)

    def test_ties_spread_evenly(self) -> None:
        """All idle: 10,000 picks over 4 instances pass chi-square (3 df) at
        p = 0.001, i.e. each count within about ±4% of 2,500."""
        instances = servers(1, 1, 1, 1)
        lb = balancer("least_connections", instances)
        ctx = request()
        counts = Counter(lb.pick(instances, ctx) for _ in range(PICKS))
        self.assertLess(chi_square(counts, {i: PICKS / 4 for i in instances}), CHI2_999[3])

    def test_ties_follow_weight(self) -> None:
        """All idle, weights 3 and 1: 7,500 / 2,500 within chi-square (1 df) at p = 0.001."""
        instances = servers(3, 1)
        lb = balancer("least_connections", instances)
        ctx = request()
        counts = Counter(lb.pick(instances, ctx) for _ in range(PICKS))
        expected = {instances[0]: PICKS * 0.75, instances[1]: PICKS * 0.25}
        self.assertLess(chi_square(counts, expected), CHI2_999[1])


class PowerOfTwoChoicesTests(BalancerTestCase):
    def test_idle_spread_evenly(self) -> None:
        """All idle: 10,000 picks over 5 instances pass chi-square (4 df) at p = 0.001."""
        instances = servers(1, 1, 1, 1, 1)
        lb = balancer("random", instances)
        ctx = request()
        counts = Counter(lb.pick(instances, ctx) for _ in range(PICKS))
        self.assertLess(chi_square(counts, {i: PICKS / 5 for i in instances}), CHI2_999[4])

    def test_prefers_the_less_loaded(self) -> None:
        """In flight 0, 1, 2, 3, 4: the busiest never wins a pair; the idle one
        wins every pair it is in, 4 of the 10 pairs: 4,000 ± 150 (3 sigma)."""
        instances = servers(1, 1, 1, 1, 1)
        for load, instance in enumerate(instances):
            instance.in_flight = load
        lb = balancer("random", instances)
        ctx = request()
        counts = Counter(lb.pick(instances, ctx) for _ in range(PICKS))
        self.assertEqual(counts[instances[4]], 0)
        self.assertWithin(counts[instances[0]], 4000, 150)

    def test_load_stays_level(self) -> None:
        """Requests arrive one a step and each finishes with probability 0.2
        a step (near saturation): over 10,000 picks each of 5 instances
        serves within ±5% of 2,000, and the busiest instance has on average
        fewer than 4 more in flight than the idlest, under a fifth of what
        picking one instance at random gives in the same world."""
        instances = servers(1, 1, 1, 1, 1)
        lb = balancer("random", instances)
        counts, spread = simulate(instances, lambda: lb.pick(instances, request()))
        for instance in instances:
            self.assertWithin(counts[instance], 2000, 100)
        self.assertLess(spread, 4)
        others = servers(1, 1, 1, 1, 1)
        blind = random.Random(7)
        _, blind_spread = simulate(others, lambda: blind.choice(others))
        self.assertLess(spread, blind_spread / 5)

    def test_single_candidate(self) -> None:
        instances = servers(1, 1)
        instances[1].in_flight = 50
        lb = balancer("random", instances)
        self.assertIs(lb.pick(instances[1:], request()), instances[1])


def owners(lb: Balancer, candidates: Sequence[Instance], keys: Sequence[str]) -> list[Instance]:
    return [lb.pick(candidates, request([(b"x-user-id", key.encode())])) for key in keys]


KEYS = [f"user-{n}" for n in range(PICKS)]


class ConsistentHashTests(BalancerTestCase):
    def setUp(self) -> None:
        self.instances = servers(1, 1, 1, 1, 1)
        self.lb = balancer("consistent_hash", self.instances, "header:X-User-ID")

    def test_same_key_same_instance(self) -> None:
        first = owners(self.lb, self.instances, KEYS)
        again = owners(self.lb, self.instances, list(reversed(KEYS)))
        self.assertEqual(first, list(reversed(again)))
        rebuilt = balancer("consistent_hash", list(reversed(self.instances)), "header:x-user-id")
        self.assertEqual(owners(rebuilt, list(reversed(self.instances)), KEYS), first)

    def test_keys_spread(self) -> None:
        """10,000 keys over 5 instances: each within ±15% of 2,000.  The
        spread is set by the ring (256 points per instance), not the keys:
        over random address sets the busiest instance is off by 8% (median),
        12% (p95)."""
        counts = Counter(owners(self.lb, self.instances, KEYS))
        for instance in self.instances:
            self.assertWithin(counts[instance], 2000, 300)

    def test_instance_out_moves_only_its_keys(self) -> None:
        """Ejecting one of 5 moves the keys it had, 15%..25% of them, and no
        other; removing it from the config moves them to the same places."""
        before = owners(self.lb, self.instances, KEYS)
        gone = self.instances[2]
        rest = [i for i in self.instances if i is not gone]
        after = owners(self.lb, rest, KEYS)
        moved = [n for n in range(PICKS) if before[n] is not after[n]]
        self.assertTrue(0.15 * PICKS <= len(moved) <= 0.25 * PICKS, len(moved))
        self.assertEqual(moved, [n for n in range(PICKS) if before[n] is gone])
        rebuilt = balancer("consistent_hash", rest, "header:x-user-id")
        self.assertEqual(owners(rebuilt, rest, KEYS), after)

    def test_few_candidates_on_a_large_ring(self) -> None:
        """Two of 50 instances left: each key goes where a ring of just those two sends it."""
        instances = servers(*[1] * 50)
        lb = balancer("consistent_hash", instances, "header:x-user-id")
        left = [instances[7], instances[31]]
        small = balancer("consistent_hash", left, "header:x-user-id")
        self.assertEqual(owners(lb, left, KEYS[:2000]), owners(small, left, KEYS[:2000]))

    def test_weights_take_more_keys(self) -> None:
        """Weight 3 against 1: 7,500 / 2,500 keys, ±5% of all keys."""
        instances = servers(3, 1)
        lb = balancer("consistent_hash", instances, "header:x-user-id")
        counts = Counter(owners(lb, instances, KEYS))
        self.assertWithin(counts[instances[0]], 7500, 500)

    def test_header_first_value(self) -> None:
        lb = self.lb
        ctx = request([(b"x-user-id", b"alice"), (b"x-user-id", b"bob")])
        self.assertIs(lb.pick(self.instances, ctx), owners(lb, self.instances, ["alice"])[0])

    def test_cookie(self) -> None:
        lb = balancer("consistent_hash", self.instances, "cookie:sid")
        ids = [f"s{n}" for n in range(200)]
        plain = [lb.pick(self.instances, request([(b"cookie", f"sid={s}".encode())])) for s in ids]
        self.assertGreater(len(set(plain)), 1)
        among = [
            lb.pick(
                self.instances, request([(b"cookie", b"theme=dark"), (b"cookie", f"xsid=0; sid={s}; a=b".encode())])
            )
            for s in ids
        ]
        self.assertEqual(among, plain)

    def test_client_ip(self) -> None:
        lb = balancer("consistent_hash", self.instances, "ip")
        picks = [lb.pick(self.instances, request(client_ip=f"198.51.100.{n}", path=f"/{n}")) for n in range(200)]
        again = [lb.pick(self.instances, request(client_ip=f"198.51.100.{n}", path="/other")) for n in range(200)]
        self.assertEqual(picks, again)
        self.assertGreater(len(set(picks)), 1)

    def test_path(self) -> None:
        lb = balancer("consistent_hash", self.instances, "path")
        picks = [lb.pick(self.instances, request(path=f"/items/{n}", client_ip="192.0.2.1")) for n in range(200)]
        again = [lb.pick(self.instances, request(path=f"/items/{n}", client_ip="192.0.2.9")) for n in range(200)]
        self.assertEqual(picks, again)
        self.assertGreater(len(set(picks)), 1)

    def test_missing_key_round_robin(self) -> None:
        """No header, or an empty one: each candidate in turn."""
        picks = [self.lb.pick(self.instances, request()) for _ in range(5)]
        picks += [self.lb.pick(self.instances, request([(b"x-user-id", b"")])) for _ in range(5)]
        self.assertEqual(picks, self.instances * 2)

    def test_candidates_not_on_the_ring(self) -> None:
        """An instance the ring was not built with still serves when it is the only candidate."""
        stranger = Instance("10.9.9.9", 8080)
        self.assertIs(self.lb.pick([stranger], request([(b"x-user-id", b"alice")])), stranger)


WEIGHTED = """
upstreams:
  users:
    load_balancer: weighted
    servers:
      - {address: "10.1.1.1:9001", weight: 3}
      - {address: "10.1.1.2:9001", weight: 1}
routes:
  - name: users
    match: {path: "/users/*"}
    upstream: users
"""


class GatewayTests(BalancerTestCase):
    def test_weighted_upstream_traffic(self) -> None:
        """Through the whole gateway: weights 3 and 1 get exactly 300 and 100 of 400 requests."""

        def ok(received: ReceivedRequest) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            return 200, [], b"ok"

        upstream = MemoryUpstream(ok)
        gateway = GatewayHarness(parse_config(WEIGHTED), upstream)
        for n in range(400):
            self.assertEqual(gateway.request("GET", f"/users/{n}").status, 200)
        counts = Counter((r.host, r.port) for r in upstream.requests)
        self.assertEqual(counts, {("10.1.1.1", 9001): 300, ("10.1.1.2", 9001): 100})
