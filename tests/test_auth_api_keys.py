"""API keys: digests only, every key compared, identities shared."""

from __future__ import annotations

import hashlib

from twisted.trial.unittest import SynchronousTestCase

from txgateway.auth import api_keys as api_keys_module
from txgateway.auth.api_keys import MAX_API_KEY_BYTES, APIKeys
from txgateway.config.model import APIKey


def key(secret: str, consumer: str, *roles: str) -> APIKey:
    return APIKey(sha256=hashlib.sha256(secret.encode()).hexdigest(), consumer=consumer, roles=roles)


class APIKeysTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.keys = APIKeys([key("alpha", "ci-bot", "premium"), key("beta", "ops", "admin", "support")])

    def test_right_key_gives_its_consumer_and_roles(self) -> None:
        identity = self.keys.identify(b"beta")
        assert identity is not None
        self.assertEqual((identity.consumer, identity.roles, identity.method), ("ops", {"admin", "support"}, "api_key"))
        self.assertEqual(dict(identity.claims), {})
        self.assertIs(self.keys.identify(b"beta"), identity)

    def test_wrong_empty_and_oversized_keys(self) -> None:
        for presented in (b"gamma", b"alpha ", b"ALPHA", b"", b"a" * (MAX_API_KEY_BYTES + 1)):
            self.assertIsNone(self.keys.identify(presented), presented[:20])

    def test_constant_time_compare_over_all_keys(self) -> None:
        compared: list[tuple[bytes, bytes]] = []
        real = api_keys_module.compare_digest

        def recording(a: bytes, b: bytes) -> bool:
            compared.append((a, b))
            return real(a, b)

        self.patch(api_keys_module, "compare_digest", recording)
        for presented in (b"alpha", b"beta", b"wrong"):
            del compared[:]
            self.keys.identify(presented)
            self.assertEqual(len(compared), 2, presented)
            self.assertEqual({a for a, _ in compared}, {hashlib.sha256(presented).digest()})
