"""The request and response shapes that cross the upstream interface.

Header names are lower-case bytes, values bytes, in wire order, repeated
names kept as separate entries (never joined): what HTTP/2 requires and what
keeps Set-Cookie intact.
"""

from __future__ import annotations

from dataclasses import dataclass

from txgateway.interfaces import IBody

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class UpstreamRequest:
    host: str
    port: int
    method: bytes
    #: Origin-form request target: path plus ``?query``.
    target: bytes
    #: Already free of hop-by-hop headers and framing (content-length,
    #: transfer-encoding); includes ``host``.  The client adds its own framing.
    headers: Headers
    #: None for no body.
    body: IBody | None = None
    connect_timeout: float = 2.0
    #: Seconds until the response head must have arrived.
    response_timeout: float = 30.0


@dataclass(slots=True)
class Response:
    status: int
    headers: Headers
    #: None or an IBody with length 0 for no body.
    body: IBody | None = None
    reason: bytes = b""
    #: HTTP version of the party that produced it, e.g. (1, 1).
    version: tuple[int, int] = (1, 1)
