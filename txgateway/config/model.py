"""The validated, immutable configuration the gateway runs on.

Everything here is produced by :mod:`txgateway.config.schema` from the YAML
contract (shared CONFIG.md) and is never mutated afterwards: a reload builds a
new :class:`GatewayConfig` off to the side and swaps it in whole.  Defaults
live here, once; durations are seconds (float) and sizes are bytes (int).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 64 * KiB
    max_body_bytes: int = 10 * MiB
    max_connections: int = 10000
    header_timeout: float = 10.0
    idle_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class TLSConfig:
    listen: str  # Twisted endpoint string (ssl:...) built from listen_addr/cert/key
    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class HTTP2Config:
    """Downstream HTTP/2 limits (``server.http2``), per connection."""

    #: SETTINGS_MAX_CONCURRENT_STREAMS; a client opening more gets GOAWAY.
    max_concurrent_streams: int = 100
    #: SETTINGS_MAX_HEADER_LIST_SIZE and the HPACK decoded-size bound;
    #: None: ``limits.max_header_bytes``.
    max_header_list_size: int | None = None
    #: RST_STREAM, PING, SETTINGS, PRIORITY, unknown and empty DATA frames a
    #: client may send per second before GOAWAY(ENHANCE_YOUR_CALM) (Rapid Reset).
    max_control_frames_per_second: int = 200


@dataclass(frozen=True, slots=True)
class WebSocketConfig:
    """Downstream WebSocket limits (``server.websocket``), per connection unless noted."""

    #: Maximum message (and frame) payload, both directions; larger: close 1009.
    max_message_bytes: int = 1024 * 1024
    #: Seconds for an opening handshake (upstream and downstream).
    open_handshake_timeout: float = 10.0
    #: Seconds without a message either way before both sides are closed (1001).
    idle_timeout: float = 300.0
    #: Seconds between keep-alive pings to the client (0: none).
    ping_interval: float = 30.0
    #: Messages per second the client may send before it is closed with 1008.
    max_messages_per_second: int = 1000
    #: Open WebSockets per consumer (or client address when anonymous); more: 429.
    max_connections_per_consumer: int = 100


@dataclass(frozen=True, slots=True)
class ServerConfig:
    #: Twisted server endpoint strings, e.g. ``tcp:8080:interface=0.0.0.0``.
    listen: tuple[str, ...] = ("tcp:8080:interface=0.0.0.0",)
    workers: int = 1
    tls: TLSConfig | None = None
    limits: Limits = field(default_factory=Limits)
    http2: HTTP2Config = field(default_factory=HTTP2Config)
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)
    #: CIDR networks allowed to set X-Forwarded-For.
    trusted_proxies: tuple[str, ...] = ()
    #: After SIGTERM: how long in-flight requests may take to finish (and
    #: WebSockets stay open) before the rest is closed.
    shutdown_grace: float = 30.0
    #: After SIGTERM, /ready is 503 at once but the listeners keep accepting
    #: this long, so load balancers (Kubernetes endpoints) stop sending first.
    shutdown_delay: float = 0.0


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: str = "tcp:9090:interface=127.0.0.1"
    token: str | None = None


@dataclass(frozen=True, slots=True)
class UpstreamServer:
    host: str
    port: int
    weight: int = 1

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """``upstreams.X.discovery``: where the upstream's instances come from.

    ``options`` holds the provider's own settings (validated per ``type``, all
    scalars); it is left out of the hash (a dict has none) but not out of
    equality, so the config stays usable as a ``Runtime.shared`` key.
    """

    type: str
    name: str
    port: int | None = None
    refresh: float = 10.0
    options: Mapping[str, object] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    enabled: bool = False
    path: str = "/health"
    interval: float = 10.0
    timeout: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3


@dataclass(frozen=True, slots=True)
class PassiveHealthConfig:
    consecutive_failures: int = 5
    ejection_time: float = 30.0


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    failure_threshold: int = 5
    recovery_timeout: float = 30.0
    success_threshold: int = 1


@dataclass(frozen=True, slots=True)
class RetryConfig:
    attempts: int = 1
    backoff_base: float = 0.025
    backoff_max: float = 1.0
    on: tuple[str, ...] = ("connect_error", "timeout", "502", "503", "504")
    methods: tuple[str, ...] = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE")
    budget_ratio: float = 0.2


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    connect: float = 2.0
    #: Until the response head arrives, counted from the end of the request
    #: body (and the most time between request-body pieces while sending).
    request: float = 30.0
    #: The most time between response-body bytes from the upstream (a client
    #: that reads slowly does not count); past it the response is cut.
    idle: float = 60.0
    #: The whole exchange, request start to response end; None: no limit
    #: (streams such as SSE run as long as they stay within ``idle``).
    total: float | None = None


@dataclass(frozen=True, slots=True)
class PoolConfig:
    max_connections_per_host: int = 100
    idle_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class FallbackConfig:
    status: int = 503
    body: str = ""
    content_type: str = "application/json"
    upstream: str | None = None


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    protocol: str = "http"  # http | h2c | grpc
    servers: tuple[UpstreamServer, ...] = ()
    discovery: DiscoveryConfig | None = None
    load_balancer: str = "round_robin"
    hash_key: str | None = None
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    passive_health: PassiveHealthConfig | None = None
    circuit_breaker: CircuitBreakerConfig | None = None
    retry: RetryConfig = field(default_factory=RetryConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    fallback: FallbackConfig | None = None


@dataclass(frozen=True, slots=True)
class RouteMatch:
    #: Path pattern: static segments, ``{name}``, ``{name:*}`` or trailing ``/*``.
    path: str
    #: Upper-case methods; empty means any method.
    methods: tuple[str, ...] = ()
    #: Exact host or ``*.example.com``; None means any host.
    host: str | None = None
    #: Exact header matches, names lower-cased.
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class HeaderOps:
    #: Names lower-cased.
    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    enabled: bool = True
    algorithm: str = "token_bucket"
    requests_per_minute: int = 100
    burst_size: int = 10
    key: str = "consumer"
    tiers: tuple[Mapping[str, object], ...] = ()
    storage: str = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout: float = 0.05
    on_storage_error: str = "local"


@dataclass(frozen=True, slots=True)
class RouteCacheConfig:
    enabled: bool = True
    ttl: float = 30.0


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    match: RouteMatch
    upstream: str
    strip_prefix: str | None = None
    rewrite: str | None = None
    timeout: float | None = None
    auth: str | None = None  # required | optional | none; None = middleware default
    roles: tuple[str, ...] = ()
    rate_limit: RateLimitConfig | None = None
    cache: RouteCacheConfig | None = None
    websocket: bool = False
    max_body_bytes: int | None = None
    request_headers: HeaderOps = field(default_factory=HeaderOps)
    response_headers: HeaderOps = field(default_factory=HeaderOps)


@dataclass(frozen=True, slots=True)
class JWTConfig:
    algorithms: tuple[str, ...] = ("HS256",)
    secret: str | None = None
    jwks_url: str | None = None
    jwks_refresh: float = 300.0
    public_key_file: str | None = None
    issuer: str | None = None
    audience: str | None = None
    leeway: float = 30.0
    query_param: str | None = None
    roles_claim: str = "roles"
    permissions_claim: str = "permissions"


@dataclass(frozen=True, slots=True)
class APIKey:
    sha256: str
    consumer: str
    roles: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthConfig:
    enabled: bool = False
    jwt: JWTConfig | None = None
    api_key_header: str = "x-api-key"
    api_keys: tuple[APIKey, ...] = ()
    exclude_paths: tuple[str, ...] = ()
    forward_claims: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class CacheConfig:
    enabled: bool = False
    storage: str = "memory"
    max_bytes: int = 64 * MiB
    max_object_bytes: int = 1 * MiB
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout: float = 0.05


@dataclass(frozen=True, slots=True)
class CORSConfig:
    allow_origins: tuple[str, ...] = ()
    allow_methods: tuple[str, ...] = ("GET", "POST")
    allow_headers: tuple[str, ...] = ()
    max_age: int = 600


@dataclass(frozen=True, slots=True)
class CustomMiddlewareConfig:
    """A user middleware: ``factory(options, route, runtime)`` from a dotted path or entry point."""

    name: str
    factory: str
    options: Mapping[str, object] = field(default_factory=dict)
    #: Route names it applies to; empty means every route.
    routes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MiddlewareConfig:
    enabled: bool = True
    auth: AuthConfig = field(default_factory=AuthConfig)
    rate_limit: RateLimitConfig | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    cors: CORSConfig | None = None
    custom: tuple[CustomMiddlewareConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    enabled: bool = True
    format: str = "json"  # json | combined
    path: str = "-"


@dataclass(frozen=True, slots=True)
class TracingConfig:
    enabled: bool = False
    otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"
    sample_ratio: float = 0.1
    service_name: str = "txgateway"


@dataclass(frozen=True, slots=True)
class ObservabilityConfig:
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)
    metrics_enabled: bool = True
    tracing: TracingConfig = field(default_factory=TracingConfig)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    upstreams: Mapping[str, UpstreamConfig] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    middleware: MiddlewareConfig = field(default_factory=MiddlewareConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    #: The file this was loaded from, for messages; None when built in code.
    source: str | None = None
