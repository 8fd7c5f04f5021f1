"""WebSocket flow control and fragmentation through a real gateway.

- A slow consumer: the upstream floods 64 KiB binary messages as fast as it
  can while the client (a raw socket that completed the opening handshake by
  hand) never reads.  The gateway must pause the upstream instead of
  buffering: its RSS stays bounded and the upstream's ``send`` stalls.
- A fragmented text (and binary) message from the client arrives whole at the
  upstream and its echo comes back.

The upstream is ``websockets.sync.server`` in a thread, the clients run in
threads (``deferToThread``).  Loopback only.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from websockets.sync.server import Server, ServerConnection, serve

from tests.integration.harness import GatewayTestCase

T = TypeVar("T")

KiB = 1024
MiB = 1024 * KiB
FLOOD_MESSAGE = 64 * KiB
FLOOD_TOTAL = 200 * MiB
#: How much the gateway's RSS may grow while the client does not read.
RSS_BOUND = 64 * MiB
#: What the upstream may have sent by then: socket buffers on both legs plus
#: what the gateway holds before it pauses, far below the 200 MiB it wants.
SENT_BOUND = 48 * MiB


class FlowUpstream:
    """``/flood/...``: sends up to FLOOD_TOTAL bytes of binary messages; anything else echoes."""

    def __init__(self, port: int) -> None:
        self.sent = 0
        self.received: list[str | bytes] = []
        self.stop_flood = threading.Event()
        self.handlers_done = threading.Event()
        self.connections: list[ServerConnection] = []
        self._active = 0
        self._lock = threading.Lock()
        self.server: Server = serve(self._handle, "127.0.0.1", port, max_size=4 * MiB)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _handle(self, ws: ServerConnection) -> None:
        with self._lock:
            self._active += 1
            self.connections.append(ws)
            self.handlers_done.clear()
        try:
            assert ws.request is not None
            if ws.request.path.startswith("/flood/"):
                self._flood(ws)
            else:
                for message in ws:
                    self.received.append(message)
                    ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    self.handlers_done.set()

    def _flood(self, ws: ServerConnection) -> None:
        payload = os.urandom(FLOOD_MESSAGE)
        while self.sent < FLOOD_TOTAL and not self.stop_flood.is_set():
            ws.send(payload)  # blocks once the gateway stops reading
            self.sent += len(payload)

    def stop(self) -> Deferred[None]:
        self.stop_flood.set()

        def in_thread() -> None:
            self.server.shutdown()
            self.thread.join(5)
            if not self.handlers_done.wait(5):
                for ws in self.connections:  # a handler still blocked in send
                    ws.close_socket()
                self.handlers_done.wait(5)

        return deferToThread(in_thread)


def handshake(port: int, path: str) -> socket.socket:
    """A client socket that completed the opening handshake by hand (small receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)  # byte by byte: read nothing past the head
        if not chunk:
            raise AssertionError(f"closed during the handshake: {head!r}")
        head += chunk
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status + b" ":
        raise AssertionError(f"no 101: {head!r}")
    return sock


def close_frame(code: int = 1000) -> bytes:
    mask = os.urandom(4)
    payload = struct.pack("!H", code)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x88, 0x80 | len(payload)]) + mask + masked


def drain(sock: socket.socket, timeout: float) -> int:
    """Read until EOF (or ``timeout``); the number of bytes read."""
    total = 0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            total += len(chunk)
    except OSError:
        pass
    return total


class WebSocketFlowTests(GatewayTestCase):
    unreachable: ClassVar[tuple[str, ...]] = ("ws",)
    timeout = 60

    @classmethod
    def gateway_config(cls, ports: dict[str, int]) -> dict[str, Any]:
        return {
            "upstreams": {
                "ws": {
                    "servers": [{"address": f"127.0.0.1:{ports['ws']}"}],
                    "retry": {"attempts": 1},
                    "timeouts": {"connect": 2, "request": 10},
                },
            },
            "routes": [
                {"name": "ws", "match": {"path": "/*"}, "upstream": "ws", "websocket": True, "auth": "none"},
            ],
        }

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        d = super().setUp()

        def started(_: object) -> None:
            self.upstream = FlowUpstream(self.ports["ws"])
            self.addCleanup(self.upstream.stop)

        return d.addCallback(started)

    def in_thread(self, call: Callable[[], T]) -> Deferred[T]:
        return deferToThread(call)

    def test_slow_consumer_pauses_upstream(self) -> Deferred[None]:
        def scenario() -> dict[str, int]:
            sock = handshake(self.port, "/flood/x")
            try:
                rss_before = self.gateway.memory()["VmRSS"]
                # The flood runs against a client that does not read.
                time.sleep(3.0)
                sent_early = self.upstream.sent
                time.sleep(1.5)
                sent_late = self.upstream.sent
                rss_after = self.gateway.memory()["VmRSS"]
                # Close: a close frame, then read what the gateway had queued until it closes.
                self.upstream.stop_flood.set()
                sock.sendall(close_frame())
                drained = drain(sock, 10.0)
            finally:
                sock.close()
            self.upstream.handlers_done.wait(10)
            return {
                "rss_growth": rss_after - rss_before,
                "sent_early": sent_early,
                "sent_late": sent_late,
                "drained": drained,
            }

        def check(result: dict[str, int]) -> None:
            self.assertLess(result["rss_growth"], RSS_BOUND, result)
            self.assertGreater(result["sent_late"], 0, result)
            self.assertLess(result["sent_late"], SENT_BOUND, result)
            # Stalled: at most a message or two more in the last 1.5 s.
            self.assertLessEqual(result["sent_late"] - result["sent_early"], 2 * FLOOD_MESSAGE, result)
            self.assertTrue(self.upstream.handlers_done.is_set(), "the upstream connection was not closed")

        return self.in_thread(scenario).addCallback(check)

    def test_fragmented_messages_arrive_whole(self) -> Deferred[None]:
        text_fragments = ["héllo ", "wörld " * 5000, "✓" * 20000, "!"]
        binary_fragments = [bytes([i]) * 30000 for i in range(5)]

        def scenario() -> tuple[Any, Any]:
            url = f"ws://127.0.0.1:{self.port}/echo/fragments"
            with connect(url, open_timeout=10, close_timeout=5, max_size=4 * MiB) as ws:
                ws.send(text_fragments)
                text = ws.recv(10)
                ws.send(binary_fragments)
                binary = ws.recv(10)
            return text, binary

        def check(result: tuple[Any, Any]) -> None:
            text, binary = result
            whole_text = "".join(text_fragments)
            whole_binary = b"".join(binary_fragments)
            self.assertEqual(self.upstream.received, [whole_text, whole_binary])
            self.assertEqual(text, whole_text)
            self.assertEqual(binary, whole_binary)

        return self.in_thread(scenario).addCallback(check)
