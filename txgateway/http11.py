"""HTTP/1.1 wire framing shared by the downstream server and the upstream client.

Only what both directions need: message heads as bytes, chunked framing, and
the hop-by-hop header rules of RFC 9110 section 7.6.1.  Parsing is httptools'
(llhttp) job; this module never parses.
"""

from __future__ import annotations

from http import HTTPStatus

Headers = list[tuple[bytes, bytes]]

#: Headers that describe one connection, never forwarded (RFC 9110 7.6.1),
#: plus the framing headers each side writes for itself.
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)

_REASONS: dict[int, bytes] = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
_STATUS_LINES_11: dict[int, bytes] = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in _REASONS.items()
}

LAST_CHUNK = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"


def reason_phrase(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def status_line(status: int, reason: bytes = b"") -> bytes:
    """``HTTP/1.1 200 OK\\r\\n``; the upstream's own reason is kept when given."""
    if not reason:
        line = _STATUS_LINES_11.get(status)
        if line is not None:
            return line
        reason = reason_phrase(status)
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


def encode_headers(headers: Headers) -> bytes:
    """Header lines, each ending in CRLF, without the blank line."""
    return b"".join([b"%s: %s\r\n" % header for header in headers])


def request_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    return b"%s %s HTTP/1.1\r\n%s\r\n" % (method, target, encode_headers(headers))


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body; never call with empty data (that ends the body)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """Lower-cased header names listed in Connection, which are hop-by-hop too."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            for token in value.split(b","):
                token = token.strip().lower()
                if token:
                    tokens.add(token)
    return frozenset(tokens)


def without_hop_by_hop(headers: Headers) -> Headers:
    """``headers`` without hop-by-hop and framing headers, nor those Connection names."""
    listed = connection_tokens(headers)
    if listed:
        drop = HOP_BY_HOP | listed
        return [(n, v) for n, v in headers if n not in drop]
    return [(n, v) for n, v in headers if n not in HOP_BY_HOP]


def body_forbidden(method: bytes, status: int) -> bool:
    """True when a response can have no body (RFC 9112 6.3): HEAD, 1xx, 204, 304."""
    return method == b"HEAD" or status < 200 or status == 204 or status == 304
