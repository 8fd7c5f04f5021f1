"""W3C Trace Context: read ``traceparent``/``tracestate``, start traces, propagate them.

Every request gets a :class:`TraceContext` in ``Gateway.handle`` (always, even
with ``observability.tracing.enabled: false``: propagation is cheap).  A valid
``traceparent`` from the client is continued: its trace id and sampled flag
are kept (parent-based sampling) and its span id becomes the parent of the
gateway's server span.  An absent or invalid one (strictly per the W3C Trace
Context recommendation: version ``00`` exactly, lower-case hex, non-zero ids;
a repeated header is invalid too) starts a new trace, sampled with
probability ``sample_ratio`` decided from the trace id as OpenTelemetry's
``TraceIdRatioBased`` does.  ``tracestate`` is kept only with a valid
``traceparent`` and only when it is a valid list itself, and is passed on
unchanged.

Each upstream attempt is a client span of its own: :meth:`TraceContext.upstream_headers`
makes its id and the ``traceparent`` the upstream gets.  The client's own
``traceparent`` is never forwarded.

Exporting spans (OTLP/HTTP through the OpenTelemetry SDK, an optional
dependency: ``pip install txgateway[tracing]``) lives in
:mod:`txgateway.observability._otlp`, imported only when tracing is enabled.
"""

from __future__ import annotations

import random
import re
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from twisted.python.failure import Failure

from txgateway.errors import GatewayError

if TYPE_CHECKING:
    from txgateway.config.model import TracingConfig
    from txgateway.messages import Response
    from txgateway.observability._otlp import TraceExport
    from txgateway.pipeline.context import RequestContext

Headers = list[tuple[bytes, bytes]]

#: Response header naming the trace of the exchange (when tracing is enabled).
TRACE_ID_HEADER = b"x-trace-id"

# version "-" trace-id "-" parent-id "-" trace-flags, then (future versions
# only) "-" and anything.  Lower-case hex only.
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z", re.DOTALL)
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
_ZERO_TRACE_HEX = "0" * 32
_ZERO_SPAN_HEX = "0" * 16
_OWS = b" \t"

# tracestate list members (W3C Trace Context, section 3.3.1): key "=" value,
# where the key is simple (lcalpha first) or multi-tenant (tenant@system).
_TRACESTATE_MEMBER = re.compile(
    rb"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
    rb"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]\Z"
)
#: At most this many list members; a longer tracestate is dropped whole.
TRACESTATE_MAX_MEMBERS = 32
#: A combined tracestate longer than this is dropped whole (the spec asks
#: every vendor to pass at least 512 characters on).
TRACESTATE_MAX_BYTES = 512

_LOW_64 = (1 << 64) - 1
_getrandbits = random.getrandbits  # reseeded in forked children by the random module


def new_span_id() -> str:
    """16 lower-case hex digits, never all zero."""
    span = _getrandbits(64)
    while not span:
        span = _getrandbits(64)
    return span.to_bytes(8, "big").hex()  # twice as fast as f"{span:016x}"


def parse_traceparent(value: bytes) -> tuple[str, str, bool] | None:
    """``(trace_id, parent_id, sampled)`` of a valid ``traceparent`` value, else None.

    Version ``00`` must be exactly 55 characters; a higher version (not
    ``ff``) is read by its first four fields when what follows them is
    nothing or a dash, as the recommendation asks of forward compatibility.
    Never raises.
    """
    match = _TRACEPARENT.match(value.strip(_OWS))
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == b"ff" or (rest is not None and version == b"00"):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id.decode("ascii"), parent_id.decode("ascii"), flags[1] in b"13579bdf"


def parse_tracestate(value: bytes) -> bytes | None:
    """``value`` when it is a valid ``tracestate`` list, else None (dropped whole).

    Valid: at most 32 members, each ``key=value`` per the grammar, no key
    twice, at most 512 bytes; empty members are allowed.  The value is passed
    on as received (the gateway adds no member of its own).
    """
    value = value.strip(_OWS)
    if not value or len(value) > TRACESTATE_MAX_BYTES:
        return None
    keys: set[bytes] = set()
    for member in value.split(b","):
        member = member.strip(_OWS)
        if not member:
            continue
        if _TRACESTATE_MEMBER.match(member) is None:
            return None
        key = member.partition(b"=")[0]
        if key in keys:
            return None
        keys.add(key)
    if not keys or len(keys) > TRACESTATE_MAX_MEMBERS:
        return None
    return value


class TraceContext:
    """The trace one request belongs to, and the gateway's spans in it."""

    __slots__ = (
        "client_span_id",
        "parent_id",
        "relay",
        "sampled",
        "span_id",
        "trace_id",
        "tracestate",
        "upstream_status",
    )

    def __init__(
        self,
        trace_id: str,
        span_id: str,
        parent_id: str | None,
        sampled: bool,
        tracestate: bytes | None = None,
    ) -> None:
        #: 32 lower-case hex digits.
        self.trace_id = trace_id
        #: The gateway's server span (16 hex digits).
        self.span_id = span_id
        #: The caller's span (from its traceparent); None when the trace starts here.
        self.parent_id = parent_id
        #: Whether the spans of this trace are recorded (and exported).
        self.sampled = sampled
        #: The caller's tracestate, passed on unchanged; None when absent or invalid.
        self.tracestate = tracestate
        #: The client span of the latest upstream attempt; None before any.
        self.client_span_id: str | None = None
        #: The status that attempt's response head gave; None: no response (yet).
        self.upstream_status: int | None = None
        #: Span export is off: a caller's traceparent goes to the upstream as it
        #: came, so the upstream's spans hang under the caller's, not under a
        #: gateway span nobody will ever see.
        self.relay = False

    def upstream_headers(self) -> Headers:
        """The trace headers of a new upstream attempt (a new client span).

        ``traceparent: 00-<trace id>-<client span id>-<flags>``, plus the
        caller's ``tracestate`` when there is one.
        """
        if self.relay and self.parent_id is not None:
            # No span of ours is exported: the upstream's parent is the caller's span.
            span_id = self.client_span_id = self.parent_id
        else:
            span_id = self.client_span_id = new_span_id()
        self.upstream_status = None
        traceparent = f"00-{self.trace_id}-{span_id}-{'01' if self.sampled else '00'}".encode("ascii")
        if self.tracestate is None:
            return [(b"traceparent", traceparent)]
        return [(b"traceparent", traceparent), (b"tracestate", self.tracestate)]

    def __repr__(self) -> str:
        return f"<TraceContext {self.trace_id} span={self.span_id} parent={self.parent_id} sampled={self.sampled}>"


class TraceContexts:
    """Gives each request its :class:`TraceContext`; one per gateway generation."""

    __slots__ = ("_bound", "_relay")

    def __init__(self, sample_ratio: float, exported: bool = True) -> None:
        #: Without span export, a caller's trace is relayed unchanged (see TraceContext.relay).
        self._relay = not exported
        # A new trace is sampled when the low 64 bits of its id fall below
        # the bound (OpenTelemetry's TraceIdRatioBased): 0 never, 1 always.
        self._bound = round(min(1.0, max(0.0, sample_ratio)) * (1 << 64))

    def for_request(self, headers: Headers) -> TraceContext:
        """Continue the caller's trace from ``headers`` when valid, else start one."""
        traceparent: bytes | None = None
        tracestate: bytes | None = None
        repeated = False
        for name, value in headers:
            if name == b"traceparent":
                repeated = traceparent is not None
                traceparent = value
            elif name == b"tracestate":
                tracestate = value if tracestate is None else tracestate + b"," + value
        if traceparent is not None and not repeated:
            parsed = parse_traceparent(traceparent)
            if parsed is not None:
                trace_id, parent_id, sampled = parsed
                state = parse_tracestate(tracestate) if tracestate is not None else None
                context = TraceContext(trace_id, new_span_id(), parent_id, sampled, state)
                context.relay = self._relay
                return context
        return self.new_trace()

    def new_trace(self) -> TraceContext:
        # One draw for the trace id (high 128 bits) and the span id (low 64).
        bits = _getrandbits(192)
        ids = bits.to_bytes(24, "big").hex()
        trace_id, span_id = ids[:32], ids[32:]
        while trace_id == _ZERO_TRACE_HEX or span_id == _ZERO_SPAN_HEX:
            bits = _getrandbits(192)
            ids = bits.to_bytes(24, "big").hex()
            trace_id, span_id = ids[:32], ids[32:]
        return TraceContext(trace_id, span_id, None, ((bits >> 64) & _LOW_64) < self._bound)


# The x-trace-id response header, added by Gateway.handle when tracing is enabled.


def tag_response(response: Response, ctx: RequestContext) -> Response:
    trace = ctx.trace
    if trace is not None:
        response.headers.append((TRACE_ID_HEADER, trace.trace_id.encode("ascii")))
    return response


def tag_error(failure: Failure, ctx: RequestContext) -> Failure:
    trace = ctx.trace
    if trace is not None and isinstance(failure.value, GatewayError):
        failure.value.headers.append((TRACE_ID_HEADER, trace.trace_id.encode("ascii")))
    return failure


# Export.


def export_unavailable() -> str | None:
    """Why spans cannot be exported here (the SDK is not installed), or None."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace.export  # noqa: F401
    except ImportError as error:
        return str(error)
    return None


def export_key(config: TracingConfig) -> Hashable:
    """The ``Runtime.shared`` key of the span export for ``config``: reloads that keep
    the tracing settings keep the exporter (its queue and thread)."""
    return ("trace-export", config)


def trace_export(config: TracingConfig, reactor: Any) -> TraceExport:
    """A :class:`~txgateway.observability._otlp.TraceExport` for ``config``.

    ``reactor`` provides ``IReactorFromThreads`` and ``IReactorTime``: the
    exporter's thread reports failures to it.  Needs the OpenTelemetry SDK.
    """
    from txgateway.observability._otlp import TraceExport

    return TraceExport(config, reactor)
