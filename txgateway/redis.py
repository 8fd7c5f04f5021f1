"""One reconnecting connection to a Redis server, shared by the Redis stores.

The rate limiter and the response cache both need the same things from
Redis: a connection that comes back by itself (backoff with jitter, AUTH and
SELECT from the URL), commands that never wait on a dead or frozen server,
and an outage logged once when it starts and once when it ends, never per
request.  :class:`RedisLink` is that; each store keeps only what is its own
(the Lua scripts and decisions, the cache entries) and logs through its own
logger, under its own label.
"""

from __future__ import annotations

import ipaddress
import math
import random
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import txredisapi
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from txgateway.resp import ProtocolError, ReplyReader
from txgateway.wire import write_soon

#: Reconnection backoff: first delay, growth, ceiling (seconds), jitter fraction.
RETRY_INITIAL = 0.1
RETRY_FACTOR = 2.0
RETRY_MAX = 2.0
RETRY_JITTER = 0.1
CONNECT_TIMEOUT = 2.0


class RedisAddress:
    """Where and how to connect, parsed from ``redis://[[user]:password@]host[:port][/db]``.

    Also ``rediss://`` (TLS) and ``unix:///path/to/redis.sock?db=N``.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.scheme = parts.scheme
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password is not None else None
        self.db: int | None = None
        query = parse_qs(parts.query)
        if self.scheme == "unix":
            self.host = ""
            self.port = 0
            self.path = parts.path
            if query.get("db"):
                self.db = int(query["db"][0])
        elif self.scheme in ("redis", "rediss"):
            self.host = parts.hostname or "127.0.0.1"
            self.port = parts.port or 6379
            self.path = ""
            database = parts.path.strip("/")
            if database:
                self.db = int(database)
            elif query.get("db"):
                self.db = int(query["db"][0])
        else:
            raise ValueError(f"not a Redis URL: {url!r} (expected redis://, rediss:// or unix://)")
        #: The URL without its password, for logs.
        netloc = parts.hostname or ""
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
        if parts.username:
            netloc = f"{parts.username}@{netloc}"
        # No query in logs: redis URLs may carry options such as ?password=.
        self.display = urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def endpoint(self, reactor: Any, timeout: float = CONNECT_TIMEOUT) -> IStreamClientEndpoint:
        if self.scheme == "unix":
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        endpoint: IStreamClientEndpoint
        try:
            version = ipaddress.ip_address(self.host).version
        except ValueError:
            endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)
        else:
            kind = TCP4ClientEndpoint if version == 4 else TCP6ClientEndpoint
            endpoint = kind(reactor, self.host, self.port, timeout=timeout)
        if self.scheme == "rediss":
            from twisted.internet.ssl import optionsForClientTLS

            endpoint = wrapClientTLS(optionsForClientTLS(self.host), endpoint)
        return endpoint


def bulk_strings(
    args: Iterable[object],
    charset: str = "utf-8",
    errors: str = "strict",
    other: Callable[[object], bytes] | None = None,
) -> bytes:
    """``args`` as RESP bulk strings, without the array header: bytes as they
    are, str in ``charset``, int in decimal (not bool: txredisapi sends True
    as "True"); anything else through ``other`` (txredisapi's encoding)."""
    parts = []
    for arg in args:
        kind = type(arg)
        data: bytes
        if kind is bytes:
            data = cast(bytes, arg)
        elif kind is int:
            data = b"%d" % cast(int, arg)
        elif kind is str:
            data = cast(str, arg).encode(charset, errors)
        elif other is not None:
            data = other(arg)
        else:
            raise TypeError(f"cannot send {kind.__name__} to Redis")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def encode_command(*args: object) -> bytes:
    """The RESP array of ``args`` (see :func:`bulk_strings`; str in UTF-8)."""
    return b"*%d\r\n" % len(args) + bulk_strings(args)


class RedisCommand:
    """A command sent with :meth:`RedisLink.send` and watched by :meth:`RedisLink.watch`.

    Exactly one outcome runs, and only while ``done`` is false:
    :meth:`answered` with the reply (a value, or a ``txredisapi.ResponseError``
    for an error reply), :meth:`failed` when the connection went away before
    the reply, :meth:`timed_out` when the deadline passed first.  Subclasses
    fire ``result`` when they resolve, which makes ``done`` true.  This is
    the stores' hot path: the result is the one Deferred per command, with
    no queue or timer of its own (txredisapi's ``execute_command`` costs
    three Deferreds and, with the caller's timer, a ``callLater`` per
    command).
    """

    __slots__ = ("deadline", "result")

    deadline: float
    #: What the store hands its caller: fired by one of the outcomes below.
    result: Deferred[Any]

    @property
    def done(self) -> bool:
        return self.result.called

    def answered(self, reply: object) -> None:
        raise NotImplementedError

    def failed(self, reason: str) -> None:
        raise NotImplementedError

    def timed_out(self) -> None:
        raise NotImplementedError


class RedisConnection(txredisapi.BaseRedisProtocol):
    """txredisapi's protocol, telling its link when it goes away.

    Hot-path changes, same bytes and values as txredisapi: commands are
    encoded by :meth:`_build_command` below (one formatting pass instead of
    txredisapi's per-value encoding) and written with ``wire.write_soon``
    (the commands of one reactor turn go out in one send, without an epoll
    register/unregister per command); replies are read by
    :class:`txgateway.resp.ReplyReader` (one pass per read instead of a
    buffer copy per line and a reactor turn per bulk string).

    The stores' commands go out with :meth:`send` and their replies straight
    to their :class:`RedisCommand`; txredisapi's own (AUTH, SELECT, anything
    sent with ``execute_command``) still get theirs through its queue.  One
    list of receivers, in the order the commands went out, keeps the two in
    step (txredisapi's pipelining mode, which holds commands back, is never
    used).
    """

    link: RedisLink
    #: Commands sent and not yet answered, and since when nothing was answered.
    outstanding = 0
    quiet_since = 0.0

    _reader: ReplyReader | None = None
    #: Who gets each coming reply, in order: a RedisCommand, or None for txredisapi's queue.
    _receivers: deque[RedisCommand | None]

    def makeConnection(self, transport: Any) -> None:
        self._receivers = deque()
        super().makeConnection(_WritesSoon(transport))

    def send(self, command: RedisCommand, data: bytes) -> None:
        """Write one encoded command whose reply goes to ``command``; raises when the connection is gone."""
        if not self.connected:
            raise ConnectionError("Not connected")
        self.transport.write(data)
        self._receivers.append(command)
        self._sent()

    def execute_command(self, *args: object, **kwargs: object) -> Deferred[Any]:
        result: Deferred[Any] = super().execute_command(*args, **kwargs)
        self._receivers.append(None)
        self._sent()
        return result

    def _sent(self) -> None:
        if self.outstanding == 0:
            self.quiet_since = self.link.clock.seconds()
        self.outstanding += 1

    def dataReceived(self, data: bytes, unpause: bool = False) -> None:
        """Replies read by :class:`~txgateway.resp.ReplyReader`, handed to txredisapi's queue."""
        reader = self._reader
        if reader is None:
            reader = self._reader = ReplyReader(self.tryConvertData)
        try:
            replies = reader.feed(data)
        except ProtocolError as error:
            self.link.log.warn(
                "Redis at {url} sent an invalid reply ({error}); reconnecting",
                url=self.link.address.display,
                error=error,
            )
            self.transport.abortConnection()
            return
        if not replies:
            return
        self.outstanding = max(0, self.outstanding - len(replies))
        self.quiet_since = self.link.clock.seconds()
        receivers = self._receivers
        for reply in replies:
            receiver = receivers.popleft() if receivers else None
            if receiver is not None:
                if not receiver.done:
                    receiver.answered(reply)
                continue
            if reply is None or type(reply) is list:
                reply = self.handleTransactionData(reply)  # as txredisapi does for arrays
            elif reply == "QUEUED":
                self.transactions += 1
            self.replyReceived(reply)

    def _build_command(self, *args: object, **kwargs: object) -> bytes:
        """txredisapi's commands, encoded in one pass: the bytes txredisapi would send."""
        return b"*%d\r\n" % len(args) + bulk_strings(args, self.charset or "utf-8", self.errors, self._encode_value)

    def connectionLost(self, why: Failure) -> None:
        receivers, self._receivers = self._receivers, deque()
        super().connectionLost(why)
        for receiver in receivers:
            if receiver is not None and not receiver.done:
                receiver.failed("connection lost")
        self.link._lost(self)


class _WritesSoon:
    """The connection's transport as txredisapi sees it: writes go through write_soon."""

    __slots__ = ("_transport",)

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        write_soon(self._transport, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _ConnectionFactory(Factory):
    """Builds the protocol; txredisapi calls ``stopTrying``/``connectionError`` when AUTH or SELECT fail."""

    noisy = False
    #: txredisapi logs with the legacy logger when this is set; the link logs instead.
    isLazy = False

    def __init__(self, link: RedisLink, address: RedisAddress, binary: bool) -> None:
        self.link = link
        self.address = address
        self.binary = binary

    def buildProtocol(self, addr: object) -> RedisConnection:
        address = self.address
        options: dict[str, Any] = {"charset": None, "convertNumbers": False} if self.binary else {"charset": "utf-8"}
        protocol = RedisConnection(password=address.password, dbid=address.db, username=address.username, **options)
        protocol.factory = self
        protocol.link = self.link
        # txredisapi reaches for the global reactor; use the injected clock.
        protocol.callLater = self.link.clock.callLater
        return protocol

    def stopTrying(self) -> None:
        """AUTH or SELECT failed; the reason follows in ``connectionError``.  The link
        keeps retrying with backoff: the password may be fixed on the server side."""
        self.link._refused = True

    def connectionError(self, why: str) -> None:
        self.link._handshake_failed(why)


class RedisLink:
    """A connection to ``url`` that reconnects, with outage logging in the owner's words.

    ``on_ready(connection)`` runs each time a connection is ready (before the
    recovery is logged); ``on_down(reason)`` each time it is lost or cannot
    be made.  Connecting starts once the reactor runs.
    """

    def __init__(
        self,
        url: str,
        reactor: Any,
        clock: IReactorTime | None,
        *,
        log: Logger,
        label: str,
        consequence: str,
        failures_noun: str,
        binary: bool = False,
        on_ready: Callable[[RedisConnection], None] | None = None,
        on_down: Callable[[str], None] | None = None,
    ) -> None:
        self.address = RedisAddress(url)
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.log = log
        # The label is a constant of the owner, never request data.
        self._down_format = f"{label} {{url}} unavailable ({{reason}}); {consequence}"
        self._up_format = f"{label} {{url}} available again after {{seconds:.1f}} s ({{failures}} {failures_noun})"
        self._wedged_format = f"{label} {{url}}: no answer for {{seconds:.1f}} s, reconnecting"
        self._on_ready = on_ready
        self._on_down = on_down
        self._endpoint = self.address.endpoint(reactor)
        self._factory = _ConnectionFactory(self, self.address, binary)
        #: The connection commands go to; None while down.
        self.connection: RedisConnection | None = None
        #: A connection made but still in AUTH / SELECT.
        self._handshaking: RedisConnection | None = None
        #: AUTH / SELECT was refused; the reason is on its way (``_handshake_failed``).
        self._refused = False
        #: True after a failed attempt or a lost connection: commands fail at once.
        self.down = False
        self.stopped = False
        self._attempt: Deferred[Any] | None = None
        self._retry: IDelayedCall | None = None
        self._attempts_in_a_row = 0
        self._stopping: Deferred[None] | None = None
        #: Outage bookkeeping: when it started (None: no outage), failures since.
        self._outage_since: float | None = None
        self._outage_failures = 0
        #: Commands watched for their deadline (``watch``), oldest first, and the one timer.
        self._watched: deque[RedisCommand] = deque()
        self._timer: IDelayedCall | None = None
        #: The longest timeout watched: a connection silent for 10x it is wedged.
        self._longest_timeout = 0.0
        when_running = getattr(reactor, "callWhenRunning", None)
        if when_running is not None:
            when_running(self._connect)
        else:
            self._connect()

    # Commands.

    def send(self, connection: RedisConnection, command: RedisCommand, data: bytes) -> None:
        """Send ``data``, one command encoded by :func:`encode_command` (or made of
        parts encoded ahead), on ``connection``; the reply goes to ``command``.
        Raises when the connection just went away."""
        connection.send(command, data)

    def watch(self, command: RedisCommand, timeout: float) -> None:
        """Time ``command`` out (``timed_out()``) unless it is done within ``timeout`` seconds.

        One timer for all the commands in flight, at the earliest deadline and
        re-armed when it fires, rather than a ``callLater`` and a ``cancel``
        per command: commands are answered in order, so under load it fires
        about once per ``timeout``.
        """
        deadline = self.clock.seconds() + timeout
        command.deadline = deadline
        watched = self._watched
        while watched and watched[0].done:
            watched.popleft()
        watched.append(command)
        if timeout > self._longest_timeout:
            self._longest_timeout = timeout
        self._arm(deadline)

    def _arm(self, deadline: float) -> None:
        timer = self._timer
        if self.stopped:
            return
        if timer is None:
            self._timer = self.clock.callLater(max(0.0, deadline - self.clock.seconds()), self._expire)
        elif deadline < timer.getTime():
            timer.reset(max(0.0, deadline - self.clock.seconds()))

    def _expire(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        watched, self._watched = self._watched, deque()
        kept: deque[RedisCommand] = deque()
        expired = False
        earliest = math.inf
        for command in watched:
            if command.done:
                continue
            if command.deadline <= now:
                expired = True
                command.timed_out()  # may send or watch more: they go to the new list
            else:
                kept.append(command)
                earliest = min(earliest, command.deadline)
        if kept:
            kept.extend(self._watched)
            self._watched = kept
            self._arm(earliest)
        if expired:
            self._check_wedged()

    def _check_wedged(self) -> None:
        """Abort the connection when its commands went unanswered for ``max(1 s, 10 x`` the
        longest timeout): the server is frozen."""
        current = self.connection
        if current is None or current.outstanding == 0:
            return
        silent = self.clock.seconds() - current.quiet_since
        if silent >= max(1.0, 10 * self._longest_timeout):
            self.log.warn(self._wedged_format, url=self.address.display, seconds=silent)
            current.transport.abortConnection()

    # Outage logging: once when it starts, once when it ends.

    def failed(self, reason: str) -> None:
        """An operation could not be done."""
        self._outage_begins(reason)
        self._outage_failures += 1

    def succeeded(self) -> None:
        if self._outage_since is not None:
            self._recovered()

    def _outage_begins(self, reason: str) -> None:
        if self._outage_since is not None or self.stopped:
            return
        self._outage_since = self.clock.seconds()
        self._outage_failures = 0
        self.log.warn(self._down_format, url=self.address.display, reason=reason)

    def _recovered(self) -> None:
        if self._outage_since is None:
            return
        seconds = self.clock.seconds() - self._outage_since
        self._outage_since = None
        self.log.info(self._up_format, url=self.address.display, seconds=seconds, failures=self._outage_failures)

    # Connection life cycle.

    def _connect(self) -> None:
        self._retry = None
        if self.stopped:
            return
        attempt = self._attempt = self._endpoint.connect(self._factory)
        attempt.addCallbacks(self._transport_up, self._connect_failed)

    def _transport_up(self, connection: RedisConnection) -> None:
        self._attempt = None
        self._handshaking = connection
        # Fires once AUTH and SELECT (when configured) went through.
        connection.whenConnected().addCallback(self._ready)

    def _ready(self, connection: RedisConnection) -> None:
        if connection is not self._handshaking:
            return
        self._handshaking = None
        if self.stopped:
            connection.transport.loseConnection()
            return
        self.connection = connection
        self.down = False
        self._attempts_in_a_row = 0
        if self._on_ready is not None:
            self._on_ready(connection)
        self._recovered()

    def _connect_failed(self, failure: Failure) -> None:
        self._attempt = None
        if not self.stopped:
            self._went_down(f"cannot connect: {failure.getErrorMessage()}")

    def _lost(self, connection: RedisConnection) -> None:
        if connection is self.connection:
            self.connection = None
        elif connection is self._handshaking:
            self._handshaking = None
        else:
            return
        if self.stopped:
            if self._stopping is not None:
                stopping, self._stopping = self._stopping, None
                stopping.callback(None)
            return
        if not self._refused:
            self._went_down("connection lost")

    def _handshake_failed(self, why: str) -> None:
        self._refused = False
        if not self.stopped:
            self._went_down(why)

    def _went_down(self, reason: str) -> None:
        self.down = True
        self._outage_begins(reason)
        if self._on_down is not None:
            self._on_down(reason)
        if self._retry is None:
            delay = min(RETRY_MAX, RETRY_INITIAL * RETRY_FACTOR**self._attempts_in_a_row)
            self._attempts_in_a_row += 1
            delay *= 1.0 + random.uniform(-RETRY_JITTER, RETRY_JITTER)
            self._retry = self.clock.callLater(delay, self._connect)

    def stop(self) -> Deferred[None]:
        """Close the connection and stop reconnecting; fires once the socket is closed."""
        self.stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._attempt is not None:
            self._attempt.cancel()
            self._attempt = None
        connection = self.connection or self._handshaking
        if connection is None:
            return succeed(None)
        stopping = self._stopping = Deferred()
        connection.transport.loseConnection()
        return stopping
