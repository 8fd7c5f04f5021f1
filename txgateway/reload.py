"""Hot reload: read the config file again, validate it aside, switch if it is good.

Three triggers ask for the same thing: SIGHUP, a change of the file (polled:
``os.stat`` follows symlinks, so a Kubernetes ConfigMap's ``..data`` symlink
swap is seen like an edit), and ``POST /admin/reload``.  A file that does not
load changes nothing: the running generation stays, the problems are logged
with file and path, counted in ``txgateway_config_reloads_total{result="failure"}``
and listed by ``/admin/reloads``.  A file byte-for-byte like the running one
is not rebuilt (so one SIGHUP per worker, or a touch, costs nothing).

The switch itself is :class:`Switch`'s business (``GatewayService.switch``):
it builds the new generation and swaps it in atomically per request.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from collections.abc import Callable, Sequence

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from txgateway.config import ConfigError, GatewayConfig, parse_config
from txgateway.config.loader import read_config_text
from txgateway.control import ReloadResult
from txgateway.observability.metrics import GatewayMetrics

#: Builds and swaps in a new generation; returns what changed, raises
#: ``GenerationError`` (or anything) when the new generation cannot be built.
Switch = Callable[[GatewayConfig], Sequence[str]]

#: How many attempts ``/admin/reloads`` remembers.
HISTORY = 20


class GenerationError(Exception):
    """The config loaded but the gateway could not be built from it."""


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class Reloader:
    log = Logger()

    def __init__(
        self,
        path: str,
        switch: Switch,
        clock: IReactorTime,
        metrics: GatewayMetrics,
        *,
        poll_interval: float = 2.0,
        wall_time: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._switch = switch
        self._clock = clock
        self._metrics = metrics
        self._poll_interval = poll_interval
        self._time = wall_time
        self.generation = 1
        self.history: deque[ReloadResult] = deque(maxlen=HISTORY)
        self._digest: bytes | None = None
        self._stat: tuple[int, int, int] | None = self._file_stat()
        self._poller: LoopingCall | None = None
        metrics.config_generation.set(1)
        metrics.config_last_reload_success.set(1)

    def started(self, text: str | None = None) -> None:
        """Record the startup config (its text, when known, makes identical files no-ops)."""
        if text is None:
            try:
                text = read_config_text(self.path)
            except ConfigError:
                text = None
        if text is not None:
            self._digest = _digest(text)
        self.history.appendleft(ReloadResult(self.generation, True, "startup", self._time(), self.path))

    def reload(self, trigger: str) -> ReloadResult:
        """Load the file now and switch to it if it is good; never raises."""
        self._stat = self._file_stat()
        try:
            text = read_config_text(self.path)
            digest = _digest(text)
            if digest == self._digest:
                result = ReloadResult(self.generation, True, trigger, self._time(), self.path, unchanged=True)
                self.log.info(
                    "config reload ({trigger}): {path} unchanged, generation {generation} stays",
                    trigger=trigger,
                    path=self.path,
                    generation=self.generation,
                )
                self.history.appendleft(result)
                return result
            config = parse_config(text, source=self.path)
        except ConfigError as error:
            return self._failed(trigger, tuple(error.lines()))
        try:
            changes = tuple(self._switch(config))
        except Exception as error:  # noqa: BLE001 - a bad generation must leave the running one
            self.log.failure("config reload ({trigger}): building the new generation failed", trigger=trigger)
            return self._failed(trigger, (f"{self.path}: cannot build the gateway: {error}",))
        self._digest = digest
        self.generation += 1
        result = ReloadResult(self.generation, True, trigger, self._time(), self.path, changes=changes)
        self.history.appendleft(result)
        self._metrics.config_reloads.labels("success").inc()
        self._metrics.config_generation.set(self.generation)
        self._metrics.config_last_reload_success.set(1)
        self.log.info(
            "config reloaded ({trigger}): generation {generation} from {path}: {summary}",
            trigger=trigger,
            generation=self.generation,
            path=self.path,
            summary="; ".join(changes) or "no effective change",
            changes=list(changes),
        )
        return result

    def _failed(self, trigger: str, errors: tuple[str, ...]) -> ReloadResult:
        result = ReloadResult(self.generation, False, trigger, self._time(), self.path, errors=errors)
        self.history.appendleft(result)
        self._metrics.config_reloads.labels("failure").inc()
        self._metrics.config_last_reload_success.set(0)
        self.log.error(
            "config reload ({trigger}) refused, generation {generation} keeps serving:\n{problems}",
            trigger=trigger,
            generation=self.generation,
            problems="\n".join(errors),
            errors=list(errors),
        )
        return result

    # Watching the file.

    def start(self) -> None:
        if self._poll_interval > 0 and self._poller is None:
            self._poller = LoopingCall(self._poll)
            self._poller.clock = self._clock
            self._poller.start(self._poll_interval, now=False)

    def stop(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None and poller.running:
            poller.stop()

    def _file_stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _poll(self) -> None:
        stat = self._file_stat()
        if stat is not None and stat != self._stat:
            self.reload("file")
