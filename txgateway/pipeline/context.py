"""The request context: what every protocol edge turns its wire traffic into.

One ``RequestContext`` per request, created by the protocol (HTTP/1.1 now,
HTTP/2 and WebSocket later) and carried through the pipeline to the upstream
call and the access log.  It holds the request as the gateway sees it and what
the pipeline learns along the way (route, params, identity).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from txgateway.interfaces import IRequestBody

if TYPE_CHECKING:
    from txgateway.config.model import RouteConfig

Headers = list[tuple[bytes, bytes]]


class RequestContext:
    __slots__ = (
        "body",
        "bytes_in",
        "bytes_out",
        "client_address",
        "client_ip",
        "client_port",
        "deadline",
        "ended",
        "headers",
        "host",
        "identity",
        "method",
        "notes",
        "params",
        "path",
        "protocol",
        "query",
        "request_id",
        "route",
        "scheme",
        "started",
        "status",
        "trace",
        "upstream_address",
        "upstream_ended",
        "upstream_path",
        "upstream_started",
        "version",
    )

    def __init__(
        self,
        method: bytes,
        path: str,
        query: bytes,
        headers: Headers,
        *,
        client_ip: str,
        client_port: int = 0,
        version: tuple[int, int] = (1, 1),
        scheme: bytes = b"http",
        host: str | None = None,
        protocol: str = "http/1.1",
        body: IRequestBody | None = None,
        request_id: str = "",
        started: float = 0.0,
    ) -> None:
        self.method = method
        #: Raw (percent-encoded) path, without the query.
        self.path = path
        #: Raw query string without the '?', b"" when absent.
        self.query = query
        #: Lower-case names, wire order, repeats kept.
        self.headers = headers
        self.version = version
        self.scheme = scheme
        #: Host header (or :authority) as sent, None when absent.
        self.host = host
        #: The socket peer's address.
        self.client_ip = client_ip
        #: The real client: the peer, or behind ``server.trusted_proxies`` the
        #: address X-Forwarded-For gives (set by ``Gateway.handle``).
        self.client_address = client_ip
        self.client_port = client_port
        #: "http/1.1", "h2", "websocket": for logs and metrics.
        self.protocol = protocol
        self.body = body
        self.request_id = request_id
        self.started = started
        self.route: RouteConfig | None = None
        self.params: dict[str, str] = {}
        #: Path the upstream gets (after strip_prefix / rewrite), without query.
        self.upstream_path = path
        #: The authenticated consumer, set by the auth middleware.
        self.identity: Any = None
        #: "host:port" of the instance that served the request.
        self.upstream_address: str | None = None
        #: Clock time by which the client stops waiting (gRPC ``grpc-timeout``);
        #: the upstream call never waits past it.  None: no deadline.
        self.deadline: float | None = None
        #: Free-form facts middlewares record for the access log
        #: ("rate_limit", "cache", "auth_failure", ...).
        self.notes: dict[str, object] | None = None
        # What the exchange came to, filled in by the protocol as it ends and
        # read by the observers (metrics, access log, tracing) in
        # ``Gateway.exchange_done``.
        #: Status sent to the client (gRPC: the HTTP status; 0 when none was sent).
        self.status = 0
        #: Request body bytes received from the client, response bytes sent to it.
        self.bytes_in = 0
        self.bytes_out = 0
        #: Clock time the exchange ended (response finished, aborted or client gone).
        self.ended = 0.0
        #: Clock times of the (last) upstream attempt: request sent, response head received.
        self.upstream_started: float | None = None
        self.upstream_ended: float | None = None
        #: The W3C trace context of this request (txgateway.observability.tracing), or None.
        self.trace: Any = None

    def header(self, name: bytes) -> bytes | None:
        """First value of a lower-case header name, or None."""
        for n, v in self.headers:
            if n == name:
                return v
        return None
