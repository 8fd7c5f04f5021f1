"""Cost of the response cache stage in memory: a hit, and a miss that stores.

Run: ``.venv/bin/python bench/cache_cost.py [--requests N] [--urls K] [--body BYTES]``.

Prints microseconds per request for:

- ``hit``: the whole stage on a hit (request directives scan, key, one dict
  lookup, LRU touch, the Response with a BytesBody and its Age / X-Cache /
  X-Request-ID headers), ``K`` URLs (default 10,000) visited round robin.
- ``hit, Vary: accept-encoding``: the same with one Vary header (two lookups).
- ``pass-through``: the downstream handler alone (a fake upstream answering
  at once, its body consumed): what a request costs without the stage.
- ``miss+store`` / ``miss+store, tee``: the stage on a miss whose response is
  stored: lookup, flight, cacheability verdict, the body copied (a
  ``BytesBody`` as is, or a streamed body through the tee), the entry
  stored, LRU eviction once the store is full (``max_bytes`` 16 MiB); each
  request a new URL.  Subtract ``pass-through`` for the stage's own share.
- ``gateway hit`` / ``gateway uncached``: one request through the whole
  gateway in memory (HTTP/1.1 parse and write on a fake transport, router,
  pipeline, :class:`txgateway.testing.GatewayHarness`): a hit against the
  same request on a route that does not cache (its upstream answers at once,
  in memory, so this is the gateway's own work only).

Not a test: numbers depend on the machine; they are here to show a hit
costs a few microseconds and what storing adds to a miss.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from txgateway.body import BytesBody
from txgateway.cache.memory import MemoryStore
from txgateway.cache.middleware import ResponseCache
from txgateway.config import parse_config
from txgateway.interfaces import IBody, IBodySink
from txgateway.messages import Response
from txgateway.pipeline.context import RequestContext
from txgateway.testing import GatewayHarness, MemoryUpstream

#: What a browser-ish client sends.
REQUEST_HEADERS = [
    (b"host", b"api.example.com"),
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) bench"),
    (b"accept", b"application/json"),
    (b"accept-encoding", b"gzip, br"),
    (b"accept-language", b"en-US,en;q=0.9"),
    (b"x-forwarded-for", b"198.51.100.7"),
    (b"connection", b"keep-alive"),
]


@implementer(IBodySink)
class _Discard:
    def write(self, data: bytes) -> None:
        pass

    def finish(self) -> None:
        pass

    def abort(self, reason: object) -> None:
        pass


DISCARD = _Discard()


@implementer(IBody)
class _Streamed:
    """A body that is not a BytesBody (as the upstream client gives): one write, then finish."""

    __slots__ = ("data", "length")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length: int | None = len(data)

    def deliverTo(self, sink: IBodySink) -> None:
        sink.write(self.data)
        sink.finish()

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def per_request(run: Callable[[int], None], count: int) -> float:
    """Best of three runs, microseconds per request."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        run(count)
        best = min(best, time.perf_counter() - started)
    return best / count * 1e6


def upstream(body: bytes, streamed: bool, vary: bool = False) -> Callable[[RequestContext], Deferred[Response]]:
    headers = [
        (b"content-type", b"application/json"),
        (b"cache-control", b"max-age=600"),
        (b"via", b"1.1 txgateway"),
        (b"x-request-id", b"abc-1"),
    ]
    if vary:
        headers.append((b"vary", b"accept-encoding"))

    def answer(ctx: RequestContext) -> Deferred[Response]:
        return succeed(Response(200, list(headers), _Streamed(body) if streamed else BytesBody(body)))

    return answer


def contexts(paths: list[str]) -> list[RequestContext]:
    out = []
    for path in paths:
        ctx = RequestContext(b"GET", path, b"page=1", list(REQUEST_HEADERS), client_ip="198.51.100.7")
        ctx.host = "api.example.com"
        ctx.request_id = "3f2a9c1d0b7e-42"
        out.append(ctx)
    return out


def consume(d: Deferred[Response]) -> None:
    responses: list[Response] = []
    d.addCallback(responses.append)
    body = responses[0].body
    if body is not None:
        body.deliverTo(DISCARD)


def hits(urls: int, body: bytes, vary: bool) -> Callable[[int], None]:
    clock = Clock()
    clock.advance(1_700_000_000)
    cache = ResponseCache("api:bench", 30.0, MemoryStore(256 * 2**20), clock, 2**20)
    handler = cache.wrap(upstream(body, streamed=True, vary=vary))
    requests = contexts([f"/api/items/{i}" for i in range(urls)])
    for ctx in requests:
        consume(handler(ctx))

    def run(count: int) -> None:
        for i in range(count):
            handler(requests[i % urls])

    return run


def misses(body: bytes, streamed: bool, with_cache: bool = True) -> Callable[[int], None]:
    clock = Clock()
    clock.advance(1_700_000_000)
    answer = upstream(body, streamed)
    store = MemoryStore(16 * 2**20)
    handler = ResponseCache("api:bench", 30.0, store, clock, 2**20).wrap(answer) if with_cache else answer
    serial = [0]

    def run(count: int) -> None:
        start = serial[0]
        serial[0] += count
        requests = contexts([f"/api/items/{start + i}" for i in range(count)])
        for ctx in requests:
            consume(handler(ctx))

    return run


def gateway(cached: bool) -> Callable[[int], None]:
    config = parse_config(
        """
upstreams:
  app: {servers: ["10.1.1.1:9001"], retry: {attempts: 1}}
routes:
  - name: cached
    match: {path: "/cached/*"}
    upstream: app
    cache: {ttl: 3600}
  - name: plain
    match: {path: "/plain/*"}
    upstream: app
"""
    )
    body = b"x" * 1024
    harness = GatewayHarness(config, MemoryUpstream(lambda request: (200, [(b"content-type", b"text/plain")], body)))
    target = "/cached/item" if cached else "/plain/item"
    harness.request("GET", target)

    def run(count: int) -> None:
        for _ in range(count):
            harness.request("GET", target)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--urls", type=int, default=10_000)
    parser.add_argument("--body", type=int, default=1024, help="response body bytes")
    args = parser.parse_args()
    body = b"x" * args.body
    n = args.requests
    print(
        f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cpus; "
        f"{args.urls} urls, {args.body} byte bodies"
    )
    rows = [
        ("hit", per_request(hits(args.urls, body, vary=False), n)),
        ("hit, Vary: accept-encoding", per_request(hits(args.urls, body, vary=True), n)),
        ("pass-through (no stage)", per_request(misses(body, streamed=True, with_cache=False), n // 4)),
        ("miss+store, BytesBody", per_request(misses(body, streamed=False), n // 4)),
        ("miss+store, tee", per_request(misses(body, streamed=True), n // 4)),
        ("gateway hit", per_request(gateway(cached=True), n // 20)),
        ("gateway uncached", per_request(gateway(cached=False), n // 20)),
    ]
    for name, micros in rows:
        print(f"{name:<28} {micros:8.2f} us/request")


if __name__ == "__main__":
    main()
