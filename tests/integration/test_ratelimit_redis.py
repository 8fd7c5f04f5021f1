"""Shared rate limits against a real ``redis-server``: the Lua scripts, and two
real gateway processes sharing one Redis.

Each test starts its own ``redis-server --port FREE --bind 127.0.0.1 --save ''
--appendonly no`` (Debian package; ``make test`` installs it) and always
kills it in its cleanup.  The gateways are real ``twistd -n txgateway``
processes (:class:`tests.integration.harness.GatewayProcess`) in front of an
echo upstream in this process.

What is proven here:

- 1,000 concurrent requests spread over two gateways against a limit of 100
  admit exactly 100 (and every admitted request saw a different
  ``RateLimit-Remaining``: each decision was atomic in Redis).
- Redis killed while requests are in flight and afterwards: each route does
  what its ``on_storage_error`` says (allow / deny / local), the outage is
  logged once per gateway, and a new redis-server on the same port is picked
  up again by itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import FailTest, TestCase

from tests.integration.harness import (
    LOCALHOST,
    EchoUpstream,
    GatewayProcess,
    RawResponse,
    connect,
    free_port,
    parse_responses,
    reactor,
    run,
    sleep,
)
from tests.tools import missing
from txgateway.ratelimit.decision import Decision
from txgateway.ratelimit.redis import KEY_PREFIX, RedisStore
from txgateway.ratelimit.sliding_window import SlidingWindow
from txgateway.ratelimit.token_bucket import TokenBucket

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


class _Ended(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        self.ended.callback(None)


class RedisServer:
    """A throwaway redis-server on a loopback port, output in a log file."""

    def __init__(self, port: int | None = None) -> None:
        if not os.path.exists(REDIS_SERVER):
            raise missing("redis-server is not installed (Debian package redis-server; `make test` installs it)")
        self.port = port or free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="txgateway-redis-"))
        self._process: Any = None
        self._protocol: _Ended | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._protocol is not None and self._protocol.reason is None

    async def start(self, timeout: float = 10.0) -> RedisServer:
        self._protocol = _Ended()
        log_fd = os.open(self.directory / "redis.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", LOCALHOST, "--save", "", "--appendonly", "no",
                "--dir", str(self.directory)]  # fmt: skip
        try:
            self._process = reactor.spawnProcess(
                self._protocol, REDIS_SERVER, args, env={}, childFDs={0: null_fd, 1: log_fd, 2: log_fd}
            )
        finally:
            os.close(log_fd)
            os.close(null_fd)
        deadline = reactor.seconds() + timeout
        while True:
            if not self.running:
                raise FailTest(f"redis-server exited: {self.log()}")
            try:
                client = await connect(self.port, timeout=1.0)
                client.send(b"PING\r\n")
                await client.wait_for(lambda data: b"+PONG" in data, 1.0)
                await client.abort()
                return self
            except Exception:  # noqa: BLE001 - not listening yet
                if reactor.seconds() > deadline:
                    raise FailTest(f"redis-server not up within {timeout}s: {self.log()}") from None
                await sleep(0.02)

    def log(self) -> str:
        try:
            return (self.directory / "redis.log").read_text(errors="replace")
        except OSError:
            return ""

    async def kill(self) -> None:
        """SIGKILL: the abrupt death of the server; returns once it is gone."""
        if self.running and self._protocol is not None:
            self._process.signalProcess(signal.SIGKILL)
            await self._protocol.ended

    async def stop(self) -> None:
        await self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    async def cli(self, *args: str) -> str:
        out, err, code = await run(REDIS_CLI, "-h", LOCALHOST, "-p", str(self.port), *args)
        if code != 0:
            raise FailTest(f"redis-cli {args}: {err!r}")
        return out.decode().strip()


async def get(port: int, path: str, timeout: float = 30.0) -> RawResponse:
    """One request on its own connection (``Connection: close``)."""
    client = await connect(port, timeout=timeout)
    try:
        client.send(f"GET {path} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n".encode())
        data = await client.wait_closed(timeout)
    finally:
        await client.abort()
    [response] = parse_responses(data, until_close=True)
    return response


def concurrently(requests: list[tuple[int, str]]) -> Deferred[list[RawResponse]]:
    return gatherResults([Deferred.fromCoroutine(get(port, path)) for port, path in requests], consumeErrors=True)


class RedisScriptTests(TestCase):
    """The Lua scripts on a real Redis, through the store a gateway uses."""

    timeout = 30

    async def set_up(self) -> None:
        self.redis = await RedisServer().start()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.redis.stop()))
        self.store = self.new_store()

    def new_store(self) -> RedisStore:
        store = RedisStore(self.redis.url, reactor)
        self.addCleanup(store.stop)
        return store

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self.set_up())

    async def decisions(self, algorithm: Any, key: str, count: int, store: RedisStore | None = None) -> list[Decision]:
        results = []
        for _ in range(count):
            results.append(await (store or self.store).decide(algorithm, key, 2.0))
        return results

    async def test_token_bucket(self) -> None:
        decisions = await self.decisions(TokenBucket(requests_per_minute=60, burst_size=5), "tb", 7)
        self.assertEqual([d.allowed for d in decisions], [True] * 5 + [False] * 2)
        self.assertEqual([d.remaining for d in decisions], [4, 3, 2, 1, 0, 0, 0])
        self.assertEqual([d.reset for d in decisions[:5]], [1, 2, 3, 4, 5])
        self.assertEqual(decisions[5].retry_after, 1)
        ttl = int(await self.redis.cli("PTTL", KEY_PREFIX + "tb"))
        self.assertTrue(4000 < ttl <= 6000, ttl)  # until full again, plus a second
        await sleep(1.05)
        [later] = await self.decisions(TokenBucket(60, 5), "tb", 1)
        self.assertTrue(later.allowed)

    async def test_sliding_window(self) -> None:
        decisions = await self.decisions(SlidingWindow(requests_per_minute=5), "sw", 8)
        self.assertEqual([d.allowed for d in decisions], [True] * 5 + [False] * 3)
        self.assertEqual([d.remaining for d in decisions[:5]], [4, 3, 2, 1, 0])
        self.assertTrue(all(60 < d.reset <= 120 for d in decisions), decisions)
        self.assertTrue(all(d.retry_after >= 1 for d in decisions[5:]), decisions)
        ttl = int(await self.redis.cli("PTTL", KEY_PREFIX + "sw"))
        self.assertTrue(60_000 < ttl <= 121_000, ttl)

    async def test_script_reloaded_after_flush(self) -> None:
        bucket = TokenBucket(60, 10)
        await self.decisions(bucket, "flush", 1)
        self.assertEqual(await self.redis.cli("SCRIPT", "FLUSH"), "OK")
        [after] = await self.decisions(bucket, "flush", 1)
        self.assertEqual(after.remaining, 8)

    async def test_two_connections_admit_exactly_the_limit(self) -> None:
        other = self.new_store()
        bucket = TokenBucket(requests_per_minute=1, burst_size=100)
        await self.decisions(bucket, "warm", 1)
        await self.decisions(bucket, "warm", 1, other)
        calls = [(self.store if i % 2 else other).decide(bucket, "shared", 5.0) for i in range(300)]
        decisions = await gatherResults(calls)
        self.assertEqual(sum(d.allowed for d in decisions), 100)
        self.assertEqual(sorted(d.remaining for d in decisions if d.allowed), list(range(100)))


UPSTREAM = "app"


def gateway_config(upstream_port: int, redis_url: str, listen_port: int, timeout: float) -> dict[str, Any]:
    def route(name: str, **rate_limit: Any) -> dict[str, Any]:
        return {"name": name, "match": {"path": f"/{name}/*"}, "upstream": UPSTREAM, "rate_limit": rate_limit}

    return {
        # A deep accept queue: a thousand clients connect at once.
        "server": {"listen": [f"tcp:{listen_port}:interface={LOCALHOST}:backlog=2048"]},
        "upstreams": {UPSTREAM: {"servers": [{"address": f"{LOCALHOST}:{upstream_port}"}]}},
        "routes": [
            route("shared", requests_per_minute=1, burst_size=100, key="route"),
            route("deny", requests_per_minute=100_000, burst_size=10_000, key="route", on_storage_error="deny"),
            route("allow", requests_per_minute=100_000, burst_size=10_000, key="route", on_storage_error="allow"),
            route("local", requests_per_minute=1, burst_size=3, key="route", on_storage_error="local"),
        ],
        "middleware": {
            "rate_limit": {
                "storage": "redis",
                "redis": {"url": redis_url, "timeout": timeout},
                "on_storage_error": "deny",
            }
        },
    }


class TwoGatewaysTests(TestCase):
    """Two ``twistd -n txgateway`` processes sharing one redis-server."""

    timeout = 60

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self.set_up())

    async def set_up(self) -> None:
        self.redis = await RedisServer().start()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.redis.stop()))
        self.upstream = EchoUpstream()
        upstream_port = self.upstream.listen(free_port())
        self.addCleanup(self.upstream.stop)
        self.ports = [free_port(), free_port()]
        # A generous decision timeout: a thousand requests at once keep each gateway's
        # event loop busy, and a late answer would count as an outage here.
        self.gateways = [
            GatewayProcess(gateway_config(upstream_port, self.redis.url, port, 2.0)) for port in self.ports
        ]
        for gateway in self.gateways:
            self.addCleanup(gateway.stop)
        await gatherResults([gateway.start() for gateway in self.gateways])
        self.addCleanup(self.check_logs)

    def check_logs(self) -> None:
        for gateway in self.gateways:
            log = gateway.log()
            if "Traceback (most recent call last)" in log or "Unhandled error" in log:
                raise FailTest(f"a gateway logged an error:\n{log}")

    def outage_lines(self, gateway: GatewayProcess) -> tuple[int, int]:
        lines = [line for line in gateway.log().splitlines() if "Rate-limit storage" in line]
        return sum("unavailable" in line for line in lines), sum("available again" in line for line in lines)

    async def test_thousand_concurrent_requests_admit_exactly_the_limit(self) -> None:
        started = reactor.seconds()
        responses = await concurrently([(self.ports[i % 2], f"/shared/{i}") for i in range(1000)])
        elapsed = reactor.seconds() - started
        statuses = Counter(r.status for r in responses)
        self.assertEqual(statuses, Counter({200: 100, 429: 900}), f"in {elapsed:.1f}s")
        admitted = [r for r in responses if r.status == 200]
        # Every admitted request saw its own count: the decisions were atomic across both gateways.
        self.assertEqual(sorted(int(r.header(b"ratelimit-remaining") or -1) for r in admitted), list(range(100)))
        self.assertEqual({r.header(b"ratelimit-limit") for r in responses}, {b"100"})
        # Exactly 100 over both gateways proves one shared bucket (split
        # buckets would admit 200); which gateway wins how many tokens is
        # scheduling, so it is not asserted.
        self.assertEqual(len(self.upstream.requests), 100)
        refused = [r for r in responses if r.status == 429]
        self.assertTrue(all(int(r.header(b"retry-after") or 0) >= 1 for r in refused))
        self.assertEqual({r.json()["error"] for r in refused}, {"rate_limited"})
        self.assertEqual([self.outage_lines(g) for g in self.gateways], [(0, 0), (0, 0)])

    async def test_redis_outage_and_recovery(self) -> None:
        both = self.ports
        # Healthy: every route decides in Redis, and /local/ is one shared bucket of 3.
        statuses = [(await get(both[i % 2], "/local/x")).status for i in range(4)]
        self.assertEqual(statuses, [200, 200, 200, 429])
        self.assertIsNotNone((await get(both[0], "/allow/x")).header(b"ratelimit-limit"))

        # Killed with requests in flight: each one is decided by Redis or refused by
        # on_storage_error (deny), none hangs or fails otherwise.
        in_flight = concurrently([(both[i % 2], "/deny/x") for i in range(200)])
        await self.redis.kill()
        self.assertLessEqual({r.status for r in await in_flight}, {200, 503})

        # While Redis is away.
        for port in both:
            denied = await get(port, "/deny/x")
            self.assertEqual((denied.status, denied.json()["error"]), (503, "service_unavailable"))
            self.assertEqual(denied.header(b"retry-after"), b"1")
            allowed = await get(port, "/allow/x")
            self.assertEqual(allowed.status, 200)
            self.assertIsNone(allowed.header(b"ratelimit-limit"))
            # local: each gateway enforces the same policy on its own.
            local = [(await get(port, "/local/x")) for _ in range(4)]
            self.assertEqual([r.status for r in local], [200, 200, 200, 429])
            self.assertEqual([r.header(b"ratelimit-remaining") for r in local], [b"2", b"1", b"0", b"0"])

        # A new redis-server on the same port: the gateways reconnect by themselves.
        self.redis = await RedisServer(self.redis.port).start()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.redis.stop()))
        deadline = reactor.seconds() + 15
        for port in both:
            while (await get(port, "/deny/x")).status != 200:
                if reactor.seconds() > deadline:
                    raise FailTest("the gateways did not use the new Redis within 15 s")
                await sleep(0.1)
        # Shared again (the new server starts empty): 3 admitted between both gateways.
        statuses = [(await get(both[i % 2], "/local/x")).status for i in range(6)]
        self.assertEqual(statuses, [200, 200, 200, 429, 429, 429])

        # One warning when the outage began, one note when it ended, per gateway.
        self.assertEqual([self.outage_lines(g) for g in self.gateways], [(1, 1), (1, 1)])
