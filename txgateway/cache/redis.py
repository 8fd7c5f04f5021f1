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
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from txredisapi import ResponseError

from txgateway.cache.entry import Entry, Headers, PrimaryKey
from txgateway.cache.policy import vary_values
from txgateway.redis import RedisCommand, RedisLink, encode_command

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


class _Command(RedisCommand):
    """One cache command in flight; its reply, or StorageUnavailable, goes to ``result``."""

    __slots__ = ("link",)

    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self.result: Deferred[object] = Deferred()

    def answered(self, reply: object) -> None:
        if isinstance(reply, ResponseError):
            self.failed(str(reply) or repr(reply))
            return
        self.link.succeeded()
        self.result.callback(reply)

    def failed(self, reason: str) -> None:
        self.link.failed(reason)
        self.result.errback(StorageUnavailable(reason))

    def timed_out(self) -> None:
        self.link.failed("no answer within the timeout")
        self.result.errback(StorageUnavailable("Redis did not answer in time"))


class RedisStore:
    """Entries in Redis, shared by every gateway process pointed at it."""

    log = Logger()

    def __init__(self, url: str, reactor: Any, clock: IReactorTime | None = None, timeout: float = 0.05) -> None:
        """``reactor`` connects; ``clock`` times commands and backoff; connecting
        starts once the reactor runs."""
        #: Seconds a command may take before it counts as failed.
        self.timeout = timeout
        self._link = RedisLink(
            url,
            reactor,
            clock,
            log=self.log,
            label="Cache storage",
            consequence="requests go to the upstream until it recovers",
            failures_noun="operations failed",
            binary=True,
        )
        self.address = self._link.address
        self._clock = self._link.clock

    @property
    def connected(self) -> bool:
        return self._link.connection is not None

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
        link = self._link
        connection = link.connection
        if connection is None:
            if link.down or link.stopped:
                link.failed("not connected")
            return _unavailable("Redis is not connected")
        command = _Command(link)
        try:
            link.send(connection, command, encode_command(*args))
        except Exception as error:  # noqa: BLE001 - the connection just went away
            link.failed(f"{type(error).__name__}: {error}")
            return _unavailable(str(error))
        link.watch(command, self.timeout)
        return command.result

    def stop(self) -> Deferred[None]:
        """Close the connection and stop reconnecting; fires once the socket is closed."""
        return self._link.stop()


def _unavailable(reason: str) -> Deferred[object]:
    return fail(StorageUnavailable(reason))
