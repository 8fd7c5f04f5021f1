"""What the Kubernetes, Consul and etcd providers make of their registries' answers.

The answers here are shaped like the real ones (EndpointSlices of
discovery.k8s.io/v1, Consul's /v1/health/service entries, etcd's JSON
gateway values); the providers' list/watch/blocking-query protocols run
against real sockets in tests/integration/test_discovery.py.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from txgateway.config import parse_config
from txgateway.config.errors import ConfigError
from txgateway.config.model import DiscoveryConfig, UpstreamServer
from txgateway.upstream.discovery.consul import ConsulSource, service_servers
from txgateway.upstream.discovery.etcd import EtcdSource, parse_instance, prefix_end
from txgateway.upstream.discovery.kubernetes import KubernetesSource, endpoint_servers


def endpoint(
    address: str, ready: bool | None = True, serving: bool | None = None, terminating: bool | None = None
) -> Any:
    conditions = {
        k: v for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating)) if v is not None
    }
    return {"addresses": [address], "conditions": conditions}


def endpoint_slice(name: str, endpoints: list[Any], ports: list[Any] | None = None) -> Any:
    return {
        "metadata": {"name": name, "resourceVersion": "1"},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def pairs(servers: list[UpstreamServer]) -> list[tuple[str, int, int]]:
    return [(s.host, s.port, s.weight) for s in servers]


class EndpointSliceTests(SynchronousTestCase):
    def test_ready_endpoints_of_every_slice(self) -> None:
        slices = [
            endpoint_slice("web-abc", [endpoint("10.1.0.1"), endpoint("10.1.0.2", ready=False)]),
            endpoint_slice("web-def", [endpoint("10.1.0.3", ready=None)]),
        ]
        self.assertEqual(pairs(endpoint_servers(slices)), [("10.1.0.1", 8080, 1), ("10.1.0.3", 8080, 1)])

    def test_serving_terminating_endpoints_only_when_none_is_ready(self) -> None:
        draining = endpoint("10.1.0.2", ready=False, serving=True, terminating=True)
        gone = endpoint("10.1.0.3", ready=False, serving=False, terminating=True)
        self.assertEqual(
            pairs(endpoint_servers([endpoint_slice("a", [endpoint("10.1.0.1"), draining, gone])])),
            [("10.1.0.1", 8080, 1)],
        )
        self.assertEqual(pairs(endpoint_servers([endpoint_slice("a", [draining, gone])])), [("10.1.0.2", 8080, 1)])

    def test_port_by_name_by_number_or_the_only_one(self) -> None:
        ports = [{"name": "http", "port": 8080}, {"name": "metrics", "port": 9100}]
        slices = [endpoint_slice("a", [endpoint("10.1.0.1")], ports)]
        self.assertEqual(pairs(endpoint_servers(slices, port_name="metrics")), [("10.1.0.1", 9100, 1)])
        self.assertEqual(pairs(endpoint_servers(slices, port=7000)), [("10.1.0.1", 7000, 1)])
        self.assertEqual(endpoint_servers(slices), [], "two ports and no choice: none")
        self.assertEqual(endpoint_servers(slices, port_name="grpc"), [])
        one = [endpoint_slice("a", [endpoint("10.1.0.1")], [{"port": 5000}])]
        self.assertEqual(pairs(endpoint_servers(one)), [("10.1.0.1", 5000, 1)])

    def test_endpoints_without_addresses_are_skipped(self) -> None:
        slices = [endpoint_slice("a", [{"addresses": [], "conditions": {"ready": True}}, endpoint("10.1.0.1")])]
        self.assertEqual(pairs(endpoint_servers(slices)), [("10.1.0.1", 8080, 1)])

    def test_in_cluster_defaults(self) -> None:
        config = DiscoveryConfig(type="kubernetes", name="web", port=8080)
        source = KubernetesSource(
            "web", config, Clock(), environ={"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
        )
        self.assertEqual(source.api_url(), "https://10.96.0.1:443")
        self.assertEqual(source.token_path, "/var/run/secrets/kubernetes.io/serviceaccount/token")
        self.assertEqual(source.ca_path, "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
        self.assertIsNone(KubernetesSource("web", config, Clock(), environ={}).api_url())
        v6 = KubernetesSource("web", config, Clock(), environ={"KUBERNETES_SERVICE_HOST": "fd00::1"})
        self.assertEqual(v6.api_url(), "https://[fd00::1]:443")

    def test_overrides(self) -> None:
        options = {"url": "http://127.0.0.1:8001/", "namespace": "shop", "token_path": "/t", "ca_path": "/c"}
        source = KubernetesSource(
            "web", DiscoveryConfig(type="kubernetes", name="web", options=options), Clock(), environ={}
        )
        self.assertEqual(
            (source.api_url(), source.namespace, source.token_path, source.ca_path),
            ("http://127.0.0.1:8001", "shop", "/t", "/c"),
        )


class ConsulTests(SynchronousTestCase):
    def test_health_service_entries(self) -> None:
        entries = [
            {"Node": {"Address": "10.2.0.1"}, "Service": {"Address": "", "Port": 8080}},
            {
                "Node": {"Address": "10.2.0.2"},
                "Service": {"Address": "172.16.0.9", "Port": 9090, "Weights": {"Passing": 3, "Warning": 1}},
            },
            {"Node": {"Address": "10.2.0.3"}, "Service": {"Address": "10.2.0.3", "Port": 0}},
            {"Node": {}, "Service": {"Port": 8080}},
        ]
        self.assertEqual(pairs(service_servers(entries)), [("10.2.0.1", 8080, 1), ("172.16.0.9", 9090, 3)])
        self.assertEqual(pairs(service_servers(entries[2:3], port=7000)), [("10.2.0.3", 7000, 1)])

    def test_query(self) -> None:
        options = {"url": "http://consul:8500", "datacenter": "dc2", "tag": "v2"}
        source = ConsulSource("api", DiscoveryConfig(type="consul", name="api", options=options), Clock())
        self.assertEqual(source.query_url(), "http://consul:8500/v1/health/service/api?passing=true&dc=dc2&tag=v2")
        source.index = 42
        self.assertEqual(
            source.query_url(),
            "http://consul:8500/v1/health/service/api?passing=true&index=42&wait=300s&dc=dc2&tag=v2",
        )


class EtcdValueTests(SynchronousTestCase):
    def test_host_port(self) -> None:
        self.assertEqual(parse_instance(b"10.3.0.1:8080", None), UpstreamServer("10.3.0.1", 8080))
        self.assertEqual(parse_instance(b" [fd00::7]:80\n", None), UpstreamServer("fd00::7", 80))
        self.assertEqual(parse_instance(b"api.internal", 9000), UpstreamServer("api.internal", 9000))
        self.assertIsNone(parse_instance(b"api.internal", None), "no port anywhere")

    def test_json(self) -> None:
        self.assertEqual(
            parse_instance(b'{"address": "10.3.0.2", "port": 8081, "weight": 4}', None),
            UpstreamServer("10.3.0.2", 8081, 4),
        )
        self.assertEqual(parse_instance(b'{"address": "10.3.0.2:8082"}', None), UpstreamServer("10.3.0.2", 8082))
        self.assertEqual(parse_instance(b'{"address": "10.3.0.2"}', 80), UpstreamServer("10.3.0.2", 80))

    def test_unusable_values(self) -> None:
        for value in (b"", b"{", b"[1]", b'{"port": 80}', b'{"address": "a", "port": "80"}', b'{"address": "a:1", "weight": 0}',
                      b"a:99999", b"http://a:80/", b"\xff\xfe", b'{"address": "a:1", "weight": true}'):  # fmt: skip
            self.assertIsNone(parse_instance(value, None), value)

    def test_prefix_end(self) -> None:
        self.assertEqual(prefix_end(b"/services/orders/"), b"/services/orders0")
        self.assertEqual(prefix_end(b"a\xff"), b"b")
        self.assertEqual(prefix_end(b"\xff"), b"\0")

    def test_key_range(self) -> None:
        config = DiscoveryConfig(
            type="etcd", name="orders", options={"url": "http://127.0.0.1:2379", "prefix": "/svc/"}
        )
        self.assertEqual(EtcdSource("orders", config, Clock()).key, b"/svc/orders/")


class ConfigTests(SynchronousTestCase):
    def test_provider_options(self) -> None:
        config = parse_config(
            """
upstreams:
  d: {discovery: {type: dns, name: d.test, port: 80, resolver: "127.0.0.1:5353"}}
  d6: {discovery: {type: dns, name: d.test, port: 80, resolver: "::1"}}
  k: {discovery: {type: kubernetes, name: web, port_name: http, token_path: /t, ca_path: /c, url: "https://k8s:6443"}}
  c: {discovery: {type: consul, name: api, token: secret}}
routes: [{name: r, match: {path: /}, upstream: d}]
"""
        )
        options = {name: dict(u.discovery.options) for name, u in config.upstreams.items() if u.discovery}
        self.assertEqual(options["d"], {"resolver": "127.0.0.1:5353", "record_type": "A"})
        self.assertEqual(options["d6"]["resolver"], "[::1]:53")
        self.assertEqual(
            options["k"], {"port_name": "http", "token_path": "/t", "ca_path": "/c", "url": "https://k8s:6443"}
        )
        self.assertEqual(options["c"], {"url": "http://127.0.0.1:8500", "token": "secret"})
        self.assertEqual(len({config.upstreams["d"], config.upstreams["d"]}), 1, "hashable: a Runtime.shared key")

    def test_bad_resolver(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            parse_config(
                'upstreams: {d: {discovery: {type: dns, name: d.test, port: 80, resolver: "dns.google:53"}}}\n'
                "routes: [{name: r, match: {path: /}, upstream: d}]\n"
            )
        self.assertIn("upstreams.d.discovery.resolver: expected an IP address", str(raised.exception))
