"""Authentication: JWT (PyJWT, static keys or a JWKS URL) and API keys, per route.

The pipeline stage is :func:`txgateway.auth.middleware.for_route`; the parts
are usable on their own (the bench and users' tests do):

- :class:`JWTVerifier` checks a token: ``verify(token)`` gives a
  :class:`VerifiedToken` (a Deferred only while waiting for JWKS keys) or
  raises :class:`TokenRejected` with a short code, or :class:`KeysUnavailable`;
- :class:`JWKSKeySet` keeps a remote key set fresh (fetch injected);
- :class:`APIKeys` maps a presented key to its :class:`Identity`.
"""

from txgateway.auth.api_keys import APIKeys
from txgateway.auth.identity import Identity
from txgateway.auth.jwks import JWKSKeySet, TreqJWKSFetcher, parse_jwks, shared_key_set
from txgateway.auth.jwt import (
    REJECTION_CODES,
    JWTVerifier,
    KeysUnavailable,
    TokenRejected,
    VerificationKey,
    VerifiedToken,
    VerifiedTokenCache,
    load_public_key_file,
)

__all__ = [
    "REJECTION_CODES",
    "APIKeys",
    "Identity",
    "JWKSKeySet",
    "JWTVerifier",
    "KeysUnavailable",
    "TokenRejected",
    "TreqJWKSFetcher",
    "VerificationKey",
    "VerifiedToken",
    "VerifiedTokenCache",
    "load_public_key_file",
    "parse_jwks",
    "shared_key_set",
]
