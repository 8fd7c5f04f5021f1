"""From a parsed (and interpolated) YAML tree to a :class:`GatewayConfig`.

The tree is walked section by section; every value is checked where it is
read and every mistake is recorded with its path, so one run reports them
all.  A value that failed is replaced by its default for the rest of the walk
(the result is thrown away when anything failed), which keeps one mistake
from causing a cascade of others.  Defaults come from the model classes.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from txgateway.config import model
from txgateway.config.errors import ConfigError, ConfigProblem, child_path, item_path
from txgateway.config.interpolation import Interpolated, Unresolved
from txgateway.config.units import parse_duration, parse_size

if TYPE_CHECKING:
    from txgateway.routing.pattern import PathPattern

T = TypeVar("T")
D = TypeVar("D")
Convert = Callable[[object], T]

JWT_ALGORITHMS = (
    "HS256", "HS384", "HS512",
    "RS256", "RS384", "RS512",
    "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512",
    "EdDSA",
)  # fmt: skip
PROTOCOLS = ("http", "h2c", "grpc")
LOAD_BALANCERS = ("round_robin", "weighted", "least_connections", "consistent_hash", "random")
DISCOVERY_TYPES = ("dns", "kubernetes", "consul", "etcd")
ROUTE_AUTH = ("required", "optional", "none")
RETRY_CONDITIONS = ("connect_error", "timeout", "reset")
ENDPOINT_TYPES = ("tcp", "tcp6", "ssl", "unix", "systemd")

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z\-]+\Z")
_HOST_LABELS = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_\-]{0,61}[A-Za-z0-9_])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_\-]{0,61}[A-Za-z0-9_])?)*\.?\Z")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}\Z")
_ORIGIN = re.compile(r"(?:\*|[a-z][a-z0-9+.\-]*://(?:\*\.)?[^/\s:*]+(?::\d{1,5})?)\Z", re.IGNORECASE)
_REWRITE_PARAM = re.compile(r"\{([^{}]*)\}")

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


# -- describing and converting single values ---------------------------------


def describe(value: object) -> str:
    """What a user wrote, in words: ``a string ('abc')``, ``a list``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:37] + "..."
        return f"a string ({text!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a likely typo of a choice, or an empty string.

    difflib ranks the candidates; a small edit distance (typos, swapped
    letters) decides, so ``disk`` does not suggest ``redis``.
    """
    limit = max(2, len(word) // 4)
    for candidate in difflib.get_close_matches(word, list(choices), n=5, cutoff=0.5):
        if _edit_distance(word.lower(), candidate.lower()) <= limit:
            return f" (did you mean {candidate!r}?)"
    return ""


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance where swapping two adjacent letters costs one."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        current = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                current[j] = min(current[j], previous2[j - 2] + 1)
        previous2, previous = previous, current
    return previous[len(b)]


def _expected(kind: str, value: object) -> ValueError:
    return ValueError(f"expected {kind}, got {describe(value)}")


def to_str(value: object) -> str:
    if not isinstance(value, str):
        raise _expected("a string", value)
    return str(value)


def to_nonempty_str(value: object) -> str:
    text = to_str(value)
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def to_int(value: object) -> int:
    if isinstance(value, Interpolated):
        try:
            return int(value.strip())
        except ValueError:
            raise _expected("an integer", value) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _expected("an integer", value)
    return value


def to_float(value: object) -> float:
    if isinstance(value, Interpolated):
        try:
            number = float(value.strip())
        except ValueError:
            raise _expected("a number", value) from None
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _expected("a number", value)
    else:
        number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {describe(value)}")
    return number


def to_bool(value: object) -> bool:
    if isinstance(value, Interpolated):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    if not isinstance(value, bool):
        raise _expected("true or false", value)
    return value


def int_range(low: int | None = None, high: int | None = None) -> Convert[int]:
    def convert(value: object) -> int:
        number = to_int(value)
        _check_range(number, low, high)
        return number

    return convert


def float_range(low: float | None = None, high: float | None = None) -> Convert[float]:
    def convert(value: object) -> float:
        number = to_float(value)
        _check_range(number, low, high)
        return number

    return convert


def _check_range(number: float, low: float | None, high: float | None) -> None:
    if low is not None and high is not None and not low <= number <= high:
        raise ValueError(f"must be between {low:g} and {high:g}, got {number:g}")
    if low is not None and number < low:
        raise ValueError(f"must be >= {low:g}, got {number:g}")
    if high is not None and number > high:
        raise ValueError(f"must be <= {high:g}, got {number:g}")


def duration(positive: bool = False) -> Convert[float]:
    """Seconds (>= 0, or > 0 when ``positive``)."""

    def convert(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise _expected("a duration in seconds", value)
        seconds = parse_duration(value)
        if positive and seconds <= 0:
            raise ValueError(f"must be > 0 seconds, got {seconds:g}")
        return seconds

    return convert


def size(positive: bool = False) -> Convert[int]:
    """Bytes (>= 0, or > 0 when ``positive``)."""

    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise _expected("a size in bytes (e.g. 65536 or 64KiB)", value)
        count = parse_size(value)
        if positive and count <= 0:
            raise ValueError(f"must be > 0 bytes, got {count}")
        return count

    return convert


def choice(options: Sequence[str]) -> Convert[str]:
    def convert(value: object) -> str:
        if not isinstance(value, str) or value not in options:
            hint = did_you_mean(value, options) if isinstance(value, str) else ""
            raise ValueError(f"expected one of {', '.join(options)}, got {describe(value)}{hint}")
        return str(value)

    return convert


def to_token(value: object) -> str:
    """An HTTP token (method or header name)."""
    text = to_str(value)
    if not _TOKEN.match(text):
        raise ValueError(f"{text!r} is not a valid HTTP token (letters, digits and !#$%&'*+.^_`|~-)")
    return text


def to_method(value: object) -> str:
    return to_token(value).upper()


def to_header_name(value: object) -> str:
    return to_token(value).lower()


def to_header_value(value: object) -> str:
    if isinstance(value, bool):
        raise _expected("a string (quote it to send it as text)", value)
    if isinstance(value, int):
        return str(value)
    text = to_str(value)
    if "\r" in text or "\n" in text or "\0" in text:
        raise ValueError("header values must not contain CR, LF or NUL")
    return text


def to_url(schemes: Sequence[str]) -> Convert[str]:
    def convert(value: object) -> str:
        text = to_str(value)
        parts = urlsplit(text)
        if parts.scheme not in schemes or not (parts.netloc or parts.scheme == "unix"):
            raise ValueError(f"expected a {' or '.join(schemes)} URL, got {text!r}")
        return text

    return convert


def to_public_key_file(value: object) -> str:
    """A readable PEM file of JWT public keys (checked now, so ``txgateway check`` reports it)."""
    from txgateway.auth.jwt import load_public_key_file

    path = to_existing_file(value)
    load_public_key_file(path)
    return path


def to_abs_path(value: object) -> str:
    """A URL path (starts with '/')."""
    text = to_str(value)
    if not text.startswith("/"):
        raise ValueError(f"must start with '/', got {text!r}")
    return text


def to_existing_file(value: object) -> str:
    text = to_nonempty_str(value)
    if not os.path.isfile(text):
        raise ValueError(f"file not found: {text}" if not os.path.exists(text) else f"not a file: {text}")
    if not os.access(text, os.R_OK):
        raise ValueError(f"file not readable: {text}")
    return text


def to_network(value: object) -> str:
    text = to_str(value).strip()
    try:
        return str(ipaddress.ip_network(text))
    except ValueError:
        pass
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"expected an IP address or CIDR network (e.g. 10.0.0.0/8), got {text!r}") from None
    raise ValueError(f"{text!r} has host bits set (did you mean '{network}'?)")


def split_host_port(text: str, *, need_host: bool, allow_port_zero: bool) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` (and ``:port`` when no host is needed)."""
    example = "'0.0.0.0:8080'" if not need_host else "'10.0.0.5:8080' or 'users.internal:8080'"
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"expected '[ipv6]:port', got {text!r}")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"expected 'host:port' (e.g. {example}), got {text!r}")
        if ":" in host:
            raise ValueError(f"IPv6 addresses need brackets, e.g. '[{host}]:{port_text}'")
        if not host:
            if need_host:
                raise ValueError(f"a host is required (e.g. {example}), got {text!r}")
        elif not _is_ip(host) and not _HOST_LABELS.match(host):
            raise ValueError(f"{host!r} is not a valid host name or IP address")
    if not port_text.isdigit() or not (0 if allow_port_zero else 1) <= int(port_text) <= 65535:
        raise ValueError(f"invalid port {port_text!r} in {text!r}: expected 1-65535")
    return host, int(port_text)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def escape_endpoint(text: str) -> str:
    """Quote a value for a Twisted endpoint description."""
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def split_endpoint(description: str) -> list[str]:
    """Split a Twisted endpoint description on unescaped colons, unescaping."""
    parts, current, chars = [], [], iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def tcp_endpoint(value: object) -> str:
    """``listen_addr`` (``host:port``) as a Twisted server endpoint string."""
    host, port = split_host_port(to_str(value), need_host=False, allow_port_zero=True)
    if ":" in host:
        return f"tcp6:{port}:interface={escape_endpoint(host)}"
    return f"tcp:{port}:interface={host or '0.0.0.0'}"


def endpoint_string(value: object) -> str:
    """A Twisted server endpoint string, checked loosely (type and port)."""
    text = to_nonempty_str(value).strip()
    parts = split_endpoint(text)
    kind = parts[0]
    if kind not in ENDPOINT_TYPES:
        raise ValueError(
            f"unknown endpoint type {kind!r} in {text!r} (known: {', '.join(ENDPOINT_TYPES)})"
            + did_you_mean(kind, ENDPOINT_TYPES)
        )
    positional = [p for p in parts[1:] if p and "=" not in p]
    keywords = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    if kind in ("tcp", "tcp6", "ssl"):
        port = positional[0] if positional else keywords.get("port", "")
        if not port.isdigit() or int(port) > 65535:
            raise ValueError(f"endpoint {text!r} needs a port 0-65535, got {port!r}")
        if kind == "ssl" and not keywords.get("privateKey"):
            raise ValueError(f"ssl endpoint {text!r} needs privateKey=FILE")
    elif kind == "unix" and not (positional or keywords.get("address")):
        raise ValueError(f"unix endpoint {text!r} needs a socket path")
    return text


# -- reading mappings -------------------------------------------------------


class _Failed(Exception):
    """A value did not convert; its problem is already recorded."""


@dataclass
class _Context:
    problems: list[ConfigProblem] = field(default_factory=list)

    def problem(self, path: str, message: str) -> None:
        self.problems.append(ConfigProblem(path, message))

    def check(self, path: str, value: object, convert: Convert[T]) -> T:
        """``convert(value)``, or :class:`_Failed` once the problem is recorded."""
        if isinstance(value, Unresolved):
            raise _Failed
        try:
            return convert(value)
        except ValueError as error:
            self.problem(path, str(error))
            raise _Failed from None

    def convert(self, path: str, value: object, convert: Convert[T], default: D) -> T | D:
        try:
            return self.check(path, value, convert)
        except _Failed:
            return default

    def items(self, path: str, value: object, convert: Convert[T]) -> list[T]:
        """Each item of a list, converted; failed items are left out."""
        if isinstance(value, Unresolved):
            return []
        if not isinstance(value, list):
            self.problem(path, f"expected a list, got {describe(value)}")
            return []
        result: list[T] = []
        for index, item in enumerate(value):
            try:
                result.append(self.check(item_path(path, index), item, convert))
            except _Failed:
                continue
        return result


class _Block:
    """One mapping of the tree; unknown keys are reported when it is opened.

    A key whose value is null counts as not given.
    """

    def __init__(
        self,
        ctx: _Context,
        path: str,
        value: object,
        keys: Iterable[str],
        aliases: Mapping[str, str] | None = None,
        hints: Mapping[str, str] | None = None,
    ) -> None:
        self.ctx = ctx
        self.path = path
        self.data: dict[str, object] = {}
        self._spelling: dict[str, str] = {}
        self.ok = True
        known = list(keys)
        aliases = aliases or {}
        if value is None:
            return
        if isinstance(value, Unresolved):
            self.ok = False
            return
        if not isinstance(value, dict):
            ctx.problem(path, f"expected a mapping, got {describe(value)}")
            self.ok = False
            return
        for key, item in value.items():
            if not isinstance(key, str):
                ctx.problem(child_path(path, key), f"keys must be strings, got {describe(key)}")
                continue
            name = aliases.get(key, key)
            if name not in known:
                if hints and key in hints:
                    hint = f" (did you mean {hints[key]!r}?)"
                else:
                    hint = did_you_mean(key, [*known, *aliases]) or f" (expected one of: {', '.join(known)})"
                ctx.problem(child_path(path, key), f"unknown key{hint}")
            elif name in self._spelling:
                ctx.problem(
                    child_path(path, key),
                    f"{self._spelling[name]!r} is also given; {key!r} is another name for it: keep one",
                )
            else:
                self._spelling[name] = key
                if item is not None:
                    self.data[name] = item

    def given(self, key: str) -> bool:
        return key in self.data

    def at(self, key: str) -> str:
        return child_path(self.path, self._spelling.get(key, key))

    def get(self, key: str, convert: Convert[T], default: D) -> T | D:
        if key not in self.data:
            return default
        return self.ctx.convert(self.at(key), self.data[key], convert, default)

    def require(self, key: str, convert: Convert[T]) -> T | None:
        if key not in self.data:
            if self.ok:
                self.ctx.problem(self.at(key), "required")
            return None
        return self.ctx.convert(self.at(key), self.data[key], convert, None)

    def items(self, key: str, convert: Convert[T], default: Sequence[T] = ()) -> tuple[T, ...]:
        if key not in self.data:
            return tuple(default)
        return tuple(_unique(self.ctx.items(self.at(key), self.data[key], convert)))

    def block(
        self,
        key: str,
        keys: Iterable[str],
        aliases: Mapping[str, str] | None = None,
        hints: Mapping[str, str] | None = None,
    ) -> _Block:
        return _Block(self.ctx, self.at(key), self.data.get(key), keys, aliases, hints)

    def mapping(self, key: str, convert_key: Convert[str], convert_value: Convert[T]) -> tuple[tuple[str, T], ...]:
        """A mapping of free-form keys (header names...), converted both ways."""
        if key not in self.data:
            return ()
        value, path = self.data[key], self.at(key)
        if isinstance(value, Unresolved):
            return ()
        if not isinstance(value, dict):
            self.ctx.problem(path, f"expected a mapping, got {describe(value)}")
            return ()
        result: dict[str, T] = {}
        for name, item in value.items():
            item_at = child_path(path, name)
            converted_name = self.ctx.convert(item_at, name, convert_key, None)
            try:
                converted = self.ctx.check(item_at, item, convert_value)
            except _Failed:
                continue
            if converted_name is not None:
                result[converted_name] = converted
        return tuple(result.items())


def _unique(items: Iterable[T]) -> list[T]:
    seen: list[T] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


# -- sections ---------------------------------------------------------------

_LIMITS = model.Limits()
_SERVER = model.ServerConfig()
_HTTP2 = model.HTTP2Config()
_WEBSOCKET = model.WebSocketConfig()
_ADMIN = model.AdminConfig()
_HEALTH = model.HealthCheckConfig()
_PASSIVE = model.PassiveHealthConfig()
_BREAKER = model.CircuitBreakerConfig()
_RETRY = model.RetryConfig()
_TIMEOUTS = model.TimeoutsConfig()
_POOL = model.PoolConfig()
_FALLBACK = model.FallbackConfig()
_DISCOVERY_REFRESH = 10.0
_RATE_LIMIT = model.RateLimitConfig()
_ROUTE_CACHE = model.RouteCacheConfig()
_JWT = model.JWTConfig()
_AUTH = model.AuthConfig()
_CACHE = model.CacheConfig()
_CORS = model.CORSConfig()
_ACCESS_LOG = model.AccessLogConfig()
_TRACING = model.TracingConfig()
_OBSERVABILITY = model.ObservabilityConfig()

TOP_KEYS = ("server", "admin", "upstreams", "routes", "middleware", "observability")
_TOP_HINTS = {
    "listen_addr": "server.listen_addr",
    "listen": "server.listen",
    "workers": "server.workers",
    "worker_threads": "server.worker_threads",
    "tls": "server.tls",
    "limits": "server.limits",
    "upstream": "upstreams",
    "route": "routes",
    "auth": "middleware.auth",
    "rate_limit": "middleware.rate_limit",
    "cors": "middleware.cors",
    "cache": "middleware.cache",
    "access_log": "observability.access_log",
    "metrics": "observability.metrics",
    "tracing": "observability.tracing",
}


def build_config(
    tree: object, source: str = "<string>", problems: Iterable[ConfigProblem] = ()
) -> model.GatewayConfig:
    """Validate ``tree`` (interpolated YAML) into a config, or raise :class:`ConfigError`.

    ``problems`` already found (by interpolation) are reported along with the
    ones found here.
    """
    ctx = _Context(list(problems))
    top = _Block(ctx, "", tree, TOP_KEYS, hints=_TOP_HINTS)
    server = _server(top.block("server", _SERVER_KEYS, aliases={"worker_threads": "workers"}))
    admin = _admin(top.block("admin", ("listen_addr", "listen", "token")))
    mb = top.block("middleware", ("enabled", "auth", "rate_limit", "cache", "cors", "custom"))
    middleware = _middleware(mb)
    upstreams = _upstreams(ctx, top)
    routes = _routes(ctx, top, upstreams, middleware.rate_limit)
    middleware = replace(middleware, custom=_custom_middlewares(ctx, mb, {r.name for r in routes}))
    observability = _observability(top.block("observability", ("access_log", "metrics", "tracing")))
    if ctx.problems:
        raise ConfigError(_in_file_order(ctx.problems, tree), source)
    return model.GatewayConfig(
        server=server,
        admin=admin,
        upstreams=upstreams,
        routes=routes,
        middleware=middleware,
        observability=observability,
        source=source,
    )


def _in_file_order(problems: list[ConfigProblem], tree: object) -> list[ConfigProblem]:
    """Problems grouped by top-level section, sections in the file's order."""
    order = [key for key in tree if isinstance(key, str)] if isinstance(tree, dict) else []

    def rank(problem: ConfigProblem) -> int:
        head = re.split(r"[.\[]", problem.path, maxsplit=1)[0]
        return order.index(head) if head in order else -1

    return sorted(problems, key=rank)


_SERVER_KEYS = (
    "listen_addr",
    "listen",
    "workers",
    "tls",
    "limits",
    "http2",
    "websocket",
    "trusted_proxies",
    "shutdown_grace",
    "shutdown_delay",
)


def _server(b: _Block) -> model.ServerConfig:
    listen = _SERVER.listen
    if b.given("listen_addr") and b.given("listen"):
        b.ctx.problem(b.at("listen"), "give either listen_addr or listen, not both")
    elif b.given("listen_addr"):
        listen = (b.get("listen_addr", tcp_endpoint, listen[0]),)
    elif b.given("listen"):
        if isinstance(b.data["listen"], str):
            listen = (b.get("listen", endpoint_string, listen[0]),)
        else:
            if b.data["listen"] == []:
                b.ctx.problem(b.at("listen"), "needs at least one endpoint")
            listen = b.items("listen", endpoint_string) or _SERVER.listen
    workers = b.get("workers", int_range(1), _SERVER.workers)
    tls = None
    if b.given("tls"):
        tls = _tls(b.block("tls", ("listen_addr", "cert", "key")))
    lb = b.block("limits", _LIMIT_KEYS)
    limits = model.Limits(
        max_header_bytes=lb.get("max_header_bytes", size(positive=True), _LIMITS.max_header_bytes),
        max_body_bytes=lb.get("max_body_bytes", size(), _LIMITS.max_body_bytes),
        max_connections=lb.get("max_connections", int_range(1), _LIMITS.max_connections),
        header_timeout=lb.get("header_timeout", duration(positive=True), _LIMITS.header_timeout),
        idle_timeout=lb.get("idle_timeout", duration(positive=True), _LIMITS.idle_timeout),
    )
    hb = b.block("http2", _HTTP2_KEYS)
    http2 = model.HTTP2Config(
        max_concurrent_streams=hb.get("max_concurrent_streams", int_range(1), _HTTP2.max_concurrent_streams),
        max_header_list_size=hb.get("max_header_list_size", size(positive=True), _HTTP2.max_header_list_size),
        max_control_frames_per_second=hb.get(
            "max_control_frames_per_second", int_range(1), _HTTP2.max_control_frames_per_second
        ),
    )
    wb = b.block("websocket", _WEBSOCKET_KEYS)
    websocket = model.WebSocketConfig(
        max_message_bytes=wb.get("max_message_bytes", size(positive=True), _WEBSOCKET.max_message_bytes),
        open_handshake_timeout=wb.get(
            "open_handshake_timeout", duration(positive=True), _WEBSOCKET.open_handshake_timeout
        ),
        idle_timeout=wb.get("idle_timeout", duration(positive=True), _WEBSOCKET.idle_timeout),
        ping_interval=wb.get("ping_interval", duration(), _WEBSOCKET.ping_interval),
        max_messages_per_second=wb.get("max_messages_per_second", int_range(1), _WEBSOCKET.max_messages_per_second),
        max_connections_per_consumer=wb.get(
            "max_connections_per_consumer", int_range(1), _WEBSOCKET.max_connections_per_consumer
        ),
    )
    return model.ServerConfig(
        listen=listen,
        workers=workers,
        tls=tls,
        limits=limits,
        http2=http2,
        websocket=websocket,
        trusted_proxies=b.items("trusted_proxies", to_network),
        shutdown_grace=b.get("shutdown_grace", duration(), _SERVER.shutdown_grace),
        shutdown_delay=b.get("shutdown_delay", duration(), _SERVER.shutdown_delay),
    )


_HTTP2_KEYS = ("max_concurrent_streams", "max_header_list_size", "max_control_frames_per_second")
_WEBSOCKET_KEYS = (
    "max_message_bytes",
    "open_handshake_timeout",
    "idle_timeout",
    "ping_interval",
    "max_messages_per_second",
    "max_connections_per_consumer",
)
_LIMIT_KEYS = ("max_header_bytes", "max_body_bytes", "max_connections", "header_timeout", "idle_timeout")


def _tls(b: _Block) -> model.TLSConfig | None:
    if not b.ok:
        return None
    address = b.get("listen_addr", to_str, "0.0.0.0:8443")
    cert = b.require("cert", to_existing_file)
    key = b.require("key", to_existing_file)
    try:
        host, port = split_host_port(address, need_host=False, allow_port_zero=True)
    except ValueError as error:
        b.ctx.problem(b.at("listen_addr"), str(error))
        return None
    if cert is None or key is None:
        return None
    listen = (
        f"ssl:{port}:interface={escape_endpoint(host or '0.0.0.0')}"
        f":certKey={escape_endpoint(cert)}:privateKey={escape_endpoint(key)}"
    )
    return model.TLSConfig(listen=listen, cert=cert, key=key)


def _admin(b: _Block) -> model.AdminConfig:
    listen = _ADMIN.listen
    if b.given("listen_addr") and b.given("listen"):
        b.ctx.problem(b.at("listen"), "give either listen_addr or listen, not both")
    elif b.given("listen_addr"):
        listen = b.get("listen_addr", tcp_endpoint, listen)
    else:
        listen = b.get("listen", endpoint_string, listen)
    raw_token = b.data.get("token")
    token = b.get("token", to_str, None)
    # Only a token left out or empty: a mistyped or unresolved one is reported already.
    if (raw_token is None or raw_token == "") and b.ok and not admin_bind_is_local(listen):
        where = b.at("listen_addr") if b.given("listen_addr") else b.at("listen")
        b.ctx.problem(
            b.at("token"),
            f"required when {where} binds a non-loopback address ({listen}): set a token"
            " (e.g. token: \"${ADMIN_TOKEN}\" with ADMIN_TOKEN in the environment) or bind 127.0.0.1",
        )
    return model.AdminConfig(listen=listen, token=token or None)


def admin_bind_is_local(listen: str) -> bool:
    """Whether an admin endpoint is reachable from this host only: a unix socket or
    a loopback interface.  No interface (all addresses), another address, or an
    endpoint whose address the config cannot see (systemd) is not."""
    parts = split_endpoint(listen)
    kind = parts[0]
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return False
    keywords = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    positional = [p for p in parts[1:] if "=" not in p]
    interface = keywords.get("interface")
    if interface is None and kind != "ssl" and len(positional) > 1:
        interface = positional[1]  # tcp:PORT:INTERFACE
    if not interface:
        return False
    if interface.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface.strip("[]")).is_loopback
    except ValueError:
        return False


# -- upstreams ----------------------------------------------------------------

_UPSTREAM_KEYS = (
    "name", "protocol", "servers", "discovery", "load_balancer", "hash_key", "health_check",
    "passive_health", "circuit_breaker", "retry", "timeouts", "pool", "fallback",
)  # fmt: skip


def to_resolver_address(value: object) -> str:
    """A DNS server as ``ip`` or ``ip:port`` (``[v6]:port``); the port defaults to 53."""
    text = to_str(value).strip()
    if _is_ip(text):
        host, port = text, 53
    else:
        host, port = split_host_port(text, need_host=True, allow_port_zero=False)
        if not _is_ip(host):
            raise ValueError(f"expected an IP address (and port) of a DNS server, got {text!r}")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: ``_service._proto.name``: a name that is looked up as SRV unless ``record_type`` says otherwise.
_SRV_NAME = re.compile(r"_[^.]+\._(?:tcp|udp|tls)\.", re.IGNORECASE)

#: Per discovery type, its own keys (flat in the ``discovery`` block, kept in
#: ``DiscoveryConfig.options``).  txgateway/upstream/discovery/ documents each.
_DISCOVERY_OPTIONS: dict[str, dict[str, Convert[object]]] = {
    "dns": {"record_type": choice(("A", "AAAA", "SRV")), "resolver": to_resolver_address},
    "kubernetes": {
        "namespace": to_nonempty_str,
        "url": to_url(("http", "https")),
        "port_name": to_nonempty_str,
        "token_path": to_nonempty_str,
        "ca_path": to_nonempty_str,
    },
    "consul": {
        "url": to_url(("http", "https")),
        "datacenter": to_nonempty_str,
        "tag": to_nonempty_str,
        "token": to_nonempty_str,
    },
    "etcd": {"url": to_url(("http", "https")), "prefix": to_nonempty_str},
}
#: Kubernetes' namespace, URL, token and CA default to the pod's own (in-cluster).
_DISCOVERY_DEFAULTS: dict[str, dict[str, object]] = {
    "dns": {},
    "kubernetes": {},
    "consul": {"url": "http://127.0.0.1:8500"},
    "etcd": {"url": "http://127.0.0.1:2379", "prefix": "/services/"},
}


def to_hash_key(value: object) -> str:
    text = to_str(value).strip()
    kind, sep, name = text.partition(":")
    if not sep and text in ("ip", "path"):
        return text
    if sep and kind in ("header", "cookie") and name:
        if kind == "header":
            return f"header:{to_header_name(name)}"
        return f"cookie:{to_token(name)}"
    raise ValueError(f"expected header:NAME, cookie:NAME, ip or path, got {text!r}")


def to_rate_limit_key(value: object) -> str:
    text = to_str(value).strip()
    if text in ("consumer", "ip", "route"):
        return text
    kind, sep, name = text.partition(":")
    if sep and kind == "header" and name:
        return f"header:{to_header_name(name)}"
    raise ValueError(
        f"expected consumer, ip, route or header:NAME, got {text!r}"
        + did_you_mean(text, ("consumer", "ip", "route"))
    )


def to_retry_condition(value: object) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else to_str(value)
    if text in RETRY_CONDITIONS or (text.isdigit() and len(text) == 3 and 100 <= int(text) <= 599):
        return text
    raise ValueError(
        f"expected {', '.join(RETRY_CONDITIONS)} or an HTTP status code, got {describe(value)}"
        + did_you_mean(text, RETRY_CONDITIONS)
    )


def _server_address(value: object) -> model.UpstreamServer:
    host, port = split_host_port(to_str(value), need_host=True, allow_port_zero=False)
    return model.UpstreamServer(host=host, port=port)


def _upstreams(ctx: _Context, top: _Block) -> dict[str, model.UpstreamConfig]:
    raw = top.data.get("upstreams")
    path = top.at("upstreams")
    if raw is None or isinstance(raw, Unresolved):
        return {}
    if not isinstance(raw, dict):
        ctx.problem(path, f"expected a mapping of upstream names to settings, got {describe(raw)}")
        return {}
    names = [name for name in raw if isinstance(name, str) and name]
    upstreams: dict[str, model.UpstreamConfig] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not name.strip():
            ctx.problem(child_path(path, name), f"upstream names must be non-empty strings, got {describe(name)}")
            continue
        upstream = _upstream(_Block(ctx, child_path(path, name), value, _UPSTREAM_KEYS), name, names)
        upstreams[name] = upstream
    _check_fallback_cycles(ctx, path, upstreams)
    return upstreams


def _upstream(b: _Block, name: str, names: Sequence[str]) -> model.UpstreamConfig:
    inner = b.get("name", to_str, name)
    if inner != name:
        b.ctx.problem(b.at("name"), f"must match its key {name!r}, got {inner!r}")
    protocol = b.get("protocol", choice(PROTOCOLS), "http")
    servers = _servers(b)
    discovery = _discovery(b.block("discovery", _discovery_keys())) if b.given("discovery") else None
    if b.ok and not b.given("discovery"):
        if not b.given("servers"):
            b.ctx.problem(b.path, "needs servers or discovery")
        elif b.data["servers"] == []:
            b.ctx.problem(b.at("servers"), "is empty and there is no discovery: give at least one server")
    load_balancer = b.get("load_balancer", choice(LOAD_BALANCERS), "round_robin")
    hash_key = b.get("hash_key", to_hash_key, None)
    if load_balancer == "consistent_hash" and not b.given("hash_key"):
        b.ctx.problem(b.at("hash_key"), "required when load_balancer is consistent_hash")
    return model.UpstreamConfig(
        name=name,
        protocol=protocol,
        servers=servers,
        discovery=discovery,
        load_balancer=load_balancer,
        hash_key=hash_key,
        health_check=_health_check(b.block("health_check", _HEALTH_KEYS)),
        passive_health=_passive_health(b.block("passive_health", ("consecutive_failures", "ejection_time")))
        if b.given("passive_health")
        else None,
        circuit_breaker=_circuit_breaker(
            b.block("circuit_breaker", ("failure_threshold", "recovery_timeout", "success_threshold"))
        )
        if b.given("circuit_breaker")
        else None,
        retry=_retry(b.block("retry", _RETRY_KEYS)),
        timeouts=_timeouts(b.block("timeouts", ("connect", "request", "idle", "total"))),
        pool=_pool(b.block("pool", ("max_connections_per_host", "idle_timeout"))),
        fallback=_fallback(b.block("fallback", ("status", "body", "content_type", "upstream")), name, names)
        if b.given("fallback")
        else None,
    )


def _servers(b: _Block) -> tuple[model.UpstreamServer, ...]:
    if not b.given("servers"):
        return ()
    raw, path = b.data["servers"], b.at("servers")
    if isinstance(raw, Unresolved):
        return ()
    if not isinstance(raw, list):
        b.ctx.problem(path, f"expected a list of servers, got {describe(raw)}")
        return ()
    servers: list[model.UpstreamServer] = []
    for index, item in enumerate(raw):
        at = item_path(path, index)
        server: model.UpstreamServer | None
        if isinstance(item, (str, Unresolved)):
            server = b.ctx.convert(at, item, _server_address, None)
        else:
            sb = _Block(b.ctx, at, item, ("address", "weight"))
            if not sb.ok:
                continue
            server = sb.require("address", _server_address)
            weight = sb.get("weight", int_range(1), 1)
            if server is not None:
                server = model.UpstreamServer(server.host, server.port, weight)
        if server is None:
            continue
        if any(s.address == server.address for s in servers):
            b.ctx.problem(at, f"duplicate server {server.address}")
            continue
        servers.append(server)
    return tuple(servers)


def _discovery_keys() -> list[str]:
    keys = ["type", "name", "port", "refresh"]
    for options in _DISCOVERY_OPTIONS.values():
        keys.extend(key for key in options if key not in keys)
    return keys


def _discovery(b: _Block) -> model.DiscoveryConfig | None:
    if not b.ok:
        return None
    kind = b.require("type", choice(DISCOVERY_TYPES))
    name = b.require("name", to_nonempty_str)
    port = b.get("port", int_range(1, 65535), None)
    refresh = b.get("refresh", duration(positive=True), _DISCOVERY_REFRESH)
    options: dict[str, object] = {}
    if kind is not None:
        allowed = _DISCOVERY_OPTIONS[kind]
        options.update(_DISCOVERY_DEFAULTS[kind])
        for key in b.data:
            if key in ("type", "name", "port", "refresh"):
                continue
            if key not in allowed:
                owners = [k for k, opts in _DISCOVERY_OPTIONS.items() if key in opts]
                b.ctx.problem(b.at(key), f"only applies to discovery type {' or '.join(owners)}, not {kind}")
                continue
            options[key] = b.get(key, allowed[key], None)
        if kind == "dns":
            if "record_type" not in options:
                options["record_type"] = "SRV" if name is not None and _SRV_NAME.match(name) else "A"
            if options["record_type"] != "SRV" and not b.given("port"):
                b.ctx.problem(b.at("port"), "required for dns discovery (unless record_type is SRV)")
    if kind is None or name is None:
        return None
    return model.DiscoveryConfig(type=kind, name=name, port=port, refresh=refresh, options=options)


_HEALTH_KEYS = ("enabled", "path", "interval", "timeout", "healthy_threshold", "unhealthy_threshold")


def _health_check(b: _Block) -> model.HealthCheckConfig:
    present = bool(b.data)
    return model.HealthCheckConfig(
        enabled=b.get("enabled", to_bool, True if present else _HEALTH.enabled),
        path=b.get("path", to_abs_path, _HEALTH.path),
        interval=b.get("interval", duration(positive=True), _HEALTH.interval),
        timeout=b.get("timeout", duration(positive=True), _HEALTH.timeout),
        healthy_threshold=b.get("healthy_threshold", int_range(1), _HEALTH.healthy_threshold),
        unhealthy_threshold=b.get("unhealthy_threshold", int_range(1), _HEALTH.unhealthy_threshold),
    )


def _passive_health(b: _Block) -> model.PassiveHealthConfig:
    return model.PassiveHealthConfig(
        consecutive_failures=b.get("consecutive_failures", int_range(1), _PASSIVE.consecutive_failures),
        ejection_time=b.get("ejection_time", duration(positive=True), _PASSIVE.ejection_time),
    )


def _circuit_breaker(b: _Block) -> model.CircuitBreakerConfig:
    return model.CircuitBreakerConfig(
        failure_threshold=b.get("failure_threshold", int_range(1), _BREAKER.failure_threshold),
        recovery_timeout=b.get("recovery_timeout", duration(positive=True), _BREAKER.recovery_timeout),
        success_threshold=b.get("success_threshold", int_range(1), _BREAKER.success_threshold),
    )


_RETRY_KEYS = ("attempts", "backoff_base", "backoff_max", "on", "methods", "budget_ratio")


def _retry(b: _Block) -> model.RetryConfig:
    base = b.get("backoff_base", duration(), _RETRY.backoff_base)
    ceiling = b.get("backoff_max", duration(), _RETRY.backoff_max)
    if b.given("backoff_max") and ceiling < base:
        b.ctx.problem(b.at("backoff_max"), f"must be >= backoff_base ({base:g}), got {ceiling:g}")
    return model.RetryConfig(
        attempts=b.get("attempts", int_range(1, 100), _RETRY.attempts),
        backoff_base=base,
        backoff_max=ceiling,
        on=b.items("on", to_retry_condition, _RETRY.on),
        methods=b.items("methods", to_method, _RETRY.methods),
        budget_ratio=b.get("budget_ratio", float_range(0, 1), _RETRY.budget_ratio),
    )


def _timeouts(b: _Block) -> model.TimeoutsConfig:
    return model.TimeoutsConfig(
        connect=b.get("connect", duration(positive=True), _TIMEOUTS.connect),
        request=b.get("request", duration(positive=True), _TIMEOUTS.request),
        idle=b.get("idle", duration(positive=True), _TIMEOUTS.idle),
        total=b.get("total", duration(positive=True), _TIMEOUTS.total),
    )


def _pool(b: _Block) -> model.PoolConfig:
    return model.PoolConfig(
        max_connections_per_host=b.get("max_connections_per_host", int_range(1), _POOL.max_connections_per_host),
        idle_timeout=b.get("idle_timeout", duration(), _POOL.idle_timeout),
    )


def _fallback(b: _Block, name: str, names: Sequence[str]) -> model.FallbackConfig:
    other = b.get("upstream", to_nonempty_str, None)
    if other is not None:
        if other == name:
            b.ctx.problem(b.at("upstream"), "an upstream cannot fall back to itself")
            other = None
        elif other not in names:
            b.ctx.problem(b.at("upstream"), _unknown_upstream(other, names))
            other = None
    return model.FallbackConfig(
        status=b.get("status", int_range(100, 599), _FALLBACK.status),
        body=b.get("body", to_str, _FALLBACK.body),
        content_type=b.get("content_type", to_nonempty_str, _FALLBACK.content_type),
        upstream=other,
    )


def _check_fallback_cycles(ctx: _Context, path: str, upstreams: Mapping[str, model.UpstreamConfig]) -> None:
    reported: set[str] = set()
    for start in upstreams:
        chain = [start]
        current = upstreams[start]
        while current.fallback is not None:
            following = current.fallback.upstream
            if following is None or following not in upstreams:
                break
            if following in chain:
                cycle = chain[chain.index(following) :]
                if not reported.intersection(cycle):
                    ctx.problem(
                        child_path(child_path(child_path(path, start), "fallback"), "upstream"),
                        "fallback cycle: " + " -> ".join([*cycle, following]),
                    )
                reported.update(cycle)
                break
            chain.append(following)
            current = upstreams[following]


def _unknown_upstream(name: str, names: Sequence[str]) -> str:
    known = ", ".join(sorted(names)) or "none configured"
    return f"unknown upstream {name!r} (known: {known}){did_you_mean(name, names)}"


# -- routes -------------------------------------------------------------------

_ROUTE_KEYS = (
    "name", "match", "upstream", "strip_prefix", "rewrite", "timeout", "auth", "roles",
    "rate_limit", "cache", "websocket", "max_body_bytes", "headers",
)  # fmt: skip
_MATCH_KEYS = ("path", "methods", "host", "headers")
_ROUTE_HINTS = {key: f"match.{key}" for key in ("path", "methods", "method", "host")}


def to_host_pattern(value: object) -> str:
    text = to_nonempty_str(value).strip().lower()
    bare = text.removeprefix("*.")
    if not _HOST_LABELS.match(bare) and not _is_ip(bare):
        raise ValueError(f"expected a host name such as api.example.com or *.example.com, got {text!r}")
    return text


def _compile_path(path: str) -> PathPattern:
    from txgateway.routing.pattern import compile_pattern

    return compile_pattern(path)


def _routes(
    ctx: _Context,
    top: _Block,
    upstreams: Mapping[str, model.UpstreamConfig],
    rate_limit: model.RateLimitConfig | None,
) -> tuple[model.RouteConfig, ...]:
    raw = top.data.get("routes")
    path = top.at("routes")
    if raw is None or isinstance(raw, Unresolved):
        return ()
    if not isinstance(raw, list):
        ctx.problem(path, f"expected a list of routes, got {describe(raw)}")
        return ()
    routes: list[model.RouteConfig] = []
    names: dict[str, str] = {}
    for index, value in enumerate(raw):
        at = item_path(path, index)
        b = _Block(ctx, at, value, _ROUTE_KEYS, hints=_ROUTE_HINTS)
        if not b.ok:
            continue
        name = b.get("name", to_nonempty_str, f"route-{index}")
        if name in names:
            ctx.problem(b.at("name"), f"duplicate route name {name!r} (also {names[name]})")
        else:
            names[name] = at
        route = _route(b, name, upstreams, rate_limit)
        if route is not None:
            routes.append(route)
    return tuple(routes)


def _route(
    b: _Block,
    name: str,
    upstreams: Mapping[str, model.UpstreamConfig],
    rate_limit: model.RateLimitConfig | None,
) -> model.RouteConfig | None:
    ctx = b.ctx
    mb = b.block("match", _MATCH_KEYS, hints={"method": "methods"})
    pattern_text = mb.require("path", to_abs_path)
    pattern: PathPattern | None = None
    if pattern_text is not None:
        try:
            pattern = _compile_path(pattern_text)
        except ValueError as error:
            ctx.problem(mb.at("path"), str(error))
    match = model.RouteMatch(
        path=pattern_text or "/",
        methods=mb.items("methods", to_method),
        host=mb.get("host", to_host_pattern, None),
        headers=mb.mapping("headers", to_header_name, to_header_value),
    )

    upstream = b.require("upstream", to_nonempty_str)
    if upstream is not None and upstream not in upstreams:
        ctx.problem(b.at("upstream"), _unknown_upstream(upstream, list(upstreams)))

    strip_prefix = b.get("strip_prefix", to_abs_path, None)
    if strip_prefix is not None:
        _check_strip_prefix(b, strip_prefix, pattern.source if pattern is not None else None)
    rewrite = b.get("rewrite", to_abs_path, None)
    if rewrite is not None and pattern is not None:
        _check_rewrite(b, rewrite, pattern.param_names)

    timeout = b.get("timeout", duration(positive=True), None)
    auth = b.get("auth", choice(ROUTE_AUTH), None)
    roles = b.items("roles", to_nonempty_str)
    route_rate_limit = None
    if b.given("rate_limit"):
        route_rate_limit = _rate_limit(
            b.block("rate_limit", _RATE_LIMIT_KEYS), rate_limit or _RATE_LIMIT, inherit_tiers=False
        )
    route_cache = None
    if b.given("cache"):
        cb = b.block("cache", ("enabled", "ttl"))
        route_cache = model.RouteCacheConfig(
            enabled=cb.get("enabled", to_bool, _ROUTE_CACHE.enabled),
            ttl=cb.get("ttl", duration(), _ROUTE_CACHE.ttl),
        )
    websocket = b.get("websocket", to_bool, False)
    max_body_bytes = b.get("max_body_bytes", size(), None)
    hb = b.block("headers", ("request", "response"))
    return model.RouteConfig(
        name=name,
        match=match,
        upstream=upstream or "",
        strip_prefix=strip_prefix,
        rewrite=rewrite,
        timeout=timeout,
        auth=auth,
        roles=roles,
        rate_limit=route_rate_limit,
        cache=route_cache,
        websocket=websocket,
        max_body_bytes=max_body_bytes,
        request_headers=_header_ops(hb.block("request", ("set", "remove"))),
        response_headers=_header_ops(hb.block("response", ("set", "remove"))),
    )


def _check_strip_prefix(b: _Block, prefix: str, pattern_text: str | None) -> None:
    """Flag a malformed prefix, or one that can never match the path's static start."""
    from txgateway.routing.pattern import compile_strip_prefix

    try:
        compile_strip_prefix(prefix)
    except ValueError as error:
        b.ctx.problem(b.at("strip_prefix"), str(error))
        return
    if pattern_text is None:
        return
    static = re.split(r"[{*]", pattern_text, maxsplit=1)[0]
    dynamic = len(static) < len(pattern_text)
    trimmed = prefix.rstrip("/") or "/"
    if trimmed == "/":
        return
    if len(trimmed) <= len(static) or not dynamic:
        if pattern_text.startswith(trimmed) and pattern_text[len(trimmed) : len(trimmed) + 1] in ("", "/"):
            return
        b.ctx.problem(
            b.at("strip_prefix"),
            f"{prefix!r} is not a prefix of the route's path {pattern_text!r}, so it would never apply",
        )


def _check_rewrite(b: _Block, rewrite: str, params: Sequence[str]) -> None:
    from txgateway.routing.pattern import compile_rewrite

    available = f"available: {', '.join(params)}" if params else "the path has no parameters"
    missing = [name for name in _REWRITE_PARAM.findall(rewrite) if name not in params]
    for name in _unique(missing):
        b.ctx.problem(
            b.at("rewrite"),
            f"uses {{{name}}} but the path pattern has no such parameter ({available})"
            + did_you_mean(name, params),
        )
    if not missing:
        try:
            compile_rewrite(rewrite, params)
        except ValueError as error:
            b.ctx.problem(b.at("rewrite"), str(error))


def _header_ops(b: _Block) -> model.HeaderOps:
    return model.HeaderOps(
        set=b.mapping("set", to_header_name, to_header_value),
        remove=b.items("remove", to_header_name),
    )


# -- middleware ---------------------------------------------------------------

_RATE_LIMIT_KEYS = (
    "enabled", "algorithm", "requests_per_minute", "burst_size", "key", "tiers", "storage",
    "redis", "on_storage_error",
)  # fmt: skip
_AUTH_KEYS = ("enabled", "jwt_secret", "jwt", "api_keys", "exclude_paths", "forward_claims")
_JWT_KEYS = (
    "algorithms", "secret", "jwks_url", "jwks_refresh", "public_key_file", "issuer", "audience",
    "leeway", "query_param", "roles_claim", "permissions_claim",
)  # fmt: skip


def _middleware(b: _Block) -> model.MiddlewareConfig:
    rate_limit = None
    if b.given("rate_limit"):
        rate_limit = _rate_limit(b.block("rate_limit", _RATE_LIMIT_KEYS), _RATE_LIMIT, inherit_tiers=True)
    cors = _cors(b.block("cors", ("allow_origins", "allow_methods", "allow_headers", "max_age"))) if b.given("cors") else None
    return model.MiddlewareConfig(
        enabled=b.get("enabled", to_bool, True),
        auth=_auth(b.block("auth", _AUTH_KEYS)) if b.given("auth") else _AUTH,
        rate_limit=rate_limit,
        cache=_cache(b.block("cache", ("enabled", "storage", "max_bytes", "max_object_bytes", "redis"))),
        cors=cors,
    )


_CUSTOM_KEYS = ("name", "factory", "options", "routes")


def _custom_middlewares(ctx: _Context, mb: _Block, route_names: set[str]) -> tuple[model.CustomMiddlewareConfig, ...]:
    """``middleware.custom``: users' middlewares, their factories resolved now so
    ``txgateway check`` reports a wrong module path instead of the first request."""
    from txgateway.pipeline.custom import resolve_factory

    raw = mb.data.get("custom") if mb.ok else None
    path = mb.at("custom")
    if raw is None or isinstance(raw, Unresolved):
        return ()
    if not isinstance(raw, list):
        ctx.problem(path, f"expected a list of middlewares, got {describe(raw)}")
        return ()
    entries: list[model.CustomMiddlewareConfig] = []
    names: set[str] = set()
    for index, value in enumerate(raw):
        b = _Block(ctx, item_path(path, index), value, _CUSTOM_KEYS)
        if not b.ok:
            continue
        name = b.require("name", to_nonempty_str)
        factory = b.require("factory", to_nonempty_str)
        if name is not None:
            if name in names:
                ctx.problem(b.at("name"), f"duplicate middleware name {name!r}")
            names.add(name)
        if factory is not None:
            try:
                resolve_factory(factory)
            except ValueError as error:
                ctx.problem(b.at("factory"), str(error))
        options = b.data.get("options", {})
        if not isinstance(options, dict):
            ctx.problem(b.at("options"), f"expected a mapping, got {describe(options)}")
            options = {}
        routes = b.items("routes", to_nonempty_str)
        for i, route in enumerate(routes):
            if route not in route_names:
                ctx.problem(
                    item_path(b.at("routes"), i),
                    f"unknown route {route!r}" + did_you_mean(route, sorted(route_names)),
                )
        if name is not None and factory is not None:
            entries.append(model.CustomMiddlewareConfig(name, factory, dict(options), routes))
    return tuple(entries)


def to_algorithm(value: object) -> str:
    text = to_str(value)
    if text.strip().lower() == "none":
        raise ValueError("alg none is never allowed")
    if text not in JWT_ALGORITHMS:
        upper = {alg.upper(): alg for alg in JWT_ALGORITHMS}
        if text.upper() in upper:
            return upper[text.upper()]
        raise ValueError(
            f"unknown algorithm {text!r} (allowed: {', '.join(JWT_ALGORITHMS)})" + did_you_mean(text, JWT_ALGORITHMS)
        )
    return text


def to_sha256(value: object) -> str:
    text = to_str(value).strip()
    if not _SHA256.match(text):
        raise ValueError("expected the key's SHA-256 as 64 hex characters (e.g. from: printf %s KEY | sha256sum)")
    return text.lower()


def _auth(b: _Block) -> model.AuthConfig:
    enabled = b.get("enabled", to_bool, True)
    secret = b.get("jwt_secret", to_nonempty_str, None)
    jwt: model.JWTConfig | None = None
    if b.given("jwt"):
        jwt = _jwt(b.block("jwt", _JWT_KEYS), b, secret)
    elif b.given("jwt_secret"):
        jwt = model.JWTConfig(algorithms=("HS256",), secret=secret)
    header = _AUTH.api_key_header
    keys: tuple[model.APIKey, ...] = ()
    if b.given("api_keys"):
        header, keys = _api_keys(b.block("api_keys", ("header", "keys")))
    if enabled and b.ok and not (b.given("jwt") or b.given("jwt_secret") or b.given("api_keys")):
        b.ctx.problem(b.path, "enabled, but nothing can authenticate a request: set jwt_secret, jwt or api_keys (or enabled: false)")
    return model.AuthConfig(
        enabled=enabled,
        jwt=jwt,
        api_key_header=header,
        api_keys=keys,
        exclude_paths=b.items("exclude_paths", to_abs_path),
        forward_claims=b.mapping("forward_claims", to_nonempty_str, to_header_name),
    )


def _jwt(b: _Block, auth: _Block, shortcut_secret: str | None) -> model.JWTConfig:
    """The ``jwt`` block, merged with the seed's ``jwt_secret`` shortcut.

    ``jwt_secret`` is HS256's key: when the algorithm list has no HMAC entry it
    gains HS256, so the shortcut keeps working beside asymmetric keys.
    """
    secret = b.get("secret", to_nonempty_str, None)
    has_secret = b.given("secret") or auth.given("jwt_secret")
    if secret is not None and shortcut_secret is not None and secret != shortcut_secret:
        b.ctx.problem(b.at("secret"), "differs from middleware.auth.jwt_secret: give one of them")
    secret = secret or shortcut_secret
    algorithms = b.items("algorithms", to_algorithm, _JWT.algorithms)
    if b.given("algorithms") and not algorithms and b.data["algorithms"] == []:
        b.ctx.problem(b.at("algorithms"), "needs at least one algorithm")
    if auth.given("jwt_secret") and not any(alg.startswith("HS") for alg in algorithms):
        algorithms = ("HS256", *algorithms)
    hmac = [alg for alg in algorithms if alg.startswith("HS")]
    public = [alg for alg in algorithms if not alg.startswith("HS")]
    if hmac and not has_secret and b.ok:
        b.ctx.problem(b.at("algorithms"), f"{', '.join(hmac)} needs a shared secret: set jwt.secret or jwt_secret")
    if public and not (b.given("jwks_url") or b.given("public_key_file")) and b.ok:
        b.ctx.problem(b.at("algorithms"), f"{', '.join(public)} needs keys: set jwt.jwks_url or jwt.public_key_file")
    return model.JWTConfig(
        algorithms=algorithms,
        secret=secret,
        jwks_url=b.get("jwks_url", to_url(("https", "http")), None),
        jwks_refresh=b.get("jwks_refresh", duration(positive=True), _JWT.jwks_refresh),
        public_key_file=b.get("public_key_file", to_public_key_file, None),
        issuer=b.get("issuer", to_nonempty_str, None),
        audience=b.get("audience", to_nonempty_str, None),
        leeway=b.get("leeway", duration(), _JWT.leeway),
        query_param=b.get("query_param", to_nonempty_str, None),
        roles_claim=b.get("roles_claim", to_nonempty_str, _JWT.roles_claim),
        permissions_claim=b.get("permissions_claim", to_nonempty_str, _JWT.permissions_claim),
    )


def _api_keys(b: _Block) -> tuple[str, tuple[model.APIKey, ...]]:
    header = b.get("header", to_header_name, _AUTH.api_key_header)
    keys: list[model.APIKey] = []
    raw, path = b.data.get("keys"), b.at("keys")
    if raw is not None and not isinstance(raw, Unresolved):
        if not isinstance(raw, list):
            b.ctx.problem(path, f"expected a list of keys, got {describe(raw)}")
            raw = []
        for index, item in enumerate(raw):
            kb = _Block(b.ctx, item_path(path, index), item, ("sha256", "consumer", "roles"), hints={"key": "sha256"})
            digest = kb.require("sha256", to_sha256)
            consumer = kb.require("consumer", to_nonempty_str)
            roles = kb.items("roles", to_nonempty_str)
            if digest is None or consumer is None:
                continue
            if any(key.sha256 == digest for key in keys):
                b.ctx.problem(kb.at("sha256"), "duplicate key")
                continue
            keys.append(model.APIKey(sha256=digest, consumer=consumer, roles=roles))
    return header, tuple(keys)


def _rate_limit(b: _Block, base: model.RateLimitConfig, inherit_tiers: bool) -> model.RateLimitConfig:
    """A rate limit; a route's starts from ``middleware.rate_limit`` (minus its tiers)."""
    burst = b.get("burst_size", int_range(1), base.burst_size)
    redis = b.block("redis", ("url", "timeout"))
    tiers: list[Mapping[str, object]] = list(base.tiers) if inherit_tiers else []
    if b.given("tiers"):
        tiers = []
        raw, path = b.data["tiers"], b.at("tiers")
        if not isinstance(raw, (list, Unresolved)):
            b.ctx.problem(path, f"expected a list of tiers, got {describe(raw)}")
        elif isinstance(raw, list):
            for index, item in enumerate(raw):
                tb = _Block(
                    b.ctx, item_path(path, index), item, ("role", "permission", "requests_per_minute", "burst_size")
                )
                if not tb.ok:
                    continue
                # A tier matches a role or (the seed's way) a permission: exactly one of them.
                kind = "permission" if tb.given("permission") and not tb.given("role") else "role"
                if tb.given("role") and tb.given("permission"):
                    b.ctx.problem(tb.path, "give either role or permission, not both")
                name = tb.require(kind, to_nonempty_str)
                rpm = tb.require("requests_per_minute", int_range(1))
                tier_burst = tb.get("burst_size", int_range(1), burst)
                if name is not None and rpm is not None:
                    tiers.append({kind: name, "requests_per_minute": rpm, "burst_size": tier_burst})
    return model.RateLimitConfig(
        enabled=b.get("enabled", to_bool, base.enabled),
        algorithm=b.get("algorithm", choice(("token_bucket", "sliding_window")), base.algorithm),
        requests_per_minute=b.get("requests_per_minute", int_range(1), base.requests_per_minute),
        burst_size=burst,
        key=b.get("key", to_rate_limit_key, base.key),
        tiers=tuple(tiers),
        storage=b.get("storage", choice(("memory", "redis")), base.storage),
        redis_url=redis.get("url", to_url(("redis", "rediss", "unix")), base.redis_url),
        redis_timeout=redis.get("timeout", duration(positive=True), base.redis_timeout),
        on_storage_error=b.get("on_storage_error", choice(("allow", "deny", "local")), base.on_storage_error),
    )


def _cache(b: _Block) -> model.CacheConfig:
    max_bytes = b.get("max_bytes", size(positive=True), _CACHE.max_bytes)
    max_object = b.get("max_object_bytes", size(positive=True), _CACHE.max_object_bytes)
    if max_object > max_bytes:
        b.ctx.problem(b.at("max_object_bytes"), f"must be <= max_bytes ({max_bytes}), got {max_object}")
    redis = b.block("redis", ("url", "timeout"))
    return model.CacheConfig(
        enabled=b.get("enabled", to_bool, _CACHE.enabled),
        storage=b.get("storage", choice(("memory", "redis")), _CACHE.storage),
        max_bytes=max_bytes,
        max_object_bytes=max_object,
        redis_url=redis.get("url", to_url(("redis", "rediss", "unix")), _CACHE.redis_url),
        redis_timeout=redis.get("timeout", duration(positive=True), _CACHE.redis_timeout),
    )


def to_origin(value: object) -> str:
    text = to_nonempty_str(value).strip()
    if not _ORIGIN.match(text):
        raise ValueError(f"expected '*' or an origin such as https://app.example.com (no path), got {text!r}")
    return text.rstrip("/")


def to_cors_header(value: object) -> str:
    text = to_str(value)
    return "*" if text == "*" else to_header_name(text)


def _cors(b: _Block) -> model.CORSConfig:
    return model.CORSConfig(
        allow_origins=b.items("allow_origins", to_origin, _CORS.allow_origins),
        allow_methods=b.items("allow_methods", to_method, _CORS.allow_methods),
        allow_headers=b.items("allow_headers", to_cors_header, _CORS.allow_headers),
        max_age=b.get("max_age", int_range(0), _CORS.max_age),
    )


# -- observability ------------------------------------------------------------


def _observability(b: _Block) -> model.ObservabilityConfig:
    lb = b.block("access_log", ("enabled", "format", "path"))
    mb = b.block("metrics", ("enabled",))
    tb = b.block("tracing", ("enabled", "otlp_endpoint", "sample_ratio", "service_name"))
    tracing_present = bool(tb.data)
    tracing_enabled = tb.get("enabled", to_bool, True if tracing_present else _TRACING.enabled)
    if tracing_enabled:
        from txgateway.observability.tracing import export_unavailable

        missing = export_unavailable()
        if missing is not None:
            tb.ctx.problem(
                tb.at("enabled"),
                f"span export needs the OpenTelemetry SDK, which is not installed ({missing}): "
                "pip install txgateway[tracing]",
            )
    return model.ObservabilityConfig(
        access_log=model.AccessLogConfig(
            enabled=lb.get("enabled", to_bool, _ACCESS_LOG.enabled),
            format=lb.get("format", choice(("json", "combined")), _ACCESS_LOG.format),
            path=lb.get("path", to_nonempty_str, _ACCESS_LOG.path),
        ),
        metrics_enabled=mb.get("enabled", to_bool, _OBSERVABILITY.metrics_enabled),
        tracing=model.TracingConfig(
            enabled=tracing_enabled,
            otlp_endpoint=tb.get("otlp_endpoint", to_url(("http", "https")), _TRACING.otlp_endpoint),
            sample_ratio=tb.get("sample_ratio", float_range(0, 1), _TRACING.sample_ratio),
            service_name=tb.get("service_name", to_nonempty_str, _TRACING.service_name),
        ),
    )
