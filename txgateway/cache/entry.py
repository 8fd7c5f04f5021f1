"""What the cache keeps: one stored response, and the Vary record of a URL.

A *primary key* names a URL on a route: ``(route tag, scheme, host, path, query)``
(the method is always GET: HEAD is answered from the GET entry).  When the
stored response has a ``Vary``, the primary key holds a :class:`VaryIndex`
(the header names) and each variant lives under ``(primary key, values of
those request headers)``; otherwise the entry sits under the primary key
itself, so a hit without Vary is one dict lookup.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Protocol

from txgateway.cache.policy import vary_values

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

Headers = list[tuple[bytes, bytes]]
#: (route tag, scheme, lower-case host, raw path, raw query)
PrimaryKey = tuple[str, bytes, str, str, bytes]

#: Response headers never stored: per-response (the request id, the cache's
#: own Age and X-Cache) or framing (the body's length is known when served).
NOT_STORED = frozenset({b"x-request-id", b"age", b"x-cache", b"content-length", b"transfer-encoding"})

#: Bytes charged per entry and per header on top of their contents: a rough
#: price of the Python objects, so many tiny entries cannot exceed max_bytes
#: by much.
ENTRY_OVERHEAD = 256
HEADER_OVERHEAD = 48


class Entry:
    """One stored response.  Immutable once stored: hits copy ``headers``."""

    __slots__ = ("body", "born", "expires", "headers", "size", "status", "variant", "vary")

    def __init__(
        self,
        status: int,
        headers: Headers,
        body: bytes,
        born: float,
        expires: float,
        vary: tuple[bytes, ...] = (),
        variant: tuple[bytes | None, ...] = (),
    ) -> None:
        self.status = status
        #: Without :data:`NOT_STORED` names.
        self.headers = headers
        self.body = body
        #: Clock time at which the response's age was 0 (stored at minus the upstream's Age).
        self.born = born
        #: Fresh while ``now < expires``.
        self.expires = expires
        #: The Vary names, and the values the storing request had for them.
        self.vary = vary
        self.variant = variant
        self.size = ENTRY_OVERHEAD + len(body) + sum(len(n) + len(v) + HEADER_OVERHEAD for n, v in headers)

    def matches(self, headers: Headers) -> bool:
        """True when a request with ``headers`` selects this variant."""
        return not self.vary or vary_values(self.vary, headers) == self.variant

    def __repr__(self) -> str:
        return f"<Entry {self.status} {len(self.body)} bytes expires={self.expires}>"


class VaryIndex:
    """The Vary names of a primary key and the keys of its stored variants."""

    __slots__ = ("names", "size", "variants")

    def __init__(self, names: tuple[bytes, ...]) -> None:
        self.names = names
        self.variants: set[Hashable] = set()
        self.size = ENTRY_OVERHEAD + sum(len(n) for n in names)


def stored_headers(headers: Headers) -> Headers:
    """A copy of ``headers`` fit for storing (see :data:`NOT_STORED`)."""
    return [item for item in headers if item[0] not in NOT_STORED]


class CacheStore(Protocol):
    """Where entries live.  Lookups answer at once (memory) or later (Redis)."""

    def lookup(self, key: PrimaryKey, headers: Headers, now: float) -> Entry | Deferred[Entry | None] | None:
        """The fresh entry a request with ``headers`` selects; never fails."""

    def store(self, key: PrimaryKey, entry: Entry, now: float) -> None:
        """Keep ``entry`` (it may be refused or evicted later); never fails."""

    def invalidate(self, key: PrimaryKey) -> None:
        """Forget every variant stored under ``key``."""
