"""API keys: the configured SHA-256 digests, checked in constant time.

The gateway never holds the keys themselves, only their digests (as
``printf %s KEY | sha256sum`` prints them).  A presented key is hashed and
compared against every configured digest with :func:`hmac.compare_digest`,
with no early exit on a match, so neither which key matched nor how much of
a digest matched shows in the timing.  The cost grows with the number of
keys (about 0.1 us each).
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import sha256
from hmac import compare_digest
from types import MappingProxyType

from txgateway.auth.identity import Identity
from txgateway.config.model import APIKey

#: Longer presented keys are refused without hashing.
MAX_API_KEY_BYTES = 4096

_NO_CLAIMS: MappingProxyType[str, object] = MappingProxyType({})


class APIKeys:
    """The configured keys; :meth:`identify` maps a presented key to its consumer."""

    def __init__(self, keys: Sequence[APIKey]) -> None:
        #: (digest, identity), identities built once and shared by every request.
        self._entries = tuple(
            (
                bytes.fromhex(key.sha256),
                Identity(consumer=key.consumer, roles=frozenset(key.roles), claims=_NO_CLAIMS, method="api_key"),
            )
            for key in keys
        )

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def identities(self) -> tuple[Identity, ...]:
        """The identity of each configured key, in configuration order."""
        return tuple(identity for _, identity in self._entries)

    def identify(self, presented: bytes) -> Identity | None:
        """The identity of the key ``presented``, or None when no configured key matches."""
        if not presented or len(presented) > MAX_API_KEY_BYTES:
            return None
        digest = sha256(presented).digest()
        found = None
        for expected, identity in self._entries:
            if compare_digest(digest, expected):
                found = identity
        return found
