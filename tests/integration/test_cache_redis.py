"""The response cache in a real ``redis-server``: the store's values, TTLs and
Vary records, and two real gateway processes sharing one cache, through a
Redis outage and back.

Each test starts its own ``redis-server`` on a free loopback port (see
:class:`tests.integration.test_ratelimit_redis.RedisServer`; in CI a missing
redis-server fails the tests instead of skipping them) and kills it in its
cleanup.

What is proven here:

- An entry written by one gateway is served by another: one upstream
  request, the second gateway says ``X-Cache: HIT`` with the same bytes
  (HEAD too), and Redis holds the key with a TTL (``PX``) of the route's ttl.
- Redis killed: every request is still answered by the upstream (``MISS``,
  never an error), each gateway logs the outage once; a new redis-server on
  the same port is picked up by itself and hits come back.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
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
    sleep,
)
from tests.integration.test_ratelimit_redis import RedisServer
from txgateway.cache.entry import Entry, PrimaryKey
from txgateway.cache.redis import RedisStore, redis_key

KEY: PrimaryKey = ("api:0123456789ab", b"http", "gateway.test", "/api/thing", b"q=1")


async def wait_connected(store: RedisStore, timeout: float = 10.0) -> None:
    deadline = reactor.seconds() + timeout
    while not store.connected:
        if reactor.seconds() > deadline:
            raise FailTest("the cache store did not connect to Redis")
        await sleep(0.01)


class RedisStoreTests(TestCase):
    """The store a gateway uses, on a real Redis."""

    timeout = 30

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self.set_up())

    async def set_up(self) -> None:
        self.redis = await RedisServer().start()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.redis.stop()))
        self.store = RedisStore(self.redis.url, reactor, timeout=2.0)
        self.addCleanup(self.store.stop)
        await wait_connected(self.store)

    async def test_round_trip_keeps_every_byte_and_sets_a_ttl(self) -> None:
        now = reactor.seconds()
        headers = [(b"content-type", b"application/octet-stream"), (b"x-latin", b"caf\xe9"), (b"x-a", b"1")]
        entry = Entry(203, headers, bytes(range(256)) * 4, now - 3, now + 57)
        self.store.store(KEY, entry, now)
        found = await self.store.lookup(KEY, [], reactor.seconds())
        assert found is not None
        self.assertEqual(
            (found.status, found.headers, found.body, found.born, found.expires),
            (203, headers, entry.body, entry.born, entry.expires),
        )
        ttl = int(await self.redis.cli("PTTL", redis_key(KEY).decode("ascii")))
        self.assertTrue(50_000 < ttl <= 57_000, ttl)

    async def test_expiry_and_invalidation(self) -> None:
        now = reactor.seconds()
        self.store.store(KEY, Entry(200, [], b"short", now, now + 0.2), now)
        self.assertIsNotNone(await self.store.lookup(KEY, [], reactor.seconds()))
        await sleep(0.3)
        self.assertIsNone(await self.store.lookup(KEY, [], reactor.seconds()))
        self.assertEqual(await self.redis.cli("EXISTS", redis_key(KEY).decode("ascii")), "0")
        self.store.store(KEY, Entry(200, [], b"long", now, now + 60), now)
        self.store.invalidate(KEY)
        self.assertIsNone(await self.store.lookup(KEY, [], reactor.seconds()))

    async def test_variants(self) -> None:
        now = reactor.seconds()
        for value in (b"gzip", b"br"):
            entry = Entry(200, [(b"vary", b"accept-encoding")], value, now, now + 60, (b"accept-encoding",), (value,))
            self.store.store(KEY, entry, now)
        for value in (b"gzip", b"br"):
            found = await self.store.lookup(KEY, [(b"accept-encoding", value)], reactor.seconds())
            self.assertEqual(found.body if found else None, value)
        self.assertIsNone(await self.store.lookup(KEY, [(b"accept-encoding", b"zstd")], reactor.seconds()))
        self.assertIsNone(await self.store.lookup(KEY, [], reactor.seconds()))

    async def test_foreign_values_are_misses(self) -> None:
        await self.redis.cli("SET", redis_key(KEY).decode("ascii"), "not a cache entry")
        self.assertIsNone(await self.store.lookup(KEY, [], reactor.seconds()))


async def get(port: int, path: str, method: str = "GET", timeout: float = 10.0) -> RawResponse:
    client = await connect(port, timeout=timeout)
    try:
        client.send(f"{method} {path} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n".encode())
        data = await client.wait_closed(timeout)
    finally:
        await client.abort()
    if method == "HEAD":
        from tests.test_cache_support import parse_reply

        reply = parse_reply(data, head_only=True)
        assert reply is not None
        return RawResponse(b"HTTP/1.1", reply.status, b"", reply.headers, b"")
    [response] = parse_responses(data, until_close=True)
    return response


def gateway_config(upstream_port: int, redis_url: str) -> dict[str, Any]:
    return {
        "upstreams": {"app": {"servers": [{"address": f"{LOCALHOST}:{upstream_port}"}]}},
        "routes": [{"name": "api", "match": {"path": "/api/*"}, "upstream": "app", "cache": {"ttl": 60}}],
        "middleware": {"cache": {"storage": "redis", "redis": {"url": redis_url, "timeout": 1.0}}},
    }


class TwoGatewaysTests(TestCase):
    """Two ``twistd -n txgateway`` processes sharing one cache in Redis."""

    timeout = 60

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self.set_up())

    async def set_up(self) -> None:
        self.redis = await RedisServer().start()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.redis.stop()))
        self.upstream = EchoUpstream()
        upstream_port = self.upstream.listen(free_port())
        self.addCleanup(self.upstream.stop)
        self.gateways = [GatewayProcess(gateway_config(upstream_port, self.redis.url)) for _ in range(2)]
        for gateway in self.gateways:
            self.addCleanup(gateway.stop)
        await Deferred.fromCoroutine(self._start())
        self.addCleanup(self.check_logs)

    async def _start(self) -> None:
        for gateway in self.gateways:
            await gateway.start()
        # Both connected to Redis: what one stores the other serves.
        await self.until_shared("/api/warm-up")

    async def until_shared(self, path: str, timeout: float = 15.0) -> None:
        first, second = (g.port for g in self.gateways)
        deadline = reactor.seconds() + timeout
        while True:
            await get(first, path)
            if (await get(second, path)).header(b"x-cache") == b"HIT":
                return
            if reactor.seconds() > deadline:
                raise FailTest(f"{path} never came back from the shared cache")
            await sleep(0.1)

    def check_logs(self) -> None:
        for gateway in self.gateways:
            log = gateway.log()
            if "Traceback (most recent call last)" in log or "Unhandled error" in log:
                raise FailTest(f"a gateway logged an error:\n{log}")

    def outage_lines(self, gateway: GatewayProcess) -> tuple[int, int]:
        lines = [line for line in gateway.log().splitlines() if "Cache storage" in line]
        return sum("unavailable" in line for line in lines), sum("available again" in line for line in lines)

    def upstream_calls(self, path: str) -> int:
        return sum(1 for request in self.upstream.requests if request.path == path)

    async def test_one_gateway_stores_the_other_serves(self) -> None:
        first, second = (g.port for g in self.gateways)
        miss = await get(first, "/api/item?x=1")
        hit = await get(second, "/api/item?x=1")
        self.assertEqual((miss.status, miss.header(b"x-cache")), (200, b"MISS"))
        self.assertEqual((hit.status, hit.header(b"x-cache"), hit.body), (200, b"HIT", miss.body))
        self.assertEqual(hit.header(b"content-type"), b"application/json")
        self.assertNotEqual(hit.header(b"x-request-id"), miss.header(b"x-request-id"))
        head = await get(first, "/api/item?x=1", "HEAD")
        self.assertEqual((head.header(b"x-cache"), head.header(b"content-length")), (b"HIT", b"%d" % len(miss.body)))
        self.assertEqual(self.upstream_calls("/api/item"), 1)
        keys = (await self.redis.cli("KEYS", "txgateway:cache:*")).splitlines()
        self.assertEqual(len(keys), 2)  # the warm-up and this one
        ttls = [int(await self.redis.cli("PTTL", key)) for key in keys]
        self.assertTrue(all(0 < ttl <= 60_000 for ttl in ttls), ttls)

    async def test_redis_outage_is_a_miss_and_recovers(self) -> None:
        first, second = (g.port for g in self.gateways)
        await get(first, "/api/before")
        await self.redis.kill()
        replies = [await get(port, "/api/during") for port in (first, second, first, second)]
        self.assertEqual([(r.status, r.header(b"x-cache")) for r in replies], [(200, b"MISS")] * 4)
        self.assertEqual(self.upstream_calls("/api/during"), 4)
        self.assertEqual((await get(second, "/api/before")).header(b"x-cache"), b"MISS")
        self.assertEqual([self.outage_lines(g)[0] for g in self.gateways], [1, 1])

        self.redis = await RedisServer(self.redis.port).start()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.redis.stop()))
        await self.until_shared("/api/after")
        self.assertEqual([self.outage_lines(g) for g in self.gateways], [(1, 1), (1, 1)])
