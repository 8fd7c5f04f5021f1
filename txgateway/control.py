"""What the admin surface may see and do of the running gateway.

``GatewayService`` implements :class:`GatewayControl`; the admin listener
(``txgateway.admin``) is built on it and on nothing else, so the admin API,
the dashboard and the tests drive the same few operations: is it ready,
which generation is current, what did the last reloads do, reload now.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from txgateway.gateway import Gateway


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """The outcome of one attempt to load the configuration."""

    #: The generation serving after the attempt (1 for the startup config).
    generation: int
    ok: bool
    #: What asked for it: "startup", "sighup", "file", "api".
    trigger: str
    #: Wall-clock time (``time.time()``) of the attempt.
    at: float
    #: The file that was read.
    source: str | None
    #: When not ok: the problems, each naming file, path and problem.
    errors: tuple[str, ...] = ()
    #: What changed, for people: "route users: added", "upstream api: changed",
    #: "server.listen: changed, takes effect at restart".
    changes: tuple[str, ...] = ()
    #: The file was byte-for-byte the running one: nothing was rebuilt.
    unchanged: bool = False

    def as_json(self) -> dict[str, object]:
        return {
            "generation": self.generation,
            "ok": self.ok,
            "trigger": self.trigger,
            "at": self.at,
            "source": self.source,
            "errors": list(self.errors),
            "changes": list(self.changes),
            "unchanged": self.unchanged,
        }


class GatewayControl(Protocol):
    """The running gateway as the admin listener sees it."""

    def readiness(self) -> str | None:
        """None when ready to take traffic, else the reason (``/ready``)."""

    @property
    def gateway(self) -> Gateway:
        """The current generation: its config, router, upstreams and runtime
        (``gateway.runtime.metrics`` is the metrics registry)."""

    def reloads(self) -> Sequence[ReloadResult]:
        """The most recent reload attempts, newest first (bounded)."""

    def reload(self, trigger: str) -> ReloadResult:
        """Load the config file again now; never raises for a bad file."""
