"""Keeping the garbage collector's full passes off the configuration.

Most of a running gateway's heap is its configuration generation: routes,
compiled patterns, middleware instances, metric series, pools.  CPython's
cyclic collector walks every tracked object on each full (generation 2)
pass, and the reactor stands still meanwhile.  Measured with
``bench/gc_pause.py``: about 70,000 tracked objects and an 18 ms pass for one
route, 340,000 objects and a 90 ms pass for 10,000 routes.  Such a pass
comes whenever the objects that survived younger passes have grown by a
quarter, so a busy gateway stalls every request in flight at moments nobody
chose.

Those objects live until the next reload, so there is nothing to find in
them.  :meth:`Heap.settle` runs one full pass and then ``gc.freeze()``s
what is left into the permanent generation, which the collector never walks:
afterwards a full pass costs what requests and connections left behind.

A reload builds new long-lived objects, and the old generation's become
garbage once its in-flight requests finish.  Reference counting frees most
of them, even frozen; what sits in a reference cycle would stay in the
permanent generation for good.  So after a switch, once the old
generation's grace period has passed (its requests finished, its retired
objects stopped), :meth:`Heap.reloaded` unfreezes, runs the one full pass
(a pause at a moment the operator chose by reloading, logged with its
length) and freezes again.  Reloads in quick succession share one pass.
"""

from __future__ import annotations

import gc
import time
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

#: After the old generation's grace period, a little more for its retired
#: objects' stops (scheduled at the same delay) to have run.
SETTLE_MARGIN = 1.0


class Collector(Protocol):
    """The parts of the ``gc`` module a :class:`Heap` uses (tests pass a recorder)."""

    def collect(self, generation: int = 2) -> int: ...

    def freeze(self) -> None: ...

    def unfreeze(self) -> None: ...

    def get_freeze_count(self) -> int: ...


class Heap:
    """Freezes the long-lived heap after start-up and after each reload."""

    log = Logger()

    def __init__(self, clock: IReactorTime, collector: Collector = gc) -> None:
        self.clock = clock
        self.collector = collector
        self._pending: IDelayedCall | None = None

    def settle(self, reason: str) -> None:
        """One full collection, then freeze what survived."""
        started = time.perf_counter()
        found = self.collector.collect()
        self.collector.freeze()
        self.log.info(
            "heap settled after {reason}: {frozen} objects frozen, {found} unreachable freed"
            " in a {ms:.1f} ms full collection",
            reason=reason,
            frozen=self.collector.get_freeze_count(),
            found=found,
            ms=(time.perf_counter() - started) * 1000,
        )

    def reloaded(self, grace: float) -> None:
        """A new generation is current; settle again once the old one has gone."""
        self.stop()  # an earlier reload's pass, not yet run: this one's covers both
        self._pending = self.clock.callLater(grace + SETTLE_MARGIN, self._resettle)

    def _resettle(self) -> None:
        self._pending = None
        self.collector.unfreeze()
        self.settle("reload")

    def stop(self) -> None:
        """Cancel a pending reload pass."""
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
