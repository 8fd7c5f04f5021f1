"""HTTP/2 and gRPC throughput and latency: txgateway against nginx and the bare upstreams.

One run, loopback only, every server started and stopped here, h2load as
the client (h2c with prior knowledge, ``-c 4 -m 10`` by default):

* ``direct``          -- straight at an nginx upstream serving a fixed 1 KiB
                         body over h2c: the ceiling of this machine.
* ``nginx``           -- at nginx as an HTTP/2 front proxy, forwarding over
                         HTTP/1.1 keep-alive to the same nginx: the reference.
* ``txgateway``       -- at txgateway (h2c on its normal port) routing ``/*``
                         to the nginx upstream over HTTP/1.1.
* ``txgateway-h2c``   -- the same with an h2c upstream (``protocol: h2c``).
* ``grpc-direct``     -- gRPC unary calls (h2load posting one framed message)
                         straight at a grpcio server.
* ``grpc-nginx``      -- the same through nginx's ``grpc_pass``.
* ``grpc-txgateway``  -- the same through txgateway (``protocol: grpc``).

Run ``.venv/bin/python bench/h2.py --help``.  Results go to stdout and to
bench/results/h2-<UTC>.json.  Processes, pinning and cleanup are those of
bench/proxy.py, imported from it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Run as a script, bench/ is first on sys.path and this file would shadow the h2 package: import
# that with bench/ out of the way, then bench/proxy.py (whose process handling this reuses).
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or os.curdir).resolve() != _BENCH_DIR]
import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.events  # noqa: E402

sys.path.insert(0, str(_BENCH_DIR))
import proxy  # noqa: E402
from proxy import BODY_SIZE, REQUEST_PATH, BenchError, Pinning, ServerProcess, free_port  # noqa: E402

LOCALHOST = "127.0.0.1"
HTTP_TARGETS = ("direct", "nginx", "txgateway", "txgateway-h2c")
GRPC_TARGETS = ("grpc-direct", "grpc-nginx", "grpc-txgateway")
TARGETS = HTTP_TARGETS + GRPC_TARGETS
#: Which row each row is compared with: (the ceiling, the nginx reference).
REFERENCES = {
    **dict.fromkeys(HTTP_TARGETS, ("direct", "nginx")),
    **dict.fromkeys(GRPC_TARGETS, ("grpc-direct", "grpc-nginx")),
}
GRPC_METHOD = "/echo.Echo/Unary"
GRPC_COUNT = "/echo.Echo/Count"
GRPC_MESSAGE = b"m" * 128
KEEP_TMP_HINT = proxy.KEEP_TMP_HINT


def grpc_frame(message: bytes) -> bytes:
    """One length-prefixed gRPC message (uncompressed)."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


# --------------------------------------------------------------------------
# A minimal blocking h2c client, for readiness and correctness checks


@dataclass
class H2Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    trailers: dict[str, str] = field(default_factory=dict)

    def grpc(self) -> tuple[int | None, str, bytes]:
        """gRPC status (None: none sent), message and first response message."""
        fields = {**self.headers, **self.trailers}
        status = fields.get("grpc-status")
        body = self.body
        message = body[5 : 5 + int.from_bytes(body[1:5], "big")] if len(body) >= 5 else b""
        return (None if status is None else int(status)), fields.get("grpc-message", ""), message


def h2_request(
    port: int, path: str, method: str = "GET", body: bytes = b"", headers: Sequence[tuple[str, str]] = (),
    timeout: float = 2.0,
) -> H2Response:  # fmt: skip
    """One request on a new h2c (prior knowledge) connection; the whole response.

    ``body`` must fit in one DATA frame (16 KiB); raises OSError or BenchError.
    """
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    response = H2Response()
    with socket.create_connection((LOCALHOST, port), timeout=timeout) as sock:
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        request_headers = [
            (":method", method), (":scheme", "http"), (":authority", f"{LOCALHOST}:{port}"), (":path", path),
            *headers,
        ]  # fmt: skip
        conn.send_headers(stream, request_headers, end_stream=not body)
        if body:
            conn.send_data(stream, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        while True:
            data = sock.recv(65536)
            if not data:
                raise BenchError(f"127.0.0.1:{port} closed the connection before the response ended")
            for event in conn.receive_data(data):
                if getattr(event, "stream_id", stream) != stream:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
                    response.headers = {str(k): str(v) for k, v in event.headers}
                    response.status = int(response.headers.get(":status", "0"))
                elif isinstance(event, h2.events.TrailersReceived):
                    response.trailers = {str(k): str(v) for k, v in event.headers}
                elif isinstance(event, h2.events.DataReceived):
                    response.body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded):
                    return response
                elif isinstance(event, h2.events.StreamReset):
                    raise BenchError(f"127.0.0.1:{port} reset the stream (error code {event.error_code})")
                elif isinstance(event, h2.events.ConnectionTerminated):
                    raise BenchError(f"127.0.0.1:{port} ended the connection (GOAWAY {event.error_code})")
            out = conn.data_to_send()
            if out:
                sock.sendall(out)


def grpc_call(port: int, method: str, message: bytes, timeout: float = 2.0) -> tuple[int | None, str, bytes]:
    response = h2_request(
        port, method, "POST", grpc_frame(message),
        [("content-type", "application/grpc"), ("te", "trailers")], timeout,
    )  # fmt: skip
    if response.status != 200:
        raise BenchError(f"gRPC {method} on 127.0.0.1:{port}: HTTP status {response.status}")
    return response.grpc()


def probe_http(port: int) -> Callable[[], str | None]:
    def probe() -> str | None:
        response = h2_request(port, REQUEST_PATH)
        return None if response.status == 200 else f"HTTP {response.status}"

    return probe


def probe_grpc(port: int) -> Callable[[], str | None]:
    def probe() -> str | None:
        status, message, _ = grpc_call(port, GRPC_COUNT, b"")
        return None if status == 0 else f"grpc-status {status} {message}"

    return probe


def wait_ready(server: ServerProcess, probe: Callable[[], str | None], timeout: float = proxy.START_TIMEOUT) -> None:
    """Call *probe* until it returns None (ready); fail early if *server* exits."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        code = server.exited()
        if code is not None:
            raise BenchError(
                f"{server.name} exited with status {code} while starting (log {server.log_path}):\n{server.log_tail()}"
            )
        try:
            problem = probe()
        except (OSError, BenchError) as e:
            problem = str(e)
        if problem is None:
            return
        last = problem
        time.sleep(0.1)
    raise BenchError(
        f"{server.name} not ready after {timeout:.0f}s ({last}); log {server.log_path}:\n{server.log_tail()}"
    )


def check_http(name: str, port: int) -> None:
    """One request before the load: a fast 404 or 502 would look like speed."""
    try:
        response = h2_request(port, REQUEST_PATH)
    except OSError as e:
        raise BenchError(f"{name}: h2c GET {REQUEST_PATH} on port {port} failed: {e}") from e
    if response.status != 200 or len(response.body) != BODY_SIZE:
        raise BenchError(
            f"{name}: h2c GET {REQUEST_PATH} gave HTTP {response.status} with {len(response.body)} bytes, "
            f"expected 200 with {BODY_SIZE}: {response.body[:200]!r}"
        )


def check_grpc(name: str, port: int) -> None:
    """One call before the load: it must reach the grpcio server and come back whole."""
    try:
        status, message, echoed = grpc_call(port, GRPC_METHOD, GRPC_MESSAGE)
    except OSError as e:
        raise BenchError(f"{name}: gRPC {GRPC_METHOD} on port {port} failed: {e}") from e
    if status != 0 or echoed != GRPC_MESSAGE:
        raise BenchError(f"{name}: gRPC {GRPC_METHOD} gave grpc-status {status} ({message!r}), {len(echoed)} bytes")


# --------------------------------------------------------------------------
# Servers


def nginx_upstream_conf(workdir: Path, h1_port: int, h2_port: int) -> str:
    """The 1 KiB upstream, on an HTTP/1.1 port and an h2c (prior knowledge) port."""
    body = "x" * BODY_SIZE
    return proxy._nginx_conf(
        workdir,
        "upstream",
        f"""    server {{
        listen {LOCALHOST}:{h1_port} backlog=4096;
        listen {LOCALHOST}:{h2_port} http2 backlog=4096;
        location / {{
            default_type application/octet-stream;
            return 200 "{body}";
        }}
    }}""",
    )


def nginx_front_conf(workdir: Path, port: int, backend: str) -> str:
    """nginx as an h2c front proxy; *backend* is an ``upstream`` block's ``server`` line and the pass."""
    return proxy._nginx_conf(
        workdir,
        "nginx-front",
        f"""    upstream backend {{
        {backend}
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {LOCALHOST}:{port} http2 backlog=4096;
        location / {{
{{pass}}
        }}
    }}""",
    )


def nginx_http_front_conf(workdir: Path, port: int, upstream_port: int) -> str:
    conf = nginx_front_conf(workdir, port, f"server {LOCALHOST}:{upstream_port};")
    return conf.replace(
        "{pass}",
        """            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";""",
    )


def nginx_grpc_front_conf(workdir: Path, port: int, grpc_port: int) -> str:
    conf = nginx_front_conf(workdir, port, f"server {LOCALHOST}:{grpc_port};")
    return conf.replace("{pass}", "            grpc_pass grpc://backend;")


GRPC_SERVER_SOURCE = r'''"""gRPC upstream of bench/h2.py: echo.Echo/Unary echoes, echo.Echo/Count says how many Unary calls it served."""
import asyncio
import sys

import grpc

served = 0


async def unary(request, context):
    global served
    served += 1
    return request


async def count(request, context):
    return str(served).encode()


async def main():
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("echo.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Count": grpc.unary_unary_rpc_method_handler(count),
    })])
    if server.add_insecure_port("127.0.0.1:" + sys.argv[1]) != int(sys.argv[1]):
        sys.exit("cannot listen on 127.0.0.1:" + sys.argv[1])
    await server.start()
    await server.wait_for_termination()


asyncio.run(main())
'''


def start_grpc_server(workdir: Path, port: int, cpu: str) -> ServerProcess:
    script = workdir / "grpc_upstream.py"
    script.write_text(GRPC_SERVER_SOURCE)
    server = ServerProcess("grpc-upstream", Pinning.wrap(cpu, [sys.executable, str(script), str(port)]), workdir)
    server.start()
    try:
        wait_ready(server, probe_grpc(port))
    except BaseException:
        server.stop()
        raise
    return server


def start_nginx(
    nginx: str, name: str, conf: str, workdir: Path, cpu: str, probe: Callable[[], str | None]
) -> ServerProcess:
    conf_path = workdir / f"{name}.conf"
    conf_path.write_text(conf)
    (workdir / f"{name}-tmp").mkdir(mode=0o755, exist_ok=True)
    argv = [nginx, "-p", f"{workdir}/", "-e", f"{workdir}/{name}.error.log", "-c", str(conf_path)]
    server = ServerProcess(name, Pinning.wrap(cpu, argv), workdir)
    server.start()
    try:
        wait_ready(server, probe)
    except BenchError as e:
        server.stop()
        errors = workdir / f"{name}.error.log"
        detail = errors.read_text(errors="replace")[-2000:] if errors.exists() else ""
        raise BenchError(f"{e}\n    error log:\n{detail}") from None
    except BaseException:
        server.stop()
        raise
    return server


def gateway_conf(port: int, admin_port: int, ports: dict[str, int], http_upstream: str) -> dict[str, object]:
    """txgateway's config (JSON is YAML): ``/echo.Echo/*`` to the grpcio server, ``/*`` to nginx."""
    upstreams: dict[str, object] = {}
    routes: list[dict[str, object]] = []
    if "grpc" in ports:
        upstreams["grpc"] = {"protocol": "grpc", "servers": [{"address": f"{LOCALHOST}:{ports['grpc']}"}]}
        routes.append({"name": "grpc", "match": {"path": "/echo.Echo/*"}, "upstream": "grpc"})
    if http_upstream in ports:
        protocol = "h2c" if http_upstream == "h2" else "http"
        upstreams["bench"] = {"protocol": protocol, "servers": [{"address": f"{LOCALHOST}:{ports[http_upstream]}"}]}
        routes.append({"name": "all", "match": {"path": "/*"}, "upstream": "bench"})
    return {
        "server": {"listen_addr": f"{LOCALHOST}:{port}", "shutdown_grace": 2},
        "admin": {"listen_addr": f"{LOCALHOST}:{admin_port}"},
        "upstreams": upstreams,
        "routes": routes,
        "observability": {"access_log": {"enabled": False}},
    }


def start_gateway(
    workdir: Path, name: str, ports: dict[str, int], http_upstream: str, cpu: str
) -> tuple[ServerProcess, int]:
    port, admin_port = free_port(), free_port()
    conf_path = workdir / f"{name}.yaml"
    conf_path.write_text(json.dumps(gateway_conf(port, admin_port, ports, http_upstream), indent=2) + "\n")
    argv = [str(proxy.twistd_path()), "--pidfile=", "-n", "txgateway", "-c", str(conf_path)]
    server = ServerProcess(name, Pinning.wrap(cpu, argv), workdir)
    server.start()
    try:
        proxy.wait_until_ok(server, f"http://{LOCALHOST}:{admin_port}/ready")
    except BaseException:
        server.stop()
        raise
    return server, port


# --------------------------------------------------------------------------
# h2load


def parse_h2load(text: str) -> dict[str, float | int | None]:
    """Throughput and counts from h2load's summary."""
    finished = re.search(r"^finished in [\d.]+\w*, ([\d.]+) req/s", text, re.MULTILINE)
    requests = re.search(
        r"^requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout",
        text,
        re.MULTILINE,
    )
    codes = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text, re.MULTILINE)
    if finished is None or requests is None or codes is None:
        raise ValueError("no 'finished in', 'requests:' or 'status codes:' line")
    return {
        "requests_per_sec": float(finished.group(1)),
        "requests": int(requests.group(1)),
        "succeeded": int(requests.group(2)),
        "failed": int(requests.group(3)) + int(requests.group(5)),
        "non_2xx": int(codes.group(2)) + int(codes.group(3)) + int(codes.group(4)),
    }


def percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    rank = max(1, round(fraction * len(sorted_values) + 0.5))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_from_log(path: Path) -> dict[str, float | None]:
    """p50/p99 in ms from h2load's ``--log-file`` (start us, status, duration us), completed requests only."""
    durations: list[float] = []
    try:
        with open(path) as log:
            for line in log:
                fields = line.split("\t")
                if len(fields) >= 3 and int(fields[1]) > 0:
                    durations.append(int(fields[2]) / 1000.0)
    except (OSError, ValueError):
        return {"p50_ms": None, "p99_ms": None}
    durations.sort()
    return {"p50_ms": percentile(durations, 0.50), "p99_ms": percentile(durations, 0.99)}


@dataclass(frozen=True)
class Load:
    """One h2load run's shape."""

    connections: int
    streams: int
    threads: int
    duration: int
    warmup: int
    requests: int | None  # -n mode instead of -D when set

    def argv(self, url: str, log: Path | None, extra: Sequence[str], warmup_only: bool = False) -> list[str]:
        argv = ["h2load", f"-t{self.threads}", f"-c{self.connections}", f"-m{self.streams}"]
        if warmup_only:
            argv += ["-D", str(self.warmup)]
        elif self.requests is not None:
            argv += ["-n", str(self.requests)]
        else:
            argv += ["-D", str(self.duration)]
            if self.warmup:
                argv += ["--warm-up-time", str(self.warmup)]
        if log is not None:
            argv.append(f"--log-file={log}")
        return [*argv, *extra, url]


def run_h2load(
    argv: list[str], cpu: str, limit: float, register: Callable[[subprocess.Popen[bytes] | None], None]
) -> str:
    proc = subprocess.Popen(
        Pinning.wrap(cpu, argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    register(proc)
    try:
        out, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        out = b""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        register(None)
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise BenchError(f"h2load exited with {proc.returncode}: {' '.join(argv)}\n{text}")
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
    succeeded: int | None = None
    failed: int | None = None
    non_2xx: int | None = None
    #: gRPC rows: calls the grpcio server served during the run (warm-up included).
    upstream_served: int | None = None
    ratio_to_direct: float | None = None
    ratio_to_nginx: float | None = None
    note: str = ""
    error: str = ""
    h2load_output: str = field(default="", repr=False)


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(nginx: str | None) -> dict[str, object]:
    env = proxy.environment(nginx)
    env.pop("wrk", None)
    env["h2load"] = proxy._version(["h2load", "--version"], "h2load nghttp2/")
    env["grpcio"] = _package_version("grpcio")
    env["h2"] = _package_version("h2")
    return env


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def print_report(rows: list[Row], env: dict[str, object], settings: dict[str, object]) -> None:
    pinning = settings["pinning"]
    pins = " ".join(f"{k}=cpu{v}" for k, v in pinning.items()) if isinstance(pinning, dict) and pinning else "none"
    mode = (
        f"-n {settings['requests']}"
        if settings["requests"]
        else f"{settings['duration']}s after {settings['warmup']}s warm-up"
    )
    print()
    print(
        f"cores: {env['cpu_count']} ({env['cpus_usable']} usable) {env['cpu_model']}\n"
        f"python {env['python']}, twisted {env['twisted']}, txgateway {env['txgateway']}, "
        f"nginx {env['nginx']}, h2load {env['h2load']}, grpcio {env['grpcio']}, h2 {env['h2']}\n"
        f"h2load: {settings['threads']} thread(s), {settings['connections']} connections x "
        f"{settings['streams']} streams, h2c prior knowledge, {mode}; "
        f"HTTP rows: GET {BODY_SIZE}-byte responses; gRPC rows: unary, {len(GRPC_MESSAGE)}-byte message each way; "
        f"pinning: {pins}"
    )
    header = f"{'target':<16} {'req/s':>9} {'p50':>9} {'p99':>9} {'failed':>7} {'vs direct':>10} {'vs nginx':>9}"
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        if r.error:
            first = r.error.splitlines()[0]
            shown = first if first.startswith("skipped") else "failed: " + first
            print(f"{r.target:<16} {shown}")
            continue
        bad = (r.failed or 0) + (r.non_2xx or 0)
        print(
            f"{r.target:<16} {_fmt(r.requests_per_sec, ',.0f'):>9} "
            f"{_fmt(r.p50_ms, '.2f', 'ms'):>9} {_fmt(r.p99_ms, '.2f', 'ms'):>9} {bad:>7} "
            f"{_fmt(r.ratio_to_direct, '.2f', 'x'):>10} {_fmt(r.ratio_to_nginx, '.2f', 'x'):>9}"
            + (f"  ({r.note})" if r.note else "")
        )
    print()


def write_json(rows: list[Row], env: dict[str, object], settings: dict[str, object]) -> Path:
    proxy.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = proxy.RESULTS_DIR / f"h2-{stamp}.json"
    doc = {
        "benchmark": "h2",
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
        description="Benchmark txgateway's HTTP/2 and gRPC edges against nginx and the bare upstreams "
        "(loopback, h2load, h2c prior knowledge).",
    )
    p.add_argument(
        "--duration", type=int, default=10, metavar="SECONDS", help="measured seconds per target (default 10)"
    )
    p.add_argument(
        "--warmup", type=int, default=2, metavar="SECONDS", help="unmeasured seconds before each (default 2, 0 = none)"
    )
    p.add_argument(
        "--requests", type=int, metavar="N", help="measure N requests per target (h2load -n) instead of --duration"
    )
    p.add_argument("--connections", type=int, default=4, help="h2load connections (-c, default 4)")
    p.add_argument("--streams", type=int, default=10, help="concurrent streams per connection (-m, default 10)")
    p.add_argument("--threads", type=int, default=1, help="h2load threads (-t, default 1)")
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
        help="pin with taskset: proxy under test on CPU 0, h2load on CPU 1, "
        "upstreams on CPU 2 (or CPU 1 on a 2-CPU machine)",
    )
    p.add_argument("--nginx", metavar="PATH", help="nginx binary (default: nginx on PATH, else /usr/sbin/nginx)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory with configs and server logs")
    args = p.parse_args(argv)
    only = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = [t for t in only if t not in TARGETS]
    if unknown or not only:
        p.error(f"--only: unknown target(s) {unknown}; choose from {', '.join(TARGETS)}")
    args.only = [t for t in TARGETS if t in only]
    if args.duration < 1 or args.connections < 1 or args.streams < 1 or args.threads < 1 or args.warmup < 0:
        p.error("--duration, --connections, --streams and --threads must be >= 1, --warmup >= 0")
    if args.requests is not None and args.requests < 1:
        p.error("--requests must be >= 1")
    if args.threads > args.connections:
        p.error("--threads must not exceed --connections")
    return args


class Bench:
    """Owns every process it starts, and stops them all in :meth:`close`."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.pins = Pinning.plan(args.pin)
        self.load = Load(args.connections, args.streams, args.threads, args.duration, args.warmup, args.requests)
        self.servers: list[ServerProcess] = []
        self.h2load: subprocess.Popen[bytes] | None = None
        self.failed = False
        self.nginx = proxy.find_nginx(args.nginx)
        self.has_grpcio = importlib.util.find_spec("grpc") is not None
        #: Upstream ports by kind: "h1" and "h2" (nginx), "grpc" (grpcio).
        self.ports: dict[str, int] = {}

    def _set_h2load(self, proc: subprocess.Popen[bytes] | None) -> None:
        self.h2load = proc

    def close(self) -> None:
        if self.h2load is not None and self.h2load.poll() is None:
            os.killpg(self.h2load.pid, signal.SIGKILL)
            self.h2load.wait()
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()

    def _stop(self, server: ServerProcess) -> None:
        server.stop()
        self.servers.remove(server)

    def _served(self) -> int:
        status, message, count = grpc_call(self.ports["grpc"], GRPC_COUNT, b"", timeout=5.0)
        if status != 0:
            raise BenchError(f"grpc-upstream: Count gave grpc-status {status} ({message})")
        return int(count)

    def measure(self, row: Row, port: int, grpc: bool) -> None:
        a = self.args
        path = GRPC_METHOD if grpc else REQUEST_PATH
        row.url = f"http://{LOCALHOST}:{port}{path}"
        extra: list[str] = []
        if grpc:
            check_grpc(row.target, port)
            body = self.workdir / "grpc-request.bin"
            body.write_bytes(grpc_frame(GRPC_MESSAGE))
            extra = ["-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
            served_before = self._served()
        else:
            check_http(row.target, port)
        limit = (a.duration + a.warmup + 60) if a.requests is None else 600
        if a.requests is not None and a.warmup:
            run_h2load(self.load.argv(row.url, None, extra, warmup_only=True), self.pins.wrk, limit, self._set_h2load)
        log = self.workdir / f"{row.target}.h2load.log"
        log.unlink(missing_ok=True)
        out = run_h2load(self.load.argv(row.url, log, extra), self.pins.wrk, limit, self._set_h2load)
        row.h2load_output = out
        try:
            stats = parse_h2load(out)
        except ValueError as e:
            raise BenchError(f"cannot read h2load's output ({e}):\n{out}") from None
        for key, value in {**stats, **latency_from_log(log)}.items():
            setattr(row, key, value)
        log.unlink(missing_ok=True)
        if not row.succeeded:
            raise BenchError(f"no request succeeded against {row.url}:\n{out}")
        problems = []
        if row.failed or row.non_2xx:
            problems.append(f"{row.failed} failed, {row.non_2xx} non-2xx")
        if grpc:
            # h2load only sees HTTP 200: a gRPC error in the trailers counts as a success for it.
            row.upstream_served = self._served() - served_before
            if row.upstream_served < (row.succeeded or 0):
                problems.append(
                    f"only {row.upstream_served} calls reached the grpcio server for {row.succeeded} successes"
                )
        if problems:
            row.note = "; ".join([row.note, *problems]) if row.note else "; ".join(problems)

    def _start_upstreams(self) -> None:
        a = self.args
        if any(t in HTTP_TARGETS for t in a.only):
            if not self.nginx:
                raise BenchError("nginx is not installed (Debian package nginx; `make bench-deps`): no HTTP upstream")
            self.ports["h1"], self.ports["h2"] = free_port(), free_port()
            print(
                f"starting upstream nginx on 127.0.0.1:{self.ports['h1']} (h1), :{self.ports['h2']} (h2c)",
                file=sys.stderr,
            )
            self.servers.append(
                start_nginx(
                    self.nginx,
                    "upstream",
                    nginx_upstream_conf(self.workdir, self.ports["h1"], self.ports["h2"]),
                    self.workdir,
                    self.pins.upstream,
                    probe_http(self.ports["h2"]),
                )
            )
        if any(t in GRPC_TARGETS for t in a.only) and self.has_grpcio:
            self.ports["grpc"] = free_port()
            print(f"starting grpcio upstream on 127.0.0.1:{self.ports['grpc']}", file=sys.stderr)
            self.servers.append(start_grpc_server(self.workdir, self.ports["grpc"], self.pins.upstream))

    def _row(self, target: str) -> Callable[[Row], None]:
        """What measuring *target* takes: start its proxy (if any), measure, stop it."""
        grpc = target in GRPC_TARGETS

        def with_server(server: ServerProcess, port: int, row: Row) -> None:
            self.servers.append(server)
            print(f"measuring {row.target}", file=sys.stderr)
            try:
                self.measure(row, port, grpc)
            finally:
                self._stop(server)

        def run(row: Row) -> None:
            if target in ("direct", "grpc-direct"):
                print(f"measuring {target}", file=sys.stderr)
                self.measure(row, self.ports["grpc" if grpc else "h2"], grpc)
            elif target in ("nginx", "grpc-nginx"):
                assert self.nginx is not None
                port = free_port()
                conf = (
                    nginx_grpc_front_conf(self.workdir, port, self.ports["grpc"])
                    if grpc
                    else nginx_http_front_conf(self.workdir, port, self.ports["h1"])
                )
                probe = probe_grpc(port) if grpc else probe_http(port)
                print(f"starting nginx front proxy on 127.0.0.1:{port}", file=sys.stderr)
                server = start_nginx(self.nginx, "nginx-front", conf, self.workdir, self.pins.proxy, probe)
                with_server(server, port, row)
            else:
                upstream = "h2" if target == "txgateway-h2c" else "h1"
                print(f"starting {target} (twistd)", file=sys.stderr)
                server, port = start_gateway(self.workdir, target, self.ports, upstream, self.pins.proxy)
                with_server(server, port, row)

        return run

    def run(self) -> list[Row]:
        a = self.args
        rows: list[Row] = []
        failed = False
        self._start_upstreams()
        for target in a.only:
            row = Row(target)
            rows.append(row)
            if target in GRPC_TARGETS and not self.has_grpcio:
                row.error = "skipped: grpcio is not installed in this Python (pip install grpcio)"
                continue
            if target in ("nginx", "grpc-nginx") and not self.nginx:
                row.error = "skipped: nginx is not installed"
                continue
            try:
                self._row(target)(row)
            except BenchError as e:
                failed = True
                row.error = str(e)
                if not a.keep_going:
                    raise
                print(f"{row.target}: FAILED, going on (--keep-going):\n{e}", file=sys.stderr)

        by_target = {r.target: r.requests_per_sec for r in rows}
        for r in rows:
            direct, nginx = REFERENCES[r.target]
            if r.requests_per_sec is not None:
                if by_target.get(direct):
                    r.ratio_to_direct = r.requests_per_sec / by_target[direct]  # type: ignore[operator]
                if by_target.get(nginx):
                    r.ratio_to_nginx = r.requests_per_sec / by_target[nginx]  # type: ignore[operator]
        self.failed = failed
        return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("h2load") is None:
        print("error: h2load is not installed (Debian package nghttp2-client; `make bench-deps`)", file=sys.stderr)
        return 1

    def measure(workdir: Path, owned: list[Any]) -> int:
        bench = Bench(args, workdir)
        owned.append(bench)
        env = environment(bench.nginx)
        settings: dict[str, object] = {
            "duration": args.duration,
            "warmup": args.warmup,
            "requests": args.requests,
            "connections": args.connections,
            "streams": args.streams,
            "threads": args.threads,
            "only": args.only,
            "body_bytes": BODY_SIZE,
            "path": REQUEST_PATH,
            "grpc_method": GRPC_METHOD,
            "grpc_message_bytes": len(GRPC_MESSAGE),
            "pinning": ({k: v for k, v in asdict(bench.pins).items() if v} if args.pin else {}),
        }
        rows = bench.run()
        bench.close()
        print_report(rows, env, settings)
        path = write_json(rows, env, settings)
        print(f"results: {path}")
        return 1 if bench.failed else 0

    return proxy.run_guarded("txgateway-bench-h2-", args.keep_tmp, measure)

if __name__ == "__main__":
    sys.exit(main())
