"""gRPC through the gateway, end to end: real grpcio on both sides of a real ``twistd -n txgateway``.

The upstream is a grpcio server (generic handlers, bytes in and out, so no
protoc) on a free loopback port, started and stopped around every test; the
client is a grpcio channel to the gateway's normal listener, which must speak
h2c with prior knowledge there.  grpcio calls block, so they run in the
reactor's thread pool (``deferToThread``) while the test's reactor keeps
turning; every call has a deadline, so a gateway that hangs fails the test
instead of holding a thread.

What a gRPC user would notice is checked: messages relayed whole and in
order (unary, both streaming directions, bidi ping-pong, 4 MiB messages,
10,000 messages on one stream), metadata and trailers (binary ones, repeated
ones, ``grpc-status-details-bin``) passed unchanged, upstream error statuses
and messages, deadlines and cancellations reaching the upstream handler, and
the gateway's own refusals rendered as gRPC statuses: UNAUTHENTICATED (JWT),
RESOURCE_EXHAUSTED (rate limit), UNIMPLEMENTED (no route), UNAVAILABLE
(upstream down).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import grpc
import jwt
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from tests.integration.harness import LOCALHOST, GatewayTestCase, MiB, sleep

T = TypeVar("T")

JWT_SECRET = "txgateway-grpc-test-secret-0123456789abcdef"
#: Large enough for the 4 MiB messages (grpcio's default receive limit is 4 MiB, exclusive of framing).
MAX_MESSAGE = 8 * MiB
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.enable_http_proxy", 0),  # never through an http_proxy from the environment
]
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    # A server of the previous test still closing must not share the port with this one.
    ("grpc.so_reuseport", 0),
]
#: What a gRPC call may take before the test calls the gateway hung.
CALL_TIMEOUT = 15.0
STATUS_DETAILS = bytes(range(256))  # stands in for a serialized google.rpc.Status
#: Metadata the tests set themselves (the gateway may add its own, e.g. x-request-id).
OURS = ("x-custom", "x-custom-bin", "x-multi", "x-initial", "x-initial-bin", "x-trailing", "x-trailing-bin")

Metadata = tuple[tuple[str, str | bytes], ...]


# The upstream: a grpcio server and what its handlers saw.


@dataclass
class SeenCall:
    """One RPC as the upstream handler saw it."""

    method: str
    metadata: Metadata
    context: grpc.ServicerContext
    started_at: float = field(default_factory=time.monotonic)
    #: Set by grpcio's termination callback: the RPC is over for the upstream (done, cancelled, expired).
    ended: threading.Event = field(default_factory=threading.Event)
    ended_at: float | None = None
    #: Set by the handler's own code when ``context.is_active()`` turned False under it.
    noticed_inactive: threading.Event = field(default_factory=threading.Event)
    noticed_at: float | None = None

    def header(self, name: str) -> list[str | bytes]:
        return [value for key, value in self.metadata if key == name]


class EchoService:
    """The handlers of ``echo.Echo``, ``secure.Secure`` and ``nowhere.Nowhere``; records every call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[SeenCall] = []

    def record(self, method: str, context: grpc.ServicerContext) -> SeenCall:
        seen = SeenCall(method, tuple((m.key, m.value) for m in context.invocation_metadata()), context)

        def ended() -> None:
            seen.ended_at = time.monotonic()
            seen.ended.set()

        with self._lock:
            self.calls.append(seen)
        if not context.add_callback(ended):
            ended()
        return seen

    def seen(self, method: str) -> list[SeenCall]:
        with self._lock:
            return [call for call in self.calls if call.method == method]

    def notice_inactive(self, seen: SeenCall) -> None:
        seen.noticed_at = time.monotonic()
        seen.noticed_inactive.set()

    # Handlers.

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Echo; with metadata of its own before the message and in the trailers."""
        self.record("Unary", context)
        context.send_initial_metadata((("x-initial", "i1"), ("x-initial-bin", b"\x00\x01\xfe")))
        context.set_trailing_metadata((("x-trailing", "t1"), ("x-trailing-bin", b"\xff\x00\x7f")))
        return request

    def plain(self, method: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.record(method, context)
            return request

        return handle

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """``int(request)`` numbered messages; ``x-fail-after: N`` aborts with DATA_LOSS after N."""
        seen = self.record("ServerStream", context)
        fail_after = seen.header("x-fail-after")
        for i in range(int(request)):
            if fail_after and i == int(fail_after[0]):
                context.abort(grpc.StatusCode.DATA_LOSS, f"stream broke after {i}")
            yield b"msg-%06d" % i

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        """How many messages came and the SHA-256 of their concatenation."""
        self.record("ClientStream", context)
        digest = hashlib.sha256()
        count = 0
        for message in requests:
            digest.update(message)
            count += 1
        return b"%d:%s" % (count, digest.hexdigest().encode())

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """Each message echoed as soon as it arrives."""
        self.record("Bidi", context)
        yield from requests

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """``not_found``: NOT_FOUND "x"; ``details``: INVALID_ARGUMENT with status details in the trailers."""
        self.record("Fail", context)
        if request == b"not_found":
            context.abort(grpc.StatusCode.NOT_FOUND, "x")
        context.set_trailing_metadata((("grpc-status-details-bin", STATUS_DETAILS), ("x-why", "because")))
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad argument: naïve 100% ✓")
        raise AssertionError("unreachable")

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Takes 2 s unless the RPC ends first (the handler polls ``is_active``)."""
        seen = self.record("Slow", context)
        until = time.monotonic() + 2.0
        while time.monotonic() < until:
            if not context.is_active():
                self.notice_inactive(seen)
                return b""
            time.sleep(0.01)
        return b"too late"

    def endless(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Ticks every 5 ms for as long as the RPC is active."""
        seen = self.record("Endless", context)
        i = 0
        while context.is_active():
            yield b"tick-%d" % i
            i += 1
            time.sleep(0.005)
        self.notice_inactive(seen)

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        unary = grpc.unary_unary_rpc_method_handler
        return [
            grpc.method_handlers_generic_handler(
                "echo.Echo",
                {
                    "Unary": unary(self.unary),
                    "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
                    "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
                    "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
                    "Fail": unary(self.fail),
                    "Slow": unary(self.slow),
                    "Endless": grpc.unary_stream_rpc_method_handler(self.endless),
                    "Limited": unary(self.plain("Limited")),
                },
            ),
            grpc.method_handlers_generic_handler("secure.Secure", {"Unary": unary(self.plain("Secure"))}),
            # No route leads here: a call that reaches it was routed by mistake.
            grpc.method_handlers_generic_handler("nowhere.Nowhere", {"Unary": unary(self.plain("Nowhere"))}),
        ]


def start_upstream(port: int, service: EchoService) -> grpc.Server:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="grpc-upstream"),
        handlers=service.handlers(),
        options=SERVER_OPTIONS,
    )
    bound = server.add_insecure_port(f"{LOCALHOST}:{port}")
    if bound != port:
        raise RuntimeError(f"the grpcio upstream could not listen on {LOCALHOST}:{port} (got {bound})")
    server.start()
    return server


# Client calls; they block, so they run in a thread.


def in_thread(call: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
    return deferToThread(call, *args, **kwargs)


def unary_with_call(
    channel: grpc.Channel, method: str, request: bytes, metadata: Metadata = (), timeout: float = CALL_TIMEOUT
) -> tuple[bytes, grpc.Call]:
    response, call = channel.unary_unary(method).with_call(request, timeout=timeout, metadata=metadata)
    return response, call


def unary(
    channel: grpc.Channel, method: str, request: bytes, metadata: Metadata = (), timeout: float = CALL_TIMEOUT
) -> bytes:
    return unary_with_call(channel, method, request, metadata, timeout)[0]


def concurrent_unary(channel: grpc.Channel, count: int) -> list[bytes]:
    """``count`` unary calls in flight at once on one channel (one HTTP/2 connection)."""
    method = channel.unary_unary("/echo.Echo/Unary")
    pending = [method.future(b"call-%d" % i, timeout=CALL_TIMEOUT) for i in range(count)]
    return [future.result() for future in pending]


def server_stream(channel: grpc.Channel, request: bytes, metadata: Metadata = ()) -> list[bytes]:
    """All messages of a server stream; a failure midway raises with what came before in ``partial``."""
    received: list[bytes] = []
    try:
        for message in channel.unary_stream("/echo.Echo/ServerStream")(
            request, timeout=CALL_TIMEOUT, metadata=metadata
        ):
            received.append(message)
    except grpc.RpcError as e:
        e.partial = received  # type: ignore[attr-defined]
        raise
    return received


def client_stream(channel: grpc.Channel, messages: list[bytes]) -> bytes:
    response: bytes = channel.stream_unary("/echo.Echo/ClientStream")(iter(messages), timeout=CALL_TIMEOUT)
    return response


def bidi_all(channel: grpc.Channel, messages: list[bytes], timeout: float = CALL_TIMEOUT) -> list[bytes]:
    return list(channel.stream_stream("/echo.Echo/Bidi")(iter(messages), timeout=timeout))


def bidi_ping_pong(channel: grpc.Channel, rounds: int) -> tuple[list[bytes], list[bytes]]:
    """Send one message, wait for its echo, send the next: only works if each is relayed on its own.

    Returns the echoes and whatever came after the client half-closed.
    """
    outgoing: queue.Queue[bytes | None] = queue.Queue()

    def requests() -> Iterator[bytes]:
        while True:
            try:
                message = outgoing.get(timeout=CALL_TIMEOUT)
            except queue.Empty:
                return
            if message is None:
                return
            yield message

    responses = channel.stream_stream("/echo.Echo/Bidi")(requests(), timeout=CALL_TIMEOUT)
    echoes = []
    try:
        for i in range(rounds):
            outgoing.put(b"ping-%d" % i)
            echoes.append(next(responses))
    finally:
        outgoing.put(None)
    return echoes, list(responses)


def read_then_cancel(channel: grpc.Channel, method: str, count: int) -> tuple[list[bytes], float]:
    """Read ``count`` messages of a server stream, then cancel it; the messages and when it was cancelled."""
    call = channel.unary_stream(method)(b"", timeout=CALL_TIMEOUT)
    received = [next(call) for _ in range(count)]
    call.cancel()
    return received, time.monotonic()


def all_metadata(call: grpc.Call) -> Metadata:
    """Initial and trailing metadata together (a trailers-only answer has only the latter)."""
    return tuple((m.key, m.value) for m in (*(call.initial_metadata() or ()), *(call.trailing_metadata() or ())))


def ours(metadata: Any) -> Metadata:
    return tuple((m[0], m[1]) for m in metadata or () if m[0] in OURS)


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


def make_token(**claims: Any) -> str:
    payload = {"sub": "grpc-client", "exp": int(time.time()) + 300, **claims}
    return jwt.encode(payload, JWT_SECRET, algorithm="HS256")


class GRPCTests(GatewayTestCase):
    """One gateway for the class; a fresh grpcio upstream and client channel per test."""

    unreachable = ("echo", "down")  # "echo" gets a grpcio server per test, "down" never does
    timeout = 30

    #: Per-route rate limit of /echo.Echo/Limited.
    BURST: ClassVar[int] = 3

    @classmethod
    def gateway_config(cls, ports: dict[str, int]) -> dict[str, Any]:
        def route(name: str, path: str, upstream: str, **extra: Any) -> dict[str, Any]:
            return {"name": name, "match": {"path": path}, "upstream": upstream, **extra}

        return {
            "upstreams": {
                "echo": {"protocol": "grpc", "servers": [f"{LOCALHOST}:{ports['echo']}"]},
                "down": {
                    "protocol": "grpc",
                    "servers": [f"{LOCALHOST}:{ports['down']}"],
                    "retry": {"attempts": 1},
                    "timeouts": {"connect": 1, "request": 5},
                },
            },
            "routes": [
                route("echo", "/echo.Echo/*", "echo", auth="none"),
                route(
                    "limited",
                    "/echo.Echo/Limited",
                    "echo",
                    auth="none",
                    rate_limit={"requests_per_minute": 60, "burst_size": cls.BURST, "key": "ip"},
                ),
                route("secure", "/secure.Secure/*", "echo", auth="required"),
                route("down", "/down.Down/*", "down", auth="none"),
            ],
            "middleware": {"auth": {"jwt_secret": JWT_SECRET}},
            "observability": {"access_log": {"enabled": False}},
        }

    async def _set_up(self) -> None:
        await super()._set_up()
        self.service = EchoService()
        self.upstream = start_upstream(self.ports["echo"], self.service)
        self.addCleanup(self._stop_upstream)
        self.channel = grpc.insecure_channel(f"{LOCALHOST}:{self.port}", options=CHANNEL_OPTIONS)
        self.addCleanup(self.channel.close)

    def _stop_upstream(self) -> Deferred[bool]:
        stopped = self.upstream.stop(0)
        return in_thread(stopped.wait, 10)

    def run_scenario(self, scenario: Callable[[], Any]) -> Deferred[None]:
        return Deferred.fromCoroutine(scenario())

    # Helpers.

    async def expect_error(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> grpc.RpcError:
        """Run a blocking grpcio call that must fail; its RpcError."""
        try:
            result = await in_thread(call, *args, **kwargs)
        except grpc.RpcError as e:
            return e
        self.fail(f"expected a gRPC error, got {result!r:.200}")

    def assertGatewayStatus(self, error: grpc.RpcError, code: grpc.StatusCode) -> None:
        """``error`` is the gateway's own trailers-only answer with ``code`` (it always carries x-request-id)."""
        self.assertEqual(error.code(), code, error.details())
        self.assertIn("x-request-id", dict(all_metadata(error)), f"not answered by the gateway: {error.details()}")

    async def wait_until(self, predicate: Callable[[], bool], within: float, message: str) -> float:
        start = time.monotonic()
        while not predicate():
            if time.monotonic() - start > within:
                self.fail(message)
            await sleep(0.02)
        return time.monotonic() - start

    async def only_call(self, method: str, within: float = 3.0) -> SeenCall:
        """The single call of ``method`` the upstream has seen (waiting for it to arrive)."""
        await self.wait_until(lambda: bool(self.service.seen(method)), within, f"{method} never reached the upstream")
        calls = self.service.seen(method)
        self.assertEqual(len(calls), 1, f"{method} reached the upstream {len(calls)} times")
        return calls[0]

    # Messages.

    def test_unary(self) -> Deferred[None]:
        async def scenario() -> None:
            response = await in_thread(unary, self.channel, "/echo.Echo/Unary", b"hello through the gateway")
            self.assertEqual(response, b"hello through the gateway")
            empty = await in_thread(unary, self.channel, "/echo.Echo/Unary", b"")
            self.assertEqual(empty, b"")
            self.assertEqual(len(self.service.seen("Unary")), 2)

        return self.run_scenario(scenario)

    def test_concurrent_calls_on_one_connection(self) -> Deferred[None]:
        async def scenario() -> None:
            responses = await in_thread(concurrent_unary, self.channel, 200)
            self.assertEqual(responses, [b"call-%d" % i for i in range(200)])
            self.assertEqual(len(self.service.seen("Unary")), 200)

        return self.run_scenario(scenario)

    def test_server_stream_relays_1000_messages_in_order(self) -> Deferred[None]:
        async def scenario() -> None:
            received = await in_thread(server_stream, self.channel, b"1000")
            self.assertEqual(received, [b"msg-%06d" % i for i in range(1000)])

        return self.run_scenario(scenario)

    def test_client_stream(self) -> Deferred[None]:
        async def scenario() -> None:
            messages = [os.urandom(i % 300) for i in range(500)]
            response = await in_thread(client_stream, self.channel, messages)
            expected = hashlib.sha256(b"".join(messages)).hexdigest().encode()
            self.assertEqual(response, b"500:" + expected)

        return self.run_scenario(scenario)

    def test_bidi_ping_pong(self) -> Deferred[None]:
        """Each echo arrives before the next message is sent: nothing waits for the end of the stream."""

        async def scenario() -> None:
            echoes, after = await in_thread(bidi_ping_pong, self.channel, 20)
            self.assertEqual(echoes, [b"ping-%d" % i for i in range(20)])
            self.assertEqual(after, [])

        return self.run_scenario(scenario)

    def test_4mib_messages_both_ways(self) -> Deferred[None]:
        async def scenario() -> None:
            payload = os.urandom(4 * MiB)
            response = await in_thread(unary, self.channel, "/echo.Echo/Unary", payload)
            self.assertEqual(len(response), len(payload))
            self.assertTrue(response == payload, "the 4 MiB message came back different")

            echoed = await in_thread(bidi_all, self.channel, [payload, payload[::-1]])
            self.assertEqual([len(m) for m in echoed], [4 * MiB, 4 * MiB])
            self.assertTrue(echoed == [payload, payload[::-1]], "4 MiB bidi messages came back different")

        return self.run_scenario(scenario)

    def test_10000_small_messages_on_one_bidi_stream(self) -> Deferred[None]:
        async def scenario() -> None:
            messages = [b"m%d" % i for i in range(10_000)]
            echoed = await in_thread(bidi_all, self.channel, messages, 25.0)
            self.assertEqual(len(echoed), len(messages))
            self.assertTrue(echoed == messages, "bidi echoes out of order or altered")
            self.assertEqual(len(self.service.seen("Bidi")), 1)

        return self.run_scenario(scenario)

    # Metadata.

    def test_metadata_both_ways_unchanged(self) -> Deferred[None]:
        async def scenario() -> None:
            sent: Metadata = (
                ("x-custom", "v1"),
                ("x-multi", "a"),
                ("x-multi", "b"),
                ("x-custom-bin", b"\x00\xff\x10\x80"),
            )
            response, call = await in_thread(unary_with_call, self.channel, "/echo.Echo/Unary", b"m", sent)
            self.assertEqual(response, b"m")

            seen = await self.only_call("Unary")
            self.assertEqual(seen.header("x-custom"), ["v1"])
            self.assertEqual(seen.header("x-multi"), ["a", "b"])
            self.assertEqual(seen.header("x-custom-bin"), [b"\x00\xff\x10\x80"])

            self.assertEqual(ours(call.initial_metadata()), (("x-initial", "i1"), ("x-initial-bin", b"\x00\x01\xfe")))
            self.assertEqual(
                ours(call.trailing_metadata()), (("x-trailing", "t1"), ("x-trailing-bin", b"\xff\x00\x7f"))
            )

        return self.run_scenario(scenario)

    def test_request_id_reaches_upstream_and_client(self) -> Deferred[None]:
        async def scenario() -> None:
            _, call = await in_thread(
                unary_with_call, self.channel, "/echo.Echo/Unary", b"m", (("x-request-id", "grpc-req-1"),)
            )
            seen = await self.only_call("Unary")
            self.assertEqual(seen.header("x-request-id"), ["grpc-req-1"])
            self.assertIn(("x-request-id", "grpc-req-1"), tuple((m.key, m.value) for m in call.initial_metadata()))

        return self.run_scenario(scenario)

    # Upstream statuses.

    def test_upstream_error_status_and_message(self) -> Deferred[None]:
        async def scenario() -> None:
            error = await self.expect_error(unary, self.channel, "/echo.Echo/Fail", b"not_found")
            self.assertEqual(error.code(), grpc.StatusCode.NOT_FOUND)
            self.assertEqual(error.details(), "x")

        return self.run_scenario(scenario)

    def test_status_details_and_trailers_pass_through(self) -> Deferred[None]:
        async def scenario() -> None:
            error = await self.expect_error(unary, self.channel, "/echo.Echo/Fail", b"details")
            self.assertEqual(error.code(), grpc.StatusCode.INVALID_ARGUMENT)
            self.assertEqual(error.details(), "bad argument: naïve 100% ✓")
            trailers = tuple((m.key, m.value) for m in error.trailing_metadata())
            self.assertIn(("grpc-status-details-bin", STATUS_DETAILS), trailers)
            self.assertIn(("x-why", "because"), trailers)

        return self.run_scenario(scenario)

    def test_server_stream_error_after_messages(self) -> Deferred[None]:
        async def scenario() -> None:
            error = await self.expect_error(server_stream, self.channel, b"10", (("x-fail-after", "3"),))
            self.assertEqual(error.code(), grpc.StatusCode.DATA_LOSS)
            self.assertEqual(error.details(), "stream broke after 3")
            self.assertEqual(error.partial, [b"msg-000000", b"msg-000001", b"msg-000002"])  # type: ignore[attr-defined]

        return self.run_scenario(scenario)

    # Deadlines and cancellation.

    def test_deadline_exceeded_ends_the_upstream_call(self) -> Deferred[None]:
        async def scenario() -> None:
            start = time.monotonic()
            error = await self.expect_error(unary, self.channel, "/echo.Echo/Slow", b"", (), 0.5)
            failed_at = time.monotonic()
            self.assertEqual(error.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
            self.assertLess(failed_at - start, 1.5)

            seen = await self.only_call("Slow")
            await self.wait_until(
                seen.noticed_inactive.is_set,
                1.5,
                "the upstream handler still saw its call active 1.5 s after the client's deadline",
            )
            assert seen.noticed_at is not None
            self.assertLess(seen.noticed_at - seen.started_at, 1.9, "the upstream ran its full 2 s")
            self.assertFalse(seen.context.is_active())

            # The gateway and the channel are fine afterwards.
            self.assertEqual(await in_thread(unary, self.channel, "/echo.Echo/Unary", b"after"), b"after")

        return self.run_scenario(scenario)

    def test_client_cancel_of_server_stream_reaches_upstream(self) -> Deferred[None]:
        async def scenario() -> None:
            received, cancelled_at = await in_thread(read_then_cancel, self.channel, "/echo.Echo/Endless", 5)
            self.assertEqual(received, [b"tick-%d" % i for i in range(5)])

            seen = await self.only_call("Endless")
            await self.wait_until(
                seen.ended.is_set, 2.0, "the upstream stream was still active 2 s after the client cancelled it"
            )
            assert seen.ended_at is not None
            self.assertLess(seen.ended_at - cancelled_at, 2.0)
            self.assertFalse(seen.context.is_active())

            self.assertEqual(await in_thread(unary, self.channel, "/echo.Echo/Unary", b"after"), b"after")

        return self.run_scenario(scenario)

    # The gateway's own answers.

    def test_jwt_auth(self) -> Deferred[None]:
        async def scenario() -> None:
            token = make_token()
            response = await in_thread(unary, self.channel, "/secure.Secure/Unary", b"let me in", bearer(token))
            self.assertEqual(response, b"let me in")
            self.assertEqual(len(self.service.seen("Secure")), 1)

            missing = await self.expect_error(unary, self.channel, "/secure.Secure/Unary", b"no token")
            self.assertGatewayStatus(missing, grpc.StatusCode.UNAUTHENTICATED)
            self.assertEqual(missing.details(), "authentication required")
            self.assertIn("www-authenticate", dict(all_metadata(missing)))

            forged = jwt.encode({"sub": "x", "exp": int(time.time()) + 300}, "not-the-secret-" * 3, algorithm="HS256")
            bad = await self.expect_error(unary, self.channel, "/secure.Secure/Unary", b"forged", bearer(forged))
            self.assertGatewayStatus(bad, grpc.StatusCode.UNAUTHENTICATED)

            expired = make_token(exp=int(time.time()) - 3600)
            old = await self.expect_error(unary, self.channel, "/secure.Secure/Unary", b"old", bearer(expired))
            self.assertGatewayStatus(old, grpc.StatusCode.UNAUTHENTICATED)

            self.assertEqual(len(self.service.seen("Secure")), 1, "a refused call reached the upstream")

        return self.run_scenario(scenario)

    def test_rate_limited_method_is_resource_exhausted(self) -> Deferred[None]:
        async def scenario() -> None:
            for i in range(self.BURST):
                self.assertEqual(await in_thread(unary, self.channel, "/echo.Echo/Limited", b"%d" % i), b"%d" % i)
            error = await self.expect_error(unary, self.channel, "/echo.Echo/Limited", b"one too many")
            self.assertGatewayStatus(error, grpc.StatusCode.RESOURCE_EXHAUSTED)
            self.assertIn("retry-after", dict(all_metadata(error)))
            self.assertEqual(len(self.service.seen("Limited")), self.BURST)

            # The limit is the method's own: the rest of the service is unaffected.
            self.assertEqual(await in_thread(unary, self.channel, "/echo.Echo/Unary", b"free"), b"free")

        return self.run_scenario(scenario)

    def test_no_route_is_unimplemented(self) -> Deferred[None]:
        async def scenario() -> None:
            error = await self.expect_error(unary, self.channel, "/nowhere.Nowhere/Unary", b"?")
            self.assertGatewayStatus(error, grpc.StatusCode.UNIMPLEMENTED)
            self.assertEqual(self.service.seen("Nowhere"), [])

        return self.run_scenario(scenario)

    def test_upstream_down_is_unavailable(self) -> Deferred[None]:
        async def scenario() -> None:
            start = time.monotonic()
            error = await self.expect_error(unary, self.channel, "/down.Down/Unary", b"anyone?")
            self.assertGatewayStatus(error, grpc.StatusCode.UNAVAILABLE)
            self.assertLess(time.monotonic() - start, 3.0)

        return self.run_scenario(scenario)
