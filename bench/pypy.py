"""Issue 9's PyPy trial: the plain proxy (row 1) under CPython and under PyPy, side by side.

Debian 12's PyPy is 7.3.11, a Python 3.9.  txgateway supports CPython 3.11
only, so this script makes a throwaway 3.9 port of the source in its work
directory and never touches the project:

* ``@dataclass(..., slots=True)`` loses ``slots=True`` (3.10);
* ``zip(..., strict=True)`` loses ``strict=True`` (3.10);
* a module-level type alias whose right-hand side is an ``X | Y`` union
  (evaluated at import time, 3.10) becomes a string.

It then builds a PyPy venv with the gateway's dependencies (cryptography as
a binary wheel: a source build needs Rust crates from the network), starts
the nginx upstream of bench/suite.py and, pinned like ``suite.py --pin``,
both interpreters' gateways and both interpreters' bare relays
(bench/reference_proxy.py, row 1's floor).  PyPy's JIT needs traffic before
it is fast: every server gets ``--warmup`` seconds of load first, then the
lines are measured in turns, ``--rounds`` times, each keeping its best
requests per second and its least CPU per request.  The gateways' VmRSS is
read at the end.

    apt-get install pypy3 pypy3-dev      # once
    .venv/bin/python bench/pypy.py       # about 3 minutes (the first run adds the PyPy venv)
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

_BENCH_DIR = Path(__file__).resolve().parent
if str(_BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(_BENCH_DIR))

import load  # noqa: E402
import proxy  # noqa: E402
import servers  # noqa: E402
from load import Wrk, WrkRun  # noqa: E402
from proxy import REQUEST_PATH, BenchError, Pinning, ServerProcess, free_port  # noqa: E402

ROOT = _BENCH_DIR.parent
#: The gateway's runtime dependencies for PyPy (setup.cfg's install_requires).
PYPY_REQUIREMENTS = [
    "cryptography",
    "twisted[tls]>=24.7",
    "httptools>=0.6",
    "pyyaml>=6.0",
    "treq>=24.9",
    "pyjwt[crypto]>=2.8",
    "txredisapi>=1.4.10",
    "h2>=4.1",
    "autobahn>=23.1",
    "service-identity>=24.1",
    "prometheus-client>=0.20",
]
_SLOTS = re.compile(r",\s*slots=True|(?<=\()slots=True,?\s*")
_STRICT = re.compile(r",\s*strict=True")
#: ``Name = A | B`` or ``Name = dict[bytes, bytes | None]``: names, brackets, dots, commas and ``|`` only.
_UNION_ALIAS = re.compile(r"^([A-Z_]\w*) = ([\w\[\]., ]*\|[\w\[\]., |]*)$", re.MULTILINE)


def port_to_39(destination: Path) -> None:
    """Copy txgateway/ and twisted/plugins/ to *destination*, rewritten for Python 3.9."""
    for part in ("txgateway", "twisted"):
        shutil.copytree(ROOT / part, destination / part, ignore=shutil.ignore_patterns("__pycache__"))
    for path in destination.rglob("*.py"):
        source = path.read_text()
        ported = _SLOTS.sub("", source)
        ported = _STRICT.sub("", ported)
        ported = _UNION_ALIAS.sub(lambda m: f"{m.group(1)} = {m.group(2)!r}", ported)
        if ported != source:
            path.write_text(ported)


def pypy_venv(pypy: str, venv: Path) -> Path:
    """*venv*'s pypy3 with the gateway's dependencies (made once, then reused)."""
    python = venv / "bin" / "pypy3"
    if not python.exists():
        print(f"making a PyPy venv in {venv} (a few minutes, once)", flush=True)
        subprocess.run([pypy, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--only-binary", "cryptography", *PYPY_REQUIREMENTS],
            check=True,
        )
    return python


@dataclass
class Line:
    label: str
    url: str
    pids: list[int]
    rps: float = 0.0
    cpu_us: float = float("inf")
    samples: list[str] = field(default_factory=list)


def measure(wrk: Wrk, line: Line, seconds: int) -> None:
    before = load.cpu_seconds(line.pids)
    result = wrk.run(WrkRun(line.url, seconds, 32))
    if result.errors:
        raise BenchError(f"{line.label}: {result.errors} errors under load:\n{result.output}")
    cpu_us = (load.cpu_seconds(line.pids) - before) / result.requests * 1e6
    line.rps = max(line.rps, result.requests_per_sec)
    line.cpu_us = min(line.cpu_us, cpu_us)
    line.samples.append(f"{result.requests_per_sec:,.0f}/{cpu_us:.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pypy", default=shutil.which("pypy3"), help="the PyPy interpreter (default: pypy3)")
    parser.add_argument("--venv", type=Path, default=ROOT / ".pypy-venv", help="PyPy venv (made if missing)")
    parser.add_argument("--warmup", type=int, default=20, help="seconds of load per server before measuring")
    parser.add_argument("--duration", type=int, default=5, help="seconds per measured run")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not args.pypy:
        raise SystemExit("no pypy3: apt-get install pypy3 pypy3-dev")
    nginx = proxy.find_nginx(None)
    if nginx is None:
        raise SystemExit("no nginx (the upstream): apt-get install nginx")
    pins = Pinning.plan(True)
    pypy_python = pypy_venv(args.pypy, args.venv)
    pypy_version = subprocess.run(
        [str(pypy_python), "-c", "import sys; print(sys.version.replace(chr(10), ' '))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    wrk = Wrk(pins.wrk)
    started: list[ServerProcess] = []
    with tempfile.TemporaryDirectory(prefix="txgateway-pypy-") as tmp:
        workdir = Path(tmp)
        port = workdir / "py39"
        port_to_39(port)
        try:
            upstream_port = free_port()
            upstream = proxy.start_nginx(
                nginx, "upstream", servers.upstream_conf(workdir, upstream_port), workdir, pins.upstream,
                f"http://127.0.0.1:{upstream_port}{REQUEST_PATH}",
            )  # fmt: skip
            started.append(upstream)
            lines: list[Line] = []
            for label, argv_of in [
                ("CPython, bare relay", lambda p: [sys.executable, str(_BENCH_DIR / "reference_proxy.py"), p]),
                ("PyPy, bare relay", lambda p: [str(pypy_python), str(_BENCH_DIR / "reference_proxy.py"), p]),
            ]:
                listen = free_port()
                server = ServerProcess(label.replace(", ", "-").replace(" ", "-"),
                                       Pinning.wrap(pins.proxy, [*argv_of(str(listen)), str(upstream_port)]),
                                       workdir)  # fmt: skip
                server.start()
                started.append(server)
                url = f"http://127.0.0.1:{listen}{REQUEST_PATH}"
                proxy.wait_until_ok(server, url)
                lines.append(Line(label, url, [server.proc.pid] if server.proc else []))
            for label, name, twistd in [
                ("CPython, txgateway plain", "cpython-gateway", [str(proxy.twistd_path())]),
                (
                    "PyPy, txgateway plain (3.9 port)",
                    "pypy-gateway",
                    ["env", f"PYTHONPATH={port}", str(pypy_python.parent / "twistd")],
                ),
            ]:
                config = servers.gateway_config(0, 0, upstream_port)
                gateway = servers.start_gateway(workdir, name, config, pins.proxy, twistd=twistd)
                started.append(gateway.server)
                lines.append(Line(label, gateway.url(REQUEST_PATH), [gateway.pid]))
            for line in lines:
                print(f"warming up {line.label} for {args.warmup} s", flush=True)
                wrk.run(WrkRun(line.url, args.warmup, 32))
            for _ in range(args.rounds):
                for line in lines:
                    measure(wrk, line, args.duration)
            print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {sys.version.split()[0]} vs {pypy_version}")
            print(f"{'line':36} {'req/s (best)':>13} {'CPU/req (least)':>16}  runs (req/s / µs)")
            for line in lines:
                print(f"{line.label:36} {line.rps:13,.0f} {line.cpu_us:13.0f} µs  {'  '.join(line.samples)}")
            for line in lines[2:]:
                print(f"{line.label}: VmRSS {load.status_kib(line.pids[0], 'VmRSS') / 1024:.1f} MiB")
        finally:
            for server in reversed(started):
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
