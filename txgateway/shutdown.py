"""Graceful shutdown: from SIGTERM to exit without failing a request that started.

The sequence (twistd's SIGTERM stops the reactor, which waits for
``GatewayService.stopService``, which runs this):

1. ``/ready`` answers 503 at once (the service's readiness says "shutting
   down"), so load balancers and Kubernetes take the endpoint out.
2. For ``server.shutdown_delay`` seconds the listeners keep accepting: requests
   still routed here meanwhile are served, not refused.
3. The listeners close.  Idle keep-alive connections close; a connection with
   a request in progress answers it with ``Connection: close``; HTTP/2
   connections get a GOAWAY naming the last stream served, their started
   streams (gRPC calls too) finish.
4. When every connection is closed, or ``server.shutdown_grace`` after step 3,
   whichever comes first, WebSockets are closed with 1001 (going away) on
   both sides and what is left is closed.  WebSockets rarely end on their
   own, so with one open the grace period is used in full.
5. Then upstream pools and shared state stop and the process exits 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from txgateway.protocols.http1 import HTTP11ServerFactory
from txgateway.upstream.websocket import OpenRelays

#: After the grace period, how long closing handshakes (WebSocket 1001, TLS) may take.
CLOSE_WAIT = 2.0


def _within(clock: IReactorTime, d: Deferred[None], seconds: float) -> Deferred[bool]:
    """True when ``d`` fires within ``seconds``, False when the time runs out first."""
    result: Deferred[bool] = Deferred()

    def fired(_: object) -> None:
        if not result.called:
            if timer.active():
                timer.cancel()
            result.callback(True)

    def expired() -> None:
        if not result.called:
            result.callback(False)

    timer = clock.callLater(max(0.0, seconds), expired)
    d.addBoth(fired)
    return result


class GracefulShutdown:
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        connections: HTTP11ServerFactory,
        relays: OpenRelays,
        delay: float,
        grace: float,
    ) -> None:
        """``connections``: the factory counting every proxy connection (cleartext and TLS)."""
        self._clock = clock
        self._connections = connections
        self._relays = relays
        self.delay = delay
        self.grace = grace

    @inlineCallbacks
    def run(self, stop_listening: Callable[[], Deferred[Any]]) -> Any:
        connections = self._connections
        if self.delay > 0:
            self.log.info(
                "shutting down: not ready; still accepting for {delay:g}s (server.shutdown_delay)",
                delay=self.delay,
            )
            yield deferLater(self._clock, self.delay, lambda: None)
        yield stop_listening()
        open_now = connections.open_connections
        self.log.info(
            "shutting down: listeners closed; draining {connections} connection(s) "
            "({websockets} WebSocket) for up to {grace:g}s (server.shutdown_grace)",
            connections=open_now,
            websockets=len(self._relays),
            grace=self.grace,
        )
        connections.drain()
        drained = yield _within(self._clock, connections.when_idle(), self.grace)
        if drained:
            self.log.info("shutting down: every connection finished")
            self._relays.close_all()  # none should be left; never leave one behind
            return
        websockets = len(self._relays)
        left = connections.open_connections
        self.log.info(
            "shutting down: grace period over; closing {websockets} WebSocket(s) with 1001 "
            "and {others} other connection(s)",
            websockets=websockets,
            others=max(0, left - websockets),
        )
        self._relays.close_all()
        connections.force_close()
        closed = yield _within(self._clock, connections.when_idle(), CLOSE_WAIT)
        if not closed:
            self.log.warn(
                "shutting down: {count} connection(s) still open after closing; exiting anyway",
                count=connections.open_connections,
            )
