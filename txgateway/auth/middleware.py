"""The auth stage of a route: who is calling (JWT, API key), and may they (roles).

Per route, from ``routes[].auth`` (default: ``required`` when
``middleware.auth.enabled``, else ``none``) and ``routes[].roles``:

- ``required``: credentials must be present and valid, else 401;
- ``optional``: valid credentials give an identity, none gives an anonymous
  request, invalid ones are still a 401;
- ``none``: nothing is checked;
- ``roles``: the identity needs any one of them, else 403.  Roles make
  authentication required whatever ``auth`` says (anonymous: 401).
- ``exclude_paths`` (globs, ``*`` matching across ``/``, compared with the
  normalized path) skip authentication for routes that set neither ``auth``
  nor ``roles`` themselves: a route's own setting wins over the global list.

Credentials, first found wins (a bad one is a 401, never a fall-back):
``Authorization: Bearer <jwt>``, then the ``jwt.query_param`` query
parameter, then the API key header.  More than one ``Authorization`` header,
API key header or query token is a 400 (the upstream might read another copy
than the one verified).  Where a request is authenticated, the query token and
the API key header are removed before forwarding (the rest of the query is
kept byte for byte); ``Authorization`` is forwarded as is.  Where it is not
(``auth: none``, excluded paths) they pass through untouched: the gateway
does not consume them there.

``forward_claims`` headers are set from the identity (lists joined with
``,``; values with control characters, objects and absent claims leave the
header unset).  For an API key, ``sub`` is its consumer and the roles /
permissions claim names give its roles (sorted); other claims are unset.
Client-sent copies of those headers are removed on every route,
authenticated or not.

A 401 carries ``WWW-Authenticate: Bearer realm="txgateway"``, plus
``error="invalid_token", error_description="<code>"`` when a token was
presented; the code (see :mod:`txgateway.auth.jwt`) is also the JSON
``message``.  A bad API key is ``invalid api key``.  When the JWKS cannot be
fetched and no cached key fits the token, the answer is 503.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from txgateway.auth.api_keys import APIKeys
from txgateway.auth.identity import Identity
from txgateway.auth.jwks import shared_key_set
from txgateway.auth.jwt import (
    REJECTION_CODES,
    JWTVerifier,
    KeysUnavailable,
    TokenRejected,
    VerificationKey,
    VerifiedToken,
    VerifiedTokenCache,
    claim_path,
    load_public_key_file,
    names_claim,
)
from txgateway.config.model import AuthConfig, GatewayConfig, JWTConfig, RouteConfig
from txgateway.errors import BadRequest, Forbidden, GatewayError, ServiceUnavailable, Unauthorized
from txgateway.messages import Response
from txgateway.observability.metrics import GatewayMetrics
from txgateway.pipeline.context import RequestContext
from txgateway.pipeline.pipeline import Handler
from txgateway.routing.pattern import normalize_path
from txgateway.runtime import Runtime

Headers = list[tuple[bytes, bytes]]
#: An established identity and the ``forward_claims`` headers it gives the upstream.
Authenticated = tuple[Identity, Headers]

REALM = b'Bearer realm="txgateway"'
#: Message of the 401 for a wrong API key.
INVALID_API_KEY = "invalid api key"
#: Message of the 403 for an identity without any of the route's roles.
INSUFFICIENT_ROLE = "insufficient role"
#: Message of the 503 when the JWKS is unreachable and no cached key fits.
KEYS_UNAVAILABLE = "authentication keys unavailable"

_CHALLENGES: dict[str, list[tuple[bytes, bytes]]] = {}


def _token_challenge(code: str) -> list[tuple[bytes, bytes]]:
    challenge = _CHALLENGES.get(code)
    if challenge is None:
        value = REALM + b', error="invalid_token", error_description="' + code.encode("ascii") + b'"'
        challenge = _CHALLENGES[code] = [(b"www-authenticate", value)]
    return challenge


_NO_TOKEN_CHALLENGE = [(b"www-authenticate", REALM)]
_SCOPE_CHALLENGE = [(b"www-authenticate", REALM + b', error="insufficient_scope"')]
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def compile_globs(patterns: Iterable[str]) -> Callable[[str], bool] | None:
    """A matcher for path globs (``*`` matches anything, ``/`` included); None for no globs."""
    parts = ["(?:" + ".*".join(re.escape(piece) for piece in glob.split("*")) + ")" for glob in patterns]
    if not parts:
        return None
    regex = re.compile("|".join(parts), re.DOTALL)

    def matches(path: str) -> bool:
        return regex.fullmatch(path) is not None

    return matches


def _bearer(value: bytes) -> bytes | None:
    """The token of an ``Authorization: Bearer`` value (b"" when empty); None for other schemes."""
    if value[:6].lower() != b"bearer" or value[6:7] not in (b"", b" ", b"\t"):
        return None
    return value[6:].strip(b" \t")


def _header_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        items = [_header_text(item) for item in value if not isinstance(item, (list, dict))]
        if len(items) != len(value) or any(item is None for item in items):
            return None
        return ",".join(item for item in items if item is not None)
    return None


class ClaimHeaders:
    """``forward_claims``: identity -> upstream headers, and the names clients may not send."""

    def __init__(self, forward_claims: Iterable[tuple[str, str]], roles_claim: str, permissions_claim: str) -> None:
        self._roles_claim = roles_claim
        self._permissions_claim = permissions_claim
        self._pairs = [(claim, claim_path(claim), header.lower().encode("latin-1")) for claim, header in forward_claims]
        self.names = frozenset(header for _, _, header in self._pairs)

    def for_identity(self, identity: Identity) -> Headers:
        headers: Headers = []
        for claim, get, header in self._pairs:
            text = self._text(identity, claim, get)
            if text and _UNSAFE.search(text) is None:
                headers.append((header, text.encode("utf-8")))
        return headers

    def _text(self, identity: Identity, claim: str, get: Callable[[Any], object]) -> str | None:
        if identity.method != "jwt":
            if claim == "sub":
                return identity.consumer
            if claim == self._roles_claim:
                return ",".join(sorted(identity.roles))
            if claim == self._permissions_claim:
                return ",".join(sorted(identity.permissions))
            return None
        value = get(identity.claims)
        if claim in (self._roles_claim, self._permissions_claim):
            names = names_claim(value)
            return ",".join(names) if names else None
        return _header_text(value)


def build_verifier(config: JWTConfig, runtime: Runtime, cache: VerifiedTokenCache | None = None) -> JWTVerifier:
    """The verifier of a ``jwt`` block: file keys loaded now, the JWKS shared through ``runtime``."""
    static: tuple[VerificationKey, ...] = ()
    if config.public_key_file is not None:
        static = load_public_key_file(config.public_key_file)
    key_set = shared_key_set(runtime, config.jwks_url, config.jwks_refresh) if config.jwks_url else None
    return JWTVerifier(config, runtime.clock, static, key_set, cache)


class Authenticator:
    """Everything about ``middleware.auth`` that is per configuration, not per route.

    Built once per configuration generation and shared by its routes (see
    :func:`for_route`), so they share one verifier and one verified-token cache
    (10,000 tokens, 8 MiB of token bytes; a hit skips the signature check and
    the claim parsing, and the forwarded headers are memoized on it).
    """

    def __init__(self, config: AuthConfig, runtime: Runtime) -> None:
        jwt = config.jwt
        self.verifier = build_verifier(jwt, runtime, VerifiedTokenCache()) if jwt is not None else None
        self.api_keys = APIKeys(config.api_keys) if config.api_keys else None
        self._api_header = config.api_key_header.lower().encode("latin-1")
        self._query_param = jwt.query_param.encode("utf-8") if jwt is not None and jwt.query_param else None
        self.claim_headers = ClaimHeaders(
            config.forward_claims,
            jwt.roles_claim if jwt is not None else "roles",
            jwt.permissions_claim if jwt is not None else "permissions",
        )
        self._excluded = compile_globs(config.exclude_paths)
        #: API key identities are fixed: their forwarded headers are built once.
        self._api_key_headers = {
            id(identity): self.claim_headers.for_identity(identity)
            for identity in (self.api_keys.identities if self.api_keys is not None else ())
        }
        #: Removed from every request that is authenticated.
        self._drop = self.claim_headers.names | ({self._api_header} if self.api_keys is not None else frozenset())

    @property
    def can_authenticate(self) -> bool:
        return self.verifier is not None or self.api_keys is not None

    def is_excluded(self, path: str) -> bool:
        if self._excluded is None:
            return False
        try:
            return self._excluded(normalize_path(path))
        except BadRequest:
            return False

    def strip_claim_headers(self, ctx: RequestContext) -> None:
        """Remove client-sent copies of the ``forward_claims`` headers."""
        names = self.claim_headers.names
        if names:
            ctx.headers = [(n, v) for n, v in ctx.headers if n not in names]

    def authenticate(self, ctx: RequestContext) -> Authenticated | Deferred[Authenticated] | None:
        """The request's identity and its forwarded headers, None when it carries no
        credentials, or raises a GatewayError (a returned Deferred fails with one).
        Removes the consumed credentials and the client's ``forward_claims`` headers
        from ``ctx``."""
        drop, api_header, verifier = self._drop, self._api_header, self.verifier
        authorization: list[bytes] = []
        api_keys: list[bytes] = []
        kept: Headers = []
        for item in ctx.headers:
            name = item[0]
            if name in drop:
                if name == api_header:
                    api_keys.append(item[1])
            else:
                if name == b"authorization" and verifier is not None:
                    authorization.append(item[1])
                kept.append(item)
        ctx.headers = kept
        token = None
        if authorization:
            if len(authorization) > 1:
                raise BadRequest("multiple authorization headers")
            token = _bearer(authorization[0])
        if self._query_param is not None and ctx.query:
            query_token = self._take_query_token(ctx)
            if token is None:
                token = query_token
        if token is not None and verifier is not None:
            return self._verify(verifier, token)
        if api_keys and self.api_keys is not None:
            if len(api_keys) > 1:
                raise BadRequest("multiple api keys")
            identity = self.api_keys.identify(api_keys[0].strip())
            if identity is None:
                raise Unauthorized(INVALID_API_KEY, _NO_TOKEN_CHALLENGE)
            return identity, self._api_key_headers[id(identity)]
        return None

    def _take_query_token(self, ctx: RequestContext) -> bytes | None:
        """Remove the token parameter from ``ctx.query``; the rest stays byte-identical."""
        query, name = ctx.query, self._query_param
        assert name is not None
        if name not in query and b"%" not in query:
            return None
        kept: list[bytes] = []
        found: list[bytes] = []
        for part in query.split(b"&"):
            key, _, value = part.partition(b"=")
            if b"%" in key or b"+" in key:
                key = unquote_to_bytes(key.replace(b"+", b" "))
            if key == name:
                found.append(value)
            else:
                kept.append(part)
        if not found:
            return None
        ctx.query = b"&".join(kept)
        if len(found) > 1:
            raise BadRequest("multiple tokens in the query")
        return unquote_to_bytes(found[0])

    def _verify(self, verifier: JWTVerifier, token: bytes) -> Authenticated | Deferred[Authenticated]:
        try:
            result = verifier.verify(token)
        except (TokenRejected, KeysUnavailable) as error:
            raise _rejection(error) from None
        if isinstance(result, VerifiedToken):
            return self._authenticated(result)
        return result.addCallbacks(self._authenticated, _failed_verification)

    def _authenticated(self, verified: VerifiedToken) -> Authenticated:
        """The identity and its headers, memoized on the (possibly cached) token."""
        derived: Authenticated | None = verified.derived
        if derived is None:
            identity = verified.identity
            derived = verified.derived = (identity, self.claim_headers.for_identity(identity))
        return derived


def _failed_verification(failure: Any) -> Any:
    error = failure.value
    if isinstance(error, (TokenRejected, KeysUnavailable)):
        raise _rejection(error)
    return failure


#: ``txgateway_auth_failures`` reason of each token rejection code ("token expired" -> "token_expired").
_TOKEN_REASONS = {code: code.replace(" ", "_") for code in REJECTION_CODES}


def failure_reason(error: GatewayError) -> str:
    """The ``reason`` label of a refusal by the auth stage (a bounded set)."""
    if isinstance(error, Unauthorized):
        if error.message == INVALID_API_KEY:
            return "invalid_api_key"
        return _TOKEN_REASONS.get(error.message, "missing_token")
    if isinstance(error, Forbidden):
        return "insufficient_role"
    if isinstance(error, BadRequest):
        return "multiple_credentials"
    if isinstance(error, ServiceUnavailable):
        return "keys_unavailable"
    return error.code


def _rejection(error: TokenRejected | KeysUnavailable) -> GatewayError:
    if isinstance(error, KeysUnavailable):
        return ServiceUnavailable(KEYS_UNAVAILABLE)
    return Unauthorized(error.code, _token_challenge(error.code))


class AuthMiddleware:
    """One route's auth stage over the shared :class:`Authenticator`."""

    def __init__(
        self,
        authenticator: Authenticator,
        *,
        required: bool,
        roles: Iterable[str] = (),
        honour_exclusions: bool,
        route: str = "",
        metrics: GatewayMetrics | None = None,
    ) -> None:
        """``metrics`` counts this route's (``route``) refusals by reason; None: not counted."""
        self.authenticator = authenticator
        self.roles = frozenset(roles)
        #: Roles make authentication required: an anonymous caller has no role.
        self.required = required or bool(self.roles)
        self.honour_exclusions = honour_exclusions
        self.route = route
        self._failures = metrics.auth_failures if metrics is not None else None
        #: ``txgateway_auth_failures`` children by reason, resolved on first use.
        self._by_reason: dict[str, Any] = {}

    def _refused(self, error: GatewayError) -> None:
        """Count a refusal (the auth stage's own, not a later stage's)."""
        if self._failures is None:
            return
        reason = failure_reason(error)
        child = self._by_reason.get(reason)
        if child is None:
            child = self._by_reason[reason] = self._failures.labels(self.route, reason)
        child.inc()

    def _admit(self, identity: Identity | None) -> None:
        if identity is None:
            if self.required:
                raise Unauthorized(headers=_NO_TOKEN_CHALLENGE)
        elif self.roles and self.roles.isdisjoint(identity.roles):
            raise Forbidden(INSUFFICIENT_ROLE, _SCOPE_CHALLENGE if identity.method == "jwt" else ())

    def wrap(self, next: Handler) -> Handler:
        authenticator = self.authenticator
        admit = self._admit
        excluded = authenticator.is_excluded if self.honour_exclusions else None

        refused = self._refused

        def settle(authenticated: Authenticated | None, ctx: RequestContext) -> RequestContext:
            if authenticated is None:
                admit(None)
            else:
                identity, forwarded = authenticated
                admit(identity)
                ctx.identity = identity
                if forwarded:
                    ctx.headers.extend(forwarded)
            return ctx

        def refused_later(failure: Failure) -> Failure:
            if isinstance(failure.value, GatewayError):
                refused(failure.value)
            return failure

        def auth(ctx: RequestContext) -> Deferred[Response]:
            if excluded is not None and excluded(ctx.path):
                authenticator.strip_claim_headers(ctx)
                return next(ctx)
            try:
                result = authenticator.authenticate(ctx)
                if isinstance(result, Deferred):
                    # Only this stage's refusals are counted: next() runs after the errback.
                    return result.addCallback(settle, ctx).addErrback(refused_later).addCallback(next)
                settle(result, ctx)
            except GatewayError as error:
                refused(error)
                return fail(error)
            try:
                return next(ctx)
            except GatewayError as error:
                return fail(error)

        return auth


class ClaimHeaderStrip:
    """For routes that do not authenticate: only remove client copies of ``forward_claims`` headers."""

    def __init__(self, names: frozenset[bytes]) -> None:
        self.names = names

    def wrap(self, next: Handler) -> Handler:
        names = self.names

        def strip(ctx: RequestContext) -> Deferred[Response]:
            ctx.headers = [(n, v) for n, v in ctx.headers if n not in names]
            return next(ctx)

        return strip


class _Generation:
    """The authenticator of the configuration generation being assembled."""

    def __init__(self) -> None:
        self.config: GatewayConfig | None = None
        self.authenticator: Authenticator | None = None

    def authenticator_for(self, config: GatewayConfig, runtime: Runtime) -> Authenticator:
        if self.config is not config or self.authenticator is None:
            self.authenticator = Authenticator(config.middleware.auth, runtime)
            self.config = config
        return self.authenticator


_log = Logger(namespace="txgateway.auth")


def claim_header_strip(config: GatewayConfig) -> ClaimHeaderStrip | None:
    """Removes client-sent copies of the ``forward_claims`` headers; None when there are none.

    Runs on every route, authenticated or not, and even with
    ``middleware.enabled: false``: an upstream that trusts X-User-ID must
    never see one a client wrote.
    """
    claims = config.middleware.auth.forward_claims
    if not claims:
        return None
    return ClaimHeaderStrip(frozenset(header.lower().encode("latin-1") for _, header in claims))


def for_route(route: RouteConfig, config: GatewayConfig, runtime: Runtime) -> AuthMiddleware | ClaimHeaderStrip | None:
    """The route's auth stage; None when it neither authenticates nor has headers to strip."""
    auth = config.middleware.auth
    mode = route.auth or ("required" if auth.enabled else "none")
    if mode == "none" and not route.roles:
        return claim_header_strip(config)
    authenticator = runtime.shared(("auth", "generation"), _Generation).authenticator_for(config, runtime)
    if not authenticator.can_authenticate and (mode == "required" or route.roles):
        _log.warn(
            "route {route} requires authentication but middleware.auth configures no JWT or API key: "
            "every request will get 401",
            route=route.name,
        )
    return AuthMiddleware(
        authenticator,
        required=mode == "required",
        roles=route.roles,
        honour_exclusions=route.auth is None and not route.roles,
        route=route.name,
        metrics=runtime.metrics,
    )
