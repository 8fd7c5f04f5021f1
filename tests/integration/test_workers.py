"""``server.workers: 2``: a real supervisor and two real worker processes.

Which worker served a connection is read from ``/proc``: the worker holding
the server side of an established connection to the proxy port.  Every test
starts its own ``twistd -n txgateway`` (they kill and signal processes).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import TestCase

from tests.integration.harness import (
    LOCALHOST,
    TWISTD,
    EchoUpstream,
    GatewayProcess,
    RawClient,
    child_environment,
    connect,
    curl,
    free_port,
    parse_responses,
    raw_exchange,
    reactor,
    run,
    sleep,
)
from tests.integration.test_http2 import curl_version, self_signed
from txgateway.service import ListenError
from txgateway.workers import bind_listener

TIMEOUT = "/usr/bin/timeout"
REQUEST = b"GET /echo/%d HTTP/1.1\r\nHost: gateway\r\n\r\n"


# What /proc says about the process group.


def worker_pids(supervisor: int) -> list[int]:
    """The live (not zombie) child processes of ``supervisor``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == supervisor and fields[0] != "Z":
            pids.append(int(entry))
    return sorted(pids)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def connections_by_worker(pids: list[int], port: int) -> dict[int, int]:
    """How many established connections to ``port`` each process holds."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = pid
    counts = dict.fromkeys(pids, 0)
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01" and fields[9] in inodes:
            counts[inodes[fields[9]]] += 1
    return counts


def metrics_dir(pid: int) -> str:
    """PROMETHEUS_MULTIPROC_DIR in a worker's environment."""
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        name, _, value = item.partition(b"=")
        if name == b"PROMETHEUS_MULTIPROC_DIR":
            return value.decode()
    raise AssertionError(f"no PROMETHEUS_MULTIPROC_DIR in the environment of {pid}")


async def eventually(check: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    deadline = reactor.seconds() + timeout
    while not check():
        if reactor.seconds() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await sleep(0.05)


def workers_config(upstream_port: int, **server: Any) -> dict[str, Any]:
    return {
        "server": {"workers": 2, "shutdown_grace": 2, **server},
        "upstreams": {"echo": {"servers": [{"address": f"{LOCALHOST}:{upstream_port}"}]}},
        "routes": [{"name": "echo", "match": {"path": "/echo/*"}, "upstream": "echo"}],
    }


class WorkersTests(TestCase):
    timeout = 120

    async def start(self, **server: Any) -> GatewayProcess:
        """A 2-worker gateway in front of an echo upstream, both workers listening."""
        echo = EchoUpstream()
        upstream_port = echo.listen(free_port())
        self.addCleanup(echo.stop)
        gateway = GatewayProcess(workers_config(upstream_port, **server))
        self.addCleanup(gateway.stop)
        await gateway.start()
        assert gateway.pid is not None
        supervisor = gateway.pid

        def both_listening() -> bool:
            pids = worker_pids(supervisor)
            log = gateway.log()
            return len(pids) == 2 and all(f"pid {pid} txgateway.service.GatewayService#info] txgateway listening on"
                                          in log for pid in pids)  # fmt: skip

        await eventually(both_listening, what="two workers listening")
        return gateway

    async def open_connections(self, port: int, count: int) -> list[RawClient]:
        """``count`` keep-alive connections, each having had one 200 answer."""
        clients = []
        for n in range(count):
            client = await connect(port)
            self.addCleanup(client.abort)
            client.send(REQUEST % n)
            [response] = await client.wait_responses(1)
            self.assertEqual(response.status, 200)
            clients.append(client)
        return clients

    async def test_both_workers_serve(self) -> None:
        gateway = await self.start()
        assert gateway.pid is not None
        pids = worker_pids(gateway.pid)
        self.assertNotIn(gateway.pid, pids)
        await self.open_connections(gateway.port, 16)
        counts = connections_by_worker(pids, gateway.port)
        self.assertEqual(sum(counts.values()), 16, counts)
        # One socket per worker (SO_REUSEPORT): the kernel spreads connections over both.
        self.assertTrue(all(counts.values()), counts)
        # The supervisor itself accepts nothing.
        self.assertEqual(connections_by_worker([gateway.pid], gateway.port), {gateway.pid: 0})
        self.assertNotIn("Traceback", gateway.log())

    async def test_metrics_cover_every_worker(self) -> None:
        gateway = await self.start()
        assert gateway.pid is not None
        pids = worker_pids(gateway.pid)
        clients = await self.open_connections(gateway.port, 12)
        for n, client in enumerate(clients):
            client.send(REQUEST % n)
            await client.wait_responses(2)
        counts = connections_by_worker(pids, gateway.port)
        self.assertTrue(all(counts.values()), counts)
        # Each worker writes its batched counts to the shared files every
        # second (and when it answers a scrape itself).
        await sleep(1.5)
        # Whichever worker answers /metrics, it counts the 24 requests of both.
        for _ in range(6):
            result = await curl(f"http://{LOCALHOST}:{gateway.admin_port}/metrics")
            self.assertEqual(result.status, 200)
            text = result.body.decode()
            total = sum(
                float(line.rpartition(" ")[2])
                for line in text.splitlines()
                if line.startswith("txgateway_requests_total{") and 'route="echo"' in line
            )
            self.assertEqual(total, 24, text)
            self.assertIn('txgateway_connections_open{protocol="http/1.1"} 12.0', text)

    async def test_killed_worker_is_replaced_and_the_port_keeps_serving(self) -> None:
        gateway = await self.start()
        assert gateway.pid is not None
        before = worker_pids(gateway.pid)
        outcomes: list[int | str] = []
        refused: list[str] = []
        running = True

        async def client_loop(loop: int) -> None:
            n = 0
            while running:
                n += 1
                request = b"GET /echo/%d-%d HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n" % (loop, n)
                try:
                    data = await raw_exchange(gateway.port, request, timeout=10.0)
                    [response] = parse_responses(data, until_close=True)
                    outcomes.append(response.status)
                except ConnectionRefusedError as error:
                    refused.append(str(error))
                except Exception as error:  # noqa: BLE001 - a request in flight on the killed worker
                    outcomes.append(type(error).__name__)

        loops = gatherResults([Deferred.fromCoroutine(client_loop(n)) for n in range(2)])
        supervisor = gateway.pid
        killed = before[0]
        try:
            await sleep(0.5)
            os.kill(killed, signal.SIGKILL)
            await eventually(lambda: bool(set(worker_pids(supervisor)) - set(before)), what="a replacement worker")
            [replacement] = set(worker_pids(supervisor)) - set(before)
            listening = f"pid {replacement} txgateway.service.GatewayService#info] txgateway listening on"
            await eventually(lambda: listening in gateway.log(), what="the replacement listening")
            await sleep(1.0)
        finally:
            running = False
            await loops
        self.assertEqual(sorted([killed, *worker_pids(supervisor)]), sorted([*before, replacement]))
        self.assertEqual(refused, [])
        failures = [outcome for outcome in outcomes if outcome != 200]
        # At most the one request each loop had in flight on the killed worker.
        self.assertLessEqual(len(failures), 2, failures)
        self.assertGreater(len(outcomes) - len(failures), 20)
        log = gateway.log()
        self.assertIn(f"(pid {killed}) exited (signal 9 (SIGKILL))", log)
        self.assertIn("restarting it in 0.5s", log)
        # The replacement took over the killed worker's socket: both serve new connections.
        await self.open_connections(gateway.port, 16)
        counts = connections_by_worker(worker_pids(gateway.pid), gateway.port)
        self.assertGreater(counts[replacement], 0, counts)

    async def test_sighup_reaches_every_worker(self) -> None:
        gateway = await self.start()
        assert gateway.pid is not None
        pids = worker_pids(gateway.pid)
        os.kill(gateway.pid, signal.SIGHUP)

        def reloaded(pid: int) -> bool:
            return any(f"pid {pid} " in line and "(sighup)" in line for line in gateway.log().splitlines())

        await eventually(lambda: all(reloaded(pid) for pid in pids), what="a SIGHUP reload in both workers")
        self.assertEqual(worker_pids(gateway.pid), pids)
        self.assertIn("SIGHUP: reloading 2 worker(s)", gateway.log())

    async def test_admin_reload_reaches_every_worker(self) -> None:
        gateway = await self.start()
        assert gateway.pid is not None
        pids = worker_pids(gateway.pid)
        config = dict(gateway.config)
        config["routes"] = [*config["routes"], {"name": "more", "match": {"path": "/more/*"}, "upstream": "echo"}]
        gateway.write_config(config)
        result = await curl("-X", "POST", f"http://{LOCALHOST}:{gateway.admin_port}/admin/reload")
        self.assertEqual(result.status, 200, result.body)
        # The answering worker asked the supervisor to reload the group.
        await eventually(lambda: "SIGHUP: reloading 2 worker(s)" in gateway.log(), what="a group reload")

        def on_generation_2(pid: int) -> bool:
            return any(f"pid {pid} " in line and "generation 2" in line for line in gateway.log().splitlines())

        await eventually(lambda: all(on_generation_2(pid) for pid in pids), what="generation 2 in both workers")

    async def test_sigterm_stops_every_worker_and_exits_0(self) -> None:
        gateway = await self.start()
        assert gateway.pid is not None
        pids = worker_pids(gateway.pid)
        directory = metrics_dir(pids[0])
        self.assertTrue(os.path.isdir(directory))
        status = await gateway.stop(timeout=30)
        log = gateway.log()
        self.assertEqual(status, 0, log)
        self.assertFalse(any(alive(pid) for pid in pids))
        self.assertFalse(os.path.exists(directory))
        for pid in pids:
            self.assertIn(f"(pid {pid}) stopped (status 0)", log)
            self.assertIn(f"pid {pid} txgateway.service.GatewayService#info] Received SIGTERM", log)
        self.assertNotIn("Traceback", log)

    async def test_hung_worker_is_killed_at_the_deadline_and_the_exit_status_says_so(self) -> None:
        gateway = await self.start(shutdown_grace=1)
        assert gateway.pid is not None
        hung, other = worker_pids(gateway.pid)
        os.kill(hung, signal.SIGSTOP)
        started = reactor.seconds()
        status = await gateway.stop(timeout=30)
        log = gateway.log()
        self.assertEqual(status, 1, log)
        # shutdown_delay 0 + shutdown_grace 1 + the 5 s margin.
        self.assertGreaterEqual(reactor.seconds() - started, 6.0)
        self.assertIn(f"(pid {hung}) still running after the shutdown deadline: killing it", log)
        self.assertIn(f"(pid {hung}) stopped (signal 9 (SIGKILL))", log)
        self.assertIn(f"(pid {other}) stopped (status 0)", log)
        self.assertIn("not every worker stopped cleanly: exiting with status 1", log)

    async def test_killed_supervisor_takes_the_workers_along(self) -> None:
        gateway = await self.start()
        assert gateway.pid is not None
        pids = worker_pids(gateway.pid)
        self.addCleanup(shutil.rmtree, metrics_dir(pids[0]), True)
        os.kill(gateway.pid, signal.SIGKILL)
        await gateway.exited()
        await eventually(lambda: not any(alive(pid) for pid in pids), what="the workers gone")
        for port in (gateway.port, gateway.admin_port):
            with socket.socket() as probe:
                # Nobody listens any more: a new gateway could bind the ports.
                self.assertNotEqual(probe.connect_ex((LOCALHOST, port)), 0)
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((LOCALHOST, port))

    async def test_tls_listener_in_every_worker(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert, key = self_signed(directory)
        tls_port = free_port()
        gateway = await self.start(tls={"listen_addr": f"{LOCALHOST}:{tls_port}", "cert": cert, "key": key})
        assert gateway.pid is not None
        for _ in range(4):
            version, status, err = await curl_version(f"https://{LOCALHOST}:{tls_port}/echo/tls", "--http2", "-k")
            self.assertEqual((version, status), ("2", 200), err)
        self.assertNotIn("Traceback", gateway.log())

    async def test_port_in_use_refuses_to_start(self) -> None:
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind((LOCALHOST, free_port()))
        taken.listen(1)
        port = taken.getsockname()[1]
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        config = workers_config(1)
        config["server"]["listen_addr"] = f"{LOCALHOST}:{port}"
        config["admin"] = {"listen_addr": f"{LOCALHOST}:{free_port()}"}
        (directory / "gateway.yaml").write_text(yaml.safe_dump(config))
        out, err, code = await run(
            TIMEOUT, "30", TWISTD, "--pidfile=", "-n", "txgateway", "-c", "gateway.yaml",
            env=child_environment(), path=str(directory),
        )  # fmt: skip
        output = (out + err).decode()
        self.assertEqual(code, 1, output)
        self.assertIn(f"txgateway: cannot listen on tcp:{port}:interface={LOCALHOST}: [Errno 98] Address already in use",
                      output)  # fmt: skip
        self.assertNotIn("worker 1 started", output)
        self.assertNotIn("Traceback", output)


class BindListenerTests(TestCase):
    """The supervisor's sockets (loopback, never connected to)."""

    def test_copies_share_one_port(self) -> None:
        sockets = bind_listener(f"tcp:0:interface={LOCALHOST}", copies=3)
        self.addCleanup(lambda: [sock.close() for sock in sockets])
        ports = {sock.getsockname() for sock in sockets}
        self.assertEqual(len(ports), 1)
        self.assertNotEqual(ports.pop()[1], 0)

    def test_port_held_by_another_reuseport_group(self) -> None:
        """SO_REUSEPORT would silently share a port another gateway's supervisor holds: refused instead."""
        others = bind_listener(f"tcp:0:interface={LOCALHOST}", copies=2)
        self.addCleanup(lambda: [sock.close() for sock in others])
        port = others[0].getsockname()[1]
        error = self.assertRaises(ListenError, bind_listener, f"tcp:{port}:interface={LOCALHOST}", copies=2)
        self.assertIn("Address already in use", str(error))

    def test_endpoints_workers_cannot_share(self) -> None:
        for description in (
            "unix:/tmp/txgateway.sock",
            "ssl:8443:privateKey=k.pem:certKey=c.pem",
            "systemd:domain=INET:index=0",
        ):
            error = self.assertRaises(ListenError, bind_listener, description)
            self.assertIn("with server.workers > 1 listeners must be tcp: or tcp6: endpoints", str(error))
