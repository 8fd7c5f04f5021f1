"""Read the whole set, then follow its changes: the shape of Kubernetes and etcd discovery.

A :class:`ListWatchSource` reads every instance (Kubernetes' list, etcd's
range), then opens a change stream from the position that read returned
(a ``resourceVersion``, a revision).  What is shared here:

- a stream that ends cleanly is reopened from the last position seen (at
  once, or after ``MIN_WATCH`` seconds if it lasted less than that, so a
  server that ends every watch at once cannot make us spin);
- a stream silent past its idle limit is reopened the same way;
- a stream whose position is gone (410 Gone, a compacted revision) reads
  the whole set again;
- any other failure is an outage: the last instances stay and the read is
  retried with the source's backoff.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from txgateway.upstream.discovery._http import RegistryClient, StreamIdle, failure_reason
from txgateway.upstream.discovery.source import InstanceSource

#: A watch that ended sooner than this after it started is resumed only after this.
MIN_WATCH = 1.0


class ListWatchSource(InstanceSource):
    #: The registry client, made by the provider when it first reads.
    _client: RegistryClient | None = None
    #: The request or stream going on (cancelled at stop).
    _call: Deferred[Any] | None = None
    _watch_started = 0.0

    # -- for providers --------------------------------------------------------

    def _read(self) -> None:
        """Read the whole set (errbacks to ``_failed``); on success ``_found``, then ``_watch``."""
        raise NotImplementedError

    def _open_watch(self, client: RegistryClient) -> Deferred[int]:
        """Open the change stream from the last position; fires with its status when it ends."""
        raise NotImplementedError

    def _position_lost(self, failure: Failure) -> bool:
        """Whether ``failure`` says the stream's position is gone (logging it if so)."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------

    def _begin(self) -> None:
        self._read()

    def _halt(self) -> Deferred[None]:
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        client, self._client = self._client, None
        return client.close() if client is not None else succeed(None)

    def _failed(self, failure: Failure) -> None:
        if not self.running:
            return
        self._lost(failure_reason(failure))
        self._later(self._retry_delay(), self._read)

    def _watch(self) -> None:
        if not self.running or self._client is None:
            return
        self._watch_started = self.clock.seconds()
        d = self._call = self._open_watch(self._client)
        d.addCallbacks(self._watch_ended, self._watch_failed)

    def _watch_ended(self, status: int) -> None:
        if not self.running:
            return
        lasted = self.clock.seconds() - self._watch_started
        self._later(0.0 if lasted >= MIN_WATCH else MIN_WATCH, self._watch)

    def _watch_failed(self, failure: Failure) -> None:
        if not self.running:
            return
        if self._position_lost(failure):
            self._read()
            return
        if failure.check(StreamIdle):
            self._watch()
            return
        self._lost(failure_reason(failure))
        self._later(self._retry_delay(), self._read)
