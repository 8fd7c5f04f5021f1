"""``discovery.type: etcd``: keys under a prefix, by etcd v3's JSON gateway.

Each key under ``<prefix><name>/`` is one instance (``prefix`` defaults to
``/services/``, so ``/services/orders/10.0.0.7:8080`` for upstream discovery
name ``orders``; the rest of the key is free, e.g. a pod or host id).  Its
value says where the instance is, either as

- ``host:port`` (``[v6]:port``; ``host`` alone when the discovery has a ``port``), or
- a JSON object ``{"address": "10.0.0.7", "port": 8080, "weight": 2}``
  (``port`` optional as above, ``address`` may be ``host:port``, ``weight``
  defaults to 1).

A value in neither form is skipped and logged once.  Registering with a lease
(``etcdctl put --lease``) makes an instance that stops renewing it disappear
by itself.

``POST /v3/kv/range`` reads the prefix, then ``POST /v3/watch`` (from the
range's revision + 1, with progress notifications) streams the changes, each
applied as it arrives.  The watch is renewed every five minutes from the last
revision seen, so a silently dead connection cannot hold changes back for
long; a watch cancelled because that revision was compacted reads the prefix
again.  Failures keep the last known instances and are retried (range first)
with a backoff of at most ``refresh`` seconds.  etcd authentication is not
supported; put the gateway's etcd on a trusted network or behind TLS.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from txgateway.config.model import DiscoveryConfig, UpstreamServer
from txgateway.config.schema import split_host_port
from txgateway.observability.metrics import GatewayMetrics
from txgateway.upstream.discovery._http import APIError, RegistryClient, Reply
from txgateway.upstream.discovery.listwatch import ListWatchSource

__all__ = ["EtcdSource", "parse_instance", "prefix_end"]

#: Seconds for a range, and for a watch's response head.
REQUEST_TIMEOUT = 30.0
#: Seconds one watch stream is kept before it is renewed from the last revision.
WATCH_RENEW = 300.0


class _Compacted(Exception):
    """The watch's start revision is compacted away: read the prefix again."""


def prefix_end(prefix: bytes) -> bytes:
    """etcd's ``range_end`` for every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def parse_instance(value: bytes, port: int | None) -> UpstreamServer | None:
    """The instance a key's value describes (see the module docstring); None if it does not."""
    try:
        text = value.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    weight = 1
    number: object = None
    if text.startswith("{"):
        try:
            document = json.loads(text)
        except ValueError:
            return None
        if not isinstance(document, dict):
            return None
        address = document.get("address", document.get("host"))
        number = document.get("port")
        weight = document.get("weight", 1)
        if not isinstance(address, str) or not isinstance(weight, int) or isinstance(weight, bool) or weight < 1:
            return None
        if number is not None and (not isinstance(number, int) or isinstance(number, bool)):
            return None
        text = address.strip()
    if number is None:
        try:
            host, number = split_host_port(text, need_host=True, allow_port_zero=False)
        except ValueError:
            host, number = text, port
    else:
        host = text
    host = host.strip("[]")
    if not host or not isinstance(number, int) or not 0 < number < 65536 or any(c in host for c in " /?#@"):
        return None
    return UpstreamServer(host, number, weight)


class EtcdSource(ListWatchSource):
    kind = "etcd"

    def __init__(
        self,
        upstream: str,
        config: DiscoveryConfig,
        clock: IReactorTime,
        metrics: GatewayMetrics | None = None,
        *,
        reactor: Any = None,
    ) -> None:
        super().__init__(upstream, config, clock, metrics)
        self._reactor = reactor
        options = config.options
        self.url = str(options.get("url") or "http://127.0.0.1:2379").rstrip("/")
        self.key = f"{options.get('prefix') or '/services/'}{config.name}/".encode()
        #: Key -> value under the prefix, as last read or watched.
        self.values: dict[bytes, bytes] = {}
        #: The revision the instances are known at.
        self.revision = 0
        #: Values already reported as unusable (logged once each).
        self._reported: set[tuple[bytes, bytes]] = set()

    def _begin(self) -> None:
        if self._client is None:
            self._client = RegistryClient(self._reactor, self.clock)
        self._read()

    def _span(self) -> dict[str, str]:
        return {"key": _b64(self.key), "range_end": _b64(prefix_end(self.key))}

    # -- range ------------------------------------------------------------------

    def _read(self) -> None:
        if not self.running or self._client is None:
            return
        d = self._call = self._client.document(
            "POST", f"{self.url}/v3/kv/range", body=self._span(), timeout=REQUEST_TIMEOUT
        )
        d.addCallback(self._ranged).addErrback(self._failed)

    def _ranged(self, reply: Reply) -> None:
        if not self.running:
            return
        document = reply.document
        if reply.status != 200 or not isinstance(document, dict):
            raise APIError(f"range: HTTP {reply.status}{_error(document)}", reply.status)
        self.values = {
            base64.b64decode(kv["key"]): base64.b64decode(kv.get("value", ""))
            for kv in document.get("kvs") or []
            if isinstance(kv, dict) and "key" in kv
        }
        self.revision = int((document.get("header") or {}).get("revision") or 0)
        self._publish()
        self._watch()

    # -- watch ------------------------------------------------------------------

    def _open_watch(self, client: RegistryClient) -> Deferred[int]:
        request = {
            "create_request": {**self._span(), "start_revision": str(self.revision + 1), "progress_notify": True}
        }
        return client.stream(
            "POST",
            f"{self.url}/v3/watch",
            self._message,
            body=request,
            connect_timeout=REQUEST_TIMEOUT,
            idle=WATCH_RENEW,
        )

    def _message(self, message: Any) -> None:
        if not isinstance(message, dict):
            raise APIError(f"unexpected watch message {message!r:.200}")
        if "error" in message:
            raise APIError(f"watch: {_error(message)}")
        result = message.get("result") or {}
        if result.get("compact_revision") or result.get("canceled"):
            raise _Compacted(str(result.get("cancel_reason") or f"compacted at {result.get('compact_revision')}"))
        changed = False
        for event in result.get("events") or []:
            kv = event.get("kv") or {}
            if "key" not in kv:
                continue
            key = base64.b64decode(kv["key"])
            if event.get("type") == "DELETE":
                changed = self.values.pop(key, None) is not None or changed
            else:
                self.values[key] = base64.b64decode(kv.get("value", ""))
                changed = True
        revision = (result.get("header") or {}).get("revision")
        if revision:
            self.revision = max(self.revision, int(revision))
        if changed:
            self._publish()

    def _position_lost(self, failure: Failure) -> bool:
        if not failure.check(_Compacted):
            return False
        self.log.info(
            "etcd discovery of upstream {upstream}: revision {revision} compacted, reading the prefix again",
            upstream=self.upstream,
            revision=self.revision,
        )
        return True

    def _publish(self) -> None:
        servers = []
        for key, value in sorted(self.values.items()):
            server = parse_instance(value, self.config.port)
            if server is not None:
                servers.append(server)
            elif (key, value) not in self._reported:
                if len(self._reported) >= 1024:
                    self._reported.clear()
                self._reported.add((key, value))
                self.log.warn(
                    "etcd discovery of upstream {upstream}: skipping {key}: {value!r} is neither host:port nor"
                    ' {{"address": ..., "port": ...}}',
                    upstream=self.upstream,
                    key=key.decode("utf-8", "replace"),
                    value=value[:200].decode("utf-8", "replace"),
                )
        self._found(servers)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _error(document: object) -> str:
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict):
            return f": {error.get('message') or error}"
        if document.get("message"):
            return f": {document['message']}"
        if isinstance(error, str):
            return f": {error}"
    return ""
