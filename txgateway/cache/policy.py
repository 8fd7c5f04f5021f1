"""What may be stored, for how long, and under which key (RFC 9111, for a shared cache).

Kept apart from the stores and the middleware so every rule is in one place
and each is a pure function of headers and the clock.

Stored: responses to GET whose status is in :data:`CACHEABLE_STATUSES`.
Never stored: ``Cache-Control`` ``no-store``, ``private`` or ``no-cache``
(the qualified forms ``private="..."``/``no-cache="..."`` too: the gateway
never revalidates, and dropping single fields is not worth the risk),
``Set-Cookie``, ``text/event-stream``, ``Vary: *``, and responses to
authenticated requests unless they say ``public`` or ``s-maxage``.

Freshness lifetime: ``s-maxage``, else ``max-age``, else ``Expires`` minus
``Date`` (minus the moment of storing when there is no Date), else the
route's ``ttl``.  An unparsable ``max-age``/``s-maxage``/``Expires`` means
already stale (not stored).  The upstream's ``Age`` is subtracted; the
gateway does not estimate age from ``Date`` (that would trust the
upstream's clock).  A response is fresh while ``now < expires``, so a ttl of
30 s stored at t serves hits up to, not including, t + 30.
"""

from __future__ import annotations

from collections.abc import Iterable
from email.utils import parsedate_to_datetime

Headers = list[tuple[bytes, bytes]]

#: Statuses that may be stored: the heuristically cacheable ones of RFC 9110
#: section 15.1 minus 206 (no Range support in the cache).
CACHEABLE_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})

#: delta-seconds past this are this (RFC 9111 section 1.2.2).
MAX_DELTA = 2**31

Directives = dict[bytes, bytes | None]


def parse_directives(values: Iterable[bytes]) -> Directives:
    """``Cache-Control`` values as {lower-case directive: argument or None}.

    The first occurrence of a directive wins; quotes around arguments are removed.
    """
    directives: Directives = {}
    for value in values:
        for part in value.split(b","):
            name, eq, argument = part.partition(b"=")
            name = name.strip().lower()
            if not name or name in directives:
                continue
            if eq:
                argument = argument.strip()
                if len(argument) >= 2 and argument[:1] == b'"' and argument[-1:] == b'"':
                    argument = argument[1:-1]
                directives[name] = argument
            else:
                directives[name] = None
    return directives


def delta_seconds(argument: bytes | None) -> int | None:
    """A ``max-age``-style argument, None when it is not one."""
    if argument is None or not argument.isdigit():
        return None
    return min(int(argument), MAX_DELTA)


def http_date(value: bytes | None) -> float | None:
    """Seconds since the epoch of an HTTP date (IMF-fixdate, RFC 850, asctime), or None."""
    if value is None:
        return None
    try:
        return parsedate_to_datetime(value.decode("latin-1")).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class Storable:
    """The verdict on a storable response: how long it stays fresh, and what it varies on."""

    __slots__ = ("age", "lifetime", "vary")

    def __init__(self, lifetime: float, age: int, vary: tuple[bytes, ...]) -> None:
        #: Seconds fresh, counted from an age of 0.
        self.lifetime = lifetime
        #: The upstream's Age (seconds already spent in caches before us).
        self.age = age
        #: Lower-case request header names the response varies on, sorted.
        self.vary = vary


def assess(status: int, headers: Headers, authenticated: bool, now: float, ttl: float) -> Storable | None:
    """Whether a response to a GET may be stored, None when it may not.

    ``authenticated``: the request carried credentials (its Authorization
    header, or an identity the gateway established); ``now``: the clock;
    ``ttl``: the route's lifetime for responses without freshness information.
    """
    if status not in CACHEABLE_STATUSES:
        return None
    control: list[bytes] = []
    vary: list[bytes] = []
    expires = date = age = None
    for name, value in headers:
        if name == b"cache-control":
            control.append(value)
        elif name == b"set-cookie":
            return None
        elif name == b"vary":
            vary.append(value)
        elif name == b"content-type":
            if value.split(b";", 1)[0].strip().lower() == b"text/event-stream":
                return None
        elif name == b"expires":
            expires = value if expires is None else expires
        elif name == b"date":
            date = value if date is None else date
        elif name == b"age":
            age = value if age is None else age
    directives = parse_directives(control)
    if b"no-store" in directives or b"private" in directives or b"no-cache" in directives:
        return None
    if authenticated and b"public" not in directives and b"s-maxage" not in directives:
        return None
    names = vary_names(vary)
    if names is None:
        return None
    lifetime: float | None
    if b"s-maxage" in directives:
        lifetime = delta_seconds(directives[b"s-maxage"])
    elif b"max-age" in directives:
        lifetime = delta_seconds(directives[b"max-age"])
    elif expires is not None:
        expiry = http_date(expires)
        origin = http_date(date) if date is not None else None
        lifetime = None if expiry is None else expiry - (origin if origin is not None else now)
    else:
        lifetime = ttl
    if lifetime is None:
        return None
    initial_age = delta_seconds(age.strip()) if age is not None else None
    initial_age = initial_age or 0
    if lifetime - initial_age <= 0:
        return None
    return Storable(lifetime, initial_age, names)


def vary_names(values: Iterable[bytes]) -> tuple[bytes, ...] | None:
    """The header names of ``Vary`` values, lower-case, sorted, unique; None for ``*``."""
    names: set[bytes] = set()
    for value in values:
        for name in value.split(b","):
            name = name.strip().lower()
            if name == b"*":
                return None
            if name:
                names.add(name)
    return tuple(sorted(names))


def vary_values(names: tuple[bytes, ...], headers: Headers) -> tuple[bytes | None, ...]:
    """The request's values of ``names`` (repeats joined with ", "; None when absent)."""
    values: list[bytes | None] = []
    for name in names:
        found = [v.strip() for n, v in headers if n == name]
        values.append(b", ".join(found) if found else None)
    return tuple(values)


class RequestDirectives:
    """What a request says to the cache (built only when it says anything)."""

    __slots__ = ("authorized", "no_cache", "no_store", "upgrade")

    def __init__(self, headers: Headers) -> None:
        """``headers``: the request's cache-related headers only."""
        self.no_cache = self.no_store = self.authorized = self.upgrade = False
        control: list[bytes] = []
        for name, value in headers:
            if name == b"cache-control":
                control.append(value)
            elif name == b"pragma":
                if b"no-cache" in value.lower():
                    self.no_cache = True
            elif name == b"authorization":
                self.authorized = True
            else:
                self.upgrade = True
        if control:
            directives = parse_directives(control)
            # max-age=0: the client accepts nothing already stored, like no-cache.
            if b"no-cache" in directives or delta_seconds(directives.get(b"max-age")) == 0:
                self.no_cache = True
            if b"no-store" in directives:
                self.no_store = True


#: Request headers the cache acts on; anything else is skipped by name.
REQUEST_HEADERS = frozenset({b"cache-control", b"pragma", b"authorization", b"upgrade"})


def request_directives(headers: Headers) -> RequestDirectives | None:
    """The request's directives; None (the usual case) when it has none of :data:`REQUEST_HEADERS`."""
    found: Headers | None = None
    for item in headers:
        if item[0] in REQUEST_HEADERS:
            if found is None:
                found = [item]
            else:
                found.append(item)
    return None if found is None else RequestDirectives(found)
