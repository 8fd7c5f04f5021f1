"""The access log: one line per finished exchange, JSON or Apache combined.

:class:`AccessLog` is an exchange observer (``Gateway.observers``); it formats
the exchange and hands the line to an :class:`AccessLogFile`, which buffers
lines and writes them on a short timer (every 0.5 s), as soon as 64 KiB are
waiting, and at ``stop()``: the reactor makes one ``write(2)`` per batch, not
one per request.  The file is opened once per (path, format) and kept in
``Runtime.shared``, so reloads keep writing to it; ``-`` is the process's
standard output (file descriptor 1, beside twistd's own log lines).  SIGUSR1
reopens every access log file (for logrotate's ``postrotate``), as twistd
does for its own log.

``json`` lines (keys in this order)::

    {"time": "2026-11-22T08:43:16.123Z", "request_id": "...", "trace_id": null,
     "client_ip": "203.0.113.7", "method": "GET", "route": "users-api",
     "path": "/api/users/7?access_token=REDACTED&page=2", "status": 200,
     "bytes_in": 0, "bytes_out": 512, "duration_ms": 3.412, "upstream_ms": 2.917,
     "upstream": "10.0.0.5:8080", "consumer": "ci-bot", "rate_limit": "allowed",
     "cache": "miss", "protocol": "http/1.1", "user_agent": "curl/8.5.0"}

``time`` is when the request head arrived (UTC, milliseconds); ``route`` is
null when no route matched; ``status`` 499 means the client went away before
the response ended; ``upstream_ms`` is the last upstream try, request sent to
response head; ``rate_limit`` is ``allowed``, ``limited``, ``storage_error``
or null (no rate limit on the route); ``cache`` ``hit``, ``miss``, ``bypass``
or null (the route does not cache).  ``combined`` is Apache's combined
format with the consumer as the user (``-`` when anonymous).

Secrets never reach a line: no header other than User-Agent (and Referer in
``combined``) is logged, and in the query the value of every parameter whose
name is the JWT query parameter (``middleware.auth.jwt.query_param``) or
looks secret (a word ``token``, ``key``, ``apikey``, ``password``,
``passwd``, ``pwd``, ``secret``, ``signature``, ``sig``, ``auth``,
``authorization``, ``jwt``, ``session``, ``credential(s)``, or a name ending
in ``token``, ``secret``, ``password`` or ``apikey``; case-insensitive,
words split on anything not a letter or digit) is replaced by ``REDACTED``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable
from functools import lru_cache
from json.encoder import encode_basestring_ascii
from typing import Any, Protocol
from urllib.parse import unquote_plus

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from txgateway.config.model import GatewayConfig
from txgateway.pipeline.context import RequestContext
from txgateway.runtime import Runtime

#: Seconds a line may wait in the buffer before it is written.
FLUSH_INTERVAL = 0.5
#: Buffered characters that trigger a write at once.
FLUSH_BYTES = 64 * 1024
#: What a secret query value is replaced with.
REDACTED = "REDACTED"
FORMATS = ("json", "combined")

_SECRET_WORDS = frozenset(
    {
        "token",
        "key",
        "apikey",
        "password",
        "passwd",
        "pwd",
        "secret",
        "signature",
        "sig",
        "auth",
        "authorization",
        "jwt",
        "session",
        "credential",
        "credentials",
    }
)
_SECRET_SUFFIXES = ("token", "secret", "password", "apikey")
_WORD = re.compile(r"[a-z0-9]+")


@lru_cache(maxsize=4096)
def is_secret_name(name: str) -> bool:
    """Whether a query parameter named ``name`` (lower-case, decoded) carries a secret."""
    if name.endswith(_SECRET_SUFFIXES):
        return True
    return any(word in _SECRET_WORDS for word in _WORD.findall(name))


def redact_query(query: bytes, names: frozenset[str] = frozenset()) -> str:
    """``query`` (raw, without ``?``) with the values of secret parameters replaced.

    ``names`` (lower-case) are secret whatever they look like.  Everything
    else is kept byte for byte, still percent-encoded.
    """
    parts = query.decode("latin-1").split("&")
    for i, part in enumerate(parts):
        name, equals, value = part.partition("=")
        if not equals or not value:
            continue
        key = (unquote_plus(name, encoding="latin-1") if "%" in name or "+" in name else name).lower()
        if key in names or is_secret_name(key):
            parts[i] = name + "=" + REDACTED
    return "&".join(parts)


class LineOutput(Protocol):
    """Where access-log lines go."""

    def write(self, line: str) -> None:
        """Take one line (without its newline)."""


class CollectedLines:
    """An access-log output that keeps the lines in memory (tests, :class:`~txgateway.testing.GatewayHarness`)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        self.lines.append(line)

    def records(self) -> list[dict[str, Any]]:
        """The ``json`` lines, parsed."""
        return [json.loads(line) for line in self.lines]


def output_key(config: GatewayConfig) -> tuple[str, str, str]:
    """The ``Runtime.shared`` key of the output of ``config``'s access log: (path, format).

    Registering an output there first (a :class:`CollectedLines`) keeps the
    lines in memory instead of writing them.
    """
    settings = config.observability.access_log
    return ("txgateway.access_log", settings.path, settings.format)


class AccessLogFile:
    """Lines buffered in memory and written in batches to a file or standard output.

    Written on a ``clock`` timer ``FLUSH_INTERVAL`` after the first waiting
    line, at once past ``FLUSH_BYTES``, and at ``stop()``.  After ``stop()``
    lines are written as they come (exchanges that end during shutdown).
    A write error is logged once per failing streak and the lines dropped:
    the access log never stops traffic.
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        flush_interval: float = FLUSH_INTERVAL,
        flush_bytes: int = FLUSH_BYTES,
    ) -> None:
        self.path = path
        self._clock = clock
        self._interval = flush_interval
        self._limit = flush_bytes
        self._lines: list[str] = []
        self._size = 0
        self._timer: IDelayedCall | None = None
        self._stopped = False
        self._failing = False
        self._fd = self._open()

    def _open(self) -> int:
        if self.path == "-":
            return 1
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)

    def write(self, line: str) -> None:
        """Add one line (without its newline)."""
        self._lines.append(line)
        self._size += len(line) + 1
        if self._size >= self._limit or self._stopped:
            self.flush()
        elif self._timer is None:
            self._timer = self._clock.callLater(self._interval, self._timed_flush)

    def _timed_flush(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Write every buffered line now."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if not self._lines:
            return
        lines, self._lines, self._size = self._lines, [], 0
        lines.append("")
        data = "\n".join(lines).encode("utf-8", "backslashreplace")
        fd = self._fd
        try:
            if fd < 0:  # stopped, or reopening failed: open for this write
                fd = self._open()
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        except OSError as error:
            if not self._failing:
                self.log.error(
                    "access log {path} not writable, lines dropped: {error}", path=self.path, error=str(error)
                )
            self._failing = True
            return
        finally:
            if fd >= 0 and fd != self._fd:
                if self._stopped:
                    os.close(fd)
                else:
                    self._fd = fd
        if self._failing:
            self.log.info("access log {path} writable again", path=self.path)
            self._failing = False

    def reopen(self) -> None:
        """Write what waits, then open the path again (after logrotate moved the file)."""
        self.flush()
        if self.path == "-":
            return
        old, self._fd = self._fd, -1
        if old >= 0:
            os.close(old)
        try:
            self._fd = self._open()
        except OSError as error:
            self.log.error("access log {path} cannot be reopened: {error}", path=self.path, error=str(error))

    def stop(self) -> None:
        """Write what waits and close the file; later lines are written as they come."""
        self.flush()
        self._stopped = True
        _reopened.discard(self)
        if self.path != "-" and self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


#: Open access log files, reopened on SIGUSR1.
_reopened: set[AccessLogFile] = set()
_signal_installed = False


def _reopen_all() -> None:
    for log_file in list(_reopened):
        log_file.reopen()


def reopen_on_sigusr1(reactor: Any, log_file: AccessLogFile) -> None:
    """Reopen ``log_file`` (and every other one) on SIGUSR1, in the reactor thread.

    The handler is installed once per process, only from the main thread and
    only for a reactor that can be called from a signal handler; a handler
    already there (twistd's own log rotation) still runs.
    """
    global _signal_installed
    _reopened.add(log_file)
    call = getattr(reactor, "callFromThread", None)
    if _signal_installed or call is None or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGUSR1)

    def handler(signum: int, frame: Any) -> None:
        call(_reopen_all)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGUSR1, handler)
    _signal_installed = True


class _Clock:
    """Formats clock times, reusing the text of the current second."""

    __slots__ = ("_combined", "_iso", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._iso = ""
        self._combined = ""

    def _at(self, second: int) -> None:
        self._second = second
        parts = time.gmtime(second)
        self._iso = time.strftime("%Y-%m-%dT%H:%M:%S", parts)
        self._combined = time.strftime("%d/%b/%Y:%H:%M:%S +0000", parts)

    def iso(self, when: float) -> str:
        second = int(when)
        if second != self._second:
            self._at(second)
        return f"{self._iso}.{int((when - second) * 1000):03d}Z"

    def combined(self, when: float) -> str:
        second = int(when)
        if second != self._second:
            self._at(second)
        return self._combined


#: Combined format: quotes, backslashes and anything not printable ASCII as \xHH (like nginx).
_COMBINED_ESCAPES = {c: f"\\x{c:02X}" for c in (*range(0x20), 0x22, 0x5C, *range(0x7F, 0x100))}
#: A JSON string literal, non-ASCII escaped (the C encoder of the json module).
_quote: Callable[[str], str] = encode_basestring_ascii


#: At most this many remembered literals (methods are the client's to choose).
_QUOTED_MAX = 100_000


def _optional(value: object) -> str:
    return "null" if value is None else _quote(str(value))


class AccessLog:
    """The access-log observer: formats each exchange and writes it to ``out``."""

    def __init__(self, out: LineOutput, format: str = "json", secret_params: Iterable[str] = ()) -> None:
        if format not in FORMATS:
            raise ValueError(f"unknown access log format {format!r} (known: {', '.join(FORMATS)})")
        self.out = out
        self.format = format
        self._secret = frozenset(name.lower() for name in secret_params)
        self._clock = _Clock()
        #: JSON literals of methods, route names and upstream addresses.
        self._quoted: dict[object, str] = {}
        self._line: Callable[[RequestContext], str] = self.json_line if format == "json" else self.combined_line

    def __call__(self, ctx: RequestContext) -> None:
        self.out.write(self._line(ctx))

    def target(self, ctx: RequestContext) -> str:
        """The path and the query with its secrets redacted."""
        if ctx.query:
            return ctx.path + "?" + redact_query(ctx.query, self._secret)
        return ctx.path

    def json_line(self, ctx: RequestContext) -> str:
        """The ``json`` line: built directly (each string through the C JSON
        quoting), about three times cheaper than ``json.dumps`` of a dict."""
        route = ctx.route
        trace = ctx.trace
        notes = ctx.notes
        user_agent = ctx.header(b"user-agent")
        upstream_ms = "null"
        if ctx.upstream_started is not None and ctx.upstream_ended is not None:
            upstream_ms = repr(round((ctx.upstream_ended - ctx.upstream_started) * 1000.0, 3))
        consumer = getattr(ctx.identity, "consumer", None)
        quoted = self._quoted
        method = quoted.get(ctx.method)
        if method is None:
            method = self._remember(ctx.method, ctx.method.decode("latin-1"))
        route_name = "null"
        if route is not None:
            route_name = quoted.get(route.name) or self._remember(route.name, route.name)
        upstream = "null"
        if ctx.upstream_address is not None:
            upstream = quoted.get(ctx.upstream_address) or self._remember(ctx.upstream_address, ctx.upstream_address)
        # Trace ids are validated or generated hex: never anything to escape.
        trace_id = f'"{trace.trace_id}"' if trace is not None else "null"
        return (
            f'{{"time":"{self._clock.iso(ctx.started)}","request_id":{_quote(ctx.request_id)},'
            f'"trace_id":{trace_id},'
            f'"client_ip":{_quote(ctx.client_address)},"method":{method},'
            f'"route":{route_name},"path":{_quote(self.target(ctx))},'
            f'"status":{ctx.status:d},"bytes_in":{ctx.bytes_in:d},"bytes_out":{ctx.bytes_out:d},'
            f'"duration_ms":{round((ctx.ended - ctx.started) * 1000.0, 3)!r},"upstream_ms":{upstream_ms},'
            f'"upstream":{upstream},'
            f'"consumer":{_quote(str(consumer)) if consumer is not None else "null"},'
            f'"rate_limit":{_optional(notes.get("rate_limit")) if notes is not None else "null"},'
            f'"cache":{_optional(notes.get("cache")) if notes is not None else "null"},'
            f'"protocol":{_quote(ctx.protocol)},'
            f'"user_agent":{_quote(user_agent.decode("latin-1")) if user_agent is not None else "null"}}}'
        )

    def _remember(self, key: object, text: str) -> str:
        """The JSON literal of ``text`` (a method, route name or upstream
        address: a bounded set), kept for the next line that has it."""
        literal = _quote(text)
        if len(self._quoted) < _QUOTED_MAX:
            self._quoted[key] = literal
        return literal

    def combined_line(self, ctx: RequestContext) -> str:
        consumer = getattr(ctx.identity, "consumer", None)
        referer = ctx.header(b"referer")
        user_agent = ctx.header(b"user-agent")
        major, minor = ctx.version
        request = f"{ctx.method.decode('latin-1')} {self.target(ctx)} HTTP/{major}.{minor}".translate(
            _COMBINED_ESCAPES
        )
        user = str(consumer).translate(_COMBINED_ESCAPES) if consumer else "-"
        sent = ctx.bytes_out if ctx.bytes_out else "-"
        referer_text = referer.decode("latin-1").translate(_COMBINED_ESCAPES) if referer is not None else "-"
        agent = user_agent.decode("latin-1").translate(_COMBINED_ESCAPES) if user_agent is not None else "-"
        return (
            f'{ctx.client_address or "-"} - {user} [{self._clock.combined(ctx.started)}] "{request}" '
            f'{ctx.status} {sent} "{referer_text}" "{agent}"'
        )


def access_log_for(config: GatewayConfig, runtime: Runtime) -> AccessLog | None:
    """The access-log observer of ``config``, None when ``observability.access_log.enabled`` is false.

    Its file is shared through ``runtime`` by (path, format), so a reload that
    keeps both keeps the open file and its buffer.
    """
    settings = config.observability.access_log
    if not settings.enabled:
        return None
    path, format = settings.path, settings.format

    def open_file() -> AccessLogFile:
        log_file = AccessLogFile(path, runtime.clock)
        if path != "-":
            reopen_on_sigusr1(runtime.reactor, log_file)
        return log_file

    out: LineOutput = runtime.shared(output_key(config), open_file)
    jwt = config.middleware.auth.jwt
    secret = (jwt.query_param,) if jwt is not None and jwt.query_param else ()
    return AccessLog(out, format, secret)
