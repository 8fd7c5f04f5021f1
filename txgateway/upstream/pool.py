"""``HTTP11Client``: the gateway's HTTP/1.1 upstream client, with connection pools.

One pool per (host, port): idle keep-alive connections reused last-in
first-out, at most ``max_connections_per_host`` connections (idle and busy),
requests beyond that waiting first-in first-out.  Each request has one
response-head deadline that covers its wait in the queue.  A request without
a body that loses a reused connection before any response byte (the upstream
closed an idle connection just as the request went out) is sent once more on
a fresh connection.

The connections themselves are :class:`txgateway.upstream.http1.HTTP11Connection`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Any

from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.error import NotConnectingError
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txgateway.config.model import PoolConfig
from txgateway.errors import UpstreamConnectError, UpstreamTimeout
from txgateway.interfaces import IUpstreamClient
from txgateway.messages import Response, UpstreamRequest
from txgateway.upstream.http1 import HTTP11Connection

__all__ = ["HTTP11Client"]


class _HostPool:
    """The connections to one (host, port)."""

    __slots__ = ("address", "connections", "idle", "key", "waiters")

    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key
        self.address = f"{key[0]}:{key[1]}"
        #: Idle connections, most recently used last.
        self.idle: list[_PooledConnection] = []
        #: Connections counted against the cap: connecting, busy and idle.
        self.connections = 0
        #: Requests waiting for a connection, oldest first.
        self.waiters: deque[_Attempt] = deque()


class _PooledConnection(ClientFactory):
    """The pool's record of one connection, from connectTCP to connectionLost.

    It is the connection's factory and its listener.
    """

    noisy = False

    def __init__(self, client: HTTP11Client, host: _HostPool, attempt: _Attempt) -> None:
        self.client = client
        self.host = host
        #: The request this connection is being made for, until it is up.
        self.attempt: _Attempt | None = attempt
        #: The IConnector, to stop connecting.
        self.connector: Any = None
        self.connection: HTTP11Connection | None = None
        self.counted = True
        self.idle = False
        self.idleSince = 0.0
        #: The request on this connection whose response-head deadline the
        #: connection's timer keeps (see HTTP11Client._arm).
        self.watched: _Attempt | None = None
        #: The connection's one timer: the watched request's deadline while
        #: busy, the idle timeout while idle; re-armed lazily.
        self.timer: DelayedCall | None = None
        self.closedWaiters: list[Deferred[None]] | None = None

    # ClientFactory

    def startedConnecting(self, connector: Any) -> None:
        self.connector = connector

    def buildProtocol(self, addr: Any) -> HTTP11Connection:
        connection = self.connection = HTTP11Connection(self)
        return connection

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            self.client._connectFailed(self, attempt, reason)

    # ConnectionListener

    def connectionMade(self, connection: HTTP11Connection) -> None:
        attempt, self.attempt = self.attempt, None
        if attempt is None:
            connection.abort()  # the request gave up while we were connecting
        else:
            self.client._send(attempt, self, False)

    def connectionIdle(self, connection: HTTP11Connection) -> None:
        self.client._connectionIdle(self)

    def connectionClosed(self, connection: HTTP11Connection) -> None:
        self.client._connectionClosed(self)

    def whenClosed(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.closedWaiters is None:
            self.closedWaiters = []
        self.closedWaiters.append(d)
        return d


class _Attempt:
    """One call to :meth:`HTTP11Client.request`, until its response head."""

    __slots__ = ("client", "deadline", "deferred", "host", "queued", "record", "request", "retried", "timer")

    def __init__(self, client: HTTP11Client, host: _HostPool, request: UpstreamRequest) -> None:
        self.client = client
        self.host = host
        self.request = request
        self.deferred: Deferred[Response] | None = None
        #: When the response head is due; None until the request is queued or sent.
        self.deadline: float | None = None
        #: Its own timer, only while queued for a connection (and then kept
        #: until the head); on a connection, the connection's timer watches.
        self.timer: DelayedCall | None = None
        #: The connection being made for it, or carrying it.
        self.record: _PooledConnection | None = None
        self.queued = False
        self.retried = False

    def startTimer(self) -> None:
        """Queued: the deadline runs from now, on a timer of its own."""
        if self.timer is None:
            timeout = self.request.response_timeout
            self.deadline = self.client._reactor.seconds() + timeout
            self.timer = self.client._reactor.callLater(timeout, self.timedOut)

    def _leave_connection_timer(self) -> None:
        """The connection's timer no longer watches this request (it finds nothing to do when it fires)."""
        record = self.record
        if record is not None and record.watched is self:
            record.watched = None

    def _unwatch(self) -> None:
        """Stop the deadline: cancel our own timer, or leave the connection's."""
        self._leave_connection_timer()
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    # ResponseHandler

    def requestProgress(self) -> None:
        timer = self.timer
        if timer is not None:
            if timer.active():
                timer.reset(self.request.response_timeout)
        elif self.deadline is not None:
            # The connection's timer fires at the old deadline, sees this one, waits on.
            self.deadline = self.client._reactor.seconds() + self.request.response_timeout

    def responseReceived(self, response: Response) -> None:
        self._unwatch()
        self.record = None
        d, self.deferred = self.deferred, None
        if d is not None:
            d.callback(response)

    def requestFailed(self, reason: Failure, stale: bool) -> None:
        self._leave_connection_timer()  # a stale retry keeps its deadline on the next connection
        self.record = None
        if self.deferred is None:
            return
        body = self.request.body
        if stale and not self.retried and (body is None or body.length == 0):
            self.retried = True
            self.client.log.debug(
                "upstream {address} closed a reused connection; retrying on a fresh one",
                address=self.host.address,
            )
            if body is not None:
                # Already delivered to the lost connection: send it as "no body".
                self.request = replace(self.request, body=None)
            self.client._connect(self)
            return
        self.fail(reason)

    # Endings.

    def fail(self, reason: Failure) -> None:
        d, self.deferred = self.deferred, None
        self._unwatch()
        if d is not None:
            d.errback(reason)

    def timedOut(self) -> None:
        if self.deferred is None:
            return
        self.timer = None
        self._abandon()
        self.client.log.debug(
            "no response head from upstream {address} within {timeout}s",
            address=self.host.address,
            timeout=self.request.response_timeout,
        )
        self.fail(
            Failure(
                UpstreamTimeout(
                    f"upstream {self.host.address} sent no response within "
                    f"{self.request.response_timeout:g}s"
                )
            )
        )

    def cancel(self, d: Deferred[Response]) -> None:
        """The Deferred's canceller; Deferred itself then fails with CancelledError."""
        if self.deferred is None:
            return
        self.deferred = None
        self._unwatch()
        self._abandon()

    def _abandon(self) -> None:
        """Leave the queue, stop connecting or abort the connection, wherever we are."""
        record, self.record = self.record, None
        if self.queued:
            self.queued = False
            self.host.waiters.remove(self)
        elif record is not None:
            if record.attempt is self:
                self.client._stopConnecting(record)
            elif record.connection is not None:
                record.connection.abort()


@implementer(IUpstreamClient)
class HTTP11Client:
    """Sends requests to upstreams over pooled HTTP/1.1 connections.

    ``reactor`` provides ``IReactorTCP`` and ``IReactorTime``.
    """

    log = Logger()

    def __init__(self, reactor: Any, pool: PoolConfig) -> None:
        self._reactor = reactor
        self._maxConnections = max(1, pool.max_connections_per_host)
        self._idleTimeout = pool.idle_timeout
        self._hosts: dict[tuple[str, int], _HostPool] = {}
        self._closed = False

    def request(self, request: UpstreamRequest) -> Deferred[Response]:
        if self._closed:
            return fail(UpstreamConnectError("the upstream client is closed"))
        key = (request.host, request.port)
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _HostPool(key)
        attempt = _Attempt(self, host, request)
        d: Deferred[Response] = Deferred(attempt.cancel)
        attempt.deferred = d
        idle = host.idle
        if idle:
            record = idle.pop()
            record.idle = False
            self._send(attempt, record, True)
        elif host.connections < self._maxConnections:
            self._connect(attempt)
        else:
            attempt.queued = True
            host.waiters.append(attempt)
            attempt.startTimer()
        return d

    def close(self) -> Deferred[None]:
        """Refuse new requests and close idle connections; fires when they are closed.

        Requests in flight (and those already queued) carry on; their
        connections close instead of going back to the pool.
        """
        self._closed = True
        closing: list[Deferred[None]] = []
        for host in list(self._hosts.values()):
            idle, host.idle = host.idle, []
            for record in idle:
                record.idle = False
                closing.append(record.whenClosed())
                assert record.connection is not None
                record.connection.close()
        if not closing:
            return succeed(None)
        return gatherResults(closing).addCallback(lambda _: None)

    # Internals, called by _Attempt and _PooledConnection.

    def _connect(self, attempt: _Attempt) -> None:
        """Open a new connection for ``attempt`` (its slot is taken here)."""
        host = attempt.host
        host.connections += 1
        record = attempt.record = _PooledConnection(self, host, attempt)
        request = attempt.request
        connector = self._reactor.connectTCP(
            request.host, request.port, record, timeout=request.connect_timeout
        )
        if record.connector is None:
            record.connector = connector

    def _send(self, attempt: _Attempt, record: _PooledConnection, reused: bool) -> None:
        attempt.record = record
        if attempt.timer is None:
            # Not queued before: the deadline runs from now (a stale retry
            # keeps the first one), kept by the connection's timer.
            deadline = attempt.deadline
            if deadline is None:
                deadline = attempt.deadline = self._reactor.seconds() + attempt.request.response_timeout
            record.watched = attempt
            self._arm(record, deadline)
        assert record.connection is not None
        record.connection.request(attempt.request, attempt, reused)

    def _stopConnecting(self, record: _PooledConnection) -> None:
        record.attempt = None
        connector = record.connector
        if connector is not None:
            try:
                connector.stopConnecting()
            except NotConnectingError:
                pass
        self._uncount(record)

    def _connectFailed(self, record: _PooledConnection, attempt: _Attempt, reason: Failure) -> None:
        address = record.host.address
        why = reason.getErrorMessage()
        self.log.warn(
            "upstream connect failed {address}: {reason}", address=address, reason=why
        )
        attempt.record = None
        attempt.fail(Failure(UpstreamConnectError(f"could not connect to upstream {address}: {why}")))
        self._uncount(record)

    def _connectionIdle(self, record: _PooledConnection) -> None:
        host = record.host
        connection = record.connection
        assert connection is not None
        if host.waiters:
            attempt = host.waiters.popleft()
            attempt.queued = False
            self._send(attempt, record, True)
            return
        if self._closed:
            connection.close()
            return
        record.idle = True
        now = record.idleSince = self._reactor.seconds()
        host.idle.append(record)
        self._arm(record, now + self._idleTimeout)

    # Each connection has one timer for both of its deadlines: the response
    # head of the request it carries, and the idle timeout while it waits in
    # the pool.  The timer is not moved for each request: it is brought
    # forward only when a deadline is earlier than it, and when it fires it
    # acts if a deadline has passed and otherwise waits for the next one.  So
    # a request on a busy keep-alive connection costs no timer operation.

    def _arm(self, record: _PooledConnection, when: float) -> None:
        timer = record.timer
        if timer is None:
            record.timer = self._reactor.callLater(max(0.0, when - self._reactor.seconds()), self._check, record)
        elif timer.getTime() > when:
            timer.reset(max(0.0, when - self._reactor.seconds()))

    def _check(self, record: _PooledConnection) -> None:
        record.timer = None
        now = self._reactor.seconds()
        if record.idle:
            left = record.idleSince + self._idleTimeout - now
            if left > 0:
                record.timer = self._reactor.callLater(left, self._check, record)
            else:
                self._closeIdle(record)
            return
        attempt = record.watched
        if attempt is None or attempt.deadline is None:
            return  # between requests, or gone: the next one re-arms
        left = attempt.deadline - now
        if left > 0:
            record.timer = self._reactor.callLater(left, self._check, record)
            return
        record.watched = None
        attempt.timedOut()

    def _closeIdle(self, record: _PooledConnection) -> None:
        record.idle = False
        record.host.idle.remove(record)
        self.log.debug("closing idle upstream connection to {address}", address=record.host.address)
        assert record.connection is not None
        record.connection.close()

    def _connectionClosed(self, record: _PooledConnection) -> None:
        if record.idle:
            record.idle = False
            record.host.idle.remove(record)
        record.watched = None
        timer, record.timer = record.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        # The record, its connection and its connector refer to each other:
        # let reference counting free them, not the garbage collector.
        record.connection = record.connector = None
        self._uncount(record)
        waiters, record.closedWaiters = record.closedWaiters, None
        if waiters:
            for d in waiters:
                d.callback(None)

    def _uncount(self, record: _PooledConnection) -> None:
        """Free ``record``'s slot (once) and hand it to the oldest waiter."""
        if not record.counted:
            return
        record.counted = False
        host = record.host
        host.connections -= 1
        waiters = host.waiters
        while waiters and host.connections < self._maxConnections:
            attempt = waiters.popleft()
            attempt.queued = False
            self._connect(attempt)
        if not host.connections and self._hosts.get(host.key) is host:
            del self._hosts[host.key]

