"""Unit tests of the WebSocket pieces that need no sockets."""

from __future__ import annotations

from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.trial.unittest import SynchronousTestCase

from txgateway.protocols.http1 import _is_websocket_upgrade
from txgateway.protocols.websocket import close_websocket
from txgateway.upstream.websocket import ConnectionCounts


class FakeSide:
    def __init__(self, state: int = WebSocketProtocol.STATE_OPEN) -> None:
        self.state = state
        self.calls: list[tuple[str, Any]] = []

    def sendClose(self, code: int | None = None, reason: str | None = None) -> None:
        self.calls.append(("sendClose", (code, reason)))

    def sendCloseFrame(self, code: int | None = None, reasonUtf8: bytes | None = None, isReply: bool = False) -> None:
        self.calls.append(("sendCloseFrame", (code, reasonUtf8)))

    def dropConnection(self, abort: bool = False) -> None:
        self.calls.append(("drop", abort))


class CloseTests(SynchronousTestCase):
    def test_code_and_reason_passed_on(self) -> None:
        side = FakeSide()
        close_websocket(side, 4001, "bye")
        self.assertEqual(side.calls, [("sendCloseFrame", (4001, b"bye"))])

    def test_protocol_codes_passed_on(self) -> None:
        side = FakeSide()
        close_websocket(side, 1008, "policy")
        self.assertEqual(side.calls, [("sendCloseFrame", (1008, b"policy"))])

    def test_no_status_becomes_plain_close(self) -> None:
        side = FakeSide()
        close_websocket(side, 1005, "")
        self.assertEqual(side.calls, [("sendClose", (None, None))])

    def test_abnormal_becomes_going_away(self) -> None:
        side = FakeSide()
        close_websocket(side, 1006, None)
        self.assertEqual(side.calls, [("sendCloseFrame", (1001, b"peer went away"))])

    def test_long_reason_truncated(self) -> None:
        side = FakeSide()
        close_websocket(side, 4000, "x" * 500)
        self.assertEqual(len(side.calls[0][1][1]), 123)

    def test_closed_side_left_alone(self) -> None:
        side = FakeSide(WebSocketProtocol.STATE_CLOSING)
        close_websocket(side, 1000, "x")
        self.assertEqual(side.calls, [])


class CountsTests(SynchronousTestCase):
    def test_limit_and_release(self) -> None:
        counts = ConnectionCounts()
        self.assertTrue(counts.acquire("a", 2))
        self.assertTrue(counts.acquire("a", 2))
        self.assertFalse(counts.acquire("a", 2))
        self.assertTrue(counts.acquire("b", 2))
        counts.release("a")
        self.assertTrue(counts.acquire("a", 2))
        counts.release("a")
        counts.release("a")
        counts.release("b")
        self.assertEqual(counts.counts, {})


class UpgradeDetectionTests(SynchronousTestCase):
    def test_websocket_upgrade(self) -> None:
        self.assertTrue(_is_websocket_upgrade([(b"upgrade", b"WebSocket")]))
        self.assertFalse(_is_websocket_upgrade([(b"upgrade", b"h2c")]))
        self.assertFalse(_is_websocket_upgrade([]))
