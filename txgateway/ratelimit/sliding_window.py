"""Sliding window: at most ``requests_per_minute`` in any 60 seconds, approximately.

This is the *weighted two-window counter*, not a request log.  Time is cut
into fixed 60 s windows (aligned on the epoch, so every gateway sharing a
Redis agrees on them); a key keeps only the count of the current window and
of the previous one, and estimates the requests of the last 60 s as::

    previous * (1 - elapsed / 60) + current

assuming the previous window's requests were spread evenly over it.

Why not a log of timestamps, which is exact: its state is one entry per
admitted request, so an admin tier of 1000/min costs 1000 floats per key in
memory and a 1000-member sorted set per key in Redis, trimmed on every
decision (O(log n) and unbounded work per call under a flood).  The counter
is O(1) in time and space, two integers per key in memory and one small hash
in Redis, and one script call whatever the limit.  The price is accuracy
when traffic is bursty across a window boundary: the estimate can be off in
either direction by the unevenness of the previous window (measured at a
fraction of a percent on real traffic by those who run it at scale), never by
more than the previous window's count.  Within one window it is exact: with
no previous traffic exactly ``requests_per_minute`` are admitted.

``burst_size`` has no meaning here; the window is the burst.  The arithmetic
is the same in the Redis script; keep them in step.
"""

from __future__ import annotations

from math import ceil

from txgateway.ratelimit.decision import EPSILON, IDLE_AT, Decision

#: Seconds per window: the "minute" of requests_per_minute.
WINDOW = 60.0


class SlidingWindow:
    """The algorithm and its limit; the state is ``[window, previous, current, idle_at, slot]``."""

    name = "sliding_window"
    __slots__ = ("arguments", "limit", "tag", "window")

    def __init__(self, requests_per_minute: int, window: float = WINDOW) -> None:
        if requests_per_minute < 1:
            raise ValueError("requests_per_minute must be >= 1")
        self.limit = requests_per_minute
        self.window = window
        self.tag = f"sw:{requests_per_minute}"
        self.arguments: tuple[int, ...] = (requests_per_minute, int(window * 1000))

    def __repr__(self) -> str:
        return f"SlidingWindow({self.limit}/{self.window:g}s)"

    def fresh(self, now: float) -> list[float]:
        return [now // self.window, 0.0, 0.0, now, 0.0]

    def decide(self, state: list[float], now: float) -> Decision:
        window = self.window
        limit = self.limit
        index = now // window
        start = state[0]
        if index > start:
            state[1] = state[2] if index == start + 1 else 0.0
            state[2] = 0.0
            state[0] = start = index
        # A clock that stepped back into an older window counts as the window's start.
        elapsed = now - start * window
        if elapsed < 0.0:
            elapsed = 0.0
        previous = state[1]
        current = state[2]
        estimate = previous * (1.0 - elapsed / window) + current
        allowed = estimate + 1.0 <= limit + EPSILON
        if allowed:
            current += 1.0
            state[2] = current
            estimate += 1.0
        # Whole quota back once both counted windows have slid out of view.
        if current > 0.0:
            until_idle = 2.0 * window - elapsed
        elif previous > 0.0:
            until_idle = window - elapsed
        else:
            until_idle = 0.0
        state[IDLE_AT] = now + until_idle
        reset = ceil(until_idle - EPSILON)
        if allowed:
            remaining = int(limit - estimate + EPSILON)
            return Decision(True, remaining if remaining > 0 else 0, reset, 0)
        retry = ceil(_until_admitted(previous, current, elapsed, window, limit) - EPSILON)
        return Decision(False, 0, reset, retry if retry > 1 else 1)


def _until_admitted(previous: float, current: float, elapsed: float, window: float, limit: int) -> float:
    """Seconds until the estimate leaves room for one more request."""
    room = limit - 1.0
    if previous > 0.0 and current <= room:
        # Still in this window, as the previous window's weight fades.
        return window * (1.0 - (room - current) / previous) - elapsed
    # In the next window, as this window's count (then "previous") fades.
    return (window - elapsed) + window * (1.0 - room / current)
