"""Cost of one rate-limit decision: memory token bucket, memory sliding window, Redis.

Run: ``.venv/bin/python bench/ratelimit_cost.py [--decisions N] [--keys K] [--no-redis]``.

Prints microseconds per decision for:

- ``memory token_bucket`` / ``memory sliding_window``: ``MemoryStore.decide``
  alone, over ``K`` keys (default 10,000) visited round robin, so the dict is
  realistic and every decision is a hit after the first round.
- ``stage ...``: the whole per-request work of the middleware on top of that
  (tier lookup for an identity with roles, key extraction for ``key:
  consumer``, the key string, the decision, the six header values), without
  the downstream call.
- ``redis sequential``: one decision at a time against a ``redis-server``
  this script starts on a free loopback port (latency: a round trip plus the
  script); ``redis concurrent``: 200 decisions in flight at a time
  (throughput of the one pipelined connection), and the gateway side's CPU
  time per decision in that run (``time.process_time``: Redis's own work is
  in another process).  Skipped when redis-server is
  not installed or with ``--no-redis``.

Not a test: numbers depend on the machine; they are here to show the memory
decision stays at a few microseconds and what a Redis decision costs.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable

from twisted.internet.task import Clock

from txgateway.auth.identity import Identity
from txgateway.config.model import RateLimitConfig
from txgateway.pipeline.context import RequestContext
from txgateway.ratelimit.decision import Algorithm
from txgateway.ratelimit.keys import key_function
from txgateway.ratelimit.memory import MemoryStore
from txgateway.ratelimit.middleware import RateLimit
from txgateway.ratelimit.sliding_window import SlidingWindow
from txgateway.ratelimit.token_bucket import TokenBucket


def per_decision(run: Callable[[int], None], count: int) -> float:
    """Best of three runs, microseconds per decision."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        run(count)
        best = min(best, time.perf_counter() - started)
    return best / count * 1e6


def memory(algorithm: Algorithm, keys: list[str]) -> Callable[[int], None]:
    clock = Clock()
    clock.advance(1_700_000_000)
    store = MemoryStore(clock)
    decide = store.decide
    nkeys = len(keys)

    def run(count: int) -> None:
        for i in range(count):
            decide(algorithm, keys[i % nkeys])
            if i & 1023 == 0:
                clock.advance(0.01)

    return run


def stage(algorithm_name: str, nkeys: int) -> Callable[[int], None]:
    """The middleware's per-request work, minus the downstream handler."""
    clock = Clock()
    clock.advance(1_700_000_000)
    config = RateLimitConfig(
        algorithm=algorithm_name,
        requests_per_minute=600,
        burst_size=100,
        tiers=(
            {"role": "admin", "requests_per_minute": 1000, "burst_size": 100},
            {"role": "premium", "requests_per_minute": 300, "burst_size": 50},
        ),
    )
    store = MemoryStore(clock)
    limiter = RateLimit("users-api", config, key_function("consumer"), store)
    contexts = []
    for i in range(nkeys):
        ctx = RequestContext(b"GET", "/api/users/1", b"", [(b"host", b"api")], client_ip="192.0.2.1")
        ctx.identity = Identity(f"consumer-{i}", roles=frozenset({"premium"}))
        contexts.append(ctx)
    policy_for = limiter.policy
    key_of = key_function("consumer")
    decide = store.decide

    def run(count: int) -> None:
        for i in range(count):
            ctx = contexts[i % nkeys]
            policy = policy_for(ctx.identity)
            decision = decide(policy.algorithm, policy.prefix + key_of(ctx))
            policy.headers(decision)
            if i & 1023 == 0:
                clock.advance(0.01)

    return run


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def redis_numbers(count: int, nkeys: int) -> tuple[float, float, float] | None:
    server = shutil.which("redis-server")
    if server is None:
        print("redis: skipped (redis-server not installed)")
        return None
    port = free_port()
    directory = tempfile.mkdtemp(prefix="txgateway-bench-redis-")
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", directory],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        return _run_redis(port, count, nkeys)
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


def _run_redis(port: int, count: int, nkeys: int) -> tuple[float, float, float]:
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, DeferredList

    from txgateway.ratelimit.redis import RedisStore

    store = RedisStore(f"redis://127.0.0.1:{port}/0", reactor)
    bucket = TokenBucket(6000, 1000)
    keys = [f"bench:{i}" for i in range(nkeys)]
    results: dict[str, float] = {}

    async def measure() -> None:
        await store.decide(bucket, "warm-up", 5.0)  # connects, loads the script
        started = time.perf_counter()
        for i in range(count):
            await store.decide(bucket, keys[i % nkeys], 5.0)
        results["sequential"] = (time.perf_counter() - started) / count * 1e6
        window = 200
        started, cpu_started = time.perf_counter(), time.process_time()
        for offset in range(0, count, window):
            batch = [store.decide(bucket, keys[(offset + j) % nkeys], 5.0) for j in range(min(window, count - offset))]
            await DeferredList(batch, fireOnOneErrback=True, consumeErrors=True)
        results["concurrent"] = (time.perf_counter() - started) / count * 1e6
        results["concurrent_cpu"] = (time.process_time() - cpu_started) / count * 1e6

    async def measure_and_stop() -> None:
        try:
            await measure()
        finally:
            await store.stop()
            reactor.stop()

    Deferred.fromCoroutine(measure_and_stop()).addErrback(lambda failure: failure.printTraceback())
    reactor.run()
    return results["sequential"], results["concurrent"], results["concurrent_cpu"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=200_000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--redis-decisions", type=int, default=20_000)
    parser.add_argument("--no-redis", action="store_true")
    args = parser.parse_args()
    keys = [f"users-api:tb:600:100:default:c:consumer-{i}" for i in range(args.keys)]
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cpus; {args.keys} keys")
    rows = [
        ("memory token_bucket", per_decision(memory(TokenBucket(600, 100), keys), args.decisions)),
        ("memory sliding_window", per_decision(memory(SlidingWindow(600), keys), args.decisions)),
        ("stage token_bucket", per_decision(stage("token_bucket", args.keys), args.decisions)),
        ("stage sliding_window", per_decision(stage("sliding_window", args.keys), args.decisions)),
    ]
    for name, micros in rows:
        print(f"{name:<24} {micros:8.2f} us/decision")
    if not args.no_redis:
        numbers = redis_numbers(args.redis_decisions, args.keys)
        if numbers is not None:
            sequential, concurrent, concurrent_cpu = numbers
            print(f"{'redis sequential':<24} {sequential:8.2f} us/decision (one in flight: latency)")
            print(f"{'redis concurrent':<24} {concurrent:8.2f} us/decision (200 in flight: throughput)")
            print(f"{'redis concurrent, CPU':<24} {concurrent_cpu:8.2f} us/decision (this process's CPU time, not Redis's)")


if __name__ == "__main__":
    main()
