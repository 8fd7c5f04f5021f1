"""Service discovery against real servers, and end to end through a real gateway.

- **DNS**: twisted.names serves :class:`tests.test_discovery_dns.Zone` as a
  real DNS server on a loopback UDP port; the gateway's resolver
  (``discovery.resolver``) asks it over the wire.
- **etcd**: Debian's ``etcd`` (``/usr/bin/etcd``, package etcd-server),
  started per test on free loopback ports with a temporary data directory and
  always killed; keys are put through its v3 JSON gateway.  Missing etcd
  skips, or fails when the ``CI`` environment variable is set.
- **Kubernetes and Consul** are *replayed*: a local twisted.web server
  (:class:`RecordedAPI`) answers with responses in the exact shape the
  Kubernetes API server (EndpointSlice list and watch streams, a 410 Gone
  both as a watch ERROR event and as a status) and Consul (health service
  entries, ``X-Consul-Index``, a blocking query held until the set changes)
  send.  The Kubernetes one speaks HTTPS with a CA of the test's own, as the
  in-cluster service account's ``ca.crt`` would be.
- **End to end**: a real ``twistd -n txgateway`` whose upstream is
  discovered by DNS SRV: traffic moves to the new instance when the answer
  changes (no reload), stays on the last known instance through a DNS
  outage, and follows the records again once the server is back.

Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import tempfile
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.ssl import PrivateCertificate
from twisted.names import dns, server
from twisted.python.failure import Failure
from twisted.trial.unittest import FailTest, TestCase
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from tests.integration.harness import (
    LOCALHOST,
    EchoUpstream,
    GatewayProcess,
    free_port,
    parse_responses,
    raw_exchange,
    reactor,
    sleep,
)
from tests.test_discovery_dns import Zone
from tests.tools import missing
from txgateway.config.model import DiscoveryConfig, UpstreamConfig
from txgateway.observability.metrics import GatewayMetrics
from txgateway.upstream.discovery.consul import ConsulSource
from txgateway.upstream.discovery.dns import DNSSource
from txgateway.upstream.discovery.etcd import EtcdSource
from txgateway.upstream.discovery.kubernetes import KubernetesSource
from txgateway.upstream.discovery.source import InstanceSource
from txgateway.upstream.upstream import Upstream

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


async def eventually(predicate: Callable[[], bool], what: str, within: float = 5.0) -> None:
    deadline = reactor.seconds() + within
    while not predicate():
        if reactor.seconds() > deadline:
            raise FailTest(f"not within {within}s: {what}")
        await sleep(0.02)


def fed(source: InstanceSource, case: TestCase) -> Upstream:
    """An upstream fed by ``source``; the source is stopped at cleanup."""
    upstream = Upstream(UpstreamConfig(name=source.upstream, discovery=source.config), None, reactor)  # type: ignore[arg-type]
    source.feed(upstream)
    case.addCleanup(source.stop)
    return upstream


def addresses(upstream: Upstream) -> list[str]:
    return [i.address for i in upstream.instances]


def sample(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


# -- DNS -----------------------------------------------------------------------------


class DNSServer:
    """``zone`` served by twisted.names on a loopback UDP port."""

    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.port = 0
        self._listening: Any = None

    def start(self, port: int = 0) -> int:
        factory = server.DNSServerFactory(authorities=[self.zone])
        factory.noisy = False
        self._listening = reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface=LOCALHOST)
        self.port = self._listening.getHost().port
        return self.port

    def stop(self) -> Deferred[Any]:
        listening, self._listening = self._listening, None
        return maybeDeferred(listening.stopListening) if listening is not None else succeed(None)


class DNSDiscoveryTests(TestCase):
    timeout = 30

    def serve(self, zone: Zone) -> DNSServer:
        dns_server = DNSServer(zone)
        dns_server.start()
        self.addCleanup(dns_server.stop)
        return dns_server

    def source(self, name: str, port: int | None, resolver: int, **options: object) -> tuple[DNSSource, Upstream]:
        config = DiscoveryConfig(
            type="dns",
            name=name,
            port=port,
            refresh=0.2,
            options={
                "record_type": "SRV" if name.startswith("_") else "A",
                "resolver": f"{LOCALHOST}:{resolver}",
                **options,
            },
        )
        source = DNSSource("svc", config, reactor, GatewayMetrics(), reactor=reactor)
        return source, fed(source, self)

    async def test_address_records_follow_changes(self) -> None:
        zone = Zone()
        zone.a("svc.test", "192.0.2.1", "192.0.2.2", ttl=1)
        dns_server = self.serve(zone)
        source, upstream = self.source("svc.test", 8080, dns_server.port)
        source.start()
        await eventually(lambda: addresses(upstream) == ["192.0.2.1:8080", "192.0.2.2:8080"], "first answer")
        kept = upstream.instances[1]
        zone.a("svc.test", "192.0.2.2", "192.0.2.3", ttl=1)
        await eventually(lambda: addresses(upstream) == ["192.0.2.2:8080", "192.0.2.3:8080"], "the change")
        self.assertIs(upstream.instances[0], kept)

    async def test_srv_records_give_ports_and_weights(self) -> None:
        zone = Zone()
        zone.srv(
            "_http._tcp.svc.test", (10, 3, 9001, "a.svc.test"), (10, 1, 9002, "b.svc.test"), (20, 1, 9003, "c.svc.test")
        )
        zone.a("a.svc.test", "127.0.0.1")
        zone.a("b.svc.test", "127.0.0.1")
        dns_server = self.serve(zone)
        source, upstream = self.source("_http._tcp.svc.test", None, dns_server.port)
        source.start()
        await eventually(lambda: len(upstream.instances) == 2, "first answer")
        self.assertEqual(
            [(i.address, i.weight) for i in upstream.instances], [("127.0.0.1:9001", 3), ("127.0.0.1:9002", 1)]
        )

    async def test_outage_keeps_the_last_instances_and_recovers(self) -> None:
        zone = Zone()
        zone.a("svc.test", "192.0.2.1")
        dns_server = self.serve(zone)
        source, upstream = self.source("svc.test", 8080, dns_server.port)
        source.start()
        await eventually(lambda: addresses(upstream) == ["192.0.2.1:8080"], "first answer")
        port = dns_server.port
        await dns_server.stop()
        await eventually(lambda: source.failing_since is not None, "the outage noticed", within=6.0)
        self.assertEqual(addresses(upstream), ["192.0.2.1:8080"])
        zone.a("svc.test", "192.0.2.9")
        dns_server.start(port)
        await eventually(lambda: source.failing_since is None, "recovery", within=8.0)
        await eventually(lambda: addresses(upstream) == ["192.0.2.9:8080"], "the new answer")


# -- etcd ------------------------------------------------------------------------------


class _Ended(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        self.ended.callback(None)


class EtcdServer:
    """A throwaway single-member etcd on loopback ports; ``kill()`` and ``start()`` again keep its data."""

    def __init__(self) -> None:
        if not os.path.exists(ETCD):
            raise missing("etcd is not installed (Debian package etcd-server; `make test` installs it)")
        self.client_port = free_port()
        self.peer_port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="txgateway-etcd-"))
        self._process: Any = None
        self._protocol: _Ended | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.client_port}"

    @property
    def running(self) -> bool:
        return self._protocol is not None and self._protocol.reason is None

    async def start(self, timeout: float = 20.0) -> EtcdServer:
        peer = f"http://{LOCALHOST}:{self.peer_port}"
        args = [
            ETCD, "--name", "it", "--data-dir", str(self.directory / "data"),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", f"it={peer}",
        ]  # fmt: skip
        self._protocol = _Ended()
        log_fd = os.open(self.directory / "etcd.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        try:
            self._process = reactor.spawnProcess(
                self._protocol, ETCD, args, env={"PATH": "/usr/bin:/bin"}, childFDs={0: null_fd, 1: log_fd, 2: log_fd}
            )
        finally:
            os.close(log_fd)
            os.close(null_fd)
        deadline = reactor.seconds() + timeout
        while True:
            if not self.running:
                raise FailTest(f"etcd exited: {self.log()}")
            try:
                status, _document = await self.call("/v3/kv/range", {"key": _b64("/")})
                if status == 200:
                    return self
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if reactor.seconds() > deadline:
                raise FailTest(f"etcd not up within {timeout}s: {self.log()}")
            await sleep(0.05)

    def log(self) -> str:
        try:
            return (self.directory / "etcd.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    async def call(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {LOCALHOST}:{self.client_port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        ).encode()
        raw = await raw_exchange(self.client_port, head + data, 5.0)
        [response] = parse_responses(raw, until_close=True)
        return response.status, response.json()

    async def put(self, key: str, value: str) -> None:
        status, document = await self.call("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})
        assert status == 200, document

    async def delete(self, key: str) -> None:
        status, document = await self.call("/v3/kv/deleterange", {"key": _b64(key)})
        assert status == 200, document

    async def kill(self) -> None:
        if self.running:
            self._process.signalProcess(signal.SIGKILL)
            assert self._protocol is not None
            await self._protocol.ended

    async def stop(self) -> None:
        await self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class EtcdDiscoveryTests(TestCase):
    timeout = 60

    async def etcd(self) -> EtcdServer:
        etcd = EtcdServer()
        self.addCleanup(lambda: Deferred.fromCoroutine(etcd.stop()))
        return await etcd.start()

    def source(self, etcd: EtcdServer, refresh: float = 60.0) -> tuple[EtcdSource, Upstream, GatewayMetrics]:
        metrics = GatewayMetrics()
        config = DiscoveryConfig(
            type="etcd", name="orders", port=8080, refresh=refresh, options={"url": etcd.url, "prefix": "/services/"}
        )
        source = EtcdSource("orders", config, reactor, metrics, reactor=reactor)
        return source, fed(source, self), metrics

    async def test_range_then_watch(self) -> None:
        etcd = await self.etcd()
        await etcd.put("/services/orders/a", "127.0.0.1:9001")
        await etcd.put("/services/orders/b", json.dumps({"address": "127.0.0.1", "port": 9002, "weight": 3}))
        await etcd.put("/services/ordersfoo/x", "127.0.0.1:9999")  # another service's prefix
        await etcd.put("/services/orders/c", "not an address")
        source, upstream, _ = self.source(etcd)  # refresh 60: changes must come by the watch
        source.start()
        await eventually(lambda: len(upstream.instances) == 2, "the range")
        self.assertEqual(
            [(i.address, i.weight) for i in upstream.instances], [("127.0.0.1:9001", 1), ("127.0.0.1:9002", 3)]
        )
        await etcd.put("/services/orders/d", "127.0.0.1")  # the discovery's port
        await eventually(lambda: "127.0.0.1:8080" in addresses(upstream), "a put, by the watch", within=3.0)
        await etcd.delete("/services/orders/a")
        await eventually(lambda: addresses(upstream) == ["127.0.0.1:8080", "127.0.0.1:9002"], "a delete", within=3.0)

    async def test_outage_keeps_the_last_instances(self) -> None:
        etcd = await self.etcd()
        await etcd.put("/services/orders/a", "127.0.0.1:9001")
        source, upstream, metrics = self.source(etcd, refresh=0.5)
        source.start()
        await eventually(lambda: addresses(upstream) == ["127.0.0.1:9001"], "the range")
        await etcd.kill()
        await eventually(lambda: source.failing_since is not None, "the outage noticed")
        await sleep(1.5)
        self.assertEqual(addresses(upstream), ["127.0.0.1:9001"])
        self.assertGreaterEqual(
            sample(metrics, "txgateway_discovery_refreshes_total", upstream="orders", type="etcd", result="failure"), 2
        )
        await etcd.start()
        await etcd.put("/services/orders/b", "127.0.0.1:9002")
        await eventually(lambda: addresses(upstream) == ["127.0.0.1:9001", "127.0.0.1:9002"], "recovery", within=10.0)
        self.assertIsNone(source.failing_since)


# -- replayed registries: Kubernetes, Consul (and an etcd compaction) --------------------


@dataclass
class Seen:
    method: str
    path: str
    args: dict[str, str]
    headers: dict[str, str]
    body: bytes


Step = Callable[[Request], Any]


class Stream:
    """A streamed response the test writes to: ``send(event)`` one JSON line, ``end()``."""

    def __init__(self, *first: Any, status: int = 200) -> None:
        self.first = first
        self.status = status
        self.request: Request | None = None
        self.closed: Deferred[None] = Deferred()

    def __call__(self, request: Request) -> Any:
        self.request = request
        request.setResponseCode(self.status)
        request.setHeader("content-type", "application/json")
        request.notifyFinish().addBoth(lambda _: self.closed.callback(None) if not self.closed.called else None)
        for event in self.first:
            self.send(event)
        return NOT_DONE_YET

    def send(self, event: Any) -> None:
        assert self.request is not None
        self.request.write(json.dumps(event).encode() + b"\n")

    def end(self) -> None:
        assert self.request is not None
        self.request.finish()


class Held:
    """A request held (a blocking query) until the test answers it."""

    def __init__(self) -> None:
        self.request: Request | None = None
        self.arrived: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()

    def __call__(self, request: Request) -> Any:
        self.request = request
        request.notifyFinish().addBoth(lambda _: self.closed.callback(None) if not self.closed.called else None)
        self.arrived.callback(None)
        return NOT_DONE_YET

    def answer(self, status: int, document: Any, headers: dict[str, str] | None = None) -> None:
        assert self.request is not None
        self.request.write(_write(self.request, status, document, headers))
        self.request.finish()


def reply(status: int, document: Any, headers: dict[str, str] | None = None) -> Step:
    def step(request: Request) -> bytes:
        return _write(request, status, document, headers)

    return step


def _write(request: Request, status: int, document: Any, headers: dict[str, str] | None) -> bytes:
    """Set the status and headers; the JSON body to write."""
    request.setResponseCode(status)
    request.setHeader("content-type", "application/json")
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    return json.dumps(document).encode()


class _Channel(HTTPChannel):
    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.api.channels.add(self)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        api = self.site.api  # type: ignore[attr-defined]
        api.channels.discard(self)
        if not api.channels:
            waiters, api.idle = api.idle, []
            for d in waiters:
                d.callback(None)


class RecordedAPI(Resource):
    """Answers each request with the next scripted step and records what it asked."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.script: deque[Step] = deque()
        self.seen: list[Seen] = []
        self.channels: set[_Channel] = set()
        self.idle: list[Deferred[None]] = []
        self._port: Any = None

    def then(self, *steps: Step) -> None:
        self.script.extend(steps)

    def render(self, request: Request) -> Any:
        assert request.content is not None
        self.seen.append(
            Seen(
                request.method.decode(),
                request.path.decode(),
                {k.decode(): v[-1].decode() for k, v in request.args.items()},
                {k.decode().lower(): v[-1].decode() for k, v in request.requestHeaders.getAllRawHeaders()},
                request.content.read(),
            )
        )
        if not self.script:
            return _write(request, 500, {"message": "nothing more was recorded"}, None)
        return self.script.popleft()(request)

    def listen(self, tls: PrivateCertificate | None = None) -> int:
        site = Site(self, timeout=None)
        site.protocol = _Channel  # type: ignore[assignment]
        site.api = self  # type: ignore[attr-defined]
        site.noisy = False
        if tls is not None:
            self._port = reactor.listenSSL(0, site, tls.options(), interface=LOCALHOST)
        else:
            self._port = reactor.listenTCP(0, site, interface=LOCALHOST)
        port: int = self._port.getHost().port
        return port

    async def stop(self) -> None:
        if self._port is not None:
            await self._port.stopListening()
            self._port = None
        for channel in list(self.channels):
            channel.transport.abortConnection()  # type: ignore[union-attr]
        if self.channels:
            d: Deferred[None] = Deferred()
            self.idle.append(d)
            await d


def test_ca(directory: str) -> tuple[str, PrivateCertificate]:
    """A CA (written to ``directory``/ca.crt) and a server certificate it signed for 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "txgateway test cluster CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(LOCALHOST)), x509.DNSName("kubernetes.default.svc")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    ca_path = os.path.join(directory, "ca.crt")
    with open(ca_path, "wb") as file:
        file.write(ca.public_bytes(serialization.Encoding.PEM))
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca_path, PrivateCertificate.loadPEM(pem)


# Kubernetes API server responses (discovery.k8s.io/v1), in the shape the API server sends.


def k8s_endpoint(ip: str, ready: bool = True, terminating: bool = False, node: str = "node-1") -> dict[str, Any]:
    return {
        "addresses": [ip],
        "conditions": {"ready": ready, "serving": ready or terminating, "terminating": terminating},
        "targetRef": {"kind": "Pod", "namespace": "shop", "name": f"web-{ip.replace('.', '-')}"},
        "nodeName": node,
        "zone": "zone-a",
    }


def k8s_slice(name: str, version: str, *endpoints: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "generateName": "web-",
            "namespace": "shop",
            "uid": f"uid-{name}",
            "resourceVersion": version,
            "generation": 3,
            "creationTimestamp": "2026-11-20T08:12:44Z",
            "labels": {
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": "web",
            },
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "svc-uid",
                                 "controller": True, "blockOwnerDeletion": True}],
        },
        "addressType": "IPv4",
        "endpoints": list(endpoints),
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}, {"name": "metrics", "protocol": "TCP", "port": 9100}],
    }  # fmt: skip


def k8s_list(version: str, *slices: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "EndpointSliceList",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"resourceVersion": version},
        "items": list(slices),
    }


def k8s_status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}  # fmt: skip


class KubernetesReplayTests(TestCase):
    timeout = 30

    async def test_list_watch_gone_and_relist(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        ca_path, certificate = test_ca(directory)
        token_path = os.path.join(directory, "token")
        Path(token_path).write_text("eyJhbGciOiJSUzI1NiJ9.first\n")
        api = RecordedAPI()
        port = api.listen(certificate)
        self.addCleanup(lambda: Deferred.fromCoroutine(api.stop()))

        first_watch = Stream()
        second_watch = Stream()
        last_watch = Stream()
        api.then(
            reply(200, k8s_list("1000", k8s_slice("web-7xk2p", "990", k8s_endpoint("10.1.0.1"), k8s_endpoint("10.1.0.2", ready=False)))),
            first_watch,
            reply(200, k8s_list("2000", k8s_slice("web-7xk2p", "1990", k8s_endpoint("10.1.0.2"), k8s_endpoint("10.1.0.4")))),
            second_watch,
            reply(410, k8s_status(410, "Expired", "too old resource version: 2600 (2800)")),
            reply(200, k8s_list("3000", k8s_slice("web-7xk2p", "2990", k8s_endpoint("10.1.0.5", ready=False, terminating=True)))),
            last_watch,
        )  # fmt: skip
        options = {"url": f"https://{LOCALHOST}:{port}", "namespace": "shop", "port_name": "http",
                   "token_path": token_path, "ca_path": ca_path}  # fmt: skip
        config = DiscoveryConfig(type="kubernetes", name="web", refresh=1.0, options=options)
        metrics = GatewayMetrics()
        source = KubernetesSource("web", config, reactor, metrics, reactor=reactor, environ={})
        upstream = fed(source, self)
        source.start()

        await eventually(lambda: addresses(upstream) == ["10.1.0.1:8080"], "the list: ready endpoints only")
        list_request = api.seen[0]
        self.assertEqual(list_request.path, "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices")
        self.assertEqual(list_request.args, {"labelSelector": "kubernetes.io/service-name=web"})
        self.assertEqual(list_request.headers["authorization"], "Bearer eyJhbGciOiJSUzI1NiJ9.first")

        await eventually(lambda: first_watch.request is not None, "the watch")
        first_watch.send(
            {
                "type": "MODIFIED",
                "object": k8s_slice("web-7xk2p", "1001", k8s_endpoint("10.1.0.1"), k8s_endpoint("10.1.0.2")),
            }
        )
        first_watch.send({"type": "ADDED", "object": k8s_slice("web-q9z3c", "1002", k8s_endpoint("10.1.0.3"))})
        await eventually(
            lambda: addresses(upstream) == ["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"], "watch events"
        )
        watch_request = api.seen[1]
        self.assertEqual(
            watch_request.args,
            {"labelSelector": "kubernetes.io/service-name=web", "watch": "1", "resourceVersion": "1000",
             "allowWatchBookmarks": "true", "timeoutSeconds": "300"},
        )  # fmt: skip

        # A bookmark moves the version on; the API server then says it has expired.
        Path(token_path).write_text("eyJhbGciOiJSUzI1NiJ9.rotated\n")
        first_watch.send({"type": "BOOKMARK", "object": {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                                                         "metadata": {"resourceVersion": "1500"}}})  # fmt: skip
        first_watch.send(
            {"type": "ERROR", "object": k8s_status(410, "Expired", "too old resource version: 1500 (1800)")}
        )
        await eventually(lambda: addresses(upstream) == ["10.1.0.2:8080", "10.1.0.4:8080"], "re-listed after 410")
        self.assertEqual(api.seen[2].headers["authorization"], "Bearer eyJhbGciOiJSUzI1NiJ9.rotated", "token re-read")
        await first_watch.closed

        # The server ends a watch (its timeoutSeconds): resumed from the last version.
        await eventually(lambda: second_watch.request is not None, "the second watch")
        self.assertEqual(api.seen[3].args["resourceVersion"], "2000")
        second_watch.send({"type": "DELETED", "object": k8s_slice("web-7xk2p", "2500")})
        await eventually(lambda: addresses(upstream) == [], "the slice deleted: no instances")
        second_watch.send({"type": "ADDED", "object": k8s_slice("web-7xk2p", "2600", k8s_endpoint("10.1.0.4"))})
        await eventually(lambda: addresses(upstream) == ["10.1.0.4:8080"], "added again")
        second_watch.end()

        # Resuming at 2600 is refused (410 as a status this time): listed again.  The only
        # endpoint left is terminating but still serving: used rather than nothing.
        await eventually(lambda: addresses(upstream) == ["10.1.0.5:8080"], "watch, 410, list")
        await eventually(lambda: last_watch.request is not None, "the last watch")
        self.assertEqual(
            [s.args.get("resourceVersion") for s in api.seen], [None, "1000", None, "2000", "2600", None, "3000"]
        )
        last_watch.send({"type": "MODIFIED", "object": k8s_slice("web-7xk2p", "3090", k8s_endpoint("10.1.0.6"),
                                                                 k8s_endpoint("10.1.0.5", ready=False, terminating=True))})  # fmt: skip
        await eventually(
            lambda: addresses(upstream) == ["10.1.0.6:8080"], "a ready endpoint again: the terminating one is out"
        )
        self.assertIsNone(source.failing_since, "410 is not an outage")
        self.assertEqual(
            sample(metrics, "txgateway_discovery_refreshes_total", upstream="web", type="kubernetes", result="failure"),
            0,
        )
        await source.stop()
        await last_watch.closed

    async def test_api_errors_keep_the_last_instances(self) -> None:
        api = RecordedAPI()
        port = api.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(api.stop()))
        api.then(
            reply(200, k8s_list("10", k8s_slice("web-a", "9", k8s_endpoint("10.1.0.1")))),
            reply(403, k8s_status(403, "Forbidden", 'endpointslices.discovery.k8s.io is forbidden: User "system:serviceaccount:shop:gw" cannot watch')),
            reply(500, k8s_status(500, "InternalError", "etcdserver: request timed out")),
            reply(200, k8s_list("20", k8s_slice("web-a", "19", k8s_endpoint("10.1.0.2")))),
            Stream(),
        )  # fmt: skip
        config = DiscoveryConfig(type="kubernetes", name="web", port=8080, refresh=0.5,
                                 options={"url": f"http://{LOCALHOST}:{port}", "namespace": "shop",
                                          "token_path": os.path.join(self.mktemp(), "absent")})  # fmt: skip
        metrics = GatewayMetrics()
        source = KubernetesSource("web", config, reactor, metrics, reactor=reactor, environ={})
        upstream = fed(source, self)
        source.start()
        await eventually(lambda: source.failing_since is not None, "the 403")
        self.assertEqual(addresses(upstream), ["10.1.0.1:8080"])
        self.assertNotIn("authorization", api.seen[0].headers, "no token file: no Authorization")
        await eventually(lambda: addresses(upstream) == ["10.1.0.2:8080"], "recovery", within=10)
        self.assertIsNone(source.failing_since)
        self.assertEqual(
            sample(metrics, "txgateway_discovery_refreshes_total", upstream="web", type="kubernetes", result="failure"),
            2,
        )


def consul_entry(
    node: str, address: str, port: int, passing: int = 1, tags: tuple[str, ...] = ("v2",)
) -> dict[str, Any]:
    """One /v1/health/service entry, as Consul 1.x sends it."""
    return {
        "Node": {"ID": f"id-{node}", "Node": node, "Address": address, "Datacenter": "dc1",
                 "TaggedAddresses": {"lan": address, "wan": address}, "Meta": {"consul-network-segment": ""},
                 "CreateIndex": 12, "ModifyIndex": 14},
        "Service": {"ID": f"api-{node}", "Service": "api", "Tags": list(tags), "Address": "", "Meta": None,
                    "Port": port, "Weights": {"Passing": passing, "Warning": 1}, "EnableTagOverride": False,
                    "CreateIndex": 20, "ModifyIndex": 20},
        "Checks": [{"Node": node, "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "passing",
                    "Output": "Agent alive and reachable", "ServiceID": "", "ServiceName": ""},
                   {"Node": node, "CheckID": f"service:api-{node}", "Name": "HTTP /health", "Status": "passing",
                    "Output": "HTTP GET: 200 OK", "ServiceID": f"api-{node}", "ServiceName": "api"}],
    }  # fmt: skip


class ConsulReplayTests(TestCase):
    timeout = 30

    async def test_blocking_queries(self) -> None:
        api = RecordedAPI()
        port = api.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(api.stop()))
        blocking = Held()
        last = Held()
        api.then(
            reply(200, [consul_entry("n1", "10.2.0.1", 8080), consul_entry("n2", "10.2.0.2", 8080, passing=3)],
                  {"X-Consul-Index": "40", "X-Consul-Knownleader": "true", "X-Consul-Lastcontact": "0"}),
            blocking,
            reply(500, "rpc error making call: No cluster leader"),
            reply(200, [consul_entry("n3", "10.2.0.3", 8080)], {"X-Consul-Index": "45"}),
            last,
        )  # fmt: skip
        config = DiscoveryConfig(type="consul", name="api", refresh=1.0,
                                 options={"url": f"http://{LOCALHOST}:{port}", "datacenter": "dc1", "tag": "v2",
                                          "token": "0b5c4a2e-acl"})  # fmt: skip
        metrics = GatewayMetrics()
        source = ConsulSource("api", config, reactor, metrics, reactor=reactor)
        upstream = fed(source, self)
        source.start()
        await eventually(lambda: len(upstream.instances) == 2, "the first answer")
        self.assertEqual(
            [(i.address, i.weight) for i in upstream.instances], [("10.2.0.1:8080", 1), ("10.2.0.2:8080", 3)]
        )
        first = api.seen[0]
        self.assertEqual(
            (first.path, first.args), ("/v1/health/service/api", {"passing": "true", "dc": "dc1", "tag": "v2"})
        )
        self.assertEqual(first.headers["x-consul-token"], "0b5c4a2e-acl")

        await blocking.arrived
        self.assertEqual(api.seen[1].args, {"passing": "true", "index": "40", "wait": "300s", "dc": "dc1", "tag": "v2"})
        await sleep(0.3)
        self.assertEqual(len(api.seen), 2, "the query blocks: no polling")
        blocking.answer(200, [consul_entry("n1", "10.2.0.1", 8080), consul_entry("n2", "10.2.0.2", 8080, passing=3),
                              consul_entry("n4", "10.2.0.4", 8081)], {"X-Consul-Index": "41"})  # fmt: skip
        await eventually(lambda: len(upstream.instances) == 3, "the change, as soon as Consul answers", within=1.0)

        # The next query fails (no leader): the instances stay; the retry starts over without an index.
        await eventually(lambda: source.failing_since is not None, "the failure")
        self.assertEqual(api.seen[2].args["index"], "41")
        self.assertEqual(len(upstream.instances), 3)
        await eventually(lambda: addresses(upstream) == ["10.2.0.3:8080"], "recovery")
        self.assertNotIn("index", api.seen[3].args)
        self.assertIsNone(source.failing_since)
        await last.arrived
        self.assertEqual(api.seen[4].args["index"], "45")
        self.assertEqual(
            sample(metrics, "txgateway_discovery_refreshes_total", upstream="api", type="consul", result="success"), 3
        )
        self.assertEqual(
            sample(metrics, "txgateway_discovery_refreshes_total", upstream="api", type="consul", result="failure"), 1
        )
        await source.stop()
        await last.closed


class EtcdReplayTests(TestCase):
    """A watch cancelled for compaction (recorded from etcd 3.4's JSON gateway) reads the prefix again."""

    timeout = 30

    async def test_compacted_watch_ranges_again(self) -> None:
        api = RecordedAPI()
        port = api.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(api.stop()))
        header = {"cluster_id": "15118495548433857066", "member_id": "13668033151171901709", "raft_term": "2"}
        kv = {"key": _b64("/services/orders/a"), "create_revision": "2", "mod_revision": "7", "version": "1",
              "value": _b64("127.0.0.1:9001")}  # fmt: skip
        kv2 = {**kv, "key": _b64("/services/orders/b"), "value": _b64("127.0.0.1:9002"), "mod_revision": "11"}
        last = Stream({"result": {"header": {**header, "revision": "12"}, "created": True}})
        api.then(
            reply(200, {"header": {**header, "revision": "7"}, "kvs": [kv], "count": "1"}),
            Stream({"result": {"header": {**header, "revision": "9"}, "created": True}},
                   {"result": {"header": header, "canceled": True, "compact_revision": "9"}}),
            reply(200, {"header": {**header, "revision": "12"}, "kvs": [kv, kv2], "count": "2"}),
            last,
        )  # fmt: skip
        config = DiscoveryConfig(
            type="etcd",
            name="orders",
            refresh=1.0,
            options={"url": f"http://{LOCALHOST}:{port}", "prefix": "/services/"},
        )
        source = EtcdSource("orders", config, reactor, GatewayMetrics(), reactor=reactor)
        upstream = fed(source, self)
        source.start()
        await eventually(lambda: addresses(upstream) == ["127.0.0.1:9001", "127.0.0.1:9002"], "ranged again")
        # The new watch goes out after the range's answer is applied: wait for it.
        await eventually(lambda: len(api.seen) >= 4, "watched again")
        self.assertEqual([s.path for s in api.seen], ["/v3/kv/range", "/v3/watch", "/v3/kv/range", "/v3/watch"])
        self.assertEqual(
            json.loads(api.seen[0].body), {"key": _b64("/services/orders/"), "range_end": _b64("/services/orders0")}
        )
        watch = json.loads(api.seen[1].body)["create_request"]
        self.assertEqual((watch["start_revision"], watch["progress_notify"]), ("8", True))
        self.assertEqual(json.loads(api.seen[3].body)["create_request"]["start_revision"], "13")
        self.assertIsNone(source.failing_since)
        await source.stop()
        await last.closed


# -- end to end --------------------------------------------------------------------------------


class EndToEndDNSTests(TestCase):
    """A real gateway whose upstream is found by DNS SRV, served by a real DNS server."""

    timeout = 90

    async def get(self, gateway: GatewayProcess, path: str) -> Any:
        raw = await raw_exchange(
            gateway.port, f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode(), 5.0
        )
        [response] = parse_responses(raw, until_close=True)
        return response

    async def admin(self, gateway: GatewayProcess, path: str) -> Any:
        raw = await raw_exchange(
            gateway.admin_port, f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n".encode(), 5.0
        )
        [response] = parse_responses(raw, until_close=True)
        return response

    async def test_traffic_follows_dns_and_survives_its_outage(self) -> None:
        a, b = EchoUpstream(), EchoUpstream()
        port_a, port_b = a.listen(0), b.listen(0)
        self.addCleanup(a.stop)
        self.addCleanup(b.stop)
        zone = Zone()
        zone.srv("_http._tcp.svc.test", (0, 1, port_a, "a.svc.test"), ttl=1)
        zone.a("a.svc.test", LOCALHOST, ttl=1)
        zone.a("b.svc.test", LOCALHOST, ttl=1)
        dns_server = DNSServer(zone)
        dns_port = dns_server.start()
        self.addCleanup(dns_server.stop)
        gateway = GatewayProcess(
            {
                "upstreams": {
                    "svc": {
                        "discovery": {
                            "type": "dns",
                            "name": "_http._tcp.svc.test",
                            "resolver": f"{LOCALHOST}:{dns_port}",
                            "refresh": 0.3,
                        },
                        "timeouts": {"connect": 1, "request": 5},
                    }
                },
                "routes": [{"name": "svc", "match": {"path": "/svc/*"}, "upstream": "svc"}],
            }
        )
        await gateway.start()
        self.addCleanup(gateway.stop)

        async def served(count: int) -> Counter[str]:
            """Who answered ``count`` requests (all must succeed)."""
            before = {"a": len(a.requests), "b": len(b.requests)}
            for n in range(count):
                response = await self.get(gateway, f"/svc/{n}")
                self.assertEqual(response.status, 200, response.body)
            return Counter({"a": len(a.requests) - before["a"], "b": len(b.requests) - before["b"]})

        async def moved_to(name: str, server: EchoUpstream) -> None:
            deadline = reactor.seconds() + 10
            while True:
                seen = len(server.requests)
                response = await self.get(gateway, "/svc/probe")
                self.assertEqual(response.status, 200, response.body)
                if len(server.requests) > seen:
                    return
                if reactor.seconds() > deadline:
                    self.fail(f"traffic did not move to {name}:\n{gateway.log()}")
                await sleep(0.05)

        await moved_to("a", a)
        self.assertEqual(await served(10), Counter({"a": 10, "b": 0}))

        # The answer changes: traffic moves to b, without a reload.
        zone.srv("_http._tcp.svc.test", (0, 1, port_b, "b.svc.test"), ttl=1)
        await moved_to("b", b)
        self.assertEqual(await served(10), Counter({"a": 0, "b": 10}))

        # DNS goes away: the last known instance keeps serving, the outage is logged once.
        await dns_server.stop()
        await eventually(lambda: "discovery of upstream svc (dns" in gateway.log(), "the outage logged", within=8)
        await sleep(1.0)
        self.assertEqual(await served(10), Counter({"a": 0, "b": 10}))
        self.assertEqual(
            len(re.findall(r"failing, keeping the 1 last known instances", gateway.log())), 1, gateway.log()
        )
        metrics = await self.admin(gateway, "/metrics")
        self.assertEqual(metrics.status, 200)
        text = metrics.body.decode()
        failures = re.search(r'txgateway_discovery_refreshes_total\{[^}]*result="failure"[^}]*\} (\S+)', text)
        self.assertIsNotNone(failures, text[:2000])
        assert failures is not None
        self.assertGreaterEqual(float(failures.group(1)), 1.0)
        self.assertRegex(text, r'txgateway_discovery_instances\{upstream="svc"\} 1\.0')
        ready = await self.admin(gateway, "/ready")
        self.assertEqual(ready.status, 200, "discovery does not make the gateway unready")

        # DNS is back with a: traffic follows it again.
        zone.srv("_http._tcp.svc.test", (0, 1, port_a, "a.svc.test"), ttl=1)
        dns_server.start(dns_port)
        await moved_to("a", a)
        self.assertEqual(await served(10), Counter({"a": 10, "b": 0}))
        self.assertIn("recovered", gateway.log())
        self.assertNotIn("Traceback", gateway.log())


class EndToEndEtcdTests(TestCase):
    """A real gateway whose upstream is registered in a real etcd."""

    timeout = 90

    async def test_traffic_follows_etcd_and_survives_its_outage(self) -> None:
        etcd = EtcdServer()
        self.addCleanup(lambda: Deferred.fromCoroutine(etcd.stop()))
        await etcd.start()
        a, b = EchoUpstream(), EchoUpstream()
        port_a, port_b = a.listen(0), b.listen(0)
        self.addCleanup(a.stop)
        self.addCleanup(b.stop)
        await etcd.put("/services/orders/pod-a", f"{LOCALHOST}:{port_a}")
        gateway = GatewayProcess(
            {
                "upstreams": {
                    "orders": {
                        "discovery": {"type": "etcd", "name": "orders", "url": etcd.url, "refresh": 0.5},
                        "timeouts": {"connect": 1, "request": 5},
                    }
                },
                "routes": [{"name": "orders", "match": {"path": "/orders/*"}, "upstream": "orders"}],
            }
        )
        await gateway.start()
        self.addCleanup(gateway.stop)

        async def status(path: str) -> int:
            raw = await raw_exchange(
                gateway.port, f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
            )
            [response] = parse_responses(raw, until_close=True)
            code: int = response.status
            return code

        async def only(server: EchoUpstream, other: EchoUpstream, count: int = 10) -> None:
            before = len(other.requests)
            for n in range(count):
                self.assertEqual(await status(f"/orders/{n}"), 200)
            self.assertEqual(len(other.requests), before)

        deadline = reactor.seconds() + 10
        while await status("/orders/first") != 200:
            self.assertLess(reactor.seconds(), deadline, gateway.log())
            await sleep(0.05)
        await only(a, b)

        await etcd.put("/services/orders/pod-b", json.dumps({"address": LOCALHOST, "port": port_b}))
        await etcd.delete("/services/orders/pod-a")
        seen = len(b.requests)
        deadline = reactor.seconds() + 10
        while len(b.requests) == seen:
            self.assertLess(reactor.seconds(), deadline, gateway.log())
            self.assertEqual(await status("/orders/probe"), 200)
        await only(b, a)

        await etcd.kill()
        await eventually(lambda: "discovery of upstream orders (etcd" in gateway.log(), "the outage logged", within=8)
        await only(b, a)
        self.assertNotIn("Traceback", gateway.log())
