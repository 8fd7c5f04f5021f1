"""The remote key set under a Clock, with an injected fetch: refresh, retries,
unknown-kid refetches, outages (old keys kept, 503 when nothing fits), stop."""

from __future__ import annotations

import json
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from txgateway.auth.jwks import MAX_KEYS, InvalidJWKS, JWKSKeySet, parse_jwks
from txgateway.auth.jwt import INVALID, JWTVerifier, KeysUnavailable, TokenRejected, VerifiedToken, VerifiedTokenCache
from txgateway.config.model import JWTConfig

NOW = 1_700_000_000
URL = "https://idp.test/.well-known/jwks.json"
KEY_A = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEY_B = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def jwk(key: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        data = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = OKPAlgorithm.to_jwk(public, as_dict=True)
    if kid is not None:
        data["kid"] = kid
    data.update(extra)
    return data


def document(*keys: dict[str, Any]) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


def token(key: Any, kid: str | None, alg: str = "RS256", sub: str = "user-1") -> bytes:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode({"sub": sub, "exp": NOW + 3600}, key, algorithm=alg, headers=headers).encode()


class FakeIdP:
    """Answers fetches with ``document``, or fails, or holds them (``hold = True``)."""

    def __init__(self, clock: Clock, doc: bytes) -> None:
        self.clock = clock
        self.document = doc
        self.failing = False
        self.hold = False
        self.fetches: list[float] = []
        self.held: list[Deferred[bytes]] = []
        self.closed = 0

    def fetch(self, url: str) -> Deferred[bytes]:
        self.fetches.append(self.clock.seconds() - NOW)
        if self.hold:
            d: Deferred[bytes] = Deferred()
            self.held.append(d)
            return d
        if self.failing:
            return fail(ConnectionRefusedError("connection refused"))
        return succeed(self.document)

    def close(self) -> None:
        self.closed += 1


class KeySetCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.idp = FakeIdP(self.clock, document(jwk(KEY_A, "a"), jwk(EC_KEY, "e")))
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def key_set(self, start: bool = True, **options: Any) -> JWKSKeySet:
        options.setdefault("refresh", 300.0)
        key_set = JWKSKeySet(URL, self.clock, self.idp.fetch, close=self.idp.close, **options)
        if start:
            key_set.start()
        self.addCleanup(key_set.stop)
        return key_set

    def verifier(self, key_set: JWKSKeySet, cache: VerifiedTokenCache | None = None) -> JWTVerifier:
        config = JWTConfig(algorithms=("RS256", "ES256", "EdDSA"), jwks_url=URL)
        return JWTVerifier(config, self.clock, key_set=key_set, cache=cache)

    def watch(self, result: VerifiedToken | Deferred[VerifiedToken]) -> list[object]:
        """Collects the consumer, or the rejection code, or "503", once known."""
        box: list[object] = []
        if isinstance(result, VerifiedToken):
            box.append(result.identity.consumer)
            return box

        def failed(failure: Any) -> None:
            error = failure.value
            box.append(
                error.code
                if isinstance(error, TokenRejected)
                else "503"
                if isinstance(error, KeysUnavailable)
                else error
            )

        result.addCallbacks(lambda v: box.append(v.identity.consumer), failed)
        return box

    def outcome(self, result: VerifiedToken | Deferred[VerifiedToken]) -> object:
        box = self.watch(result)
        return box[0] if box else "pending"

    def verify(self, verifier: JWTVerifier, tok: bytes) -> object:
        try:
            return self.outcome(verifier.verify(tok))
        except TokenRejected as error:
            return error.code
        except KeysUnavailable:
            return "503"

    def logged(self, level: LogLevel) -> list[dict[str, Any]]:
        return [e for e in self.events if e["log_level"] == level and "jwks" in e.get("log_namespace", "")]


class RefreshTests(KeySetCase):
    def test_first_fetch_at_start_then_every_refresh_interval(self) -> None:
        key_set = self.key_set(refresh=120)
        self.assertEqual(self.idp.fetches, [0])
        self.assertEqual(self.verify(self.verifier(key_set), token(KEY_A, "a")), "user-1")
        self.clock.advance(119)
        self.assertEqual(self.idp.fetches, [0])
        self.clock.advance(1)
        self.clock.advance(120)
        self.assertEqual(self.idp.fetches, [0, 120, 240])

    def test_new_keys_replace_old_ones(self) -> None:
        key_set = self.key_set()
        verifier = self.verifier(key_set)
        self.idp.document = document(jwk(KEY_B, "b"))
        self.clock.advance(300)
        self.assertEqual(self.verify(verifier, token(KEY_B, "b")), "user-1")
        self.assertEqual(self.verify(verifier, token(KEY_A, "a")), INVALID)

    def test_failed_refresh_keeps_old_keys_and_logs_once(self) -> None:
        key_set = self.key_set(refresh=60)
        verifier = self.verifier(key_set)
        self.idp.failing = True
        self.clock.advance(60)
        for _ in range(10):
            self.clock.advance(30)
        self.assertGreater(len(self.idp.fetches), 5)
        self.assertEqual(self.verify(verifier, token(KEY_A, "a")), "user-1")
        warnings = self.logged(LogLevel.warn)
        self.assertEqual(len(warnings), 1)
        self.assertIn("connection refused", warnings[0]["reason"])
        self.assertEqual(warnings[0]["url"], URL)
        self.idp.failing = False
        self.clock.advance(60)
        self.assertTrue(key_set.available)
        self.assertEqual(len([e for e in self.logged(LogLevel.info) if "again" in e["log_format"]]), 1)
        self.idp.failing = True
        self.clock.advance(60)
        self.assertEqual(len(self.logged(LogLevel.warn)), 2)  # a second outage is logged again

    def test_retries_after_failure_back_off(self) -> None:
        self.idp.failing = True
        self.key_set(refresh=300)
        self.clock.pump([1] * 200)
        # 1, 2, 4, 8, 16 then at most 30 s apart.
        self.assertEqual(self.idp.fetches[:7], [0, 1, 3, 7, 15, 31, 61])
        self.assertEqual(self.idp.fetches[7], 91)

    def test_invalid_documents_count_as_failures(self) -> None:
        key_set = self.key_set(refresh=60)
        verifier = self.verifier(key_set)
        for bad in (b"not json", b"[]", b'{"keys": {}}', document({"kty": "oct", "k": "c2VjcmV0"}), b"x" * 10):
            self.idp.document = bad
            self.clock.advance(60)
            self.assertFalse(key_set.available)
            self.assertEqual(self.verify(verifier, token(KEY_A, "a")), "user-1")
            self.idp.document = document(jwk(KEY_A, "a"))
            self.clock.advance(60)
            self.assertTrue(key_set.available)

    def test_version_changes_only_with_the_keys(self) -> None:
        key_set = self.key_set(refresh=60)
        version = key_set.version
        self.clock.advance(60)
        self.assertEqual(key_set.version, version)
        self.idp.document = document(jwk(KEY_B, "b"))
        self.clock.advance(60)
        self.assertEqual(key_set.version, version + 1)

    def test_rotation_invalidates_cached_verifications(self) -> None:
        key_set = self.key_set(refresh=60)
        verifier = self.verifier(key_set, VerifiedTokenCache())
        tok = token(KEY_A, "a")
        self.assertEqual(self.verify(verifier, tok), "user-1")
        self.assertEqual(self.verify(verifier, tok), "user-1")
        self.idp.document = document(jwk(KEY_B, "b"))
        self.clock.advance(60)
        self.assertEqual(self.verify(verifier, tok), INVALID)


class UnknownKidTests(KeySetCase):
    def test_unknown_kid_refetches_at_most_once_per_30_seconds(self) -> None:
        key_set = self.key_set()
        verifier = self.verifier(key_set)
        self.clock.advance(10)
        # Within 30 s of the last fetch: no refetch, a plain 401.
        self.assertEqual(self.verify(verifier, token(KEY_B, "b")), INVALID)
        self.assertEqual(self.idp.fetches, [0])
        self.clock.advance(20)
        self.idp.document = document(jwk(KEY_A, "a"), jwk(KEY_B, "b"))
        self.assertEqual(self.verify(verifier, token(KEY_B, "b")), "user-1")
        self.assertEqual(self.idp.fetches, [0, 30])

    def test_unknown_kid_flood_costs_one_fetch_and_no_memory(self) -> None:
        key_set = self.key_set()
        verifier = self.verifier(key_set)
        self.clock.advance(31)
        outcomes = {self.verify(verifier, token(KEY_B, f"made-up-{i}")) for i in range(500)}
        self.assertEqual(outcomes, {INVALID})
        self.assertEqual(self.idp.fetches, [0, 31])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # just the next refresh
        self.assertEqual(key_set.key_count, 2)

    def test_requests_wait_for_the_refetch_in_flight(self) -> None:
        key_set = self.key_set()
        verifier = self.verifier(key_set)
        self.clock.advance(31)
        self.idp.hold = True
        waiting = [self.watch(verifier.verify(token(KEY_B, "b"))) for _ in range(3)]
        self.assertEqual(waiting, [[], [], []])
        self.assertEqual(len(self.idp.held), 1)
        self.idp.held[0].callback(document(jwk(KEY_B, "b")))
        self.assertEqual(waiting, [["user-1"]] * 3)

    def test_known_kid_does_not_wait_for_a_fetch(self) -> None:
        key_set = self.key_set(refresh=60)
        verifier = self.verifier(key_set)
        self.idp.hold = True
        self.clock.advance(60)
        self.assertEqual(len(self.idp.held), 1)
        self.assertEqual(self.verify(verifier, token(KEY_A, "a")), "user-1")

    def test_token_without_kid_uses_keys_of_its_type(self) -> None:
        verifier = self.verifier(self.key_set())
        self.assertEqual(self.verify(verifier, token(KEY_A, None)), "user-1")
        self.assertEqual(self.verify(verifier, token(EC_KEY, None, "ES256")), "user-1")
        self.assertEqual(self.verify(verifier, token(ED_KEY, None, "EdDSA")), INVALID)


class OutageTests(KeySetCase):
    def test_requests_before_the_first_fetch_completes_wait_for_it(self) -> None:
        self.idp.hold = True
        verifier = self.verifier(self.key_set())
        waiting = self.watch(verifier.verify(token(KEY_A, "a")))
        self.assertEqual(waiting, [])
        self.clock.advance(2)
        self.idp.held[0].callback(self.idp.document)
        self.assertEqual(waiting, ["user-1"])

    def test_wait_is_bounded_then_503(self) -> None:
        self.idp.hold = True
        verifier = self.verifier(self.key_set(wait_timeout=5))
        waiting = self.watch(verifier.verify(token(KEY_A, "a")))
        self.clock.advance(4.9)
        self.assertEqual(waiting, [])
        self.clock.advance(0.1)
        self.assertEqual(waiting, ["503"])

    def test_fetch_timeout_counts_as_failure(self) -> None:
        self.idp.hold = True
        key_set = self.key_set(fetch_timeout=10)
        self.clock.advance(10)
        self.assertFalse(key_set.available)
        self.assertEqual(self.logged(LogLevel.warn)[0]["reason"], "timed out")

    def test_no_fitting_key_during_an_outage_is_503_not_401(self) -> None:
        self.idp.failing = True
        verifier = self.verifier(self.key_set())
        self.assertEqual(self.verify(verifier, token(KEY_A, "a")), "503")
        # Later an unknown kid may refetch; while it fails the answer stays 503.
        self.clock.advance(45)
        self.assertEqual(self.verify(verifier, token(KEY_A, "a")), "503")
        self.assertEqual(len(self.logged(LogLevel.warn)), 1)

    def test_cached_keys_still_serve_during_an_outage_and_unknown_kids_get_503(self) -> None:
        key_set = self.key_set(refresh=60)
        verifier = self.verifier(key_set)
        self.idp.failing = True
        self.clock.advance(60)
        self.assertEqual(self.verify(verifier, token(KEY_A, "a")), "user-1")
        self.assertEqual(self.verify(verifier, token(KEY_B, "b")), "503")
        # A bad signature with a known kid is the token's fault even now.
        self.assertEqual(self.verify(verifier, token(KEY_B, "a")), INVALID)


class StopTests(KeySetCase):
    def test_stop_cancels_timers_and_fetch_and_closes(self) -> None:
        self.idp.hold = True
        key_set = self.key_set()
        verifier = self.verifier(key_set)
        waiting = self.watch(verifier.verify(token(KEY_A, "a")))
        self.successResultOf(key_set.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.idp.closed, 1)
        self.assertEqual(waiting, ["503"])
        self.assertTrue(self.idp.held[0].called)  # the fetch in flight was cancelled
        self.assertEqual(self.logged(LogLevel.warn), [])

    def test_runtime_stop_stops_the_shared_key_set(self) -> None:
        from txgateway.auth.jwks import shared_key_set
        from txgateway.runtime import Runtime

        runtime = Runtime(self.clock, self.clock)
        key_set = runtime.shared(("jwks", URL), lambda: self.key_set())
        self.assertIs(shared_key_set(runtime, URL, 60.0), key_set)
        self.assertEqual(key_set.refresh, 60.0)
        runtime.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.idp.closed, 1)


class ParseTests(SynchronousTestCase):
    def test_usable_keys_are_kept_and_others_skipped(self) -> None:
        private_jwk = json.loads(RSAAlgorithm.to_jwk(KEY_B))
        private_jwk["kid"] = "private"
        keys, skipped = parse_jwks(
            document(
                jwk(KEY_A, "a", use="sig", alg="RS256"),
                jwk(EC_KEY, "e"),
                jwk(ED_KEY, "d"),
                private_jwk,
                jwk(KEY_A, "enc", use="enc"),
                {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
                jwk(KEY_A, "wrong-alg", alg="ES256"),
                jwk(KEY_A, "unknown-alg", alg="RS1"),
                {"kty": "RSA", "kid": "broken", "n": "AQAB", "e": "AQAB"},
                jwk(KEY_A, "number-kid") | {"kid": 5},
                "not an object",
            )
        )
        self.assertEqual([k.kid for k in keys], ["a", "e", "d", "private"])
        self.assertEqual(skipped, 7)
        self.assertEqual(keys[0].algorithms, {"RS256"})
        self.assertIsInstance(keys[3].key, rsa.RSAPublicKey)

    def test_too_many_keys(self) -> None:
        keys, skipped = parse_jwks(document(*[jwk(EC_KEY, str(i)) for i in range(MAX_KEYS + 5)]))
        self.assertEqual((len(keys), skipped), (MAX_KEYS, 5))

    def test_not_a_key_set(self) -> None:
        for bad in (b"", b"{", b"[]", b'{"keys": 1}', b'{"keys": []}', b'{"keys": [NaN]}'):
            self.assertRaises(InvalidJWKS, parse_jwks, bad)
