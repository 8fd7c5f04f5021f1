"""Hot reload: the Reloader's decisions, file watching, and what a switch keeps and releases.

Reloads of a running process under load are in tests/integration/test_reload.py.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from txgateway.config import GatewayConfig, parse_config
from txgateway.observability.metrics import GatewayMetrics
from txgateway.reload import Reloader
from txgateway.runtime import Runtime
from txgateway.service import GatewayService, describe_changes

BASE = """
upstreams:
  users: {servers: [{address: "127.0.0.1:9001"}], health_check: {enabled: true, interval: 5}}
  orders: {servers: [{address: "127.0.0.1:9002"}]}
routes:
  - {name: users, match: {path: /users/*}, upstream: users}
  - {name: orders, match: {path: /orders/*}, upstream: orders}
"""

CHANGED = """
upstreams:
  users: {servers: [{address: "127.0.0.1:9001"}], health_check: {enabled: true, interval: 5}}
  billing: {servers: [{address: "127.0.0.1:9003"}]}
routes:
  - {name: users, match: {path: /users/*}, upstream: users}
  - {name: billing, match: {path: /billing/*}, upstream: billing}
"""


def sample(metrics: GatewayMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


class ReloaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.write(BASE)
        self.clock = Clock()
        self.metrics = GatewayMetrics()
        self.switched: list[GatewayConfig] = []
        self.fail_switch: Exception | None = None
        self.reloader = Reloader(self.path, self.switch, self.clock, self.metrics, wall_time=lambda: 1000.0)
        self.reloader.started()

    def write(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)

    def switch(self, config: GatewayConfig) -> Sequence[str]:
        if self.fail_switch is not None:
            raise self.fail_switch
        self.switched.append(config)
        return ["route billing: added"]

    def test_good_file_switches_and_counts(self) -> None:
        self.write(CHANGED)
        result = self.reloader.reload("api")
        self.assertTrue(result.ok)
        self.assertEqual((result.generation, result.trigger, result.changes), (2, "api", ("route billing: added",)))
        [config] = self.switched
        self.assertEqual([route.name for route in config.routes], ["users", "billing"])
        self.assertEqual(sample(self.metrics, "txgateway_config_reloads_total", result="success"), 1.0)
        self.assertEqual(sample(self.metrics, "txgateway_config_generation"), 2.0)
        self.assertEqual([r.trigger for r in self.reloader.history], ["api", "startup"])

    def test_identical_file_is_not_rebuilt(self) -> None:
        result = self.reloader.reload("sighup")
        self.assertTrue(result.ok and result.unchanged)
        self.assertEqual(result.generation, 1)
        self.assertEqual(self.switched, [])

    def test_invalid_yaml_changes_nothing_and_names_file_and_place(self) -> None:
        self.write("routes: [\n")
        result = self.reloader.reload("sighup")
        self.assertFalse(result.ok)
        self.assertEqual(result.generation, 1)
        self.assertEqual(self.switched, [])
        self.assertTrue(result.errors[0].startswith(f"{self.path}: line "), result.errors)
        self.assertIn("invalid YAML", result.errors[0])
        self.assertEqual(sample(self.metrics, "txgateway_config_reloads_total", result="failure"), 1.0)
        self.assertEqual(sample(self.metrics, "txgateway_config_last_reload_successful"), 0.0)
        # A good file afterwards reloads.
        self.write(CHANGED)
        self.assertTrue(self.reloader.reload("sighup").ok)
        self.assertEqual(sample(self.metrics, "txgateway_config_last_reload_successful"), 1.0)

    def test_invalid_config_names_the_path(self) -> None:
        self.write(BASE.replace("upstream: orders", "upstream: nowhere"))
        result = self.reloader.reload("file")
        self.assertFalse(result.ok)
        self.assertTrue(any(f"{self.path}: routes[1].upstream:" in line for line in result.errors), result.errors)

    def test_generation_that_cannot_be_built_changes_nothing(self) -> None:
        self.write(CHANGED)
        self.fail_switch = ImportError("no module named shop.middleware")
        result = self.reloader.reload("api")
        self.assertFalse(result.ok)
        self.assertIn("no module named shop.middleware", result.errors[0])
        self.assertEqual(self.reloader.generation, 1)
        self.flushLoggedErrors(ImportError)
        # The same file is tried again on the next trigger (it is not "unchanged").
        self.fail_switch = None
        self.assertTrue(self.reloader.reload("api").ok)

    def test_missing_file(self) -> None:
        os.remove(self.path)
        result = self.reloader.reload("sighup")
        self.assertFalse(result.ok)
        self.assertEqual(result.errors, (f"{self.path}: no such file",))

    def test_file_change_is_picked_up_by_polling(self) -> None:
        self.reloader.start()
        self.addCleanup(self.reloader.stop)
        self.clock.advance(2)
        self.assertEqual(self.switched, [])
        self.write(CHANGED)
        self.clock.advance(2)
        self.assertEqual(len(self.switched), 1)
        self.clock.advance(2)
        self.assertEqual(len(self.switched), 1)

    def test_configmap_symlink_swap_is_picked_up(self) -> None:
        # Kubernetes mounts a ConfigMap as config.yaml -> ..data/config.yaml,
        # ..data -> ..<timestamp>; an update swaps the ..data symlink.
        root = self.mktemp()
        os.makedirs(os.path.join(root, "..v1"))
        os.makedirs(os.path.join(root, "..v2"))
        for version, text in (("..v1", BASE), ("..v2", CHANGED)):
            with open(os.path.join(root, version, "config.yaml"), "w") as f:
                f.write(text)
        os.symlink("..v1", os.path.join(root, "..data"))
        path = os.path.join(root, "config.yaml")
        os.symlink(os.path.join("..data", "config.yaml"), path)
        reloader = Reloader(path, self.switch, self.clock, self.metrics)
        reloader.started()
        reloader.start()
        self.addCleanup(reloader.stop)
        os.symlink("..v2", os.path.join(root, "..tmp"))
        os.rename(os.path.join(root, "..tmp"), os.path.join(root, "..data"))
        self.clock.advance(2)
        [config] = self.switched
        self.assertIn("billing", config.upstreams)


def service(text: str, **server: Any) -> tuple[GatewayService, MemoryReactorClock, str]:
    reactor = MemoryReactorClock()
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"txgateway-reload-{id(reactor)}.yaml")
    with open(path, "w") as f:
        f.write(text)
    config = parse_config(text, source=path)
    return GatewayService(config, reactor), reactor, path


class SwitchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.service, self.reactor, self.path = service(BASE)
        self.addCleanup(os.remove, self.path)
        self.service._listening = True  # as after startService, without sockets
        self.service.gateway.start()

    def reload_with(self, text: str) -> Any:
        with open(self.path, "w") as f:
            f.write(text)
        return self.service.reload("api")

    def test_unchanged_upstream_keeps_its_state_changed_one_is_released(self) -> None:
        before = self.service.gateway
        users, orders = before.upstreams["users"], before.upstreams["orders"]
        closed: list[bool] = []
        orders.client.close = lambda: closed.append(True)  # type: ignore[method-assign]
        result = self.reload_with(CHANGED)
        self.assertTrue(result.ok, result.errors)
        after = self.service.gateway
        self.assertIsNot(after, before)
        self.assertIs(after.upstreams["users"], users)
        self.assertIs(after.upstreams["users"].client, users.client)
        self.assertNotIn("orders", after.upstreams)
        self.assertEqual(
            result.changes,
            ("route billing: added", "route orders: removed", "upstream billing: added", "upstream orders: removed"),
        )
        # The removed upstream's pool closes once in-flight requests had time to finish.
        self.reactor.advance(self.service.config.server.shutdown_grace - 1)
        self.assertEqual(closed, [])
        self.reactor.advance(1)
        self.assertEqual(closed, [True])

    def test_gauges_of_removed_upstreams_and_instances_are_dropped(self) -> None:
        metrics = self.service.runtime.metrics

        def healthy(upstream: str, address: str) -> float | None:
            return sample(metrics, "txgateway_upstream_instance_healthy", upstream=upstream, address=address)

        self.assertEqual(healthy("orders", "127.0.0.1:9002"), 1.0)
        self.assertEqual(healthy("users", "127.0.0.1:9001"), 1.0)
        text = CHANGED.replace('users: {servers: [{address: "127.0.0.1:9001"}]', 'users: {servers: [{address: "127.0.0.1:9011"}]')
        self.assertTrue(self.reload_with(text).ok)
        # A stale 1 (or 0) would stay exported for good, and an alert on it never resolve.
        self.assertIsNone(healthy("orders", "127.0.0.1:9002"))
        self.assertIsNone(healthy("users", "127.0.0.1:9001"))
        self.assertEqual(healthy("users", "127.0.0.1:9011"), 1.0)
        self.assertEqual(healthy("billing", "127.0.0.1:9003"), 1.0)

    def test_health_checks_of_a_removed_upstream_stop(self) -> None:
        health = {h.upstream.config.name: h for h in self.service.gateway.health}
        text = BASE.replace("health_check: {enabled: true, interval: 5}", "health_check: {enabled: true, interval: 7}")
        self.assertTrue(self.reload_with(text).ok)
        self.assertFalse(health["users"].active.running)  # type: ignore[union-attr]
        [new_users] = [h for h in self.service.gateway.health if h.upstream.config.name == "users"]
        self.assertTrue(new_users.active.running)  # type: ignore[union-attr]

    def test_protocol_change_gets_a_new_client(self) -> None:
        old_client = self.service.gateway.upstreams["orders"].client
        text = BASE.replace('orders: {servers: [{address: "127.0.0.1:9002"}]}', 'orders: {protocol: h2c, servers: [{address: "127.0.0.1:9002"}]}')
        self.assertTrue(self.reload_with(text).ok)
        self.assertIsNot(self.service.gateway.upstreams["orders"].client, old_client)

    def test_reloads_are_listed_newest_first(self) -> None:
        self.reload_with("routes: [")
        self.reload_with(CHANGED)
        self.assertEqual([(r.trigger, r.ok) for r in self.service.reloads()], [("api", True), ("api", False), ("startup", True)])


class RuntimeRetireTests(SynchronousTestCase):
    def test_keys_only_the_old_generation_used_are_stopped_after_the_delay(self) -> None:
        clock = Clock()
        runtime = Runtime(clock, clock)
        stopped: list[str] = []

        class Stoppable:
            def __init__(self, name: str) -> None:
                self.name = name

            def stop(self) -> None:
                stopped.append(self.name)

        _, old = runtime.generation(lambda: [runtime.shared(k, lambda k=k: Stoppable(k)) for k in ("a", "b")])
        kept = runtime.shared("b", lambda: Stoppable("b2"))
        _, new = runtime.generation(lambda: [runtime.shared(k, lambda k=k: Stoppable(k)) for k in ("b", "c")])
        self.assertEqual(runtime.retire(old, new, 5.0), ["a"])
        clock.advance(4.9)
        self.assertEqual(stopped, [])
        clock.advance(0.1)
        self.assertEqual(stopped, ["a"])
        self.assertIs(runtime.shared("b", lambda: Stoppable("other")), kept)
        runtime.stop()
        self.assertEqual(sorted(stopped), ["a", "b", "c"])

    def test_stop_also_stops_what_waits_for_retirement(self) -> None:
        clock = Clock()
        runtime = Runtime(clock, clock)
        stopped: list[str] = []

        class Stoppable:
            def stop(self) -> None:
                stopped.append("x")

        _, old = runtime.generation(lambda: runtime.shared("x", Stoppable))
        runtime.retire(old, frozenset(), 30.0)
        runtime.stop()
        self.assertEqual(stopped, ["x"])
        self.assertFalse(clock.getDelayedCalls())


class DescribeChangesTests(SynchronousTestCase):
    def test_restart_only_settings_are_named(self) -> None:
        old = parse_config(BASE)
        new = parse_config("server: {listen_addr: '0.0.0.0:9999', limits: {max_connections: 5}}\n" + BASE)
        self.assertEqual(
            describe_changes(old, new),
            ["server.limits: changed, applies to new connections", "server.listen: changed, takes effect at restart"],
        )
