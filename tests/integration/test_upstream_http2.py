"""The HTTP/2 upstream client against a real grpcio server, on the real reactor.

The server uses generic handlers with bytes in and out (no protoc), listens
on a free loopback port and runs in grpcio's own threads.  The client frames
gRPC messages itself (1-byte compressed flag, 4-byte big-endian length,
payload) and checks what a proxy relies on: status, headers, the messages in
order, and ``grpc-status`` in the trailers (or in the head of a trailers-only
answer).
"""

from __future__ import annotations

import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from txgateway.body import BytesBody
from txgateway.config.model import PoolConfig
from txgateway.interfaces import IBodySink
from txgateway.messages import Headers, Response, UpstreamRequest
from txgateway.upstream.http2 import H2Client

reactor: Any = _reactor

MiB = 1024 * 1024
MAX_MESSAGE = 16 * MiB
SERVICE = "txgateway.test.Echo"


def frame(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


def unframe(data: bytes) -> list[bytes]:
    messages = []
    position = 0
    while position < len(data):
        flag, length = struct.unpack_from(">BI", data, position)
        assert flag == 0, "no compression asked for"
        position += 5
        messages.append(data[position : position + length])
        position += length
    assert position == len(data), "the body ends on a message boundary"
    return messages


@implementer(IBodySink)
class BodyReader:
    """Collects a response body; ``done`` fires with (bytes, trailers)."""

    def __init__(self, response: Response) -> None:
        self.response = response
        self.chunks: list[bytes] = []
        self.done: Deferred[tuple[bytes, Headers]] = Deferred()

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def finish(self) -> None:
        assert self.response.body is not None
        self.done.callback((b"".join(self.chunks), list(self.response.body.trailers)))

    def abort(self, reason: object) -> None:
        assert isinstance(reason, Failure)
        self.done.errback(reason)


def read(response: Response) -> Deferred[tuple[bytes, Headers]]:
    reader = BodyReader(response)
    assert response.body is not None
    response.body.deliverTo(reader)
    return reader.done


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def _stream(request: bytes, context: grpc.ServicerContext) -> Any:
    for i in range(int(request)):
        yield b"message %d" % i


def _fail(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    raise AssertionError("abort raises")


class GrpcUpstreamTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
        ]
        server = grpc.server(ThreadPoolExecutor(max_workers=4), options=options)
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
                        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
                        "Fail": grpc.unary_unary_rpc_method_handler(_fail),
                    },
                ),
            )
        )
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.addCleanup(lambda: server.stop(0).wait(5))
        self.client = H2Client(reactor, PoolConfig(max_connections_per_host=4, idle_timeout=30.0))
        self.addCleanup(self.client.close)

    def call(self, method: str, message: bytes) -> Deferred[Response]:
        return self.client.request(
            UpstreamRequest(
                host="127.0.0.1",
                port=self.port,
                method=b"POST",
                target=f"/{SERVICE}/{method}".encode(),
                headers=[
                    (b"host", b"echo.internal"),
                    (b"content-type", b"application/grpc"),
                    (b"user-agent", b"txgateway-test"),
                ],
                body=BytesBody(frame(message)),
                response_timeout=20.0,
            )
        )

    @inlineCallbacks
    def test_unary(self) -> Any:
        response = yield self.call("Unary", b"hello, upstream")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.version, (2, 0))
        self.assertIn((b"content-type", b"application/grpc"), response.headers)
        data, trailers = yield read(response)
        self.assertEqual(unframe(data), [b"hello, upstream"])
        self.assertEqual(dict(trailers).get(b"grpc-status"), b"0")

    @inlineCallbacks
    def test_server_streaming_in_order(self) -> Any:
        response = yield self.call("Stream", b"1000")
        self.assertEqual(response.status, 200)
        data, trailers = yield read(response)
        self.assertEqual(unframe(data), [b"message %d" % i for i in range(1000)])
        self.assertEqual(dict(trailers).get(b"grpc-status"), b"0")

    @inlineCallbacks
    def test_four_mebibyte_message(self) -> Any:
        message = bytes(range(256)) * (4 * MiB // 256)
        response = yield self.call("Unary", message)
        self.assertEqual(response.status, 200)
        data, trailers = yield read(response)
        self.assertEqual(unframe(data), [message])
        self.assertEqual(dict(trailers).get(b"grpc-status"), b"0")

    @inlineCallbacks
    def test_concurrent_calls_share_the_pool(self) -> Any:
        responses = yield gatherResults([self.call("Unary", b"call %d" % i) for i in range(50)])
        bodies = yield gatherResults([read(response) for response in responses])
        self.assertEqual([unframe(data) for data, _ in bodies], [[b"call %d" % i] for i in range(50)])
        connections = sum(len(host.connections) for host in self.client._hosts.values())
        self.assertEqual(connections, 1, "50 streams multiplexed on one connection")

    @inlineCallbacks
    def test_error_status(self) -> Any:
        response = yield self.call("Fail", b"x")
        self.assertEqual(response.status, 200)
        data, trailers = yield read(response)
        self.assertEqual(data, b"")
        status = dict(response.headers).get(b"grpc-status") or dict(trailers).get(b"grpc-status")
        self.assertEqual(status, b"5")

    @inlineCallbacks
    def test_unknown_method(self) -> Any:
        response = yield self.call("Missing", b"x")
        _, trailers = yield read(response)
        status = dict(response.headers).get(b"grpc-status") or dict(trailers).get(b"grpc-status")
        self.assertEqual(status, b"12")  # UNIMPLEMENTED
