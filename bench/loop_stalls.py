"""Where the p99 of issue 9's added-latency line comes from: the gateway's own work, or the host.

    .venv/bin/python bench/loop_stalls.py [--runs 3] [--duration 10] [--rate R] [--close] [--heap-off]

Starts bench/suite.py's nginx upstream and row 1's plain gateway, pinned
like ``suite.py --pin``, the gateway under bench/turn_recorder.py (every
reactor turn's wall and CPU time, every garbage collection).  It finds the
gateway's maximum rate with a closed-loop wrk run (unless ``--rate``), then
loads it at half that rate, as the suite's latency line does, ``--runs``
times, each run alternating with the same paced load on the upstream
directly.  Each run prints wrk's p50/p99 for both and what the gateway's
event loop did meanwhile:

* turns whose wall time passed 1, 2 and 5 ms, and how many of those spent
  that long on the CPU: a turn that took 20 ms of wall time and 1 ms of CPU
  was descheduled, and every request that arrived meanwhile waited;
* the longest turns (wall / CPU);
* garbage collections by generation (count, longest).

``--close`` sends every request with ``Connection: close`` (a new client
connection per request, as from clients that do not keep connections
alive), which leaves cyclic garbage behind and brings full collections
about once a second; ``--heap-off`` runs the gateway without
txgateway.heap's freezing, to compare.

The recorder adds four clock reads per turn; the rate found here is a little
below the suite's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

_BENCH_DIR = Path(__file__).resolve().parent
if str(_BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(_BENCH_DIR))

import load  # noqa: E402
import proxy  # noqa: E402
import servers  # noqa: E402
from load import WrkRun  # noqa: E402
from proxy import REQUEST_PATH, BenchError, Pinning, free_port  # noqa: E402


def read_report(pid: int, path: Path) -> dict[str, Any]:
    """Ask the recorder for its figures since the last ask (SIGUSR2) and read them."""
    if path.exists():
        path.unlink()
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            report: dict[str, Any] = json.loads(path.read_text())
            return report
        except (OSError, ValueError):
            time.sleep(0.05)
    raise BenchError(f"the turn recorder (pid {pid}) wrote no report to {path}")


def describe(report: dict[str, Any]) -> list[str]:
    over = report["over_ms"]
    lines = [
        f"turns {report['turns']:,}, busy {report['busy_ms'] / 1000:.2f} s of CPU; "
        + ", ".join(f"over {limit} ms: {n['wall']} (CPU over {limit} ms: {n['cpu']})" for limit, n in over.items()),
        "longest turns (wall/CPU ms): " + "  ".join(f"{wall:.1f}/{cpu:.1f}" for wall, cpu in report["longest"][:6]),
    ]
    collections = report["collections"]
    lines.append(
        "collections: "
        + (
            ", ".join(
                f"gen {gen}: {c['count']:.0f} (longest {c['max_ms']:.1f} ms)" for gen, c in sorted(collections.items())
            )
            or "none"
        )
    )
    return lines


def run(workdir: Path, owned: list[Any], args: argparse.Namespace) -> int:
    nginx = proxy.find_nginx(None)
    if nginx is None:
        raise BenchError("no nginx (the upstream): apt-get install nginx")
    pins = Pinning.plan(True)
    upstream_port = free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}{REQUEST_PATH}"
    upstream = proxy.start_nginx(
        nginx, "upstream", servers.upstream_conf(workdir, upstream_port), workdir, pins.upstream, upstream_url
    )
    owned.append(upstream)
    report_path = workdir / "turns.json"
    recorder = [sys.executable, str(_BENCH_DIR / "turn_recorder.py")]
    recorder += ["--heap-off"] if args.heap_off else []
    recorder += [str(report_path)]
    headers = ("Connection: close",) if args.close else ()
    gateway = servers.start_gateway(
        workdir, "txgateway-plain", servers.gateway_config(0, 0, upstream_port), pins.proxy, twistd=recorder
    )
    owned.append(gateway.server)
    url = gateway.url(REQUEST_PATH)
    wrk = load.Wrk(pins.wrk)
    wrk.run(WrkRun(url, 3, 32, headers=headers))
    rate = args.rate
    if rate is None:
        found = wrk.run(WrkRun(url, args.duration, 32, headers=headers))
        rate = found.requests_per_sec / 2
        print(f"gateway maximum {found.requests_per_sec:,.0f} req/s; paced at half: {rate:,.0f} req/s", flush=True)
    for number in range(1, args.runs + 1):
        direct = load.paced(wrk, "upstream", upstream_url, rate, 32, args.duration, 1, workdir, headers)
        read_report(gateway.pid, report_path)  # start counting with the gateway's run
        through = load.paced(wrk, "txgateway", url, rate, 32, args.duration, 0, workdir, headers)
        report = read_report(gateway.pid, report_path)
        print(f"\nrun {number}:")
        for result in (direct, through):
            print(
                f"  {result.target:<10} {result.rate_achieved or 0:,.0f} req/s  p50 {result.p50_ms} ms"
                f"  p99 {result.p99_ms} ms" + (f"  ({result.note})" if result.note else "")
            )
        for line in describe(report):
            print(f"  {line}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="paced runs (default 3)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per run (default 10)")
    parser.add_argument("--rate", type=float, help="requests/s (default: half the gateway's maximum)")
    parser.add_argument("--close", action="store_true", help="every request with Connection: close")
    parser.add_argument("--heap-off", action="store_true", help="the gateway without txgateway.heap's freezing")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    return proxy.run_guarded("txgateway-stalls-", args.keep_tmp, lambda workdir, owned: run(workdir, owned, args))


if __name__ == "__main__":
    sys.exit(main())
