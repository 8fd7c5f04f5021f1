"""Errors the gateway itself answers with, and the one place they are rendered.

Every user-visible failure is a :class:`GatewayError` subclass carrying its
HTTP status and short code.  Protocol edges never format error bodies
themselves: they call :func:`render_json` (HTTP/1.1, HTTP/2) or, later, the
gRPC mapping, so a 429 looks the same on every wire.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import ClassVar

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure

Headers = list[tuple[bytes, bytes]]


class GatewayError(Exception):
    """A failure the gateway answers itself, with a status and a stable code."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "internal gateway error"

    def __init__(self, message: str | None = None, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        self.message = message or self.default_message
        #: Extra response headers (Allow, Retry-After, WWW-Authenticate...).
        self.headers: Headers = list(headers)
        super().__init__(self.message)


class BadRequest(GatewayError):
    status, code, default_message = 400, "bad_request", "malformed request"


class Unauthorized(GatewayError):
    status, code, default_message = 401, "unauthorized", "authentication required"


class Forbidden(GatewayError):
    status, code, default_message = 403, "forbidden", "access denied"


class NotFound(GatewayError):
    status, code, default_message = 404, "not_found", "no route matches this request"


class MethodNotAllowed(GatewayError):
    status, code, default_message = 405, "method_not_allowed", "method not allowed on this route"

    def __init__(self, allow: Sequence[str], message: str | None = None) -> None:
        self.allow = tuple(allow)
        super().__init__(message, [(b"allow", ", ".join(self.allow).encode("ascii"))])


class RequestTimeout(GatewayError):
    status, code, default_message = 408, "request_timeout", "request not received in time"


class PayloadTooLarge(GatewayError):
    status, code, default_message = 413, "payload_too_large", "request body exceeds the limit"


class HeadersTooLarge(GatewayError):
    status, code, default_message = 431, "headers_too_large", "request head exceeds the limit"


class RateLimited(GatewayError):
    status, code, default_message = 429, "rate_limited", "too many requests"


class NotImplementedByGateway(GatewayError):
    status, code, default_message = 501, "not_implemented", "not implemented by the gateway"


class BadGateway(GatewayError):
    status, code, default_message = 502, "bad_gateway", "upstream failed"


class ServiceUnavailable(GatewayError):
    status, code, default_message = 503, "service_unavailable", "no upstream available"


class GatewayTimeout(GatewayError):
    status, code, default_message = 504, "gateway_timeout", "upstream did not answer in time"


# Upstream failures, raised by the upstream client.  Each maps to the status a
# client sees; the kind is what retries, breakers and metrics look at.


class UpstreamError(BadGateway):
    """The upstream call failed; ``kind`` names how, for retries and metrics."""

    kind: ClassVar[str] = "protocol_error"


class UpstreamConnectError(UpstreamError):
    kind = "connect_error"
    default_message = "could not connect to upstream"


class UpstreamReset(UpstreamError):
    kind = "reset"
    default_message = "upstream closed the connection"


class UpstreamProtocolError(UpstreamError):
    kind = "protocol_error"
    default_message = "upstream sent an invalid response"


class UpstreamTimeout(GatewayTimeout):
    kind: ClassVar[str] = "timeout"


#: gRPC status codes for the gateway's own answers (grpc/doc/statuscodes.md).
GRPC_OK = 0
_GRPC_BY_HTTP_STATUS: dict[int, int] = {
    400: 13,  # INTERNAL: the request could not be parsed as gRPC
    401: 16,  # UNAUTHENTICATED
    403: 7,  # PERMISSION_DENIED
    404: 12,  # UNIMPLEMENTED: no route for this method
    405: 12,  # UNIMPLEMENTED
    408: 4,  # DEADLINE_EXCEEDED
    413: 8,  # RESOURCE_EXHAUSTED
    429: 8,  # RESOURCE_EXHAUSTED: rate limited
    431: 8,  # RESOURCE_EXHAUSTED
    501: 12,  # UNIMPLEMENTED
    502: 14,  # UNAVAILABLE: refused, reset, garbage
    503: 14,  # UNAVAILABLE: breaker open, no healthy instance
    504: 4,  # DEADLINE_EXCEEDED
}


def error_for(failure: Failure, log: Logger) -> GatewayError:
    """What a protocol answers for a failed pipeline: its GatewayError, else a
    500 without details (the failure logged, unless the request was cancelled)."""
    error = failure.value
    if isinstance(error, GatewayError):
        return error
    if not failure.check(CancelledError):
        log.failure("unexpected pipeline failure", failure)
    return GatewayError()


def grpc_status(error: GatewayError) -> int:
    """The gRPC status a gateway error becomes on a gRPC request."""
    return _GRPC_BY_HTTP_STATUS.get(error.status, 13 if error.status >= 500 else 2)


def render_grpc(error: GatewayError, request_id: str | None) -> Headers:
    """The trailers-only answer of a gRPC request the gateway refuses.

    HTTP status 200 with the gRPC status in the same header block (gRPC's
    "Trailers-Only" form); ``grpc-message`` is percent-encoded as gRPC wants.
    """
    from urllib.parse import quote

    headers: Headers = [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", str(grpc_status(error)).encode("ascii")),
        (b"grpc-message", quote(error.message, safe=" ").encode("ascii")),
    ]
    if request_id:
        headers.append((b"x-request-id", request_id.encode("ascii")))
    headers.extend((n, v) for n, v in error.headers if n in (b"retry-after", b"www-authenticate", b"x-trace-id"))
    return headers


def render_json(error: GatewayError, request_id: str | None) -> tuple[int, Headers, bytes]:
    """Status, headers and body of the JSON error answer of CONFIG.md."""
    body = json.dumps(
        {"error": error.code, "message": error.message, "request_id": request_id},
        separators=(",", ":"),
    ).encode("utf-8")
    headers: Headers = [
        (b"content-type", b"application/json"),
        (b"cache-control", b"no-store"),
    ]
    headers.extend(error.headers)
    return error.status, headers, body
