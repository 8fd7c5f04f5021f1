"""WebSocket through a real gateway: the ``websockets`` library on both ends.

The client is ``websockets.sync.client`` run in a thread (``deferToThread``);
the upstream is ``websockets.sync.server`` in its own thread on the port the
harness reserved for it, started and stopped around every test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import jwt
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.sync.server import Server, ServerConnection, serve

from tests.integration.harness import GatewayTestCase

T = TypeVar("T")

JWT_SECRET = "websocket-test-secret-0123456789abcdef"
MiB = 1024 * 1024


def token(sub: str = "user-1") -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 300}, JWT_SECRET, algorithm="HS256")


class EchoServer:
    """Echoes every message; ``close:CODE:REASON`` makes it close with that code."""

    def __init__(self, port: int) -> None:
        self.closes: list[tuple[int | None, str | None]] = []
        self.headers: list[dict[str, str]] = []
        self.closed = threading.Event()
        self.server: Server = serve(self._handle, "127.0.0.1", port, select_subprotocol=self._select)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def _select(ws: ServerConnection, offered: Sequence[str]) -> str | None:
        return "chat" if "chat" in offered else None

    def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.headers.append({k.lower(): v for k, v in ws.request.headers.raw_items()})
        try:
            for message in ws:
                if isinstance(message, str) and message.startswith("close:"):
                    _, code, reason = message.split(":", 2)
                    ws.close(int(code), reason)
                    break
                ws.send(message)
        except ConnectionClosed:
            pass
        rcvd = ws.protocol.close_rcvd
        self.closes.append((rcvd.code, rcvd.reason) if rcvd is not None else (None, None))
        self.closed.set()

    def stop(self) -> Deferred[None]:
        self.server.shutdown()
        return deferToThread(self.thread.join, 5)


class WebSocketTests(GatewayTestCase):
    unreachable: ClassVar[tuple[str, ...]] = ("ws", "down")

    @classmethod
    def gateway_config(cls, ports: dict[str, int]) -> dict[str, Any]:
        def servers(name: str) -> list[dict[str, Any]]:
            return [{"address": f"127.0.0.1:{ports[name]}"}]

        retry = {"attempts": 1}
        return {
            "upstreams": {
                "ws": {"servers": servers("ws"), "retry": retry, "timeouts": {"connect": 2, "request": 10}},
                "down": {"servers": servers("down"), "retry": retry, "timeouts": {"connect": 2, "request": 10}},
            },
            "routes": [
                {"name": "open", "match": {"path": "/ws/*"}, "upstream": "ws", "websocket": True, "auth": "none"},
                {
                    "name": "secure",
                    "match": {"path": "/secure/*"},
                    "upstream": "ws",
                    "websocket": True,
                    "auth": "required",
                },
                {"name": "down", "match": {"path": "/down/*"}, "upstream": "down", "websocket": True, "auth": "none"},
            ],
            "middleware": {
                "auth": {"jwt_secret": JWT_SECRET, "jwt": {"algorithms": ["HS256"], "query_param": "access_token"}},
            },
        }

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        d = super().setUp()

        def started(_: object) -> None:
            self.echo = EchoServer(self.ports["ws"])
            self.addCleanup(self.echo.stop)

        return d.addCallback(started)

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def in_thread(self, call: Callable[[], T]) -> Deferred[T]:
        return deferToThread(call)

    def client(self, path: str, **kwargs: Any) -> ClientConnection:
        return connect(self.ws_url(path), open_timeout=10, close_timeout=5, max_size=4 * MiB, **kwargs)

    def test_echo_text_and_binary(self) -> Deferred[None]:
        def scenario() -> tuple[Any, ...]:
            with self.client("/ws/echo?x=1", subprotocols=["chat"]) as ws:
                ws.send("hello")
                text = ws.recv(5)
                ws.send(b"\x00\x01\xff" * 1000)
                binary = ws.recv(5)
                return text, binary, ws.subprotocol

        def check(result: tuple[Any, ...]) -> None:
            text, binary, subprotocol = result
            self.assertEqual(text, "hello")
            self.assertEqual(binary, b"\x00\x01\xff" * 1000)
            self.assertEqual(subprotocol, "chat")
            headers = self.echo.headers[0]
            self.assertEqual(headers.get("sec-websocket-protocol"), "chat")
            self.assertEqual(headers.get("x-forwarded-for"), "127.0.0.1")
            self.assertTrue(headers.get("x-request-id"))

        return self.in_thread(scenario).addCallback(check)

    def test_ten_thousand_messages_in_order(self) -> Deferred[None]:
        # Paced under the default 1000 messages/s per connection.
        def scenario() -> list[str]:
            received: list[str] = []
            with self.client("/ws/many") as ws:
                for start in range(0, 10_000, 900):
                    began = time.monotonic()
                    batch = range(start, min(start + 900, 10_000))
                    for i in batch:
                        ws.send(f"m{i}")
                    for _ in batch:
                        received.append(str(ws.recv(10)))
                    time.sleep(max(0.0, 1.05 - (time.monotonic() - began)))
            return received

        def check(received: list[str]) -> None:
            self.assertEqual(received, [f"m{i}" for i in range(10_000)])

        return self.in_thread(scenario).addCallback(check)

    def test_message_rate_limit_closes_1008(self) -> Deferred[None]:
        def scenario() -> int | None:
            with self.client("/ws/flood", max_queue=None) as ws:
                try:
                    for i in range(3000):
                        ws.send(f"f{i}")
                    while True:
                        ws.recv(10)
                except ConnectionClosed:
                    pass
                return ws.protocol.close_rcvd.code if ws.protocol.close_rcvd is not None else None

        return self.in_thread(scenario).addCallback(self.assertEqual, 1008)

    def test_client_close_reaches_upstream(self) -> Deferred[None]:
        def scenario() -> tuple[int | None, str | None]:
            with self.client("/ws/close") as ws:
                ws.send("ping")
                ws.recv(5)
                ws.close(4000, "client bye")
            self.echo.closed.wait(5)
            return self.echo.closes[-1]

        return self.in_thread(scenario).addCallback(self.assertEqual, (4000, "client bye"))

    def test_upstream_close_reaches_client(self) -> Deferred[None]:
        def scenario() -> tuple[int | None, str | None]:
            with self.client("/ws/close") as ws:
                ws.send("close:4001:upstream bye")
                try:
                    ws.recv(5)
                except ConnectionClosed:
                    pass
                rcvd = ws.protocol.close_rcvd
                return (rcvd.code, rcvd.reason) if rcvd is not None else (None, None)

        return self.in_thread(scenario).addCallback(self.assertEqual, (4001, "upstream bye"))

    def test_unauthenticated_upgrade_is_401(self) -> Deferred[None]:
        def scenario() -> int:
            try:
                with self.client("/secure/chat"):
                    return 101
            except InvalidStatus as error:
                return error.response.status_code

        def check(status: int) -> None:
            self.assertEqual(status, 401)
            self.assertEqual(self.echo.headers, [])  # the upstream was never dialled

        return self.in_thread(scenario).addCallback(check)

    def test_query_token_and_header_token(self) -> Deferred[None]:
        def scenario() -> tuple[str, str]:
            with self.client(f"/secure/chat?access_token={token()}&room=1") as ws:
                ws.send("via query")
                first = str(ws.recv(5))
            with self.client("/secure/chat", additional_headers={"Authorization": f"Bearer {token()}"}) as ws:
                ws.send("via header")
                second = str(ws.recv(5))
            return first, second

        def check(result: tuple[str, str]) -> None:
            self.assertEqual(result, ("via query", "via header"))

        return self.in_thread(scenario).addCallback(check)

    def test_upstream_down_is_502(self) -> Deferred[None]:
        def scenario() -> int:
            try:
                with self.client("/down/x"):
                    return 101
            except InvalidStatus as error:
                return error.response.status_code

        return self.in_thread(scenario).addCallback(self.assertEqual, 502)

    def test_oversized_message_closes_1009(self) -> Deferred[None]:
        def scenario() -> int | None:
            with self.client("/ws/big") as ws:
                try:
                    ws.send(b"x" * (MiB + 1))
                    ws.recv(5)
                except ConnectionClosed:
                    pass
                return ws.protocol.close_rcvd.code if ws.protocol.close_rcvd is not None else None

        return self.in_thread(scenario).addCallback(self.assertEqual, 1009)
