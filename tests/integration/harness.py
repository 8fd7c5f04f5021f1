"""Shared fixtures of the end-to-end tests: the real gateway, real upstreams, real clients.

- :class:`GatewayProcess` runs ``twistd -n txgateway`` as a subprocess on a
  generated YAML file in a temporary directory, waits for the admin
  ``/ready``, reads its memory from ``/proc`` and stops it with SIGTERM.  Its
  output goes to a log file (no pipes), so one gateway can outlive a test
  without the trial janitor calling the reactor dirty; the ``twistd`` entry
  point is run with a parent-death signal, so a killed test run leaves no
  gateway behind.
- :class:`GatewayTestCase` shares one gateway among the tests of a class
  (trial has no Deferred-friendly ``setUpClass``): started lazily by the
  first test, stopped in the cleanup of the last one.  The upstreams of the
  class get fixed ports for the class and are started and stopped around
  every test, so nothing listens in the test process between tests.
- Upstreams are small Twisted protocols on httptools: echo (which streams the
  body into a counter and a SHA-256, so it is the upload sink too), fixed
  responses with any raw headers, a source generating N bytes through a push
  producer, a chunked dribble with delays, one that never answers and one that
  answers garbage.
- Clients are real: curl as a subprocess, and :class:`RawClient` for what curl
  cannot do (pipelining, Expect, slowloris, malformed requests).

Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs

import httptools
import yaml
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IPushProducer
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import FailTest, TestCase
from zope.interface import implementer

reactor: Any = _reactor

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
TWISTD = str(Path(sys.executable).with_name("twistd"))
CURL = shutil.which("curl") or "/usr/bin/curl"
LOCALHOST = "127.0.0.1"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

Headers = list[tuple[bytes, bytes]]


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


# Ports.

_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback TCP port nothing listens on, below the kernel's ephemeral range.

    Below the ephemeral range so that no outgoing connection (the gateway's
    own, curl's) is ever given it as a source port between the moment it is
    chosen and the moment a test listens on it, which may be many times.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    start = max(1024, low - 12000)
    for _ in range(200):
        port = random.randrange(start, low)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((LOCALHOST, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOCALHOST, 0))
        port = probe.getsockname()[1]
    _handed_out.add(port)
    return port


# The gateway process.

#: The ``twistd`` console script, run with a parent-death signal: if the test
#: process dies (killed, timed out), the gateway gets SIGTERM instead of
#: living on with its ports.
_TWISTD_WITH_DEATH_SIGNAL = """\
import ctypes, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
except Exception:
    pass
sys.argv = ["twistd", *sys.argv[1:]]
from twisted.scripts.twistd import run
sys.exit(run())
"""


def child_environment(**extra: str) -> dict[str, str]:
    """The test process's environment with this checkout first on the path, no proxies."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class _Exited(ProcessProtocol):
    def __init__(self, ended: Callable[[Failure], None]) -> None:
        self._ended = ended

    def processEnded(self, reason: Failure) -> None:
        self._ended(reason)


def exit_code(reason: Failure) -> int | None:
    """The exit status of an ended process, None when it ended by a signal."""
    if reason.check(ProcessDone):
        return 0
    if isinstance(reason.value, ProcessTerminated):
        code: int | None = reason.value.exitCode
        return code
    return None


def exit_signal(reason: Failure | None) -> int | None:
    """The signal an ended process died of, if any."""
    if reason is not None and isinstance(reason.value, ProcessTerminated):
        number: int | None = reason.value.signal
        return number
    return None


_running: dict[int, GatewayProcess] = {}


class GatewayProcess:
    """One ``twistd -n txgateway -c FILE`` subprocess on a generated config.

    ``config`` is the YAML content as a dict; ``server.listen_addr`` and
    ``admin.listen_addr`` are filled in with free loopback ports unless given.
    """

    def __init__(self, config: dict[str, Any], extra_args: tuple[str, ...] = ()) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="txgateway-it-"))
        self.config = json.loads(json.dumps(config))
        server = self.config.setdefault("server", {})
        if "listen_addr" not in server and "listen" not in server:
            server["listen_addr"] = f"{LOCALHOST}:{free_port()}"
        admin = self.config.setdefault("admin", {})
        if "listen_addr" not in admin and "listen" not in admin:
            admin["listen_addr"] = f"{LOCALHOST}:{free_port()}"
        self.port = int(str(server.get("listen_addr", ":0")).rpartition(":")[2] or 0)
        self.admin_port = int(str(admin["listen_addr"]).rpartition(":")[2])
        self.config_path = self.directory / "gateway.yaml"
        self.log_path = self.directory / "gateway.log"
        self.extra_args = extra_args
        self.pid: int | None = None
        self.exit_reason: Failure | None = None
        self._protocol: _Exited | None = None
        self._exit_waiters: list[Deferred[int | None]] = []
        self._final_log = ""

    @property
    def running(self) -> bool:
        return self._protocol is not None and self.exit_reason is None

    def url(self, path: str = "/") -> str:
        return f"http://{LOCALHOST}:{self.port}{path}"

    def log(self) -> str:
        """Everything the process wrote (kept after ``stop`` removed the directory)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return self._final_log

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def spawn(self) -> Deferred[int | None]:
        """Start the process; the Deferred fires with its exit status (None: killed by a signal)."""
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self._protocol = _Exited(self._ended)
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        try:
            process = reactor.spawnProcess(
                self._protocol,
                PYTHON,
                [PYTHON, "-c", _TWISTD_WITH_DEATH_SIGNAL, "--pidfile=", "-n", "txgateway",
                 "-c", str(self.config_path), *self.extra_args],
                env=child_environment(),
                path=str(self.directory),
                childFDs={0: null_fd, 1: log_fd, 2: log_fd},
            )  # fmt: skip
        finally:
            os.close(log_fd)
            os.close(null_fd)
        self.pid = process.pid
        _running[process.pid] = self
        return self.exited()

    def _ended(self, reason: Failure) -> None:
        self.exit_reason = reason
        if self.pid is not None:
            _running.pop(self.pid, None)
        waiters, self._exit_waiters = self._exit_waiters, []
        for d in waiters:
            d.callback(exit_code(reason))

    def exited(self) -> Deferred[int | None]:
        """Fires with the exit status once the process has ended (None: killed by a signal)."""
        if self.exit_reason is not None:
            return succeed(exit_code(self.exit_reason))
        d: Deferred[int | None] = Deferred()
        self._exit_waiters.append(d)
        return d

    def start(self, timeout: float = 20.0) -> Deferred[GatewayProcess]:
        """Spawn and wait until the admin ``/ready`` answers 200."""
        self.spawn()
        return Deferred.fromCoroutine(self._ready_loop(timeout))

    async def _ready_loop(self, timeout: float) -> GatewayProcess:
        deadline = reactor.seconds() + timeout
        while True:
            if not self.running:
                await self.stop()
                raise FailTest(f"the gateway exited before it was ready ({self.exit_reason}):\n{self.log()}")
            try:
                data = await raw_exchange(self.admin_port, b"GET /ready HTTP/1.0\r\nHost: admin\r\n\r\n", 2.0)
            except Exception:  # noqa: BLE001 - not listening yet
                data = b""
            if data.startswith(b"HTTP/1.") and data.split(b" ", 2)[1] == b"200":
                return self
            if reactor.seconds() > deadline:
                await self.stop()
                raise FailTest(f"the gateway was not ready within {timeout}s:\n{self.log()}")
            await sleep(0.05)

    def stop(self, timeout: float = 10.0) -> Deferred[int | None]:
        """SIGTERM, SIGKILL after ``timeout``; fires with the exit status, log directory removed."""
        if self._protocol is None or self.exit_reason is not None:
            self._remove_directory()
            return succeed(None if self.exit_reason is None else exit_code(self.exit_reason))
        assert self.pid is not None
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        killer = reactor.callLater(timeout, self._kill)

        def ended(status: int | None) -> int | None:
            if killer.active():
                killer.cancel()
            self._remove_directory()
            return status

        return self.exited().addCallback(ended)

    def render_config(self, config: dict[str, Any]) -> str:
        """``config`` as YAML, with the running config's listen addresses unless it
        names its own; it becomes ``self.config``."""
        config = json.loads(json.dumps(config))
        for block in ("server", "admin"):
            section = config.setdefault(block, {})
            running = self.config.get(block, {})
            if "listen_addr" not in section and "listen" not in section and "listen_addr" in running:
                section["listen_addr"] = running["listen_addr"]
        self.config = config
        return str(yaml.safe_dump(config, sort_keys=False))

    def write_config(self, config: dict[str, Any] | str, *, replace: bool = True) -> None:
        """Give the running gateway a new config file (it reloads on SIGHUP, the file
        watcher or ``POST /admin/reload``).

        A dict goes through :meth:`render_config`; a string is written as is (a
        broken file, say).  ``replace`` writes a new file beside the old one and
        renames it over (atomic, a new inode: what editors and config tools do);
        otherwise the file is rewritten in place.
        """
        text = config if isinstance(config, str) else self.render_config(config)
        if not replace:
            self.config_path.write_text(text)
            return
        fresh = self.config_path.with_name(f".{self.config_path.name}.new")
        fresh.write_text(text)
        os.replace(fresh, self.config_path)

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the gateway process (SIGHUP: reload; SIGTERM: graceful shutdown)."""
        assert self.pid is not None and self.running, "the gateway is not running"
        os.kill(self.pid, signum)

    def _kill(self) -> None:
        if self.pid is not None and self.running:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _remove_directory(self) -> None:
        self._final_log = self.log()
        shutil.rmtree(self.directory, ignore_errors=True)

    # Memory, from /proc.

    def memory(self) -> dict[str, int]:
        """``VmRSS`` and ``VmHWM`` (peak RSS) in bytes."""
        assert self.pid is not None
        values: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) * KiB
        return values

    def reset_peak(self) -> bool:
        """Reset ``VmHWM`` to the current RSS (Linux clear_refs 5); False if not allowed."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True


def _kill_leftovers() -> None:
    """At interpreter exit: no gateway (nor its directory) outlives a partial test run."""
    for pid, gateway in list(_running.items()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(gateway.directory, ignore_errors=True)


atexit.register(_kill_leftovers)


# Raw client connections.


class RawClient(Protocol):
    """A client connection that sends exactly the bytes it is given.

    Received bytes accumulate in ``received``; ``wait_for(predicate)`` fires
    once they satisfy it, ``wait_closed()`` when the connection is gone
    (``connected_at`` and ``closed_at`` say when).
    """

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[bytes] = Deferred()
        self.is_closed = False
        self.reason: Failure | None = None
        self._waiters: list[tuple[Callable[[bytes], bool], Deferred[bytes]]] = []

    def connectionMade(self) -> None:
        self.connected_at = reactor.seconds()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._check()

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.is_closed = True
        self.reason = reason
        self.closed_at = reactor.seconds()
        self._check()
        waiters, self._waiters = self._waiters, []
        for _, d in waiters:
            d.errback(ConnectionClosedEarly(self.received))
        self.closed.callback(self.received)

    def _check(self) -> None:
        waiting = []
        for predicate, d in self._waiters:
            if predicate(self.received):
                d.callback(self.received)
            else:
                waiting.append((predicate, d))
        self._waiters = waiting

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def wait_for(self, predicate: Callable[[bytes], bool], timeout: float = 5.0) -> Deferred[bytes]:
        if predicate(self.received):
            return succeed(self.received)
        if self.is_closed:
            return fail(ConnectionClosedEarly(self.received))
        d: Deferred[bytes] = Deferred(lambda d: self._forget(d))
        self._waiters.append((predicate, d))
        return d.addTimeout(timeout, reactor)

    def _forget(self, d: Deferred[bytes]) -> None:
        self._waiters = [(p, w) for p, w in self._waiters if w is not d]

    def wait_responses(
        self, count: int, head_only: tuple[int, ...] = (), timeout: float = 5.0
    ) -> Deferred[list[RawResponse]]:
        """Fires with ``count`` complete final responses (``head_only``: their indexes were HEAD)."""

        def complete(data: bytes) -> bool:
            try:
                return len(parse_responses(data, head_only, final_only=True)) >= count
            except IncompleteResponse:
                return False

        d = self.wait_for(complete, timeout)
        return d.addCallback(lambda data: parse_responses(data, head_only, final_only=True))

    def wait_closed(self, timeout: float = 5.0) -> Deferred[bytes]:
        if self.is_closed:
            return succeed(self.received)
        d: Deferred[bytes] = Deferred()

        def closed(received: bytes) -> bytes:
            if not d.called:
                d.callback(received)
            return received

        self.closed.addCallback(closed)
        return d.addTimeout(timeout, reactor)

    def abort(self) -> Deferred[bytes]:
        if not self.is_closed and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        return self.wait_closed()


class ConnectionClosedEarly(Exception):
    """The connection closed before the awaited bytes arrived; carries what did."""

    def __init__(self, received: bytes) -> None:
        super().__init__(f"connection closed after {len(received)} bytes: {received[:300]!r}")
        self.received = received


def connect(port: int, bind: str | None = None, timeout: float = 5.0) -> Deferred[RawClient]:
    """A :class:`RawClient` connected to 127.0.0.1:``port`` (from ``bind`` if given)."""
    endpoint = TCP4ClientEndpoint(reactor, LOCALHOST, port, timeout=timeout, bindAddress=(bind, 0) if bind else None)
    return connectProtocol(endpoint, RawClient())


async def _exchange(port: int, data: bytes, timeout: float) -> bytes:
    client = await connect(port, timeout=timeout)
    client.send(data)
    try:
        return await client.wait_closed(timeout)
    finally:
        await client.abort()


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> Deferred[bytes]:
    """Send ``data`` on a new connection and collect everything until it closes."""
    return Deferred.fromCoroutine(_exchange(port, data, timeout))


# Parsing what a raw client received.


class IncompleteResponse(Exception):
    pass


@dataclass
class RawResponse:
    version: bytes
    status: int
    reason: bytes
    headers: Headers
    body: bytes
    #: The exact bytes of the body on the wire (chunk framing included).
    raw_body: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: bytes) -> list[bytes]:
        name = name.lower()
        return [v for n, v in self.headers if n == name]

    def json(self) -> Any:
        return json.loads(self.body)


def _parse_head(head: bytes) -> tuple[bytes, int, bytes, Headers]:
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    status, _, reason = rest.partition(b" ")
    headers: Headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    return version, int(status), reason, headers


def parse_responses(
    data: bytes, head_only: tuple[int, ...] = (), final_only: bool = False, until_close: bool = False
) -> list[RawResponse]:
    """Split a response stream into messages, framing by the rules of RFC 9112 6.3.

    ``head_only`` are the indexes (among final responses) answering HEAD.
    Raises IncompleteResponse unless every message is complete; a body without
    framing runs to the end of ``data`` only when ``until_close``.
    """
    responses: list[RawResponse] = []
    finals = 0
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            raise IncompleteResponse(data)
        version, status, reason, headers = _parse_head(head)
        fields = {n: v for n, v in headers}
        if 100 <= status < 200:
            if not final_only:
                responses.append(RawResponse(version, status, reason, headers, b""))
            data = rest
            continue
        no_body = finals in head_only or status in (204, 304)
        finals += 1
        if no_body:
            body, raw, data = b"", b"", rest
        elif b"chunked" in fields.get(b"transfer-encoding", b"").lower():
            body, raw, data = _dechunk(rest)
        elif b"content-length" in fields:
            length = int(fields[b"content-length"])
            if len(rest) < length:
                raise IncompleteResponse(data)
            body = raw = rest[:length]
            data = rest[length:]
        elif until_close:
            body = raw = rest
            data = b""
        else:
            raise IncompleteResponse(data)
        responses.append(RawResponse(version, status, reason, headers, body, raw))
    return responses


def _dechunk(data: bytes) -> tuple[bytes, bytes, bytes]:
    body: list[bytes] = []
    position = 0
    while True:
        line_end = data.find(b"\r\n", position)
        if line_end < 0:
            raise IncompleteResponse(data)
        size = int(data[position:line_end].split(b";")[0], 16)
        position = line_end + 2
        if size == 0:
            end = data.find(b"\r\n\r\n", position - 2)
            if end < 0:
                raise IncompleteResponse(data)
            end += 4
            return b"".join(body), data[:end], data[end:]
        if len(data) < position + size + 2:
            raise IncompleteResponse(data)
        body.append(data[position : position + size])
        position += size + 2


# curl.


@dataclass
class CurlResult:
    exit_code: int
    stderr: bytes
    status: int = 0
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    #: Status codes of interim (1xx) responses, in order.
    interim: list[int] = field(default_factory=list)

    def header(self, name: bytes) -> bytes | None:
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


def _parse_curl_output(out: bytes, result: CurlResult) -> CurlResult:
    rest = out
    while rest.startswith(b"HTTP/"):
        head, _, rest = rest.partition(b"\r\n\r\n")
        _, status, _, headers = _parse_head(head)
        if 100 <= status < 200:
            result.interim.append(status)
            continue
        result.status, result.headers = status, headers
        break
    result.body = rest
    return result


async def _curl(args: tuple[str, ...], timeout: float) -> CurlResult:
    out, err, code = await getProcessOutputAndValue(
        CURL,
        ("-sS", "-i", "--noproxy", "*", "--max-time", f"{timeout:g}", *args),
        env={},
        reactor=reactor,
    )
    return _parse_curl_output(out, CurlResult(code, err))


def curl(*args: str, timeout: float = 10.0) -> Deferred[CurlResult]:
    """Run curl with ``-i``; the result carries the final status, headers and body."""
    return Deferred.fromCoroutine(_curl(args, timeout))


def run(
    executable: str, *args: str, env: dict[str, str] | None = None, path: str | None = None
) -> Deferred[tuple[bytes, bytes, int]]:
    """Any command as a subprocess: (stdout, stderr, exit code)."""
    return getProcessOutputAndValue(executable, args, env=env or {}, path=path, reactor=reactor)


# Upstream servers.


@dataclass
class SeenRequest:
    """What an upstream received, as it received it."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body_bytes: int = 0
    sha: Any = field(default_factory=hashlib.sha256)
    complete: bool = False

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header_values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "version": self.version,
            "headers": [list(pair) for pair in self.headers],
            "body_bytes": self.body_bytes,
            "body_sha256": self.sha.hexdigest(),
        }


class UpstreamConnection(Protocol):
    """One connection to a test upstream; requests are handed to the server."""

    def __init__(self, server: UpstreamServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.is_lost = False
        self._lost_waiters: list[Deferred[None]] = []
        self.request: SeenRequest | None = None
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self.delayed: list[IDelayedCall] = []

    def connectionMade(self) -> None:
        self.server.connections.add(self)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.is_lost = True
        self.server.connections.discard(self)
        for call in self.delayed:
            if call.active():
                call.cancel()
        self.delayed = []
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)

    def when_lost(self) -> Deferred[None]:
        """Fires once this connection is closed (by either side)."""
        if self.is_lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lost_waiters.append(d)
        return d

    def dataReceived(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            self.transport.loseConnection()  # type: ignore[union-attr]

    # httptools callbacks.

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.request = SeenRequest(
            self.parser.get_method().decode("latin-1"),
            self._url.decode("latin-1"),
            self.parser.get_http_version(),
            self._headers,
        )
        self.keep_alive = self.parser.should_keep_alive()
        self.server.requests.append(self.request)
        self.server.request_head(self, self.request)

    def on_body(self, data: bytes) -> None:
        if self.request is not None:
            self.request.body_bytes += len(data)
            self.request.sha.update(data)

    def on_message_complete(self) -> None:
        if self.request is not None:
            self.request.complete = True
            self.server.request_complete(self, self.request)

    # Writing responses.

    def send_head(self, status: int, headers: list[tuple[str, str]], reason: str = "") -> None:
        reason = reason or _REASONS.get(status, "Unknown")
        lines = [f"HTTP/1.1 {status} {reason}"] + [f"{n}: {v}" for n, v in headers]
        self.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def write(self, data: bytes) -> None:
        if not self.is_lost and self.transport is not None:
            self.transport.write(data)

    def respond(self, status: int, headers: list[tuple[str, str]], body: bytes = b"", *, head: bool = False) -> None:
        """A complete response with Content-Length (no body bytes for HEAD/204/304)."""
        headers = list(headers)
        if status not in (204, 304) and not any(n.lower() == "content-length" for n, _ in headers):
            headers.append(("Content-Length", str(len(body))))
        self.send_head(status, headers)
        if not head and status not in (204, 304):
            self.write(body)
        self.done()

    def done(self) -> None:
        if not self.keep_alive and self.transport is not None:
            self.transport.loseConnection()

    def later(self, seconds: float, call: Callable[[], None]) -> None:
        self.delayed.append(reactor.callLater(seconds, call))


_REASONS = {200: "OK", 204: "No Content", 304: "Not Modified", 404: "Not Found", 500: "Internal Server Error"}


class UpstreamServer(Factory):
    """A test upstream: listens on a loopback port, records what it sees."""

    noisy = False

    def __init__(self) -> None:
        self.connections: set[UpstreamConnection] = set()
        self.requests: list[SeenRequest] = []
        self.port: IListeningPort | None = None

    def buildProtocol(self, addr: object) -> UpstreamConnection:
        return UpstreamConnection(self)

    def listen(self, port: int) -> int:
        self.port = reactor.listenTCP(port, self, interface=LOCALHOST)
        bound: int = getattr(self.port.getHost(), "port")  # noqa: B009 - IAddress has no port
        return bound

    def stop(self) -> Deferred[Any]:
        """Stop listening and drop every connection; fires once all are gone."""
        waits: list[Deferred[Any]] = []
        if self.port is not None:
            waits.append(maybeDeferred(self.port.stopListening))
            self.port = None
        for connection in list(self.connections):
            waits.append(connection.when_lost())
            connection.transport.abortConnection()  # type: ignore[union-attr]
        return gatherResults(waits)

    # Hooks.

    def request_head(self, connection: UpstreamConnection, request: SeenRequest) -> None:
        pass

    def request_complete(self, connection: UpstreamConnection, request: SeenRequest) -> None:
        pass


class EchoUpstream(UpstreamServer):
    """Answers with a JSON description of the request (like ``txgateway.demo``).

    The body is never stored: it is counted and hashed as it streams in, so
    this is also the sink for big uploads.
    """

    def request_complete(self, connection: UpstreamConnection, request: SeenRequest) -> None:
        payload = json.dumps({"service": "echo", **request.describe()}).encode()
        connection.respond(200, [("Content-Type", "application/json")], payload, head=request.method == "HEAD")


@dataclass
class FixedResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    #: Send only this many body bytes (after a head announcing them all), then close.
    truncate: int | None = None


class FixedUpstream(UpstreamServer):
    """Answers each path with a chosen status, raw headers (repeats, hop-by-hop) and body."""

    def __init__(self, responses: dict[str, FixedResponse]) -> None:
        super().__init__()
        self.responses = responses

    def request_complete(self, connection: UpstreamConnection, request: SeenRequest) -> None:
        fixed = self.responses.get(request.path)
        if fixed is None:
            connection.respond(404, [("Content-Type", "text/plain")], b"no fixed response here\n")
            return
        if fixed.truncate is not None:
            connection.send_head(fixed.status, [*fixed.headers, ("Content-Length", str(len(fixed.body)))])
            connection.write(fixed.body[: fixed.truncate])
            connection.transport.loseConnection()  # type: ignore[union-attr]
            return
        connection.respond(fixed.status, fixed.headers, fixed.body, head=request.method == "HEAD")


#: What the source sends: a pseudo-random pattern whose period is prime and not
#: a power of two, so lost, repeated or reordered blocks change the hash.
PATTERN_PERIOD = 1048573
_PATTERN = random.Random(20240601).randbytes(PATTERN_PERIOD)
_PATTERN_TWICE = _PATTERN * 2
_SOURCE_WRITE = 256 * KiB


def pattern_bytes(offset: int, size: int) -> bytes:
    """``size`` bytes of the source's stream from ``offset`` (size <= PATTERN_PERIOD)."""
    start = offset % PATTERN_PERIOD
    return _PATTERN_TWICE[start : start + size]


def pattern_sha256(total: int) -> str:
    sha = hashlib.sha256()
    offset = 0
    while offset < total:
        size = min(_SOURCE_WRITE, total - offset)
        sha.update(pattern_bytes(offset, size))
        offset += size
    return sha.hexdigest()


@implementer(IPushProducer)
class _PatternProducer:
    """Writes ``total`` pattern bytes as fast as the socket takes them, no faster."""

    def __init__(self, connection: UpstreamConnection, total: int, chunked: bool, record: SourceRecord) -> None:
        self.connection = connection
        self.total = total
        self.chunked = chunked
        self.record = record
        self.paused = False
        self.stopped = False

    def start(self) -> None:
        transport = self.connection.transport
        assert transport is not None
        transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True
        self.record.pauses += 1

    def stopProducing(self) -> None:
        self.stopped = True

    def resumeProducing(self) -> None:
        self.paused = False
        record = self.record
        transport = self.connection.transport
        while not self.paused and not self.stopped and record.sent < self.total and not self.connection.is_lost:
            size = min(_SOURCE_WRITE, self.total - record.sent)
            data = pattern_bytes(record.sent, size)
            record.sha.update(data)
            record.sent += size
            transport.write(b"%x\r\n%s\r\n" % (size, data) if self.chunked else data)  # type: ignore[union-attr]
        if record.sent >= self.total and not record.finished and not self.connection.is_lost:
            record.finished = True
            if self.chunked:
                transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]
            transport.unregisterProducer()  # type: ignore[union-attr]
            self.connection.done()


@dataclass
class SourceRecord:
    total: int
    sent: int = 0
    pauses: int = 0
    finished: bool = False
    sha: Any = field(default_factory=hashlib.sha256)


class SourceUpstream(UpstreamServer):
    """``GET .../{bytes}[?chunked=1]``: that many pattern bytes, streamed with backpressure."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[SourceRecord] = []

    def request_complete(self, connection: UpstreamConnection, request: SeenRequest) -> None:
        total = int(request.path.rstrip("/").rpartition("/")[2])
        chunked = parse_qs(request.query).get("chunked") == ["1"]
        record = SourceRecord(total)
        self.records.append(record)
        framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(total))
        connection.send_head(200, [("Content-Type", "application/octet-stream"), framing])
        if request.method == "HEAD":
            connection.done()
            return
        _PatternProducer(connection, total, chunked, record).start()


@dataclass
class DribbleRecord:
    connection: UpstreamConnection
    pieces: int
    written: int = 0
    finished: bool = False
    finished_at: float | None = None


class DribbleUpstream(UpstreamServer):
    """A chunked response written piece by piece: ``?pieces=N&delay=S`` (``piece-I\\n`` each)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[DribbleRecord] = []

    def request_complete(self, connection: UpstreamConnection, request: SeenRequest) -> None:
        query = parse_qs(request.query)
        pieces = int(query.get("pieces", ["5"])[0])
        delay = float(query.get("delay", ["0.2"])[0])
        record = DribbleRecord(connection, pieces)
        self.records.append(record)
        connection.send_head(200, [("Content-Type", "text/plain"), ("Transfer-Encoding", "chunked")])

        def piece() -> None:
            data = b"piece-%d\n" % record.written
            connection.write(b"%x\r\n%s\r\n" % (len(data), data))
            record.written += 1
            if record.written < pieces:
                connection.later(delay, piece)
            else:
                connection.write(b"0\r\n\r\n")
                record.finished = True
                record.finished_at = reactor.seconds()
                connection.done()

        piece()


class SilentUpstream(UpstreamServer):
    """Reads requests and never answers them."""


class StalledUpstream(UpstreamServer):
    """Stops reading its socket once a request head arrives, and never answers.

    An upload to it can only go as far as the socket buffers let it: what
    the gateway does with the rest shows whether it buffers.
    """

    def request_head(self, connection: UpstreamConnection, request: SeenRequest) -> None:
        connection.transport.pauseProducing()  # type: ignore[union-attr]


class GarbageUpstream(UpstreamServer):
    """Answers every request with bytes that are not HTTP, then closes."""

    def request_head(self, connection: UpstreamConnection, request: SeenRequest) -> None:
        connection.write(b"SSH-2.0-OpenSSH_9.2\r\nthis is not an HTTP response\r\n\r\n")
        connection.transport.loseConnection()  # type: ignore[union-attr]


# A gateway shared by the tests of one TestCase class.


class _SharedGateway:
    """The class's gateway and the fixed ports of its upstreams."""

    def __init__(self, case: type[GatewayTestCase]) -> None:
        self.case = case
        self.upstream_ports = {name: free_port() for name in (*case.upstreams, *case.unreachable)}
        self.gateway: GatewayProcess | None = None
        #: Tests of the class yet to finish; the last one stops the gateway.
        tests = {name: getattr(case, name) for name in dir(case) if name.startswith("test")}
        self.pending = {name for name, test in tests.items() if callable(test) and not getattr(test, "skip", None)}

    async def acquire(self) -> GatewayProcess:
        if self.gateway is None or not self.gateway.running:
            config = self.case.gateway_config(self.upstream_ports)
            self.gateway = GatewayProcess(config)
            await self.gateway.start()
        return self.gateway

    async def release(self, test_name: str) -> None:
        self.pending.discard(test_name)
        if not self.pending and self.gateway is not None:
            gateway, self.gateway = self.gateway, None
            await gateway.stop()


_shared: dict[type, _SharedGateway] = {}


class GatewayTestCase(TestCase):
    """Tests against one real gateway per class, with fresh upstreams per test.

    Subclasses set ``upstreams`` (name -> factory of a :class:`UpstreamServer`),
    ``unreachable`` (names given a port where nothing listens) and
    ``gateway_config(ports)``.  Every test also fails if the gateway logged a
    traceback or died while it ran.
    """

    upstreams: ClassVar[dict[str, Callable[[], UpstreamServer]]] = {}
    unreachable: ClassVar[tuple[str, ...]] = ()
    timeout = 120

    @classmethod
    def gateway_config(cls, ports: dict[str, int]) -> dict[str, Any]:
        raise NotImplementedError

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._set_up())

    async def _set_up(self) -> None:
        shared = _shared.get(type(self))
        if shared is None:
            shared = _shared[type(self)] = _SharedGateway(type(self))
        self.addCleanup(lambda: Deferred.fromCoroutine(shared.release(self._testMethodName)))
        self.gateway = await shared.acquire()
        self.port = self.gateway.port
        self._log_start = self.gateway.log_size()
        self.addCleanup(self._check_gateway_health)
        self.servers: dict[str, UpstreamServer] = {}
        for name, factory in self.upstreams.items():
            server = factory()
            server.listen(shared.upstream_ports[name])
            self.addCleanup(server.stop)
            self.servers[name] = server
        self.ports = dict(shared.upstream_ports)

    def _check_gateway_health(self) -> None:
        gateway = self.gateway
        with open(gateway.log_path, "rb") as log:
            log.seek(self._log_start)
            new = log.read().decode("utf-8", "replace")
        if not gateway.running:
            raise FailTest(f"the gateway process died during this test ({gateway.exit_reason}):\n{new}")
        if "Traceback (most recent call last)" in new or "Unhandled error" in new:
            raise FailTest(f"the gateway logged an error during this test:\n{new}")

    # Clients.

    def url(self, path: str) -> str:
        return self.gateway.url(path)

    def curl(self, path: str, *args: str, timeout: float = 10.0) -> Deferred[CurlResult]:
        return curl(*args, self.url(path), timeout=timeout)

    async def connect(self, port: int | None = None, bind: str | None = None) -> RawClient:
        client = await connect(port or self.port, bind=bind)
        self.addCleanup(client.abort)
        return client

    async def exchange(self, data: bytes, timeout: float = 5.0) -> list[RawResponse]:
        """One raw connection: send ``data``, read until the gateway closes it."""
        client = await self.connect()
        client.send(data)
        received = await client.wait_closed(timeout)
        return parse_responses(received, until_close=True)
