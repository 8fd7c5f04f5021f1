"""What authentication costs per request, in microseconds.

Run: ``.venv/bin/python bench/auth_cost.py [--requests N]``.  Not a test.

Measures, with keys already loaded (a JWKS would be cached the same way):

- ``JWTVerifier.verify`` for HS256, RS256 (2048-bit), ES256 (P-256) and
  EdDSA (Ed25519), without the verified-token cache (every request pays the
  signature check) and with it (the same token again: a cache hit);
- ``APIKeys.identify`` with 1, 10 and 100 configured keys (every key is
  compared, by design);
- the whole auth stage of a route (header scan, verification, identity,
  two ``forward_claims`` headers) around a terminal that answers at once,
  minus that terminal alone, for a JWT with and without the cache and for
  an API key.

Each figure is the best of five rounds of ``--requests`` calls.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from txgateway.auth.api_keys import APIKeys
from txgateway.auth.jwt import JWTVerifier, VerificationKey, VerifiedTokenCache
from txgateway.auth.middleware import Authenticator, AuthMiddleware
from txgateway.config.model import APIKey, AuthConfig, JWTConfig
from txgateway.messages import Response
from txgateway.pipeline.context import RequestContext
from txgateway.runtime import Runtime

NOW = 1_700_000_000
SECRET = "bench-secret-0123456789abcdef0123456789"
HEADERS = [
    (b"host", b"api.example.com"),
    (b"user-agent", b"bench/1.0"),
    (b"accept", b"application/json"),
    (b"accept-encoding", b"gzip"),
    (b"x-request-id", b"abc"),
    (b"content-type", b"application/json"),
]
CLAIMS = {
    "sub": "user-12345",
    "iss": "https://idp.example.com/",
    "aud": "orders-api",
    "exp": NOW + 3600,
    "iat": NOW,
    "roles": ["user", "premium"],
    "permissions": "orders:read orders:write",
}


def best_us(fn: Callable[[], object], requests: int, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(requests):
            fn()
        best = min(best, time.perf_counter() - start)
    return best / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    n = args.requests

    clock = Clock()
    clock.advance(NOW)
    signers: dict[str, Any] = {
        "HS256": SECRET,
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    }
    keys = [VerificationKey.of(k.public_key()) for alg, k in signers.items() if alg != "HS256"]
    config = JWTConfig(algorithms=tuple(signers), secret=SECRET, issuer=CLAIMS["iss"], audience=CLAIMS["aud"])  # type: ignore[arg-type]

    print(f"auth cost per request, best of 5 x {n} (microseconds)")
    print(f"{'':34}{'no cache':>10}{'cached':>10}")
    for alg, signer in signers.items():
        tok = jwt.encode(CLAIMS, signer, algorithm=alg).encode()
        plain = JWTVerifier(config, clock, keys)
        cached = JWTVerifier(config, clock, keys, cache=VerifiedTokenCache())
        print(
            f"{'JWTVerifier.verify ' + alg:34}"
            f"{best_us(lambda v=plain, t=tok: v.verify(t), n):10.1f}"
            f"{best_us(lambda v=cached, t=tok: v.verify(t), n * 10):10.2f}"
        )

    for count in (1, 10, 100):
        api_keys = APIKeys([APIKey(hashlib.sha256(f"key-{i}".encode()).hexdigest(), f"c{i}") for i in range(count)])
        print(f"{f'APIKeys.identify, {count} keys':34}{best_us(lambda k=api_keys: k.identify(b'key-0'), n * 10):10.2f}")

    # The whole stage: header scan, verification, identity, forwarded headers.
    runtime = Runtime(clock, clock)
    auth_config = AuthConfig(
        enabled=True,
        jwt=config,
        api_keys=(APIKey(hashlib.sha256(b"the-key").hexdigest(), "bot", ("premium",)),),
        forward_claims=(("sub", "x-user-id"), ("roles", "x-user-roles")),
    )
    response: Deferred[Response] = succeed(None)  # type: ignore[arg-type]

    def terminal(ctx: RequestContext) -> Deferred[Response]:
        return response

    def stage(authenticator: Authenticator, headers: list[tuple[bytes, bytes]]) -> Callable[[], object]:
        handler = AuthMiddleware(authenticator, required=True, honour_exclusions=True).wrap(terminal)

        def one() -> object:
            return handler(RequestContext(b"GET", "/api/orders", b"", list(headers), client_ip="10.0.0.1"))

        outcome: list[object] = []
        one().addBoth(outcome.append)
        if outcome != [None]:
            raise SystemExit(f"the auth stage refused the bench request: {outcome}")
        return one

    def bare() -> object:
        return terminal(RequestContext(b"GET", "/api/orders", b"", list(HEADERS), client_ip="10.0.0.1"))

    baseline = best_us(bare, n * 10)
    uncached = Authenticator(auth_config, runtime)
    uncached.verifier = JWTVerifier(config, clock, keys)
    cached_stage = Authenticator(auth_config, runtime)
    cached_stage.verifier = JWTVerifier(config, clock, keys, cache=VerifiedTokenCache())
    print(f"{'':34}{'no cache':>10}{'cached':>10}   (whole stage, minus a bare request)")
    for alg in ("HS256", "RS256", "ES256"):
        tok = jwt.encode(CLAIMS, signers[alg], algorithm=alg)
        headers = [*HEADERS, (b"authorization", f"Bearer {tok}".encode())]
        print(
            f"{'auth stage, JWT ' + alg:34}"
            f"{best_us(stage(uncached, headers), n) - baseline:10.1f}"
            f"{best_us(stage(cached_stage, headers), n * 10) - baseline:10.2f}"
        )
    headers = [*HEADERS, (b"x-api-key", b"the-key")]
    print(f"{'auth stage, API key (1 key)':34}{best_us(stage(cached_stage, headers), n * 10) - baseline:10.2f}")


if __name__ == "__main__":
    main()
