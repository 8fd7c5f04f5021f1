"""Who a request is counted against: the client address behind trusted proxies
(and the spoofing attempts it must resist), and each ``key`` kind."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from txgateway.auth.identity import Identity
from txgateway.pipeline.context import RequestContext
from txgateway.pipeline.forwarded import client_address, trust_check
from txgateway.ratelimit.keys import key_function

TRUSTED = trust_check(["10.0.0.0/8", "fd00::/8"])


def xff(*values: str) -> list[tuple[bytes, bytes]]:
    return [(b"x-forwarded-for", v.encode("latin-1")) for v in values]


class ClientAddressTests(SynchronousTestCase):
    def test_untrusted_peer_is_the_client_whatever_it_sends(self) -> None:
        self.assertEqual(client_address("198.51.100.7", xff("1.2.3.4"), TRUSTED), "198.51.100.7")
        self.assertEqual(client_address("198.51.100.7", [], TRUSTED), "198.51.100.7")

    def test_trusted_proxy_without_header_is_the_client(self) -> None:
        self.assertEqual(client_address("10.0.0.1", [], TRUSTED), "10.0.0.1")

    def test_rightmost_untrusted_hop_is_the_client(self) -> None:
        self.assertEqual(client_address("10.0.0.1", xff("203.0.113.9"), TRUSTED), "203.0.113.9")
        self.assertEqual(client_address("10.0.0.1", xff("203.0.113.9, 10.0.0.2, 10.0.0.3"), TRUSTED), "203.0.113.9")

    def test_prepended_addresses_do_not_change_the_client(self) -> None:
        # The client sent "X-Forwarded-For: 1.1.1.1, 2.2.2.2"; our proxy appended its real address.
        for forged in ("1.1.1.1", "1.1.1.1, 2.2.2.2", "10.0.0.9", "10.0.0.9, 10.0.0.8", "127.0.0.1"):
            with self.subTest(forged=forged):
                headers = xff(f"{forged}, 203.0.113.9")
                self.assertEqual(client_address("10.0.0.1", headers, TRUSTED), "203.0.113.9")

    def test_forged_trusted_address_on_the_right_is_still_skipped_only_by_a_trusted_peer(self) -> None:
        # An untrusted client claiming to be a trusted proxy gains nothing.
        self.assertEqual(client_address("203.0.113.9", xff("10.0.0.5"), TRUSTED), "203.0.113.9")

    def test_several_headers_are_one_list_in_order(self) -> None:
        headers = xff("1.1.1.1", "203.0.113.9, 10.0.0.4")
        self.assertEqual(client_address("10.0.0.1", headers, TRUSTED), "203.0.113.9")

    def test_garbage_stops_at_the_last_vouched_hop(self) -> None:
        self.assertEqual(client_address("10.0.0.1", xff("unknown"), TRUSTED), "10.0.0.1")
        self.assertEqual(client_address("10.0.0.1", xff("<script>, 10.0.0.7"), TRUSTED), "10.0.0.7")
        self.assertEqual(client_address("10.0.0.1", xff(""), TRUSTED), "10.0.0.1")

    def test_all_trusted_gives_the_leftmost(self) -> None:
        self.assertEqual(client_address("10.0.0.1", xff("10.9.9.9, 10.0.0.2"), TRUSTED), "10.9.9.9")

    def test_ports_brackets_and_canonical_form(self) -> None:
        cases = {
            "203.0.113.9:4711": "203.0.113.9",
            "[2001:db8::1]:443": "2001:db8::1",
            "2001:DB8:0:0::1": "2001:db8::1",
            '"[2001:db8::2]"': "2001:db8::2",
            "::ffff:203.0.113.9": "203.0.113.9",
        }
        for sent, expected in cases.items():
            with self.subTest(sent=sent):
                self.assertEqual(client_address("10.0.0.1", xff(sent), TRUSTED), expected)

    def test_ipv6_proxies(self) -> None:
        self.assertEqual(client_address("fd00::1", xff("2001:db8::7, fd00::2"), TRUSTED), "2001:db8::7")

    def test_no_trusted_proxies_configured(self) -> None:
        self.assertEqual(client_address("10.0.0.1", xff("1.2.3.4"), trust_check([])), "10.0.0.1")


def context(
    client_ip: str = "198.51.100.7", headers: list[tuple[bytes, bytes]] | None = None, identity: object = None
) -> RequestContext:
    ctx = RequestContext(b"GET", "/", b"", headers or [], client_ip=client_ip)
    # What Gateway.handle does once per request when trusted proxies are configured.
    ctx.client_address = client_address(client_ip, ctx.headers, TRUSTED)
    ctx.identity = identity
    return ctx


class KeyFunctionTests(SynchronousTestCase):
    def test_consumer(self) -> None:
        key = key_function("consumer")
        self.assertEqual(key(context(identity=Identity("alice"))), "c:alice")

    def test_anonymous_consumer_falls_back_to_the_client_address(self) -> None:
        key = key_function("consumer")
        self.assertEqual(key(context()), "ip:198.51.100.7")
        self.assertEqual(key(context("10.0.0.1", xff("1.1.1.1, 203.0.113.9"))), "ip:203.0.113.9")

    def test_consumer_cannot_collide_with_an_address(self) -> None:
        key = key_function("consumer")
        self.assertNotEqual(key(context(identity=Identity("198.51.100.7"))), key(context()))

    def test_ip(self) -> None:
        key = key_function("ip")
        self.assertEqual(key(context(identity=Identity("alice"))), "ip:198.51.100.7")
        self.assertEqual(key(context("10.0.0.1", xff("203.0.113.9"))), "ip:203.0.113.9")

    def test_spoofing_attempts_all_land_in_one_bucket(self) -> None:
        key = key_function("ip")
        attempts = [
            context("198.51.100.7"),
            context("198.51.100.7", xff("1.2.3.4")),
            context("198.51.100.7", xff("10.0.0.1")),
            context("10.0.0.1", xff("1.2.3.4, 198.51.100.7")),
            context("10.0.0.1", xff("9.9.9.9", "198.51.100.7, 10.0.0.2")),
            context("10.0.0.1", xff("198.51.100.7:1234")),
        ]
        self.assertEqual({key(ctx) for ctx in attempts}, {"ip:198.51.100.7"})

    def test_ipv6_clients_are_counted_per_64(self) -> None:
        key = key_function("ip")
        first = key(context("2001:db8:1:2::1"))
        self.assertEqual(first, "ip:2001:db8:1:2::/64")
        self.assertEqual(key(context("2001:db8:1:2:ffff:ffff:ffff:ffff")), first)
        self.assertNotEqual(key(context("2001:db8:1:3::1")), first)

    def test_route(self) -> None:
        key = key_function("route")
        self.assertEqual(key(context("1.1.1.1")), key(context("2.2.2.2", identity=Identity("bob"))))

    def test_header(self) -> None:
        key = key_function("header:X-Tenant")
        self.assertEqual(key(context(headers=[(b"x-tenant", b"acme")])), "h:acme")

    def test_missing_or_empty_header_falls_back_to_the_client_address(self) -> None:
        key = key_function("header:x-tenant")
        self.assertEqual(key(context()), "ip:198.51.100.7")
        self.assertEqual(key(context(headers=[(b"x-tenant", b"")])), "ip:198.51.100.7")

    def test_long_header_values_are_hashed(self) -> None:
        key = key_function("header:x-tenant")
        long_a = key(context(headers=[(b"x-tenant", b"a" * 10_000)]))
        long_b = key(context(headers=[(b"x-tenant", b"a" * 9_999 + b"b")]))
        self.assertLess(len(long_a), 100)
        self.assertNotEqual(long_a, long_b)

    def test_unknown_kind(self) -> None:
        self.assertRaises(ValueError, key_function, "cookie:session")
