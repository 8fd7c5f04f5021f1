"""The heap keeper: full collections and freezes after start-up and reloads.

The order of collector calls is checked against a recorder; what they do to
real garbage is checked in a child interpreter, so the test runner's own
heap is never frozen.  The running process's log lines are checked in
tests/integration/test_reload.py.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from txgateway.config import parse_config
from txgateway.heap import SETTLE_MARGIN, Heap
from txgateway.service import GatewayService
from txgateway.tap import Options, makeService


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.frozen = 0

    def collect(self, generation: int = 2) -> int:
        self.calls.append(f"collect({generation})")
        return 0

    def freeze(self) -> None:
        self.calls.append("freeze")
        self.frozen += 1

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")

    def get_freeze_count(self) -> int:
        return self.frozen


class HeapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.gc = Recorder()
        self.heap = Heap(self.clock, self.gc)

    def test_settle_collects_fully_then_freezes(self) -> None:
        self.heap.settle("start")
        self.assertEqual(self.gc.calls, ["collect(2)", "freeze"])

    def test_after_a_reload_the_heap_is_settled_again_once_the_grace_period_passed(self) -> None:
        self.heap.settle("start")
        self.gc.calls.clear()
        self.heap.reloaded(5.0)
        self.clock.advance(5.0 + SETTLE_MARGIN - 0.01)
        self.assertEqual(self.gc.calls, [])
        self.clock.advance(0.01)
        # Unfrozen first: the old generation's cycles are in the permanent generation.
        self.assertEqual(self.gc.calls, ["unfreeze", "collect(2)", "freeze"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reloads_in_quick_succession_share_one_pass(self) -> None:
        self.heap.reloaded(5.0)
        self.clock.advance(3.0)
        self.heap.reloaded(5.0)
        self.clock.advance(5.0 + SETTLE_MARGIN - 0.01)
        self.assertEqual(self.gc.calls, [])
        self.clock.advance(0.01)
        self.assertEqual(self.gc.calls, ["unfreeze", "collect(2)", "freeze"])

    def test_stop_cancels_a_pending_pass(self) -> None:
        self.heap.reloaded(5.0)
        self.heap.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(60)
        self.assertEqual(self.gc.calls, [])


#: Run in a child interpreter: an "old generation" in a reference cycle,
#: frozen while current, then dropped by a reload.
CHILD = textwrap.dedent(
    """
    import gc, weakref
    from twisted.internet.task import Clock
    from txgateway.heap import Heap

    class Generation:
        def __init__(self):
            self.me = self  # a reference cycle: only the collector frees it

    clock = Clock()
    heap = Heap(clock)
    old = Generation()
    alive = weakref.ref(old)
    heap.settle("start")
    assert gc.get_freeze_count() > 0
    del old
    gc.collect()
    print("frozen, after a full collection:", "alive" if alive() else "freed")
    heap.reloaded(2.0)
    clock.advance(2.0)
    print("before the grace period ends:", "alive" if alive() else "freed")
    clock.advance(1.0)
    print("after the reload's pass:", "alive" if alive() else "freed")
    print("frozen again:", gc.get_freeze_count() > 0)
    """
)


class RealCollectorTests(SynchronousTestCase):
    def test_a_dropped_generation_in_a_cycle_is_freed_by_the_reload_pass(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        done = subprocess.run(
            [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, env=env, check=False
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(
            done.stdout.splitlines(),
            [
                # Why the reload pass unfreezes: a plain full collection skips frozen objects.
                "frozen, after a full collection: alive",
                "before the grace period ends: alive",
                "after the reload's pass: freed",
                "frozen again: True",
            ],
        )


CONFIG = """
server: {shutdown_grace: 4}
upstreams:
  users: {servers: [{address: "127.0.0.1:9001"}]}
routes:
  - {name: users, match: {path: /users/*}, upstream: users}
"""


class ServiceHeapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        with open(self.path, "w") as f:
            f.write(CONFIG)
        self.reactor = MemoryReactorClock()
        self.gc = Recorder()
        self.service = GatewayService(
            parse_config(CONFIG, source=self.path), self.reactor, heap=Heap(self.reactor, self.gc)
        )

    def test_start_settles_and_a_reload_settles_again_after_its_grace(self) -> None:
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.assertEqual(self.gc.calls, ["collect(2)", "freeze"])
        self.gc.calls.clear()
        with open(self.path, "w") as f:
            f.write(CONFIG.replace("/users/*", "/people/*"))
        result = self.service.reload("api")
        self.assertTrue(result.ok, result.errors)
        self.reactor.advance(4 + SETTLE_MARGIN - 0.01)
        self.assertEqual(self.gc.calls, [])
        self.reactor.advance(0.01)
        self.assertEqual(self.gc.calls, ["unfreeze", "collect(2)", "freeze"])

    def test_a_failed_reload_does_not_settle(self) -> None:
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.gc.calls.clear()
        with open(self.path, "w") as f:
            f.write("routes: [")
        self.assertFalse(self.service.reload("api").ok)
        self.reactor.advance(60)
        self.assertEqual(self.gc.calls, [])

    def test_twistd_gives_the_gateway_a_heap_keeper(self) -> None:
        options = Options()
        options.parseOptions(["-c", self.path])
        service = makeService(options)
        assert isinstance(service, GatewayService)
        self.assertIsInstance(service.heap, Heap)
        self.assertIs(service.heap.collector, gc)
