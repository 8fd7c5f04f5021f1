"""Server-sent events and other streamed responses end to end through a real ``twistd -n txgateway``.

A real Twisted upstream on loopback writes ``text/event-stream`` events (or
plain chunks) one at a time and records when it wrote each; a raw-socket
client records when each one arrived.  The checks are what a user of a
live feed would notice:

- events arrive as they are emitted, in order, not when the stream ends;
- an event stream is never served from the response cache;
- a route's ``timeout`` bounds only the wait for the response head, so a
  stream may outlive it, while ``timeouts.idle`` cuts an upstream that goes
  silent mid-stream (the client sees the chunked message cut, not a hang);
- a client that goes away closes the upstream stream;
- a plain chunked response is forwarded piece by piece too.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as WaitTimedOut
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from tests.integration.harness import (
    LOCALHOST,
    DribbleUpstream,
    GatewayTestCase,
    RawClient,
    SeenRequest,
    UpstreamConnection,
    UpstreamServer,
    reactor,
    sleep,
)

# The upstream.


@dataclass
class Stream:
    """One event stream an upstream served: when each event was written, when the connection went."""

    connection: UpstreamConnection
    count: int
    written_at: list[float] = field(default_factory=list)
    finished: bool = False
    lost_at: float | None = None


class SseUpstream(UpstreamServer):
    """``GET ...?count=N&interval=S[&pause_after=K&pause=P]``: N events, one every S seconds.

    Each event (``id: I`` / ``data: event-I``) is its own chunk of a chunked
    ``text/event-stream`` response without Content-Length.  With
    ``pause_after`` the upstream goes silent for ``pause`` seconds after that
    many events.  The stream ends with the last chunk unless the connection
    went first.
    """

    def __init__(self) -> None:
        super().__init__()
        self.streams: list[Stream] = []

    def request_complete(self, connection: UpstreamConnection, request: SeenRequest) -> None:
        query = parse_qs(request.query)

        def number(name: str, default: float) -> float:
            return float(query.get(name, [str(default)])[0])

        count = int(number("count", 10))
        interval = number("interval", 0.1)
        pause_after = int(number("pause_after", -1))
        pause = number("pause", 0.0)
        stream = Stream(connection, count)
        self.streams.append(stream)

        def lost(_: None) -> None:
            stream.lost_at = reactor.seconds()

        connection.when_lost().addCallback(lost)
        connection.send_head(
            200,
            [
                ("Content-Type", "text/event-stream"),
                ("Cache-Control", "no-transform"),
                ("Transfer-Encoding", "chunked"),
            ],
        )

        def emit() -> None:
            if connection.is_lost:
                return
            index = len(stream.written_at)
            data = b"id: %d\ndata: event-%d\n\n" % (index, index)
            connection.write(b"%x\r\n%s\r\n" % (len(data), data))
            stream.written_at.append(reactor.seconds())
            if len(stream.written_at) >= count:
                connection.write(b"0\r\n\r\n")
                stream.finished = True
                connection.done()
                return
            delay = interval + (pause if len(stream.written_at) == pause_after else 0.0)
            connection.later(delay, emit)

        connection.later(interval, emit)


# The client.

_EVENT = re.compile(rb"id: (\d+)\ndata: event-(\d+)\n\n")


def dechunk_prefix(data: bytes) -> tuple[bytes, bool]:
    """The body bytes of the complete chunks at the start of ``data``, and whether the last chunk came."""
    body: list[bytes] = []
    position = 0
    while True:
        line_end = data.find(b"\r\n", position)
        if line_end < 0:
            return b"".join(body), False
        size = int(data[position:line_end].split(b";")[0], 16)
        start = line_end + 2
        if size == 0:
            return b"".join(body), data.find(b"\r\n", start) >= 0
        if len(data) < start + size + 2:
            return b"".join(body), False
        body.append(data[start : start + size])
        position = start + size + 2


class StreamClient(RawClient):
    """A raw client noting when each complete piece of a chunked response body arrived.

    ``pattern`` finds the pieces in the de-chunked body; ``arrivals`` is
    ``(piece, time)`` in arrival order, where a piece is the pattern's first group.
    """

    pattern: re.Pattern[bytes] = _EVENT

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[tuple[bytes, float]] = []
        self.head: bytes | None = None
        self.body = b""
        self.complete = False

    def dataReceived(self, data: bytes) -> None:
        now = reactor.seconds()
        self.received += data
        head, sep, rest = self.received.partition(b"\r\n\r\n")
        if sep:
            self.head = head
            if b"chunked" in head.lower():
                self.body, self.complete = dechunk_prefix(rest)
            else:
                self.body = rest
            found = [m.group(1) for m in self.pattern.finditer(self.body)]
            for piece in found[len(self.arrivals) :]:
                self.arrivals.append((piece, now))
        self._check()

    def status(self) -> int:
        assert self.head is not None, self.received[:300]
        return int(self.head.split(b" ", 2)[1])

    def header(self, name: bytes) -> bytes | None:
        assert self.head is not None
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


class PieceClient(StreamClient):
    pattern = re.compile(rb"piece-(\d+)\n")


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: sse.test\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n".encode()


class SseTests(GatewayTestCase):
    """One gateway; the SSE upstream behind routes with and without cache, timeout and idle limits."""

    upstreams = {"sse": SseUpstream, "plain": DribbleUpstream}

    @classmethod
    def gateway_config(cls, ports: dict[str, int]) -> dict[str, Any]:
        def upstream(name: str, **timeouts: float) -> dict[str, Any]:
            return {
                "servers": [{"address": f"{LOCALHOST}:{ports[name]}"}],
                "retry": {"attempts": 1},
                "timeouts": {"connect": 1, "request": 5, **timeouts},
            }

        def route(name: str, upstream: str, **extra: Any) -> dict[str, Any]:
            return {"name": name, "match": {"path": f"/{name}/*"}, "upstream": upstream, **extra}

        return {
            "upstreams": {
                "sse": upstream("sse"),
                "sse_idle": upstream("sse", idle=1),
                "plain": upstream("plain"),
            },
            "routes": [
                route("live", "sse"),
                route("cached", "sse", cache={"enabled": True, "ttl": 60}),
                route("short", "sse", timeout=1),
                route("idle", "sse_idle"),
                route("plain", "plain"),
            ],
        }

    @property
    def sse(self) -> SseUpstream:
        server = self.servers["sse"]
        assert isinstance(server, SseUpstream)
        return server

    def run_scenario(self, scenario: Callable[[], Coroutine[Any, Any, None]]) -> Deferred[None]:
        return Deferred.fromCoroutine(scenario())

    async def open_stream(self, path: str, client: StreamClient | None = None) -> StreamClient:
        protocol = client or StreamClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, LOCALHOST, self.port, timeout=5), protocol)
        self.addCleanup(protocol.abort)
        protocol.send(get(path))
        return protocol

    async def read_to_close(self, client: StreamClient, timeout: float) -> None:
        try:
            await client.wait_closed(timeout)
        except WaitTimedOut:
            self.fail(f"the stream was still open after {timeout}s; got {client.received[-300:]!r}")

    def assertInOrder(self, client: StreamClient, count: int) -> None:
        self.assertEqual([int(piece) for piece, _ in client.arrivals], list(range(count)), client.body[-300:])

    # 1. Events arrive as emitted.

    def test_events_arrive_as_they_are_emitted(self) -> Deferred[None]:
        async def scenario() -> None:
            count = 20
            client = await self.open_stream(f"/live/feed?count={count}&interval=0.1")
            await self.read_to_close(client, 6.0)
            self.assertEqual(client.status(), 200)
            self.assertEqual((client.header(b"content-type") or b"").split(b";")[0], b"text/event-stream")
            self.assertIsNone(client.header(b"content-length"))
            self.assertTrue(client.complete, "the stream did not end with its last chunk")
            self.assertInOrder(client, count)

            (stream,) = self.sse.streams
            self.assertTrue(stream.finished)
            lags = [arrived - written for (_, arrived), written in zip(client.arrivals, stream.written_at, strict=True)]
            self.assertLess(statistics.median(lags), 0.05, f"events are delayed: {lags}")
            self.assertLess(max(lags), 0.5, f"an event was held back: {lags}")
            # Spread over the stream's two seconds, not delivered at once at the end.
            spread = client.arrivals[-1][1] - client.arrivals[0][1]
            self.assertGreater(spread, 1.5, f"events arrived in a burst: {lags}")

        return self.run_scenario(scenario)

    # 2. Never cached.

    def test_event_stream_is_not_cached(self) -> Deferred[None]:
        async def scenario() -> None:
            path = "/cached/feed?count=3&interval=0.05"
            first = await self.open_stream(path)
            await self.read_to_close(first, 5.0)
            second = await self.open_stream(path)
            await self.read_to_close(second, 5.0)

            for client in (first, second):
                self.assertEqual(client.status(), 200)
                self.assertTrue(client.complete)
                self.assertInOrder(client, 3)
                self.assertNotEqual(client.header(b"x-cache"), b"HIT", client.head)
            self.assertIsNotNone(first.header(b"x-cache"), "a caching route must say X-Cache")
            self.assertEqual(len(self.sse.streams), 2, "the second request was not sent upstream")
            self.assertTrue(all(stream.finished for stream in self.sse.streams))

        return self.run_scenario(scenario)

    # 3. The route's timeout bounds the head only; idle cuts a silent stream.

    def test_stream_outlives_the_route_timeout(self) -> Deferred[None]:
        async def scenario() -> None:
            count = 15  # every 0.2s: 3s, three times the route's timeout of 1s
            start = reactor.seconds()
            client = await self.open_stream(f"/short/feed?count={count}&interval=0.2")
            await self.read_to_close(client, 8.0)
            self.assertEqual(client.status(), 200, client.received[:300])
            self.assertTrue(client.complete, f"the stream was cut after {reactor.seconds() - start:.2f}s")
            self.assertInOrder(client, count)
            self.assertGreater(reactor.seconds() - start, 2.8)

        return self.run_scenario(scenario)

    def test_silent_stream_is_cut_after_idle(self) -> Deferred[None]:
        async def scenario() -> None:
            client = await self.open_stream("/idle/feed?count=10&interval=0.2&pause_after=3&pause=2")
            await client.wait_for(lambda _: len(client.arrivals) >= 3, 3.0)
            silent_since = reactor.seconds()
            await self.read_to_close(client, 4.0)
            cut_after = client.closed_at - silent_since

            self.assertEqual(client.status(), 200)
            self.assertFalse(client.complete, f"the stream was not cut: {client.received[-200:]!r}")
            self.assertInOrder(client, 3)
            self.assertGreater(cut_after, 0.8, "cut before the idle timeout")
            self.assertLess(cut_after, 1.8, "cut too late: the upstream's pause itself was 2s")

            (stream,) = self.sse.streams
            await self.wait_until(lambda: stream.lost_at is not None, 1.0, "the upstream connection stayed open")
            self.assertFalse(stream.finished)
            self.assertEqual(len(stream.written_at), 3)

        return self.run_scenario(scenario)

    # 4. The client goes: the upstream stream is closed.

    def test_client_disconnect_closes_the_upstream_stream(self) -> Deferred[None]:
        async def scenario() -> None:
            client = await self.open_stream("/live/feed?count=200&interval=0.05")
            await client.wait_for(lambda _: len(client.arrivals) >= 3, 3.0)
            (stream,) = self.sse.streams
            self.assertIsNone(stream.lost_at)

            gone = reactor.seconds()
            client.transport.loseConnection()  # type: ignore[union-attr]
            await self.wait_until(
                lambda: stream.lost_at is not None,
                2.0,
                "the upstream stream was still open 2s after the client left",
            )
            self.assertFalse(stream.finished)
            self.assertLess(len(stream.written_at), 200)
            assert stream.lost_at is not None
            self.assertLess(stream.lost_at - gone, 2.0)

        return self.run_scenario(scenario)

    def test_client_reset_closes_the_upstream_stream(self) -> Deferred[None]:
        async def scenario() -> None:
            client = await self.open_stream("/live/feed?count=200&interval=0.05")
            await client.wait_for(lambda _: len(client.arrivals) >= 3, 3.0)
            (stream,) = self.sse.streams
            client.transport.abortConnection()  # type: ignore[union-attr]
            await self.wait_until(
                lambda: stream.lost_at is not None,
                2.0,
                "the upstream stream was still open 2s after the client reset its connection",
            )
            self.assertFalse(stream.finished)

        return self.run_scenario(scenario)

    # 5. Plain chunked responses stream too.

    def test_plain_chunked_response_is_forwarded_piece_by_piece(self) -> Deferred[None]:
        async def scenario() -> None:
            pieces = 8
            client = await self.open_stream(f"/plain/feed?pieces={pieces}&delay=0.15", PieceClient())
            await self.read_to_close(client, 6.0)
            self.assertEqual(client.status(), 200)
            self.assertTrue(client.complete)
            self.assertInOrder(client, pieces)
            self.assertEqual(client.body, b"".join(b"piece-%d\n" % i for i in range(pieces)))

            gaps = [b[1] - a[1] for a, b in zip(client.arrivals, client.arrivals[1:], strict=False)]
            # The upstream waits 0.15s between pieces: so must the arrivals, not all land together.
            self.assertGreater(min(gaps), 0.08, f"pieces arrived together: {gaps}")
            self.assertLess(max(gaps), 0.5, f"a piece was held back: {gaps}")
            (record,) = self.servers["plain"].records  # type: ignore[attr-defined]
            assert record.finished_at is not None
            self.assertLess(client.arrivals[-1][1] - record.finished_at, 0.5)

        return self.run_scenario(scenario)

    # Helpers.

    async def wait_until(self, predicate: Callable[[], bool], within: float, message: str) -> None:
        start = reactor.seconds()
        while not predicate():
            if reactor.seconds() - start > within:
                self.fail(message)
            await sleep(0.02)
