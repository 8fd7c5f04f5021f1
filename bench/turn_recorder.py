"""Run twistd with every reactor turn and garbage collection timed (for bench/loop_stalls.py).

    python bench/turn_recorder.py REPORT.json twistd-arguments...

A turn is what the epoll reactor does between two ``epoll_wait`` calls: the
ready sockets' reads and writes, then the due timers.  Each turn's wall time
is taken with ``time.perf_counter`` and its CPU time with
``time.thread_time``: a turn whose wall time is far above its CPU time
spent that time not running, descheduled by the host (another vCPU's work,
steal), not computing.  Every collection's generation and length come
from ``gc.callbacks``.

SIGUSR2 writes the figures gathered since the last SIGUSR2 (or the start)
to REPORT.json and starts over.  The wrapper costs two clock reads and an
append per turn, so it is a tool for finding stalls, not for measuring
throughput.
"""

from __future__ import annotations

import gc
import json
import signal
import sys
import time
from typing import Any

#: Turns longer than this (wall or CPU), in ms, are counted as stalls.
THRESHOLDS_MS = (1.0, 2.0, 5.0)
#: How many of the longest turns the report lists.
LONGEST = 10


class Recorder:
    def __init__(self, report: str) -> None:
        self.report = report
        self.turns: list[tuple[float, float]] = []
        self.collections: list[tuple[int, float]] = []
        self._turn_ended: tuple[float, float] | None = None
        self._collecting = 0.0

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._collecting = time.perf_counter()
        else:
            self.collections.append((info["generation"], (time.perf_counter() - self._collecting) * 1000))

    def wrap(self, poll: Any) -> Any:
        def timed_poll(reactor: Any, timeout: float | None) -> None:
            # Everything between the last poll's return and this call was the turn.
            wall, cpu = time.perf_counter(), time.thread_time()
            ended = self._turn_ended
            if ended is not None:
                self.turns.append(((wall - ended[0]) * 1000, (cpu - ended[1]) * 1000))
            poll(reactor, timeout)
            self._turn_ended = (time.perf_counter(), time.thread_time())

        return timed_poll

    def dump(self, signum: int, frame: Any) -> None:
        turns, self.turns = self.turns, []
        collections, self.collections = self.collections, []
        by_generation: dict[str, dict[str, float]] = {}
        for generation, ms in collections:
            entry = by_generation.setdefault(str(generation), {"count": 0, "max_ms": 0.0, "total_ms": 0.0})
            entry["count"] += 1
            entry["max_ms"] = max(entry["max_ms"], ms)
            entry["total_ms"] += ms
        report = {
            "turns": len(turns),
            "busy_ms": sum(cpu for _, cpu in turns),
            "over_ms": {
                str(limit): {
                    "wall": sum(1 for wall, _ in turns if wall > limit),
                    "cpu": sum(1 for _, cpu in turns if cpu > limit),
                }
                for limit in THRESHOLDS_MS
            },
            "longest": sorted(turns, reverse=True)[:LONGEST],
            "collections": by_generation,
        }
        with open(self.report, "w") as f:
            json.dump(report, f)


def main() -> None:
    report, sys.argv = sys.argv[1], ["twistd", *sys.argv[2:]]
    recorder = Recorder(report)
    gc.callbacks.append(recorder.on_gc)
    signal.signal(signal.SIGUSR2, recorder.dump)
    from twisted.internet import epollreactor

    epollreactor.install()
    reactor_class = epollreactor.EPollReactor
    reactor_class.doPoll = reactor_class.doIteration = recorder.wrap(reactor_class.doPoll)  # type: ignore[method-assign]
    from twisted.scripts.twistd import run

    run()


if __name__ == "__main__":
    main()
