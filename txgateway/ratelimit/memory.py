"""The in-process store: one dict of per-key states, bounded in memory.

Used for ``storage: memory`` and as the ``on_storage_error: local`` fallback
of the Redis store.  One store serves every route (keys carry the route and
the policy) and outlives config reloads (it lives in ``Runtime.shared``), so
a reload keeps the counts of unchanged routes.

Memory stays bounded two ways:

- Idle keys expire.  Every decision records when the key's state will be
  the same as a fresh one (a full bucket, windows slid out of view); past
  that time it carries no information and is dropped.  Expiry is a timing
  wheel swept every ``sweep_interval`` seconds on the injected clock: a key
  is filed under the slot of its idle time when created, and a sweep looks
  only at the keys filed in due slots, dropping the idle ones and refiling
  the others under their (since pushed back) idle time.  A request never
  pays for expiry, and a sweep's work is the number of keys due, not the
  size of the store.  The timer runs only while the store holds keys.
- A hard cap (``max_keys``, default 500,000; a key costs about 330 bytes
  with its name, so about 170 MB).  While the store is full, a new key is
  decided on a fresh state that is not kept: keys that were there first
  (established clients) keep their counts, and a flood of new keys (random
  header values, spoofed addresses) costs no memory.  Those new clients are
  not limited until room frees up; the sweep logs how many went untracked.

One decision costs a dict lookup and the algorithm's arithmetic: a couple of
microseconds (``bench/ratelimit_cost.py``).
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from txgateway.ratelimit.decision import IDLE_AT, SLOT, Algorithm, Decision


class MemoryStore:
    log = Logger()

    def __init__(self, clock: IReactorTime, sweep_interval: float = 10.0, max_keys: int = 500_000) -> None:
        self._clock = clock
        self._seconds = clock.seconds
        self._interval = sweep_interval
        self._max_keys = max_keys
        self._states: dict[str, list[float]] = {}
        #: Slot number -> keys filed there.  A key is listed once per life in
        #: the store; a stale listing (key dropped, then created again) is
        #: recognised by the state's SLOT.
        self._wheel: dict[int, list[str]] = {}
        self._sweeper: IDelayedCall | None = None
        self._untracked = 0

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, key: str) -> bool:
        return key in self._states

    def decide(self, algorithm: Algorithm, key: str) -> Decision:
        """Count one request for ``key`` under ``algorithm``."""
        now = self._seconds()
        state = self._states.get(key)
        if state is not None:
            return algorithm.decide(state, now)
        return self._first(algorithm, key, now)

    def _first(self, algorithm: Algorithm, key: str, now: float) -> Decision:
        state = algorithm.fresh(now)
        decision = algorithm.decide(state, now)
        if len(self._states) >= self._max_keys:
            self._untracked += 1
            return decision
        self._states[key] = state
        self._file(key, state)
        return decision

    def _file(self, key: str, state: list[float]) -> None:
        slot = int(state[IDLE_AT] // self._interval) + 1
        state[SLOT] = slot
        keys = self._wheel.get(slot)
        if keys is None:
            self._wheel[slot] = [key]
        else:
            keys.append(key)
        if self._sweeper is None:
            self._sweeper = self._clock.callLater(self._interval, self.sweep)

    def sweep(self) -> int:
        """Drop the keys that have been idle long enough; returns how many."""
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        now = self._seconds()
        current = int(now // self._interval)
        states = self._states
        wheel = self._wheel
        dropped = 0
        for slot in [slot for slot in wheel if slot <= current]:
            for key in wheel.pop(slot):
                state = states.get(key)
                if state is None or state[SLOT] != slot:
                    continue
                if state[IDLE_AT] <= now:
                    del states[key]
                    dropped += 1
                else:
                    self._file(key, state)
        if self._untracked:
            self.log.warn(
                "Rate-limit memory store full ({max_keys} keys): {count} requests of new keys"
                " were admitted untracked since the last sweep",
                max_keys=self._max_keys,
                count=self._untracked,
            )
            self._untracked = 0
        if wheel and self._sweeper is None:
            self._sweeper = self._clock.callLater(self._interval, self.sweep)
        return dropped

    def stop(self) -> None:
        """Forget every key and cancel the sweep timer (``Runtime.stop``)."""
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        self._states.clear()
        self._wheel.clear()
