"""The memory store: LRU bounded by bytes (headers and body counted), expired
entries dropped lazily and first under pressure, Vary indexes kept with
their variants; and the same bound seen through the gateway."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.test_cache_support import CacheGateway, ScriptedUpstream, answer
from txgateway.cache.entry import ENTRY_OVERHEAD, HEADER_OVERHEAD, Entry, PrimaryKey
from txgateway.cache.memory import MemoryStore


def key(path: str) -> PrimaryKey:
    return ("route", b"http", "host", path, b"")


def entry(size: int, expires: float = 100.0, headers: list[tuple[bytes, bytes]] | None = None, **vary: object) -> Entry:
    """An entry charged exactly ``size`` bytes (without headers)."""
    return Entry(200, headers or [], b"x" * (size - ENTRY_OVERHEAD), 0.0, expires, **vary)  # type: ignore[arg-type]


class SizeTests(SynchronousTestCase):
    def test_headers_and_body_are_counted(self) -> None:
        stored = Entry(200, [(b"content-type", b"text/plain")], b"12345", 0.0, 10.0)
        self.assertEqual(stored.size, ENTRY_OVERHEAD + 5 + len(b"content-type") + len(b"text/plain") + HEADER_OVERHEAD)
        store = MemoryStore(10_000)
        store.store(key("/a"), stored, 0.0)
        self.assertEqual(store.size, stored.size)

    def test_entry_bigger_than_the_store_is_refused(self) -> None:
        store = MemoryStore(1000)
        store.store(key("/big"), entry(1001), 0.0)
        self.assertEqual((len(store), store.size), (0, 0))
        self.assertIsNone(store.lookup(key("/big"), [], 0.0))

    def test_replacing_an_entry_recharges_it(self) -> None:
        store = MemoryStore(10_000)
        store.store(key("/a"), entry(1000), 0.0)
        store.store(key("/a"), entry(2000), 0.0)
        self.assertEqual((len(store), store.size), (1, 2000))


class LRUTests(SynchronousTestCase):
    def test_least_recently_used_goes_first(self) -> None:
        store = MemoryStore(3000)
        for path in ("/a", "/b", "/c"):
            store.store(key(path), entry(1000), 0.0)
        self.assertIsNotNone(store.lookup(key("/a"), [], 1.0))  # /b is now the oldest use
        store.store(key("/d"), entry(1000), 1.0)
        self.assertIsNone(store.lookup(key("/b"), [], 1.0))
        for path in ("/a", "/c", "/d"):
            self.assertIsNotNone(store.lookup(key(path), [], 1.0), path)
        self.assertEqual(store.size, 3000)

    def test_a_big_entry_evicts_as_many_as_needed(self) -> None:
        store = MemoryStore(3000)
        for path in ("/a", "/b", "/c"):
            store.store(key(path), entry(1000), 0.0)
        store.store(key("/big"), entry(2500), 0.0)
        self.assertEqual([p for p in ("/a", "/b", "/c", "/big") if store.lookup(key(p), [], 0.0)], ["/big"])
        self.assertEqual(store.size, 2500)

    def test_expired_entries_go_before_fresh_ones(self) -> None:
        store = MemoryStore(3000)
        store.store(key("/fresh-old"), entry(1000, expires=100.0), 0.0)
        store.store(key("/short"), entry(1000, expires=5.0), 0.0)
        store.store(key("/fresh"), entry(1000, expires=100.0), 0.0)
        # At t=10 /short is expired; it goes although /fresh-old is least recently used.
        store.store(key("/new"), entry(1000), 10.0)
        self.assertIsNotNone(store.lookup(key("/fresh-old"), [], 10.0))
        self.assertIsNotNone(store.lookup(key("/fresh"), [], 10.0))
        self.assertEqual(store.size, 3000)

    def test_expired_entry_is_dropped_on_lookup(self) -> None:
        store = MemoryStore(3000)
        store.store(key("/a"), entry(1000, expires=5.0), 0.0)
        self.assertIsNotNone(store.lookup(key("/a"), [], 4.999))
        self.assertIsNone(store.lookup(key("/a"), [], 5.0))
        self.assertEqual((len(store), store.size), (0, 0))

    def test_resize_evicts(self) -> None:
        store = MemoryStore(3000)
        for path in ("/a", "/b", "/c"):
            store.store(key(path), entry(1000), 0.0)
        store.resize(2000, 0.0)
        self.assertEqual((len(store), store.size), (2, 2000))
        self.assertIsNone(store.lookup(key("/a"), [], 0.0))

    def test_invalidate(self) -> None:
        store = MemoryStore(3000)
        store.store(key("/a"), entry(1000), 0.0)
        store.invalidate(key("/a"))
        store.invalidate(key("/never"))
        self.assertEqual((len(store), store.size), (0, 0))


class VaryStoreTests(SynchronousTestCase):
    def variant(self, value: bytes, size: int = 1000) -> Entry:
        return entry(size, vary=(b"accept",), variant=(value,))

    def test_variants_share_a_primary_key(self) -> None:
        store = MemoryStore(10_000)
        store.store(key("/a"), self.variant(b"x"), 0.0)
        store.store(key("/a"), self.variant(b"y"), 0.0)
        found = store.lookup(key("/a"), [(b"accept", b"y")], 0.0)
        self.assertEqual(found.variant if found else None, (b"y",))
        self.assertIsNone(store.lookup(key("/a"), [(b"accept", b"z")], 0.0))
        self.assertIsNone(store.lookup(key("/a"), [], 0.0))
        self.assertEqual(len(store), 2)

    def test_last_variant_gone_takes_the_index(self) -> None:
        store = MemoryStore(10_000)
        store.store(key("/a"), self.variant(b"x"), 0.0)
        store.invalidate(key("/a"))
        self.assertEqual((len(store), store.size), (0, 0))
        store.store(key("/b"), entry(1000, expires=5.0, vary=(b"accept",), variant=(b"x",)), 0.0)
        self.assertIsNone(store.lookup(key("/b"), [(b"accept", b"x")], 5.0))
        self.assertEqual((len(store), store.size), (0, 0))

    def test_plain_entry_replaces_variants(self) -> None:
        store = MemoryStore(10_000)
        store.store(key("/a"), self.variant(b"x"), 0.0)
        store.store(key("/a"), self.variant(b"y"), 0.0)
        store.store(key("/a"), entry(1000), 0.0)
        self.assertEqual((len(store), store.size), (1, 1000))
        self.assertIsNotNone(store.lookup(key("/a"), [(b"accept", b"x")], 0.0))

    def test_evicting_variants_keeps_the_books_straight(self) -> None:
        store = MemoryStore(3000)
        for value in (b"1", b"2", b"3", b"4", b"5"):
            store.store(key("/a"), self.variant(value, 900), 0.0)
        self.assertLessEqual(store.size, 3000)
        self.assertIsNotNone(store.lookup(key("/a"), [(b"accept", b"5")], 0.0))
        self.assertIsNone(store.lookup(key("/a"), [(b"accept", b"1")], 0.0))
        store.invalidate(key("/a"))
        self.assertEqual((len(store), store.size), (0, 0))


CONFIG = """
upstreams:
  app: {servers: ["10.1.1.1:9001"]}
routes:
  - name: api
    match: {path: "/api/*"}
    upstream: app
middleware:
  cache: {enabled: true, max_bytes: %d, max_object_bytes: 1000}
"""


class GatewayBoundTests(SynchronousTestCase):
    """``middleware.cache.max_bytes`` through the gateway: the least recently used URL is fetched again."""

    def test_lru_by_bytes(self) -> None:
        upstream = ScriptedUpstream(lambda request: answer(body=b"x" * 600))
        # Each entry is charged 990 bytes (600 of body, two headers, overhead): room for three, not four.
        gateway = CacheGateway(CONFIG % 3500, upstream)
        for path in ("/api/a", "/api/b", "/api/c"):
            gateway.get(path)
        self.assertEqual(gateway.get("/api/a").header("x-cache"), "HIT")
        gateway.get("/api/d")
        self.assertEqual(
            [gateway.get(p).header("x-cache") for p in ("/api/a", "/api/c", "/api/d")], ["HIT", "HIT", "HIT"]
        )
        self.assertEqual(gateway.get("/api/b").header("x-cache"), "MISS")
        self.assertEqual(len(upstream.requests), 5)

    def test_store_survives_a_reload_and_is_resized(self) -> None:
        upstream = ScriptedUpstream(lambda request: answer(body=b"x" * 600))
        gateway = CacheGateway(CONFIG % 3500, upstream)
        gateway.get("/api/a")
        gateway.get("/api/b")
        gateway.load(CONFIG % 1500)
        self.assertEqual(gateway.get("/api/b").header("x-cache"), "HIT")
        self.assertEqual(gateway.get("/api/a").header("x-cache"), "MISS")
