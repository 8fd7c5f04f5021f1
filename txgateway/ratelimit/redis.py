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
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txgateway.ratelimit.decision import Algorithm, Decision, StorageError
from txgateway.redis import RedisAddress, RedisCommand, RedisConnection, RedisLink, bulk_strings, encode_command

__all__ = ["KEY_PREFIX", "SCRIPTS", "RedisAddress", "RedisStore", "Script"]

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
#: At most this many encoded EVALSHA prefixes (one per distinct policy; reloads can change them).
_EVALSHA_PARTS_MAX = 1024


class _Call(RedisCommand):
    """One decision in flight: sent (or waiting for the first connection), watched by the link."""

    __slots__ = ("arguments", "evaluated", "key", "script", "store")

    def __init__(self, store: RedisStore, script: Script, key: str, arguments: tuple[int, ...]) -> None:
        self.store = store
        self.script = script
        self.key = key
        self.arguments = arguments
        self.result: Deferred[Decision] = Deferred()
        #: Sent as EVAL (the script's source) after a NOSCRIPT.
        self.evaluated = False

    def send(self, connection: RedisConnection) -> None:
        store = self.store
        if self.evaluated:
            data = encode_command("EVAL", self.script.source, 1, self.key, *self.arguments)
        else:
            data = store._evalsha(self.script, self.arguments, self.key)
        try:
            store._link.send(connection, self, data)
        except Exception as error:  # noqa: BLE001 - the connection just went away
            self.failed(f"{type(error).__name__}: {error}")

    def answered(self, reply: object) -> None:
        if type(reply) is list and len(reply) == 4 and all(type(n) is int for n in reply):
            self.store._link.succeeded()
            self.result.callback(Decision(reply[0] == 1, reply[1], reply[2], reply[3]))
            return
        if isinstance(reply, txredisapi.ResponseError):
            message = str(reply)
            if message.startswith("NOSCRIPT") and not self.evaluated:
                # Redis restarted or its scripts were flushed: EVAL caches it again.
                connection = self.store._link.connection
                if connection is not None:
                    self.evaluated = True
                    self.send(connection)
                    return
            self.failed(message or repr(reply))
            return
        self.failed(f"unexpected reply {reply!r}")

    def failed(self, reason: str) -> None:
        if self.done:
            return
        self.store._link.failed(reason)
        self.result.errback(StorageError(reason))

    def timed_out(self) -> None:
        self.store._link.failed("no answer within the timeout")
        self.result.errback(StorageError("Redis did not answer in time"))


class RedisStore:
    """Decisions in Redis, shared by every gateway process pointed at it."""

    log = Logger()

    def __init__(self, url: str, reactor: Any, clock: IReactorTime | None = None) -> None:
        """``reactor`` connects (IReactorTCP/UNIX); ``clock`` times decisions and backoff.

        Connecting starts once the reactor runs.
        """
        #: Decisions waiting for the very first connection.
        self._waiting: list[_Call] = []
        #: EVALSHA of each (script, arguments), encoded up to the key and after it.
        self._evalsha_parts: dict[tuple[Script, tuple[int, ...]], tuple[bytes, bytes]] = {}
        self._link = RedisLink(
            url,
            reactor,
            clock,
            log=self.log,
            label="Rate-limit storage",
            consequence="routes apply on_storage_error until it recovers",
            failures_noun="decisions fell back",
            on_ready=self._ready,
            on_down=self._down,
        )
        self.address = self._link.address
        self._clock = self._link.clock

    @property
    def connected(self) -> bool:
        return self._link.connection is not None

    def decide(self, algorithm: Algorithm, key: str, timeout: float) -> Deferred[Decision]:
        """One script run for ``key``; fails with StorageError (within ``timeout``) when Redis cannot answer."""
        link = self._link
        connection = link.connection
        if connection is None and (link.down or link.stopped):
            link.failed("not connected")
            return fail(StorageError("Redis is not connected"))
        call = _Call(self, SCRIPTS[algorithm.name], KEY_PREFIX + key, algorithm.arguments)
        link.watch(call, timeout)
        if connection is None:
            self._waiting.append(call)
        else:
            call.send(connection)
        return call.result

    def _evalsha(self, script: Script, arguments: tuple[int, ...], key: str) -> bytes:
        """``EVALSHA sha 1 key *arguments``, encoded: only the key is new per decision."""
        parts = self._evalsha_parts.get((script, arguments))
        if parts is None:
            if len(self._evalsha_parts) >= _EVALSHA_PARTS_MAX:
                self._evalsha_parts.clear()  # limits changed by many reloads
            head = b"*%d\r\n" % (4 + len(arguments)) + bulk_strings(("EVALSHA", script.sha, 1))
            parts = self._evalsha_parts[(script, arguments)] = (head, bulk_strings(arguments))
        encoded = key.encode("utf-8")
        return b"%s$%d\r\n%s\r\n%s" % (parts[0], len(encoded), encoded, parts[1])

    def _ready(self, connection: RedisConnection) -> None:
        waiting, self._waiting = self._waiting, []
        for call in waiting:
            if not call.done:
                call.send(connection)

    def _down(self, reason: str) -> None:
        waiting, self._waiting = self._waiting, []
        for call in waiting:
            call.failed(reason)

    def stop(self) -> Deferred[None]:
        """Close the connection and stop reconnecting; fires once the socket is closed."""
        stopped = self._link.stop()
        waiting, self._waiting = self._waiting, []
        for call in waiting:
            call.failed("the Redis store is stopped")
        return stopped
