"""The container image and the deployment files agree with each other and with the code.

Nothing here needs a cluster or a Docker engine: the Dockerfile is read, the
manifests under deploy/ are parsed (and checked against the Kubernetes
schemas when ``kubernetes_validate`` is importable, and rendered with
``kubectl kustomize`` when kubectl is on PATH), the gateway configs are
loaded with txgateway's own loader, and every metric the Grafana dashboard
and the alert rules query must be one :class:`GatewayMetrics` exports, so
renaming a metric without updating deploy/ fails here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from prometheus_client.metrics import MetricWrapperBase
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorProcess, IReactorTCP
from twisted.internet.utils import getProcessValue
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

import txgateway
from tests.tools import missing
from txgateway.config import ConfigError, GatewayConfig, load_config
from txgateway.config.schema import split_endpoint
from txgateway.observability.metrics import GatewayMetrics

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "kubernetes"
MONITORING = BASE / "monitoring"
OBSERVABILITY = DEPLOY / "observability"
IMAGE_CONFIG = DEPLOY / "config" / "gateway.yaml"
DASHBOARD = OBSERVABILITY / "grafana" / "txgateway.json"
RULES = OBSERVABILITY / "prometheus" / "txgateway-rules.yaml"
PROMETHEUS_RULE = OBSERVABILITY / "prometheusrule.yaml"

#: The apiVersion each kind must use (the stable ones current clusters serve).
API_VERSIONS = {
    "ConfigMap": "v1",
    "Secret": "v1",
    "Service": "v1",
    "ServiceAccount": "v1",
    "Deployment": "apps/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}

#: What ``kubectl apply -k deploy/kubernetes`` creates.
BASE_RESOURCES = {
    ("ServiceAccount", "txgateway"),
    ("Role", "txgateway-endpointslices"),
    ("RoleBinding", "txgateway-endpointslices"),
    ("ConfigMap", "txgateway-config"),
    ("Deployment", "txgateway"),
    ("Service", "txgateway"),
    ("HorizontalPodAutoscaler", "txgateway"),
    ("PodDisruptionBudget", "txgateway"),
    ("Deployment", "txgateway-redis"),
    ("Service", "txgateway-redis"),
    ("NetworkPolicy", "txgateway-redis"),
}

#: What ``kubectl apply -k deploy/kubernetes/monitoring`` creates.
MONITORING_RESOURCES = {
    ("ServiceMonitor", "txgateway"),
    ("PrometheusRule", "txgateway"),
    ("ConfigMap", "txgateway-grafana-dashboard"),
}

#: Labels Prometheus attaches to every scraped series (the ServiceMonitor
#: adds the Kubernetes ones); a gateway label with one of these names
#: arrives as ``exported_<name>``.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "service", "endpoint", "container"})

#: Series Prometheus itself produces that the rules may use.
PROMETHEUS_SERIES = frozenset({"up"})


# -- reading the files ---------------------------------------------------------


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def kustomization(directory: Path) -> dict[str, Any]:
    (doc,) = yaml_documents(directory / "kustomization.yaml")
    return doc


def kustomize_documents(directory: Path) -> list[dict[str, Any]]:
    """The resources a kustomization lists plus the ConfigMaps it generates,
    read from the files (no namespace or image transformations applied)."""
    k = kustomization(directory)
    docs: list[dict[str, Any]] = []
    for entry in k.get("resources", []):
        target = directory / entry
        docs.extend(kustomize_documents(target) if target.is_dir() else yaml_documents(target))
    for generator in k.get("configMapGenerator", []):
        data = {}
        for item in generator["files"]:
            key, _, source = item.partition("=")
            data[key] = (directory / (source or key)).read_text(encoding="utf-8")
        labels = generator.get("options", {}).get("labels", {})
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"], "labels": labels},
                "data": data,
            }
        )
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    if len(matches) != 1:
        raise AssertionError(f"expected one {kind}/{name}, found {len(matches)}")
    return matches[0]


def container(deployment: Mapping[str, Any], name: str) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    (found,) = [c for c in containers if c["name"] == name]
    return found


def container_port(c: Mapping[str, Any], port: int | str) -> int:
    """A probe's or Service's ``port`` (a number or a port name) as a number."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return int(number)


def listen_port(endpoint: str) -> int:
    """The port of a ``tcp:PORT:interface=...`` endpoint string."""
    kind, port, *_ = split_endpoint(endpoint)
    if kind != "tcp":
        raise AssertionError(f"expected a tcp endpoint, got {endpoint!r}")
    return int(port)


def load_gateway_config(text: str, environ: Mapping[str, str], directory: str) -> GatewayConfig:
    """``text`` validated by the gateway's own loader, from a real file."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "config.yaml")
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(text)
    return load_config(path, environ=environ)


def placeholder_environment(c: Mapping[str, Any]) -> dict[str, str]:
    """Exactly the variables the container gets, each with a stand-in value."""
    return {item["name"]: f"value-of-{item['name']}" for item in c.get("env", [])}


class Dockerfile:
    """The instructions of a Dockerfile, continuation lines joined, comments dropped."""

    def __init__(self, path: Path) -> None:
        self.instructions: list[tuple[str, str]] = []
        pending = ""
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.lstrip().startswith("#") or not line.strip():
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            full = (pending + line).strip()
            pending = ""
            keyword, _, rest = full.partition(" ")
            self.instructions.append((keyword.upper(), rest.strip()))

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def last_stage(self) -> list[tuple[str, str]]:
        starts = [i for i, (kw, _) in enumerate(self.instructions) if kw == "FROM"]
        return self.instructions[starts[-1] :]

    def exec_form(self, keyword: str) -> list[str]:
        """The JSON array of the last ENTRYPOINT/CMD (exec form required)."""
        value: list[str] = json.loads(self.all(keyword)[-1])
        return value

    def environment(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for rest in self.all("ENV"):
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                env[key] = value
        return env

    def exposed(self) -> set[int]:
        return {int(port.partition("/")[0]) for rest in self.all("EXPOSE") for port in rest.split()}

    def healthcheck(self) -> list[str]:
        (rest,) = self.all("HEALTHCHECK")
        _, _, command = rest.partition(" CMD ")
        value: list[str] = json.loads(command)
        return value

    def final_base(self) -> str:
        """The last stage's base image, ARG defaults substituted."""
        args = dict(rest.partition("=")[::2] for rest in self.all("ARG"))
        image = self.all("FROM")[-1].split()[0]
        return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)

    def copies(self) -> list[list[str]]:
        return [shlex.split(rest) for rest in self.all("COPY")]


# -- metric names ----------------------------------------------------------------

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}


def exported_series() -> dict[str, frozenset[str]]:
    """Every series name the gateway can expose, with its label names
    (``le`` included for histogram buckets)."""
    metrics = GatewayMetrics()
    labels: dict[str, tuple[str, ...]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            labels[value._name] = tuple(value._labelnames)
    series: dict[str, frozenset[str]] = {}
    for family in metrics.registry.collect():
        # The process and GC collectors are not wrappers: their samples say.
        names = labels.get(family.name) or tuple({name for sample in family.samples for name in sample.labels})
        for suffix in _SUFFIXES[family.type]:
            extra = ("le",) if suffix == "_bucket" else ()
            series[family.name + suffix] = frozenset(names + extra)
    return series


_NAME = re.compile(r"\btxgateway_[A-Za-z0-9_]*")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"\{([^{}]*)\}")
#: A name directly followed by a label matcher or a range: a series selector.
_SELECTED = re.compile(r"\b([A-Za-z_:][A-Za-z0-9_:]*)(?=[{\[])")


def metric_names(text: str) -> set[str]:
    return set(_NAME.findall(text))


def label_names(expr: str) -> set[str]:
    """Label names an expression matches on or groups by."""
    names: set[str] = set()
    for body in _SELECTOR.findall(expr):
        names.update(_MATCHER.findall(body))
    unquoted = _QUOTED.sub('""', expr)
    for group in _GROUPING.findall(unquoted):
        names.update(part.strip() for part in group.split(",") if part.strip())
    return names


def unknown_series(text: str, series: Mapping[str, frozenset[str]]) -> set[str]:
    return {name for name in metric_names(text) if name not in series}


def unknown_labels(expr: str, series: Mapping[str, frozenset[str]]) -> set[str]:
    """Labels ``expr`` uses that none of its metrics (nor the scrape) has."""
    known = set(TARGET_LABELS)
    for name in metric_names(expr):
        own = series.get(name, frozenset())
        known.update(own)
        known.update(f"exported_{label}" for label in own if label in TARGET_LABELS)
    return label_names(expr) - known


def strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def dashboard_expressions(dashboard: Mapping[str, Any]) -> list[str]:
    found: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("expr", "definition") and isinstance(item, str):
                    found.append(item)
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(dashboard)
    return found


def rule_expressions(groups: list[dict[str, Any]]) -> dict[str, str]:
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


# -- the tests -----------------------------------------------------------------------


class ManifestTests(SynchronousTestCase):
    """Every manifest parses, uses the expected kinds and API versions, and is applied."""

    def manifest_files(self) -> list[Path]:
        gateway_configs = {IMAGE_CONFIG, BASE / "gateway.yaml", RULES}
        return sorted(p for p in DEPLOY.rglob("*.yaml") if p not in gateway_configs)

    def test_every_manifest_parses_with_known_kinds(self) -> None:
        files = self.manifest_files()
        self.assertGreaterEqual(len(files), 12, files)
        for path in files:
            docs = yaml_documents(path)
            self.assertTrue(docs, f"{path} is empty")
            for doc in docs:
                kind = str(doc.get("kind"))
                self.assertIn(kind, API_VERSIONS, f"{path}: unexpected kind {kind!r}")
                self.assertEqual(doc.get("apiVersion"), API_VERSIONS[kind], f"{path}: {kind}")
                if kind != "Kustomization":
                    self.assertTrue(doc["metadata"]["name"], path)
                    # The kustomization decides the namespace.
                    self.assertNotIn("namespace", doc["metadata"], f"{path}: {kind}")

    def test_base_and_monitoring_resources(self) -> None:
        base = {(d["kind"], d["metadata"]["name"]) for d in kustomize_documents(BASE)}
        self.assertEqual(base, BASE_RESOURCES)
        monitoring = {(d["kind"], d["metadata"]["name"]) for d in kustomize_documents(MONITORING)}
        self.assertEqual(monitoring, MONITORING_RESOURCES)

    def test_every_manifest_file_is_in_a_kustomization(self) -> None:
        listed: set[Path] = set()
        for directory in (BASE, MONITORING, OBSERVABILITY):
            listed.update((directory / entry).resolve() for entry in kustomization(directory).get("resources", []))
        for path in self.manifest_files():
            if path.name == "kustomization.yaml" or path.name.endswith(".example.yaml"):
                continue
            self.assertIn(path.resolve(), listed, f"{path} is in no kustomization's resources")

    def test_secret_template_is_what_the_deployment_reads(self) -> None:
        (secret,) = yaml_documents(BASE / "admin-secret.example.yaml")
        deployment = find(kustomize_documents(BASE), "Deployment", "txgateway")
        (token,) = [e for e in container(deployment, "txgateway")["env"] if e["name"] == "ADMIN_TOKEN"]
        ref = token["valueFrom"]["secretKeyRef"]
        self.assertEqual(secret["metadata"]["name"], ref["name"])
        self.assertIn(ref["key"], secret["stringData"])
        # Required: without it the pod must not start with an open admin API.
        self.assertFalse(ref.get("optional", False))

    def test_kubernetes_schemas(self) -> None:
        try:
            import kubernetes_validate
        except ImportError:
            raise missing("kubernetes_validate is not installed: the manifests were only parsed") from None
        docs = kustomize_documents(BASE) + kustomize_documents(MONITORING)
        docs += yaml_documents(BASE / "admin-secret.example.yaml")
        for doc in docs:
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # CRDs: no schema there
            kubernetes_validate.validate(doc, "1.29.0", strict=True)

    def test_kustomize_renders(self) -> None:
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            raise SkipTest("kubectl is not installed: kustomize rendering not checked")
        for directory, expected in ((BASE, BASE_RESOURCES), (MONITORING, MONITORING_RESOURCES)):
            result = subprocess.run(
                [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
            )
            self.assertEqual(result.returncode, 0, result.stderr)
            docs = [d for d in yaml.safe_load_all(result.stdout) if d]
            self.assertEqual({(d["kind"], d["metadata"]["name"]) for d in docs}, expected)
            namespace = kustomization(directory)["namespace"]
            self.assertEqual({d["metadata"]["namespace"] for d in docs}, {namespace})
            for binding in (d for d in docs if d["kind"] == "RoleBinding"):
                self.assertEqual({s["namespace"] for s in binding["subjects"]}, {namespace})


class GatewayConfigTests(SynchronousTestCase):
    """The configs in deploy/ load with txgateway's loader, given the environment they get."""

    def setUp(self) -> None:
        self.docs = kustomize_documents(BASE)
        self.deployment = find(self.docs, "Deployment", "txgateway")
        self.gateway = container(self.deployment, "txgateway")
        configmap = find(self.docs, "ConfigMap", "txgateway-config")
        self.config_text = configmap["data"]["config.yaml"]

    def test_configmap_config_valid_with_the_deployments_environment(self) -> None:
        environ = placeholder_environment(self.gateway)
        config = load_gateway_config(self.config_text, environ, self.mktemp())
        self.assertEqual(config.admin.token, environ["ADMIN_TOKEN"])
        self.assertEqual(listen_port(config.server.listen[0]), 8080)
        self.assertEqual(listen_port(config.admin.listen), 9090)
        discovery = config.upstreams["backend"].discovery
        assert discovery is not None
        self.assertEqual((discovery.type, discovery.name), ("kubernetes", "backend"))

    def test_configmap_config_refused_without_the_admin_token(self) -> None:
        environ = placeholder_environment(self.gateway)
        del environ["ADMIN_TOKEN"]
        error = self.assertRaises(ConfigError, load_gateway_config, self.config_text, environ, self.mktemp())
        self.assertIn("ADMIN_TOKEN", str(error))

    def test_image_config_valid_and_needs_the_admin_token(self) -> None:
        text = IMAGE_CONFIG.read_text(encoding="utf-8")
        config = load_gateway_config(text, {"ADMIN_TOKEN": "t"}, self.mktemp())
        self.assertEqual(config.admin.token, "t")
        self.assertTrue(config.admin.listen.endswith("interface=0.0.0.0"), config.admin.listen)
        error = self.assertRaises(ConfigError, load_gateway_config, text, {}, self.mktemp())
        self.assertIn("ADMIN_TOKEN", str(error))

    def test_rate_limits_shared_through_the_redis_service(self) -> None:
        config = load_gateway_config(self.config_text, placeholder_environment(self.gateway), self.mktemp())
        limit = config.middleware.rate_limit
        assert limit is not None
        self.assertEqual((limit.enabled, limit.storage), (True, "redis"))
        url = urlsplit(limit.redis_url)
        service = find(self.docs, "Service", "txgateway-redis")
        (port,) = service["spec"]["ports"]
        self.assertEqual((url.hostname, url.port), (service["metadata"]["name"], port["port"]))
        redis = find(self.docs, "Deployment", "txgateway-redis")
        self.assertEqual(container_port(container(redis, "redis"), port["targetPort"]), 6379)
        self.assertEqual(selected(service["spec"]["selector"], pod_labels(redis)), True)
        self.assertEqual(selected(service["spec"]["selector"], pod_labels(self.deployment)), False)


def pod_labels(deployment: Mapping[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def selected(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


class ConsistencyTests(SynchronousTestCase):
    """Image, Deployment, Service, probes and config name the same ports, paths and user."""

    def setUp(self) -> None:
        self.docker = Dockerfile(DOCKERFILE)
        self.docs = kustomize_documents(BASE)
        self.deployment = find(self.docs, "Deployment", "txgateway")
        self.pod = self.deployment["spec"]["template"]["spec"]
        self.gateway = container(self.deployment, "txgateway")
        configmap = find(self.docs, "ConfigMap", "txgateway-config")
        self.config = load_gateway_config(
            configmap["data"]["config.yaml"], placeholder_environment(self.gateway), self.mktemp()
        )
        self.image_config = load_gateway_config(
            IMAGE_CONFIG.read_text(encoding="utf-8"), {"ADMIN_TOKEN": "t"}, self.mktemp()
        )
        self.http_port = listen_port(self.config.server.listen[0])
        self.admin_port = listen_port(self.config.admin.listen)

    def test_container_ports_match_the_config(self) -> None:
        self.assertEqual(container_port(self.gateway, "http"), self.http_port)
        self.assertEqual(container_port(self.gateway, "admin"), self.admin_port)
        # The image's own config listens where the Kubernetes one does.
        self.assertEqual(listen_port(self.image_config.server.listen[0]), self.http_port)
        self.assertEqual(listen_port(self.image_config.admin.listen), self.admin_port)

    def test_service_ports_reach_the_container_ports(self) -> None:
        service = find(self.docs, "Service", "txgateway")
        self.assertTrue(selected(service["spec"]["selector"], pod_labels(self.deployment)))
        ports = {p["name"]: container_port(self.gateway, p["targetPort"]) for p in service["spec"]["ports"]}
        self.assertEqual(ports, {"http": self.http_port, "admin": self.admin_port})

    def test_probes_hit_the_admin_listener(self) -> None:
        expected = {"livenessProbe": "/health", "readinessProbe": "/ready", "startupProbe": "/health"}
        for probe, path in expected.items():
            get = self.gateway[probe]["httpGet"]
            self.assertEqual(get["path"], path, probe)
            self.assertEqual(container_port(self.gateway, get["port"]), self.admin_port, probe)

    def test_dockerfile_exposes_and_checks_the_same_ports(self) -> None:
        self.assertLessEqual({self.http_port, self.admin_port}, self.docker.exposed())
        command = self.docker.healthcheck()
        self.assertEqual(command[:2], ["python", "-c"])
        url = urlsplit(self.docker.environment()["TXGATEWAY_HEALTH_URL"])
        self.assertIn("TXGATEWAY_HEALTH_URL", command[2])
        self.assertEqual((url.hostname, url.port, url.path), ("127.0.0.1", self.admin_port, "/health"))

    def test_entrypoint_args_and_config_path_agree(self) -> None:
        self.assertEqual(self.docker.exec_form("ENTRYPOINT"), ["twistd", "-n", "--pidfile=", "txgateway"])
        cmd = self.docker.exec_form("CMD")
        self.assertEqual(self.gateway["args"], cmd)
        self.assertEqual(cmd[0], "-c")
        config_path = cmd[1]
        self.assertIn(["deploy/config/gateway.yaml", config_path], self.docker.copies())
        # The ConfigMap is mounted as the directory holding that path, key = file name.
        (mount,) = [m for m in self.gateway["volumeMounts"] if m["name"] == "config"]
        self.assertEqual(mount["mountPath"], os.path.dirname(config_path))
        self.assertTrue(mount.get("readOnly"))
        (volume,) = [v for v in self.pod["volumes"] if v["name"] == "config"]
        configmap = find(self.docs, "ConfigMap", volume["configMap"]["name"])
        self.assertIn(os.path.basename(config_path), configmap["data"])
        self.assertNotIn("subPath", mount)  # subPath mounts never see ConfigMap updates

    def test_image_name_and_tag_agree(self) -> None:
        image, _, tag = self.gateway["image"].rpartition(":")
        (entry,) = kustomization(BASE)["images"]
        self.assertEqual(entry["name"], image)
        self.assertEqual(entry["newTag"], tag)
        self.assertEqual(tag, txgateway.__version__)

    def test_runs_as_the_image_user_locked_down(self) -> None:
        (user,) = [rest for kw, rest in self.docker.last_stage() if kw == "USER"]
        uid, _, gid = user.partition(":")
        security = self.pod["securityContext"]
        self.assertEqual((security["runAsUser"], security["runAsGroup"]), (int(uid), int(gid)))
        self.assertTrue(security["runAsNonRoot"])
        self.assertEqual(security["seccompProfile"], {"type": "RuntimeDefault"})
        own = self.gateway["securityContext"]
        self.assertTrue(own["readOnlyRootFilesystem"])
        self.assertFalse(own["allowPrivilegeEscalation"])
        self.assertEqual(own["capabilities"], {"drop": ["ALL"]})
        # With a read-only root, /tmp is the writable emptyDir.
        (tmp,) = [m for m in self.gateway["volumeMounts"] if m["mountPath"] == "/tmp"]
        (volume,) = [v for v in self.pod["volumes"] if v["name"] == tmp["name"]]
        self.assertIn("emptyDir", volume)

    def test_final_image_is_slim_python(self) -> None:
        self.assertEqual(self.docker.final_base(), "python:3.11-slim-bookworm")
        self.assertEqual(self.docker.all("STOPSIGNAL"), ["SIGTERM"])

    def test_termination_grace_covers_the_shutdown_sequence(self) -> None:
        pre_stop = self.gateway["lifecycle"]["preStop"]
        if "sleep" in pre_stop:
            sleep = float(pre_stop["sleep"]["seconds"])
        else:
            command = pre_stop["exec"]["command"]
            self.assertEqual(command[0], "sleep")
            sleep = float(command[1])
        server = self.config.server
        needed = sleep + server.shutdown_delay + server.shutdown_grace
        self.assertGreater(sleep, 0)
        self.assertGreater(self.pod["terminationGracePeriodSeconds"], needed)

    def test_replicas_autoscaling_and_disruptions(self) -> None:
        self.assertEqual(self.deployment["spec"]["replicas"], 3)
        self.assertEqual(self.deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0)
        for name in ("requests", "limits"):
            self.assertLessEqual({"cpu", "memory"}, set(self.gateway["resources"][name]), name)
        hpa = find(self.docs, "HorizontalPodAutoscaler", "txgateway")
        target = hpa["spec"]["scaleTargetRef"]
        self.assertEqual((target["kind"], target["name"]), ("Deployment", "txgateway"))
        self.assertEqual(hpa["spec"]["minReplicas"], self.deployment["spec"]["replicas"])
        pdb = find(self.docs, "PodDisruptionBudget", "txgateway")
        self.assertTrue(selected(pdb["spec"]["selector"]["matchLabels"], pod_labels(self.deployment)))
        self.assertEqual(pdb["spec"]["selector"]["matchLabels"], self.deployment["spec"]["selector"]["matchLabels"])

    def test_service_account_may_watch_endpointslices(self) -> None:
        account = self.pod["serviceAccountName"]
        self.assertTrue(self.pod["automountServiceAccountToken"])
        find(self.docs, "ServiceAccount", account)
        binding = find(self.docs, "RoleBinding", "txgateway-endpointslices")
        self.assertEqual([(s["kind"], s["name"]) for s in binding["subjects"]], [("ServiceAccount", account)])
        role = find(self.docs, binding["roleRef"]["kind"], binding["roleRef"]["name"])
        (rule,) = role["rules"]
        self.assertEqual(
            (rule["apiGroups"], rule["resources"], sorted(rule["verbs"])),
            (["discovery.k8s.io"], ["endpointslices"], ["get", "list", "watch"]),
        )

    def test_redis_only_reachable_from_the_gateway(self) -> None:
        policy = find(self.docs, "NetworkPolicy", "txgateway-redis")
        redis = find(self.docs, "Deployment", "txgateway-redis")
        self.assertTrue(selected(policy["spec"]["podSelector"]["matchLabels"], pod_labels(redis)))
        (rule,) = policy["spec"]["ingress"]
        (source,) = rule["from"]
        self.assertTrue(selected(source["podSelector"]["matchLabels"], pod_labels(self.deployment)))
        self.assertEqual([p["port"] for p in rule["ports"]], [6379])
        self.assertTrue(container(redis, "redis")["securityContext"]["readOnlyRootFilesystem"])

    def test_servicemonitor_scrapes_metrics_on_the_admin_port(self) -> None:
        monitor = find(kustomize_documents(MONITORING), "ServiceMonitor", "txgateway")
        service = find(self.docs, "Service", "txgateway")
        self.assertTrue(selected(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]))
        (endpoint,) = monitor["spec"]["endpoints"]
        self.assertEqual(endpoint["path"], "/metrics")
        (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
        self.assertEqual(container_port(self.gateway, port["targetPort"]), self.admin_port)
        # The rules' `up{job="txgateway"}`: the job is the Service's name.
        self.assertEqual(service["metadata"]["name"], "txgateway")
        self.assertFalse(endpoint.get("honorLabels", False))


class ObservabilityTests(SynchronousTestCase):
    """The dashboard and the alert rules query metrics the gateway exports."""

    def setUp(self) -> None:
        self.series = exported_series()
        self.dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
        (self.rules,) = yaml_documents(RULES)
        self.alerts = rule_expressions(self.rules["groups"])

    def test_the_name_check_catches_a_renamed_metric(self) -> None:
        renamed = 'sum(rate(txgateway_request_total{code=~"5.."}[5m]))'
        self.assertEqual(unknown_series(renamed, self.series), {"txgateway_request_total"})
        # The exposition name, not the family's: a counter is only queryable as _total.
        self.assertEqual(unknown_series("rate(txgateway_requests[5m])", self.series), {"txgateway_requests"})
        self.assertEqual(
            unknown_labels("sum by (route_name) (rate(txgateway_requests_total[5m]))", self.series), {"route_name"}
        )

    def test_dashboard_metric_names_exist(self) -> None:
        used = set()
        for text in strings(self.dashboard):
            self.assertEqual(unknown_series(text, self.series), set(), text)
            used |= metric_names(text)
        self.assertGreaterEqual(len(used), 25, sorted(used))

    def test_rule_metric_names_exist(self) -> None:
        for alert, expr in self.alerts.items():
            self.assertEqual(unknown_series(expr, self.series), set(), alert)
            selectors = set(_SELECTED.findall(_QUOTED.sub('""', expr)))
            self.assertLessEqual(selectors, set(self.series) | PROMETHEUS_SERIES, alert)

    def test_label_names_exist(self) -> None:
        expressions = dashboard_expressions(self.dashboard) + list(self.alerts.values())
        self.assertGreater(len(expressions), 40)
        for expr in expressions:
            self.assertEqual(unknown_labels(expr, self.series), set(), expr)

    def test_dashboard_shows_every_area(self) -> None:
        used = set().union(*(metric_names(e) for e in dashboard_expressions(self.dashboard)))
        for name in (
            "txgateway_requests_total",
            "txgateway_request_duration_seconds_bucket",
            "txgateway_upstream_request_duration_seconds_bucket",
            "txgateway_upstream_errors_total",
            "txgateway_circuit_breaker_state",
            "txgateway_upstream_instance_healthy",
            "txgateway_ratelimit_decisions_total",
            "txgateway_cache_requests_total",
            "txgateway_config_reloads_total",
            "txgateway_config_generation",
            "txgateway_config_last_reload_successful",
            "txgateway_websocket_connections_open",
            "txgateway_grpc_calls_total",
        ):
            self.assertIn(name, used)
        quantiles = [e for e in dashboard_expressions(self.dashboard) if "by (route, le)" in e]
        self.assertTrue(any("histogram_quantile(0.5," in e for e in quantiles))
        self.assertTrue(any("histogram_quantile(0.99," in e for e in quantiles))

    def test_dashboard_structure(self) -> None:
        variables = {v["name"] for v in self.dashboard["templating"]["list"]}
        panels = self.dashboard["panels"]
        ids = [p["id"] for p in panels]
        self.assertEqual(len(ids), len(set(ids)))
        occupied: set[tuple[int, int]] = set()
        for panel in panels:
            pos = panel["gridPos"]
            self.assertLessEqual(pos["x"] + pos["w"], 24, panel["title"])
            cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
            self.assertFalse(cells & occupied, f"{panel['title']} overlaps another panel")
            occupied |= cells
            if panel["type"] == "row":
                continue
            self.assertTrue(panel["targets"], panel["title"])
            for target in panel["targets"]:
                self.assertEqual(target["datasource"]["uid"], "${datasource}")
        for expr in dashboard_expressions(self.dashboard):
            used = set(re.findall(r"\$(?!__)(\w+)", expr))
            self.assertLessEqual(used, variables, expr)

    def test_alerts_cover_the_failure_modes(self) -> None:
        expected = {
            "TxgatewayHighErrorRate": 'txgateway_requests_total{code=~"5.."}',
            "TxgatewayHighLatencyP99": "histogram_quantile(0.99,",
            "TxgatewayCircuitBreakerOpen": "txgateway_circuit_breaker_state",
            "TxgatewayUpstreamInstanceDown": "txgateway_upstream_instance_healthy",
            "TxgatewayConfigReloadFailing": "txgateway_config_last_reload_successful == 0",
            "TxgatewayConfigReloadFailures": 'txgateway_config_reloads_total{result="failure"}',
        }
        for alert, fragment in expected.items():
            self.assertIn(fragment, self.alerts[alert], alert)
        for group in self.rules["groups"]:
            for rule in group["rules"]:
                self.assertIn(rule["labels"]["severity"], ("critical", "warning", "info"), rule["alert"])
                self.assertTrue(rule["annotations"]["summary"], rule["alert"])

    def test_prometheusrule_carries_the_same_rules(self) -> None:
        (resource,) = yaml_documents(PROMETHEUS_RULE)
        self.assertEqual(resource["spec"]["groups"], self.rules["groups"])

    def test_promtool_accepts_the_rules(self) -> None:
        promtool = shutil.which("promtool")
        if promtool is None:
            raise missing("promtool is not installed (Debian: prometheus): the rules were only parsed")
        result = subprocess.run(
            [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60, check=False
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)


class _Status(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(200 if request.path == b"/health" else 503)
        return b"{}"


class HealthcheckCommandTests(TestCase):
    """The Dockerfile's HEALTHCHECK command, run for real against a local listener."""

    def setUp(self) -> None:
        tcp: IReactorTCP = reactor
        self.listener = tcp.listenTCP(0, Site(_Status()), interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(self.listener.stopListening)
        self.command = Dockerfile(DOCKERFILE).healthcheck()

    def run_check(self, url: str) -> Deferred[int]:
        # A proxy in the environment must not catch the probe.
        env = {"TXGATEWAY_HEALTH_URL": url, "http_proxy": "http://127.0.0.1:9", "PATH": os.environ.get("PATH", "")}
        processes: IReactorProcess = reactor
        return getProcessValue(sys.executable, self.command[1:], env=env, reactor=processes)

    async def test_healthy_unhealthy_and_unreachable(self) -> None:
        address = self.listener.getHost()
        assert isinstance(address, IPv4Address)
        base = f"http://127.0.0.1:{address.port}"
        self.assertEqual(await self.run_check(base + "/health"), 0)
        self.assertNotEqual(await self.run_check(base + "/ready"), 0)
        await maybeDeferred(self.listener.stopListening)
        self.assertNotEqual(await self.run_check(base + "/health"), 0)
