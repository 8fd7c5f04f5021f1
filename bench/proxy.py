"""Proxy throughput and latency: txgateway against nginx and the bare upstream.

One run, loopback only, every server started and stopped here:

* ``direct``    -- wrk straight at the upstream (nginx serving a fixed 1 KiB
                   body): the ceiling of this machine for this test.
* ``nginx``     -- wrk at a second nginx reverse-proxying to the upstream over
                   keep-alive connections: the reference a proxy is held to.
* ``txgateway`` -- wrk at ``twistd -n txgateway`` routing ``/*`` to the same
                   upstream.
* ``txgateway-2-workers`` -- the same with ``server.workers: 2`` (a supervisor
                   and two worker processes on one listening socket); never
                   pinned, since it is there to use more than one CPU.

Run ``.venv/bin/python bench/proxy.py --help`` (or ``make bench``); see
bench/README.md.  Results go to stdout and to bench/results/proxy-<UTC>.json.
"""

from __future__ import annotations

import argparse
import datetime
import grp
import json
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

BODY_SIZE = 1024
REQUEST_PATH = "/bench"
TARGETS = ("direct", "nginx", "txgateway", "txgateway-2-workers", "txgateway-resilient", "txgateway-cache")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
START_TIMEOUT = 30.0
KEEP_TMP_HINT = "(the logs named above are deleted: rerun with --keep-tmp to keep them)"


class BenchError(Exception):
    """A failure worth one clear line to the user (and a non-zero exit)."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP, turned into an exception so ``finally`` blocks run."""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


# --------------------------------------------------------------------------
# Processes


class ServerProcess:
    """A child process in its own session, with its output in a log file.

    Its own session keeps a Ctrl-C in the terminal away from it, so the
    benchmark decides the order of shutdown; :meth:`stop` ends it (and any
    child it forked, e.g. nginx's worker) by its process group id.
    """

    def __init__(self, name: str, argv: Sequence[str], workdir: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = workdir / f"{name}.log"
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    cwd=self.workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as e:
                raise BenchError(f"{self.name}: cannot run {self.argv[0]}: {e}") from e

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def close(self) -> None:
        """What :func:`run_guarded` calls on what a benchmark owns."""
        self.stop()

    def stop(self, grace: float = 10.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # The group outlives its leader when a worker lingers: clear it.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        tail = text.splitlines()[-lines:]
        return "\n".join("    | " + line for line in tail)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET without any proxy from the environment; HTTP errors are results."""
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_until_ok(server: ServerProcess, url: str, timeout: float = START_TIMEOUT) -> None:
    """Poll *url* until it answers 200; fail early if *server* exits."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        code = server.exited()
        if code is not None:
            raise BenchError(
                f"{server.name} exited with status {code} while starting (log {server.log_path}):\n{server.log_tail()}"
            )
        try:
            status, _ = http_get(url, timeout=1.0)
        except (OSError, urllib.error.URLError) as e:
            last = str(getattr(e, "reason", e))
        else:
            if status == 200:
                return
            last = f"HTTP {status}"
        time.sleep(0.1)
    raise BenchError(
        f"{server.name} not ready after {timeout:.0f}s at {url} ({last}); log {server.log_path}:\n{server.log_tail()}"
    )


def check_body(name: str, url: str) -> None:
    """One request before the load: a fast 404 or 502 would look like speed."""
    try:
        status, body = http_get(url)
    except (OSError, urllib.error.URLError) as e:
        raise BenchError(f"{name}: GET {url} failed: {e}") from e
    if status != 200 or len(body) != BODY_SIZE:
        raise BenchError(
            f"{name}: GET {url} gave HTTP {status} with {len(body)} bytes, "
            f"expected 200 with {BODY_SIZE}: {body[:200]!r}"
        )


# --------------------------------------------------------------------------
# CPU pinning


@dataclass(frozen=True)
class Pinning:
    """Which CPU each party runs on under ``--pin`` (empty: not pinned)."""

    proxy: str = ""
    wrk: str = ""
    upstream: str = ""

    @classmethod
    def plan(cls, enabled: bool) -> Pinning:
        """Proxy under test on the first CPU, wrk on the second, upstream on
        the third if there is one, else beside wrk (never beside the proxy)."""
        if not enabled:
            return cls()
        if shutil.which("taskset") is None:
            raise BenchError("--pin needs taskset (Debian package util-linux)")
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise BenchError(f"--pin needs at least 2 usable CPUs, have {cpus}")
        upstream = cpus[2] if len(cpus) > 2 else cpus[1]
        return cls(str(cpus[0]), str(cpus[1]), str(upstream))

    @staticmethod
    def wrap(cpu: str, argv: list[str]) -> list[str]:
        return ["taskset", "-c", cpu, *argv] if cpu else argv


# --------------------------------------------------------------------------
# Servers


def _nginx_user_line() -> str:
    """As root, nginx switches its worker to an unprivileged user: name one
    that exists here instead of relying on the compiled-in default."""
    if os.geteuid() != 0:
        return ""
    for user in ("nobody",):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        for group in ("nogroup", "nobody"):
            try:
                grp.getgrnam(group)
            except KeyError:
                continue
            return f"user {user} {group};"
    return "user root root;"


def _nginx_conf(workdir: Path, name: str, http_block: str) -> str:
    tmp = workdir / f"{name}-tmp"
    return f"""# generated by bench/proxy.py
{_nginx_user_line()}
worker_processes 1;
daemon off;
master_process on;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}.error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    server_tokens off;
    keepalive_requests 1000000;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
{http_block}
}}
"""


def nginx_upstream_conf(workdir: Path, port: int) -> str:
    body = "x" * BODY_SIZE
    return _nginx_conf(
        workdir,
        "upstream",
        f"""    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/octet-stream;
            return 200 "{body}";
        }}
    }}""",
    )


def nginx_proxy_conf(workdir: Path, port: int, upstream_port: int) -> str:
    return _nginx_conf(
        workdir,
        "nginx-proxy",
        f"""    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}""",
    )


#: What each gateway row adds to the plain proxy.
GATEWAY_VARIANTS = {
    # The plain proxy: one instance, no middleware.
    "txgateway": ("", "", ""),
    # Two instances (the same nginx by two names) with least-connections,
    # a circuit breaker, retries and passive health: the resilience path of
    # every request, with nothing failing.
    "txgateway-resilient": (
        """      - address: "localhost:{upstream_port}"
""",
        """    load_balancer: least_connections
    circuit_breaker: {{failure_threshold: 5, recovery_timeout: 30}}
    retry: {{attempts: 2}}
    passive_health: {{consecutive_failures: 5, ejection_time: 30}}
""",
        "",
    ),
    # Response cache: every measured request is a hit (nginx sends no
    # Cache-Control, so the route's ttl applies).
    "txgateway-cache": ("", "", "    cache: {{enabled: true, ttl: 600}}\n"),
    # The plain proxy in two worker processes.
    "txgateway-2-workers": ("", "", ""),
}

#: server.workers of the rows that run more than one process.
GATEWAY_WORKERS = {"txgateway-2-workers": 2}


def gateway_conf(port: int, admin_port: int, upstream_port: int, variant: str = "txgateway") -> str:
    servers, upstream_extra, route_extra = GATEWAY_VARIANTS[variant]
    return f"""# generated by bench/proxy.py ({variant})
server:
  listen_addr: "127.0.0.1:{port}"
  workers: {GATEWAY_WORKERS.get(variant, 1)}
  shutdown_grace: 2
admin:
  listen_addr: "127.0.0.1:{admin_port}"
upstreams:
  bench:
    servers:
      - address: "127.0.0.1:{upstream_port}"
{servers.format(upstream_port=upstream_port)}{upstream_extra.format()}routes:
  - name: all
    match:
      path: "/*"
    upstream: bench
{route_extra.format()}observability:
  access_log:
    enabled: false
"""


def find_nginx(given: str | None) -> str | None:
    """The nginx binary: *given*, else PATH, else /usr/sbin (not on a
    non-root user's PATH on Debian)."""
    if given is not None:
        return given if os.access(given, os.X_OK) else None
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")


def start_nginx(nginx: str, name: str, conf: str, workdir: Path, cpu: str, url: str) -> ServerProcess:
    conf_path = workdir / f"{name}.conf"
    conf_path.write_text(conf)
    # nginx creates only the last component of its temp paths.
    (workdir / f"{name}-tmp").mkdir(mode=0o755, exist_ok=True)
    argv = [
        nginx,
        "-p",
        f"{workdir}/",
        "-e",
        f"{workdir}/{name}.error.log",
        "-c",
        str(conf_path),
    ]
    server = ServerProcess(name, Pinning.wrap(cpu, argv), workdir)
    server.start()
    try:
        wait_until_ok(server, url)
    except BenchError as e:
        server.stop()
        errors = workdir / f"{name}.error.log"
        detail = errors.read_text(errors="replace")[-2000:] if errors.exists() else ""
        raise BenchError(f"{e}\n    error log:\n{detail}") from None
    return server


class PythonUpstream:
    """Stand-in upstream for machines without nginx: asyncio, keep-alive,
    GET only.  Much slower than nginx, so its ``direct`` row says little."""

    SOURCE = r"""
import asyncio, sys
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % BODY_SIZE) + b"x" * BODY_SIZE
class P(asyncio.Protocol):
    def connection_made(self, t):
        self.t, self.buf = t, b""
    def data_received(self, data):
        self.buf += data
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4:]
            self.t.write(RESPONSE * n)
async def main():
    server = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    await server.serve_forever()
asyncio.run(main())
"""

    @classmethod
    def start(cls, workdir: Path, port: int, cpu: str, url: str) -> ServerProcess:
        script = workdir / "python_upstream.py"
        script.write_text(f"BODY_SIZE = {BODY_SIZE}\n" + cls.SOURCE)
        argv = [sys.executable, str(script), str(port)]
        server = ServerProcess("python-upstream", Pinning.wrap(cpu, argv), workdir)
        server.start()
        try:
            wait_until_ok(server, url)
        except BaseException:
            server.stop()
            raise
        return server


def twistd_path() -> Path:
    """twistd of the interpreter running this script (the project's venv)."""
    path = Path(sys.executable).parent / "twistd"
    if not path.exists():
        raise BenchError(
            f"no twistd beside {sys.executable}: run this with the project's "
            "venv, e.g. .venv/bin/python bench/proxy.py (or make bench)"
        )
    return path


def start_gateway(
    workdir: Path, upstream_port: int, cpu: str, variant: str = "txgateway"
) -> tuple[ServerProcess, str]:
    port, admin_port = free_port(), free_port()
    conf_path = workdir / f"{variant}.yaml"
    conf_path.write_text(gateway_conf(port, admin_port, upstream_port, variant))
    argv = [str(twistd_path()), "--pidfile=", "-n", "txgateway", "-c", str(conf_path)]
    server = ServerProcess("txgateway", Pinning.wrap(cpu, argv), workdir)
    server.start()
    try:
        wait_until_ok(server, f"http://127.0.0.1:{admin_port}/ready")
    except BaseException:
        server.stop()
        raise
    return server, f"http://127.0.0.1:{port}{REQUEST_PATH}"


# --------------------------------------------------------------------------
# wrk

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _latency_ms(text: str, percentile: str) -> float | None:
    m = re.search(rf"^\s*{percentile}(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.MULTILINE)
    return float(m.group(1)) * _UNITS_MS[m.group(2)] if m else None


def parse_wrk(text: str) -> dict[str, float | int | None]:
    """The numbers this benchmark reports, from ``wrk --latency`` output."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.MULTILINE)
    total = re.search(r"^\s*(\d+) requests in ", text, re.MULTILINE)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if rps is None or total is None:
        raise ValueError("no 'Requests/sec' / 'requests in' line")
    return {
        "requests_per_sec": float(rps.group(1)),
        "requests": int(total.group(1)),
        "p50_ms": _latency_ms(text, "50"),
        "p99_ms": _latency_ms(text, "99"),
        "socket_errors": sum(int(g) for g in sock.groups()) if sock else 0,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def run_wrk(
    url: str,
    seconds: int,
    connections: int,
    threads: int,
    cpu: str,
    register: Callable[[subprocess.Popen[bytes] | None], None],
) -> str:
    argv = Pinning.wrap(
        cpu,
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            url,
        ],
    )
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    register(proc)
    try:
        out, _ = proc.communicate(timeout=seconds + 30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        register(None)
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise BenchError(f"wrk exited with {proc.returncode} against {url}:\n{text}")
    return text


# --------------------------------------------------------------------------
# Report


@dataclass
class Row:
    target: str
    url: str = ""
    requests_per_sec: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    requests: int | None = None
    non_2xx: int | None = None
    socket_errors: int | None = None
    ratio_to_nginx: float | None = None
    note: str = ""
    error: str = ""
    wrk_output: str = field(default="", repr=False)


def _version(argv: list[str], prefix: str) -> str:
    """First line of *argv*'s output, less *prefix* and any copyright."""
    try:
        out = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    lines = (out.stdout + out.stderr).strip().splitlines()
    first = lines[0] if lines else "?"
    first = first.removeprefix(prefix)
    return re.sub(r"\s+Copyright.*$", "", first).strip()


def environment(nginx: str | None) -> dict[str, object]:
    try:
        import twisted

        twisted_version = twisted.__version__
    except ImportError:
        twisted_version = "not importable"
    try:
        import txgateway

        txgateway_version = txgateway.__version__
    except ImportError:
        txgateway_version = "not importable"
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "loadavg_at_start": os.getloadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted_version,
        "txgateway": txgateway_version,
        "nginx": _version([nginx, "-v"], "nginx version: nginx/") if nginx else "not installed",
        "wrk": _version(["wrk", "-v"], "wrk "),
    }


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def print_report(rows: list[Row], env: dict[str, object], settings: dict[str, object]) -> None:
    pinning = settings["pinning"]
    pins = " ".join(f"{k}=cpu{v}" for k, v in pinning.items()) if isinstance(pinning, dict) and pinning else "none"
    print()
    print(
        f"cores: {env['cpu_count']} ({env['cpus_usable']} usable) {env['cpu_model']}\n"
        f"python {env['python']}, twisted {env['twisted']}, txgateway {env['txgateway']}, "
        f"nginx {env['nginx']}, wrk {env['wrk']}\n"
        f"wrk: {settings['threads']} thread(s), {settings['connections']} connections, "
        f"{settings['duration']}s after {settings['warmup']}s warm-up; "
        f"{BODY_SIZE}-byte responses; pinning: {pins}"
    )
    header = f"{'target':<20} {'req/s':>10} {'p50':>9} {'p99':>9} {'non-2xx':>8} {'vs nginx':>9}"
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        if r.error:
            first = r.error.splitlines()[0]
            shown = first if first.startswith("skipped") else "failed: " + first
            print(f"{r.target:<20} {shown}")
            continue
        print(
            f"{r.target:<20} {_fmt(r.requests_per_sec, ',.0f'):>10} "
            f"{_fmt(r.p50_ms, '.2f', 'ms'):>9} {_fmt(r.p99_ms, '.2f', 'ms'):>9} "
            f"{_fmt(r.non_2xx, 'd'):>8} {_fmt(r.ratio_to_nginx, '.2f', 'x'):>9}" + (f"  ({r.note})" if r.note else "")
        )
    print()


def write_json(rows: list[Row], env: dict[str, object], settings: dict[str, object]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"proxy-{stamp}.json"
    doc = {
        "benchmark": "proxy",
        "timestamp": stamp,
        "settings": settings,
        "environment": env,
        "results": [asdict(r) for r in rows],
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark txgateway against nginx and the bare upstream (loopback, wrk, 1 KiB responses).",
    )
    p.add_argument(
        "--duration",
        type=int,
        default=10,
        metavar="SECONDS",
        help="measured seconds per target (default 10)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        metavar="SECONDS",
        help="unmeasured wrk run before each target (default 2, 0 = none)",
    )
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument(
        "--only",
        default=",".join(TARGETS),
        metavar="LIST",
        help="comma-separated targets to run, of: " + ", ".join(TARGETS) + " (default: all)",
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="record a target that fails and go on with the others (the exit status is still 1)",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="pin with taskset: proxy under test on CPU 0, wrk on CPU 1, "
        "upstream on CPU 2 (or CPU 1 on a 2-CPU machine)",
    )
    p.add_argument(
        "--nginx",
        metavar="PATH",
        help="nginx binary (default: nginx on PATH, else /usr/sbin/nginx)",
    )
    p.add_argument(
        "--keep-tmp",
        action="store_true",
        help="keep the temporary directory with configs and server logs",
    )
    args = p.parse_args(argv)
    only = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = [t for t in only if t not in TARGETS]
    if unknown or not only:
        p.error(f"--only: unknown target(s) {unknown}; choose from {', '.join(TARGETS)}")
    args.only = [t for t in TARGETS if t in only]
    if args.duration < 1 or args.connections < 1 or args.threads < 1 or args.warmup < 0:
        p.error("--duration, --connections and --threads must be >= 1, --warmup >= 0")
    if args.threads > args.connections:
        p.error("--threads must not exceed --connections")
    return args


class Bench:
    """Owns every process it starts, and stops them all in :meth:`close`."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.pins = Pinning.plan(args.pin)
        self.servers: list[ServerProcess] = []
        self.wrk: subprocess.Popen[bytes] | None = None
        self.failed = False
        self.nginx = find_nginx(args.nginx)

    def _set_wrk(self, proc: subprocess.Popen[bytes] | None) -> None:
        self.wrk = proc

    def close(self) -> None:
        if self.wrk is not None and self.wrk.poll() is None:
            os.killpg(self.wrk.pid, signal.SIGKILL)
            self.wrk.wait()
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()

    def _stop(self, server: ServerProcess) -> None:
        server.stop()
        self.servers.remove(server)

    def measure(self, row: Row) -> None:
        a = self.args
        check_body(row.target, row.url)
        if a.warmup:
            run_wrk(
                row.url,
                a.warmup,
                a.connections,
                a.threads,
                self.pins.wrk,
                self._set_wrk,
            )
        out = run_wrk(row.url, a.duration, a.connections, a.threads, self.pins.wrk, self._set_wrk)
        row.wrk_output = out
        try:
            stats = parse_wrk(out)
        except ValueError as e:
            raise BenchError(f"cannot read wrk's output ({e}):\n{out}") from None
        for key, value in stats.items():
            setattr(row, key, value)
        if row.non_2xx or row.socket_errors:
            problem = f"{row.non_2xx} non-2xx, {row.socket_errors} socket errors"
            row.note = f"{row.note}; {problem}" if row.note else problem

    def run(self) -> list[Row]:
        a = self.args
        rows: list[Row] = []
        failed = False

        def attempt(row: Row, body: Callable[[], None]) -> None:
            nonlocal failed
            rows.append(row)
            try:
                body()
            except BenchError as e:
                failed = True
                row.error = str(e)
                if not a.keep_going:
                    raise
                print(
                    f"{row.target}: FAILED, going on (--keep-going):\n{e}",
                    file=sys.stderr,
                )

        # The upstream every row ends at.
        up_port = free_port()
        up_url = f"http://127.0.0.1:{up_port}{REQUEST_PATH}"
        if self.nginx:
            print(f"starting upstream nginx on 127.0.0.1:{up_port}", file=sys.stderr)
            self.servers.append(
                start_nginx(
                    self.nginx,
                    "upstream",
                    nginx_upstream_conf(self.workdir, up_port),
                    self.workdir,
                    self.pins.upstream,
                    up_url,
                )
            )
        else:
            print(
                "NOTE: no nginx binary (Debian package nginx; `make bench-deps`): "
                "the nginx row is skipped and a small Python server stands in as "
                "the upstream, so the direct row is not comparable.",
                file=sys.stderr,
            )
            self.servers.append(PythonUpstream.start(self.workdir, up_port, self.pins.upstream, up_url))

        for target in a.only:
            if target == "direct":
                row = Row("direct", up_url, note="" if self.nginx else "python upstream")

                def direct_row(row: Row = row) -> None:
                    print(f"measuring direct: {row.url}", file=sys.stderr)
                    self.measure(row)

                attempt(row, direct_row)
            elif target == "nginx":
                nginx = self.nginx
                if not nginx:
                    rows.append(Row("nginx", error="skipped: nginx is not installed"))
                    continue
                px_port = free_port()
                row = Row("nginx", f"http://127.0.0.1:{px_port}{REQUEST_PATH}")

                def nginx_row(row: Row = row, px_port: int = px_port, nginx: str = nginx) -> None:
                    print(f"starting nginx proxy on 127.0.0.1:{px_port}", file=sys.stderr)
                    proxy = start_nginx(
                        nginx,
                        "nginx-proxy",
                        nginx_proxy_conf(self.workdir, px_port, up_port),
                        self.workdir,
                        self.pins.proxy,
                        row.url,
                    )
                    self.servers.append(proxy)
                    print(f"measuring nginx: {row.url}", file=sys.stderr)
                    try:
                        self.measure(row)
                    finally:
                        self._stop(proxy)

                attempt(row, nginx_row)
            elif target in GATEWAY_VARIANTS:
                row = Row(target)

                def gateway_row(row: Row = row, variant: str = target) -> None:
                    print(f"starting {variant} (twistd)", file=sys.stderr)
                    cpu = self.pins.proxy
                    if variant in GATEWAY_WORKERS and cpu:
                        cpu = ""
                        row.note = "not pinned"
                    gateway, row.url = start_gateway(self.workdir, up_port, cpu, variant)
                    self.servers.append(gateway)
                    print(f"measuring {variant}: {row.url}", file=sys.stderr)
                    try:
                        self.measure(row)
                    finally:
                        self._stop(gateway)

                attempt(row, gateway_row)

        base = next((r.requests_per_sec for r in rows if r.target == "nginx"), None)
        if base:
            for r in rows:
                if r.requests_per_sec is not None:
                    r.ratio_to_nginx = r.requests_per_sec / base
        self.failed = failed
        return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print(
            "error: wrk is not installed (Debian package wrk; `make bench-deps`)",
            file=sys.stderr,
        )
        return 1

    def measure(workdir: Path, owned: list[Any]) -> int:
        bench = Bench(args, workdir)
        owned.append(bench)
        env = environment(bench.nginx)
        settings: dict[str, object] = {
            "duration": args.duration,
            "warmup": args.warmup,
            "connections": args.connections,
            "threads": args.threads,
            "only": args.only,
            "body_bytes": BODY_SIZE,
            "path": REQUEST_PATH,
            "pinning": ({k: v for k, v in asdict(bench.pins).items() if v} if args.pin else {}),
        }
        rows = bench.run()
        bench.close()
        print_report(rows, env, settings)
        path = write_json(rows, env, settings)
        print(f"results: {path}")
        return 1 if bench.failed else 0

    return run_guarded("txgateway-bench-", args.keep_tmp, measure)


def run_guarded(prefix: str, keep_tmp: bool, body: Callable[[Path, list[Any]], int]) -> int:
    """The frame every benchmark command runs ``body(workdir, owned)`` in.

    SIGTERM/SIGHUP become :class:`Interrupted`; ``workdir`` is a fresh
    temporary directory (world-readable: nginx's worker may run as nobody
    when we are root), removed at the end unless ``keep_tmp``; everything
    ``body`` appends to ``owned`` is closed however it ends, a second Ctrl-C
    included.  Returns the exit status.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    workdir.chmod(0o755)
    owned: list[Any] = []
    try:
        status = body(workdir, owned)
        if status and not keep_tmp:
            print(KEEP_TMP_HINT, file=sys.stderr)
        return status
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        if not keep_tmp:
            print(KEEP_TMP_HINT, file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"\ninterrupted ({str(e) or 'SIGINT'}): stopping servers", file=sys.stderr)
        return 130
    finally:
        # A second Ctrl-C must not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for owner in owned:
            owner.close()
        if keep_tmp:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

if __name__ == "__main__":
    sys.exit(main())
