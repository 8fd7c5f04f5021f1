"""Graceful shutdown of a real ``twistd -n txgateway`` on SIGTERM, under load.

The sequence a user (and Kubernetes) relies on: ``/ready`` answers 503 at
once; for ``server.shutdown_delay`` the listener still takes new connections;
then it refuses them while every request that had started is answered (HTTP/1.1
with ``Connection: close``, HTTP/2 streams after a GOAWAY, gRPC calls);
WebSockets stay open until ``server.shutdown_grace`` ends and are then closed
with 1001 on both sides; and the process exits with status 0, not by a signal.
A request slower than the grace period is cut at its end: a request with no
response yet sees its connection close with no byte of response (the gateway
cannot know what the upstream did with it, so it claims nothing); a response
already streaming ends without its last chunk, so the client can tell it is
incomplete.

Real upstreams (HTTP, ``websockets``, grpcio), real clients (raw sockets,
h2load, ``websockets``, grpcio); loopback only; everything stopped.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from collections.abc import Callable
from typing import Any

import grpc
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as websocket_connect

from tests.integration.harness import (
    LOCALHOST,
    DribbleUpstream,
    GatewayProcess,
    IncompleteResponse,
    RawClient,
    RawResponse,
    SeenRequest,
    SilentUpstream,
    UpstreamConnection,
    UpstreamServer,
    connect,
    exit_code,
    exit_signal,
    free_port,
    parse_responses,
    raw_exchange,
    reactor,
    run,
    sleep,
)
from tests.integration.test_grpc import CHANNEL_OPTIONS, EchoService, start_upstream
from tests.integration.test_websocket import EchoServer

H2LOAD = shutil.which("h2load")
#: server.shutdown_delay of the drain test.
DELAY = 1.5
#: How long the upstream takes over each slow request: they are still running when the drain begins.
SLOW = DELAY + 1.5


class SlowUpstream(UpstreamServer):
    """Answers each request after ``?delay=S`` seconds (JSON naming its path)."""

    def request_complete(self, connection: UpstreamConnection, request: SeenRequest) -> None:
        match = re.search(r"(?:^|&)delay=([0-9.]+)", request.query)
        delay = float(match.group(1)) if match else 0.0
        payload = json.dumps({"path": request.path}).encode()

        def answer() -> None:
            connection.respond(200, [("Content-Type", "application/json")], payload)

        if delay:
            connection.later(delay, answer)
        else:
            answer()

    def started(self, prefix: str) -> int:
        return sum(1 for r in self.requests if r.path.startswith(prefix))


async def get(port: int, path: str) -> RawResponse:
    raw = await raw_exchange(
        port, f"GET {path} HTTP/1.1\r\nHost: {LOCALHOST}\r\nConnection: close\r\n\r\n".encode(), 10
    )
    [response] = parse_responses(raw, until_close=True)
    return response


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
H2_GOAWAY = 0x7


def h2_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(type, payload) of every complete HTTP/2 frame in ``data``."""
    frames = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        if len(data) < 9 + length:
            break
        frames.append((data[3], data[9 : 9 + length]))
        data = data[9 + length :]
    return frames


def request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {LOCALHOST}\r\n\r\n".encode()


class ShutdownTestCase(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.ports = {name: free_port() for name in ("slow", "silent", "dribble", "ws", "grpc")}

    def upstream(self, name: str, server: UpstreamServer) -> Any:
        server.listen(self.ports[name])
        self.addCleanup(server.stop)
        return server

    async def start_gateway(
        self, server: dict[str, Any], upstreams: dict[str, Any], routes: list[Any]
    ) -> GatewayProcess:
        config = {
            "server": server,
            "upstreams": upstreams,
            "routes": routes,
            "observability": {"access_log": {"enabled": False}},
        }
        gateway = GatewayProcess(config)
        self.addCleanup(gateway.stop)
        await gateway.start()
        return gateway

    async def connect(self, port: int) -> RawClient:
        client = await connect(port)
        self.addCleanup(client.abort)
        return client

    async def until(self, predicate: Callable[[], bool], message: str, within: float = 10.0) -> None:
        deadline = reactor.seconds() + within
        while not predicate():
            if reactor.seconds() > deadline:
                self.fail(f"{message} within {within}s")
            await sleep(0.02)

    async def exited_cleanly(self, gateway: GatewayProcess, within: float = 20.0) -> str:
        """Wait for the process to end; it must end with status 0 and no traceback. Its log."""
        status = await gateway.exited().addTimeout(within, reactor)
        log = gateway.log()
        self.assertIsNone(exit_signal(gateway.exit_reason), f"killed by a signal:\n{log}")
        self.assertEqual(status, 0, log)
        self.assertEqual(exit_code(gateway.exit_reason), 0)  # type: ignore[arg-type]
        self.assertNotIn("Traceback (most recent call last)", log)
        self.assertNotIn("Unhandled error", log)
        self.assertIn("Received SIGTERM, shutting down.", log)
        self.assertNotIn("still open after closing", log)
        return log

    async def ready_status(self, gateway: GatewayProcess) -> tuple[int, Any]:
        response = await get(gateway.admin_port, "/ready")
        return response.status, response.json()


def route(name: str, path: str, upstream: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "match": {"path": path}, "upstream": upstream, "auth": "none", **extra}


class GracefulShutdownTests(ShutdownTestCase):
    async def test_requests_in_flight_finish(self) -> None:
        """Slow requests on keep-alive HTTP/1.1 connections and on one HTTP/2 connection
        (h2load), SIGTERM while they run: all answered 200, the process exits 0."""
        if H2LOAD is None:
            self.skipTest("h2load (Debian nghttp2-client) is not installed")
        slow = self.upstream("slow", SlowUpstream())
        delay = DELAY
        gateway = await self.start_gateway(
            {"shutdown_delay": delay, "shutdown_grace": 8},
            {"slow": {"servers": [f"{LOCALHOST}:{self.ports['slow']}"], "timeouts": {"request": 10}}},
            [route("slow", "/slow/*", "slow")],
        )
        port = gateway.port

        # Four keep-alive connections, each used once already, and one that stays idle.
        clients = [await self.connect(port) for _ in range(5)]
        for client in clients:
            client.send(request("/slow/warm-up"))
        for client in clients:
            [warm] = await client.wait_responses(1)
            self.assertEqual(warm.status, 200)
            self.assertIsNone(warm.header(b"connection"))
            client.received = b""
        busy, idle = clients[:4], clients[4]
        # And an HTTP/2 connection with nothing asked on it yet.
        idle_h2 = await self.connect(port)
        idle_h2.send(H2_PREFACE + H2_EMPTY_SETTINGS)
        await idle_h2.wait_for(lambda data: bool(h2_frames(data)))

        # Slow requests start: four on HTTP/1.1, four streams on one HTTP/2 connection.
        h2 = run(H2LOAD, "-n", "4", "-c", "1", "-m", "4", f"http://{LOCALHOST}:{port}/slow/h2?delay={SLOW}")
        for i, client in enumerate(busy):
            client.send(request(f"/slow/h1-{i}?delay={SLOW}"))
        await self.until(
            lambda: slow.started("/slow/h1-") == 4 and slow.started("/slow/h2") == 4,
            "the slow requests did not all reach the upstream",
        )

        gateway.send_signal(signal.SIGTERM)
        signalled = reactor.seconds()

        # Not ready at once, and for the whole delay.
        status, body = await self.ready_status(gateway)
        self.assertEqual((status, body["status"], body["reason"]), (503, "not_ready", "shutting down"))
        # Still accepting during the delay: a new connection is served.
        during = await get(port, "/slow/during-delay")
        self.assertEqual(during.status, 200)
        self.assertLess(reactor.seconds() - signalled, delay, "the check ran too late to be within the delay")
        readiness = []
        while reactor.seconds() - signalled < delay:
            readiness.append((await self.ready_status(gateway))[0])
            await sleep(0.1)
        self.assertEqual(set(readiness), {503})

        # Then new connections are refused.
        refused = False
        while not refused and reactor.seconds() - signalled < 10:
            try:
                client = await connect(port)
            except ConnectionRefusedError:
                refused = True
            else:
                await client.abort()
                await sleep(0.05)
        self.assertTrue(refused, "the listener still accepted connections 10 s after SIGTERM")

        # Every request that had started is answered, and its connection then closed.
        for i, client in enumerate(busy):
            raw = await client.wait_closed(10)
            [response] = parse_responses(raw)
            self.assertEqual(response.status, 200)
            self.assertEqual(response.json(), {"path": f"/slow/h1-{i}"})
            self.assertEqual(response.header(b"connection"), b"close")
        # The idle keep-alive connection is closed without a word.
        self.assertEqual(await idle.wait_closed(10), b"")
        # The idle HTTP/2 connection gets a GOAWAY (NO_ERROR, no stream served) and is closed.
        goaways = [payload for kind, payload in h2_frames(await idle_h2.wait_closed(10)) if kind == H2_GOAWAY]
        self.assertTrue(goaways, "no GOAWAY on the idle HTTP/2 connection")
        self.assertEqual(goaways[-1][:8], b"\x00" * 8)  # last stream id 0, error code NO_ERROR

        out, err, code = await h2
        report = out.decode()
        self.assertEqual(code, 0, report + err.decode())
        self.assertIn("requests: 4 total, 4 started, 4 done, 4 succeeded, 0 failed, 0 errored", report)
        self.assertIn("status codes: 4 2xx, 0 3xx, 0 4xx, 0 5xx", report)

        log = await self.exited_cleanly(gateway)
        self.assertIn(f"shutting down: not ready; still accepting for {delay:g}s (server.shutdown_delay)", log)
        self.assertIn("shutting down: every connection finished", log)

    async def test_grpc_call_in_flight_finishes(self) -> None:
        """A unary gRPC call the upstream takes 2 s over, SIGTERM meanwhile: the call succeeds."""
        service = EchoService()
        server = start_upstream(self.ports["grpc"], service)
        self.addCleanup(lambda: deferToThread(lambda: server.stop(0).wait(10)))
        gateway = await self.start_gateway(
            {"shutdown_delay": 0.2, "shutdown_grace": 8},
            {"grpc": {"protocol": "grpc", "servers": [f"{LOCALHOST}:{self.ports['grpc']}"]}},
            [route("grpc", "/echo.Echo/*", "grpc")],
        )
        channel = grpc.insecure_channel(f"{LOCALHOST}:{gateway.port}", options=CHANNEL_OPTIONS)
        self.addCleanup(channel.close)
        self.assertEqual(
            await deferToThread(channel.unary_unary("/echo.Echo/Unary"), b"warm-up", timeout=10), b"warm-up"
        )

        call = deferToThread(channel.unary_unary("/echo.Echo/Slow"), b"", timeout=15)
        await self.until(lambda: bool(service.seen("Slow")), "the slow call did not reach the upstream")
        gateway.send_signal(signal.SIGTERM)
        self.assertEqual(await call, b"too late")
        log = await self.exited_cleanly(gateway)
        # The client's HTTP/2 connection was told GOAWAY and closed once its call was done.
        self.assertIn("shutting down: every connection finished", log)

    async def test_websocket_closed_1001_when_grace_ends(self) -> None:
        echo = EchoServer(self.ports["ws"])
        self.addCleanup(echo.stop)
        grace = 2.0
        gateway = await self.start_gateway(
            {"shutdown_delay": 0.2, "shutdown_grace": grace},
            {"ws": {"servers": [f"{LOCALHOST}:{self.ports['ws']}"], "retry": {"attempts": 1}}},
            [route("ws", "/ws/*", "ws", websocket=True)],
        )

        def scenario() -> tuple[str, str, int | None, float]:
            with websocket_connect(f"ws://{LOCALHOST}:{gateway.port}/ws/chat", open_timeout=10) as ws:
                ws.send("before")
                before = str(ws.recv(5))
                gateway.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                time.sleep(1.0)  # listeners closed by now, the grace period running
                ws.send("during the grace period")
                during = str(ws.recv(5))
                try:
                    ws.recv(15)
                except ConnectionClosed:
                    pass
                closed_after = time.monotonic() - signalled
                received = ws.protocol.close_rcvd
                return before, during, received.code if received is not None else None, closed_after

        before, during, code, closed_after = await deferToThread(scenario)
        self.assertEqual((before, during), ("before", "during the grace period"))
        self.assertEqual(code, 1001)
        # Open for the whole grace period, which starts once the listeners close.
        self.assertGreaterEqual(closed_after, grace - 0.1)
        self.assertLess(closed_after, 15)
        await deferToThread(echo.closed.wait, 10)
        self.assertEqual([close[0] for close in echo.closes], [1001])
        log = await self.exited_cleanly(gateway)
        self.assertIn("grace period over; closing 1 WebSocket(s) with 1001", log)

    async def test_request_slower_than_grace_is_cut(self) -> None:
        """At the end of the grace period what is still running is cut and the process exits 0:
        a request without a response sees its connection close with no response; a response
        being streamed ends without its final chunk."""
        silent = self.upstream("silent", SilentUpstream())
        dribble = self.upstream("dribble", DribbleUpstream())
        grace = 1.0
        gateway = await self.start_gateway(
            {"shutdown_delay": 0, "shutdown_grace": grace},
            {
                "silent": {"servers": [f"{LOCALHOST}:{self.ports['silent']}"], "timeouts": {"request": 30}},
                "dribble": {"servers": [f"{LOCALHOST}:{self.ports['dribble']}"], "timeouts": {"request": 30}},
            },
            [route("silent", "/silent/*", "silent"), route("dribble", "/dribble/*", "dribble")],
        )
        waiting = await self.connect(gateway.port)
        waiting.send(request("/silent/forever"))
        streaming = await self.connect(gateway.port)
        streaming.send(request("/dribble/long?pieces=200&delay=0.1"))
        await self.until(lambda: len(silent.requests) == 1, "the request did not reach the silent upstream")
        await streaming.wait_for(lambda data: b"piece-2\n" in data)

        gateway.send_signal(signal.SIGTERM)
        signalled = reactor.seconds()
        self.assertEqual(await waiting.wait_closed(10), b"")
        self.assertGreaterEqual(waiting.closed_at - signalled, grace - 0.1)
        cut = await streaming.wait_closed(10)
        self.assertTrue(cut.startswith(b"HTTP/1.1 200 "), cut[:100])
        self.assertIn(b"piece-4\n", cut)  # streamed on during the grace period
        with self.assertRaises(IncompleteResponse):
            parse_responses(cut)
        self.assertFalse(dribble.records[0].finished)

        log = await self.exited_cleanly(gateway)
        self.assertIn("shutting down: grace period over", log)
        await self.until(lambda: not silent.connections, "the gateway's upstream connection stayed open")
