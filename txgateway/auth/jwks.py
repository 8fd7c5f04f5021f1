"""The remote key set of ``jwt.jwks_url``: fetched, cached, refreshed, shared.

One :class:`JWKSKeySet` per URL lives in :meth:`Runtime.shared`, so every
route and every configuration generation uses the same keys and a reload
does not refetch.  Promises:

- the first fetch starts when the configuration is loaded and never blocks
  it; requests that need a key before it completes wait for it, at most
  ``wait_timeout`` seconds;
- the set is refetched every ``refresh`` seconds; after a failed fetch it is
  retried sooner (1, 2, 4... seconds, at most ``max_retry_delay``) and the
  keys already known stay in use;
- a token whose ``kid`` no known key has triggers a refetch only when no
  fetch started in the last ``unknown_kid_interval`` (30) seconds, so a
  flood of made-up ``kid`` values costs the identity provider one request
  per 30 s and the gateway no memory;
- an outage is logged once when it starts and once when it ends;
- :meth:`stop` cancels the timers and the fetch in flight and closes the
  connection pool.

Only signature keys of type RSA, EC and OKP are taken; ``oct`` (HMAC) keys
are ignored, since HMAC tokens are verified with the configured secret only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from http.cookiejar import DefaultCookiePolicy
from typing import Any

from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.defer import TimeoutError as FetchTimeout
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from txgateway.auth.jwt import ASYMMETRIC_ALGORITHMS, VerificationKey
from txgateway.bounded_body import BoundedBody

#: Fetch the document at a URL: its body, or a failure.
Fetch = Callable[[str], "Deferred[bytes]"]

#: A JWKS larger than this is refused.
MAX_JWKS_BYTES = 1024 * 1024
#: Keys past this many in one document are ignored.
MAX_KEYS = 64

_FROM_JWK: dict[str, Callable[[dict[str, Any]], Any]] = {
    "RSA": RSAAlgorithm.from_jwk,
    "EC": ECAlgorithm.from_jwk,
    "OKP": OKPAlgorithm.from_jwk,
}


class InvalidJWKS(ValueError):
    """The document is not a usable JWK Set."""


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def parse_jwks(document: bytes) -> tuple[tuple[VerificationKey, ...], int]:
    """The usable signature keys of a JWK Set document, and how many keys were skipped.

    Raises :class:`InvalidJWKS` when the document is not a JWK Set or has no
    usable key (so a broken refresh keeps the old keys).
    """
    try:
        data = json.loads(document, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        raise InvalidJWKS("not JSON") from None
    raw_keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(raw_keys, list):
        raise InvalidJWKS("no 'keys' list")
    keys: list[VerificationKey] = []
    skipped = max(0, len(raw_keys) - MAX_KEYS)
    for jwk in raw_keys[:MAX_KEYS]:
        key = _key(jwk)
        if key is None:
            skipped += 1
        else:
            keys.append(key)
    if not keys:
        raise InvalidJWKS(f"no usable signature key among {len(raw_keys)}")
    return tuple(keys), skipped


def _key(jwk: object) -> VerificationKey | None:
    if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
        return None
    from_jwk = _FROM_JWK.get(jwk.get("kty"))  # type: ignore[arg-type]
    kid, alg = jwk.get("kid"), jwk.get("alg")
    if from_jwk is None or not (kid is None or isinstance(kid, str)):
        return None
    if alg is not None and alg not in ASYMMETRIC_ALGORITHMS:
        return None
    try:
        key = from_jwk(jwk)
        public = key.public_key() if hasattr(key, "private_bytes") else key
        return VerificationKey.of(public, kid, alg)
    except Exception:  # noqa: BLE001 - one bad key must not spoil the set
        return None


class JWKSKeySet:
    """The keys of one JWKS URL, kept fresh on ``clock`` with ``fetch``."""

    log = Logger()

    def __init__(
        self,
        url: str,
        clock: IReactorTime,
        fetch: Fetch,
        *,
        refresh: float = 300.0,
        unknown_kid_interval: float = 30.0,
        wait_timeout: float = 5.0,
        fetch_timeout: float = 10.0,
        max_retry_delay: float = 30.0,
        close: Callable[[], Any] | None = None,
    ) -> None:
        self.url = url
        self.refresh = refresh
        self.unknown_kid_interval = unknown_kid_interval
        self.wait_timeout = wait_timeout
        self.fetch_timeout = fetch_timeout
        self.max_retry_delay = max_retry_delay
        self._clock = clock
        self._fetch_document = fetch
        self._close = close
        #: Bumped whenever the keys change (cached verifications then lapse).
        self.version = 0
        self._by_kid: dict[str, list[VerificationKey]] = {}
        self._no_kid: list[VerificationKey] = []
        self._document: bytes | None = None
        self._completed = False
        self._failures = 0
        self._fetching: Deferred[Any] | None = None
        self._last_started: float | None = None
        self._next: IDelayedCall | None = None
        self._waiters: dict[Deferred[None], IDelayedCall] = {}
        self._stopped = False

    # -- what the verifier asks --------------------------------------------

    @property
    def available(self) -> bool:
        """The last fetch succeeded: a missing key is then the token's fault (401), else ours (503)."""
        return self._completed and self._failures == 0

    @property
    def key_count(self) -> int:
        return len(self._no_kid) + sum(len(keys) for keys in self._by_kid.values())

    def candidates(self, alg: str, kid: str | None) -> list[VerificationKey]:
        """Keys that may verify a token with this ``alg`` and ``kid``."""
        if kid is None:
            keys = [k for ks in self._by_kid.values() for k in ks]
            keys.extend(self._no_kid)
        else:
            keys = self._by_kid.get(kid, []) + self._no_kid
        return [k for k in keys if alg in k.algorithms]

    def wait_for_keys(self) -> Deferred[None] | None:
        """A Deferred firing (never failing) when new keys may be in: the fetch in
        flight completed, or ``wait_timeout`` passed.  None when there is nothing
        worth waiting for (a fetch started less than ``unknown_kid_interval`` ago)."""
        if self._stopped:
            return None
        if self._fetching is None:
            started = self._last_started
            if started is not None and self._clock.seconds() - started < self.unknown_kid_interval:
                return None
            self._fetch()
            if self._fetching is None:  # the fetch completed synchronously
                return succeed(None)
        return self._waiter()

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Begin the first fetch (non-blocking) and the refresh cycle."""
        if self._fetching is None and self._last_started is None and not self._stopped:
            self._fetch()

    def stop(self) -> Deferred[Any]:
        """Cancel the refresh timer and the fetch in flight, release waiters, close the pool."""
        self._stopped = True
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        if self._fetching is not None:
            self._fetching.cancel()
        self._release_waiters()
        if self._close is None:
            return succeed(None)
        return maybeDeferred(self._close)

    # -- fetching ------------------------------------------------------------

    def _fetch(self) -> None:
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        self._last_started = self._clock.seconds()
        fetching: Deferred[Any] = maybeDeferred(self._fetch_document, self.url)
        self._fetching = fetching
        fetching.addTimeout(self.fetch_timeout, self._clock)
        fetching.addCallback(self._loaded)
        fetching.addErrback(self._failed)
        fetching.addBoth(self._done, fetching)

    def _loaded(self, document: bytes) -> None:
        if document != self._document:
            keys, skipped = parse_jwks(document)
            by_kid: dict[str, list[VerificationKey]] = {}
            no_kid: list[VerificationKey] = []
            for key in keys:
                if key.kid is None:
                    no_kid.append(key)
                else:
                    by_kid.setdefault(key.kid, []).append(key)
            self._by_kid, self._no_kid, self._document = by_kid, no_kid, document
            self.version += 1
            self.log.info(
                "JWKS {url}: {count} keys loaded ({skipped} skipped)", url=self.url, count=len(keys), skipped=skipped
            )
        if self._failures:
            self.log.info(
                "JWKS {url} available again after {failures} failed fetches", url=self.url, failures=self._failures
            )
        self._failures = 0
        self._completed = True

    def _failed(self, failure: Failure) -> None:
        if self._stopped and failure.check(CancelledError):
            return
        self._failures += 1
        self._completed = True
        if self._failures == 1:
            self.log.warn(
                "JWKS {url} unavailable: {reason}; {count} cached keys stay in use, tokens needing "
                "another key get 503 until it is back",
                url=self.url,
                reason=_reason(failure),
                count=self.key_count,
            )

    def _done(self, _: object, fetching: Deferred[Any]) -> None:
        if self._fetching is fetching:
            self._fetching = None
        if not self._stopped:
            if self._failures:
                delay = min(self.refresh, self.max_retry_delay, 2.0 ** (self._failures - 1))
            else:
                delay = self.refresh
            self._next = self._clock.callLater(delay, self._fetch)
        self._release_waiters()

    # -- waiting -------------------------------------------------------------

    def _waiter(self) -> Deferred[None]:
        def cancel(waiter: Deferred[None]) -> None:
            timer = self._waiters.pop(waiter, None)
            if timer is not None and timer.active():
                timer.cancel()

        waiter: Deferred[None] = Deferred(cancel)
        self._waiters[waiter] = self._clock.callLater(self.wait_timeout, self._release, waiter)
        return waiter

    def _release(self, waiter: Deferred[None]) -> None:
        if self._waiters.pop(waiter, None) is not None:
            waiter.callback(None)

    def _release_waiters(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for waiter, timer in waiters.items():
            if timer.active():
                timer.cancel()
            waiter.callback(None)


def _reason(failure: Failure) -> str:
    if failure.check(CancelledError, FetchTimeout):
        return "timed out"
    message = failure.getErrorMessage()
    return f"{failure.type.__name__}: {message}" if message else failure.type.__name__  # type: ignore[union-attr]


# -- the real fetch: treq on the runtime's reactor -------------------------------


class JWKSFetchError(Exception):
    """The JWKS endpoint answered, but not with a usable document."""


class TreqJWKSFetcher:
    """GETs JWKS documents with treq on ``reactor``: its own pool, no redirects, no cookies kept."""

    def __init__(self, reactor: Any, max_bytes: int = MAX_JWKS_BYTES) -> None:
        self.max_bytes = max_bytes
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 1
        no_cookies = IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
        self._client = HTTPClient(Agent(reactor, pool=self._pool), cookiejar=no_cookies)

    def fetch(self, url: str) -> Deferred[bytes]:
        d = self._client.get(
            url, headers=Headers({b"accept": [b"application/json"]}), allow_redirects=False, unbuffered=True
        )
        return d.addCallback(self._body)

    def _body(self, response: IResponse) -> Deferred[bytes]:
        body = BoundedBody(self.max_bytes, lambda limit: JWKSFetchError(f"document larger than {limit} bytes"))
        response.deliverBody(body)
        if response.code != 200:

            def refuse(_: bytes) -> bytes:
                raise JWKSFetchError(f"HTTP {response.code}")

            return body.done.addCallback(refuse)
        return body.done

    def close(self) -> Deferred[None]:
        return self._pool.closeCachedConnections()


def shared_key_set(runtime: Any, url: str, refresh: float) -> JWKSKeySet:
    """The runtime's key set for ``url``, created (and its first fetch started) on first use.

    ``runtime`` is a :class:`~txgateway.runtime.Runtime`; a reload that changes
    ``jwks_refresh`` applies it from the next fetch on.
    """

    def build() -> JWKSKeySet:
        fetcher = TreqJWKSFetcher(runtime.reactor)
        key_set = JWKSKeySet(url, runtime.clock, fetcher.fetch, refresh=refresh, close=fetcher.close)
        key_set.start()
        return key_set

    key_set: JWKSKeySet = runtime.shared(("jwks", url), build)
    key_set.refresh = refresh
    return key_set
