"""Worker processes on shared listening sockets: ``server.workers: N`` (N > 1).

``twistd -n txgateway -c FILE`` then runs a :class:`WorkerSupervisor` instead
of the gateway.  The supervisor binds every listener itself (``server.listen``,
``server.tls``, ``admin``), at ``privilegedStartService`` like the gateway
does, so a port in use still stops the process at once with status 1.  It
never accepts on them: it starts N ``twistd -n txgateway --worker`` processes
that inherit the listening sockets as file descriptors (``--inherit
DESCRIPTION=FD``) and adopt them (:func:`adopt_listener`).

Each proxy listener is N sockets on one port (``SO_REUSEPORT``), one per
worker, and the kernel spreads new connections evenly over them.  One socket
accepted on by every worker would be simpler, but the worker already running
wins nearly every race to ``accept``: measured with wrk's 32 keep-alive
connections, one of two workers got them all.  The supervisor keeps each
worker's sockets open across its restarts, so the connections the kernel
gives a dead worker's socket wait in its queue for the replacement (started
0.5 s later, about 2 s in all here) instead of being refused.  The admin
listener is one socket shared by all workers: any live worker answers the
probes at once.

What the supervisor promises:

- A worker that exits is started again, after 0.5 s doubling up to 10 s for a
  worker that keeps failing; one that stayed up 30 s starts again at 0.5 s
  (:class:`RestartBackoff`).  Each exit is logged with its status.
- SIGHUP is forwarded to every worker (each reloads its configuration).  A
  worker finds the supervisor's pid in ``TXGATEWAY_SUPERVISOR_PID``: SIGHUP
  to it reloads the whole group.
- SIGTERM or SIGINT is forwarded to every worker as SIGTERM; each runs the
  graceful shutdown.  Whatever has not exited after ``shutdown_delay +
  shutdown_grace`` plus a margin is killed.  The supervisor exits 0 only when
  every worker exited cleanly, else 1.
- Workers die with the supervisor: each asks Linux for SIGTERM when its
  parent dies (``PR_SET_PDEATHSIG``), drains as on any SIGTERM and exits, so
  no orphan keeps the port (a killed supervisor does leave its metrics
  directory in ``$TMPDIR``).
- Metrics cover the group: workers write their values to a fresh
  ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode), so
  ``/metrics`` on the admin port sums every worker, the ones that exited
  included.  Other admin answers (``/admin/upstreams``...) are the view of
  the worker that answered.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.multiprocess import mark_process_dead
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated, ReactorNotRunning
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import FileLogObserver, ILogObserver, Logger, formatEventAsClassicLogText
from twisted.python.failure import Failure

from txgateway.config.model import GatewayConfig
from txgateway.config.schema import split_endpoint
from txgateway.protocols.detect import tls_context
from txgateway.service import ListenError

#: In a worker's environment: the pid of its supervisor (SIGHUP to it reloads every worker).
SUPERVISOR_PID_ENV = "TXGATEWAY_SUPERVISOR_PID"
#: In a worker's environment: its number, 1 to N (kept across restarts), for its log lines.
WORKER_NUMBER_ENV = "TXGATEWAY_WORKER"
#: prometheus-client's switch to multiprocess mode.
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Seconds, on top of shutdown_delay + shutdown_grace, before remaining workers are killed.
STOP_MARGIN = 5.0
#: Backlog of a listener without ``backlog=`` (Twisted's default).
DEFAULT_BACKLOG = 50

#: How a worker is started: ``twistd`` of this interpreter (plugins and all),
#: ignoring SIGHUP until the gateway installs its reload handler (a SIGHUP
#: forwarded while a worker starts must not kill it; it loads the file anyway).
_TWISTD = (
    "import signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); sys.argv[0] = 'twistd'; "
    "from twisted.scripts.twistd import run; run()"
)
_PR_SET_PDEATHSIG = 1


class RestartBackoff:
    """How long to wait before starting a worker again after it exited.

    ``initial`` seconds after the first exit, doubling after each further one
    up to ``maximum``; a worker that had stayed up ``reset_after`` seconds
    before exiting starts again after ``initial``.
    """

    def __init__(self, initial: float = 0.5, maximum: float = 10.0, reset_after: float = 30.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.reset_after = reset_after
        self._next = initial

    def delay(self, uptime: float) -> float:
        """The wait before the next start of a worker that ran ``uptime`` seconds."""
        if uptime >= self.reset_after:
            self._next = self.initial
        delay = self._next
        self._next = min(delay * 2, self.maximum)
        return delay


# Listening sockets: bound in the supervisor, adopted in the workers.


@dataclass(eq=False)
class SharedListener:
    """One endpoint of the config: a socket for every worker, or one all of them share."""

    description: str
    sockets: list[socket.socket]

    def for_worker(self, number: int) -> socket.socket:
        return self.sockets[0] if len(self.sockets) == 1 else self.sockets[number - 1]

    def close(self) -> None:
        for listener in self.sockets:
            listener.close()


def bind_listener(description: str, tls: bool = False, copies: int = 1) -> list[socket.socket]:
    """Listening, non-blocking TCP sockets for a ``tcp:``/``tcp6:`` description
    (``ssl:`` for the ``server.tls`` listener, whose TLS the workers add):
    one, or ``copies`` on the same port with ``SO_REUSEPORT``.

    Raises :class:`ListenError` for a port in use (by anything, including
    another ``SO_REUSEPORT`` group) or an endpoint type workers cannot share
    (``unix:``, ``systemd:``, ``ssl:`` in ``server.listen``).
    """
    parts = split_endpoint(description)
    kind = parts[0]
    if kind not in (("ssl",) if tls else ("tcp", "tcp6")):
        raise ListenError(
            f"cannot listen on {description}: with server.workers > 1 listeners must be tcp: or tcp6: "
            "endpoints (use server.tls for TLS)"
        )
    positional = [part for part in parts[1:] if "=" not in part]
    options = dict(part.split("=", 1) for part in parts[1:] if "=" in part)
    port = int(positional[0] if positional else options.get("port", "0"))
    host = options.get("interface") or ("::" if kind == "tcp6" else "0.0.0.0")
    family = socket.AF_INET6 if kind == "tcp6" or ":" in host else socket.AF_INET
    try:
        backlog = int(options.get("backlog", DEFAULT_BACKLOG))
        address = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0][4]
    except (OSError, ValueError) as error:
        raise ListenError(f"cannot listen on {description}: {error}") from None
    sockets: list[socket.socket] = []
    try:
        if copies > 1 and address[1]:
            # SO_REUSEPORT would join a group someone else left on the port: a
            # plain bind first fails on any listener there, as the gateway's would.
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        for _ in range(copies):
            listener = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if copies > 1:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind(address)
            listener.listen(backlog)
            listener.setblocking(False)
            # Port 0: the others join the port the kernel gave the first.
            address = listener.getsockname()
    except OSError as error:
        for listener in sockets:
            listener.close()
        raise ListenError(f"cannot listen on {description}: {error}") from None
    return sockets


def adopt_listener(reactor: Any, fd: int, factory: Any) -> IListeningPort:
    """Listen with ``factory`` on the inherited listening socket ``fd`` (then closed:
    the port holds its own copy, and closing it never shuts the socket down for
    the other processes sharing it)."""
    os.set_blocking(fd, False)
    probe = socket.socket(fileno=fd)
    family = probe.family
    probe.detach()
    port: IListeningPort = reactor.adoptStreamPort(fd, family, factory)
    os.close(fd)
    return port


def parse_inherited(values: Sequence[str]) -> dict[str, int]:
    """``--inherit DESCRIPTION=FD`` values as a mapping; ValueError for a malformed one."""
    inherited: dict[str, int] = {}
    for value in values:
        description, _, fd = value.rpartition("=")
        if not description or not fd.isdigit():
            raise ValueError(f"--inherit expects DESCRIPTION=FD, got {value!r}")
        inherited[description] = int(fd)
    return inherited


# The worker's side.


def become_worker() -> None:
    """Die with the supervisor: SIGTERM when it exits (Linux), exit now if it already has."""
    supervisor = int(os.environ.get(SUPERVISOR_PID_ENV, "0") or 0)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        except (OSError, AttributeError):
            pass
    if supervisor and os.getppid() != supervisor:
        # The supervisor died before the death signal was asked for.
        raise SystemExit(1)


def worker_log_observer() -> ILogObserver:
    """twistd's ``--logger`` for workers: its usual lines on stdout, each naming the worker.

    ``2026-01-01T10:00:00+0000 [worker 2 pid 4242 txgateway.service.GatewayService#info] ...``
    """
    tag = f"worker {os.environ.get(WORKER_NUMBER_ENV, '?')} pid {os.getpid()}"

    def format_event(event: Mapping[str, Any]) -> str | None:
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
        return formatEventAsClassicLogText({**event, "log_system": f"{tag} {system}"})

    return FileLogObserver(sys.stdout, format_event)


# The supervisor.


@dataclass(eq=False)
class Worker:
    """One worker slot: its number stays, its process changes with each restart."""

    number: int
    backoff: RestartBackoff = field(default_factory=RestartBackoff)
    process: IProcessTransport | None = None
    pid: int | None = None
    started: float = 0.0
    restart: IDelayedCall | None = None
    #: Killed by the supervisor because it outlived the shutdown deadline.
    killed: bool = False


class _WorkerProtocol(ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, worker: Worker) -> None:
        self.supervisor = supervisor
        self.worker = worker

    def processEnded(self, reason: Failure) -> None:
        self.supervisor._ended(self.worker, reason)


def describe_exit(reason: Failure) -> str:
    """``status 0``, ``status 1``, ``signal 9 (SIGKILL)``."""
    if reason.check(ProcessDone):
        return "status 0"
    error = reason.value
    if isinstance(error, ProcessTerminated):
        if error.signal is not None:
            try:
                name = signal.Signals(error.signal).name
            except ValueError:
                name = "?"
            return f"signal {error.signal} ({name})"
        return f"status {error.exitCode}"
    return str(error)


def _clean_stop(reason: Failure) -> bool:
    """Exited as asked: status 0, or ended by SIGTERM (sent before its handler was
    set up) or SIGINT (Ctrl-C reaches the whole process group, twistd re-raises it)."""
    if reason.check(ProcessDone):
        return True
    error = reason.value
    return isinstance(error, ProcessTerminated) and error.signal in (signal.SIGTERM, signal.SIGINT)


class WorkerSupervisor(MultiService):
    """Binds the listeners, runs ``config.server.workers`` workers on them, restarts them.

    ``config_path`` is the file the workers load.  ``owns_process`` (twistd
    sets it) installs the SIGHUP/SIGTERM/SIGINT handlers and makes the
    process exit 1 when a worker did not stop cleanly.  ``executable`` and
    ``bind`` are there for tests.  Child services (the ``--demo`` upstream)
    start before the workers and stop after them.
    """

    log = Logger()

    def __init__(
        self,
        config: GatewayConfig,
        config_path: str,
        reactor: Any,
        *,
        owns_process: bool = False,
        executable: str = sys.executable,
        bind: Callable[[str, bool, int], list[socket.socket]] = bind_listener,
    ) -> None:
        super().__init__()
        self.config = config
        self.config_path = os.path.abspath(config_path)
        self.reactor = reactor
        self.owns_process = owns_process
        self.executable = executable
        self._bind = bind
        self.workers = [Worker(number) for number in range(1, config.server.workers + 1)]
        #: The bound listeners: admin, ``server.listen``, ``server.tls``.
        self.listeners: list[SharedListener] = []
        self.metrics_dir: str | None = None
        #: 0 until a worker fails to stop cleanly; then the process exits 1.
        self.exit_status = 0
        self._stopping = False
        self._kill_timer: IDelayedCall | None = None
        self._all_ended: Deferred[None] | None = None
        self._stdin: int | None = None

    # Starting.

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        tls = self.config.server.tls
        try:
            if tls is not None:
                try:
                    tls_context(tls)
                except Exception as error:  # noqa: BLE001 - unreadable cert/key: refuse to start
                    raise ListenError(f"cannot load the TLS certificate/key of {tls.listen}: {error}") from None
            admin = self.config.admin.listen
            # The admin socket is shared: whichever worker is alive answers probes.
            self.listeners.append(SharedListener(admin, self._bind(admin, False, 1)))
            for description in self.config.server.listen:
                sockets = self._bind(description, False, len(self.workers))
                self.listeners.append(SharedListener(description, sockets))
            if tls is not None:
                sockets = self._bind(tls.listen, True, len(self.workers))
                self.listeners.append(SharedListener(tls.listen, sockets))
        except ListenError as error:
            self.log.critical("{error}", error=error)
            print(f"txgateway: {error}", file=sys.stderr)
            self._close_listeners()
            raise SystemExit(1) from None

    def startService(self) -> None:
        if not self.listeners:
            self.privilegedStartService()
        super().startService()
        self.metrics_dir = tempfile.mkdtemp(prefix="txgateway-metrics-")
        self._stdin = os.open(os.devnull, os.O_RDONLY)
        for listener in self.listeners:
            host, port = listener.sockets[0].getsockname()[:2]
            self.log.info(
                "txgateway supervisor listening on {host}:{port} ({description}): {sockets}",
                host=host,
                port=port,
                description=listener.description,
                sockets="one socket per worker" if len(listener.sockets) > 1 else "one socket for all workers",
            )
        if self.owns_process:
            self.reactor.callWhenRunning(self._install_signal_handlers)
        for worker in self.workers:
            self._spawn(worker)

    def _argv(self) -> list[str]:
        argv = [self.executable, "-c", _TWISTD, "--pidfile=", "-n", f"--logger={__name__}.worker_log_observer"]
        argv += ["txgateway", "-c", self.config_path, "--worker"]
        for child_fd, listener in enumerate(self.listeners, start=3):
            argv += ["--inherit", f"{listener.description}={child_fd}"]
        return argv

    def _spawn(self, worker: Worker) -> None:
        worker.restart = None
        if self._stopping:
            return
        assert self.metrics_dir is not None and self._stdin is not None
        env = dict(os.environ)
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
        env[WORKER_NUMBER_ENV] = str(worker.number)
        env[METRICS_DIR_ENV] = self.metrics_dir
        child_fds: dict[int, int | str] = {0: self._stdin, 1: 1, 2: 2}
        for child_fd, listener in enumerate(self.listeners, start=3):
            child_fds[child_fd] = listener.for_worker(worker.number).fileno()
        worker.started = self.reactor.seconds()
        try:
            process = self.reactor.spawnProcess(
                _WorkerProtocol(self, worker), self.executable, self._argv(), env=env, childFDs=child_fds
            )
        except OSError as error:
            delay = worker.backoff.delay(0.0)
            self.log.error(
                "worker {worker} could not start ({error}); trying again in {delay}s",
                worker=worker.number,
                error=error,
                delay=delay,
            )
            worker.restart = self.reactor.callLater(delay, self._spawn, worker)
            return
        worker.process, worker.pid = process, process.pid
        self.log.info("worker {worker} started (pid {pid})", worker=worker.number, pid=process.pid)

    # Exits.

    def _ended(self, worker: Worker, reason: Failure) -> None:
        pid, worker.process, worker.pid = worker.pid, None, None
        uptime = self.reactor.seconds() - worker.started
        status = describe_exit(reason)
        if pid is not None and self.metrics_dir is not None:
            # Its gauges (connections open, in flight...) stop counting; its counters stay.
            mark_process_dead(pid, self.metrics_dir)
        if self._stopping:
            clean = _clean_stop(reason) and not worker.killed
            if not clean:
                self.exit_status = 1
            log = self.log.info if clean else self.log.error
            log("worker {worker} (pid {pid}) stopped ({status})", worker=worker.number, pid=pid, status=status)
            self._check_all_ended()
            return
        delay = worker.backoff.delay(uptime)
        self.log.warn(
            "worker {worker} (pid {pid}) exited ({status}) after {uptime:.1f}s; restarting it in {delay}s",
            worker=worker.number,
            pid=pid,
            status=status,
            exit_code=getattr(reason.value, "exitCode", 0),
            signal=getattr(reason.value, "signal", None),
            uptime=uptime,
            delay=delay,
        )
        worker.restart = self.reactor.callLater(delay, self._spawn, worker)

    # Signals.

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGHUP, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self.reactor.callFromThread(self.reload)
        else:
            self.reactor.callFromThread(self._terminate, signal.Signals(signum).name)

    def reload(self) -> int:
        """SIGHUP to every running worker (each reloads its configuration); how many got it."""
        running = self._signal_workers("HUP")
        self.log.info("SIGHUP: reloading {count} worker(s)", count=running)
        return running

    def _terminate(self, name: str) -> None:
        self.log.info("Received {signal}, stopping {count} worker(s).", signal=name, count=len(self.workers))
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass

    def _signal_workers(self, name: str) -> int:
        count = 0
        for worker in self.workers:
            if worker.process is not None:
                try:
                    worker.process.signalProcess(name)
                except (OSError, ProcessLookupError) as error:
                    self.log.warn("cannot signal worker {worker}: {error}", worker=worker.number, error=error)
                    continue
                count += 1
        return count

    # Stopping.

    def stopService(self) -> Deferred[Any]:
        """SIGTERM to every worker; fires once all have exited (killed past the
        deadline) and the child services have stopped."""
        self._stopping = True
        for worker in self.workers:
            if worker.restart is not None and worker.restart.active():
                worker.restart.cancel()
            worker.restart = None
        self._signal_workers("TERM")
        # The workers hold their own copies until their graceful shutdown closes
        # them; then the port refuses connections instead of queueing them here.
        self._close_listeners()
        server = self.config.server
        deadline = server.shutdown_delay + server.shutdown_grace + STOP_MARGIN
        self._kill_timer = self.reactor.callLater(deadline, self._kill_remaining)
        self._all_ended = Deferred()
        ended = self._all_ended
        self._check_all_ended()
        ended.addCallback(lambda _: self._finish())
        ended.addCallback(lambda _: super(WorkerSupervisor, self).stopService())
        return ended

    def _check_all_ended(self) -> None:
        if self._all_ended is None or any(worker.process is not None for worker in self.workers):
            return
        ended, self._all_ended = self._all_ended, None
        ended.callback(None)

    def _kill_remaining(self) -> None:
        self._kill_timer = None
        for worker in self.workers:
            if worker.process is not None:
                worker.killed = True
                self.log.error(
                    "worker {worker} (pid {pid}) still running after the shutdown deadline: killing it",
                    worker=worker.number,
                    pid=worker.pid,
                )
                try:
                    worker.process.signalProcess("KILL")
                except (OSError, ProcessLookupError):
                    pass

    def _finish(self) -> None:
        if self._kill_timer is not None and self._kill_timer.active():
            self._kill_timer.cancel()
        self._kill_timer = None
        self._close_listeners()
        if self._stdin is not None:
            os.close(self._stdin)
            self._stdin = None
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir = None
        if self.exit_status:
            self.log.error("not every worker stopped cleanly: exiting with status {status}", status=self.exit_status)
            if self.owns_process:
                self.reactor.addSystemEventTrigger("after", "shutdown", _exit, self.exit_status)

    def _close_listeners(self) -> None:
        listeners, self.listeners = self.listeners, []
        for listener in listeners:
            listener.close()


def _exit(status: int) -> None:
    """After the reactor has shut down: end the process with ``status`` (twistd would exit 0)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
