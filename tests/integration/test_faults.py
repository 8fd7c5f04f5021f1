"""Upstream faults end to end: a real ``twistd -n txgateway``, upstreams that misbehave on purpose.

Each scenario drives a real upstream into one failure (nothing listening, a
reset mid-response, a stall before the head or in the body, garbage, a run
of 503s, a reset before answering an upload) and checks three things a user
would notice:

- what the client gets: the status and JSON error code, or a response cut
  short (never a hang);
- that nothing leaks: the gateway's own TCP sockets, read from
  ``/proc/PID/fd`` and ``/proc/net/tcp``, do not grow with failed requests
  (a keep-alive connection to a healthy upstream may stay in its pool), and
  every connection to a failed upstream is closed;
- recovery: once the upstream behaves again, requests succeed within a
  bounded time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.defer import TimeoutError as WaitTimedOut

from tests.integration.harness import (
    LOCALHOST,
    EchoUpstream,
    GatewayTestCase,
    RawResponse,
    SeenRequest,
    UpstreamConnection,
    UpstreamServer,
    parse_responses,
    reactor,
    sleep,
)

T = TypeVar("T")

#: What a faulty upstream announces in Content-Length when it cuts its body.
ANNOUNCED = 100_000
#: What it sends of that body before the fault.
PARTIAL = 1000
UNAVAILABLE_BODY = b"upstream says: maintenance\n"
FALLBACK_BODY = '{"error":"degraded","fallback":true}'


# Upstreams.

OK = "ok"
RESET_BEFORE_HEAD = "reset_before_head"
RESET_MID_BODY = "reset_mid_body"
STALL_BEFORE_HEAD = "stall_before_head"
STALL_MID_BODY = "stall_mid_body"
GARBAGE = "garbage"
UNAVAILABLE = "503"


class FaultyUpstream(UpstreamServer):
    """Answers every complete request according to ``mode``, which a test may change at any time.

    - ``ok``: 200 with a JSON description of the request (body size and SHA-256, like the echo);
    - ``reset_before_head``: the whole request is read, then the connection is reset (RST);
    - ``reset_mid_body``: a head announcing ``ANNOUNCED`` bytes, ``PARTIAL`` of them, then a reset;
    - ``stall_before_head``: the request is read and never answered;
    - ``stall_mid_body``: a head announcing ``ANNOUNCED`` bytes, ``PARTIAL`` of them, then nothing;
    - ``garbage``: bytes that are not HTTP, then a close;
    - ``503``: a complete 503 with a plain-text body (keep-alive).

    ``accepted`` keeps every connection ever accepted, so a test can ask
    whether the gateway closed them.
    """

    def __init__(self, mode: str = OK) -> None:
        super().__init__()
        self.mode = mode
        self.accepted: list[UpstreamConnection] = []

    def buildProtocol(self, addr: object) -> UpstreamConnection:
        connection = super().buildProtocol(addr)
        self.accepted.append(connection)
        return connection

    def request_complete(self, connection: UpstreamConnection, request: SeenRequest) -> None:
        mode = self.mode
        transport: Any = connection.transport
        if mode == OK:
            payload = json.dumps({"service": "faulty", **request.describe()}).encode()
            connection.respond(200, [("Content-Type", "application/json")], payload)
        elif mode == RESET_BEFORE_HEAD:
            transport.abortConnection()
        elif mode in (RESET_MID_BODY, STALL_MID_BODY):
            connection.send_head(
                200, [("Content-Type", "application/octet-stream"), ("Content-Length", str(ANNOUNCED))]
            )
            connection.write(b"p" * PARTIAL)
            if mode == RESET_MID_BODY:
                # Later, not now: an abort discards what is still in Twisted's write buffer.
                connection.later(0.1, transport.abortConnection)
        elif mode == STALL_BEFORE_HEAD:
            pass
        elif mode == GARBAGE:
            connection.write(b"\x00\x01 this is not HTTP at all \xff\r\n\r\n")
            transport.loseConnection()
        elif mode == UNAVAILABLE:
            connection.send_head(
                503,
                [("Content-Type", "text/plain"), ("Content-Length", str(len(UNAVAILABLE_BODY)))],
                "Service Unavailable",
            )
            connection.write(UNAVAILABLE_BODY)
            connection.done()
        else:
            raise AssertionError(f"unknown mode {mode!r}")

    def lost_all(self) -> bool:
        return all(connection.is_lost for connection in self.accepted)


class CountingListener(UpstreamServer):
    """Listens and counts accepted connections; answers like the echo upstream."""

    def __init__(self) -> None:
        super().__init__()
        self.accepts = 0

    def buildProtocol(self, addr: object) -> UpstreamConnection:
        self.accepts += 1
        return super().buildProtocol(addr)

    def request_complete(self, connection: UpstreamConnection, request: SeenRequest) -> None:
        payload = json.dumps({"service": "late", **request.describe()}).encode()
        connection.respond(200, [("Content-Type", "application/json")], payload)


# The gateway's sockets, from /proc.

_TCP_LISTEN = "0A"
_TCP_STATES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
    "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING",
}  # fmt: skip


@dataclass(frozen=True)
class TcpSocket:
    """One TCP socket a process holds open (a file descriptor, not a TIME_WAIT remnant)."""

    local_port: int
    remote_port: int
    state: str

    def __str__(self) -> str:
        return f"{self.local_port}->{self.remote_port} {self.state}"


def open_tcp_sockets(pid: int) -> list[TcpSocket]:
    """The TCP sockets process ``pid`` has open, listening ones excluded."""
    inodes: set[str] = set()
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(entry)
        except OSError:  # closed while we looked
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    sockets: list[TcpSocket] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[9] not in inodes or fields[3] == _TCP_LISTEN:
                continue
            local_port = int(fields[1].rpartition(":")[2], 16)
            remote_port = int(fields[2].rpartition(":")[2], 16)
            sockets.append(TcpSocket(local_port, remote_port, _TCP_STATES.get(fields[3], fields[3])))
    return sockets


# Requests.


def request_bytes(path: str, method: str = "GET", body: bytes | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: faults.test\r\nConnection: close\r\n"
    if body is not None:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode("latin-1") + b"\r\n" + (body or b"")


@dataclass
class Cut:
    """What a client received of a response that may have been cut short."""

    status: int
    announced: int
    body: bytes
    closed: bool
    elapsed: float


def split_head(received: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, sep, body = received.partition(b"\r\n\r\n")
    if not sep:
        raise AssertionError(f"no complete response head in {received[:300]!r}")
    lines = head.split(b"\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    return int(lines[0].split(b" ")[1]), fields, body


class FaultTestCase(GatewayTestCase):
    """Clients, socket accounting and waiting helpers shared by the fault scenarios."""

    def run_scenario(self, scenario: Callable[[], Coroutine[Any, Any, None]]) -> Deferred[None]:
        return Deferred.fromCoroutine(scenario())

    async def request(
        self, path: str, method: str = "GET", body: bytes | None = None, timeout: float = 5.0
    ) -> RawResponse:
        """One request on its own connection (``Connection: close``); the parsed response."""
        client = await self.connect()
        client.send(request_bytes(path, method, body))
        received = await client.wait_closed(timeout)
        responses = parse_responses(received, until_close=True)
        self.assertEqual(len(responses), 1, received[:500])
        return responses[0]

    async def timed_request(self, path: str, timeout: float = 5.0) -> tuple[RawResponse, float]:
        start = reactor.seconds()
        response = await self.request(path, timeout=timeout)
        return response, reactor.seconds() - start

    async def cut_request(self, path: str, timeout: float = 8.0) -> Cut:
        """A GET whose response may end early: the head, the body bytes that came, whether it closed."""
        client = await self.connect()
        start = reactor.seconds()
        client.send(request_bytes(path))
        try:
            received = await client.wait_closed(timeout)
        except WaitTimedOut:  # still open: report what came
            received = client.received
        status, fields, body = split_head(received)
        announced = int(fields.get(b"content-length", b"-1"))
        return Cut(status, announced, body, client.is_closed, reactor.seconds() - start)

    def assertGatewayError(self, response: RawResponse, status: int, code: str) -> None:
        self.assertEqual(response.status, status, response.body[:300])
        self.assertEqual(response.header(b"content-type"), b"application/json")
        self.assertEqual(response.json()["error"], code)

    # Sockets.

    def sockets(self) -> list[TcpSocket]:
        assert self.gateway.pid is not None
        return open_tcp_sockets(self.gateway.pid)

    def client_sockets(self) -> list[TcpSocket]:
        """Accepted connections, on the proxy or the admin listener."""
        ours = (self.gateway.port, self.gateway.admin_port)
        return [s for s in self.sockets() if s.local_port in ours]

    def outbound_sockets(self, port: int | None = None) -> list[TcpSocket]:
        """Connections the gateway made (to upstreams), to ``port`` only if given."""
        ours = (self.gateway.port, self.gateway.admin_port)
        outbound = [s for s in self.sockets() if s.local_port not in ours]
        return [s for s in outbound if port is None or s.remote_port == port]

    async def steady_outbound(self, within: float = 3.0) -> int:
        """The gateway's outbound connections once no client connection is left open."""
        await self.wait_until(lambda: not self.client_sockets(), within, "client connections still open")
        return len(self.outbound_sockets())

    async def assertNoLeak(self, baseline: int, faulty: tuple[int, ...], within: float = 3.0) -> None:
        """No client connection left, no more outbound connections than ``baseline``, none to ``faulty``."""

        def clean() -> bool:
            if self.client_sockets():
                return False
            if any(self.outbound_sockets(port) for port in faulty):
                return False
            return len(self.outbound_sockets()) <= baseline

        await self.wait_until(
            clean,
            within,
            lambda: (
                f"sockets leaked (baseline {baseline} outbound, faulty ports {faulty}): "
                + ", ".join(map(str, self.sockets()))
            ),
        )

    async def wait_until(self, predicate: Callable[[], bool], within: float, message: str | Callable[[], str]) -> float:
        """Seconds until ``predicate()`` holds; fails after ``within``."""
        start = reactor.seconds()
        while not predicate():
            if reactor.seconds() - start > within:
                self.fail(message() if callable(message) else message)
            await sleep(0.02)
        elapsed: float = reactor.seconds() - start
        return elapsed

    def new_log(self) -> str:
        """What the gateway logged since this test started."""
        with open(self.gateway.log_path, "rb") as log:
            log.seek(self._log_start)
            return log.read().decode("utf-8", "replace")


def together(count: int, make: Callable[[], Awaitable[T]]) -> Deferred[list[T]]:
    """Run ``count`` coroutines at once; their results in order."""

    async def one() -> T:
        return await make()

    return gatherResults([Deferred.fromCoroutine(one()) for _ in range(count)], consumeErrors=True)


def servers(ports: dict[str, int], *names: str) -> list[dict[str, str]]:
    return [{"address": f"{LOCALHOST}:{ports[name]}"} for name in names]


ONE_TRY = {"attempts": 1}


class UpstreamFaultTests(FaultTestCase):
    """One gateway, one upstream (and route) per scenario so that breakers and health never mix."""

    upstreams = {
        "faulty": FaultyUpstream,
        "good": EchoUpstream,
        "flaky": lambda: FaultyUpstream(UNAVAILABLE),
        "flaky_fb": lambda: FaultyUpstream(UNAVAILABLE),
        "resetter": lambda: FaultyUpstream(RESET_BEFORE_HEAD),
        "sink": EchoUpstream,
    }
    unreachable = ("lone", "dead")

    @classmethod
    def gateway_config(cls, ports: dict[str, int]) -> dict[str, Any]:
        timeouts = {"connect": 1, "request": 5}
        breaker = {"failure_threshold": 3, "recovery_timeout": 2}

        def route(name: str, path: str, upstream: str, **extra: Any) -> dict[str, Any]:
            return {"name": name, "match": {"path": path}, "upstream": upstream, **extra}

        return {
            "upstreams": {
                "lone": {"servers": servers(ports, "lone"), "retry": ONE_TRY, "timeouts": timeouts},
                "pair": {
                    "servers": servers(ports, "dead", "good"),
                    "retry": {"attempts": 2, "on": ["connect_error"], "backoff_base": 0.01, "backoff_max": 0.05},
                    "passive_health": {"consecutive_failures": 2, "ejection_time": 2},
                    "timeouts": timeouts,
                },
                "faulty": {"servers": servers(ports, "faulty"), "retry": ONE_TRY, "timeouts": timeouts},
                "breaker": {
                    "servers": servers(ports, "flaky"),
                    "retry": ONE_TRY,
                    "circuit_breaker": breaker,
                    "timeouts": timeouts,
                },
                "breaker_fb": {
                    "servers": servers(ports, "flaky_fb"),
                    "retry": ONE_TRY,
                    "circuit_breaker": breaker,
                    "timeouts": timeouts,
                    "fallback": {"status": 503, "body": FALLBACK_BODY, "content_type": "application/json"},
                },
                "replay": {
                    "servers": servers(ports, "resetter", "sink"),
                    "retry": {
                        "attempts": 2,
                        "on": ["connect_error", "reset"],
                        "backoff_base": 0.05,
                        "backoff_max": 0.2,
                    },
                    "timeouts": timeouts,
                },
            },
            "routes": [
                route("lone", "/lone/*", "lone"),
                route("pair", "/pair/*", "pair"),
                route("faulty", "/faulty/*", "faulty"),
                route("slow", "/slow/*", "faulty", timeout=1),
                route("breaker", "/breaker/*", "breaker"),
                route("breaker-fb", "/breaker-fb/*", "breaker_fb"),
                route("replay", "/replay/*", "replay"),
            ],
        }

    @property
    def faulty(self) -> FaultyUpstream:
        server = self.servers["faulty"]
        assert isinstance(server, FaultyUpstream)
        return server

    def start_late(self, name: str, server: UpstreamServer) -> None:
        """Listen on the port of ``name`` (unreachable until now) for the rest of the test."""
        server.listen(self.ports[name])
        self.addCleanup(server.stop)

    # 1. Nothing listening.

    def test_refused_is_502_then_recovers(self) -> Deferred[None]:
        async def scenario() -> None:
            baseline = await self.steady_outbound()
            for i in range(10):
                response, elapsed = await self.timed_request(f"/lone/{i}")
                self.assertGatewayError(response, 502, "bad_gateway")
                self.assertLess(elapsed, 1.0)
            await self.assertNoLeak(baseline, faulty=(self.ports["lone"],))

            late = CountingListener()
            self.start_late("lone", late)
            response = await self.request("/lone/back")
            self.assertEqual(response.status, 200)
            self.assertEqual(response.json()["service"], "late")

        return self.run_scenario(scenario)

    def test_refused_instance_retried_on_the_other_then_ejected(self) -> Deferred[None]:
        async def scenario() -> None:
            dead = f"{LOCALHOST}:{self.ports['dead']}"
            ejected = f"instance {dead} ejected for "
            good = self.servers["good"]

            # Round robin sends every other request to the refusing instance first: each is retried.
            served = 0
            for i in range(8):
                response = await self.request(f"/pair/{i}")
                self.assertEqual(response.status, 200, response.body[:300])
                served += 1
                if ejected in self.new_log():
                    break
            self.assertIn(ejected, self.new_log())
            self.assertEqual(len([r for r in good.requests if r.path.startswith("/pair/")]), served)
            ejected_at = reactor.seconds()

            # Ejected: a listener now on its port is not even connected to.
            late = CountingListener()
            self.start_late("dead", late)
            baseline = await self.steady_outbound()
            for i in range(10):
                response = await self.request(f"/pair/ejected-{i}")
                self.assertEqual(response.status, 200)
            self.assertLess(reactor.seconds() - ejected_at, 1.5, "too slow to observe the ejection window")
            self.assertEqual(late.accepts, 0)
            await self.assertNoLeak(baseline, faulty=(self.ports["dead"],))

            # After ejection_time it takes traffic again.
            while not late.requests:
                if reactor.seconds() - ejected_at > 4.0:
                    self.fail("the instance was not given traffic again within 4s of its ejection")
                response = await self.request("/pair/back")
                self.assertEqual(response.status, 200)
                await sleep(0.05)
            self.assertGreaterEqual(reactor.seconds() - ejected_at, 1.9)
            self.assertIn(f"instance {dead} back from ejection", self.new_log())

        return self.run_scenario(scenario)

    # 2. Reset in the middle of the response body.

    def test_reset_mid_body_truncates_then_recovers(self) -> Deferred[None]:
        async def scenario() -> None:
            await self.request("/faulty/warm")
            baseline = await self.steady_outbound()
            self.assertEqual(len(self.outbound_sockets(self.ports["faulty"])), 1, "no pooled keep-alive connection")
            self.faulty.mode = RESET_MID_BODY

            for i in range(5):
                cut = await self.cut_request(f"/faulty/raw-{i}")
                self.assertEqual(cut.status, 200)
                self.assertEqual(cut.announced, ANNOUNCED)
                self.assertTrue(cut.closed, "the client connection was left open (a hang)")
                self.assertLess(len(cut.body), ANNOUNCED)
                self.assertLess(cut.elapsed, 2.0)

            result = await self.curl("/faulty/curl", timeout=5)
            self.assertEqual(result.exit_code, 18, result.stderr)  # CURLE_PARTIAL_FILE
            self.assertEqual(result.status, 200)
            self.assertLess(len(result.body), ANNOUNCED)

            await self.assertNoLeak(baseline, faulty=(self.ports["faulty"],))
            self.assertTrue(self.faulty.lost_all())

            self.faulty.mode = OK
            response = await self.request("/faulty/after")
            self.assertEqual(response.status, 200)
            self.assertEqual(response.json()["path"], "/faulty/after")

        return self.run_scenario(scenario)

    # 3. Stall before the response head.

    def test_stall_before_head_is_504_and_the_connection_is_closed(self) -> Deferred[None]:
        async def scenario() -> None:
            baseline = await self.steady_outbound()
            self.faulty.mode = STALL_BEFORE_HEAD

            stalled = together(4, lambda: self.timed_request("/slow/stall"))
            await sleep(0.5)
            # The accounting sees them while they are stalled (so it would see them leak).
            self.assertEqual(len(self.outbound_sockets(self.ports["faulty"])), 4, self.sockets())
            results = await stalled
            for response, elapsed in results:
                self.assertGatewayError(response, 504, "gateway_timeout")
                self.assertGreater(elapsed, 0.9)
                self.assertLess(elapsed, 2.0)
            self.assertEqual(len(self.faulty.accepted), 4)
            await self.wait_until(self.faulty.lost_all, 1.0, "the gateway kept stalled upstream connections open")
            await self.assertNoLeak(baseline, faulty=(self.ports["faulty"],))

            # Not back in the pool: the next request opens a new connection.
            self.faulty.mode = OK
            response, elapsed = await self.timed_request("/slow/after")
            self.assertEqual(response.status, 200)
            self.assertLess(elapsed, 0.5)
            self.assertEqual(len(self.faulty.accepted), 5)
            self.assertEqual(self.faulty.requests[-1].path, "/slow/after")

        return self.run_scenario(scenario)

    # 5. Not HTTP.

    def test_garbage_is_502_then_recovers(self) -> Deferred[None]:
        async def scenario() -> None:
            await self.request("/faulty/warm")
            baseline = await self.steady_outbound()
            self.faulty.mode = GARBAGE

            for i in range(5):
                response, elapsed = await self.timed_request(f"/faulty/garbage-{i}")
                self.assertGatewayError(response, 502, "bad_gateway")
                self.assertLess(elapsed, 1.0)
            await self.assertNoLeak(baseline, faulty=(self.ports["faulty"],))
            self.assertTrue(self.faulty.lost_all())

            self.faulty.mode = OK
            response = await self.request("/faulty/after")
            self.assertEqual(response.status, 200)

        return self.run_scenario(scenario)

    # 6. A run of 503s: the circuit breaker.

    async def open_breaker(self, path: str, flaky: FaultyUpstream, fallback: bool) -> float:
        """Three 503s reach the upstream, then the breaker answers alone; when it opened."""
        for i in range(3):
            response = await self.request(f"{path}/fail-{i}")
            self.assertEqual(response.status, 503)
            self.assertEqual(len(flaky.requests), i + 1)
            if fallback:
                self.assertEqual(response.header(b"x-fallback"), b"static")
                self.assertEqual(response.body, FALLBACK_BODY.encode())
            else:
                self.assertIsNone(response.header(b"x-fallback"))
                self.assertEqual(response.body, UNAVAILABLE_BODY)  # the upstream's own answer
        opened_at = reactor.seconds()

        for i in range(5):
            response, elapsed = await self.timed_request(f"{path}/open-{i}")
            self.assertEqual(response.status, 503)
            self.assertLess(elapsed, 0.5)
            retry_after = response.header(b"retry-after")
            self.assertIsNotNone(retry_after, "no Retry-After while the breaker is open")
            assert retry_after is not None
            self.assertIn(int(retry_after), (1, 2))
            if fallback:
                self.assertEqual(response.header(b"x-fallback"), b"static")
                self.assertEqual(response.header(b"content-type"), b"application/json")
                self.assertEqual(response.json(), json.loads(FALLBACK_BODY))
            else:
                self.assertGatewayError(response, 503, "service_unavailable")
        self.assertEqual(len(flaky.requests), 3, "the open breaker let a request reach the upstream")
        self.assertIn("-> open for 2", self.new_log())
        return opened_at

    async def recover_breaker(self, path: str, flaky: FaultyUpstream, opened_at: float) -> None:
        """The upstream is back: within recovery_timeout (+ slack) a probe closes the breaker."""
        flaky.mode = OK
        baseline = 3
        while True:
            response = await self.request(f"{path}/probe")
            if response.status == 200:
                break
            self.assertEqual(len(flaky.requests), baseline, "a request reached the upstream while open")
            if reactor.seconds() - opened_at > 4.0:
                self.fail("the breaker did not close within 4s of opening (recovery_timeout 2)")
            await sleep(0.1)
        self.assertGreaterEqual(reactor.seconds() - opened_at, 1.8)
        self.assertIsNone(response.header(b"x-fallback"))
        for i in range(3):
            response = await self.request(f"{path}/closed-{i}")
            self.assertEqual(response.status, 200)
        self.assertEqual(len(flaky.requests), baseline + 4)

    def test_breaker_opens_on_503s_and_closes_after_recovery(self) -> Deferred[None]:
        async def scenario() -> None:
            flaky = self.servers["flaky"]
            assert isinstance(flaky, FaultyUpstream)
            opened_at = await self.open_breaker("/breaker", flaky, fallback=False)
            baseline = await self.steady_outbound()
            await self.assertNoLeak(baseline, faulty=())
            await self.recover_breaker("/breaker", flaky, opened_at)

        return self.run_scenario(scenario)

    def test_breaker_serves_static_fallback_while_open(self) -> Deferred[None]:
        async def scenario() -> None:
            flaky = self.servers["flaky_fb"]
            assert isinstance(flaky, FaultyUpstream)
            opened_at = await self.open_breaker("/breaker-fb", flaky, fallback=True)
            await self.recover_breaker("/breaker-fb", flaky, opened_at)

        return self.run_scenario(scenario)

    # 7. Retry of an upload after a reset.

    def test_put_retried_after_reset_delivers_the_whole_body(self) -> Deferred[None]:
        async def scenario() -> None:
            resetter, sink = self.servers["resetter"], self.servers["sink"]
            body = bytes(range(100))
            digest = hashlib.sha256(body).hexdigest()
            baseline = await self.steady_outbound()

            for i in range(4):
                response = await self.request(f"/replay/{i}", method="PUT", body=body)
                self.assertEqual(response.status, 200, response.body[:300])
                seen = response.json()
                self.assertEqual((seen["method"], seen["body_bytes"], seen["body_sha256"]), ("PUT", 100, digest))

            # Round robin sent half of them to the resetting instance first.
            self.assertGreaterEqual(len(resetter.requests), 1)
            self.assertEqual([(r.body_bytes, r.sha.hexdigest()) for r in sink.requests], [(100, digest)] * 4)
            await self.assertNoLeak(baseline + 1, faulty=(self.ports["resetter"],))

        return self.run_scenario(scenario)


class IdleTimeoutTests(FaultTestCase):
    """4. A stall in the middle of the response body, with ``timeouts.idle`` on the upstream."""

    upstreams = {"stalling": lambda: FaultyUpstream(STALL_MID_BODY)}

    @classmethod
    def gateway_config(cls, ports: dict[str, int]) -> dict[str, Any]:
        return {
            "upstreams": {
                "stalling": {
                    "servers": servers(ports, "stalling"),
                    "retry": ONE_TRY,
                    "timeouts": {"connect": 1, "request": 5, "idle": 1},
                },
            },
            "routes": [{"name": "stalling", "match": {"path": "/stall/*"}, "upstream": "stalling"}],
        }

    def test_stall_mid_body_is_cut_after_idle_timeout(self) -> Deferred[None]:
        async def scenario() -> None:
            stalling = self.servers["stalling"]
            assert isinstance(stalling, FaultyUpstream)
            baseline = await self.steady_outbound()

            cuts = await together(3, lambda: self.cut_request("/stall/body", timeout=8.0))
            for cut in cuts:
                self.assertEqual(cut.status, 200)
                self.assertEqual(cut.announced, ANNOUNCED)
                self.assertEqual(len(cut.body), PARTIAL)
                self.assertTrue(cut.closed, f"the response was still open after {cut.elapsed:.1f}s (a hang)")
                self.assertGreater(cut.elapsed, 0.9)
                self.assertLess(cut.elapsed, 3.0)
            await self.wait_until(stalling.lost_all, 1.0, "the gateway kept the stalled upstream connections open")
            await self.assertNoLeak(baseline, faulty=(self.ports["stalling"],))

            stalling.mode = OK
            response = await self.request("/stall/after")
            self.assertEqual(response.status, 200)
            self.assertEqual(response.json()["path"], "/stall/after")

        return self.run_scenario(scenario)
