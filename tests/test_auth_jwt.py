"""JWT verification: algorithms, keys, every rejection, claim types, the verified-token cache.

Keys are generated here, never read from committed files; time is a Clock.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from txgateway.auth.jwt import (
    EXPIRED,
    INVALID,
    INVALID_AUDIENCE,
    INVALID_CLAIMS,
    INVALID_ISSUER,
    MALFORMED,
    MAX_TOKEN_BYTES,
    NOT_YET_VALID,
    TOKEN_TOO_LARGE,
    JWTVerifier,
    TokenRejected,
    VerificationKey,
    VerifiedToken,
    VerifiedTokenCache,
    load_public_key_file,
)
from txgateway.config.model import JWTConfig

NOW = 1_700_000_000
SECRET = "a-test-secret-of-at-least-32-bytes!!"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
P256_KEY = ec.generate_private_key(ec.SECP256R1())
P384_KEY = ec.generate_private_key(ec.SECP384R1())
P521_KEY = ec.generate_private_key(ec.SECP521R1())
ED25519_KEY = ed25519.Ed25519PrivateKey.generate()
ED448_KEY = ed448.Ed448PrivateKey.generate()

PUBLIC_KEYS = [
    VerificationKey.of(k.public_key()) for k in (RSA_KEY, P256_KEY, P384_KEY, P521_KEY, ED25519_KEY, ED448_KEY)
]
ALL_ALGORITHMS = (
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def claims(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "user-1", "exp": NOW + 300, "iat": NOW}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def token(payload: dict[str, Any], key: Any = SECRET, alg: str = "HS256", **headers: Any) -> bytes:
    return jwt.encode(payload, key, algorithm=alg, headers=headers or None).encode("ascii")


def hs_token(header: dict[str, Any], payload: bytes, secret: bytes, digest: Any = hashlib.sha256) -> bytes:
    """Sign by hand: for tokens PyJWT refuses to make (PEM as HMAC key, raw payloads)."""
    signing_input = b64(json.dumps(header).encode()) + b"." + b64(payload)
    return signing_input + b"." + b64(hmac.new(secret, signing_input, digest).digest())


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class VerifierCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)

    def verifier(self, keys: Any = PUBLIC_KEYS, cache: VerifiedTokenCache | None = None, **config: Any) -> JWTVerifier:
        config.setdefault("algorithms", ALL_ALGORITHMS)
        config.setdefault("secret", SECRET)
        return JWTVerifier(JWTConfig(**config), self.clock, keys, cache=cache)

    def accepted(self, verifier: JWTVerifier, tok: bytes) -> VerifiedToken:
        result = verifier.verify(tok)
        assert isinstance(result, VerifiedToken), result
        return result

    def rejected(self, verifier: JWTVerifier, tok: bytes) -> str:
        with self.assertRaises(TokenRejected) as caught:
            verifier.verify(tok)
        return caught.exception.code


class AlgorithmTests(VerifierCase):
    def test_every_supported_algorithm_verifies_with_its_key(self) -> None:
        verifier = self.verifier()
        signers = {
            "HS256": SECRET, "HS384": SECRET, "HS512": SECRET,
            "RS256": RSA_KEY, "RS384": RSA_KEY, "RS512": RSA_KEY,
            "PS256": RSA_KEY, "PS384": RSA_KEY, "PS512": RSA_KEY,
            "ES256": P256_KEY, "ES384": P384_KEY, "ES512": P521_KEY,
        }  # fmt: skip
        for alg, key in signers.items():
            identity = self.accepted(verifier, token(claims(), key, alg)).identity
            self.assertEqual((alg, identity.consumer, identity.method), (alg, "user-1", "jwt"))
        for key in (ED25519_KEY, ED448_KEY):
            self.assertEqual(self.accepted(verifier, token(claims(), key, "EdDSA")).identity.consumer, "user-1")

    def test_alg_none_is_rejected_in_any_spelling(self) -> None:
        verifier = self.verifier()
        payload = b64(json.dumps(claims()).encode())
        for alg in ("none", "None", "NONE", ""):
            unsigned = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode()) + b"." + payload + b"."
            self.assertEqual(self.rejected(verifier, unsigned), INVALID, alg)

    def test_alg_outside_the_allow_list_is_rejected(self) -> None:
        verifier = self.verifier(algorithms=("RS256",))
        self.assertEqual(self.rejected(verifier, token(claims(), RSA_KEY, "RS512")), INVALID)
        self.assertEqual(self.rejected(verifier, token(claims(), RSA_KEY, "PS256")), INVALID)
        self.assertEqual(self.rejected(verifier, token(claims(), SECRET, "HS256")), INVALID)
        self.assertEqual(self.accepted(verifier, token(claims(), RSA_KEY, "RS256")).identity.consumer, "user-1")

    def test_hs_token_signed_with_the_rsa_public_key_is_rejected(self) -> None:
        """Key confusion: the public key (which everyone has) used as the HMAC secret."""
        pem = public_pem(RSA_KEY)
        forged = hs_token({"alg": "HS256", "typ": "JWT"}, json.dumps(claims(sub="admin")).encode(), pem)
        # Whether or not HS256 is allowed, the public key is never an HMAC secret.
        self.assertEqual(self.rejected(self.verifier(algorithms=("RS256",)), forged), INVALID)
        self.assertEqual(self.rejected(self.verifier(algorithms=("RS256", "HS256")), forged), INVALID)

    def test_a_public_key_is_refused_as_the_hmac_secret(self) -> None:
        with self.assertRaises(ValueError):
            self.verifier(secret=public_pem(RSA_KEY).decode())

    def test_hs_algorithm_without_a_secret_is_not_allowed(self) -> None:
        verifier = self.verifier(secret=None)
        self.assertEqual(self.rejected(verifier, token(claims(), SECRET, "HS256")), INVALID)

    def test_key_must_match_the_algorithm_type(self) -> None:
        # An ES256 token may only use a P-256 key; an RSA-only key set has none.
        rsa_only = [VerificationKey.of(RSA_KEY.public_key())]
        self.assertEqual(self.rejected(self.verifier(rsa_only), token(claims(), P256_KEY, "ES256")), INVALID)
        p384_only = [VerificationKey.of(P384_KEY.public_key())]
        self.assertEqual(self.rejected(self.verifier(p384_only), token(claims(), P256_KEY, "ES256")), INVALID)
        self.assertEqual(self.rejected(self.verifier(p384_only), token(claims(), ED25519_KEY, "EdDSA")), INVALID)

    def test_wrong_signature(self) -> None:
        verifier = self.verifier([VerificationKey.of(RSA_KEY.public_key())])
        self.assertEqual(self.rejected(verifier, token(claims(), OTHER_RSA_KEY, "RS256")), INVALID)
        self.assertEqual(
            self.rejected(verifier, token(claims(), "another-secret-of-32-bytes-or-more", "HS256")), INVALID
        )
        good = token(claims(), RSA_KEY, "RS256")
        header, payload, signature = good.split(b".")
        tampered = header + b"." + b64(json.dumps(claims(sub="admin")).encode()) + b"." + signature
        self.assertEqual(self.rejected(verifier, tampered), INVALID)
        self.assertEqual(self.rejected(verifier, header + b"." + payload + b"." + signature[:-8]), INVALID)

    def test_kid_selects_the_key(self) -> None:
        keys = [
            VerificationKey.of(RSA_KEY.public_key(), kid="a"),
            VerificationKey.of(OTHER_RSA_KEY.public_key(), kid="b"),
        ]
        verifier = self.verifier(keys)
        self.accepted(verifier, token(claims(), OTHER_RSA_KEY, "RS256", kid="b"))
        self.assertEqual(self.rejected(verifier, token(claims(), OTHER_RSA_KEY, "RS256", kid="a")), INVALID)
        self.assertEqual(self.rejected(verifier, token(claims(), RSA_KEY, "RS256", kid="zzz")), INVALID)
        # Without kid, the keys of the right type are tried.
        self.accepted(verifier, token(claims(), OTHER_RSA_KEY, "RS256"))

    def test_a_key_bound_to_an_alg_verifies_only_that_alg(self) -> None:
        verifier = self.verifier([VerificationKey.of(RSA_KEY.public_key(), alg="RS256")])
        self.accepted(verifier, token(claims(), RSA_KEY, "RS256"))
        self.assertEqual(self.rejected(verifier, token(claims(), RSA_KEY, "PS256")), INVALID)

    def test_unsupported_header_extensions_are_rejected(self) -> None:
        verifier = self.verifier()
        payload = json.dumps(claims()).encode()
        crit = hs_token({"alg": "HS256", "crit": ["exp"], "exp": 1}, payload, SECRET.encode())
        self.assertEqual(self.rejected(verifier, crit), INVALID)
        unencoded = hs_token({"alg": "HS256", "b64": False, "crit": ["b64"]}, payload, SECRET.encode())
        self.assertEqual(self.rejected(verifier, unencoded), INVALID)


class MalformedTests(VerifierCase):
    def test_malformed_tokens(self) -> None:
        verifier = self.verifier()
        good = token(claims())
        header, payload, signature = good.split(b".")
        cases = [
            b"",
            b"abc",
            b"a.b",
            good + b".extra",
            b"!!!." + payload + b"." + signature,
            header + b"." + payload + b"." + signature + b"=",
            b64(b"not json") + b"." + payload + b"." + signature,
            b64(b"[1, 2]") + b"." + payload + b"." + signature,
            b64(b'{"alg": 256}') + b"." + payload + b"." + signature,
            b64(b'{"alg": "HS256", "kid": 7}') + b"." + payload + b"." + signature,
            b64(b"[" * 5000 + b"]" * 5000) + b"." + payload + b"." + signature,
            b"a" + header + b"." + payload + b"." + signature,  # a shifted, undecodable header
            "é.é.é".encode(),
        ]
        for case in cases:
            self.assertIn(self.rejected(verifier, case), (MALFORMED, INVALID), case[:60])
        self.assertEqual(self.rejected(verifier, b"abc"), MALFORMED)

    def test_oversized_token_is_rejected_before_parsing(self) -> None:
        verifier = self.verifier()
        self.assertEqual(self.rejected(verifier, b"x" * (MAX_TOKEN_BYTES + 1)), TOKEN_TOO_LARGE)
        self.assertEqual(self.rejected(verifier, b"a." * 50_000), TOKEN_TOO_LARGE)

    def test_payload_that_is_not_a_json_object(self) -> None:
        verifier = self.verifier()
        for payload in (b"[1]", b"not json", b'{"exp": Infinity, "sub": "x"}', b'{"exp": NaN, "sub": "x"}', b"\xff"):
            tok = hs_token({"alg": "HS256"}, payload, SECRET.encode())
            self.assertEqual(self.rejected(verifier, tok), INVALID_CLAIMS, payload)


class ClaimTests(VerifierCase):
    def test_expired_and_leeway(self) -> None:
        verifier = self.verifier(leeway=30)
        self.assertEqual(self.rejected(verifier, token(claims(exp=NOW - 31))), EXPIRED)
        self.assertEqual(self.rejected(verifier, token(claims(exp=NOW - 30))), EXPIRED)
        self.accepted(verifier, token(claims(exp=NOW - 29)))
        self.assertEqual(self.rejected(self.verifier(leeway=0), token(claims(exp=NOW))), EXPIRED)

    def test_not_before_and_issued_at_in_the_future(self) -> None:
        verifier = self.verifier(leeway=30)
        self.assertEqual(self.rejected(verifier, token(claims(nbf=NOW + 31))), NOT_YET_VALID)
        self.accepted(verifier, token(claims(nbf=NOW + 30)))
        self.assertEqual(self.rejected(verifier, token(claims(iat=NOW + 60))), NOT_YET_VALID)
        self.accepted(verifier, token(claims(iat=NOW + 10)))

    def test_missing_or_mistyped_time_claims(self) -> None:
        verifier = self.verifier()
        for bad in (claims(exp=None), claims(exp="2000000000"), claims(exp=True), claims(exp=[1]),
                    claims(nbf="0"), claims(iat={"t": 1}), claims(nbf=False)):  # fmt: skip
            self.assertEqual(self.rejected(verifier, token(bad)), INVALID_CLAIMS, bad)

    def test_absurd_times_are_clamped(self) -> None:
        verifier = self.verifier()
        far = hs_token({"alg": "HS256"}, b'{"sub": "u", "exp": 1e400}', SECRET.encode())
        self.accepted(verifier, far)
        huge = hs_token({"alg": "HS256"}, b'{"sub": "u", "exp": ' + b"9" * 400 + b"}", SECRET.encode())
        self.accepted(verifier, huge)
        past = hs_token({"alg": "HS256"}, b'{"sub": "u", "exp": -1e400}', SECRET.encode())
        self.assertEqual(self.rejected(verifier, past), EXPIRED)

    def test_subject_must_be_a_non_empty_string(self) -> None:
        verifier = self.verifier()
        for sub in (None, "", 42, ["a"]):
            self.assertEqual(self.rejected(verifier, token(claims(sub=sub))), INVALID_CLAIMS, sub)

    def test_issuer(self) -> None:
        verifier = self.verifier(issuer="https://idp.example/")
        self.accepted(verifier, token(claims(iss="https://idp.example/")))
        self.assertEqual(self.rejected(verifier, token(claims(iss="https://evil.example/"))), INVALID_ISSUER)
        self.assertEqual(self.rejected(verifier, token(claims())), INVALID_ISSUER)
        listed = hs_token({"alg": "HS256"}, json.dumps(claims(iss=["https://idp.example/"])).encode(), SECRET.encode())
        self.assertEqual(self.rejected(verifier, listed), INVALID_ISSUER)

    def test_audience(self) -> None:
        verifier = self.verifier(audience="orders")
        self.accepted(verifier, token(claims(aud="orders")))
        self.accepted(verifier, token(claims(aud=["users", "orders"])))
        for aud in (None, "users", ["users"], {"orders": 1}, 7):
            self.assertEqual(self.rejected(verifier, token(claims(aud=aud))), INVALID_AUDIENCE, aud)

    def test_audience_is_not_checked_when_not_configured(self) -> None:
        self.accepted(self.verifier(), token(claims(aud="anything")))

    def test_roles_and_permissions_claim_shapes(self) -> None:
        verifier = self.verifier(permissions_claim="scope")
        identity = self.accepted(verifier, token(claims(roles=["admin", "ops"], scope="read write"))).identity
        self.assertEqual(identity.roles, {"admin", "ops"})
        self.assertEqual(identity.permissions, {"read", "write"})
        identity = self.accepted(verifier, token(claims(roles="admin  support"))).identity
        self.assertEqual(identity.roles, {"admin", "support"})
        self.assertEqual(identity.permissions, frozenset())
        self.assertEqual(self.accepted(verifier, token(claims(roles=None))).identity.roles, frozenset())
        for bad in ({"roles": 1}, {"roles": ["a", 1]}, {"roles": {"a": True}}, {"scope": ["r", None]}, {"scope": 3.5}):
            self.assertEqual(self.rejected(verifier, token(claims(**bad))), INVALID_CLAIMS, bad)

    def test_nested_roles_claim(self) -> None:
        verifier = self.verifier(roles_claim="realm_access.roles")
        identity = self.accepted(verifier, token(claims(realm_access={"roles": ["admin"]}))).identity
        self.assertEqual(identity.roles, {"admin"})
        self.assertEqual(self.accepted(verifier, token(claims(realm_access="x"))).identity.roles, frozenset())

    def test_claims_are_read_only(self) -> None:
        identity = self.accepted(self.verifier(), token(claims(tenant="t1"))).identity
        self.assertEqual(identity.claims["tenant"], "t1")
        with self.assertRaises(TypeError):
            identity.claims["sub"] = "admin"  # type: ignore[index]


class PublicKeyFileTests(VerifierCase):
    def write(self, data: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as stream:
            stream.write(data)
        return path

    def test_public_keys_and_certificates(self) -> None:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(P256_KEY.public_key())
            .serial_number(1)
            .not_valid_before(now)
            .not_valid_after(now + timedelta(days=1))
            .sign(P256_KEY, hashes.SHA256())
        )
        path = self.write(public_pem(RSA_KEY) + cert.public_bytes(serialization.Encoding.PEM))
        keys = load_public_key_file(path)
        self.assertEqual(len(keys), 2)
        verifier = self.verifier(keys)
        self.accepted(verifier, token(claims(), RSA_KEY, "RS256"))
        self.accepted(verifier, token(claims(), P256_KEY, "ES256"))

    def test_refused_files(self) -> None:
        private = RSA_KEY.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        short = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        for data, message in [
            (private, "private key"),
            (b"nothing here", "no PEM public key"),
            (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "public key"),
            (public_pem(short), "at least 2048"),
        ]:
            with self.assertRaises(ValueError) as caught:
                load_public_key_file(self.write(data))
            self.assertIn(message, str(caught.exception))
        with self.assertRaises(ValueError):
            load_public_key_file(self.mktemp())


class CacheTests(VerifierCase):
    def test_cached_token_still_expires_on_the_clock(self) -> None:
        verifier = self.verifier(cache=VerifiedTokenCache(), leeway=0)
        tok = token(claims(exp=NOW + 60), RSA_KEY, "RS256")
        first = self.accepted(verifier, tok)
        self.assertIs(self.accepted(verifier, tok), first)
        self.clock.advance(59)
        self.assertIs(self.accepted(verifier, tok), first)
        self.clock.advance(1)
        self.assertEqual(self.rejected(verifier, tok), EXPIRED)

    def test_rejected_tokens_are_not_cached(self) -> None:
        cache = VerifiedTokenCache()
        verifier = self.verifier(cache=cache)
        self.rejected(verifier, token(claims(nbf=NOW + 3600)))
        self.rejected(verifier, token(claims(), OTHER_RSA_KEY, "RS256"))
        self.assertEqual(len(cache), 0)

    def test_bounded_by_entries_and_bytes(self) -> None:
        cache = VerifiedTokenCache(max_entries=10, max_bytes=100_000, max_token_bytes=4096)
        verifier = self.verifier(cache=cache)
        tokens = [token(claims(sub=f"user-{i}")) for i in range(25)]
        for tok in tokens:
            self.accepted(verifier, tok)
        self.assertEqual(len(cache), 10)
        # Least recently used go first: the last ten are the ones held.
        self.assertIs(cache.get(tokens[0], NOW, 0), None)
        self.assertIsNot(cache.get(tokens[-1], NOW, 0), None)

        small = VerifiedTokenCache(max_entries=1000, max_bytes=3000, max_token_bytes=2000)
        verifier = self.verifier(cache=small)
        for i in range(20):
            self.accepted(verifier, token(claims(sub=f"user-{i}", pad="x" * 500)))
        self.assertLessEqual(len(small), 3000 // 600)
        self.accepted(verifier, token(claims(pad="x" * 3000)))  # too big to hold: verified, not cached
        self.assertLessEqual(len(small), 3000 // 600)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)
CLAIM_NAMES = st.sampled_from(["sub", "exp", "nbf", "iat", "iss", "aud", "roles", "permissions", "x"])


class HostileInputProperties(VerifierCase):
    """Whatever comes in, the answer is a verified token or a TokenRejected: never another exception."""

    def verify_anything(self, verifier: JWTVerifier, tok: bytes) -> None:
        try:
            verifier.verify(tok)
        except TokenRejected:
            pass

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def test_random_bytes(self, data: bytes) -> None:
        self.verify_anything(self.verifier(), data)

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=4), st.binary(max_size=40))
    def test_random_headers(self, header: dict[str, Any], signature: bytes) -> None:
        tok = b64(json.dumps(header).encode()) + b"." + b64(json.dumps(claims()).encode()) + b"." + b64(signature)
        self.verify_anything(self.verifier(), tok)

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(CLAIM_NAMES, JSON_VALUES, max_size=6))
    def test_random_claims_with_a_good_signature(self, payload: dict[str, Any]) -> None:
        verifier = self.verifier(issuer="i", audience="a")
        self.verify_anything(verifier, hs_token({"alg": "HS256"}, json.dumps(payload).encode(), SECRET.encode()))
