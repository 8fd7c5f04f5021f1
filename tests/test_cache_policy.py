"""What the cache stores and for how long, seen from a client of the gateway.

Every rule of :mod:`txgateway.cache.policy` is shown the way a user sees it:
a second identical GET is ``X-Cache: HIT`` (and the upstream saw one request)
or ``MISS`` (and the upstream saw two).  Time is a fake clock, so freshness
edges are exact.  Runs through :class:`txgateway.testing.GatewayHarness`.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.trial.unittest import SynchronousTestCase

from tests.test_cache_support import EPOCH, http_date
from txgateway.cache.policy import CACHEABLE_STATUSES, assess, delta_seconds, parse_directives, vary_names
from txgateway.config import parse_config
from txgateway.testing import GatewayHarness, HarnessResponse, MemoryUpstream, ReceivedRequest

CONFIG = """
upstreams:
  app:
    servers: ["10.1.1.1:9001"]
    retry: {attempts: 1}
routes:
  - name: api
    match: {path: "/api/*"}
    upstream: app
    auth: optional
    cache: {ttl: 30}
  - name: no-ttl
    match: {path: "/zero/*"}
    upstream: app
    cache: {ttl: 0}
middleware:
  auth:
    enabled: false
    api_keys:
      header: X-API-Key
      keys:
        - {sha256: "821d27aab3c9c5701c575821bf3ae676e8dc84083884c46dc6691b9178ceb19b", consumer: bot}
"""

Headers = Sequence[tuple[bytes, bytes]]


class Origin:
    """A gateway whose upstream answers ``status``, ``headers`` and a body naming the request count."""

    def __init__(self, headers: Headers = (), status: int = 200) -> None:
        self.status = status
        self.headers = list(headers)
        self.upstream = MemoryUpstream(self._answer)
        self.harness = GatewayHarness(parse_config(CONFIG), self.upstream)
        self.harness.clock.advance(EPOCH)

    def _answer(self, request: ReceivedRequest) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        body = b"" if self.status == 204 else b"answer %d" % len(self.upstream.requests)
        return self.status, [(b"content-type", b"text/plain"), *self.headers], body

    @property
    def calls(self) -> int:
        return len(self.upstream.requests)

    def get(self, target: str = "/api/thing", headers: Sequence[tuple[str, str]] = ()) -> HarnessResponse:
        return self.harness.request("GET", target, headers)

    def advance(self, seconds: float) -> None:
        self.harness.clock.advance(seconds)


class CacheCase(SynchronousTestCase):
    def assertStored(self, origin: Origin, target: str = "/api/thing") -> None:
        first = origin.get(target)
        second = origin.get(target)
        self.assertEqual(first.header("x-cache"), "MISS")
        self.assertEqual((second.header("x-cache"), second.status, second.body), ("HIT", first.status, first.body))
        self.assertEqual(origin.calls, 1)

    def assertNotStored(self, origin: Origin, target: str = "/api/thing") -> None:
        first = origin.get(target)
        second = origin.get(target)
        self.assertEqual((first.header("x-cache"), second.header("x-cache")), ("MISS", "MISS"))
        self.assertEqual(origin.calls, 2)


class StatusTests(CacheCase):
    def test_cacheable_statuses_are_stored(self) -> None:
        self.assertEqual(CACHEABLE_STATUSES, {200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
        for status in sorted(CACHEABLE_STATUSES):
            with self.subTest(status=status):
                self.assertStored(Origin(status=status))

    def test_other_statuses_are_not_stored(self) -> None:
        for status in (201, 202, 206, 302, 303, 307, 400, 401, 403, 409, 429, 500):
            with self.subTest(status=status):
                self.assertNotStored(Origin([(b"cache-control", b"max-age=60")], status=status))


class ResponseDirectiveTests(CacheCase):
    def test_never_stored(self) -> None:
        for headers in (
            [(b"cache-control", b"no-store")],
            [(b"cache-control", b"max-age=60, private")],
            [(b"cache-control", b'private="x-user"')],
            [(b"cache-control", b"no-cache")],
            [(b"cache-control", b'no-cache="set-cookie", max-age=60')],
            [(b"cache-control", b"public, max-age=60"), (b"cache-control", b"No-Store")],
            [(b"set-cookie", b"session=1")],
            [(b"content-type", b"text/event-stream; charset=utf-8")],
            [(b"vary", b"*")],
            [(b"vary", b"accept, *")],
        ):
            with self.subTest(headers=headers):
                self.assertNotStored(Origin(headers))

    def test_stored(self) -> None:
        for headers in (
            [],
            [(b"cache-control", b"public")],
            [(b"cache-control", b"max-age=60, must-revalidate")],
            [(b"cache-control", b'max-age="60"')],
            [(b"content-type", b"application/json")],
        ):
            with self.subTest(headers=headers):
                self.assertStored(Origin(headers))

    def test_upstream_x_cache_is_replaced(self) -> None:
        origin = Origin([(b"x-cache", b"HIT from somewhere")])
        self.assertEqual(origin.get().header("x-cache"), "MISS")
        response = origin.get()
        self.assertEqual([v for n, v in response.headers if n == b"x-cache"], [b"HIT"])


class FreshnessTests(CacheCase):
    def assertFreshFor(self, origin: Origin, seconds: float) -> None:
        """Stored now; a hit until just before ``seconds``; a miss at exactly ``seconds``."""
        self.assertEqual(origin.get().header("x-cache"), "MISS")
        origin.advance(seconds - 0.5)
        self.assertEqual(origin.get().header("x-cache"), "HIT")
        origin.advance(0.5)
        self.assertEqual(origin.get().header("x-cache"), "MISS")
        self.assertEqual(origin.calls, 2)

    def test_route_ttl_without_freshness_information(self) -> None:
        self.assertFreshFor(Origin(), 30)

    def test_ttl_boundary_is_exact(self) -> None:
        origin = Origin()
        origin.get()
        origin.advance(29)
        self.assertEqual(origin.get().header("x-cache"), "HIT")
        origin.advance(0.999)
        self.assertEqual(origin.get().header("x-cache"), "HIT")
        origin.harness.clock.advance(EPOCH + 30 - origin.harness.clock.seconds())
        self.assertEqual(origin.harness.clock.seconds(), EPOCH + 30)
        self.assertEqual(origin.get().header("x-cache"), "MISS")

    def test_route_ttl_zero_stores_nothing(self) -> None:
        self.assertNotStored(Origin(), "/zero/thing")

    def test_max_age_beats_route_ttl(self) -> None:
        self.assertFreshFor(Origin([(b"cache-control", b"max-age=5")]), 5)
        self.assertFreshFor(Origin([(b"cache-control", b"max-age=90")]), 90)

    def test_s_maxage_beats_max_age(self) -> None:
        self.assertFreshFor(Origin([(b"cache-control", b"max-age=100, s-maxage=10")]), 10)

    def test_max_age_beats_expires(self) -> None:
        expires = http_date(EPOCH + 100)
        self.assertFreshFor(Origin([(b"expires", expires), (b"cache-control", b"max-age=5")]), 5)

    def test_expires_minus_date(self) -> None:
        # The upstream's clock is 100 s behind ours: only the difference counts.
        origin = Origin([(b"date", http_date(EPOCH - 100)), (b"expires", http_date(EPOCH - 80))])
        self.assertFreshFor(origin, 20)

    def test_expires_without_date_counts_from_now(self) -> None:
        self.assertFreshFor(Origin([(b"expires", http_date(EPOCH + 20))]), 20)

    def test_expired_or_invalid_expires_is_not_stored(self) -> None:
        for value in (http_date(EPOCH - 1), b"0", b"tomorrow"):
            with self.subTest(expires=value):
                self.assertNotStored(Origin([(b"date", http_date(EPOCH)), (b"expires", value)]))

    def test_zero_or_invalid_max_age_is_not_stored(self) -> None:
        for value in (b"max-age=0", b"max-age=abc", b"max-age=-5", b"s-maxage=0, max-age=60"):
            with self.subTest(cache_control=value):
                self.assertNotStored(Origin([(b"cache-control", value)]))

    def test_age_counts_from_the_clock(self) -> None:
        origin = Origin([(b"cache-control", b"max-age=60")])
        self.assertIsNone(origin.get().header("age"))
        self.assertEqual(origin.get().header("age"), "0")
        origin.advance(7.9)
        self.assertEqual(origin.get().header("age"), "7")

    def test_upstream_age_is_subtracted(self) -> None:
        origin = Origin([(b"cache-control", b"max-age=60"), (b"age", b"50")])
        self.assertEqual(origin.get().header("age"), "50")
        origin.advance(3)
        hit = origin.get()
        self.assertEqual((hit.header("x-cache"), hit.header("age")), ("HIT", "53"))
        origin.advance(7)
        self.assertEqual(origin.get().header("x-cache"), "MISS")

    def test_older_than_its_lifetime_is_not_stored(self) -> None:
        self.assertNotStored(Origin([(b"cache-control", b"max-age=60"), (b"age", b"60")]))


class AuthorizationTests(CacheCase):
    def test_authorized_response_is_not_stored(self) -> None:
        origin = Origin([(b"cache-control", b"max-age=60")])
        origin.get(headers=[("authorization", "Bearer abc")])
        self.assertEqual(origin.get().header("x-cache"), "MISS")
        self.assertEqual(origin.calls, 2)

    def test_public_or_s_maxage_allow_storing(self) -> None:
        for value in (b"public", b"s-maxage=60", b"public, max-age=60"):
            with self.subTest(cache_control=value):
                origin = Origin([(b"cache-control", value)])
                origin.get(headers=[("authorization", "Bearer abc")])
                self.assertEqual(origin.get().header("x-cache"), "HIT")
                self.assertEqual(origin.calls, 1)

    def test_api_key_identity_counts_as_authorization(self) -> None:
        # The auth stage consumes X-API-Key before the cache sees the request.
        origin = Origin([(b"cache-control", b"max-age=60")])
        self.assertEqual(origin.get(headers=[("x-api-key", "bot-key-1")]).status, 200)
        self.assertEqual(origin.get().header("x-cache"), "MISS")
        self.assertEqual(origin.calls, 2)

    def test_authorized_request_gets_a_stored_response(self) -> None:
        origin = Origin([(b"cache-control", b"max-age=60")])
        origin.get()
        self.assertEqual(origin.get(headers=[("authorization", "Bearer abc")]).header("x-cache"), "HIT")


class VaryTests(CacheCase):
    def test_variants_by_request_header(self) -> None:
        origin = Origin([(b"vary", b"Accept-Encoding")])
        gzip = [("accept-encoding", "gzip")]
        self.assertEqual(origin.get(headers=gzip).body, b"answer 1")
        self.assertEqual(origin.get(headers=[("accept-encoding", "br")]).body, b"answer 2")
        self.assertEqual(origin.get().body, b"answer 3")
        self.assertEqual(origin.get(headers=[("accept-encoding", "")]).body, b"answer 4")
        for headers, body in ((gzip, b"answer 1"), ([("accept-encoding", "br")], b"answer 2"), ([], b"answer 3")):
            hit = origin.get(headers=headers)
            self.assertEqual((hit.header("x-cache"), hit.body), ("HIT", body))
        self.assertEqual(origin.calls, 4)

    def test_several_vary_headers_and_repeated_values(self) -> None:
        origin = Origin([(b"vary", b"accept"), (b"vary", b"X-Tenant, accept-language")])
        headers = [("accept", "a/b"), ("x-tenant", "t1"), ("accept-language", "en")]
        origin.get(headers=headers)
        self.assertEqual(origin.get(headers=list(reversed(headers))).header("x-cache"), "HIT")
        self.assertEqual(origin.get(headers=[*headers[:2], ("accept-language", "de")]).header("x-cache"), "MISS")
        self.assertEqual(origin.get(headers=[("accept", "a/b"), ("x-tenant", "t1")]).header("x-cache"), "MISS")

    def test_new_vary_replaces_the_old_variants(self) -> None:
        origin = Origin([(b"vary", b"accept")])
        origin.get(headers=[("accept", "a")])
        origin.headers = [(b"vary", b"x-tenant")]
        origin.get(headers=[("accept", "a"), ("cache-control", "no-cache")])
        self.assertEqual(origin.get(headers=[("accept", "a")]).body, b"answer 2")
        self.assertEqual(origin.get(headers=[("accept", "b")]).header("x-cache"), "HIT")
        self.assertEqual(origin.get(headers=[("x-tenant", "t")]).header("x-cache"), "MISS")

    def test_vary_on_the_url_is_per_url(self) -> None:
        origin = Origin([(b"vary", b"accept")])
        origin.get("/api/a", [("accept", "x")])
        self.assertEqual(origin.get("/api/b", [("accept", "x")]).header("x-cache"), "MISS")
        self.assertEqual(origin.get("/api/a?q=1", [("accept", "x")]).header("x-cache"), "MISS")
        self.assertEqual(origin.get("/api/a", [("accept", "x")]).header("x-cache"), "HIT")


class ParsingTests(SynchronousTestCase):
    """Edges of the header grammar the rules above rest on."""

    def test_directives(self) -> None:
        parsed = parse_directives([b'Max-Age=60, no-cache="Set-Cookie, X-A"', b"max-age=10, PUBLIC"])
        self.assertEqual(parsed[b"max-age"], b"60")
        self.assertIn(b"public", parsed)
        self.assertIn(b"no-cache", parsed)

    def test_delta_seconds(self) -> None:
        self.assertEqual(delta_seconds(b"10"), 10)
        self.assertEqual(delta_seconds(b"99999999999"), 2**31)
        for bad in (None, b"", b"-1", b"1.5", b"ten"):
            self.assertIsNone(delta_seconds(bad))

    def test_vary_names(self) -> None:
        self.assertEqual(vary_names([b"Accept, accept-encoding", b" X-A ,,"]), (b"accept", b"accept-encoding", b"x-a"))
        self.assertIsNone(vary_names([b"accept", b"*"]))

    def test_lifetime_from_expires_in_other_date_formats(self) -> None:
        for expires in (b"Sunday, 06-Nov-94 08:49:37 GMT", b"Sun Nov  6 08:49:37 1994"):
            verdict = assess(200, [(b"date", b"Sun, 06 Nov 1994 08:49:17 GMT"), (b"expires", expires)], False, 0, 30)
            assert verdict is not None
            self.assertEqual(verdict.lifetime, 20)
