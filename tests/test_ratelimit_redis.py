"""The Redis store on a fake wire (MemoryReactorClock + StringTransport): what it
sends, how it reads answers, and how it behaves when Redis is slow, gone or
back: fail fast, time out, reconnect, log once per outage, stop cleanly.

The scripts themselves run against a real redis-server in
tests/integration/test_ratelimit_redis.py.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransportWithDisconnection
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from txgateway.ratelimit.decision import Algorithm, Decision, StorageError
from txgateway.ratelimit.redis import (
    KEY_PREFIX,
    SCRIPTS,
    SLIDING_WINDOW_LUA,
    TOKEN_BUCKET_LUA,
    RedisAddress,
    RedisStore,
)
from txgateway.ratelimit.sliding_window import SlidingWindow
from txgateway.ratelimit.token_bucket import TokenBucket

BUCKET = TokenBucket(requests_per_minute=60, burst_size=5)
ALLOWED = b"*4\r\n:1\r\n:4\r\n:1\r\n:0\r\n"
LIMITED = b"*4\r\n:0\r\n:0\r\n:5\r\n:1\r\n"


def parse_commands(data: bytes) -> list[list[str]]:
    """The RESP arrays of bulk strings a client sent."""
    commands = []
    while data:
        head, _, data = data.partition(b"\r\n")
        assert head.startswith(b"*"), head
        args = []
        for _ in range(int(head[1:])):
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line[1:])
            args.append(data[:size].decode())
            data = data[size + 2 :]
        commands.append(args)
    return commands


class FakeRedis:
    """The server end of one connection attempt the store made."""

    def __init__(self, reactor: MemoryReactorClock, index: int) -> None:
        self.host, self.port, self.factory, self.timeout, _ = reactor.tcpClients[index]
        self.connector = reactor.connectors[index]
        self.transport: StringTransportWithDisconnection | None = None

    def accept(self) -> FakeRedis:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", self.host, self.port))
        assert protocol is not None
        self.transport = StringTransportWithDisconnection()
        self.transport.protocol = protocol
        protocol.makeConnection(self.transport)
        return self

    def refuse(self) -> None:
        self.factory.clientConnectionFailed(self.connector, Failure(ConnectionRefusedError()))

    def commands(self) -> list[list[str]]:
        assert self.transport is not None
        sent = self.transport.value()
        self.transport.clear()
        return parse_commands(sent)

    def reply(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.protocol.dataReceived(data)

    def drop(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


class RedisStoreTests(SynchronousTestCase):
    url = "redis://127.0.0.1:6390"

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        self.events = observer
        self.store = RedisStore(self.url, self.reactor)
        self.reactor.run()
        self.decisions: list[Deferred[Decision]] = []  # connecting starts once the reactor runs

    def tearDown(self) -> None:
        self.store.stop()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        for d in self.decisions:
            d.addErrback(lambda failure: failure.trap(StorageError))

    def decide(self, key: str = "k", algorithm: Algorithm = BUCKET, timeout: float = 0.05) -> Deferred[Decision]:
        d = self.store.decide(algorithm, key, timeout)
        self.decisions.append(d)
        return d

    def server(self, index: int = -1) -> FakeRedis:
        return FakeRedis(self.reactor, index)

    def connected(self) -> FakeRedis:
        server = self.server().accept()
        self.assertTrue(self.store.connected)
        return server

    def outage_logs(self) -> list[tuple[LogLevel, str]]:
        return [
            (e["log_level"], e["log_format"].split(" ", 3)[3])
            for e in self.events
            if e.get("log_namespace") == "txgateway.ratelimit.redis.RedisStore"
        ]

    def test_connects_to_the_url(self) -> None:
        server = self.server()
        self.assertEqual((server.host, server.port), ("127.0.0.1", 6390))

    def test_one_evalsha_per_decision(self) -> None:
        server = self.connected()
        d = self.decide("api:tb:60:5:default:ip:1.2.3.4")
        self.assertEqual(
            server.commands(),
            [["EVALSHA", SCRIPTS["token_bucket"].sha, "1", KEY_PREFIX + "api:tb:60:5:default:ip:1.2.3.4", "60", "5"]],
        )
        self.assertNoResult(d)
        server.reply(ALLOWED)
        self.assertEqual(self.successResultOf(d), Decision(True, 4, 1, 0))

    def test_evalsha_is_the_command_txredisapi_would_send(self) -> None:
        # The EVALSHA is assembled from parts encoded once per policy: the
        # same bytes as encoding the whole command, whatever the key holds.
        server = self.connected()
        connection = self.store._link.connection
        assert connection is not None
        for key in ("k", "ключ:🔑", "x" * 300):
            self.decide(key)
            sent = server.transport.value() if server.transport is not None else b""
            server.transport.clear()  # type: ignore[union-attr]
            expected = connection._build_command(
                "EVALSHA", SCRIPTS["token_bucket"].sha, 1, KEY_PREFIX + key, *BUCKET.arguments
            )
            self.assertEqual(sent, expected)

    def test_sliding_window_script_and_arguments(self) -> None:
        server = self.connected()
        d = self.decide("k", SlidingWindow(100))
        self.assertEqual(
            server.commands(), [["EVALSHA", SCRIPTS["sliding_window"].sha, "1", KEY_PREFIX + "k", "100", "60000"]]
        )
        server.reply(LIMITED)
        self.assertEqual(self.successResultOf(d), Decision(False, 0, 5, 1))

    def test_noscript_falls_back_to_eval(self) -> None:
        server = self.connected()
        d = self.decide("k")
        server.commands()
        server.reply(b"-NOSCRIPT No matching script. Please use EVAL.\r\n")
        self.assertEqual(server.commands(), [["EVAL", TOKEN_BUCKET_LUA, "1", KEY_PREFIX + "k", "60", "5"]])
        server.reply(ALLOWED)
        self.assertTrue(self.successResultOf(d).allowed)
        # EVAL cached the script: the next decision is an EVALSHA again.
        self.decide("k")
        self.assertEqual(server.commands()[0][0], "EVALSHA")

    def test_pipelined_answers_go_to_their_decisions(self) -> None:
        server = self.connected()
        first = self.decide("a")
        second = self.decide("b")
        self.assertEqual(len(server.commands()), 2)
        server.reply(ALLOWED + LIMITED)
        self.assertTrue(self.successResultOf(first).allowed)
        self.assertFalse(self.successResultOf(second).allowed)

    def test_replies_reach_txredisapi_commands_and_decisions_in_order(self) -> None:
        # Decisions skip txredisapi's reply queue; a command sent through
        # txredisapi in between must still get its own reply.
        server = self.connected()
        first = self.decide("a")
        connection = self.store._link.connection
        assert connection is not None
        pong = connection.execute_command("PING")
        second = self.decide("b")
        self.assertEqual([c[0] for c in server.commands()], ["EVALSHA", "PING", "EVALSHA"])
        server.reply(LIMITED + b"+PONG\r\n")
        self.assertFalse(self.successResultOf(first).allowed)
        self.assertEqual(self.successResultOf(pong), "PONG")
        self.assertNoResult(second)
        server.reply(ALLOWED)
        self.assertTrue(self.successResultOf(second).allowed)

    def test_each_decision_times_out_at_its_own_deadline(self) -> None:
        self.connected()
        patient = self.decide("patient", timeout=1.0)
        hasty = self.decide("hasty", timeout=0.05)  # an earlier deadline than the timer's
        self.reactor.advance(0.05)
        self.failureResultOf(hasty, StorageError)
        self.assertNoResult(patient)
        self.reactor.advance(0.949)
        self.assertNoResult(patient)
        self.reactor.advance(0.001)
        self.failureResultOf(patient, StorageError)

    def test_answered_decisions_are_not_kept(self) -> None:
        # One timer watches every decision in flight; answered ones leave its
        # list, so a steady stream of decisions holds only those unanswered.
        server = self.connected()
        for _ in range(1000):
            d = self.decide("k", timeout=5.0)
            server.reply(ALLOWED)
            self.successResultOf(d)
        self.assertLessEqual(len(self.store._link._watched), 1)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.decisions.clear()

    def test_error_reply_is_a_storage_error(self) -> None:
        server = self.connected()
        d = self.decide("k")
        server.reply(b"-OOM command not allowed when used memory > 'maxmemory'.\r\n")
        self.assertIn("OOM", str(self.failureResultOf(d, StorageError).value))

    def test_unexpected_reply_is_a_storage_error(self) -> None:
        server = self.connected()
        d = self.decide("k")
        server.reply(b"+OK\r\n")
        self.failureResultOf(d, StorageError)

    def test_slow_answer_is_a_storage_error_and_is_then_ignored(self) -> None:
        server = self.connected()
        slow = self.decide("slow")
        self.reactor.advance(0.049)
        self.assertNoResult(slow)
        self.reactor.advance(0.001)
        self.failureResultOf(slow, StorageError)
        following = self.decide("next")
        server.reply(LIMITED)  # the late answer to "slow"
        self.assertNoResult(following)
        server.reply(ALLOWED)
        self.assertTrue(self.successResultOf(following).allowed)

    def test_waits_for_the_first_connection_within_the_timeout(self) -> None:
        d = self.decide("k")
        server = self.server().accept()
        self.assertEqual(server.commands()[0][0], "EVALSHA")
        server.reply(ALLOWED)
        self.assertTrue(self.successResultOf(d).allowed)

    def test_first_connection_too_slow(self) -> None:
        d = self.decide("k")
        self.reactor.advance(0.05)
        self.failureResultOf(d, StorageError)

    def test_refused_connection_fails_waiting_decisions_and_then_fails_fast(self) -> None:
        waiting = self.decide("k")
        self.server().refuse()
        self.failureResultOf(waiting, StorageError)
        self.failureResultOf(self.decide("k"), StorageError)

    def test_reconnects_with_backoff(self) -> None:
        self.server().refuse()
        attempts = [self.reactor.seconds()]
        for _ in range(8):
            count = len(self.reactor.tcpClients)
            while len(self.reactor.tcpClients) == count:
                self.reactor.advance(0.01)
            attempts.append(self.reactor.seconds())
            self.server().refuse()
        delays = [b - a for a, b in pairwise(attempts)]
        self.assertTrue(0.08 <= delays[0] <= 0.12, delays)
        self.assertTrue(0.17 <= delays[1] <= 0.23, delays)
        self.assertTrue(all(1.7 <= d <= 2.3 for d in delays[5:]), delays)
        self.reactor.advance(2.5)
        server = self.server().accept()
        d = self.decide("k")
        server.reply(ALLOWED)
        self.assertTrue(self.successResultOf(d).allowed)

    def test_lost_connection(self) -> None:
        server = self.connected()
        in_flight = self.decide("k")
        server.drop()
        self.failureResultOf(in_flight, StorageError)
        self.assertFalse(self.store.connected)
        self.failureResultOf(self.decide("k"), StorageError)
        self.reactor.advance(0.2)
        server = self.server().accept()
        d = self.decide("k")
        server.reply(ALLOWED)
        self.assertTrue(self.successResultOf(d).allowed)

    def test_outage_logged_once_and_recovery_once(self) -> None:
        server = self.connected()
        server.drop()
        for _ in range(100):
            self.failureResultOf(self.decide("k"), StorageError)
        for _ in range(20):  # failed reconnection attempts are part of the same outage
            self.reactor.advance(2.5)
            self.server().refuse()
        self.assertEqual(len(self.outage_logs()), 1)
        self.reactor.advance(2.5)
        server = self.server().accept()
        d = self.decide("k")
        server.reply(ALLOWED)
        self.successResultOf(d)
        logs = self.outage_logs()
        self.assertEqual([level for level, _ in logs], [LogLevel.warn, LogLevel.info])
        warned, recovered = (e for e in self.events if e.get("log_namespace", "").endswith("RedisStore"))
        self.assertEqual((warned["url"], warned["reason"]), ("redis://127.0.0.1:6390", "connection lost"))
        self.assertEqual(recovered["failures"], 100)
        self.assertTrue(50 <= recovered["seconds"] <= 55, recovered["seconds"])
        # The next outage is logged again.
        server.drop()
        self.assertEqual(len(self.outage_logs()), 3)

    def test_timeouts_are_one_outage_too(self) -> None:
        server = self.connected()
        for _ in range(10):
            self.decide("k")
            self.reactor.advance(0.05)
        self.assertEqual(len(self.outage_logs()), 1)
        server.reply(LIMITED * 10)
        d = self.decide("k")
        server.reply(ALLOWED)
        self.successResultOf(d)
        self.assertEqual(len(self.outage_logs()), 2)

    def test_frozen_server_is_disconnected(self) -> None:
        server = self.connected()
        for _ in range(19):  # 0.95 s without an answer: maybe just slow
            self.decide("k")
            self.reactor.advance(0.05)
        self.assertTrue(self.store.connected)
        for _ in range(2):  # past 1 s (and 10 timeouts): frozen
            self.decide("k")
            self.reactor.advance(0.05)
        assert server.transport is not None
        self.assertFalse(self.store.connected)
        self.assertTrue(server.transport.disconnected)

    def test_stop(self) -> None:
        server = self.connected()
        in_flight = self.decide("k")
        stopped = self.store.stop()
        self.successResultOf(stopped)
        self.failureResultOf(in_flight, StorageError)
        self.failureResultOf(self.decide("k"), StorageError)
        assert server.transport is not None
        self.assertFalse(server.transport.connected)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.outage_logs(), [])

    def test_stop_while_reconnecting(self) -> None:
        self.server().refuse()
        self.assertNotEqual(self.reactor.getDelayedCalls(), [])
        self.successResultOf(self.store.stop())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stop_while_connecting(self) -> None:
        self.successResultOf(self.store.stop())
        self.assertTrue(self.server().connector.stoppedConnecting)


class HandshakeTests(SynchronousTestCase):
    def test_auth_and_select(self) -> None:
        reactor = MemoryReactorClock()
        store = RedisStore("redis://:s3cret@127.0.0.1:6390/2", reactor)
        reactor.run()
        server = FakeRedis(reactor, -1).accept()
        self.assertEqual(server.commands(), [["AUTH", "s3cret"]])
        server.reply(b"+OK\r\n")
        self.assertEqual(server.commands(), [["SELECT", "2"]])
        self.assertFalse(store.connected)
        d = store.decide(BUCKET, "k", 0.05)
        server.reply(b"+OK\r\n")
        self.assertTrue(store.connected)
        self.assertEqual(server.commands()[0][0], "EVALSHA")
        server.reply(ALLOWED)
        self.successResultOf(d)
        store.stop()

    def test_wrong_password_is_retried(self) -> None:
        reactor = MemoryReactorClock()
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        store = RedisStore("redis://:wrong@127.0.0.1:6390", reactor)
        reactor.run()
        server = FakeRedis(reactor, -1).accept()
        d = store.decide(BUCKET, "k", 0.05)
        server.reply(b"-WRONGPASS invalid username-password pair\r\n")
        self.failureResultOf(d, StorageError)
        self.assertFalse(store.connected)
        reactor.advance(0.2)
        self.assertEqual(len(reactor.tcpClients), 2)
        warnings = [e for e in observer if e.get("log_namespace", "").endswith("RedisStore")]
        self.assertEqual(len(warnings), 1)
        self.assertIn("WRONGPASS", warnings[0]["reason"])
        store.stop()
        self.assertEqual(reactor.getDelayedCalls(), [])


class AddressTests(SynchronousTestCase):
    def test_forms(self) -> None:
        cases: dict[str, tuple[Any, ...]] = {
            "redis://127.0.0.1:6379/0": ("redis", "127.0.0.1", 6379, 0, None, None),
            "redis://cache.internal": ("redis", "cache.internal", 6379, None, None, None),
            "redis://user:p%40ss@cache:6380/3": ("redis", "cache", 6380, 3, "user", "p@ss"),
            "rediss://:token@cache/1": ("rediss", "cache", 6379, 1, None, "token"),
            "unix:///run/redis.sock?db=4": ("unix", "", 0, 4, None, None),
        }
        for url, expected in cases.items():
            with self.subTest(url=url):
                a = RedisAddress(url)
                self.assertEqual((a.scheme, a.host, a.port, a.db, a.username, a.password), expected)

    def test_display_hides_the_password(self) -> None:
        self.assertEqual(RedisAddress("redis://user:secret@cache:6380/3").display, "redis://user@cache:6380/3")
        self.assertEqual(RedisAddress("redis://:secret@cache/0").display, "redis://cache/0")
        self.assertEqual(RedisAddress("redis://cache/0?password=secret").display, "redis://cache/0")

    def test_not_redis(self) -> None:
        self.assertRaises(ValueError, RedisAddress, "http://cache")

    def test_scripts_are_constants(self) -> None:
        self.assertIn("TIME", TOKEN_BUCKET_LUA)
        self.assertIn("TIME", SLIDING_WINDOW_LUA)
