"""Metrics and the access log of a real gateway under real traffic.

A ``twistd -n txgateway`` process with an echo upstream, a port where nothing
listens (502) and a WebSocket echo server; curl (HTTP/1.1 and h2c), raw
pipelined connections and the ``websockets`` client send the traffic.  The
tests scrape the admin ``/metrics`` before and after and check that every
counter and histogram count moved by exactly what the traffic implies, that
10,000 distinct paths add no label set, that each access-log line carries
every field with the right value, and that no credential reaches the access
log or the gateway's own log.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

import jwt
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from tests.integration.harness import (
    LOCALHOST,
    CurlResult,
    EchoUpstream,
    GatewayTestCase,
    raw_exchange,
    sleep,
)
from tests.integration.test_websocket import EchoServer

T = TypeVar("T")

JWT_SECRET = "observability-test-secret-0123456789abcdef"
API_KEY = "obs-api-key-6d1f0c2e"
QUERY_SECRET = "q-secret-93b1"
COOKIE_SECRET = "cookie-secret-5a7e"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 300}, JWT_SECRET, algorithm="HS256")


async def scrape(admin_port: int) -> tuple[Samples, str]:
    """The admin ``/metrics``: every sample by (name, labels), and the raw text."""
    raw = await raw_exchange(admin_port, b"GET /metrics HTTP/1.0\r\nHost: admin\r\n\r\n", 10.0)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"200", head
    text = body.decode("utf-8")
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, text


class Delta:
    """What moved between two scrapes."""

    def __init__(self, before: Samples, after: Samples) -> None:
        self.before = before
        self.after = after

    def __call__(self, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return self.after.get(key, 0.0) - self.before.get(key, 0.0)

    def now(self, name: str, **labels: str) -> float | None:
        return self.after.get((name, frozenset(labels.items())))


class ObservabilityTests(GatewayTestCase):
    upstreams: ClassVar[dict[str, Callable[[], EchoUpstream]]] = {"echo": EchoUpstream}
    unreachable: ClassVar[tuple[str, ...]] = ("dead", "ws")
    timeout = 240

    @classmethod
    def gateway_config(cls, ports: dict[str, int]) -> dict[str, Any]:
        def servers(name: str) -> list[dict[str, Any]]:
            return [{"address": f"{LOCALHOST}:{ports[name]}"}]

        once = {"attempts": 1}
        return {
            "upstreams": {
                "echo": {"servers": servers("echo"), "retry": once},
                "dead": {"servers": servers("dead"), "retry": once, "timeouts": {"connect": 2, "request": 5}},
                "ws": {"servers": servers("ws"), "retry": once},
            },
            "routes": [
                {"name": "echo", "match": {"path": "/echo/*"}, "upstream": "echo", "auth": "none"},
                {"name": "private", "match": {"path": "/private/*"}, "upstream": "echo", "auth": "required"},
                {
                    "name": "limited",
                    "match": {"path": "/limited/*"},
                    "upstream": "echo",
                    "auth": "none",
                    "rate_limit": {"requests_per_minute": 1, "burst_size": 2},
                },
                {"name": "broken", "match": {"path": "/broken/*"}, "upstream": "dead", "auth": "none"},
                {"name": "chat", "match": {"path": "/chat"}, "upstream": "ws", "websocket": True, "auth": "none"},
            ],
            "middleware": {
                "auth": {
                    "jwt": {"algorithms": ["HS256"], "secret": JWT_SECRET, "query_param": "access_token"},
                    "api_keys": {
                        "header": "X-API-Key",
                        "keys": [{"sha256": hashlib.sha256(API_KEY.encode()).hexdigest(), "consumer": "ci-bot"}],
                    },
                },
            },
            # Relative: the gateway runs in its own directory.
            "observability": {"access_log": {"enabled": True, "format": "json", "path": "access.log"}},
        }

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        d = super().setUp()

        def started(_: object) -> None:
            self.access_log = self.gateway.directory / "access.log"
            self.log_offset = self.access_log.stat().st_size if self.access_log.exists() else 0

        return d.addCallback(started)

    async def access_records(self, count: int, within: float = 10.0) -> list[dict[str, Any]]:
        """The ``count`` access-log lines written since the test started (they are flushed every 0.5 s)."""
        deadline = time.monotonic() + within
        while True:
            with open(self.access_log, "rb") as log:
                log.seek(self.log_offset)
                lines = log.read().decode("utf-8").splitlines()
            if len(lines) >= count:
                await sleep(0.6)  # nothing more should come
                with open(self.access_log, "rb") as log:
                    log.seek(self.log_offset)
                    lines = log.read().decode("utf-8").splitlines()
                self.assertEqual(len(lines), count, "\n".join(lines[count:]))
                return [json.loads(line) for line in lines]
            if time.monotonic() > deadline:
                self.fail(f"{len(lines)} access-log lines, expected {count}:\n" + "\n".join(lines))
            await sleep(0.1)

    async def metrics(self) -> tuple[Samples, str]:
        return await scrape(self.gateway.admin_port)

    def test_traffic_moves_every_metric_and_logs_every_field(self) -> Deferred[None]:
        async def scenario() -> None:
            before, _ = await self.metrics()
            sent: list[tuple[str, CurlResult]] = []

            async def send(label: str, path: str, *args: str) -> CurlResult:
                result = await self.curl(path, *args)
                self.assertEqual(result.exit_code, 0, result.stderr)
                sent.append((label, result))
                return result

            echoed = await send("echo", "/echo/a", "-H", f"traceparent: 00-{TRACE_ID}-b7ad6b7169203331-01")
            await send("echo-query", f"/echo/b?token={QUERY_SECRET}&page=2")
            upload = await send("upload", "/echo/upload", "--data-binary", "x" * 1000)
            await send("h2", "/echo/h2", "--http2-prior-knowledge")
            await send("404", "/nowhere")
            await send("401", "/private/x")
            await send("api-key", "/private/x", "-H", f"X-API-Key: {API_KEY}")
            await send("query-jwt", f"/private/x?access_token={token('alice')}")
            await send("bearer", "/private/x", "-H", f"Authorization: Bearer {token('bob')}")
            for _ in range(3):
                await send("limited", "/limited/x")
            await send("502", "/broken/x")
            statuses = [result.status for _, result in sent]
            self.assertEqual(statuses, [200, 200, 200, 200, 404, 401, 200, 200, 200, 200, 200, 429, 502])
            self.assertEqual(upload.json()["body_bytes"], 1000)
            self.assertIn(["traceparent", f"00-{TRACE_ID}-"], [[n, v[:36]] for n, v in echoed.json()["headers"]])

            records = await self.access_records(len(sent))
            after, _ = await self.metrics()
            delta = Delta(before, after)

            def requests(route: str, method: str, code: int, protocol: str = "http/1.1") -> float:
                return delta("txgateway_requests_total", route=route, method=method, code=str(code), protocol=protocol)

            self.assertEqual(
                {
                    "echo GET 200": requests("echo", "GET", 200),
                    "echo POST 200": requests("echo", "POST", 200),
                    "echo GET 200 h2": requests("echo", "GET", 200, "h2"),
                    "none GET 404": requests("", "GET", 404),
                    "private GET 401": requests("private", "GET", 401),
                    "private GET 200": requests("private", "GET", 200),
                    "limited GET 200": requests("limited", "GET", 200),
                    "limited GET 429": requests("limited", "GET", 429),
                    "broken GET 502": requests("broken", "GET", 502),
                },
                {
                    "echo GET 200": 2,
                    "echo POST 200": 1,
                    "echo GET 200 h2": 1,
                    "none GET 404": 1,
                    "private GET 401": 1,
                    "private GET 200": 3,
                    "limited GET 200": 2,
                    "limited GET 429": 1,
                    "broken GET 502": 1,
                },
            )
            for route, method, code, count in (
                ("echo", "GET", "200", 3),  # h1 and h2 alike
                ("echo", "POST", "200", 1),
                ("", "GET", "404", 1),
                ("private", "GET", "401", 1),
                ("private", "GET", "200", 3),
                ("limited", "GET", "429", 1),
                ("broken", "GET", "502", 1),
            ):
                labels = {"route": route, "method": method, "code": code}
                self.assertEqual(delta("txgateway_request_duration_seconds_count", **labels), count, labels)
                self.assertEqual(
                    delta("txgateway_request_duration_seconds_bucket", le="+Inf", **labels), count, labels
                )
            echo_bytes = sum(len(result.body) for label, result in sent if label.startswith(("echo", "upload", "h2")))
            self.assertEqual(delta("txgateway_request_bytes_total", route="echo"), 1000)
            self.assertEqual(delta("txgateway_response_bytes_total", route="echo"), echo_bytes)
            self.assertEqual(delta("txgateway_ratelimit_decisions_total", route="limited", decision="allowed"), 2)
            self.assertEqual(delta("txgateway_ratelimit_decisions_total", route="limited", decision="limited"), 1)
            self.assertEqual(delta("txgateway_auth_failures_total", route="private", reason="missing_token"), 1)
            echo_instance = f"{LOCALHOST}:{self.ports['echo']}"
            dead_instance = f"{LOCALHOST}:{self.ports['dead']}"
            self.assertEqual(
                delta("txgateway_upstream_request_duration_seconds_count", upstream="echo", address=echo_instance), 9
            )
            self.assertEqual(
                delta("txgateway_upstream_errors_total", upstream="dead", address=dead_instance, kind="connect"), 1
            )
            self.assertEqual(delta.now("txgateway_upstream_instance_healthy", upstream="echo", address=echo_instance), 1)
            self.assertEqual(delta.now("txgateway_requests_in_flight", protocol="http/1.1"), 0)
            self.assertEqual(delta.now("txgateway_requests_in_flight", protocol="h2"), 0)

            # The access log: one line per request, in order, every field.
            self.assertEqual(len(records), len(sent))
            for (label, result), record in zip(sent, records, strict=True):
                self.assertEqual(
                    list(record),
                    ["time", "request_id", "trace_id", "client_ip", "method", "route", "path", "status",
                     "bytes_in", "bytes_out", "duration_ms", "upstream_ms", "upstream", "consumer",
                     "rate_limit", "cache", "protocol", "user_agent"],
                )  # fmt: skip
                self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
                self.assertLess(abs(time.time() - _epoch(record["time"])), 120)
                self.assertEqual(record["request_id"], (result.header(b"x-request-id") or b"").decode(), label)
                self.assertRegex(record["trace_id"], r"^[0-9a-f]{32}$")
                self.assertEqual(record["client_ip"], LOCALHOST)
                self.assertEqual(record["status"], result.status, label)
                self.assertEqual(record["bytes_out"], len(result.body), label)
                self.assertEqual(record["bytes_in"], 1000 if label == "upload" else 0, label)
                self.assertIsInstance(record["duration_ms"], float)
                self.assertGreaterEqual(record["duration_ms"], record["upstream_ms"] or 0.0)
                self.assertIsNone(record["cache"])
                self.assertEqual(record["protocol"], "h2" if label == "h2" else "http/1.1")
                self.assertTrue(record["user_agent"].startswith("curl/"), record["user_agent"])
            by_label = dict(zip([label for label, _ in sent], records, strict=False))
            self.assertEqual(by_label["echo"]["trace_id"], TRACE_ID)
            self.assertEqual(
                [(r["method"], r["route"], r["path"]) for r in records],
                [
                    ("GET", "echo", "/echo/a"),
                    ("GET", "echo", "/echo/b?token=REDACTED&page=2"),
                    ("POST", "echo", "/echo/upload"),
                    ("GET", "echo", "/echo/h2"),
                    ("GET", None, "/nowhere"),
                    ("GET", "private", "/private/x"),
                    ("GET", "private", "/private/x"),
                    ("GET", "private", "/private/x"),  # the query token was consumed by the auth stage
                    ("GET", "private", "/private/x"),
                    ("GET", "limited", "/limited/x"),
                    ("GET", "limited", "/limited/x"),
                    ("GET", "limited", "/limited/x"),
                    ("GET", "broken", "/broken/x"),
                ],
            )
            self.assertEqual(
                [r["consumer"] for r in records],
                [None] * 6 + ["ci-bot", "alice", "bob"] + [None] * 4,
            )
            self.assertEqual(
                [r["rate_limit"] for r in records], [None] * 9 + ["allowed", "allowed", "limited", None]
            )
            upstreams = [r["upstream"] for r in records]
            self.assertEqual(
                upstreams,
                [echo_instance] * 4 + [None, None] + [echo_instance] * 5 + [None, dead_instance],
            )
            for record in records:
                if record["upstream"] is None:
                    self.assertIsNone(record["upstream_ms"])
                else:
                    self.assertIsInstance(record["upstream_ms"], float)

        return Deferred.fromCoroutine(scenario())

    def test_credentials_never_reach_any_log(self) -> Deferred[None]:
        async def scenario() -> None:
            bearer = token("carol")
            query_token = token("dave")
            results = [
                await self.curl("/private/a", "-H", f"Authorization: Bearer {bearer}"),
                await self.curl(f"/private/b?access_token={query_token}&x=1"),
                await self.curl("/private/c", "-H", f"X-API-Key: {API_KEY}", "-H", f"Cookie: sid={COOKIE_SECRET}"),
                await self.curl(f"/echo/d?api_key={API_KEY}&password={QUERY_SECRET}&access_token={query_token}"),
                await self.curl("/private/e", "-H", f"X-API-Key: wrong-{API_KEY}"),
                await self.curl("/private/f", "-H", "Authorization: Bearer not-a-jwt-" + QUERY_SECRET),
                await self.curl("/private/g", "-H", f"Authorization: Basic {QUERY_SECRET}"),
            ]
            self.assertEqual([r.status for r in results], [200, 200, 200, 200, 401, 401, 401])
            records = await self.access_records(len(results))
            self.assertEqual(
                [r["path"] for r in records],
                [
                    "/private/a",
                    "/private/b?x=1",
                    "/private/c",
                    "/echo/d?api_key=REDACTED&password=REDACTED&access_token=REDACTED",
                    "/private/e",
                    "/private/f",
                    "/private/g",
                ],
            )
            everything = self.access_log.read_text() + self.gateway.log()
            for secret in (bearer, query_token, API_KEY, COOKIE_SECRET, QUERY_SECRET):
                self.assertNotIn(secret, everything)
            self.assertNotIn("Bearer", self.access_log.read_text())

        return Deferred.fromCoroutine(scenario())

    def test_sigusr1_reopens_the_access_log(self) -> Deferred[None]:
        async def scenario() -> None:
            self.assertEqual((await self.curl("/echo/before")).status, 200)
            await self.access_records(1)
            rotated = self.access_log.with_name("access.log.1")
            os.rename(self.access_log, rotated)
            assert self.gateway.pid is not None
            os.kill(self.gateway.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 5
            while not self.access_log.exists():  # reopened: created anew
                self.assertLess(time.monotonic(), deadline, "the access log was not reopened")
                await sleep(0.05)
            self.assertEqual((await self.curl("/echo/after")).status, 200)
            self.log_offset = 0
            [record] = await self.access_records(1)
            self.assertEqual(record["path"], "/echo/after")
            self.assertIn("/echo/before", rotated.read_text())
            self.assertNotIn("/echo/after", rotated.read_text())

        return Deferred.fromCoroutine(scenario())

    def test_ten_thousand_distinct_paths_keep_label_sets_bounded(self) -> Deferred[None]:
        async def scenario() -> None:
            before, _ = await self.metrics()
            batch = 500
            middle: Samples = {}
            for start in range(0, 10_000, batch):
                if start == 1000:
                    middle, _ = await self.metrics()
                requests = b"".join(
                    b"GET /%s/%d-%d HTTP/1.1\r\nHost: gw\r\n%s\r\n"
                    % (
                        b"echo" if (start + i) % 2 else b"nowhere",
                        start + i,
                        start * 7919 + i,
                        b"Connection: close\r\n" if i == batch - 1 else b"",
                    )
                    for i in range(batch)
                )
                raw = await raw_exchange(self.port, requests, timeout=60)
                self.assertEqual(len(re.findall(rb"HTTP/1\.1 (?:200|404) ", raw)), batch)
            after, after_text = await self.metrics()
            delta = Delta(before, after)
            self.assertEqual(
                delta("txgateway_requests_total", route="echo", method="GET", code="200", protocol="http/1.1"), 5000
            )
            self.assertEqual(
                delta("txgateway_requests_total", route="", method="GET", code="404", protocol="http/1.1"), 5000
            )
            # The first 1,000 paths may add the label sets of their two routes
            # (a fixed number, whatever the paths); the 9,000 more add none.
            self.assertEqual(set(after) - set(middle), set())
            self.assertLess(len(middle) - len(before), 100)
            sample_lines = [line for line in after_text.splitlines() if line and not line.startswith("#")]
            self.assertEqual(len(sample_lines), len(after))
            self.assertLess(len(sample_lines), 1000)
            self.assertNotIn("/echo/", after_text)
            self.assertNotIn("/nowhere/", after_text)
            await self.access_records(10_000, within=30)

        return Deferred.fromCoroutine(scenario())

    def test_websocket_is_one_exchange_ending_at_close(self) -> Deferred[None]:
        from websockets.sync.client import connect

        async def scenario() -> None:
            echo = EchoServer(self.ports["ws"])
            self.addCleanup(echo.stop)
            before, _ = await self.metrics()

            def talk() -> list[Any]:
                with connect(f"ws://{LOCALHOST}:{self.port}/chat", open_timeout=10, close_timeout=5) as ws:
                    ws.send("hello")
                    first = ws.recv(timeout=5)
                    ws.send("world!")
                    second = ws.recv(timeout=5)
                return [first, second]

            received = await _in_thread(talk)
            self.assertEqual(received, ["hello", "world!"])
            [record] = await self.access_records(1)
            after, _ = await self.metrics()
            delta = Delta(before, after)
            self.assertEqual(
                (record["status"], record["protocol"], record["route"], record["bytes_in"], record["bytes_out"]),
                (101, "websocket", "chat", 11, 11),
            )
            self.assertEqual(record["upstream"], f"{LOCALHOST}:{self.ports['ws']}")
            self.assertEqual(
                delta("txgateway_requests_total", route="chat", method="GET", code="101", protocol="websocket"), 1
            )
            self.assertEqual(delta("txgateway_websocket_connections_total", route="chat"), 1)
            self.assertEqual(delta.now("txgateway_websocket_connections_open", route="chat"), 0)
            messages = "txgateway_websocket_messages_total"
            self.assertEqual(delta(messages, route="chat", direction="client_to_upstream"), 2)
            self.assertEqual(delta(messages, route="chat", direction="upstream_to_client"), 2)
            self.assertEqual(delta.now("txgateway_connections_open", protocol="websocket"), 0)

        return Deferred.fromCoroutine(scenario())


def _in_thread(call: Callable[[], T]) -> Deferred[T]:
    return deferToThread(call)


def _epoch(iso: str) -> float:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
