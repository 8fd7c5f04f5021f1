"""The JWKS key set over a real socket: treq on the real reactor against a
twisted.web JWKS endpoint on a free loopback port.

Proves what the injected-fetch unit tests cannot: the real fetch (status
check, size limit, no redirects), key rotation through an unknown-``kid``
refetch, and that ``stop()`` leaves no timer or connection behind (trial's
reactor cleanliness check would fail the test otherwise).
"""

from __future__ import annotations

import json
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from txgateway.auth.jwks import JWKSKeySet, TreqJWKSFetcher
from txgateway.auth.jwt import INVALID, JWTVerifier, TokenRejected, VerifiedToken
from txgateway.config.model import JWTConfig

reactor: Any = _reactor

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
NEW_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


class JWKSEndpoint(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[dict[str, Any]] = [
            RSAAlgorithm.to_jwk(RSA_KEY.public_key(), as_dict=True) | {"kid": "rsa-1"},
            ECAlgorithm.to_jwk(EC_KEY.public_key(), as_dict=True) | {"kid": "ec-1"},
        ]
        self.status = 200
        self.padding = 0
        self.redirect: bytes | None = None
        self.hits = 0
        self.cookies: list[bytes | None] = []

    def render_GET(self, request: Request) -> bytes:
        self.hits += 1
        self.cookies.append(request.getHeader(b"cookie"))
        if self.redirect is not None:
            request.redirect(self.redirect)
            return b""
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"set-cookie", b"tracker=1")
        return json.dumps({"keys": self.keys, "padding": "x" * self.padding}).encode()


class RealJWKSTests(TestCase):
    def setUp(self) -> None:
        self.endpoint = JWKSEndpoint()
        self.port = reactor.listenTCP(0, Site(self.endpoint), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/.well-known/jwks.json"

    def key_set(self, max_bytes: int = 1024 * 1024, **options: Any) -> JWKSKeySet:
        fetcher = TreqJWKSFetcher(reactor, max_bytes=max_bytes)
        key_set = JWKSKeySet(self.url, reactor, fetcher.fetch, close=fetcher.close, **options)
        self.addCleanup(key_set.stop)
        key_set.start()
        return key_set

    def settled(self, key_set: JWKSKeySet) -> Deferred[None]:
        """Fires once the fetch in flight (if any) completed."""
        waiter = key_set.wait_for_keys()
        if waiter is None:
            return deferLater(reactor, 0, lambda: None)
        return waiter

    def verifier(self, key_set: JWKSKeySet) -> JWTVerifier:
        return JWTVerifier(JWTConfig(algorithms=("RS256", "ES256"), jwks_url=self.url), reactor, key_set=key_set)

    @staticmethod
    def token(key: Any, kid: str, alg: str = "RS256") -> bytes:
        exp = int(reactor.seconds()) + 300
        return jwt.encode({"sub": "user-1", "exp": exp}, key, algorithm=alg, headers={"kid": kid}).encode()

    @inlineCallbacks
    def test_keys_are_fetched_and_verify_tokens(self) -> Any:
        key_set = self.key_set()
        verifier = self.verifier(key_set)
        result = yield verifier.verify(self.token(RSA_KEY, "rsa-1"))
        self.assertIsInstance(result, VerifiedToken)
        self.assertTrue(key_set.available)
        self.assertEqual(key_set.key_count, 2)
        result = verifier.verify(self.token(EC_KEY, "ec-1", "ES256"))
        self.assertIsInstance(result, VerifiedToken)

    @inlineCallbacks
    def test_rotation_through_an_unknown_kid(self) -> Any:
        key_set = self.key_set(unknown_kid_interval=0)
        yield self.settled(key_set)
        self.endpoint.keys.append(RSAAlgorithm.to_jwk(NEW_RSA_KEY.public_key(), as_dict=True) | {"kid": "rsa-2"})
        result = yield self.verifier(key_set).verify(self.token(NEW_RSA_KEY, "rsa-2"))
        self.assertEqual(result.identity.consumer, "user-1")
        self.assertEqual(self.endpoint.hits, 2)
        self.assertEqual(self.endpoint.cookies, [None, None])  # the Set-Cookie was not kept

    @inlineCallbacks
    def test_error_status_keeps_old_keys(self) -> Any:
        key_set = self.key_set(unknown_kid_interval=0)
        yield self.settled(key_set)
        self.endpoint.status = 500
        verifier = self.verifier(key_set)
        try:
            yield verifier.verify(self.token(NEW_RSA_KEY, "rsa-unknown"))
        except Exception as error:  # noqa: BLE001 - asserted below
            self.assertEqual(type(error).__name__, "KeysUnavailable")
        else:
            self.fail("an unknown kid during an outage must be a 503")
        self.assertFalse(key_set.available)
        self.assertIsInstance(verifier.verify(self.token(RSA_KEY, "rsa-1")), VerifiedToken)

    @inlineCallbacks
    def test_oversized_document_is_refused(self) -> Any:
        self.endpoint.padding = 100_000
        key_set = self.key_set(max_bytes=50_000)
        yield self.settled(key_set)
        self.assertFalse(key_set.available)
        self.assertEqual(key_set.key_count, 0)

    @inlineCallbacks
    def test_redirects_are_not_followed(self) -> Any:
        self.endpoint.redirect = b"http://127.0.0.1:1/elsewhere"
        key_set = self.key_set()
        yield self.settled(key_set)
        self.assertFalse(key_set.available)
        self.assertEqual(self.endpoint.hits, 1)

    @inlineCallbacks
    def test_healthy_set_rejects_unknown_kid_with_401(self) -> Any:
        key_set = self.key_set(unknown_kid_interval=0)
        yield self.settled(key_set)
        try:
            yield self.verifier(key_set).verify(self.token(NEW_RSA_KEY, "nope"))
        except TokenRejected as error:
            self.assertEqual(error.code, INVALID)
        else:
            self.fail("unknown kid accepted")
