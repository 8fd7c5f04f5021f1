"""Cost of one balancer pick, with 3 and with 50 instances.

Run: ``.venv/bin/python bench/balancer_cost.py [--picks N]``.

Prints microseconds per ``pick(candidates, ctx)``, best of five rounds, for
every ``load_balancer``, on requests that each carry their own
``x-user-id`` (1,000 distinct ones, visited in turn) and some other headers.
Instances have varied ``in_flight`` counts so the load-aware balancers do
real comparisons.  ``weighted`` and ``consistent_hash`` are measured twice:
with every instance a candidate (the common case, where they take a
shortcut) and with one instance out (ejected, or tried already), where
weighted makes a pass over the candidates and the ring walks on from the
missing instance's points.

Not a test: numbers depend on the machine; they show which balancers grow
with the instance count (least_connections always, weighted with one out)
and which stay flat.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from collections.abc import Sequence

from txgateway.config.model import UpstreamConfig
from txgateway.pipeline.context import RequestContext
from txgateway.upstream.balancer import Balancer, balancer_for
from txgateway.upstream.instance import Instance

#: (load_balancer, one instance out of the candidates)
CASES = [
    ("round_robin", False),
    ("weighted", False),
    ("weighted", True),
    ("least_connections", False),
    ("random", False),
    ("consistent_hash", False),
    ("consistent_hash", True),
]


def instances(count: int) -> list[Instance]:
    rng = random.Random(count)
    made = []
    for n in range(count):
        instance = Instance(f"10.0.{n // 256}.{n % 256}", 8080, weight=1 + n % 3)
        instance.in_flight = rng.randrange(20)
        made.append(instance)
    return made


def requests(count: int) -> list[RequestContext]:
    return [
        RequestContext(
            b"GET",
            f"/api/users/{n}",
            b"",
            [
                (b"host", b"api.example.com"),
                (b"user-agent", b"bench/1.0"),
                (b"accept", b"application/json"),
                (b"cookie", f"theme=dark; sid=s{n}".encode()),
                (b"x-user-id", f"user-{n}".encode()),
            ],
            client_ip=f"198.51.100.{n % 256}",
        )
        for n in range(count)
    ]


def per_pick(lb: Balancer, candidates: Sequence[Instance], contexts: list[RequestContext], picks: int) -> float:
    """Best of five rounds, microseconds per pick (the loop included)."""
    pick = lb.pick
    rounds = picks // len(contexts)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(rounds):
            for ctx in contexts:
                pick(candidates, ctx)
        best = min(best, time.perf_counter() - started)
    return best / (rounds * len(contexts)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--picks", type=int, default=200_000)
    args = parser.parse_args()
    contexts = requests(1000)
    sizes = (3, 50)
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cpus; us per pick")
    print(f"{'load_balancer':<32}" + "".join(f"{f'{n} instances':>14}" for n in sizes))
    rows: list[tuple[str, list[float]]] = []
    for name, one_out in CASES:
        cells = []
        for size in sizes:
            servers = instances(size)
            config = UpstreamConfig(name="bench", load_balancer=name, hash_key="header:x-user-id")
            lb = balancer_for(config, servers, random.Random(1))
            candidates = servers[:1] + servers[2:] if one_out else servers
            cells.append(per_pick(lb, candidates, contexts, args.picks))
        rows.append((f"{name}, one out" if one_out else name, cells))
    for name, cells in rows:
        print(f"{name:<32}" + "".join(f"{micros:14.3f}" for micros in cells))


if __name__ == "__main__":
    main()
