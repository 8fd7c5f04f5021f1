"""JSON over HTTP to a registry's API (Kubernetes, Consul, etcd), with treq.

Control-plane traffic, not the proxy path: treq on its own small connection
pool, no redirects followed, no cookies kept, every document size-bounded.
Two shapes of call:

- :meth:`RegistryClient.document`: one JSON document (a list, a range, a
  blocking query), with a deadline for the whole exchange;
- :meth:`RegistryClient.stream`: a long response read as it arrives, one JSON
  value per line (a Kubernetes watch, an etcd watch), until it ends, is
  cancelled, or stays silent for ``idle`` seconds.

Cancelling either Deferred aborts its connection.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.cookiejar import DefaultCookiePolicy
from typing import Any

from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from txgateway.bounded_body import BoundedBody

__all__ = ["APIError", "RegistryClient", "Reply", "StreamIdle", "failure_reason", "load_ca"]

#: Largest JSON document read (an EndpointSlice list of a big service fits many times).
MAX_DOCUMENT = 16 * 1024 * 1024
#: Largest single line of a stream (one watch event).
MAX_LINE = 4 * 1024 * 1024

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


class APIError(Exception):
    """The registry answered, but not with what was asked for (status, body)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class StreamIdle(Exception):
    """A stream sent nothing for its ``idle`` seconds and was dropped."""


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Headers
    #: The parsed JSON body (None when the body was empty).
    document: Any

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else None


def load_ca(path: str) -> Any:
    """A trust root of the PEM certificates in ``path`` (a bundle is fine)."""
    with open(path, "rb") as file:
        data = file.read()
    certificates = [Certificate.loadPEM(block) for block in _PEM.findall(data)]
    if not certificates:
        raise ValueError(f"no PEM certificate in {path}")
    return trustRootFromCertificates(certificates)


class RegistryClient:
    """treq on ``reactor``, trusting ``trust_root`` (or the system CAs) for https."""

    def __init__(self, reactor: Any, clock: IReactorTime, trust_root: Any = None) -> None:
        self.clock = clock
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 2
        self._pool.retryAutomatically = False
        policy = (
            BrowserLikePolicyForHTTPS(trustRoot=trust_root) if trust_root is not None else BrowserLikePolicyForHTTPS()
        )
        no_cookies = IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
        self._client = HTTPClient(Agent(reactor, contextFactory=policy, pool=self._pool), cookiejar=no_cookies)

    def _request(self, method: str, url: str, headers: Mapping[str, str], body: object) -> Deferred[IResponse]:
        sent = Headers({"accept": ["application/json"], **{name: [value] for name, value in headers.items()}})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent.setRawHeaders("content-type", ["application/json"])
        try:
            d: Deferred[Any] = self._client.request(
                method, url, headers=sent, data=data, unbuffered=True, allow_redirects=False
            )
        except Exception:  # noqa: BLE001 - a request that cannot even be made is a failed one
            return fail()
        return d

    def document(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: object = None,
        timeout: float,
    ) -> Deferred[Reply]:
        """One exchange: the status, headers and parsed JSON body, within ``timeout`` seconds."""
        reading: list[BoundedBody] = []

        def received(response: IResponse) -> Deferred[Reply]:
            reader = BoundedBody(MAX_DOCUMENT, _too_large)
            reading.append(reader)
            response.deliverBody(reader)
            return reader.done.addCallback(lambda raw: Reply(response.code, response.headers, _parse(raw)))

        def cancel(_: Deferred[Reply]) -> None:
            if reading:
                reading[0].abort()
            request.cancel()

        outcome: Deferred[Reply] = Deferred(cancel)
        request = self._request(method, url, headers or {}, body)
        request.addCallback(received).chainDeferred(outcome)
        return outcome.addTimeout(timeout, self.clock)

    def stream(
        self,
        method: str,
        url: str,
        on_line: Callable[[Any], None],
        *,
        headers: Mapping[str, str] | None = None,
        body: object = None,
        connect_timeout: float,
        idle: float,
    ) -> Deferred[int]:
        """Call ``on_line`` with each JSON line of a 2xx response as it arrives.

        Fires with the status when the response ends; a non-2xx response
        fails with :class:`APIError` (its status and message), silence for
        ``idle`` seconds with :class:`StreamIdle`, a bad line with ``ValueError``
        and an exception from ``on_line`` with that exception (all after
        dropping the connection).
        """
        reading: list[_Lines] = []

        def received(response: IResponse) -> Deferred[int]:
            if not 200 <= response.code < 300:
                reader = BoundedBody(64 * 1024, _too_large)
                response.deliverBody(reader)
                return reader.done.addBoth(_status_error, response.code)
            lines = _Lines(on_line, self.clock, idle)
            reading.append(lines)
            response.deliverBody(lines)
            return lines.done.addCallback(lambda _: response.code)

        def cancel(_: Deferred[int]) -> None:
            if reading:
                reading[0].abort(None)
            request.cancel()

        outcome: Deferred[int] = Deferred(cancel)
        request = self._request(method, url, headers or {}, body)
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            request.cancel()

        head_timer = self.clock.callLater(connect_timeout, expire)

        def head(result: object) -> object:
            if head_timer.active():
                head_timer.cancel()
            if expired and isinstance(result, Failure) and result.check(CancelledError):
                return Failure(TimeoutError(f"no response head within {connect_timeout:g}s"))
            return result

        request.addBoth(head)
        request.addCallback(received).chainDeferred(outcome)
        return outcome

    def close(self) -> Deferred[None]:
        result: Deferred[None] = self._pool.closeCachedConnections()
        return result


def failure_reason(failure: Failure) -> str:
    """A failed call in a few words, for the outage log."""
    if failure.check(APIError):
        return str(failure.value)
    if failure.check(DeferredTimeout, TimeoutError):
        return "timed out"
    if failure.check(CancelledError):
        return "cancelled"
    message = failure.getErrorMessage()
    name = failure.type.__name__ if failure.type is not None else "error"
    return f"{name}: {message}" if message else name


def _parse(raw: bytes) -> Any:
    if not raw.strip():
        return None
    return json.loads(raw)


def _status_error(result: bytes | Failure, status: int) -> Failure:
    detail = ""
    if isinstance(result, bytes):
        try:
            document = json.loads(result)
        except ValueError:
            detail = result[:200].decode("utf-8", "replace")
        else:
            detail = str(document.get("message") or document.get("error") or "") if isinstance(document, dict) else ""
    return Failure(APIError(f"HTTP {status}" + (f": {detail}" if detail else ""), status))


def _too_large(limit: int) -> Exception:
    return APIError(f"response larger than {limit} bytes")


class _Lines(Protocol):
    """Splits a streamed body into lines, parses each as JSON and hands it on, as it arrives."""

    def __init__(self, on_line: Callable[[Any], None], clock: IReactorTime, idle: float) -> None:
        self.on_line = on_line
        self.clock = clock
        self.idle = idle
        self.buffer = b""
        self.done: Deferred[None] = Deferred()
        self._quiet: IDelayedCall | None = clock.callLater(idle, self._silent)

    def _silent(self) -> None:
        self._quiet = None
        self.abort(Failure(StreamIdle(f"nothing received for {self.idle:g}s")))

    def abort(self, reason: Failure | None) -> None:
        """Drop the connection; ``done`` fails with ``reason`` (None: cancelled)."""
        self._stop_timer()
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]
        if not self.done.called:
            self.done.errback(reason if reason is not None else Failure(CancelledError()))

    def _stop_timer(self) -> None:
        quiet, self._quiet = self._quiet, None
        if quiet is not None and quiet.active():
            quiet.cancel()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        if self._quiet is not None:
            self._quiet.reset(self.idle)
        self.buffer += data
        while not self.done.called:
            line, newline, rest = self.buffer.partition(b"\n")
            if not newline:
                if len(self.buffer) > MAX_LINE:
                    self.abort(Failure(APIError(f"stream line longer than {MAX_LINE} bytes")))
                return
            self.buffer = rest
            if not line.strip():
                continue
            try:
                self.on_line(json.loads(line))
            except Exception:  # noqa: BLE001 - a bad line or a failing handler ends the stream
                self.abort(Failure())
                return

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        self._stop_timer()
        if self.done.called:
            return
        if self.buffer.strip() and reason.check(ResponseDone, PotentialDataLoss):
            try:
                self.on_line(json.loads(self.buffer))
            except Exception:  # noqa: BLE001
                self.done.errback(Failure())
                return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)
