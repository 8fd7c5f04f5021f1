"""The per-request Python cost of the proxy path, without sockets.

One keep-alive client connection and one pooled upstream connection, both on
in-memory transports (twisted.internet.testing), carry N requests through the
real gateway: the downstream HTTP/1.1 protocol, routing, the route's chain,
the forwarder, the HTTP/1.1 upstream client and its pool, the response relay,
the exchange observers (metrics; access log when asked).  What this measures
is exactly the work the gateway's own code and Twisted's Deferreds and timers
do per request; the system calls a real run adds (recv/send/epoll, roughly
40% of a loopback run's CPU time) are not in it.

A VM's wall clock and CPU time vary by 20% from run to run; this is
deterministic enough (best of several rounds) to compare two versions of the
hot path, which bench/suite.py is not.

    .venv/bin/python bench/hot_path.py                 # plain route
    .venv/bin/python bench/hot_path.py --pipeline      # JWT + rate limit + breaker + access log
    .venv/bin/python bench/hot_path.py --profile       # cProfile, top functions
    .venv/bin/python bench/hot_path.py --routes 10000  # row 4: requests spread over 10,000 routes
    .venv/bin/python bench/hot_path.py --redis         # row 3: the pipeline, rate limit in "Redis"

``--redis`` answers the limiter's commands on an in-memory Redis connection
with a canned script reply: what it measures is the gateway's side of a
Redis decision (command, reply parsing, the request resumed from the reply).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

# bench/h2.py would shadow the h2 package: import from the project, not from bench/.
sys.path[0] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

from txgateway.config import parse_config  # noqa: E402
from txgateway.gateway import Gateway  # noqa: E402
from txgateway.protocols.detect import GatewayServerFactory  # noqa: E402
from txgateway.runtime import Runtime  # noqa: E402
from txgateway.upstream.pool import HTTP11Client  # noqa: E402

BODY = b"x" * 1024
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 22 Nov 2026 09:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 1024\r\nConnection: keep-alive\r\n\r\n" + BODY
)
SECRET = "bench-secret-0123456789abcdef0123456789abcdef"

PLAIN = """
observability: {access_log: {enabled: false}}
upstreams:
  up: {servers: [{address: "127.0.0.1:8001"}], pool: {max_connections_per_host: 4}}
routes:
  - {name: all, match: {path: /*}, upstream: up}
"""

#: Row 2's pipeline; %(rate_limit)s is the middleware's limiter, %(route_limit)s the route's.
PIPELINE = """
observability: {access_log: {enabled: true, format: json, path: "%(log)s"}}
middleware:
  auth: {jwt_secret: "%(secret)s"}
  rate_limit: %(rate_limit)s
upstreams:
  up:
    servers: [{address: "127.0.0.1:8001"}]
    pool: {max_connections_per_host: 4}
    circuit_breaker: {failure_threshold: 5, recovery_timeout: 30}
routes:
  - {name: all, match: {path: /*}, upstream: up, auth: required%(route_limit)s}
"""
#: The limiter in memory (--pipeline: set on the route too) and in "Redis" (--redis).
MEMORY_LIMIT = "{requests_per_minute: 100000000, burst_size: 100000000}"
REDIS_LIMIT = (
    "{requests_per_minute: 100000000, burst_size: 100000000, key: consumer, storage: redis, "
    'redis: {url: "redis://127.0.0.1:6390", timeout: 1.0}, on_storage_error: deny}'
)
#: The token bucket script's answer: allowed, remaining, reset, retry-after.
SCRIPT_REPLY = b"*4\r\n:1\r\n:99999999\r\n:1\r\n:0\r\n"


def token() -> str:
    import jwt

    return jwt.encode({"sub": "bench", "exp": 4102444800}, SECRET, algorithm="HS256")


def many_routes(count: int) -> tuple[str, list[str]]:
    """Row 4's table (bench/servers.py's four shapes) as config text, and a path for each route."""
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after site-packages: bench/h2.py stays hidden
    import servers

    routes, paths = servers.many_routes(count)
    for route in routes:
        route["upstream"] = "up"
    text = PLAIN.split("routes:")[0] + "routes: " + json.dumps(routes) + "\n"
    return text, paths


class Wire:
    """The gateway between one client connection and one upstream connection, in memory."""

    def __init__(self, config_text: str, headers: bytes, paths: list[str] | None = None) -> None:
        self.reactor = MemoryReactorClock()
        config = parse_config(config_text)
        runtime = Runtime(self.reactor)
        clients: dict[str, HTTP11Client] = {}

        def client_for(upstream: Any) -> HTTP11Client:
            return clients.setdefault(upstream.name, HTTP11Client(self.reactor, upstream.pool))

        self.gateway = Gateway(config, client_for, runtime)
        self.redis: Any = None
        self.redis_transport = StringTransport()
        self.reactor.run()  # the Redis store connects once the reactor runs
        for host, port, redis_factory, _, _ in self.reactor.tcpClients:
            if port == 6390:
                self.redis = redis_factory.buildProtocol(IPv4Address("TCP", host, port))
                self.redis.makeConnection(self.redis_transport)
        factory = GatewayServerFactory(lambda: self.gateway, self.reactor)
        self.client = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        assert self.protocol is not None
        self.protocol.makeConnection(self.client)
        head = b" HTTP/1.1\r\nHost: gateway\r\nUser-Agent: wrk\r\n" + headers + b"\r\n"
        #: The requests, visited with the same stride as bench/load.py's wrk paths script.
        self.requests = [b"GET " + path.encode() + head for path in paths or ["/bench"]]
        self.next = 0
        self.upstream: Any = None
        self.upstream_transport = StringTransport()
        self.one()  # opens the upstream connection

    def one(self) -> None:
        requests = self.requests
        self.protocol.dataReceived(requests[self.next])
        self.next = (self.next + 7919) % len(requests)
        if self.redis is not None:
            sent = self.redis_transport.value()
            if not sent.startswith(b"*6\r\n$7\r\nEVALSHA"):
                raise SystemExit(f"expected one EVALSHA, the store sent {sent[:200]!r}")
            self.redis_transport.clear()
            self.redis.dataReceived(SCRIPT_REPLY)
        if self.upstream is None:
            _, _, factory, _, _ = self.reactor.tcpClients[-1]
            self.upstream = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8001))
            self.upstream.makeConnection(self.upstream_transport)
        self.upstream_transport.clear()
        self.upstream.dataReceived(RESPONSE)
        out = self.client.value()
        if not out.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"unexpected response: {out[:300]!r}")
        self.client.clear()

    def run(self, count: int) -> float:
        one = self.one
        advance = self.reactor.advance
        started = time.process_time()
        for n in range(count):
            one()
            if n % 1000 == 0:
                advance(0.001)  # let timers run and cancelled ones be dropped, as a reactor would
        return (time.process_time() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", action="store_true", help="JWT + rate limit + breaker + JSON access log")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--routes", type=int, default=0, help="row 4: this many routes, requests spread over all")
    parser.add_argument("--redis", action="store_true", help="row 3: --pipeline with the rate limit in Redis")
    args = parser.parse_args()
    headers = b""
    with tempfile.TemporaryDirectory() as directory:
        if args.pipeline or args.redis:
            text = PIPELINE % {
                "log": os.path.join(directory, "access.log"),
                "secret": SECRET,
                "rate_limit": REDIS_LIMIT if args.redis else MEMORY_LIMIT,
                "route_limit": "" if args.redis else f", rate_limit: {MEMORY_LIMIT}",
            }
            headers = b"Authorization: Bearer " + token().encode() + b"\r\n"
        else:
            text = PLAIN
        paths = None
        if args.routes:
            if args.pipeline:
                raise SystemExit("--routes is for the plain route only")
            text, paths = many_routes(args.routes)
        wire = Wire(text, headers, paths)
        wire.run(args.warmup)
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            wire.run(args.requests)
            profile.disable()
            top = int(os.environ.get("TOP", "35"))
            pstats.Stats(profile).sort_stats(os.environ.get("SORT", "tottime")).print_stats(top)
            return
        results = [wire.run(args.requests) for _ in range(args.rounds)]
    best = min(results)
    print(
        f"{'pipeline, Redis' if args.redis else 'pipeline' if args.pipeline else 'plain'}{f', {args.routes:,} routes' if args.routes else ''}: best {best * 1e6:.1f} µs/request "
        f"(rounds: {', '.join(f'{r * 1e6:.1f}' for r in results)}), "
        f"{1 / best:,.0f} requests/s of Python per core without system calls"
    )


if __name__ == "__main__":
    main()
