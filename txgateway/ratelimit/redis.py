"""The shared store: every gateway process decides against one Redis.

Each decision is ONE Lua script run (``EVALSHA``; on ``NOSCRIPT`` after a
Redis restart or ``SCRIPT FLUSH``, ``EVAL`` of the source, which caches it
again), so read-refill-take-write is atomic and N gateways sharing a Redis
admit exactly the limit between them.  The scripts read the time with
Redis ``TIME``, not the gateway's clock: all gateways then agree on refill
and window boundaries whatever their clock skew, and the gateway sends only
the key and the policy's integers.  Keys carry a TTL that ends when their
state would be a fresh one (a full bucket, windows slid out of view), so
Redis holds only active keys.

The connection (txredisapi's protocol on a Twisted endpoint) is shared by
every route using the same URL and survives config reloads; it lives in
``Runtime.shared`` and ``stop()`` closes it.  It reconnects by itself with
exponential backoff (0.1 s doubling to 2 s, jittered).  Commands are
pipelined on the one connection: Redis runs scripts one at a time anyway.

Failure handling, all bounded by the decision's ``timeout`` (the route's
``redis.timeout``): a decision fails with :class:`StorageError` when the
connection is down (at once, no queueing: while Redis is away requests must
not wait for it), when Redis answers with an error, or when no answer came
in time.  Before the very first connection is up, decisions wait for it
within their timeout.  A connection where commands have gone unanswered
for ``max(1 s, 10 x timeout)`` is aborted and reconnected (a frozen
server).  An outage is logged once when it starts (warn) and once when it
ends (info) with how many decisions fell back, never per request.
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import txredisapi
from twisted.internet.defer import Deferred, fail, succeed
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

from txgateway.ratelimit.decision import Algorithm, Decision, StorageError

#: Every key the gateway writes starts with this.
KEY_PREFIX = "txgateway:rl:"

#: Token bucket.  KEYS[1]: the bucket (hash tokens, stamp in ms).
#: ARGV: requests_per_minute, burst_size.
#: Returns {allowed, remaining, reset s, retry-after s}.
TOKEN_BUCKET_LUA = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local rate = tonumber(ARGV[1]) / 60000.0
local capacity = tonumber(ARGV[2])
local eps = 1e-9
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1])
local stamp = tonumber(state[2])
if tokens == nil or stamp == nil then
  tokens = capacity
  stamp = now
end
if now > stamp then
  tokens = math.min(capacity, tokens + (now - stamp) * rate)
  stamp = now
end
if tokens >= 1 - eps then
  tokens = math.max(0, tokens - 1)
  local full = (capacity - tokens) / rate
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'stamp', string.format('%.17g', stamp))
  redis.call('PEXPIRE', KEYS[1], math.ceil(full) + 1000)
  return {1, math.floor(tokens + eps), math.ceil(full / 1000 - eps), 0}
end
local full = (capacity - tokens) / rate
local retry = math.ceil((1 - tokens) / rate / 1000 - eps)
return {0, 0, math.ceil(full / 1000 - eps), math.max(1, retry)}
"""

#: Sliding window (weighted two-window counter).  KEYS[1]: the key's windows
#: (hash window index, previous count, current count).  ARGV: limit, window ms.
#: Returns {allowed, remaining, reset s, retry-after s}.
SLIDING_WINDOW_LUA = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local eps = 1e-9
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
local index = math.floor(now / window)
local state = redis.call('HMGET', KEYS[1], 'window', 'previous', 'current')
local start = tonumber(state[1])
local previous = tonumber(state[2]) or 0
local current = tonumber(state[3]) or 0
if start == nil then
  start = index
  previous = 0
  current = 0
elseif index > start then
  if index == start + 1 then previous = current else previous = 0 end
  current = 0
  start = index
end
local elapsed = math.max(0, now - start * window)
local estimate = previous * (1 - elapsed / window) + current
local allowed = estimate + 1 <= limit + eps
if allowed then
  current = current + 1
  estimate = estimate + 1
  redis.call('HSET', KEYS[1], 'window', string.format('%d', start), 'previous', string.format('%d', previous),
             'current', string.format('%d', current))
  redis.call('PEXPIRE', KEYS[1], math.ceil(2 * window - elapsed) + 1000)
end
local until_idle = 0
if current > 0 then
  until_idle = 2 * window - elapsed
elseif previous > 0 then
  until_idle = window - elapsed
end
local reset = math.ceil(until_idle / 1000 - eps)
if allowed then
  return {1, math.max(0, math.floor(limit - estimate + eps)), reset, 0}
end
local room = limit - 1
local wait
if previous > 0 and current <= room then
  wait = window * (1 - (room - current) / previous) - elapsed
else
  wait = (window - elapsed) + window * (1 - room / current)
end
return {0, 0, reset, math.max(1, math.ceil(wait / 1000 - eps))}
"""


class Script:
    """A Lua script and its SHA1, as EVALSHA wants it."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()


SCRIPTS = {"token_bucket": Script(TOKEN_BUCKET_LUA), "sliding_window": Script(SLIDING_WINDOW_LUA)}

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
        self.display = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))

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


class _Connection(txredisapi.BaseRedisProtocol):
    """txredisapi's protocol, telling the store when it goes away."""

    store: RedisStore
    #: Commands sent and not yet answered, and since when nothing was answered.
    outstanding = 0
    quiet_since = 0.0

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.store._lost(self, why)


class _ConnectionFactory(Factory):
    """Builds the protocol; txredisapi calls ``stopTrying``/``connectionError`` when AUTH or SELECT fail."""

    noisy = False
    #: txredisapi logs with the legacy logger when this is set; the store logs instead.
    isLazy = False

    def __init__(self, store: RedisStore, address: RedisAddress) -> None:
        self.store = store
        self.address = address

    def buildProtocol(self, addr: object) -> _Connection:
        address = self.address
        protocol = _Connection(charset="utf-8", password=address.password, dbid=address.db, username=address.username)
        protocol.factory = self
        protocol.store = self.store
        # txredisapi reaches for the global reactor; use the injected clock.
        protocol.callLater = self.store._clock.callLater
        return protocol

    def stopTrying(self) -> None:
        """AUTH or SELECT failed; the reason follows in ``connectionError``.  The store
        keeps retrying with backoff: the password may be fixed on the server side."""
        self.store._handshake_refused = True

    def connectionError(self, why: str) -> None:
        self.store._handshake_failed(why)


class _Call:
    """One decision in flight: sent (or waiting for the first connection), timer running."""

    __slots__ = ("arguments", "key", "result", "script", "store", "timer")

    def __init__(self, store: RedisStore, script: Script, key: str, arguments: tuple[int, ...], timeout: float) -> None:
        self.store = store
        self.script = script
        self.key = key
        self.arguments = arguments
        self.result: Deferred[Decision] = Deferred()
        self.timer: IDelayedCall = store._clock.callLater(timeout, self.time_out)

    @property
    def done(self) -> bool:
        return self.result.called

    def send(self, connection: _Connection, command: str = "EVALSHA") -> None:
        body = self.script.sha if command == "EVALSHA" else self.script.source
        try:
            sent = connection.execute_command(command, body, 1, self.key, *self.arguments)
        except Exception as error:  # noqa: BLE001 - txredisapi raises when the connection just went away
            self.fail(f"{type(error).__name__}: {error}")
            return
        if connection.outstanding == 0:
            connection.quiet_since = self.store._clock.seconds()
        connection.outstanding += 1
        sent.addCallbacks(self.answered, self.refused, callbackArgs=(connection,), errbackArgs=(connection, command))

    def answered(self, reply: object, connection: _Connection) -> None:
        store = self.store
        store._answered(connection)
        if self.done:
            return
        if not (isinstance(reply, list) and len(reply) == 4 and all(isinstance(n, int) for n in reply)):
            self.fail(f"unexpected reply {reply!r}")
            return
        decision = Decision(reply[0] == 1, reply[1], reply[2], reply[3])
        self.timer.cancel()
        store._succeeded()
        self.result.callback(decision)

    def refused(self, failure: Failure, connection: _Connection, command: str) -> None:
        self.store._answered(connection)
        if self.done:
            return
        if command == "EVALSHA" and _no_script(failure) and connection.connected:
            self.send(connection, "EVAL")
            return
        self.fail(failure.getErrorMessage() or repr(failure.value))

    def fail(self, reason: str) -> None:
        if self.done:
            return
        if self.timer.active():
            self.timer.cancel()
        self.store._failed(reason)
        self.result.errback(StorageError(reason))

    def time_out(self) -> None:
        if self.done:
            return
        self.store._failed("no answer within the timeout")
        self.result.errback(StorageError("Redis did not answer in time"))
        self.store._check_wedged()


def _no_script(failure: Failure) -> bool:
    if failure.check(txredisapi.ScriptDoesNotExist):
        return True
    return bool(failure.check(txredisapi.ResponseError)) and str(failure.value).startswith("NOSCRIPT")


class RedisStore:
    """Decisions in Redis, shared by every gateway process pointed at it."""

    log = Logger()

    def __init__(self, url: str, reactor: Any, clock: IReactorTime | None = None) -> None:
        """``reactor`` connects (IReactorTCP/UNIX); ``clock`` times decisions and backoff.

        Connecting starts once the reactor runs.
        """
        self.address = RedisAddress(url)
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._endpoint = self.address.endpoint(reactor)
        self._factory = _ConnectionFactory(self, self.address)
        #: The connection decisions go to; None while down.
        self._connection: _Connection | None = None
        #: A connection made but still in AUTH / SELECT.
        self._handshaking: _Connection | None = None
        #: AUTH / SELECT was refused; the reason is on its way (``_handshake_failed``).
        self._handshake_refused = False
        #: True after a failed attempt or a lost connection: decide fails at once.
        self._down = False
        self._stopped = False
        self._attempt: Deferred[Any] | None = None
        self._retry: IDelayedCall | None = None
        self._attempts_in_a_row = 0
        #: Decisions waiting for the very first connection.
        self._waiting: list[_Call] = []
        self._stopping: Deferred[None] | None = None
        #: The largest decision timeout asked for: a connection silent for 10x it is wedged.
        self._longest_timeout = 0.0
        #: Outage bookkeeping: when it started (None: no outage), decisions failed since.
        self._outage_since: float | None = None
        self._outage_failures = 0
        when_running = getattr(reactor, "callWhenRunning", None)
        if when_running is not None:
            when_running(self._connect)
        else:
            self._connect()

    @property
    def connected(self) -> bool:
        return self._connection is not None

    def decide(self, algorithm: Algorithm, key: str, timeout: float) -> Deferred[Decision]:
        """One script run for ``key``; fails with StorageError (within ``timeout``) when Redis cannot answer."""
        connection = self._connection
        if connection is None and (self._down or self._stopped):
            self._failed("not connected")
            return fail(StorageError("Redis is not connected"))
        if timeout > self._longest_timeout:
            self._longest_timeout = timeout
        call = _Call(self, SCRIPTS[algorithm.name], KEY_PREFIX + key, algorithm.arguments, timeout)
        if connection is None:
            self._waiting.append(call)
        else:
            call.send(connection)
        return call.result

    # Connection life cycle.

    def _connect(self) -> None:
        self._retry = None
        if self._stopped:
            return
        attempt = self._attempt = self._endpoint.connect(self._factory)
        attempt.addCallbacks(self._transport_up, self._connect_failed)

    def _transport_up(self, connection: _Connection) -> None:
        self._attempt = None
        self._handshaking = connection
        # Fires once AUTH and SELECT (when configured) went through.
        connection.whenConnected().addCallback(self._ready)

    def _ready(self, connection: _Connection) -> None:
        if connection is not self._handshaking:
            return
        self._handshaking = None
        if self._stopped:
            connection.transport.loseConnection()
            return
        self._connection = connection
        self._down = False
        self._attempts_in_a_row = 0
        waiting, self._waiting = self._waiting, []
        for call in waiting:
            if not call.done:
                call.send(connection)
        self._recovered()

    def _connect_failed(self, failure: Failure) -> None:
        self._attempt = None
        if self._stopped:
            return
        self._went_down(f"cannot connect: {failure.getErrorMessage()}")

    def _lost(self, connection: _Connection, why: Failure) -> None:
        if connection is self._connection:
            self._connection = None
        elif connection is self._handshaking:
            self._handshaking = None
        else:
            return
        if self._stopped:
            if self._stopping is not None:
                stopping, self._stopping = self._stopping, None
                stopping.callback(None)
            return
        if not self._handshake_refused:
            self._went_down("connection lost")

    def _handshake_failed(self, why: str) -> None:
        self._handshake_refused = False
        if not self._stopped:
            self._went_down(why)

    def _went_down(self, reason: str) -> None:
        self._down = True
        self._outage_begins(reason)
        waiting, self._waiting = self._waiting, []
        for call in waiting:
            call.fail(reason)
        if self._retry is None:
            delay = min(RETRY_MAX, RETRY_INITIAL * RETRY_FACTOR**self._attempts_in_a_row)
            self._attempts_in_a_row += 1
            delay *= 1.0 + random.uniform(-RETRY_JITTER, RETRY_JITTER)
            self._retry = self._clock.callLater(delay, self._connect)

    def _answered(self, connection: _Connection) -> None:
        if connection.outstanding > 0:
            connection.outstanding -= 1
        connection.quiet_since = self._clock.seconds()

    def _check_wedged(self) -> None:
        """Abort a connection whose commands have gone unanswered for long: the server is frozen."""
        connection = self._connection
        if connection is None or connection.outstanding == 0:
            return
        silent = self._clock.seconds() - connection.quiet_since
        if silent >= max(1.0, 10 * self._longest_timeout):
            self.log.warn(
                "Rate-limit storage {url}: no answer for {seconds:.1f} s, reconnecting",
                url=self.address.display,
                seconds=silent,
            )
            connection.transport.abortConnection()

    # Outage logging: once when it starts, once when it ends.

    def _outage_begins(self, reason: str) -> None:
        if self._outage_since is not None or self._stopped:
            return
        self._outage_since = self._clock.seconds()
        self._outage_failures = 0
        self.log.warn(
            "Rate-limit storage {url} unavailable ({reason}); routes apply on_storage_error until it recovers",
            url=self.address.display,
            reason=reason,
        )

    def _failed(self, reason: str) -> None:
        """A decision could not be made."""
        self._outage_begins(reason)
        self._outage_failures += 1

    def _succeeded(self) -> None:
        if self._outage_since is not None:
            self._recovered()

    def _recovered(self) -> None:
        if self._outage_since is None:
            return
        seconds = self._clock.seconds() - self._outage_since
        self._outage_since = None
        self.log.info(
            "Rate-limit storage {url} available again after {seconds:.1f} s ({failures} decisions fell back)",
            url=self.address.display,
            seconds=seconds,
            failures=self._outage_failures,
        )

    def stop(self) -> Deferred[None]:
        """Close the connection and stop reconnecting; fires once the socket is closed."""
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
            self._attempt = None
        waiting, self._waiting = self._waiting, []
        for call in waiting:
            call.fail("the Redis store is stopped")
        connection = self._connection or self._handshaking
        if connection is None:
            return succeed(None)
        stopping = self._stopping = Deferred()
        connection.transport.loseConnection()
        return stopping
