"""``discovery.type: kubernetes``: a Service's EndpointSlices, listed then watched.

The gateway lists ``discovery.k8s.io/v1`` EndpointSlices labelled
``kubernetes.io/service-name=<name>`` in ``namespace``, then watches them from
the list's ``resourceVersion`` (with bookmarks), applying each event as it
arrives.  A watch the API server ends (``timeoutSeconds``) is resumed from the
last version seen; ``410 Gone`` (the version is too old, as a status or as an
ERROR event) re-lists.  Any other failure counts as an outage: the last
known instances stay and the list is retried with a backoff of at most
``refresh`` seconds.

Which endpoints are instances: those whose ``ready`` condition is not false
(unknown counts as ready, as the API says).  When none is ready but some are
still ``serving`` while terminating, those are used rather than nothing (as
kube-proxy does).  An endpoint's first address is used; ``port_name`` picks
the slice port of that name, else ``port`` is used as given, else the slice's
only port.

In a pod everything defaults to the pod's own service account: the API at
``https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT``, the token and CA
in /var/run/secrets/kubernetes.io/serviceaccount/ (the token is read again for
every request: kubelet rotates it), the namespace the pod runs in.  ``url``,
``token_path``, ``ca_path`` and ``namespace`` override them (e.g. ``url:
http://127.0.0.1:8001`` behind ``kubectl proxy``).  The service account needs
``list`` and ``watch`` on ``endpointslices.discovery.k8s.io``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from txgateway.config.model import DiscoveryConfig, UpstreamServer
from txgateway.observability.metrics import GatewayMetrics
from txgateway.upstream.discovery._http import APIError, RegistryClient, Reply, load_ca
from txgateway.upstream.discovery.listwatch import ListWatchSource

__all__ = ["SERVICE_ACCOUNT", "KubernetesSource", "endpoint_servers"]

SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
#: Seconds the API server keeps one watch open (it then ends it cleanly).
WATCH_SECONDS = 300
#: A watch silent this long past its timeout is presumed dead and resumed.
WATCH_IDLE = WATCH_SECONDS + 30
#: Seconds for a list, and for a watch's response head.
REQUEST_TIMEOUT = 30.0


class _Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class KubernetesSource(ListWatchSource):
    kind = "kubernetes"

    def __init__(
        self,
        upstream: str,
        config: DiscoveryConfig,
        clock: IReactorTime,
        metrics: GatewayMetrics | None = None,
        *,
        reactor: Any = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(upstream, config, clock, metrics)
        self._reactor = reactor
        self._environ = environ if environ is not None else os.environ
        options = config.options
        self.token_path = str(options.get("token_path") or f"{SERVICE_ACCOUNT}/token")
        self.ca_path = str(options.get("ca_path") or f"{SERVICE_ACCOUNT}/ca.crt")
        self.port_name = options.get("port_name")
        self._namespace = options.get("namespace")
        self._url = options.get("url")
        #: EndpointSlices by name, as last listed or watched.
        self.slices: dict[str, Mapping[str, Any]] = {}
        self.resource_version = ""

    @property
    def namespace(self) -> str:
        if self._namespace is not None:
            return str(self._namespace)
        try:
            with open(f"{SERVICE_ACCOUNT}/namespace") as file:
                return file.read().strip() or "default"
        except OSError:
            return "default"

    def api_url(self) -> str | None:
        if self._url is not None:
            return str(self._url).rstrip("/")
        host = self._environ.get("KUBERNETES_SERVICE_HOST")
        port = self._environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            return None
        return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"

    def _headers(self) -> dict[str, str]:
        try:
            with open(self.token_path) as file:
                token = file.read().strip()
        except OSError:
            return {}
        return {"authorization": f"Bearer {token}"} if token else {}

    def _slices_url(self, **query: str) -> str:
        base = self.api_url()
        path = f"/apis/discovery.k8s.io/v1/namespaces/{quote(self.namespace, safe='')}/endpointslices"
        selector = {"labelSelector": f"kubernetes.io/service-name={self.config.name}"}
        return f"{base}{path}?{urlencode({**selector, **query})}"

    # -- lifecycle ------------------------------------------------------------

    def _connect(self) -> RegistryClient:
        if self._client is None:
            url = self.api_url()
            trust = None
            if url is not None and url.startswith("https:") and os.path.exists(self.ca_path):
                trust = load_ca(self.ca_path)
            self._client = RegistryClient(self._reactor, self.clock, trust)
        return self._client

    # -- list -----------------------------------------------------------------

    def _read(self) -> None:
        if self.api_url() is None:
            self._failed(Failure(APIError("no API server: set discovery.url, or run in a pod")))
            return
        try:
            client = self._connect()
        except (OSError, ValueError) as error:
            self._failed(Failure(APIError(f"cannot read the CA {self.ca_path}: {error}")))
            return
        d = self._call = client.document("GET", self._slices_url(), headers=self._headers(), timeout=REQUEST_TIMEOUT)
        d.addCallback(self._listed).addErrback(self._failed)

    def _listed(self, reply: Reply) -> None:
        if reply.status != 200 or not isinstance(reply.document, dict):
            raise APIError(f"listing EndpointSlices: HTTP {reply.status}{_message(reply.document)}", reply.status)
        items = reply.document.get("items") or []
        self.slices = {_name(item): item for item in items if isinstance(item, dict)}
        self.resource_version = str((reply.document.get("metadata") or {}).get("resourceVersion") or "")
        self._publish()
        self._watch()

    # -- watch ----------------------------------------------------------------

    def _open_watch(self, client: RegistryClient) -> Deferred[int]:
        url = self._slices_url(
            watch="1",
            resourceVersion=self.resource_version,
            allowWatchBookmarks="true",
            timeoutSeconds=str(WATCH_SECONDS),
        )
        return client.stream(
            "GET", url, self._event, headers=self._headers(), connect_timeout=REQUEST_TIMEOUT, idle=WATCH_IDLE
        )

    def _event(self, event: Any) -> None:
        if not isinstance(event, dict):
            raise APIError(f"unexpected watch event {event!r:.200}")
        kind = event.get("type")
        item = event.get("object")
        if not isinstance(item, dict):
            raise APIError(f"watch event {kind} without an object")
        if kind == "ERROR":
            if item.get("code") == 410:
                raise _Gone(str(item.get("message") or "resourceVersion too old"))
            raise APIError(f"watch error{_message(item)}", item.get("code"))
        version = (item.get("metadata") or {}).get("resourceVersion")
        if version:
            self.resource_version = str(version)
        if kind == "BOOKMARK":
            return
        if kind in ("ADDED", "MODIFIED"):
            self.slices[_name(item)] = item
        elif kind == "DELETED":
            self.slices.pop(_name(item), None)
        else:
            raise APIError(f"unknown watch event type {kind!r}")
        self._publish()

    def _position_lost(self, failure: Failure) -> bool:
        if not (failure.check(_Gone) or (isinstance(failure.value, APIError) and failure.value.status == 410)):
            return False
        self.log.info(
            "kubernetes discovery of upstream {upstream}: resourceVersion {version} expired, listing again",
            upstream=self.upstream,
            version=self.resource_version,
        )
        return True

    def _publish(self) -> None:
        self._found(endpoint_servers(self.slices.values(), self.config.port, self.port_name))


def endpoint_servers(slices: Any, port: int | None = None, port_name: object = None) -> list[UpstreamServer]:
    """The instances EndpointSlices describe: ready endpoints, else serving terminating ones."""
    ready: list[UpstreamServer] = []
    terminating: list[UpstreamServer] = []
    for item in sorted(slices, key=_name):
        number = _slice_port(item.get("ports") or [], port, port_name)
        if number is None:
            continue
        for endpoint in item.get("endpoints") or []:
            addresses = endpoint.get("addresses") or []
            if not addresses:
                continue
            server = UpstreamServer(str(addresses[0]), number)
            conditions = endpoint.get("conditions") or {}
            if conditions.get("ready") is not False:
                ready.append(server)
            elif conditions.get("serving") is True and conditions.get("terminating") is True:
                terminating.append(server)
    return ready or terminating


def _slice_port(ports: list[Any], port: int | None, port_name: object) -> int | None:
    if port_name is not None:
        for entry in ports:
            if entry.get("name") == port_name and isinstance(entry.get("port"), int):
                return int(entry["port"])
        return None
    if port is not None:
        return port
    numbers = [entry.get("port") for entry in ports if isinstance(entry.get("port"), int)]
    return numbers[0] if len(numbers) == 1 else None


def _name(item: Mapping[str, Any]) -> str:
    return str((item.get("metadata") or {}).get("name") or "")


def _message(document: object) -> str:
    if isinstance(document, dict) and document.get("message"):
        return f": {document['message']}"
    return ""
