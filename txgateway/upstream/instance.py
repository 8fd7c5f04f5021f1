"""One server of an upstream, and what the gateway knows of its health.

Balancers read ``in_flight`` and ``weight``; health checks and outlier
detection write ``active_healthy`` / ``ejected_until`` and then ask the
upstream to recompute its ``available`` list, so a request never filters
the instance list itself.
"""

from __future__ import annotations


class Instance:
    __slots__ = (
        "active_healthy",
        "address",
        "consecutive_failures",
        "ejected_until",
        "host",
        "in_flight",
        "port",
        "weight",
    )

    def __init__(self, host: str, port: int, weight: int = 1) -> None:
        self.host = host
        self.port = port
        self.weight = weight
        #: "host:port", for logs, metrics and the access log.
        self.address = f"{host}:{port}"
        #: Requests sent to it whose response has not completed.
        self.in_flight = 0
        #: Active health check verdict (True until checks say otherwise).
        self.active_healthy = True
        #: Passive outlier detection: ejected while clock < this.
        self.ejected_until = 0.0
        #: Consecutive failed requests seen by passive detection.
        self.consecutive_failures = 0

    def available(self, now: float) -> bool:
        return self.active_healthy and self.ejected_until <= now

    def state(self, now: float) -> dict[str, object]:
        """Its health as the admin API and /ready show it."""
        return {
            "address": self.address,
            "weight": self.weight,
            "healthy": self.available(now),
            "active_healthy": self.active_healthy,
            "ejected_for": max(0.0, self.ejected_until - now),
            "in_flight": self.in_flight,
        }

    def __repr__(self) -> str:
        return f"<Instance {self.address}>"
