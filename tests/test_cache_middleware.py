"""The cache stage through the real gateway in memory: X-Cache on every
response, which routes cache, request directives, HEAD from GET, streaming
with the tee, max_object_bytes, disconnects, coalescing and invalidation."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall
from twisted.trial.unittest import SynchronousTestCase

from tests.test_cache_support import CacheGateway, ClientConnection, ScriptedUpstream, StreamedBody, answer
from txgateway.cache.middleware import COALESCE_TIMEOUT
from txgateway.errors import UpstreamConnectError
from txgateway.messages import Response, UpstreamRequest
from txgateway.protocols.http1 import HTTP11ServerFactory, HTTP11ServerProtocol

ROUTES = """
upstreams:
  app:
    servers: ["10.1.1.1:9001"]
    retry: {attempts: 1}
routes:
  - name: api
    match: {path: "/api/*"}
    upstream: app
    cache: {ttl: 60}
  - name: plain
    match: {path: "/plain/*"}
    upstream: app
middleware:
  cache: {max_bytes: 1MiB, max_object_bytes: 100}
"""


def counting(upstream_answer: Response | None = None) -> ScriptedUpstream:
    """An upstream answering ``answer N`` for its N-th request."""
    upstream = ScriptedUpstream()
    upstream.respond = lambda request: upstream_answer or answer(body=b"answer %d" % len(upstream.requests))
    return upstream


class XCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.upstream = counting()
        self.gateway = CacheGateway(ROUTES, self.upstream)

    def test_miss_then_hit(self) -> None:
        first, second = self.gateway.get("/api/a"), self.gateway.get("/api/a")
        self.assertEqual((first.header("x-cache"), first.body), ("MISS", b"answer 1"))
        self.assertEqual((second.header("x-cache"), second.body), ("HIT", b"answer 1"))
        self.assertEqual(second.header("content-length"), "8")
        self.assertEqual(len(self.upstream.requests), 1)

    def test_hit_has_its_own_request_id(self) -> None:
        first, second = self.gateway.get("/api/a"), self.gateway.get("/api/a")
        self.assertEqual(len(second.all("x-request-id")), 1)
        self.assertNotEqual(first.header("x-request-id"), second.header("x-request-id"))
        self.assertEqual(second.header("via"), "1.1 txgateway")

    def test_other_methods_bypass(self) -> None:
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            with self.subTest(method=method):
                reply = self.gateway.request(method, "/api/a")
                self.assertEqual((reply.status, reply.header("x-cache")), (200, "BYPASS"))

    def test_get_with_a_body_bypasses(self) -> None:
        request = b"GET /api/a HTTP/1.1\r\nhost: gateway.test\r\ncontent-length: 2\r\n\r\nhi"
        reply = ClientConnection(self.gateway.factory, "GET", request).response()
        self.assertEqual(reply.header("x-cache"), "BYPASS")
        self.assertEqual(self.gateway.get("/api/a").header("x-cache"), "MISS")

    def test_websocket_upgrade_bypasses(self) -> None:
        reply = self.gateway.get("/api/a", ("connection", "upgrade"), ("upgrade", "websocket"))
        self.assertEqual(reply.header("x-cache"), "BYPASS")

    def test_route_without_cache_has_no_x_cache(self) -> None:
        self.assertIsNone(self.gateway.get("/plain/a").header("x-cache"))
        self.gateway.get("/plain/a")
        self.assertEqual(len(self.upstream.requests), 2)

    def test_gateway_errors_carry_x_cache_and_are_not_stored(self) -> None:
        self.upstream.respond = lambda request: fail(UpstreamConnectError("refused"))
        reply = self.gateway.get("/api/a")
        self.assertEqual((reply.status, reply.header("x-cache")), (502, "MISS"))
        self.upstream.respond = lambda request: answer()
        self.assertEqual(self.gateway.get("/api/a").header("x-cache"), "MISS")
        self.assertEqual(self.gateway.get("/api/a").header("x-cache"), "HIT")

    def test_keys_differ_by_scheme(self) -> None:
        self.upstream.respond = lambda request: answer(status=301, headers=[(b"location", b"https://gateway.test/")])
        self.assertEqual(self.gateway.get("/api/a").status, 301)
        tls = HTTP11ServerFactory(lambda: self.gateway.gateway, self.gateway.clock, scheme=b"https")
        request = b"GET /api/a HTTP/1.1\r\nhost: gateway.test\r\n\r\n"
        self.assertEqual(ClientConnection(tls, "GET", request).response().header("x-cache"), "MISS")
        self.assertEqual(self.gateway.get("/api/a").header("x-cache"), "HIT")

    def test_keys_differ_by_host_path_and_query(self) -> None:
        gateway = self.gateway
        gateway.get("/api/a?x=1")
        self.assertEqual(gateway.request("GET", "/api/a?x=1", host="GATEWAY.test").header("x-cache"), "HIT")
        for target, host in (("/api/a?x=2", "gateway.test"), ("/api/a", "gateway.test"), ("/api/a?x=1", "other.test")):
            with self.subTest(target=target, host=host):
                self.assertEqual(gateway.request("GET", target, host=host).header("x-cache"), "MISS")


class EnablingTests(SynchronousTestCase):
    def cached(self, config: str) -> str | None:
        gateway = CacheGateway(config, counting())
        gateway.get("/api/a")
        return gateway.get("/api/a").header("x-cache")

    def config(self, route_cache: str, middleware: str) -> str:
        return f"""
upstreams:
  app: {{servers: ["10.1.1.1:9001"]}}
routes:
  - name: api
    match: {{path: "/api/*"}}
    upstream: app
    {route_cache}
middleware:
  {middleware}
"""

    def test_route_block_decides(self) -> None:
        self.assertEqual(self.cached(self.config("cache: {enabled: true}", "cache: {enabled: false}")), "HIT")
        self.assertEqual(self.cached(self.config("cache: {ttl: 5}", "cache: {enabled: false}")), "HIT")
        self.assertIsNone(self.cached(self.config("cache: {enabled: false}", "cache: {enabled: true}")))

    def test_routes_without_a_block_follow_middleware_cache_enabled(self) -> None:
        self.assertEqual(self.cached(self.config("", "cache: {enabled: true}")), "HIT")
        self.assertIsNone(self.cached(self.config("", "cache: {enabled: false}")))

    def test_middleware_disabled_turns_it_off(self) -> None:
        self.assertIsNone(self.cached(self.config("cache: {enabled: true}", "enabled: false")))

    def test_default_ttl_without_a_route_block_is_30_seconds(self) -> None:
        gateway = CacheGateway(self.config("", "cache: {enabled: true}"), counting())
        gateway.get("/api/a")
        gateway.clock.advance(29.5)
        self.assertEqual(gateway.get("/api/a").header("x-cache"), "HIT")
        gateway.clock.advance(0.5)
        self.assertEqual(gateway.get("/api/a").header("x-cache"), "MISS")

    def test_changed_route_starts_afresh_unchanged_keeps_entries(self) -> None:
        gateway = CacheGateway(self.config("cache: {enabled: true}", "cache: {}"), counting())
        gateway.get("/api/a")
        gateway.load(self.config("cache: {enabled: true}", "cache: {}"))
        self.assertEqual(gateway.get("/api/a").header("x-cache"), "HIT")
        gateway.load(self.config("cache: {enabled: true}\n    strip_prefix: /api", "cache: {}"))
        self.assertEqual(gateway.get("/api/a").header("x-cache"), "MISS")


class RequestDirectiveTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.upstream = counting()
        self.gateway = CacheGateway(ROUTES, self.upstream)
        self.gateway.get("/api/a")

    def test_no_cache_skips_the_lookup_and_refreshes(self) -> None:
        for header in (("cache-control", "no-cache"), ("pragma", "no-cache"), ("cache-control", "max-age=0")):
            with self.subTest(header=header):
                calls = len(self.upstream.requests)
                reply = self.gateway.get("/api/a", header)
                self.assertEqual((reply.header("x-cache"), reply.body), ("BYPASS", b"answer %d" % (calls + 1)))
                hit = self.gateway.get("/api/a")
                self.assertEqual((hit.header("x-cache"), hit.body), ("HIT", reply.body))

    def test_no_store_is_served_but_stores_nothing(self) -> None:
        self.assertEqual(self.gateway.get("/api/a", ("cache-control", "no-store")).header("x-cache"), "HIT")
        miss = self.gateway.get("/api/b", ("cache-control", "no-store"))
        self.assertEqual(miss.header("x-cache"), "MISS")
        self.assertEqual(self.gateway.get("/api/b").header("x-cache"), "MISS")
        bypass = self.gateway.get("/api/a", ("cache-control", "no-cache, no-store"))
        self.assertEqual((bypass.header("x-cache"), bypass.body), ("BYPASS", b"answer 4"))
        self.assertEqual(self.gateway.get("/api/a").body, b"answer 1")

    def test_request_max_age_other_than_zero_is_a_normal_lookup(self) -> None:
        self.assertEqual(self.gateway.get("/api/a", ("cache-control", "max-age=60")).header("x-cache"), "HIT")


class HeadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.upstream = counting()
        self.gateway = CacheGateway(ROUTES, self.upstream)

    def test_head_is_answered_from_the_stored_get(self) -> None:
        self.gateway.get("/api/a")
        connection = self.gateway.open("HEAD", "/api/a")
        reply = connection.response()
        self.assertEqual((reply.status, reply.header("x-cache"), reply.header("content-length")), (200, "HIT", "8"))
        self.assertTrue(connection.transport.value().endswith(b"\r\n\r\n"))
        self.assertEqual(len(self.upstream.requests), 1)

    def test_head_miss_goes_upstream_as_head_and_stores_nothing(self) -> None:
        reply = self.gateway.request("HEAD", "/api/a")
        self.assertEqual(reply.header("x-cache"), "MISS")
        self.assertEqual(self.upstream.requests[0].method, b"HEAD")
        self.assertEqual(self.gateway.get("/api/a").header("x-cache"), "MISS")

    def test_head_of_a_stored_204_has_no_content_length(self) -> None:
        self.upstream.respond = lambda request: Response(204, [], None)
        self.gateway.get("/api/a")
        reply = self.gateway.request("HEAD", "/api/a")
        self.assertEqual((reply.status, reply.header("x-cache"), reply.header("content-length")), (204, "HIT", None))


class StreamingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.bodies: list[StreamedBody] = []
        self.upstream = ScriptedUpstream(self._respond)
        self.gateway = CacheGateway(ROUTES, self.upstream)

    def _respond(self, request: UpstreamRequest) -> Response:
        body = StreamedBody()
        self.bodies.append(body)
        return Response(200, [(b"content-type", b"text/plain")], body)

    def test_a_miss_streams_as_it_arrives_and_is_stored_when_complete(self) -> None:
        client = self.gateway.open("GET", "/api/a")
        [body] = self.bodies
        body.write(b"first ")
        reply = client.reply
        assert reply is not None
        self.assertEqual((reply.header("x-cache"), reply.body, reply.complete), ("MISS", b"first ", False))
        # Not stored before the body completed.
        self.assertEqual(self.gateway.open("GET", "/api/a").reply, None)
        body.write(b"second")
        body.finish()
        self.assertEqual(client.response().body, b"first second")
        hit = self.gateway.get("/api/a")
        self.assertEqual((hit.header("x-cache"), hit.body), ("HIT", b"first second"))

    def test_backpressure_reaches_the_upstream_body(self) -> None:
        client = self.gateway.open("GET", "/api/a")
        [body] = self.bodies
        producer = client.transport.producer
        assert producer is not None
        producer.pauseProducing()
        producer.resumeProducing()
        self.assertEqual((body.paused, body.resumed), (1, 1))

    def test_client_disconnect_mid_body_stores_nothing(self) -> None:
        client = self.gateway.open("GET", "/api/a")
        [body] = self.bodies
        body.write(b"partial")
        client.disconnect()
        self.assertTrue(body.stopped)
        again = self.gateway.open("GET", "/api/a")
        self.assertEqual(len(self.upstream.requests), 2)
        reply = again.reply
        self.assertEqual(reply.header("x-cache") if reply else None, "MISS")

    def test_upstream_abort_mid_body_stores_nothing(self) -> None:
        client = self.gateway.open("GET", "/api/a")
        [body] = self.bodies
        body.write(b"partial")
        body.abort()
        self.assertTrue(client.transport.disconnecting)
        self.gateway.open("GET", "/api/a")
        self.assertEqual(len(self.upstream.requests), 2)

    def test_body_over_max_object_bytes_streams_through_unstored(self) -> None:
        client = self.gateway.open("GET", "/api/a")
        [body] = self.bodies
        body.write(b"x" * 60)
        body.write(b"y" * 60)
        body.finish()
        self.assertEqual(client.response().body, b"x" * 60 + b"y" * 60)
        self.gateway.open("GET", "/api/a")
        self.assertEqual(len(self.upstream.requests), 2)

    def test_body_of_exactly_max_object_bytes_is_stored(self) -> None:
        client = self.gateway.open("GET", "/api/a")
        self.bodies[0].write(b"z" * 100)
        self.bodies[0].finish()
        client.response()
        self.assertEqual(self.gateway.get("/api/a").header("x-cache"), "HIT")

    def test_declared_length_over_max_object_bytes_is_not_stored(self) -> None:
        self.upstream.respond = lambda request: answer(body=b"w" * 101)
        self.assertEqual(self.gateway.get("/api/a").body, b"w" * 101)
        self.assertEqual(self.gateway.get("/api/a").header("x-cache"), "MISS")


class CoalescingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.held: list[Deferred[Response]] = []
        self.upstream = ScriptedUpstream(self._hold)
        self.gateway = CacheGateway(ROUTES, self.upstream)

    def cache_timers(self) -> list[IDelayedCall]:
        """Timers left running, other than the connections' own idle timers."""
        return [
            call
            for call in self.gateway.clock.getDelayedCalls()
            if not isinstance(getattr(call.func, "__self__", None), HTTP11ServerProtocol)  # type: ignore[attr-defined]
        ]

    def _hold(self, request: UpstreamRequest) -> Deferred[Response]:
        d: Deferred[Response] = Deferred()
        self.held.append(d)
        return d

    def test_concurrent_misses_make_one_upstream_request(self) -> None:
        clients = [self.gateway.open("GET", "/api/a") for _ in range(5)]
        self.assertEqual(len(self.upstream.requests), 1)
        self.held[0].callback(answer(body=b"shared body"))
        replies = [client.response() for client in clients]
        self.assertEqual({reply.body for reply in replies}, {b"shared body"})
        self.assertEqual([reply.header("x-cache") for reply in replies], ["MISS", "HIT", "HIT", "HIT", "HIT"])
        self.assertEqual(len(self.upstream.requests), 1)

    def test_waiters_get_the_body_once_it_completed(self) -> None:
        leader = self.gateway.open("GET", "/api/a")
        waiter = self.gateway.open("GET", "/api/a")
        body = StreamedBody()
        self.held[0].callback(Response(200, [], body))
        body.write(b"part one, ")
        self.assertIsNone(waiter.reply)
        body.write(b"part two")
        body.finish()
        self.assertEqual(leader.response().body, b"part one, part two")
        self.assertEqual(waiter.response().body, b"part one, part two")
        self.assertEqual(len(self.upstream.requests), 1)

    def test_head_waits_for_a_get_in_flight(self) -> None:
        self.gateway.open("GET", "/api/a")
        head = self.gateway.open("HEAD", "/api/a")
        self.held[0].callback(answer(body=b"12345"))
        reply = head.response()
        self.assertEqual((reply.header("x-cache"), reply.header("content-length")), ("HIT", "5"))
        self.assertEqual(len(self.upstream.requests), 1)

    def test_uncacheable_answer_sends_waiters_upstream(self) -> None:
        leader = self.gateway.open("GET", "/api/a")
        waiters = [self.gateway.open("GET", "/api/a") for _ in range(2)]
        self.held[0].callback(answer(headers=[(b"cache-control", b"no-store")], body=b"mine"))
        self.assertEqual(leader.response().body, b"mine")
        self.assertEqual(len(self.upstream.requests), 3)
        for index, waiter in enumerate(waiters, 1):
            self.held[index].callback(answer(body=b"own %d" % index))
            reply = waiter.response()
            self.assertEqual((reply.header("x-cache"), reply.body), ("MISS", b"own %d" % index))

    def test_failed_leader_sends_waiters_upstream(self) -> None:
        leader = self.gateway.open("GET", "/api/a")
        waiter = self.gateway.open("GET", "/api/a")
        self.held[0].errback(UpstreamConnectError("refused"))
        self.assertEqual(leader.response().status, 502)
        self.assertEqual(len(self.upstream.requests), 2)
        self.held[1].callback(answer(body=b"second try"))
        self.assertEqual(waiter.response().body, b"second try")

    def test_leader_body_aborted_sends_waiters_upstream(self) -> None:
        self.gateway.open("GET", "/api/a")
        waiter = self.gateway.open("GET", "/api/a")
        body = StreamedBody()
        self.held[0].callback(Response(200, [], body))
        body.write(b"half")
        body.abort()
        self.assertEqual(len(self.upstream.requests), 2)
        self.held[1].callback(answer(body=b"whole"))
        self.assertEqual(waiter.response().body, b"whole")

    def test_leader_client_gone_before_the_head_sends_waiters_upstream(self) -> None:
        leader = self.gateway.open("GET", "/api/a")
        waiter = self.gateway.open("GET", "/api/a")
        leader.disconnect()
        self.assertTrue(self.held[0].called)  # cancelled
        self.assertEqual(len(self.upstream.requests), 2)
        self.held[1].callback(answer(body=b"for the waiter"))
        self.assertEqual(waiter.response().body, b"for the waiter")

    def test_wait_is_bounded(self) -> None:
        self.gateway.open("GET", "/api/a")
        waiter = self.gateway.open("GET", "/api/a")
        self.gateway.clock.advance(COALESCE_TIMEOUT - 0.5)
        self.assertEqual(len(self.upstream.requests), 1)
        self.gateway.clock.advance(0.5)
        self.assertEqual(len(self.upstream.requests), 2)
        self.held[1].callback(answer(body=b"did not wait"))
        self.assertEqual(waiter.response().body, b"did not wait")
        self.held[0].callback(answer(body=b"late leader"))
        self.assertEqual(self.cache_timers(), [])

    def test_an_old_flight_takes_no_new_waiters(self) -> None:
        self.gateway.open("GET", "/api/a")
        self.gateway.clock.advance(COALESCE_TIMEOUT)
        late = self.gateway.open("GET", "/api/a")
        self.assertEqual(len(self.upstream.requests), 2)  # at once, no wait
        follower = self.gateway.open("GET", "/api/a")  # waits on the late one's flight
        self.assertEqual(len(self.upstream.requests), 2)
        self.held[1].callback(answer(body=b"fresh"))
        self.assertEqual([late.response().body, follower.response().body], [b"fresh", b"fresh"])
        self.held[0].callback(answer(body=b"stale"))
        self.assertEqual(self.gateway.get("/api/a").body, b"stale")  # the last one stored wins

    def test_waiter_leaving_does_not_disturb_the_others(self) -> None:
        self.gateway.open("GET", "/api/a")
        gone = self.gateway.open("GET", "/api/a")
        staying = self.gateway.open("GET", "/api/a")
        gone.disconnect()
        self.held[0].callback(answer(body=b"for those who stayed"))
        self.assertEqual(staying.response().body, b"for those who stayed")
        self.assertEqual(gone.transport.value(), b"")
        self.assertEqual(len(self.upstream.requests), 1)
        self.assertEqual(self.cache_timers(), [])

    def test_waiter_with_another_variant_goes_upstream(self) -> None:
        self.gateway.open("GET", "/api/a", [("accept", "a")])
        same = self.gateway.open("GET", "/api/a", [("accept", "a")])
        other = self.gateway.open("GET", "/api/a", [("accept", "b")])
        self.held[0].callback(answer(headers=[(b"vary", b"accept")], body=b"for a"))
        self.assertEqual(same.response().body, b"for a")
        self.assertEqual(len(self.upstream.requests), 2)
        self.held[1].callback(answer(headers=[(b"vary", b"accept")], body=b"for b"))
        self.assertEqual(other.response().body, b"for b")
        self.assertEqual(self.gateway.get("/api/a", ("accept", "b")).header("x-cache"), "HIT")

    def test_different_urls_are_not_coalesced(self) -> None:
        self.gateway.open("GET", "/api/a")
        self.gateway.open("GET", "/api/b")
        self.assertEqual(len(self.upstream.requests), 2)


class InvalidationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.upstream = counting()
        self.gateway = CacheGateway(ROUTES, self.upstream)
        self.gateway.get("/api/a")

    def test_successful_unsafe_request_invalidates(self) -> None:
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            with self.subTest(method=method):
                self.gateway.get("/api/a")
                self.assertEqual(self.gateway.get("/api/a").header("x-cache"), "HIT")
                self.gateway.request(method, "/api/a")
                self.assertEqual(self.gateway.get("/api/a").header("x-cache"), "MISS")

    def test_failed_unsafe_request_does_not(self) -> None:
        self.upstream.respond = lambda request: answer(status=409)
        self.gateway.request("PUT", "/api/a")
        self.assertEqual(self.gateway.get("/api/a").header("x-cache"), "HIT")

    def test_safe_methods_do_not(self) -> None:
        self.gateway.request("OPTIONS", "/api/a")
        self.assertEqual(self.gateway.get("/api/a").header("x-cache"), "HIT")
