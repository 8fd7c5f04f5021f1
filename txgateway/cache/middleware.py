"""The cache stage: answer GET and HEAD from stored responses, store what may be.

Runs after the user middlewares and before the breaker and the upstream, so
authentication and rate limits apply to hits too (a hit never skips a 401
or a 429).  Built once per route (``for_route``):

- A route caches when its ``cache.enabled`` is true, or when it has no
  ``cache`` block and ``middleware.cache.enabled`` is true (its ttl is then
  30 s).  ``routes[].cache.enabled: false`` turns it off for that route.
  The store (``middleware.cache.storage``) is shared by all caching routes.
- Key: the route (name and a digest of its matching, rewriting and header
  rules, so a reload that changes them starts afresh), the scheme (http or
  https: an upstream may redirect one to the other), the lower-case Host,
  the raw path and the raw query, for GET; HEAD is answered from the GET
  entry.  Plus, per the stored response's ``Vary``, the request's values of
  the named headers (see :mod:`txgateway.cache.entry`).
- Every response of a caching route says ``X-Cache: HIT`` (served from the
  store, with ``Age``), ``MISS`` (the store was consulted, the upstream
  answered) or ``BYPASS`` (the store was not consulted: other methods,
  ``Cache-Control: no-cache``/``max-age=0`` or ``Pragma: no-cache``,
  WebSocket upgrades, GETs with a body).  Gateway errors (502, 504...)
  passing through carry it too.
- Request ``no-cache`` skips the lookup but stores the fresh answer;
  request ``no-store`` may be served a hit but its response is not stored.
- Requests carrying credentials (Authorization, or an identity the auth
  stage established from an API key or a query token) get hits like anyone,
  but their responses are stored only when marked ``public`` or
  ``s-maxage``.  What else is never stored: see :mod:`txgateway.cache.policy`.
- Concurrent misses for one key make one upstream request (see
  :mod:`txgateway.cache.coalesce`).
- The response streams to the client as it arrives; a copy is kept up to
  ``max_object_bytes`` (:class:`~txgateway.cache.tee.TeeBody`) and stored
  when the body completed.  A bigger body, a client that goes away or an
  upstream that breaks mid-body stores nothing.
- A successful (< 400) response to an unsafe method (POST, PUT, PATCH,
  DELETE...) on the route invalidates the stored GET of the same URL.
"""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import quote

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from txgateway.body import BytesBody
from txgateway.cache.coalesce import Flight, Flights
from txgateway.cache.entry import CacheStore, Entry, Headers, PrimaryKey, stored_headers
from txgateway.cache.memory import MemoryStore
from txgateway.cache.policy import assess, request_directives, vary_values
from txgateway.cache.redis import RedisStore
from txgateway.cache.tee import TeeBody
from txgateway.config.model import CacheConfig, GatewayConfig, RouteCacheConfig, RouteConfig
from txgateway.errors import GatewayError
from txgateway.messages import Response
from txgateway.observability.metrics import GatewayMetrics
from txgateway.pipeline.context import RequestContext
from txgateway.pipeline.pipeline import Handler
from txgateway.runtime import Runtime

HIT = (b"x-cache", b"HIT")
MISS = (b"x-cache", b"MISS")
BYPASS = (b"x-cache", b"BYPASS")
#: The outcome each mark records (``ctx.notes["cache"]``, ``txgateway_cache_requests``).
_OUTCOMES = {MISS: "miss", BYPASS: "bypass"}

#: Methods that never change what a GET returns.
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})

#: Seconds a coalesced miss waits for the leader before going upstream itself.
COALESCE_TIMEOUT = 5.0

#: ttl of a route without a ``cache`` block when ``middleware.cache.enabled``.
DEFAULT_TTL = RouteCacheConfig().ttl

#: ``Runtime.shared`` keys of the stores.
MEMORY_STORE = ("txgateway.cache", "memory")


def redis_store_key(url: str) -> tuple[str, str, str]:
    return ("txgateway.cache", "redis", url)


def route_tag(route: RouteConfig) -> str:
    """The route's part of every key: its name and a digest of what shapes its responses."""
    shape = repr(
        (
            route.match,
            route.upstream,
            route.strip_prefix,
            route.rewrite,
            route.request_headers,
            route.response_headers,
        )
    )
    digest = hashlib.blake2b(shape.encode("utf-8"), digest_size=6).hexdigest()
    return f"{quote(route.name, safe='')}:{digest}"


def _x_cache(headers: Headers, mark: tuple[bytes, bytes]) -> Headers:
    """``headers`` with the upstream's own X-Cache replaced by ours."""
    for name, _ in headers:
        if name == b"x-cache":
            headers = [item for item in headers if item[0] != b"x-cache"]
            break
    headers.append(mark)
    return headers


def _mark(response: Response, mark: tuple[bytes, bytes]) -> Response:
    response.headers = _x_cache(response.headers, mark)
    return response


def _mark_error(failure: Failure, mark: tuple[bytes, bytes]) -> Failure:
    if isinstance(failure.value, GatewayError):
        failure.value.headers.append(mark)
    return failure


class ResponseCache:
    """The cache stage of one route."""

    def __init__(
        self,
        tag: str,
        ttl: float,
        store: CacheStore,
        clock: IReactorTime,
        max_object_bytes: int,
        coalesce_timeout: float = COALESCE_TIMEOUT,
        metrics: GatewayMetrics | None = None,
        route: str = "",
    ) -> None:
        """``metrics`` counts this route's (``route``) lookups by outcome and the
        bytes served from the store; None: not counted."""
        self.tag = tag
        self.ttl = ttl
        self.store = store
        self.clock = clock
        self.max_object_bytes = max_object_bytes
        self.flights = Flights(clock, coalesce_timeout)
        #: Per outcome ("hit", "miss", "bypass"): its counter child.
        self._outcomes: dict[str, Any] = {}
        self._served: Any = None
        if metrics is not None:
            lookups = metrics.cache_requests
            self._outcomes = {outcome: lookups.labels(route, outcome) for outcome in ("hit", "miss", "bypass")}
            self._served = metrics.cache_served_bytes.labels(route)

    def _outcome(self, ctx: RequestContext, outcome: str) -> None:
        """Record what the cache did with this request: for the access log and the metrics."""
        notes = ctx.notes
        if notes is None:
            ctx.notes = {"cache": outcome}
        else:
            notes["cache"] = outcome
        counter = self._outcomes.get(outcome)
        if counter is not None:
            counter.inc()

    def key(self, ctx: RequestContext) -> PrimaryKey:
        host = ctx.host
        return (self.tag, ctx.scheme, host.lower() if host else "", ctx.path, ctx.query)

    def wrap(self, next: Handler) -> Handler:
        tag = self.tag
        lookup = self.store.lookup
        seconds = self.clock.seconds
        hit = self._hit
        miss = self._miss

        def cache(ctx: RequestContext) -> Deferred[Response]:
            method = ctx.method
            if method != b"GET" and method != b"HEAD":
                return self._other(ctx, next)
            body = ctx.body
            if body is not None and body.length != 0:
                return self._pass(ctx, next, BYPASS)
            host = ctx.host
            key = (tag, ctx.scheme, host.lower() if host else "", ctx.path, ctx.query)
            directives = request_directives(ctx.headers)
            authenticated = ctx.identity is not None
            may_store = True
            if directives is not None:
                if directives.upgrade:
                    return self._pass(ctx, next, BYPASS)
                authenticated = authenticated or directives.authorized
                may_store = not directives.no_store
                if directives.no_cache:
                    if method == b"HEAD" or not may_store:
                        return self._pass(ctx, next, BYPASS)
                    return self._fetch(ctx, next, key, authenticated, BYPASS, None)
            now = seconds()
            found = lookup(key, ctx.headers, now)
            if found is None:
                return miss(ctx, next, key, authenticated, may_store)
            if isinstance(found, Entry):
                return succeed(hit(found, ctx, now))
            return found.addCallback(self._looked_up, ctx, next, key, authenticated, may_store)

        return cache

    def _hit(self, entry: Entry, ctx: RequestContext, now: float) -> Response:
        self._outcome(ctx, "hit")
        if self._served is not None and ctx.method != b"HEAD" and entry.body:
            self._served.inc(len(entry.body))
        headers = entry.headers.copy()
        age = now - entry.born
        headers.append((b"age", b"%d" % age if age > 0 else b"0"))
        headers.append(HIT)
        if ctx.request_id:
            headers.append((b"x-request-id", ctx.request_id.encode("ascii")))
        if ctx.method == b"HEAD":
            if entry.status != 204:
                headers.append((b"content-length", b"%d" % len(entry.body)))
            return Response(entry.status, headers, None)
        return Response(entry.status, headers, BytesBody(entry.body))

    def _looked_up(
        self,
        found: Entry | None,
        ctx: RequestContext,
        next: Handler,
        key: PrimaryKey,
        authenticated: bool,
        may_store: bool,
    ) -> Response | Deferred[Response]:
        """A lookup that answered later (Redis)."""
        if found is None:
            return self._miss(ctx, next, key, authenticated, may_store)
        return self._hit(found, ctx, self.clock.seconds())

    def _miss(
        self, ctx: RequestContext, next: Handler, key: PrimaryKey, authenticated: bool, may_store: bool
    ) -> Deferred[Response]:
        flight = self.flights.get(key)
        if flight is not None:
            return flight.wait().addCallback(self._waited, ctx, next, key, authenticated, may_store)
        if ctx.method != b"GET" or not may_store:
            return self._pass(ctx, next, MISS)
        return self._fetch(ctx, next, key, authenticated, MISS, self.flights.start(key))

    def _waited(
        self,
        entry: Entry | None,
        ctx: RequestContext,
        next: Handler,
        key: PrimaryKey,
        authenticated: bool,
        may_store: bool,
    ) -> Response | Deferred[Response]:
        """The flight this miss waited on landed (or the wait timed out)."""
        if entry is not None and entry.matches(ctx.headers):
            now = self.clock.seconds()
            if now < entry.expires:
                return self._hit(entry, ctx, now)
        if ctx.method != b"GET" or not may_store:
            return self._pass(ctx, next, MISS)
        return self._fetch(ctx, next, key, authenticated, MISS, None)

    def _pass(self, ctx: RequestContext, next: Handler, mark: tuple[bytes, bytes]) -> Deferred[Response]:
        """To the upstream, nothing stored."""
        self._outcome(ctx, _OUTCOMES[mark])
        return next(ctx).addCallbacks(_mark, _mark_error, callbackArgs=(mark,), errbackArgs=(mark,))

    def _other(self, ctx: RequestContext, next: Handler) -> Deferred[Response]:
        """Methods other than GET and HEAD: passed on; unsafe ones invalidate the URL."""
        if ctx.method in SAFE_METHODS:
            return self._pass(ctx, next, BYPASS)
        self._outcome(ctx, "bypass")
        key = self.key(ctx)

        def invalidate(response: Response) -> Response:
            if response.status < 400:
                self.store.invalidate(key)
            return _mark(response, BYPASS)

        return next(ctx).addCallbacks(invalidate, _mark_error, errbackArgs=(BYPASS,))

    def _fetch(
        self,
        ctx: RequestContext,
        next: Handler,
        key: PrimaryKey,
        authenticated: bool,
        mark: tuple[bytes, bytes],
        flight: Flight | None,
    ) -> Deferred[Response]:
        """A GET to the upstream whose response is stored when it may be."""
        self._outcome(ctx, _OUTCOMES[mark])

        def failed(failure: Failure) -> Failure:
            if flight is not None:
                flight.land(None)
            return _mark_error(failure, mark)

        return next(ctx).addCallbacks(self._response, failed, callbackArgs=(ctx, key, authenticated, mark, flight))

    def _response(
        self,
        response: Response,
        ctx: RequestContext,
        key: PrimaryKey,
        authenticated: bool,
        mark: tuple[bytes, bytes],
        flight: Flight | None,
    ) -> Response:
        clock = self.clock
        now = clock.seconds()
        verdict = assess(response.status, response.headers, authenticated, now, self.ttl)
        body = response.body
        length = 0 if body is None else body.length
        if verdict is None or (length is not None and length > self.max_object_bytes):
            if flight is not None:
                flight.land(None)
            return _mark(response, mark)
        status = response.status
        headers = stored_headers(response.headers)
        vary = verdict.vary
        variant = vary_values(vary, ctx.headers) if vary else ()
        born = now - verdict.age
        expires = born + verdict.lifetime
        store = self.store

        def complete(data: bytes) -> None:
            entry = Entry(status, headers, data, born, expires, vary, variant)
            store.store(key, entry, clock.seconds())
            if flight is not None:
                flight.land(entry)

        def abandoned() -> None:
            if flight is not None:
                flight.land(None)

        if body is None or length == 0:
            complete(b"")
        elif isinstance(body, BytesBody):
            complete(body.data)
        else:
            response.body = TeeBody(body, self.max_object_bytes, complete, abandoned)
        return _mark(response, mark)


def store_for(settings: CacheConfig, runtime: Runtime) -> CacheStore:
    """The process's store for ``middleware.cache``, shared by routes and reloads."""
    if settings.storage == "redis":
        url = settings.redis_url
        redis = runtime.shared(redis_store_key(url), lambda: RedisStore(url, runtime.reactor, runtime.clock))
        redis.timeout = settings.redis_timeout
        return redis
    memory = runtime.shared(
        MEMORY_STORE, lambda: MemoryStore(settings.max_bytes, runtime.metrics.cache_stored_bytes)
    )
    if memory.max_bytes != settings.max_bytes:
        memory.resize(settings.max_bytes, runtime.clock.seconds())
    return memory


def for_route(route: RouteConfig, config: GatewayConfig, runtime: Runtime) -> ResponseCache | None:
    """The route's cache stage, None when the route does not cache."""
    settings = config.middleware.cache
    if route.cache is not None:
        if not route.cache.enabled:
            return None
        ttl = route.cache.ttl
    elif settings.enabled:
        ttl = DEFAULT_TTL
    else:
        return None
    return ResponseCache(
        route_tag(route),
        ttl,
        store_for(settings, runtime),
        runtime.clock,
        settings.max_object_bytes,
        metrics=runtime.metrics,
        route=route.name,
    )
