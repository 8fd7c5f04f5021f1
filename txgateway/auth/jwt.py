"""JWT verification: compact JWS parsing, the algorithm allow-list, key choice, claims.

The configured ``algorithms`` are the only algorithms a token may use: its own
``alg`` header never widens them, ``none`` is never allowed, HMAC tokens are
checked with the configured secret only and asymmetric tokens with public
keys of the matching type only (RSA for RS*/PS*, the algorithm's curve for
ES*, Ed25519/Ed448 for EdDSA), so an HS256 token "signed" with an RSA public
key never verifies.  Signatures are checked by PyJWT's algorithm objects (on
``cryptography``); the envelope and the claims are checked here, against the
injected clock, so every time rule is testable under ``Clock``.

A rejection is a :class:`TokenRejected` carrying one of the short, stable codes
below, the only detail a client ever sees (``error_description``):

========================  ====================================================
``token too large``       longer than :data:`MAX_TOKEN_BYTES`
``malformed token``       not three base64url segments of JSON objects
``invalid token``         algorithm not allowed (``none`` included), no key
                          fits, bad signature, unsupported ``crit``/``b64``
``token expired``         ``exp`` passed (beyond the leeway)
``token not yet valid``   ``nbf`` or ``iat`` in the future (beyond the leeway)
``invalid claims``        ``exp`` missing; ``exp``/``nbf``/``iat`` not numbers;
                          ``sub`` missing or not a non-empty string; roles or
                          permissions neither a list of strings nor a
                          space-separated string
``invalid issuer``        ``iss`` differs from the configured issuer
``invalid audience``      configured audience not in ``aud``
========================  ====================================================

Claim checks run only after the signature verified, so an unauthenticated
client learns nothing beyond ``malformed token`` / ``invalid token``.
"""

from __future__ import annotations

import binascii
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import Algorithm, HMACAlgorithm, get_default_algorithms
from jwt.exceptions import InvalidKeyError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from txgateway.auth.identity import Identity
from txgateway.config.model import JWTConfig

if TYPE_CHECKING:
    from txgateway.auth.jwks import JWKSKeySet

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey

#: Longest token looked at; longer ones are rejected before any parsing.
MAX_TOKEN_BYTES = 16 * 1024
#: RSA keys shorter than this are refused (NIST SP 800-131A).
MIN_RSA_BITS = 2048
#: A token without ``kid`` is tried against at most this many keys.
MAX_KEY_TRIES = 4

TOKEN_TOO_LARGE = "token too large"
MALFORMED = "malformed token"
INVALID = "invalid token"
EXPIRED = "token expired"
NOT_YET_VALID = "token not yet valid"
INVALID_CLAIMS = "invalid claims"
INVALID_ISSUER = "invalid issuer"
INVALID_AUDIENCE = "invalid audience"

#: Every code a :class:`TokenRejected` may carry.
REJECTION_CODES = (
    TOKEN_TOO_LARGE, MALFORMED, INVALID, EXPIRED, NOT_YET_VALID, INVALID_CLAIMS, INVALID_ISSUER, INVALID_AUDIENCE,
)  # fmt: skip

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_EC_CURVES: Mapping[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}
_ALGORITHMS: Mapping[str, Algorithm] = {
    name: algorithm
    for name, algorithm in get_default_algorithms().items()
    if name in HMAC_ALGORITHMS or name in ASYMMETRIC_ALGORITHMS
}

_COMPACT = re.compile(rb"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]*)")
#: Times are clamped to this, so absurd values neither overflow nor last forever.
_FAR = 1e15


class TokenRejected(Exception):
    """The token is not acceptable; ``code`` is one of :data:`REJECTION_CODES`."""

    def __init__(self, code: str) -> None:
        self.code = code
        super().__init__(code)


class KeysUnavailable(Exception):
    """No key fits the token and the remote key set cannot be fetched (a 503, not a 401)."""


# -- keys ----------------------------------------------------------------------


def algorithms_for(key: PublicKey) -> frozenset[str]:
    """The asymmetric algorithms ``key`` may verify: its type decides, nothing else."""
    if isinstance(key, rsa.RSAPublicKey):
        return frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
    if isinstance(key, ec.EllipticCurvePublicKey):
        return frozenset(alg for alg, curve in _EC_CURVES.items() if isinstance(key.curve, curve))
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return frozenset({"EdDSA"})
    return frozenset()


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key and what it may verify: its ``kid`` (None matches any) and algorithms."""

    key: PublicKey
    kid: str | None
    algorithms: frozenset[str]

    @classmethod
    def of(cls, key: PublicKey, kid: str | None = None, alg: str | None = None) -> VerificationKey:
        """``alg`` (a JWK's ``alg``) narrows the algorithms to that one, if the key type fits it.

        Raises ValueError for unusable keys (unknown type, short RSA).
        """
        fits = algorithms_for(key)
        if not fits:
            raise ValueError(f"unsupported key type {type(key).__name__}")
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {key.key_size} bits, at least {MIN_RSA_BITS} required")
        if alg is not None:
            if alg not in fits:
                raise ValueError(f"key type does not fit its alg {alg!r}")
            fits = frozenset({alg})
        return cls(key, kid, fits)


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.+?-----END \1-----", re.DOTALL)


def load_public_key_file(path: str) -> tuple[VerificationKey, ...]:
    """The public keys of a PEM file: public keys and/or certificates, no private keys.

    Raises ValueError with a message fit for a configuration problem.
    """
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None
    keys: list[VerificationKey] = []
    for match in _PEM_BLOCK.finditer(data):
        kind = match.group(1)
        if b"PRIVATE" in kind:
            raise ValueError(f"{path} holds a private key: give the public key (or certificate) only")
        try:
            if kind == b"CERTIFICATE":
                key: Any = x509.load_pem_x509_certificate(match.group(0)).public_key()
            else:
                key = load_pem_public_key(match.group(0))
            keys.append(VerificationKey.of(key))
        except ValueError as error:
            raise ValueError(f"{path}: unusable {kind.decode('ascii').lower()}: {error}") from None
        except Exception as error:  # noqa: BLE001 - cryptography raises several types for bad input
            raise ValueError(f"{path}: unreadable {kind.decode('ascii').lower()}: {error}") from None
    if not keys:
        raise ValueError(f"{path} holds no PEM public key or certificate")
    return tuple(keys)


def hmac_secret(secret: str) -> bytes:
    """The HMAC key for ``secret``; refuses PEM / SSH public keys (key confusion)."""
    try:
        return HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
    except InvalidKeyError:
        raise ValueError(
            "the JWT secret looks like a public key: asymmetric keys go in jwks_url or public_key_file"
        ) from None


# -- parsing -----------------------------------------------------------------


_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
_PADDING = (b"", b"", b"==", b"=")


def _b64decode(segment: bytes) -> bytes:
    """Decode a base64url segment (its alphabet already checked by ``_COMPACT``)."""
    try:
        return binascii.a2b_base64(segment.translate(_FROM_URLSAFE) + _PADDING[len(segment) % 4])
    except binascii.Error:
        raise TokenRejected(MALFORMED) from None


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


#: JSON without NaN/Infinity (a NaN ``exp`` would compare as never expired).
_JSON = json.JSONDecoder(parse_constant=_no_constants)


def _json_object(data: bytes, code: str) -> dict[str, Any]:
    try:
        value = _JSON.decode(data.decode("utf-8"))
    except (ValueError, RecursionError):
        raise TokenRejected(code) from None
    if not isinstance(value, dict):
        raise TokenRejected(code)
    return value


@dataclass(frozen=True, slots=True)
class ParsedToken:
    """A token's envelope, parsed but not verified."""

    alg: str
    kid: str | None
    signing_input: bytes
    signature: bytes
    payload_segment: bytes


def parse_token(token: bytes) -> ParsedToken:
    """Split and decode a compact JWS; the payload stays encoded until the signature verified."""
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenRejected(TOKEN_TOO_LARGE)
    match = _COMPACT.fullmatch(token)
    if match is None:
        raise TokenRejected(MALFORMED)
    header_segment, payload_segment, signature_segment = match.groups()
    header = _json_object(_b64decode(header_segment), MALFORMED)
    alg = header.get("alg")
    kid = header.get("kid")
    if not isinstance(alg, str) or not (kid is None or isinstance(kid, str)):
        raise TokenRejected(MALFORMED)
    if "crit" in header or header.get("b64", True) is not True:
        # No JWS extension is supported, and RFC 7515 says to refuse what is critical.
        raise TokenRejected(INVALID)
    signing_input = token[: match.end(2)]
    return ParsedToken(alg, kid, signing_input, _b64decode(signature_segment), payload_segment)


# -- claims ------------------------------------------------------------------


def _time(value: object) -> float | None:
    """A NumericDate clamped to +-1e15 seconds; None when not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(max(-_FAR, min(value, _FAR)))


def names_claim(value: object) -> tuple[str, ...] | None:
    """Roles/permissions: a list of strings or one space-separated string; None if neither.

    An absent or null claim means no names.
    """
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(item for item in value if item)
    return None


def claim_path(name: str) -> Callable[[Mapping[str, Any]], object]:
    """A getter for claim ``name``; ``a.b`` reaches into nested objects when no claim is named so.

    (Keycloak puts roles in ``realm_access.roles``.)
    """
    parts = name.split(".")

    def get(claims: Mapping[str, Any]) -> object:
        if name in claims or len(parts) == 1:
            return claims.get(name)
        value: object = claims
        for part in parts:
            if not isinstance(value, dict):
                return None
            value = value.get(part)
        return value

    return get


class VerifiedToken:
    """What a good token established, and the span of time it stays good.

    ``derived`` is left to the caller to memoize what it computes from the
    identity (the middleware keeps the ``forward_claims`` headers there), so a
    cached token costs that work once.
    """

    __slots__ = ("derived", "identity", "valid_from", "valid_until")

    def __init__(self, identity: Identity, valid_from: float, valid_until: float) -> None:
        self.identity = identity
        #: Clock seconds from/until which the token is acceptable (leeway included).
        self.valid_from = valid_from
        self.valid_until = valid_until
        self.derived: Any = None

    def __repr__(self) -> str:
        return f"VerifiedToken({self.identity!r}, {self.valid_from}, {self.valid_until})"


class VerifiedTokenCache:
    """Token bytes -> :class:`VerifiedToken`, so a client's repeated token skips the crypto.

    LRU-bounded by entries and by the bytes of the tokens held; an entry is
    used only while the token's time window holds on the clock and the remote
    key set is still the version it was verified against (rotated keys
    invalidate).  Only verified tokens enter.
    """

    def __init__(
        self, max_entries: int = 10_000, max_bytes: int = 8 * 1024 * 1024, max_token_bytes: int = 4096
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_token_bytes = max_token_bytes
        self._entries: OrderedDict[bytes, tuple[VerifiedToken, int]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: bytes, now: float, version: int) -> VerifiedToken | None:
        entry = self._entries.get(token)
        if entry is None:
            return None
        verified, entry_version = entry
        if entry_version != version or not verified.valid_from <= now < verified.valid_until:
            del self._entries[token]
            self._bytes -= len(token)
            return None
        self._entries.move_to_end(token)
        return verified

    def put(self, token: bytes, verified: VerifiedToken, version: int) -> None:
        if len(token) > self.max_token_bytes or token in self._entries:
            return
        self._entries[token] = (verified, version)
        self._bytes += len(token)
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            old, _ = self._entries.popitem(last=False)
            self._bytes -= len(old)


# -- the verifier ------------------------------------------------------------


class JWTVerifier:
    """Verifies tokens for one ``jwt`` configuration; built once per configuration.

    :meth:`verify` answers synchronously whenever a key is at hand, and with a
    Deferred only when it must wait for the remote key set (first fetch still
    running, or an unknown ``kid`` worth one refetch).
    """

    def __init__(
        self,
        config: JWTConfig,
        clock: IReactorTime,
        static_keys: Sequence[VerificationKey] = (),
        key_set: JWKSKeySet | None = None,
        cache: VerifiedTokenCache | None = None,
    ) -> None:
        self._clock = clock
        self._secret = hmac_secret(config.secret) if config.secret is not None else None
        allowed = set(config.algorithms)
        if self._secret is None:
            allowed -= HMAC_ALGORITHMS
        if not static_keys and key_set is None:
            allowed -= ASYMMETRIC_ALGORITHMS
        #: alg -> the PyJWT algorithm object, for the allowed algorithms only.
        self._algorithms = {alg: _ALGORITHMS[alg] for alg in allowed if alg in _ALGORITHMS}
        self._static_keys = tuple(static_keys)
        self._key_set = key_set
        self._cache = cache
        self._issuer = config.issuer
        self._audience = config.audience
        self._leeway = config.leeway
        self._roles = claim_path(config.roles_claim)
        self._permissions = claim_path(config.permissions_claim)

    @property
    def allowed_algorithms(self) -> frozenset[str]:
        return frozenset(self._algorithms)

    def _key_version(self) -> int:
        return self._key_set.version if self._key_set is not None else 0

    def verify(self, token: bytes) -> VerifiedToken | Deferred[VerifiedToken]:
        """The token's identity, or raises :class:`TokenRejected` / :class:`KeysUnavailable`
        (a returned Deferred fails with them)."""
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenRejected(TOKEN_TOO_LARGE)
        cache = self._cache
        if cache is not None:
            hit = cache.get(token, self._clock.seconds(), self._key_version())
            if hit is not None:
                return hit
        parsed = parse_token(token)
        algorithm = self._algorithms.get(parsed.alg)
        if algorithm is None:
            raise TokenRejected(INVALID)
        if parsed.alg in HMAC_ALGORITHMS:
            if not algorithm.verify(parsed.signing_input, self._secret, parsed.signature):
                raise TokenRejected(INVALID)
            return self._accept(token, parsed)
        keys = self._candidates(parsed)
        if keys:
            return self._check_signature(token, parsed, keys)
        key_set = self._key_set
        wait = key_set.wait_for_keys() if key_set is not None else None
        if wait is None:
            return self._without_new_keys(token, parsed)
        return wait.addCallback(lambda _: self._without_new_keys(token, parsed))

    def _candidates(self, parsed: ParsedToken) -> list[VerificationKey]:
        alg, kid = parsed.alg, parsed.kid
        keys = [k for k in self._static_keys if alg in k.algorithms and (kid is None or k.kid in (None, kid))]
        if self._key_set is not None:
            keys.extend(self._key_set.candidates(alg, kid))
        return keys

    def _without_new_keys(self, token: bytes, parsed: ParsedToken) -> VerifiedToken:
        """After any wait for the key set: verify if a key fits now, else 401 or 503."""
        keys = self._candidates(parsed)
        if keys:
            return self._check_signature(token, parsed, keys)
        if self._key_set is not None and not self._key_set.available:
            raise KeysUnavailable(self._key_set.url)
        raise TokenRejected(INVALID)

    def _check_signature(self, token: bytes, parsed: ParsedToken, keys: list[VerificationKey]) -> VerifiedToken:
        algorithm = self._algorithms[parsed.alg]
        for key in keys[:MAX_KEY_TRIES]:
            try:
                good = algorithm.verify(parsed.signing_input, key.key, parsed.signature)
            except Exception:  # noqa: BLE001 - hostile signatures must never become a 500
                good = False
            if good:
                return self._accept(token, parsed)
        raise TokenRejected(INVALID)

    def _accept(self, token: bytes, parsed: ParsedToken) -> VerifiedToken:
        claims = _json_object(_b64decode(parsed.payload_segment), INVALID_CLAIMS)
        verified = self._check_claims(claims)
        if self._cache is not None:
            self._cache.put(token, verified, self._key_version())
        return verified

    def _check_claims(self, claims: dict[str, Any]) -> VerifiedToken:
        exp = _time(claims.get("exp"))
        nbf_raw, iat_raw = claims.get("nbf"), claims.get("iat")
        nbf, iat = _time(nbf_raw), _time(iat_raw)
        sub = claims.get("sub")
        roles = names_claim(self._roles(claims))
        permissions = names_claim(self._permissions(claims))
        if (
            exp is None
            or (nbf_raw is not None and nbf is None)
            or (iat_raw is not None and iat is None)
            or not isinstance(sub, str)
            or not sub
            or roles is None
            or permissions is None
        ):
            raise TokenRejected(INVALID_CLAIMS)
        now, leeway = self._clock.seconds(), self._leeway
        if exp <= now - leeway:
            raise TokenRejected(EXPIRED)
        valid_from = max(nbf if nbf is not None else -_FAR, iat if iat is not None else -_FAR) - leeway
        if valid_from > now:
            raise TokenRejected(NOT_YET_VALID)
        if self._issuer is not None and claims.get("iss") != self._issuer:
            raise TokenRejected(INVALID_ISSUER)
        if self._audience is not None:
            aud = claims.get("aud")
            if not (aud == self._audience or (isinstance(aud, list) and self._audience in aud)):
                raise TokenRejected(INVALID_AUDIENCE)
        identity = Identity(
            consumer=sub,
            roles=frozenset(roles),
            permissions=frozenset(permissions),
            claims=MappingProxyType(claims),
            method="jwt",
        )
        return VerifiedToken(identity, valid_from, exp + leeway)
