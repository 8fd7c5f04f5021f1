"""txgateway.redis.RedisConnection and txgateway.resp: the bytes sent and the replies read are txredisapi's."""

from __future__ import annotations

from typing import Any

import txredisapi
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from txgateway.redis import RedisConnection
from txgateway.resp import ProtocolError, ReplyReader

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


# Replies: txgateway.resp.ReplyReader against txredisapi's own reader.

_STATUS = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=20)
_NUMERIC = st.sampled_from([b"0", b"12", b"-7", b"3.25", b"-0.5", b"1e5", b"12abc", b".5", b"+3", b"007"])
_LEAF = st.one_of(
    st.tuples(st.just("+"), _STATUS),
    st.tuples(st.just("-"), st.one_of(_STATUS, st.just("ERR"), st.just("ERR unknown command"))),
    st.tuples(st.just(":"), st.integers(min_value=-(2**63), max_value=2**63 - 1)),
    st.tuples(st.just("$"), st.one_of(st.binary(max_size=40), _NUMERIC, st.just(b"caf\xc3\xa9"), st.just(b"\xff\xfe"))),
    st.just(("$", None)),
    st.just(("*", None)),
)
_REPLY = st.recursive(_LEAF, lambda inner: st.tuples(st.just("*"), st.lists(inner, max_size=4)), max_leaves=12)


def _wire(reply: Any) -> bytes:
    kind, value = reply
    if kind in "+-":
        return f"{kind}{value}\r\n".encode()
    if kind == ":":
        return b":%d\r\n" % value
    if kind == "$":
        return b"$-1\r\n" if value is None else b"$%d\r\n%s\r\n" % (len(value), value)
    if value is None:
        return b"*-1\r\n"
    return b"*%d\r\n" % len(value) + b"".join(_wire(item) for item in value)


def _comparable(value: object) -> object:
    if isinstance(value, Exception):
        return (type(value).__name__, str(value))
    if isinstance(value, list):
        return [_comparable(item) for item in value]
    return value


class _TheirReader(txredisapi.BaseRedisProtocol):
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.replies: list[object] = []

    def replyReceived(self, reply: object) -> None:
        self.replies.append(reply)


def _theirs(options: dict[str, Any], chunks: list[bytes]) -> list[object]:
    protocol = _TheirReader(**options)
    clock = Clock()
    protocol.callLater = clock.callLater  # its bulk handling continues on a later turn
    protocol.transport = StringTransport()
    for chunk in chunks:
        protocol.dataReceived(chunk)
        while clock.getDelayedCalls():
            clock.advance(0)
    return protocol.replies


OPTIONS = [{"charset": "utf-8"}, {"charset": None, "convertNumbers": False}]


class ReplyReaderTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(replies=st.lists(_REPLY, min_size=1, max_size=6), cuts=st.lists(st.integers(min_value=0), max_size=8))
    def test_the_same_replies_as_txredisapi_however_the_bytes_arrive(self, replies: list[Any], cuts: list[int]) -> None:
        data = b"".join(_wire(reply) for reply in replies)
        points = sorted({cut % (len(data) + 1) for cut in cuts})
        chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]
        for options in OPTIONS:
            convert = txredisapi.BaseRedisProtocol(**options).tryConvertData
            reader = ReplyReader(convert)
            ours: list[object] = []
            for chunk in chunks:
                ours.extend(reader.feed(chunk))
            self.assertEqual(_comparable(ours), _comparable(_theirs(options, chunks)), options)

    def test_a_reply_split_anywhere_waits_for_its_end(self) -> None:
        reader = ReplyReader(bytes)
        data = b"*2\r\n$5\r\nhello\r\n:42\r\n"
        for cut in range(1, len(data)):
            self.assertEqual(reader.feed(data[:cut]), [])
            self.assertEqual(reader.feed(data[cut:]), [[b"hello", 42]])

    def test_garbage_is_a_protocol_error(self) -> None:
        for garbage in (b"?what\r\n", b":12x\r\n", b"$3\r\nabcde\r\n", b"*x\r\n"):
            with self.assertRaises(ProtocolError, msg=garbage):
                ReplyReader(bytes).feed(garbage)

    def test_a_line_without_end_is_bounded(self) -> None:
        reader = ReplyReader(bytes, max_line=1000)
        reader.feed(b"+" + b"x" * 900)
        with self.assertRaises(ProtocolError):
            reader.feed(b"x" * 200)

    def test_a_big_bulk_string_in_pieces(self) -> None:
        reader = ReplyReader(bytes)
        value = bytes(range(256)) * 4096  # 1 MiB
        data = b"$%d\r\n%s\r\n" % (len(value), value)
        replies: list[object] = []
        for start in range(0, len(data), 65536):
            replies.extend(reader.feed(data[start : start + 65536]))
        self.assertEqual(replies, [value])
