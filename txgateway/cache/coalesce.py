"""Request coalescing: concurrent misses for one URL make one upstream request.

The first miss for a primary key *leads* a :class:`Flight`; later misses
for the same key wait on it.  The flight lands when the leader's response
was stored (every waiter gets the entry) or turned out not storable, failed,
or was abandoned (every waiter gets None and goes to the upstream itself).
A waiter gives up after ``timeout`` seconds and goes to the upstream itself,
so a slow or huge leader never holds others longer than that; a flight
older than ``timeout`` takes no new waiters (the next miss leads a new one).
A waiter whose client goes away leaves the flight without disturbing it.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from txgateway.cache.entry import Entry, PrimaryKey


class _Waiter:
    __slots__ = ("deferred", "flight", "timer")

    def __init__(self, flight: Flight) -> None:
        self.flight = flight
        self.deferred: Deferred[Entry | None] = Deferred(self._cancelled)
        self.timer: IDelayedCall | None = None

    def _cancelled(self, _: object) -> None:
        """The waiting client went away."""
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if self in self.flight.waiters:
            self.flight.waiters.remove(self)


class Flight:
    """One leader's upstream request, and the requests waiting for its entry."""

    __slots__ = ("_flights", "key", "landed", "started", "waiters")

    def __init__(self, flights: Flights, key: PrimaryKey) -> None:
        self._flights = flights
        self.key = key
        self.started = flights.clock.seconds()
        self.waiters: list[_Waiter] = []
        self.landed = False

    def wait(self) -> Deferred[Entry | None]:
        """Fires with the stored entry, or None when the waiter is on its own."""
        waiter = _Waiter(self)
        waiter.timer = self._flights.clock.callLater(self._flights.timeout, self._give_up, waiter)
        self.waiters.append(waiter)
        return waiter.deferred

    def _give_up(self, waiter: _Waiter) -> None:
        waiter.timer = None
        if waiter in self.waiters:
            self.waiters.remove(waiter)
        if not waiter.deferred.called:
            waiter.deferred.callback(None)

    def land(self, entry: Entry | None) -> None:
        """Release the waiters; the first call counts."""
        if self.landed:
            return
        self.landed = True
        flights = self._flights.in_flight
        if flights.get(self.key) is self:
            del flights[self.key]
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            if not waiter.deferred.called:
                waiter.deferred.callback(entry)


class Flights:
    """The flights of one cache stage, by primary key."""

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        self.in_flight: dict[PrimaryKey, Flight] = {}

    def get(self, key: PrimaryKey) -> Flight | None:
        """The flight a miss for ``key`` may wait on, None when there is none (or it is too old)."""
        flight = self.in_flight.get(key)
        if flight is not None and self.clock.seconds() - flight.started >= self.timeout:
            return None
        return flight

    def start(self, key: PrimaryKey) -> Flight:
        flight = self.in_flight[key] = Flight(self, key)
        return flight
