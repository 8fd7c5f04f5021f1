"""Hot reload of a real ``twistd -n txgateway`` under load, by every trigger.

Each test runs its own gateway (a reload changes it for good) in front of
real upstreams: two HTTP echo servers that say which of them answered, a
``websockets`` echo server and a grpcio echo server (the helpers of
test_websocket and test_grpc).  While the config is rewritten and reloaded,
clients keep working: HTTP/1.1 loops (keep-alive and a new connection per
request), a WebSocket exchanging messages and a gRPC bidi stream playing
ping-pong.  What a user would notice is checked: no request fails, the long
connections stay the same connections and keep working, the new route serves,
the changed upstream gets the new requests, ``/admin/reloads`` and the log
show the new generation.

A file that does not load (broken YAML, an unknown upstream) changes
nothing, and says where the problem is.  State that belongs to what a reload
leaves unchanged survives it: rate-limit buckets, an instance's health, a
breaker's state.

Loopback only; every gateway, server, thread and connection is stopped.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from websockets.sync.client import connect as websocket_connect

from tests.integration.harness import (
    LOCALHOST,
    EchoUpstream,
    GatewayProcess,
    RawClient,
    RawResponse,
    SeenRequest,
    UpstreamConnection,
    connect,
    free_port,
    parse_responses,
    raw_exchange,
    reactor,
    sleep,
)
from tests.integration.test_grpc import CHANNEL_OPTIONS, EchoService, start_upstream
from tests.integration.test_websocket import EchoServer

#: How long a reload by the file watcher (polling every 2 s) may take to show.
FILE_WATCH_WITHIN = 10.0
#: How many exchanges each long-lived connection must make after the reload.
AFTER_RELOAD = 5


# Upstreams and config.


class NamedEcho(EchoUpstream):
    """The echo upstream, saying which server answered (``"server": name``)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def request_complete(self, connection: UpstreamConnection, request: SeenRequest) -> None:
        payload = json.dumps({"server": self.name, **request.describe()}).encode()
        connection.respond(200, [("Content-Type", "application/json")], payload, head=request.method == "HEAD")


def route(name: str, path: str, upstream: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "match": {"path": path}, "upstream": upstream, "auth": "none", **extra}


def before_config(ports: dict[str, int]) -> dict[str, Any]:
    """Generation 1: ``svc`` is server a; ``/v1/*`` strips its prefix; no ``/fresh/*``."""
    return {
        "server": {"shutdown_grace": 2, "shutdown_delay": 0},
        "upstreams": {
            "svc": {"servers": [f"{LOCALHOST}:{ports['a']}"], "timeouts": {"connect": 2, "request": 10}},
            "ws": {"servers": [f"{LOCALHOST}:{ports['ws']}"], "retry": {"attempts": 1}},
            "grpc": {"protocol": "grpc", "servers": [f"{LOCALHOST}:{ports['grpc']}"]},
        },
        "routes": [
            route("api", "/api/*", "svc"),
            route("v1", "/v1/*", "svc", strip_prefix="/v1"),
            route("ws", "/ws/*", "ws", websocket=True),
            route("grpc", "/echo.Echo/*", "grpc"),
        ],
        "observability": {"access_log": {"enabled": False}},
    }


def after_config(ports: dict[str, int]) -> dict[str, Any]:
    """Generation 2: ``svc`` moved to server b, ``/v1/*`` no longer strips, ``/fresh/*`` added."""
    config = before_config(ports)
    config["upstreams"]["svc"]["servers"] = [f"{LOCALHOST}:{ports['b']}"]
    config["routes"][1] = route("v1", "/v1/*", "svc")
    config["routes"].append(route("fresh", "/fresh/*", "svc", strip_prefix="/fresh"))
    return config


# Clients.


async def get(port: int, path: str, headers: str = "", method: str = "GET") -> RawResponse:
    """One request on its own connection."""
    raw = await raw_exchange(
        port,
        f"{method} {path} HTTP/1.1\r\nHost: {LOCALHOST}\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n".encode(),
        10.0,
    )
    [response] = parse_responses(raw, until_close=True)
    return response


async def admin(gateway: GatewayProcess, path: str, method: str = "GET") -> RawResponse:
    return await get(gateway.admin_port, path, method=method)


async def reloads(gateway: GatewayProcess) -> list[dict[str, Any]]:
    response = await admin(gateway, "/admin/reloads")
    assert response.status == 200, response
    history: list[dict[str, Any]] = response.json()["reloads"]
    return history


async def wait_reload(gateway: GatewayProcess, seen: int, within: float) -> dict[str, Any]:
    """The newest reload attempt once there are more than ``seen``."""
    deadline = reactor.seconds() + within
    while True:
        history = await reloads(gateway)
        if len(history) > seen:
            return history[0]
        if reactor.seconds() > deadline:
            raise AssertionError(f"no reload attempt within {within}s: {history}")
        await sleep(0.05)


async def metric(gateway: GatewayProcess, sample: str) -> float | None:
    """The value of one sample line (name and labels exactly) of /metrics."""
    response = await admin(gateway, "/metrics")
    for line in response.body.decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return None


class HTTPLoop:
    """Requests back to back until stopped: on one keep-alive connection, or a new one each.

    Every outcome is kept: (number, sent at, status or None, answering server).
    """

    def __init__(self, port: int, prefix: str, keep_alive: bool) -> None:
        self.port = port
        self.prefix = prefix
        self.keep_alive = keep_alive
        self.outcomes: list[tuple[int, float, int | None, str | None]] = []
        self.failures: list[str] = []
        self.connections = 0
        self._stopping = False
        self._client: RawClient | None = None
        self.done: Deferred[None] = Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        number = 0
        while not self._stopping:
            number += 1
            sent_at = reactor.seconds()
            try:
                response = await self._request(f"{self.prefix}{number}")
            except Exception as error:  # noqa: BLE001 - every failure is a finding
                self.failures.append(f"request {number}: {error!r}")
                self.outcomes.append((number, sent_at, None, None))
                self._client = None
                continue
            server = response.json().get("server") if response.status == 200 else None
            self.outcomes.append((number, sent_at, response.status, server))
            if response.status != 200:
                self.failures.append(f"request {number}: {response.status} {response.body[:200]!r}")

    async def _request(self, path: str) -> RawResponse:
        connection = "keep-alive" if self.keep_alive else "close"
        request = f"GET {path} HTTP/1.1\r\nHost: {LOCALHOST}\r\nConnection: {connection}\r\n\r\n".encode()
        client = self._client
        if client is None or client.is_closed:
            client = self._client = await connect(self.port)
            self.connections += 1
        client.received = b""
        client.send(request)
        if self.keep_alive:
            [response] = await client.wait_responses(1, timeout=10.0)
            return response
        raw = await client.wait_closed(10.0)
        [response] = parse_responses(raw, until_close=True)
        return response

    def served_since(self, when: float) -> int:
        return sum(1 for _, sent_at, status, _ in self.outcomes if sent_at >= when and status == 200)

    async def stop(self) -> None:
        self._stopping = True
        await self.done
        if self._client is not None:
            await self._client.abort()


class WebSocketLoop(threading.Thread):
    """One WebSocket (the ``websockets`` client) sending a message and reading its echo, every 20 ms.

    Its ``X-Request-ID`` reaches the upstream with the handshake: it tells this
    test's connection from any other.
    """

    def __init__(self, url: str, request_id: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.request_id = request_id
        self.opened = threading.Event()
        self.stopping = threading.Event()
        self.echoes: list[float] = []
        self.error: BaseException | None = None
        self.close_code: int | None = None

    def run(self) -> None:
        try:
            headers = {"X-Request-ID": self.request_id}
            with websocket_connect(self.url, open_timeout=10, close_timeout=5, additional_headers=headers) as ws:
                self.opened.set()
                number = 0
                while not self.stopping.is_set():
                    ws.send(f"message-{number}")
                    echo = ws.recv(10)
                    if echo != f"message-{number}":
                        raise AssertionError(f"echo of message-{number} was {echo!r}")
                    self.echoes.append(time.monotonic())
                    number += 1
                    self.stopping.wait(0.02)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error
        finally:
            self.opened.set()

    def since(self, when: float) -> int:
        return sum(1 for at in self.echoes if at >= when)


class BidiLoop(threading.Thread):
    """One gRPC bidi stream through the gateway: a message, its echo, the next one (ping-pong)."""

    def __init__(self, channel: grpc.Channel, request_id: str) -> None:
        super().__init__(daemon=True)
        self.channel = channel
        self.request_id = request_id
        self.opened = threading.Event()
        self.stopping = threading.Event()
        self.echoes: list[float] = []
        self.error: BaseException | None = None
        self.trailing: list[bytes] | None = None

    def run(self) -> None:
        outgoing: queue.Queue[bytes | None] = queue.Queue()

        def requests() -> Iterator[bytes]:
            while True:
                message = outgoing.get(timeout=60)
                if message is None:
                    return
                yield message

        try:
            metadata = (("x-request-id", self.request_id),)
            responses = self.channel.stream_stream("/echo.Echo/Bidi")(requests(), timeout=60, metadata=metadata)
            number = 0
            try:
                while not self.stopping.is_set():
                    outgoing.put(b"ping-%d" % number)
                    echo = next(responses)
                    if echo != b"ping-%d" % number:
                        raise AssertionError(f"echo of ping-{number} was {echo!r}")
                    self.echoes.append(time.monotonic())
                    self.opened.set()
                    number += 1
                    self.stopping.wait(0.02)
            finally:
                outgoing.put(None)
            self.trailing = list(responses)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error
        finally:
            self.opened.set()

    def since(self, when: float) -> int:
        return sum(1 for at in self.echoes if at >= when)


# The tests.


class ReloadTestCase(TestCase):
    """A gateway of the test's own, and the upstreams it names, stopped at the end."""

    timeout = 120

    def setUp(self) -> None:
        self.ports = {name: free_port() for name in ("a", "b", "c", "ws", "grpc")}
        self.servers: dict[str, NamedEcho] = {}

    def http_upstream(self, name: str) -> NamedEcho:
        server = NamedEcho(name)
        server.listen(self.ports[name])
        self.addCleanup(server.stop)
        self.servers[name] = server
        return server

    def new_gateway(self, config: dict[str, Any]) -> GatewayProcess:
        gateway = GatewayProcess(config)
        self.addCleanup(self._stop_gateway, gateway)
        return gateway

    async def start_gateway(self, config: dict[str, Any]) -> GatewayProcess:
        gateway = self.new_gateway(config)
        await gateway.start()
        return gateway

    async def _stop_gateway(self, gateway: GatewayProcess) -> None:
        running = gateway.running
        await gateway.stop()
        log = gateway.log()
        if running:
            self.assertNotIn("Traceback (most recent call last)", log)
            self.assertNotIn("Unhandled error", log)

    def in_thread(self, call: Callable[[], Any]) -> Deferred[Any]:
        return deferToThread(call)


class ReloadUnderLoadTests(ReloadTestCase):
    """One scenario, four triggers: SIGHUP, a renamed file, a ConfigMap swap, POST /admin/reload."""

    async def scenario(
        self, trigger: str, reload: Callable[[GatewayProcess, dict[str, Any]], Awaitable[None]], *, layout: bool = False
    ) -> None:
        self.http_upstream("a")
        self.http_upstream("b")
        echo = EchoServer(self.ports["ws"])
        self.addCleanup(echo.stop)
        service = EchoService()
        grpc_server = start_upstream(self.ports["grpc"], service)
        self.addCleanup(lambda: self.in_thread(lambda: grpc_server.stop(0).wait(10)))

        gateway = self.new_gateway(before_config(self.ports))
        if layout:
            configmap_layout(gateway)
        await gateway.start()
        config_path = str(gateway.config_path)

        # Generation 1 as configured.
        stripped = await get(gateway.port, "/v1/thing")
        self.assertEqual((stripped.status, stripped.json()["server"], stripped.json()["path"]), (200, "a", "/thing"))
        self.assertEqual((await get(gateway.port, "/fresh/thing")).status, 404)

        # The load: three HTTP loops, a WebSocket, a gRPC bidi stream.
        loops = [
            HTTPLoop(gateway.port, "/api/keep-alive-1/", keep_alive=True),
            HTTPLoop(gateway.port, "/api/keep-alive-2/", keep_alive=True),
            HTTPLoop(gateway.port, "/api/new-connection/", keep_alive=False),
        ]
        request_id = f"reload-{trigger}-{os.getpid()}-{time.monotonic_ns()}"
        websocket = WebSocketLoop(f"ws://{LOCALHOST}:{gateway.port}/ws/chat", request_id)
        channel = grpc.insecure_channel(f"{LOCALHOST}:{gateway.port}", options=CHANNEL_OPTIONS)
        self.addCleanup(channel.close)
        bidi = BidiLoop(channel, request_id)

        async def stop_load() -> None:
            websocket.stopping.set()
            bidi.stopping.set()
            for loop in loops:
                await loop.stop()
            for thread in (websocket, bidi):
                if thread.is_alive():
                    await deferToThread(thread.join, 15)

        self.addCleanup(lambda: Deferred.fromCoroutine(stop_load()))
        websocket.start()
        bidi.start()
        await self.in_thread(lambda: (websocket.opened.wait(15), bidi.opened.wait(15)))
        self.assertIsNone(websocket.error)
        self.assertIsNone(bidi.error)
        await self.until(
            lambda: all(loop.served_since(0) >= 10 for loop in loops) and len(websocket.echoes) >= 5,
            "the load did not get going",
        )

        # Reload.
        seen = len(await reloads(gateway))
        await reload(gateway, after_config(self.ports))
        result = await wait_reload(gateway, seen, FILE_WATCH_WITHIN)
        switched = reactor.seconds()
        switched_monotonic = time.monotonic()
        self.assertEqual(
            (result["ok"], result["generation"], result["trigger"], result["source"]), (True, 2, trigger, config_path)
        )
        self.assertEqual(result["changes"], ["route fresh: added", "route v1: changed", "upstream svc: changed"])

        # The load goes on on the same connections, long enough to count.
        await self.until(
            lambda: (
                all(loop.served_since(switched) >= 10 for loop in loops)
                and websocket.since(switched_monotonic) >= AFTER_RELOAD
                and bidi.since(switched_monotonic) >= AFTER_RELOAD
            ),
            "the load did not go on after the reload",
        )

        # The new generation: new route, changed route, moved upstream.
        fresh = await get(gateway.port, "/fresh/thing")
        self.assertEqual((fresh.status, fresh.json()["server"], fresh.json()["path"]), (200, "b", "/thing"))
        unstripped = await get(gateway.port, "/v1/thing")
        self.assertEqual((unstripped.json()["server"], unstripped.json()["path"]), ("b", "/v1/thing"))

        await stop_load()
        for loop in loops:
            self.assertEqual(loop.failures, [], f"{loop.prefix}: failed requests across the reload")
            after = [server for _, sent_at, _, server in loop.outcomes if sent_at >= switched]
            self.assertEqual(set(after), {"b"}, f"{loop.prefix}: requests after the reload went to {set(after)}")
            before = [server for _, sent_at, _, server in loop.outcomes if sent_at < switched]
            self.assertIn("a", before)
        self.assertEqual([loop.connections for loop in loops[:2]], [1, 1], "a keep-alive connection was closed")
        self.assertIsNone(websocket.error, f"the WebSocket broke: {websocket.error!r}")
        self.assertIsNone(bidi.error, f"the gRPC stream broke: {bidi.error!r}")
        self.assertEqual(bidi.trailing, [])
        # Still the one WebSocket and the one gRPC call the upstreams saw at the start.
        ours = [headers for headers in echo.headers if headers.get("x-request-id") == request_id]
        self.assertEqual(len(ours), 1, f"the WebSocket was dialled again: {echo.headers}")
        calls = [call for call in service.seen("Bidi") if call.header("x-request-id") == [request_id]]
        self.assertEqual(len(calls), 1, "the gRPC stream was started again")

        log = gateway.log()
        self.assertIn(f"config reloaded ({trigger}): generation 2 from {config_path}", log)
        self.assertEqual(await metric(gateway, "txgateway_config_generation"), 2.0)
        self.assertEqual(await metric(gateway, 'txgateway_config_reloads_total{result="success"}'), 1.0)

        # The long-lived heap was frozen at start-up, and once generation 1's
        # grace period (2 s) has passed it is collected and frozen again.
        self.assertRegex(log, r"heap settled after start: \d+ objects frozen")
        await self.until(lambda: "heap settled after reload" in gateway.log(), "no full collection after the reload")
        self.assertEqual((await get(gateway.port, "/fresh/thing")).status, 200)

    async def until(self, predicate: Callable[[], bool], message: str, within: float = 20.0) -> None:
        deadline = reactor.seconds() + within
        while not predicate():
            if reactor.seconds() > deadline:
                self.fail(f"{message} within {within}s")
            await sleep(0.05)

    async def test_sighup(self) -> None:
        async def sighup(gateway: GatewayProcess, config: dict[str, Any]) -> None:
            gateway.write_config(config, replace=False)
            gateway.send_signal(signal.SIGHUP)

        await self.scenario("sighup", sighup)

    async def test_file_renamed_over(self) -> None:
        async def rename(gateway: GatewayProcess, config: dict[str, Any]) -> None:
            gateway.write_config(config)

        await self.scenario("file", rename)

    async def test_configmap_symlink_swap(self) -> None:
        async def swap(gateway: GatewayProcess, config: dict[str, Any]) -> None:
            configmap_update(gateway, config)

        await self.scenario("file", swap, layout=True)

    async def test_admin_reload(self) -> None:
        async def post(gateway: GatewayProcess, config: dict[str, Any]) -> None:
            gateway.write_config(config)
            response = await admin(gateway, "/admin/reload", method="POST")
            self.assertEqual(response.status, 200, response.body)
            self.assertEqual((response.json()["generation"], response.json()["ok"]), (2, True))

        await self.scenario("api", post)


def configmap_layout(gateway: GatewayProcess) -> None:
    """Lay the config file out as a Kubernetes ConfigMap volume does, before the gateway starts:
    ``gateway.yaml -> ..data/gateway.yaml``, ``..data -> ..<timestamp>/``."""
    directory = gateway.directory
    version = directory / "..2024_01_01_00_00_00.000000001"
    version.mkdir()
    (directory / "..data").symlink_to(version.name)
    gateway.config_path.symlink_to(Path("..data") / gateway.config_path.name)


def configmap_update(gateway: GatewayProcess, config: dict[str, Any]) -> None:
    """What the kubelet does on a ConfigMap change: a new timestamped directory, a new
    ``..data_tmp`` symlink renamed over ``..data``, the old directory removed."""
    directory = gateway.directory
    old = os.readlink(directory / "..data")
    version = directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    version.mkdir()
    (version / gateway.config_path.name).write_text(gateway.render_config(config))
    (directory / "..data_tmp").symlink_to(version.name)
    os.replace(directory / "..data_tmp", directory / "..data")
    for leftover in (directory / old).iterdir():
        leftover.unlink()
    (directory / old).rmdir()


class InvalidConfigTests(ReloadTestCase):
    """A file that does not load leaves the running generation alone and says why."""

    def config(self, **servers: str) -> dict[str, Any]:
        return {
            "upstreams": {"svc": {"servers": [f"{LOCALHOST}:{self.ports[servers.get('svc', 'a')]}"]}},
            "routes": [route("api", "/api/*", "svc")],
            "observability": {"access_log": {"enabled": False}},
        }

    async def assert_generation_one(self, gateway: GatewayProcess) -> None:
        """Generation 1 serves, unchanged: /api/* on server a, no /fresh/*."""
        api = await get(gateway.port, "/api/still")
        self.assertEqual((api.status, api.json()["server"]), (200, "a"))
        self.assertEqual((await get(gateway.port, "/fresh/x")).status, 404)
        history = await reloads(gateway)
        self.assertEqual(history[0]["generation"], 1)
        self.assertEqual(await metric(gateway, "txgateway_config_generation"), 1.0)
        self.assertEqual(await metric(gateway, "txgateway_config_last_reload_successful"), 0.0)

    async def test_invalid_files_change_nothing(self) -> None:
        self.http_upstream("a")
        self.http_upstream("b")
        gateway = await self.start_gateway(self.config())
        path = str(gateway.config_path)
        good = self.config(svc="b")
        good["routes"].append(route("fresh", "/fresh/*", "svc"))

        # YAML that does not parse, seen by the file watcher.
        seen = len(await reloads(gateway))
        gateway.write_config("routes: [unclosed\n  - name: api\n")
        result = await wait_reload(gateway, seen, FILE_WATCH_WITHIN)
        self.assertEqual((result["ok"], result["generation"], result["trigger"]), (False, 1, "file"))
        [problem] = result["errors"]
        self.assertRegex(problem, rf"^{path}: line \d+, column \d+: invalid YAML: ")
        log = gateway.log()
        self.assertIn("config reload (file) refused, generation 1 keeps serving", log)
        self.assertIn(problem, log)
        await self.assert_generation_one(gateway)

        # Valid YAML, an unknown upstream: POST /admin/reload answers 422 with the problem.
        unknown = json.loads(json.dumps(good))
        unknown["routes"][1]["upstream"] = "nosuch"
        gateway.write_config(unknown)
        response = await admin(gateway, "/admin/reload", method="POST")
        self.assertEqual(response.status, 422, response.body)
        answer = response.json()
        self.assertEqual((answer["ok"], answer["generation"], answer["error"]), (False, 1, "invalid_config"))
        [problem] = answer["errors"]
        self.assertTrue(problem.startswith(f"{path}: routes[1].upstream: unknown upstream 'nosuch'"), problem)
        self.assertIn(problem, gateway.log())
        self.assertIn("config reload (api) refused, generation 1 keeps serving", gateway.log())
        await self.assert_generation_one(gateway)

        # The same bad file again by SIGHUP: refused again, nothing changes.
        seen = len(await reloads(gateway))
        gateway.send_signal(signal.SIGHUP)
        result = await wait_reload(gateway, seen, 10.0)
        self.assertEqual((result["ok"], result["trigger"], result["errors"]), (False, "sighup", [problem]))
        await self.assert_generation_one(gateway)

        # A good file afterwards reloads as usual.
        seen = len(await reloads(gateway))
        gateway.write_config(good)
        gateway.send_signal(signal.SIGHUP)
        result = await wait_reload(gateway, seen, 10.0)
        self.assertEqual((result["ok"], result["generation"]), (True, 2), result)
        fresh = await get(gateway.port, "/fresh/x")
        self.assertEqual((fresh.status, fresh.json()["server"]), (200, "b"))
        api = await get(gateway.port, "/api/x")
        self.assertEqual(api.json()["server"], "b")

        history = await reloads(gateway)
        failures = sum(1 for attempt in history if not attempt["ok"])
        self.assertGreaterEqual(failures, 3)
        self.assertEqual(await metric(gateway, 'txgateway_config_reloads_total{result="failure"}'), float(failures))
        self.assertEqual(await metric(gateway, 'txgateway_config_reloads_total{result="success"}'), 1.0)
        self.assertEqual(await metric(gateway, "txgateway_config_last_reload_successful"), 1.0)
        self.assertEqual(await metric(gateway, "txgateway_config_generation"), 2.0)

    async def test_identical_file_is_not_rebuilt(self) -> None:
        """SIGHUP (and a rewrite with the same bytes) keeps generation 1: nothing is rebuilt."""
        self.http_upstream("a")
        gateway = await self.start_gateway(self.config())
        seen = len(await reloads(gateway))
        gateway.write_config(gateway.config)
        gateway.send_signal(signal.SIGHUP)
        result = await wait_reload(gateway, seen, 10.0)
        self.assertEqual((result["ok"], result["generation"], result["unchanged"]), (True, 1, True))
        self.assertIn("unchanged, generation 1 stays", gateway.log())
        self.assertEqual((await get(gateway.port, "/api/x")).status, 200)


class StateSurvivesReloadTests(ReloadTestCase):
    """What belongs to an unchanged route or upstream outlives a reload that changes something else."""

    async def reload_by_api(self, gateway: GatewayProcess, config: dict[str, Any]) -> dict[str, Any]:
        gateway.write_config(config)
        response = await admin(gateway, "/admin/reload", method="POST")
        self.assertEqual(response.status, 200, response.body)
        result: dict[str, Any] = response.json()
        self.assertEqual((result["ok"], result["generation"]), (True, 2))
        return result

    async def upstream_state(self, gateway: GatewayProcess, name: str) -> dict[str, Any]:
        response = await admin(gateway, "/admin/upstreams")
        self.assertEqual(response.status, 200)
        [state] = [u for u in response.json()["upstreams"] if u["name"] == name]
        return state

    async def test_rate_limit_buckets_of_an_unchanged_route(self) -> None:
        self.http_upstream("a")
        # One request a minute after a burst of 3: nothing refills during the test.
        limit = {"requests_per_minute": 1, "burst_size": 3, "key": "ip"}
        upstream = {"svc": {"servers": [f"{LOCALHOST}:{self.ports['a']}"]}}
        config = {
            "upstreams": upstream,
            "routes": [
                route("limited", "/limited/*", "svc", rate_limit=limit),
                route("retuned", "/retuned/*", "svc", rate_limit=limit),
            ],
        }
        gateway = await self.start_gateway(config)
        for path in ("/limited/", "/retuned/"):
            statuses = [(await get(gateway.port, f"{path}{i}")).status for i in range(4)]
            self.assertEqual(statuses, [200, 200, 200, 429], path)

        changed = json.loads(json.dumps(config))
        changed["routes"][1]["rate_limit"]["burst_size"] = 4
        changed["routes"].append(route("other", "/other/*", "svc"))
        result = await self.reload_by_api(gateway, changed)
        self.assertEqual(result["changes"], ["route other: added", "route retuned: changed"])

        # The unchanged route keeps its empty bucket; the retuned one starts afresh.
        limited = await get(gateway.port, "/limited/after")
        self.assertEqual(limited.status, 429)
        self.assertIsNotNone(limited.header(b"retry-after"))
        self.assertEqual((await get(gateway.port, "/retuned/after")).status, 200)
        self.assertEqual((await get(gateway.port, "/other/after")).status, 200)

    async def test_instance_health_of_an_unchanged_upstream(self) -> None:
        """An instance the active checks took out stays out across the reload, though a fresh
        start would count it healthy; the checks go on and bring it back later."""
        self.http_upstream("a")
        checks = {
            "enabled": True,
            "path": "/health",
            "interval": 1,
            "timeout": 0.5,
            "unhealthy_threshold": 1,
            "healthy_threshold": 4,
        }
        servers = [f"{LOCALHOST}:{self.ports['a']}", f"{LOCALHOST}:{self.ports['c']}"]
        config = {
            "upstreams": {"hc": {"servers": servers, "health_check": checks, "retry": {"attempts": 1}}},
            "routes": [route("hc", "/hc/*", "hc")],
        }
        gateway = await self.start_gateway(config)
        await self.wait_available(gateway, 1, within=10.0)

        # c comes up now: 4 good checks, a second apart, before it counts again.
        self.http_upstream("c")
        changed = json.loads(json.dumps(config))
        changed["routes"].append(route("other", "/other/*", "hc"))
        result = await self.reload_by_api(gateway, changed)
        self.assertEqual(result["changes"], ["route other: added"])

        state = await self.upstream_state(gateway, "hc")
        self.assertEqual(state["available"], 1, state)
        [down] = [i for i in state["instances"] if i["address"] == servers[1]]
        self.assertEqual(down["status"], "down", state)
        for i in range(6):
            response = await get(gateway.port, f"/hc/{i}")
            self.assertEqual((response.status, response.json()["server"]), (200, "a"))
        self.assertEqual([r.path for r in self.servers["c"].requests if r.path != "/health"], [])

        # The checks of the kept upstream still run: c comes back.
        await self.wait_available(gateway, 2, within=15.0)

    async def wait_available(self, gateway: GatewayProcess, count: int, within: float) -> None:
        deadline = reactor.seconds() + within
        while (await self.upstream_state(gateway, "hc"))["available"] != count:
            if reactor.seconds() > deadline:
                self.fail(f"upstream hc did not have {count} available instance(s) within {within}s")
            await sleep(0.05)

    async def test_open_breaker_of_an_unchanged_upstream(self) -> None:
        """A breaker opened by failures stays open across the reload, though the upstream is back."""
        breaker = {"failure_threshold": 2, "recovery_timeout": 60, "success_threshold": 1}
        config = {
            "upstreams": {
                "flaky": {
                    "servers": [f"{LOCALHOST}:{self.ports['c']}"],
                    "circuit_breaker": breaker,
                    "retry": {"attempts": 1},
                    "timeouts": {"connect": 1, "request": 5},
                }
            },
            "routes": [route("flaky", "/flaky/*", "flaky")],
        }
        gateway = await self.start_gateway(config)
        statuses = [(await get(gateway.port, f"/flaky/{i}")).status for i in range(3)]
        self.assertEqual(statuses, [502, 502, 503])
        self.assertEqual((await self.upstream_state(gateway, "flaky"))["breaker"]["state"], "open")

        self.http_upstream("c")
        changed = json.loads(json.dumps(config))
        changed["routes"].append(route("other", "/other/*", "flaky"))
        await self.reload_by_api(gateway, changed)

        self.assertEqual((await get(gateway.port, "/flaky/after")).status, 503)
        self.assertEqual((await self.upstream_state(gateway, "flaky"))["breaker"]["state"], "open")
        self.assertEqual(self.servers["c"].requests, [])
