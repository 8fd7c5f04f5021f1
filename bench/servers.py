"""The servers bench/suite.py measures: their configurations and how each starts.

Process handling (a child in its own session, readiness, stopping the whole
process group) is bench/proxy.py's :class:`~proxy.ServerProcess`; this module
adds what the suite needs beyond proxy.py's rows:

* one nginx upstream for every HTTP/1.1 row: the fixed 1 KiB body on any
  path, a 64 KiB file at ``/big``, and ``POST /upload`` that reads the whole
  request body before it answers 200;
* nginx as the reference proxy, with one or two worker processes, streaming
  request bodies through (``proxy_request_buffering off``) like the gateway;
* the gateway configuration of each row (plain, full pipeline, Redis rate
  limit, 10,000 routes, response cache, two workers), written as JSON
  (which is YAML) and run with ``twistd -n txgateway``;
* a ``redis-server`` on a free port for row 3, and a RESP one-liner to ask it
  whether the gateway really used it;
* the HS256 token row 2 sends.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import proxy
from proxy import BODY_SIZE, BenchError, Pinning, ServerProcess, free_port

LOCALHOST = "127.0.0.1"
#: 64 KiB responses (row 5): a static file nginx sends with sendfile.
BIG_PATH = "/big"
BIG_SIZE = 64 * 1024
#: 10 MiB uploads (row 5): the upstream reads every byte, then answers "ok".
UPLOAD_PATH = "/upload"
UPLOAD_SIZE = 10 * 1024 * 1024
#: A route's body limit must let the upload through (the server default is 10 MiB).
UPLOAD_LIMIT = "16MiB"
JWT_SECRET = "txgateway-bench-secret-of-32-bytes!"
#: Starting 10,000 routes parses a 1 MB config: allow for a slow, busy machine.
SLOW_START_TIMEOUT = 180.0


# --------------------------------------------------------------------------
# nginx


def _with_workers(conf: str, workers: int) -> str:
    """proxy.py's skeleton says ``worker_processes 1``: set the count asked for."""
    line = "worker_processes 1;"
    if line not in conf:
        raise BenchError("bench/proxy.py's nginx skeleton changed: no 'worker_processes 1;' line")
    return conf.replace(line, f"worker_processes {workers};", 1)


def upstream_conf(workdir: Path, port: int) -> str:
    """The upstream of every HTTP/1.1 row (one worker, so it is what proxy.py measures as ``direct``).

    ``/upload`` must read the whole body before answering: nginx's ``return``
    answers at once and discards the body afterwards, and wrk, seeing the
    response before it has sent the request, stops using the connection.
    ``mirror`` with ``mirror_request_body on`` reads the body (into memory)
    before the content phase, whose 404 ``error_page`` turns into the 200.
    """
    static = workdir / "upstream-static"
    static.mkdir(mode=0o755, exist_ok=True)
    (static / BIG_PATH.lstrip("/")).write_bytes(b"b" * BIG_SIZE)
    body = "x" * BODY_SIZE
    return proxy._nginx_conf(
        workdir,
        "upstream",
        f"""    server {{
        listen {LOCALHOST}:{port} backlog=4096;
        log_not_found off;
        client_max_body_size 0;
        location / {{
            default_type application/octet-stream;
            return 200 "{body}";
        }}
        location = {BIG_PATH} {{
            root {static};
            default_type application/octet-stream;
        }}
        location = {UPLOAD_PATH} {{
            client_body_buffer_size {UPLOAD_SIZE + 4096};
            mirror /.discard;
            mirror_request_body on;
            root {workdir}/upstream-no-such-dir;
            error_page 404 405 =200 @uploaded;
        }}
        location = /.discard {{
            internal;
            return 204;
        }}
        location @uploaded {{
            default_type text/plain;
            return 200 "ok";
        }}
    }}""",
    )


def nginx_proxy_conf(workdir: Path, name: str, port: int, upstream_port: int, workers: int = 1) -> str:
    """nginx as the reference proxy: keep-alive upstream connections, bodies streamed through."""
    conf = proxy._nginx_conf(
        workdir,
        name,
        f"""    upstream backend {{
        server {LOCALHOST}:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {LOCALHOST}:{port} backlog=4096;
        client_max_body_size 0;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
        }}
    }}""",
    )
    return _with_workers(conf, workers)


# --------------------------------------------------------------------------
# The gateway


@dataclass(frozen=True)
class Gateway:
    """A started ``twistd -n txgateway`` (with ``server.workers`` > 1: the supervisor)."""

    server: ServerProcess
    port: int
    admin_port: int
    config_path: Path

    def url(self, path: str) -> str:
        return f"http://{LOCALHOST}:{self.port}{path}"

    @property
    def pid(self) -> int:
        assert self.server.proc is not None
        # taskset and prlimit exec the program: the pid is twistd's.
        return self.server.proc.pid


def plain_route(name: str = "all", path: str = "/*") -> dict[str, object]:
    return {"name": name, "match": {"path": path}, "upstream": "bench", "max_body_bytes": UPLOAD_LIMIT}


def gateway_config(
    port: int,
    admin_port: int,
    upstream_port: int,
    *,
    routes: list[dict[str, object]] | None = None,
    middleware: Mapping[str, object] | None = None,
    upstream: Mapping[str, object] | None = None,
    access_log: str | None = None,
    workers: int = 1,
) -> dict[str, object]:
    """One row's gateway: one upstream ``bench`` (the nginx upstream), routes to it.

    Metrics stay at their default (on) in every row; the access log is off
    unless *access_log* names a file (JSON lines).
    """
    doc: dict[str, object] = {
        "server": {"listen_addr": f"{LOCALHOST}:{port}", "workers": workers, "shutdown_grace": 2},
        "admin": {"listen_addr": f"{LOCALHOST}:{admin_port}"},
        "upstreams": {"bench": {"servers": [{"address": f"{LOCALHOST}:{upstream_port}"}], **(upstream or {})}},
        "routes": routes if routes is not None else [plain_route()],
        "observability": {
            "access_log": (
                {"enabled": True, "format": "json", "path": access_log} if access_log else {"enabled": False}
            ),
            "metrics": {"enabled": True},
        },
    }
    if middleware is not None:
        doc["middleware"] = dict(middleware)
    return doc


def pipeline_middleware(rate_limit_storage: Mapping[str, object] | None = None) -> dict[str, object]:
    """Row 2's middleware: HS256 JWT on every route, a per-consumer rate limit never reached.

    *rate_limit_storage* replaces the in-memory bucket store (row 3: Redis).
    """
    rate_limit: dict[str, object] = {
        "enabled": True,
        "algorithm": "token_bucket",
        "requests_per_minute": 1_000_000_000,
        "burst_size": 1_000_000,
        "key": "consumer",
        "storage": "memory",
    }
    rate_limit.update(rate_limit_storage or {})
    return {
        "enabled": True,
        "auth": {"enabled": True, "jwt_secret": JWT_SECRET},
        "rate_limit": rate_limit,
    }


#: Row 2's upstream settings on top of the plain one.
PIPELINE_UPSTREAM: dict[str, object] = {"circuit_breaker": {"failure_threshold": 5, "recovery_timeout": 30}}


def many_routes(count: int) -> tuple[list[dict[str, object]], list[str]]:
    """*count* routes in four shapes (parameters, static, wildcard), and one matching path for each."""
    routes: list[dict[str, object]] = []
    paths: list[str] = []
    for i in range(count):
        svc, shape = divmod(i, 4)
        base = f"/svc{svc}"
        pattern, path = [
            (f"{base}/users/{{id}}/orders/{{oid}}", f"{base}/users/42/orders/7"),
            (f"{base}/health", f"{base}/health"),
            (f"{base}/static/*", f"{base}/static/css/site.css"),
            (f"{base}/items/{{id}}", f"{base}/items/abc-123"),
        ][shape]
        routes.append({"name": f"r{i}", "match": {"path": pattern}, "upstream": "bench"})
        paths.append(path)
    return routes, paths


def start_gateway(
    workdir: Path,
    name: str,
    config: dict[str, object],
    cpu: str,
    timeout: float = proxy.START_TIMEOUT,
    twistd: Sequence[str] = (),
) -> Gateway:
    """Write *config* (whose listen addresses it fills in) and run the gateway until ``/ready``.

    *twistd*: the command that runs twistd (default: the venv's), e.g. another interpreter's.
    """
    port, admin_port = free_port(), free_port()
    server_block = config["server"]
    admin_block = config["admin"]
    assert isinstance(server_block, dict) and isinstance(admin_block, dict)
    server_block["listen_addr"] = f"{LOCALHOST}:{port}"
    admin_block["listen_addr"] = f"{LOCALHOST}:{admin_port}"
    path = workdir / f"{name}.yaml"
    path.write_text(json.dumps(config) + "\n")
    argv = [*(twistd or [str(proxy.twistd_path())]), "--pidfile=", "-n", "txgateway", "-c", str(path)]
    server = ServerProcess(name, Pinning.wrap(cpu, argv), workdir)
    server.start()
    try:
        proxy.wait_until_ok(server, f"http://{LOCALHOST}:{admin_port}/ready", timeout)
    except BaseException:
        server.stop()
        raise
    return Gateway(server, port, admin_port, path)


# --------------------------------------------------------------------------
# Redis


def redis_command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """One RESP command; the raw reply (enough for PING and INFO)."""
    request = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection((LOCALHOST, port), timeout=timeout) as sock:
        sock.sendall(request.encode())
        reply = sock.recv(65536)
        if reply.startswith(b"$"):
            # A bulk string: read until its announced length is in.
            header, _, rest = reply.partition(b"\r\n")
            length = int(header[1:])
            while length >= 0 and len(rest) < length + 2:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                rest += chunk
            return rest[: max(length, 0)]
        return reply


def redis_calls(port: int, command: str) -> int:
    """How many times *command* ran on the server (``INFO commandstats``)."""
    info = redis_command(port, "INFO", "commandstats").decode(errors="replace")
    for line in info.splitlines():
        if line.startswith(f"cmdstat_{command.lower()}:"):
            for part in line.split(":", 1)[1].split(","):
                key, _, value = part.partition("=")
                if key == "calls":
                    return int(value)
    return 0


def find_redis() -> str | None:
    return shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/bin")


def start_redis(redis_server: str, workdir: Path, cpu: str) -> tuple[ServerProcess, int]:
    """A throwaway ``redis-server`` (no persistence) on a free loopback port."""
    port = free_port()
    data = workdir / "redis"
    data.mkdir(exist_ok=True)
    argv = [
        redis_server, "--port", str(port), "--bind", LOCALHOST, "--save", "", "--appendonly", "no",
        "--dir", str(data), "--protected-mode", "no",
    ]  # fmt: skip
    server = ServerProcess("redis", Pinning.wrap(cpu, argv), workdir)
    server.start()
    deadline = time.monotonic() + proxy.START_TIMEOUT
    try:
        while True:
            code = server.exited()
            if code is not None:
                raise BenchError(f"redis-server exited with status {code}:\n{server.log_tail()}")
            try:
                if redis_command(port, "PING", timeout=0.5).startswith(b"+PONG"):
                    return server, port
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"redis-server not answering PING on {port}:\n{server.log_tail()}")
            time.sleep(0.05)
    except BaseException:
        server.stop()
        raise


# --------------------------------------------------------------------------
# JWT


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_token(secret: str = JWT_SECRET, subject: str = "bench", lifetime: float = 86400.0) -> str:
    """A valid HS256 JWT for the whole run (one consumer: one rate-limit bucket)."""
    now = int(time.time())
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = {"sub": subject, "iat": now, "exp": now + int(lifetime)}
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"
