"""Span export over OTLP/HTTP with the OpenTelemetry SDK (the ``tracing`` extra).

Imported only when ``observability.tracing.enabled``.  Spans are made after
the fact, from each finished exchange (a ``Gateway`` observer), with its
recorded times and exactly the ids :mod:`txgateway.observability.tracing`
propagated.  Only sampled exchanges make spans.

They are built as the SDK's ``ReadableSpan`` (what a tracer hands its span
processors when a span ends) and given to its ``BatchSpanProcessor``, not
started and ended through a ``Tracer``: the ids are ours already, and the
tracer's per-span work (sampler, context, attribute validation) made a
sampled request cost about 90 us on the reactor thread against about 15 us
this way (bench/tracing_cost.py).  The SDK documents ``ReadableSpan`` as
built by its tracer; its constructor has kept its signature since 1.0 and
tests/test_tracing.py exports through it.

The batch processor sends spans from its own thread, so a slow or dead
collector never blocks the reactor.  The queue is bounded: when
``QUEUE_SIZE`` spans are waiting, new ones are dropped here and counted.  A
failing export is logged once (with the exporter's reason) and again when it
recovers; the exporter's own per-retry warnings are not printed.  The
standard ``OTEL_BSP_*`` (batching: ``OTEL_BSP_SCHEDULE_DELAY`` in
milliseconds...) and ``OTEL_EXPORTER_OTLP_TRACES_*`` (headers, timeout,
certificates) environment variables apply.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode
from opentelemetry.util.types import AttributeValue
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from txgateway import __version__
from txgateway.config.model import TracingConfig
from txgateway.pipeline.context import RequestContext

#: Spans waiting for export at most; more are dropped (and counted).
QUEUE_SIZE = 2048
#: Seconds ``stop()`` waits for the last export before giving up on it.
STOP_TIMEOUT = 5.0

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)
_ERROR = Status(StatusCode.ERROR)
_NO_RESPONSE = Status(StatusCode.ERROR, "no response from the upstream")


class _ExporterMessages(logging.Handler):
    """Takes the OTLP exporter's log records (a warning per retry) instead of
    printing them; the first since the last export says why it failed
    ("Connection refused", "401 Unauthorized")."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._first: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self._first is None:
            try:
                self._first = record.getMessage()
            except Exception:  # noqa: BLE001 - a malformed record must not break the export thread
                self._first = str(record.msg)

    def take(self) -> str | None:
        first, self._first = self._first, None
        return first


_exporter_messages: _ExporterMessages | None = None


def _take_exporter_messages() -> _ExporterMessages:
    global _exporter_messages
    if _exporter_messages is None:
        _exporter_messages = _ExporterMessages()
        exporter_log = logging.getLogger("opentelemetry.exporter.otlp")
        exporter_log.addHandler(_exporter_messages)
        exporter_log.propagate = False
    return _exporter_messages


class _Accounting(SpanExporter):
    """Wraps the real exporter, in the export thread: counts what was
    exported or lost, and tells the reactor when exporting starts failing
    or works again."""

    def __init__(self, inner: SpanExporter, owner: TraceExport, messages: _ExporterMessages | None) -> None:
        self._inner = inner
        self._owner = owner
        self._messages = messages
        self._failing = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        reason: str | None = None
        try:
            result = self._inner.export(spans)
        except Exception as error:  # noqa: BLE001 - an exporter bug must not end the export thread
            result, reason = SpanExportResult.FAILURE, repr(error)
        owner = self._owner
        said = self._messages.take() if self._messages is not None else None
        if result == SpanExportResult.SUCCESS:
            owner.exported += len(spans)
            if self._failing:
                self._failing = False
                owner.from_thread(owner.export_recovered)
        else:
            owner.failed += len(spans)
            if not self._failing:
                self._failing = True
                reason = reason or said or "export failed"
                owner.from_thread(owner.export_failing, reason)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class TraceExport:
    """The gateway's spans, exported over OTLP/HTTP; one per tracing config.

    Lives in ``Runtime.shared`` (reloads keep it, its queue and its thread)
    and is stopped with the runtime.  ``exchange_done`` is the ``Gateway``
    observer.  ``reactor`` provides ``IReactorFromThreads`` and
    ``IReactorTime``.  ``exporter`` replaces the OTLP/HTTP exporter (tests).
    """

    log = Logger()

    def __init__(
        self,
        config: TracingConfig,
        reactor: Any,
        exporter: SpanExporter | None = None,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.endpoint = config.otlp_endpoint
        self._reactor = reactor
        self.queue_size = queue_size
        #: Spans handed to the batch processor; of those, exported and failed
        #: (both written by the export thread only); and spans dropped here
        #: because the queue was full.
        self.handed = 0
        self.exported = 0
        self.failed = 0
        self.dropped = 0
        self._stopped = False
        self._resource = Resource.create({SERVICE_NAME: config.service_name})
        self._scope = InstrumentationScope("txgateway", __version__)
        messages = None
        if exporter is None:
            messages = _take_exporter_messages()
            exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint)
        self._processor = BatchSpanProcessor(
            _Accounting(exporter, self, messages),
            max_queue_size=queue_size,
            max_export_batch_size=min(512, queue_size),
        )

    def exchange_done(self, ctx: RequestContext) -> None:
        """Make the spans of a finished, sampled exchange: the gateway's server
        span and, when an upstream was called, the client span of its last attempt."""
        trace = ctx.trace
        if trace is None or not trace.sampled or self._stopped:
            return
        upstream_started = ctx.upstream_started
        client_span_id = trace.client_span_id if upstream_started is not None else None
        count = 1 if client_span_id is None else 2
        if self.handed - self.exported - self.failed + count > self.queue_size:
            if not self.dropped:
                self.log.warn(
                    "span export to {endpoint} is behind: {queued} spans queued; dropping spans (logged once)",
                    endpoint=self.endpoint,
                    queued=self.handed - self.exported - self.failed,
                )
            self.dropped += count
            return
        self.handed += count

        trace_id = int(trace.trace_id, 16)
        state = TraceState.from_header([trace.tracestate.decode("ascii")]) if trace.tracestate else None
        server = SpanContext(trace_id, int(trace.span_id, 16), False, _SAMPLED, state)
        caller = (
            SpanContext(trace_id, int(trace.parent_id, 16), True, _SAMPLED, state)
            if trace.parent_id is not None
            else None
        )
        route = ctx.route
        method = ctx.method.decode("latin-1")
        status = ctx.status
        attributes: dict[str, AttributeValue] = {
            "http.request.method": method,
            "url.scheme": ctx.scheme.decode("latin-1"),
            "url.path": ctx.path,
            "client.address": ctx.client_address,
            "network.protocol.version": "2" if ctx.version[0] == 2 else f"{ctx.version[0]}.{ctx.version[1]}",
            "txgateway.protocol": ctx.protocol,
            "txgateway.request_id": ctx.request_id,
        }
        if status:
            attributes["http.response.status_code"] = status
        if route is not None:
            name = f"{method} {route.name}"
            attributes["http.route"] = route.match.path
            attributes["txgateway.route"] = route.name
        else:
            name = method
        started = _nanoseconds(ctx.started)
        ended = max(started, _nanoseconds(ctx.ended))
        resource, scope, on_end = self._resource, self._scope, self._processor.on_end

        if client_span_id is not None and upstream_started is not None:
            host, _, port = (ctx.upstream_address or "").rpartition(":")
            upstream = route.upstream if route is not None else ""
            client_attributes: dict[str, AttributeValue] = {
                "http.request.method": method,
                "server.address": host.strip("[]"),
                "url.path": ctx.upstream_path,
                "txgateway.upstream": upstream,
            }
            if port.isdigit():
                client_attributes["server.port"] = int(port)
            answered = trace.upstream_status
            if answered is not None:
                client_attributes["http.response.status_code"] = answered
            client_started = _nanoseconds(upstream_started)
            client_ended = ctx.upstream_ended
            on_end(
                ReadableSpan(
                    f"{method} {upstream}".rstrip(),
                    SpanContext(trace_id, int(client_span_id, 16), False, _SAMPLED, state),
                    server,
                    resource,
                    client_attributes,
                    kind=SpanKind.CLIENT,
                    status=_NO_RESPONSE if answered is None else _ERROR if answered >= 500 else _UNSET,
                    start_time=client_started,
                    end_time=max(client_started, _nanoseconds(client_ended) if client_ended is not None else ended),
                    instrumentation_scope=scope,
                )
            )
        on_end(
            ReadableSpan(
                name,
                server,
                caller,
                resource,
                attributes,
                kind=SpanKind.SERVER,
                status=_ERROR if status >= 500 or not status else _UNSET,
                start_time=started,
                end_time=ended,
                instrumentation_scope=scope,
            )
        )

    # Reports from the export thread, run in the reactor thread.

    def from_thread(self, call: Any, *args: object) -> None:
        try:
            self._reactor.callFromThread(call, *args)
        except Exception:  # noqa: BLE001 - the reactor is gone (shutting down): nothing to tell
            pass

    def export_failing(self, reason: str) -> None:
        self.log.warn(
            "span export to {endpoint} failing: {reason}; spans are dropped until it recovers (logged once)",
            endpoint=self.endpoint,
            reason=reason,
        )

    def export_recovered(self) -> None:
        self.log.info(
            "span export to {endpoint} recovered; {failed} spans lost meanwhile",
            endpoint=self.endpoint,
            failed=self.failed,
        )

    # Stopping.

    def flush(self) -> None:
        """Export what is queued now, in this thread (blocks: tests and shutdown only)."""
        self._processor.force_flush()

    def shutdown(self) -> None:
        """Export what is queued and stop the export thread, in this thread (blocks)."""
        self._stopped = True
        self._processor.shutdown()

    def stop(self) -> Deferred[None]:
        """Export what is queued and stop, off the reactor thread; fires when done or
        after ``STOP_TIMEOUT`` (a dead collector must not hold up the shutdown)."""
        if self._stopped:
            return succeed(None)
        self._stopped = True
        done: Deferred[None] = Deferred()

        def finished(failure: Failure | None) -> None:
            if failure is not None:
                self.log.failure("span export shutdown failed", failure)
            if not done.called:
                done.callback(None)

        def shutdown() -> None:
            failure = None
            try:
                self._processor.shutdown()
            except Exception:  # noqa: BLE001 - reported in the reactor thread
                failure = Failure()
            self.from_thread(finished, failure)

        threading.Thread(target=shutdown, name="txgateway-span-export-stop", daemon=True).start()
        done.addTimeout(STOP_TIMEOUT, self._reactor, onTimeoutCancel=self._gave_up)
        done.addCallback(self._stopped_log)
        return done

    def _gave_up(self, result: object, timeout: float) -> None:
        self.log.warn(
            "span export to {endpoint} still busy after {timeout}s at shutdown; queued spans are lost",
            endpoint=self.endpoint,
            timeout=timeout,
        )

    def _stopped_log(self, _: object) -> None:
        self.log.info(
            "span export stopped: {exported} spans exported, {failed} failed, {dropped} dropped",
            exported=self.exported,
            failed=self.failed,
            dropped=self.dropped,
        )


def _nanoseconds(seconds: float) -> int:
    return int(seconds * 1e9)
