"""Run twistd with every reactor turn and garbage collection timed (for bench/loop_stalls.py).

    python bench/turn_recorder.py [--heap-off] REPORT.json twistd-arguments...

A turn is what the epoll reactor does between two ``epoll_wait`` calls: the
ready sockets' reads and writes, then the due timers (the reactor's epoll
object is wrapped, so both are inside the turn).  Each turn's wall time
is taken with ``time.perf_counter`` and its CPU time with
``time.thread_time``: a turn whose wall time is far above its CPU time
spent that time not running, descheduled by the host (another vCPU's work,
steal), not computing.  Every collection's generation and length come
from ``gc.callbacks``.

SIGUSR2 writes the figures gathered since the last SIGUSR2 (or the start)
to REPORT.json and starts over.  The wrapper costs four clock reads and an
append per turn, so it is a tool for finding stalls, not for measuring
throughput.  ``--heap-off`` leaves the heap unfrozen (txgateway.heap does
nothing), for a before/after comparison.
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

    def waiting(self) -> None:
        """The reactor is about to wait: the turn since the last wait ended is over."""
        ended = self._turn_ended
        if ended is not None:
            wall, cpu = time.perf_counter(), time.thread_time()
            self.turns.append(((wall - ended[0]) * 1000, (cpu - ended[1]) * 1000))

    def woken(self) -> None:
        self._turn_ended = (time.perf_counter(), time.thread_time())

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


class TimedPoller:
    """The reactor's epoll object, with the time between two waits recorded.

    The reactor dispatches the ready events inside ``doPoll`` and runs its
    timers after it, so the poller's ``poll`` is the one place where a turn
    visibly begins and ends.
    """

    def __init__(self, poller: Any, recorder: Recorder) -> None:
        self._poller = poller
        self._recorder = recorder

    def poll(self, timeout: float = -1, maxevents: int = -1) -> Any:
        self._recorder.waiting()
        try:
            return self._poller.poll(timeout, maxevents)
        finally:
            self._recorder.woken()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._poller, name)


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--heap-off"]:
        # The comparison bench/loop_stalls.py --heap-off asks for: the
        # configuration left in the collector's generations, as before txgateway.heap.
        from txgateway.heap import Heap

        Heap.settle = Heap._resettle = lambda self, *reason: None  # type: ignore[method-assign]
        args = args[1:]
    report, sys.argv = args[0], ["twistd", *args[1:]]
    recorder = Recorder(report)
    gc.callbacks.append(recorder.on_gc)
    signal.signal(signal.SIGUSR2, recorder.dump)
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor

    reactor._poller = TimedPoller(reactor._poller, recorder)  # type: ignore[attr-defined]
    from twisted.scripts.twistd import run

    run()


if __name__ == "__main__":
    main()
