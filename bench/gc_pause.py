"""How long a full garbage collection stops the gateway, with and without the frozen heap.

Run: ``.venv/bin/python bench/gc_pause.py [--routes 1,10000] [--passes 5]``.
For each table size it builds the gateway the way ``twistd txgateway`` does
(the configuration bench/suite.py gives row 1 or row 4, a ``GatewayService``
and its first generation), sends nothing, and times ``gc.collect()``: first
with every object in the collector's generations, as CPython leaves them,
then after :meth:`txgateway.heap.Heap.settle` froze them.  A full pass
blocks the reactor for its whole length, and CPython runs one whenever the
objects surviving younger passes have grown by a quarter.  It also times
the pass a reload costs (``Heap.reloaded``: unfreeze, collect, freeze), the
one pause that remains, at a moment the operator chose.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import servers
from twisted.internet.task import Clock

from txgateway.config import parse_config
from txgateway.heap import Heap
from txgateway.service import GatewayService


def full_pass_ms(passes: int) -> float:
    """The median length of ``passes`` full collections, in ms."""
    lengths = []
    for _ in range(passes):
        started = time.perf_counter()
        gc.collect()
        lengths.append((time.perf_counter() - started) * 1000)
    return statistics.median(lengths)


def measure(routes: int, passes: int) -> dict[str, float | int]:
    table = servers.many_routes(routes)[0] if routes > 1 else [servers.plain_route()]
    doc = servers.gateway_config(18000, 18001, 18002, routes=table)
    config = parse_config(json.dumps(doc), "<bench>")
    clock = Clock()
    service = GatewayService(config, clock)
    gc.collect()
    tracked = len(gc.get_objects())
    before = full_pass_ms(passes)
    heap = Heap(clock)
    heap.settle("bench")
    frozen = gc.get_freeze_count()
    after = full_pass_ms(passes)
    heap.reloaded(0.0)
    started = time.perf_counter()
    clock.advance(1.0)
    reload_ms = (time.perf_counter() - started) * 1000
    gc.unfreeze()
    del service
    gc.collect()
    return {"routes": routes, "tracked": tracked, "frozen": frozen, "before_ms": before, "after_ms": after, "reload_ms": reload_ms}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--routes", default="1,10000", help="table sizes, comma-separated (default 1,10000)")
    p.add_argument("--passes", type=int, default=5, help="full collections timed per figure (default 5)")
    args = p.parse_args()
    sizes = [int(size) for size in args.routes.split(",") if size.strip()]
    print(f"{'routes':>8}{'tracked objects':>17}{'full pass':>12}{'frozen heap':>13}{'reload pass':>13}")
    for size in sizes:
        found = measure(size, args.passes)
        print(
            f"{found['routes']:>8,}{found['tracked']:>17,}{found['before_ms']:>10.1f}ms"
            f"{found['after_ms']:>11.2f}ms{found['reload_ms']:>11.1f}ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
