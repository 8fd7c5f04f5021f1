"""The shared store: every gateway process caches in one Redis.

Same semantics as the memory store, with Redis keeping the bytes: an entry
is one value (status, headers, timestamps, Vary record, body) written with
``SET key value PX ttl``, so Redis drops it when it goes stale; a response
with ``Vary`` writes a small index value under the primary key naming the
headers, and the variant under the primary key plus a digest of the
request's values for them.  A lookup is one ``GET`` (two with Vary).
``max_object_bytes`` applies as in memory; ``max_bytes`` does not (size
Redis with ``maxmemory`` and an LRU ``maxmemory-policy`` instead).  Entry
timestamps are the storing gateway's clock, so gateways sharing a Redis
need synchronized clocks for exact ``Age`` values.

Redis never breaks a request: when it is down, slow (no answer within
``redis.timeout``) or answers nonsense, a lookup is a miss and a store is
dropped.  An outage is logged once when it starts (warn) and once when it
ends (info) with how many operations failed meanwhile.  The connection
(txredisapi's protocol, binary-safe) reconnects by itself with jittered
exponential backoff; a connection whose commands have gone unanswered for
``max(1 s, 10 x timeout)`` is aborted and made again.  The store lives in
``Runtime.shared`` (one per URL) and ``stop()`` closes it.

The connection handling mirrors the rate limiter's Redis store and reuses
its URL parsing (:class:`~txgateway.ratelimit.redis.RedisAddress`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from typing import Any

import txredisapi
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from txgateway.cache.entry import Entry, Headers, PrimaryKey
from txgateway.cache.policy import vary_values
from txgateway.ratelimit.redis import RETRY_FACTOR, RETRY_INITIAL, RETRY_JITTER, RETRY_MAX, RedisAddress

#: Every key the cache writes starts with this.
KEY_PREFIX = b"txgateway:cache:"
#: Stored values start with this (format version 1) and a kind byte.
MAGIC = b"txc1"
_ENTRY = MAGIC + b"E"
_INDEX = MAGIC + b"V"


def redis_key(key: PrimaryKey) -> bytes:
    """The Redis key of a primary key; JSON keeps the parts unambiguous whatever the Host says."""
    tag, scheme, host, path, query = key
    parts = [tag, scheme.decode("latin-1"), host, path, query.decode("latin-1")]
    return KEY_PREFIX + json.dumps(parts, separators=(",", ":")).encode("ascii")


def variant_key(primary: bytes, variant: tuple[bytes | None, ...]) -> bytes:
    values = json.dumps([None if v is None else v.decode("latin-1") for v in variant]).encode("ascii")
    return primary + b"#" + hashlib.sha256(values).hexdigest()[:32].encode("ascii")


def encode_entry(entry: Entry) -> bytes:
    meta = [
        entry.status,
        [[n.decode("latin-1"), v.decode("latin-1")] for n, v in entry.headers],
        entry.born,
        entry.expires,
        [n.decode("latin-1") for n in entry.vary],
        [None if v is None else v.decode("latin-1") for v in entry.variant],
    ]
    encoded = json.dumps(meta, separators=(",", ":")).encode("ascii")
    return _ENTRY + len(encoded).to_bytes(4, "big") + encoded + entry.body


def decode_entry(blob: bytes) -> Entry | None:
    """The entry in a stored value, None for anything else (an index, damage, another format)."""
    if not blob.startswith(_ENTRY) or len(blob) < 9:
        return None
    size = int.from_bytes(blob[5:9], "big")
    try:
        status, headers, born, expires, vary, variant = json.loads(blob[9 : 9 + size])
        return Entry(
            int(status),
            [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers],
            blob[9 + size :],
            float(born),
            float(expires),
            tuple(n.encode("latin-1") for n in vary),
            tuple(None if v is None else v.encode("latin-1") for v in variant),
        )
    except (ValueError, TypeError, AttributeError, UnicodeError):
        return None


def encode_index(names: tuple[bytes, ...]) -> bytes:
    return _INDEX + json.dumps([n.decode("latin-1") for n in names]).encode("ascii")


def decode_index(blob: bytes) -> tuple[bytes, ...] | None:
    if not blob.startswith(_INDEX):
        return None
    try:
        names = json.loads(blob[len(_INDEX) :])
        return tuple(n.encode("latin-1") for n in names) or None
    except (ValueError, TypeError, AttributeError, UnicodeError):
        return None


class StorageUnavailable(Exception):
    """Redis could not answer a command (down, slow, refused)."""


class _Connection(txredisapi.BaseRedisProtocol):
    """txredisapi's protocol (bytes in, bytes out), telling the store when it goes away."""

    store: RedisStore
    outstanding = 0
    quiet_since = 0.0

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.store._lost(self)


class _ConnectionFactory(Factory):
    noisy = False
    #: txredisapi logs with the legacy logger when this is set; the store logs instead.
    isLazy = False

    def __init__(self, store: RedisStore, address: RedisAddress) -> None:
        self.store = store
        self.address = address

    def buildProtocol(self, addr: object) -> _Connection:
        address = self.address
        protocol = _Connection(
            charset=None, convertNumbers=False, password=address.password, dbid=address.db, username=address.username
        )
        protocol.factory = self
        protocol.store = self.store
        protocol.callLater = self.store._clock.callLater
        return protocol

    def stopTrying(self) -> None:
        """AUTH or SELECT failed; the reason follows in ``connectionError``; retrying goes on."""
        self.store._refused = True

    def connectionError(self, why: str) -> None:
        self.store._handshake_failed(why)


class RedisStore:
    """Entries in Redis, shared by every gateway process pointed at it."""

    log = Logger()

    def __init__(self, url: str, reactor: Any, clock: IReactorTime | None = None, timeout: float = 0.05) -> None:
        """``reactor`` connects; ``clock`` times commands and backoff; connecting
        starts once the reactor runs."""
        self.address = RedisAddress(url)
        #: Seconds a command may take before it counts as failed.
        self.timeout = timeout
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._endpoint = self.address.endpoint(reactor)
        self._factory = _ConnectionFactory(self, self.address)
        self._connection: _Connection | None = None
        self._handshaking: _Connection | None = None
        self._refused = False
        #: A connection attempt failed or the connection was lost: failures are an outage.
        self._down = False
        self._stopped = False
        self._attempt: Deferred[Any] | None = None
        self._retry: IDelayedCall | None = None
        self._attempts_in_a_row = 0
        self._stopping: Deferred[None] | None = None
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

    # The store.

    def lookup(self, key: PrimaryKey, headers: Headers, now: float) -> Deferred[Entry | None]:
        """The fresh entry for the request, None on a miss or when Redis cannot say."""
        primary = redis_key(key)
        found: Deferred[Any] = self._command("GET", primary)
        found.addCallback(self._found, primary, headers, now)
        found.addErrback(self._missed)
        return found

    def _found(self, blob: object, primary: bytes, headers: Headers, now: float) -> Entry | Deferred[Any] | None:
        if not isinstance(blob, bytes):
            return None
        names = decode_index(blob)
        if names is None:
            entry = decode_entry(blob)
            return entry if entry is not None and not entry.vary and now < entry.expires else None
        variant = vary_values(names, headers)

        def fresh_variant(blob: object) -> Entry | None:
            entry = decode_entry(blob) if isinstance(blob, bytes) else None
            if entry is None or entry.vary != names or entry.variant != variant or now >= entry.expires:
                return None
            return entry

        return self._command("GET", variant_key(primary, variant)).addCallback(fresh_variant)

    def _missed(self, failure: Failure) -> Failure | None:
        if failure.check(CancelledError):
            return failure  # the client went away: no miss to serve
        if not failure.check(StorageUnavailable):
            self.log.failure("cache operation in Redis failed", failure)
        return None

    def store(self, key: PrimaryKey, entry: Entry, now: float) -> None:
        ttl = math.ceil((entry.expires - now) * 1000)
        if ttl <= 0:
            return
        primary = redis_key(key)
        if entry.vary:
            self._send("SET", primary, encode_index(entry.vary), "PX", ttl)
            self._send("SET", variant_key(primary, entry.variant), encode_entry(entry), "PX", ttl)
        else:
            self._send("SET", primary, encode_entry(entry), "PX", ttl)

    def invalidate(self, key: PrimaryKey) -> None:
        self._send("DEL", redis_key(key))

    # Commands.

    def _send(self, *args: object) -> None:
        """A command whose answer nobody waits for (failures are counted and logged once)."""
        self._command(*args).addErrback(self._missed)

    def _command(self, *args: object) -> Deferred[object]:
        """Run one command; fails with StorageUnavailable within ``timeout``."""
        connection = self._connection
        if connection is None:
            if self._down or self._stopped:
                self._failed("not connected")
            return _unavailable("Redis is not connected")
        result: Deferred[object] = Deferred()
        clock = self._clock

        def timed_out() -> None:
            if not result.called:
                self._failed("no answer within the timeout")
                result.errback(StorageUnavailable("Redis did not answer in time"))
                self._check_wedged(connection)

        timer = clock.callLater(self.timeout, timed_out)
        try:
            sent = connection.execute_command(*args)
        except Exception as error:  # noqa: BLE001 - txredisapi raises when the connection just went away
            timer.cancel()
            self._failed(f"{type(error).__name__}: {error}")
            return _unavailable(str(error))
        if connection.outstanding == 0:
            connection.quiet_since = clock.seconds()
        connection.outstanding += 1

        def answered(reply: object) -> None:
            self._answered(connection)
            if result.called:
                return
            timer.cancel()
            self._succeeded()
            result.callback(reply)

        def refused(failure: Failure) -> None:
            self._answered(connection)
            if result.called:
                return
            timer.cancel()
            self._failed(failure.getErrorMessage() or repr(failure.value))
            result.errback(StorageUnavailable(failure.getErrorMessage()))

        sent.addCallbacks(answered, refused)
        return result

    def _answered(self, connection: _Connection) -> None:
        if connection.outstanding > 0:
            connection.outstanding -= 1
        connection.quiet_since = self._clock.seconds()

    def _check_wedged(self, connection: _Connection) -> None:
        if connection is not self._connection or connection.outstanding == 0:
            return
        silent = self._clock.seconds() - connection.quiet_since
        if silent >= max(1.0, 10 * self.timeout):
            self.log.warn(
                "Cache storage {url}: no answer for {seconds:.1f} s, reconnecting",
                url=self.address.display,
                seconds=silent,
            )
            connection.transport.abortConnection()

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
        self._recovered()

    def _connect_failed(self, failure: Failure) -> None:
        self._attempt = None
        if not self._stopped:
            self._went_down(f"cannot connect: {failure.getErrorMessage()}")

    def _lost(self, connection: _Connection) -> None:
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
        if not self._refused:
            self._went_down("connection lost")

    def _handshake_failed(self, why: str) -> None:
        self._refused = False
        if not self._stopped:
            self._went_down(why)

    def _went_down(self, reason: str) -> None:
        self._down = True
        self._outage_begins(reason)
        if self._retry is None:
            delay = min(RETRY_MAX, RETRY_INITIAL * RETRY_FACTOR**self._attempts_in_a_row)
            self._attempts_in_a_row += 1
            delay *= 1.0 + random.uniform(-RETRY_JITTER, RETRY_JITTER)
            self._retry = self._clock.callLater(delay, self._connect)

    # Outage logging: once when it starts, once when it ends.

    def _outage_begins(self, reason: str) -> None:
        if self._outage_since is not None or self._stopped:
            return
        self._outage_since = self._clock.seconds()
        self._outage_failures = 0
        self.log.warn(
            "Cache storage {url} unavailable ({reason}); requests go to the upstream until it recovers",
            url=self.address.display,
            reason=reason,
        )

    def _failed(self, reason: str) -> None:
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
            "Cache storage {url} available again after {seconds:.1f} s ({failures} operations failed)",
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
        connection = self._connection or self._handshaking
        if connection is None:
            return succeed(None)
        stopping = self._stopping = Deferred()
        connection.transport.loseConnection()
        return stopping


def _unavailable(reason: str) -> Deferred[object]:
    return fail(StorageUnavailable(reason))
