"""txgateway.redis.RedisConnection: what it sends is what txredisapi would send."""

from __future__ import annotations

import txredisapi
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from txgateway.redis import RedisConnection

ARGUMENTS: list[tuple[object, ...]] = [
    ("EVALSHA", "0123456789abcdef", 1, "rl:users-api:consumer-7", 600, 100, -3, 0),
    ("SET", b"cache:\x00\xffkey", b"", "caf\u00e9"),
    ("GET", "x" * 70000),
    ("INCRBYFLOAT", "k", 1.5),
    ("SETNX", "k", True),
    (),
]


class EncodingTests(SynchronousTestCase):
    def test_commands_are_encoded_as_txredisapi_encodes_them(self) -> None:
        for charset in ("utf-8", None):
            ours = RedisConnection(charset=charset)
            theirs = txredisapi.BaseRedisProtocol(charset=charset)
            for args in ARGUMENTS:
                if charset is None and any(isinstance(a, str) and not a.isascii() for a in args):
                    continue
                self.assertEqual(ours._build_command(*args), theirs._build_command(*args), (charset, args))

    def test_the_wire_format(self) -> None:
        self.assertEqual(
            RedisConnection()._build_command("EVALSHA", "ab", 1, b"k", -2),
            b"*5\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$1\r\nk\r\n$2\r\n-2\r\n",
        )

    def test_writes_reach_the_transport_it_was_given(self) -> None:
        # Not a TCP transport: write_soon writes it at once, unchanged.
        transport = StringTransport()
        connection = RedisConnection()
        connection.makeConnection(transport)
        connection.transport.write(b"PING\r\n")  # type: ignore[union-attr]
        self.assertIn(b"PING\r\n", transport.value())
        self.assertEqual(connection.transport.getPeer(), transport.getPeer())  # type: ignore[union-attr]
