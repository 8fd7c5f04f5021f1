"""The worker supervisor on a fake clock and fake processes.

:class:`ProcessReactor` is a :class:`Clock` that "spawns" :class:`FakeProcess`
objects: a test makes a worker exit (``process.exit(...)``) and looks at what
the supervisor does about it: when it starts a new one, with what, which
signals each worker got, when ``stopService`` fires, what it logged.  No
process runs and nothing listens (the sockets given to the supervisor are
never bound); the real thing is in tests/integration/test_workers.py.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import sys
from typing import Any

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.test_http2 import self_signed
from txgateway.config import parse_config
from txgateway.tap import Options
from txgateway.workers import (
    METRICS_DIR_ENV,
    STOP_MARGIN,
    SUPERVISOR_PID_ENV,
    WORKER_NUMBER_ENV,
    RestartBackoff,
    WorkerSupervisor,
    describe_exit,
    parse_inherited,
    worker_log_observer,
)

CONFIG = """\
server:
  listen: ["tcp:8080:interface=127.0.0.1", "tcp6:8081:interface=\\\\:\\\\:1"]
  workers: 3
  shutdown_delay: 2
  shutdown_grace: 10
admin:
  listen_addr: "127.0.0.1:9090"
upstreams:
  users: {servers: [{address: "127.0.0.1:9001"}]}
routes:
  - {name: users, match: {path: "/users/*"}, upstream: users}
"""
ADMIN = "tcp:9090:interface=127.0.0.1"
PROXY = "tcp:8080:interface=127.0.0.1"


class FakeProcess:
    """What ``spawnProcess`` returns: records signals, ends when the test says so."""

    def __init__(self, reactor: ProcessReactor, pid: int, protocol: Any, args: list[str], env: dict[str, str],
                 child_fds: dict[int, Any]) -> None:  # fmt: skip
        self.reactor = reactor
        self.pid: int | None = pid
        self.original_pid = pid
        self.protocol = protocol
        self.args = args
        self.env = env
        self.child_fds = child_fds
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        if self.pid is None:
            raise ProcessLookupError(name)
        self.signals.append(name)

    @property
    def running(self) -> bool:
        return self.pid is not None

    def exit(self, code: int = 0, by_signal: int | None = None) -> None:
        self.pid = None
        if code == 0 and by_signal is None:
            reason = Failure(ProcessDone(0))
        else:
            reason = Failure(ProcessTerminated(None if by_signal else code, by_signal))
        self.protocol.processEnded(reason)


class ProcessReactor(Clock):
    """A Clock that spawns :class:`FakeProcess` objects (and runs calls from threads at once)."""

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []
        self.triggers: list[tuple[str, str, Any, tuple[Any, ...]]] = []
        self.stopped = False

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: dict[str, str] | None = None,
                     path: str | None = None, uid: int | None = None, gid: int | None = None, usePTY: bool = False,
                     childFDs: dict[int, Any] | None = None) -> FakeProcess:  # fmt: skip
        process = FakeProcess(self, 4000 + len(self.processes), protocol, args, env or {}, childFDs or {})
        self.processes.append(process)
        return process

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)

    def callWhenRunning(self, f: Any, *args: Any) -> None:
        f(*args)

    def addSystemEventTrigger(self, phase: str, event: str, f: Any, *args: Any) -> None:
        self.triggers.append((phase, event, f, args))

    def stop(self) -> None:
        self.stopped = True

    def running(self) -> list[FakeProcess]:
        return [process for process in self.processes if process.running]

    def of_worker(self, number: int) -> list[FakeProcess]:
        return [process for process in self.processes if process.env[WORKER_NUMBER_ENV] == str(number)]


class SupervisorTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ProcessReactor()
        self.sockets: dict[str, list[socket.socket]] = {}
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def bind(self, description: str, tls: bool, copies: int) -> list[socket.socket]:
        """Unbound sockets standing for the listeners: real file descriptors, no network."""
        sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(copies)]
        for sock in sockets:
            self.addCleanup(sock.close)
        self.sockets[description] = sockets
        return sockets

    def start(self, text: str = CONFIG) -> WorkerSupervisor:
        config = parse_config(text, environ={})
        supervisor = WorkerSupervisor(config, "/etc/txgateway/gateway.yaml", self.reactor, bind=self.bind)
        supervisor.privilegedStartService()
        supervisor.startService()
        self.addCleanup(self._stop, supervisor)
        return supervisor

    def _stop(self, supervisor: WorkerSupervisor) -> None:
        if supervisor.running:
            d = supervisor.stopService()
            for process in self.reactor.running():
                process.exit(0)
            self.successResultOf(d)

    def logged(self, text: str) -> list[dict[str, Any]]:
        return [event for event in self.events if text in event.get("log_format", "")]


class RestartBackoffTests(SynchronousTestCase):
    def test_doubles_up_to_the_maximum(self) -> None:
        backoff = RestartBackoff()
        self.assertEqual([backoff.delay(1.0) for _ in range(8)], [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0])

    def test_a_worker_that_stayed_up_starts_over(self) -> None:
        backoff = RestartBackoff()
        self.assertEqual([backoff.delay(1.0) for _ in range(3)], [0.5, 1.0, 2.0])
        self.assertEqual(backoff.delay(29.9), 4.0)
        self.assertEqual(backoff.delay(30.0), 0.5)
        self.assertEqual(backoff.delay(0.1), 1.0)


class SpawnTests(SupervisorTestCase):
    def test_starts_every_worker_with_the_listeners(self) -> None:
        supervisor = self.start()
        processes = self.reactor.processes
        self.assertEqual(len(processes), 3)
        tcp6 = "tcp6:8081:interface=\\:\\:1"
        for number, process in enumerate(processes, start=1):
            self.assertEqual(process.args[0], sys.executable)
            self.assertEqual(
                process.args[-10:],
                ["txgateway", "-c", "/etc/txgateway/gateway.yaml", "--worker",
                 "--inherit", f"{ADMIN}=3", "--inherit", f"{PROXY}=4", "--inherit", f"{tcp6}=5"],
            )  # fmt: skip
            self.assertIn("-n", process.args)
            self.assertIn("--pidfile=", process.args)
            self.assertEqual(process.env[WORKER_NUMBER_ENV], str(number))
            self.assertEqual(process.env[SUPERVISOR_PID_ENV], str(os.getpid()))
            self.assertEqual(process.env[METRICS_DIR_ENV], supervisor.metrics_dir)
            # One admin socket for all; one socket per worker on each proxy port.
            self.assertEqual(process.child_fds[1], 1)
            self.assertEqual(process.child_fds[2], 2)
            self.assertEqual(process.child_fds[3], self.sockets[ADMIN][0].fileno())
            self.assertEqual(process.child_fds[4], self.sockets[PROXY][number - 1].fileno())
            self.assertEqual(process.child_fds[5], self.sockets[tcp6][number - 1].fileno())
        self.assertEqual(len(self.sockets[ADMIN]), 1)
        self.assertEqual(len(self.sockets[PROXY]), 3)
        assert supervisor.metrics_dir is not None
        self.assertTrue(os.path.isdir(supervisor.metrics_dir))
        self.assertEqual([event["pid"] for event in self.logged("started (pid")], [4000, 4001, 4002])

    def test_tls_listener_gets_a_socket_per_worker(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        cert, key = self_signed(directory)
        text = CONFIG.replace(
            "  workers: 3\n", f"  workers: 2\n  tls: {{listen_addr: '127.0.0.1:8443', cert: {cert}, key: {key}}}\n"
        )
        self.start(text)
        tls = [description for description in self.sockets if description.startswith("ssl:8443:")]
        self.assertEqual(len(tls), 1)
        self.assertEqual(len(self.sockets[tls[0]]), 2)
        first, second = self.reactor.processes
        self.assertIn(f"{tls[0]}=6", first.args)
        self.assertEqual(second.child_fds[6], self.sockets[tls[0]][1].fileno())


class RestartTests(SupervisorTestCase):
    def test_exited_worker_restarts_with_backoff(self) -> None:
        self.start()
        first = self.reactor.of_worker(2)[0]
        self.reactor.advance(5)
        first.exit(1)
        [event] = self.logged("exited (")
        self.assertEqual((event["worker"], event["pid"], event["status"]), (2, 4001, "status 1"))
        self.assertEqual((event["exit_code"], event["delay"]), (1, 0.5))
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.reactor.advance(0.49)
        self.assertEqual(len(self.reactor.of_worker(2)), 1)
        self.reactor.advance(0.01)
        workers = self.reactor.of_worker(2)
        self.assertEqual(len(workers), 2)
        self.assertTrue(workers[1].running)
        # The others were left alone.
        self.assertEqual(len(self.reactor.running()), 3)
        # Failing again at once: the wait doubles each time, up to 10 s.
        waits = []
        for _ in range(6):
            started = self.reactor.seconds()
            self.reactor.of_worker(2)[-1].exit(by_signal=signal.SIGKILL)
            count = len(self.reactor.of_worker(2))
            while len(self.reactor.of_worker(2)) == count:
                self.reactor.advance(0.25)
            waits.append(self.reactor.seconds() - started)
        self.assertEqual(waits, [1.0, 2.0, 4.0, 8.0, 10.0, 10.0])
        self.assertEqual(self.logged("exited (")[-1]["status"], "signal 9 (SIGKILL)")
        # A worker that stayed up 30 s is back 0.5 s after it exits.
        self.reactor.advance(30)
        self.reactor.of_worker(2)[-1].exit(1)
        count = len(self.reactor.of_worker(2))
        self.reactor.advance(0.5)
        self.assertEqual(len(self.reactor.of_worker(2)), count + 1)

    def test_each_worker_has_its_own_backoff(self) -> None:
        self.start()
        self.reactor.of_worker(1)[0].exit(1)
        self.reactor.advance(0.5)
        self.reactor.of_worker(1)[-1].exit(1)
        self.reactor.of_worker(3)[0].exit(1)
        self.assertEqual([event["delay"] for event in self.logged("exited (")], [0.5, 1.0, 0.5])

    def test_exited_worker_gauges_stop_counting(self) -> None:
        """Its live gauges (connections open, in flight) leave the group's sums; its counters stay."""
        supervisor = self.start()
        assert supervisor.metrics_dir is not None
        process = self.reactor.of_worker(1)[0]
        names = [f"gauge_livesum_{process.original_pid}.db", f"counter_{process.original_pid}.db"]
        for name in names:
            with open(os.path.join(supervisor.metrics_dir, name), "wb"):
                pass
        process.exit(by_signal=signal.SIGKILL)
        self.assertEqual(sorted(os.listdir(supervisor.metrics_dir)), [names[1]])


class SignalTests(SupervisorTestCase):
    def test_reload_reaches_every_running_worker(self) -> None:
        supervisor = self.start()
        self.reactor.of_worker(3)[0].exit(1)
        self.assertEqual(supervisor.reload(), 2)
        self.assertEqual([process.signals for process in self.reactor.processes], [["HUP"], ["HUP"], []])
        self.reactor.advance(0.5)
        self.assertEqual(self.reactor.of_worker(3)[-1].signals, [])

    def test_signal_handlers(self) -> None:
        """SIGHUP is forwarded; SIGTERM and SIGINT stop the reactor (stopService does the rest)."""
        config = parse_config(CONFIG, environ={})
        supervisor = WorkerSupervisor(config, "gateway.yaml", self.reactor, bind=self.bind, owns_process=True)
        previous = {number: signal.getsignal(number) for number in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
        for number, handler in previous.items():
            self.addCleanup(signal.signal, number, handler)
        supervisor.privilegedStartService()
        supervisor.startService()
        self.addCleanup(self._stop, supervisor)
        self.assertEqual(signal.getsignal(signal.SIGHUP), supervisor._on_signal)
        supervisor._on_signal(signal.SIGHUP, None)
        self.assertEqual([process.signals for process in self.reactor.processes], [["HUP"]] * 3)
        self.assertFalse(self.reactor.stopped)
        supervisor._on_signal(signal.SIGTERM, None)
        self.assertTrue(self.reactor.stopped)
        self.assertEqual(self.logged("Received {signal}")[0]["signal"], "SIGTERM")


class StopTests(SupervisorTestCase):
    def test_stop_waits_for_every_worker(self) -> None:
        supervisor = self.start()
        metrics_dir = supervisor.metrics_dir
        sockets = [sock for group in self.sockets.values() for sock in group]
        d = supervisor.stopService()
        self.assertEqual([process.signals for process in self.reactor.processes], [["TERM"]] * 3)
        # The supervisor's copies close at once: the workers hold theirs until they drain.
        self.assertEqual({sock.fileno() for sock in sockets}, {-1})
        first, second, third = self.reactor.processes
        first.exit(0)
        second.exit(by_signal=signal.SIGTERM)
        self.assertNoResult(d)
        self.reactor.advance(10)
        self.assertNoResult(d)
        third.exit(0)
        self.successResultOf(d)
        self.assertEqual(supervisor.exit_status, 0)
        assert metrics_dir is not None
        self.assertFalse(os.path.exists(metrics_dir))
        # Nothing restarts, nothing is killed later.
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.processes), 3)
        self.assertEqual(first.signals, ["TERM"])

    def test_workers_past_the_deadline_are_killed(self) -> None:
        supervisor = self.start()
        d = supervisor.stopService()
        first, second, third = self.reactor.processes
        first.exit(0)
        second.exit(0)
        # shutdown_delay 2 + shutdown_grace 10 + the margin.
        self.reactor.advance(12 + STOP_MARGIN - 0.01)
        self.assertEqual(third.signals, ["TERM"])
        self.reactor.advance(0.01)
        self.assertEqual(third.signals, ["TERM", "KILL"])
        self.assertNoResult(d)
        third.exit(by_signal=signal.SIGKILL)
        self.successResultOf(d)
        self.assertEqual(supervisor.exit_status, 1)
        [event] = self.logged("still running after the shutdown deadline")
        self.assertEqual(event["worker"], 3)

    def test_unclean_exit_while_stopping_fails_the_process(self) -> None:
        supervisor = self.start()
        d = supervisor.stopService()
        for process in self.reactor.processes[:2]:
            process.exit(0)
        self.reactor.processes[2].exit(1)
        self.successResultOf(d)
        self.assertEqual(supervisor.exit_status, 1)
        stopped = self.logged("stopped ({status})")
        self.assertEqual([event["status"] for event in stopped], ["status 0", "status 0", "status 1"])
        self.assertEqual(stopped[2]["log_level"], LogLevel.error)

    def test_stop_cancels_pending_restarts(self) -> None:
        supervisor = self.start()
        self.reactor.of_worker(1)[0].exit(1)
        d = supervisor.stopService()
        for process in self.reactor.running():
            process.exit(0)
        self.successResultOf(d)
        self.reactor.advance(20)
        self.assertEqual(len(self.reactor.processes), 3)
        self.assertEqual(supervisor.exit_status, 0)


class WorkerSideTests(SynchronousTestCase):
    def test_parse_inherited(self) -> None:
        self.assertEqual(
            parse_inherited(["tcp:8080:interface=127.0.0.1=4", "ssl:8443:interface=0.0.0.0:certKey=a=b.pem=5"]),
            {"tcp:8080:interface=127.0.0.1": 4, "ssl:8443:interface=0.0.0.0:certKey=a=b.pem": 5},
        )
        for bad in ("tcp:8080", "=3", "tcp:8080=x"):
            self.assertRaises(ValueError, parse_inherited, [bad])

    def test_inherit_is_for_workers_only(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(CONFIG)
        options = Options()
        error = self.assertRaises(usage.UsageError, options.parseOptions, ["-c", path, "--inherit", f"{PROXY}=4"])
        self.assertIn("--inherit is for workers", str(error))

    def test_describe_exit(self) -> None:
        self.assertEqual(describe_exit(Failure(ProcessDone(0))), "status 0")
        self.assertEqual(describe_exit(Failure(ProcessTerminated(3))), "status 3")
        self.assertEqual(describe_exit(Failure(ProcessTerminated(None, signal.SIGKILL))), "signal 9 (SIGKILL)")

    def test_worker_log_lines_name_the_worker(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(os, "environ", {**os.environ, WORKER_NUMBER_ENV: "2"})
        observer = worker_log_observer()
        log = Logger(namespace="txgateway.reload.Reloader", observer=observer)
        log.info("config reload ({trigger})", trigger="sighup")
        line = out.getvalue()
        self.assertIn(f"[worker 2 pid {os.getpid()} txgateway.reload.Reloader#info] config reload (sighup)\n", line)
