"""The Redis cache store on a fake wire (MemoryReactorClock + StringTransport):
the commands it sends, and that Redis being away, slow or odd is only ever a
miss, logged once per outage.  The real thing: tests/integration/test_cache_redis.py.
"""

from __future__ import annotations

from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.test_cache_support import CacheGateway, ScriptedUpstream, answer
from tests.test_ratelimit_redis import FakeRedis
from txgateway.cache.entry import Entry, PrimaryKey
from txgateway.cache.redis import (
    RedisStore,
    decode_entry,
    decode_index,
    encode_entry,
    encode_index,
    redis_key,
    variant_key,
)
from txgateway.runtime import Runtime

KEY: PrimaryKey = ("api:abc", b"http", "gateway.test", "/api/a", b"x=1")


def commands(server: FakeRedis) -> list[list[bytes]]:
    """The RESP arrays the store sent, as raw bytes."""
    assert server.transport is not None
    data = server.transport.value()
    server.transport.clear()
    out = []
    while data:
        head, _, data = data.partition(b"\r\n")
        args = []
        for _ in range(int(head[1:])):
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line[1:])
            args.append(data[:size])
            data = data[size + 2 :]
        out.append(args)
    return out


def bulk(value: bytes | None) -> bytes:
    return b"$-1\r\n" if value is None else b"$%d\r\n%s\r\n" % (len(value), value)


class EncodingTests(SynchronousTestCase):
    def test_entry_round_trip(self) -> None:
        entry = Entry(404, [(b"x-a", b"\xe9\x00")], b"\x00\xff", 1.5, 61.5, (b"accept",), (None,))
        decoded = decode_entry(encode_entry(entry))
        assert decoded is not None
        self.assertEqual(
            (decoded.status, decoded.headers, decoded.body, decoded.born, decoded.expires, decoded.vary),
            (404, entry.headers, entry.body, 1.5, 61.5, (b"accept",)),
        )
        self.assertEqual(decoded.variant, (None,))

    def test_index_round_trip_and_garbage(self) -> None:
        self.assertEqual(decode_index(encode_index((b"accept", b"x-tenant"))), (b"accept", b"x-tenant"))
        for garbage in (b"", b"txc1E", b"txc1E\x00\x00\x00\x05{bad", b"hello", encode_index(())):
            self.assertIsNone(decode_entry(garbage))
            self.assertIsNone(decode_index(garbage))

    def test_keys_are_unambiguous(self) -> None:
        # A Host header cannot make one URL's key look like another's.
        self.assertNotEqual(
            redis_key(("r", b"http", "a|/b", "/c", b"")),
            redis_key(("r", b"http", "a", "/b|/c", b"")),
        )
        primary = redis_key(KEY)
        self.assertNotEqual(variant_key(primary, (None,)), variant_key(primary, (b"",)))


class StoreTests(SynchronousTestCase):
    url = "redis://127.0.0.1:6391"

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        self.store = RedisStore(self.url, self.reactor, timeout=0.05)
        self.reactor.run()

    def tearDown(self) -> None:
        self.store.stop()
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def connected(self) -> FakeRedis:
        server = FakeRedis(self.reactor, -1).accept()
        self.assertTrue(self.store.connected)
        return server

    def logs(self) -> list[tuple[LogLevel, str]]:
        return [
            (event["log_level"], event["log_format"].split(" ", 3)[3])
            for event in self.events
            if event.get("log_namespace") == "txgateway.cache.redis.RedisStore"
        ]

    def test_commands(self) -> None:
        server = self.connected()
        entry = Entry(200, [(b"content-type", b"text/plain")], b"body", 100.0, 130.0)
        self.store.store(KEY, entry, 100.0)
        [[command, key, value, px, ttl]] = commands(server)
        self.assertEqual((command, key, px, ttl), (b"SET", redis_key(KEY), b"PX", b"30000"))
        self.assertEqual(value, encode_entry(entry))
        server.reply(b"+OK\r\n")
        self.store.invalidate(KEY)
        self.assertEqual(commands(server), [[b"DEL", redis_key(KEY)]])
        server.reply(b":1\r\n")
        found = self.store.lookup(KEY, [], 110.0)
        self.assertEqual(commands(server), [[b"GET", redis_key(KEY)]])
        server.reply(bulk(value))
        hit = self.successResultOf(found)
        self.assertEqual(hit.body if hit else None, b"body")
        stale = self.store.lookup(KEY, [], 130.0)
        server.reply(bulk(value))
        self.assertIsNone(self.successResultOf(stale))

    def test_vary_writes_an_index_and_a_variant(self) -> None:
        server = self.connected()
        entry = Entry(200, [], b"gz", 0.0, 10.0, (b"accept-encoding",), (b"gzip",))
        self.store.store(KEY, entry, 0.0)
        index, variant = commands(server)
        primary = redis_key(KEY)
        self.assertEqual(index, [b"SET", primary, encode_index((b"accept-encoding",)), b"PX", b"10000"])
        self.assertEqual(variant[:2], [b"SET", variant_key(primary, (b"gzip",))])
        server.reply(b"+OK\r\n+OK\r\n")
        found = self.store.lookup(KEY, [(b"accept-encoding", b"gzip")], 1.0)
        server.reply(bulk(index[2]))
        self.assertEqual(commands(server), [[b"GET", primary], [b"GET", variant_key(primary, (b"gzip",))]])
        server.reply(bulk(variant[2]))
        hit = self.successResultOf(found)
        self.assertEqual(hit.body if hit else None, b"gz")

    def test_before_the_first_connection_a_lookup_is_a_quiet_miss(self) -> None:
        self.assertIsNone(self.successResultOf(self.store.lookup(KEY, [], 0.0)))
        self.store.store(KEY, Entry(200, [], b"", 0.0, 10.0), 0.0)
        self.assertEqual(self.logs(), [])

    def test_outage_is_a_miss_logged_once(self) -> None:
        server = self.connected()
        server.drop()
        for _ in range(5):
            self.assertIsNone(self.successResultOf(self.store.lookup(KEY, [], 0.0)))
            self.store.store(KEY, Entry(200, [], b"", 0.0, 10.0), 0.0)
        self.reactor.advance(0.2)
        FakeRedis(self.reactor, -1).refuse()
        self.reactor.advance(0.5)
        self.connected()
        self.assertEqual(
            self.logs(),
            [
                (LogLevel.warn, "unavailable ({reason}); requests go to the upstream until it recovers"),
                (LogLevel.info, "available again after {seconds:.1f} s ({failures} operations failed)"),
            ],
        )

    def test_no_answer_in_time_is_a_miss(self) -> None:
        server = self.connected()
        found = self.store.lookup(KEY, [], 0.0)
        self.reactor.advance(0.05)
        self.assertIsNone(self.successResultOf(found))
        server.reply(bulk(None))  # the late answer changes nothing
        self.assertEqual(len(self.logs()), 1)

    def test_error_reply_is_a_miss(self) -> None:
        server = self.connected()
        found = self.store.lookup(KEY, [], 0.0)
        server.reply(b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n")
        self.assertIsNone(self.successResultOf(found))

    def test_wedged_connection_is_aborted(self) -> None:
        server = self.connected()
        for _ in range(30):
            self.store.lookup(KEY, [], 0.0)
            self.reactor.advance(0.05)
        assert server.transport is not None
        self.assertTrue(server.transport.disconnected)
        self.assertFalse(self.store.connected)


CONFIG = """
upstreams:
  app: {servers: ["10.1.1.1:9001"]}
routes:
  - name: api
    match: {path: "/api/*"}
    upstream: app
    cache: {ttl: 60}
middleware:
  cache: {storage: redis, redis: {url: "redis://127.0.0.1:6392/0", timeout: 0.1}}
"""


class GatewayOnRedisTests(SynchronousTestCase):
    """The stage with ``storage: redis``: lookups answered later, failures are misses."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.run()
        self.upstream = ScriptedUpstream(lambda request: answer(body=b"from upstream"))
        self.gateway = CacheGateway(CONFIG, self.upstream, Runtime(self.reactor, self.reactor))

    def tearDown(self) -> None:
        self.gateway.runtime.stop()

    def test_miss_store_hit(self) -> None:
        server = FakeRedis(self.reactor, -1).accept()
        server.reply(b"+OK\r\n")  # SELECT 0
        commands(server)
        client = self.gateway.open("GET", "/api/a")
        self.assertIsNone(client.reply)
        [[command, key]] = commands(server)
        self.assertEqual(command, b"GET")
        server.reply(bulk(None))
        self.assertEqual(client.response().header("x-cache"), "MISS")
        [[command, stored_key, value, _, ttl]] = commands(server)
        self.assertEqual((command, stored_key, ttl), (b"SET", key, b"60000"))
        server.reply(b"+OK\r\n")
        again = self.gateway.open("GET", "/api/a")
        commands(server)
        server.reply(bulk(value))
        reply = again.response()
        self.assertEqual((reply.header("x-cache"), reply.body), ("HIT", b"from upstream"))
        self.assertEqual(len(self.upstream.requests), 1)

    def test_redis_down_is_a_miss_never_an_error(self) -> None:
        FakeRedis(self.reactor, -1).refuse()
        for _ in range(3):
            reply = self.gateway.get("/api/a")
            self.assertEqual((reply.status, reply.header("x-cache"), reply.body), (200, "MISS", b"from upstream"))
        self.assertEqual(len(self.upstream.requests), 3)

    def test_slow_redis_is_a_miss_after_the_timeout(self) -> None:
        FakeRedis(self.reactor, -1).accept().reply(b"+OK\r\n")
        client = self.gateway.open("GET", "/api/a")
        self.assertIsNone(client.reply)
        self.reactor.advance(0.1)
        self.assertEqual(client.response().header("x-cache"), "MISS")

    def test_client_gone_during_the_lookup_sends_nothing_upstream(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        FakeRedis(self.reactor, -1).accept().reply(b"+OK\r\n")
        client = self.gateway.open("GET", "/api/a")
        client.disconnect()
        self.reactor.advance(0.1)
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual([e for e in events if e["log_level"] >= LogLevel.warn], [])
