"""``${VAR}`` and ``${VAR:-default}`` in configuration values."""

from __future__ import annotations

from collections.abc import Mapping

from twisted.trial.unittest import SynchronousTestCase

from txgateway.config import ConfigError, GatewayConfig, parse_config

BASE = """
upstreams:
  users:
    servers: ["127.0.0.1:9001"]
"""


def load(text: str, environ: Mapping[str, str]) -> GatewayConfig:
    return parse_config(BASE + text, source="gw.yaml", environ=environ)


def problems(text: str, environ: Mapping[str, str]) -> list[str]:
    try:
        load(text, environ)
    except ConfigError as error:
        return str(error).splitlines()
    raise AssertionError("the configuration was accepted")


class InterpolationTests(SynchronousTestCase):
    def test_variable_replaced(self) -> None:
        config = load("admin: {token: '${TOKEN}'}", {"TOKEN": "s3cret"})
        self.assertEqual(config.admin.token, "s3cret")

    def test_default_used_when_unset_or_empty(self) -> None:
        text = "admin: {token: '${TOKEN:-fallback}'}"
        self.assertEqual(load(text, {}).admin.token, "fallback")
        self.assertEqual(load(text, {"TOKEN": ""}).admin.token, "fallback")
        self.assertEqual(load(text, {"TOKEN": "set"}).admin.token, "set")

    def test_empty_default(self) -> None:
        self.assertIsNone(load("admin: {token: '${ADMIN_TOKEN:-}'}", {}).admin.token)

    def test_set_but_empty_without_default(self) -> None:
        self.assertIsNone(load("admin: {token: '${TOKEN}'}", {"TOKEN": ""}).admin.token)

    def test_several_placeholders_in_one_value(self) -> None:
        config = load("server: {listen_addr: '${HOST:-127.0.0.1}:${PORT}'}", {"PORT": "8181"})
        self.assertEqual(config.server.listen, ("tcp:8181:interface=127.0.0.1",))

    def test_unset_variable_names_variable_and_path(self) -> None:
        self.assertEqual(
            problems("middleware: {auth: {jwt_secret: '${JWT_SECRET}'}}", {}),
            [
                ("gw.yaml: middleware.auth.jwt_secret: environment variable JWT_SECRET is not set"
                " (set it, or give a default: ${JWT_SECRET:-default})")
            ],
        )

    def test_unset_variable_in_list_item(self) -> None:
        self.assertEqual(
            problems("server: {trusted_proxies: ['10.0.0.0/8', '${PROXY}']}", {}),
            [
                ("gw.yaml: server.trusted_proxies[1]: environment variable PROXY is not set"
                " (set it, or give a default: ${PROXY:-default})")
            ],
        )

    def test_every_unset_variable_reported(self) -> None:
        lines = problems("admin: {token: '${A}${B}'}\nserver: {listen_addr: '${C}'}", {})
        self.assertEqual(len(lines), 3)
        for name in ("A", "B", "C"):
            self.assertTrue(any(f"variable {name} is not set" in line for line in lines), lines)

    def test_numbers_and_booleans_from_placeholders(self) -> None:
        text = """
server:
  listen_addr: "0.0.0.0:${PORT:-8080}"
  workers: ${WORKERS:-2}
  shutdown_grace: ${GRACE:-1.5}
  limits: {max_body_bytes: "${MAX_BODY:-1MiB}", header_timeout: "${HEAD:-5}"}
observability:
  metrics: {enabled: "${METRICS:-false}"}
  tracing: {sample_ratio: "${RATIO:-0.5}"}
"""
        config = load(text, {"WORKERS": "4"})
        self.assertEqual(config.server.listen, ("tcp:8080:interface=0.0.0.0",))
        self.assertEqual(config.server.workers, 4)
        self.assertEqual(config.server.shutdown_grace, 1.5)
        self.assertEqual(config.server.limits.max_body_bytes, 1024 * 1024)
        self.assertEqual(config.server.limits.header_timeout, 5.0)
        self.assertFalse(config.observability.metrics_enabled)
        self.assertEqual(config.observability.tracing.sample_ratio, 0.5)

    def test_bad_number_from_placeholder(self) -> None:
        self.assertEqual(
            problems("server: {workers: '${WORKERS}'}", {"WORKERS": "four"}),
            ["gw.yaml: server.workers: expected an integer, got a string ('four')"],
        )

    def test_plain_strings_are_not_numbers(self) -> None:
        self.assertEqual(
            problems("server: {workers: '4'}", {}),
            ["gw.yaml: server.workers: expected an integer, got a string ('4')"],
        )

    def test_escaped_dollar(self) -> None:
        config = load("admin: {token: 'a$${NOT_A_VAR}b'}", {})
        self.assertEqual(config.admin.token, "a${NOT_A_VAR}b")

    def test_lone_dollar_kept(self) -> None:
        self.assertEqual(load("admin: {token: 'pa$$word$'}", {}).admin.token, "pa$$word$")

    def test_values_never_become_yaml(self) -> None:
        config = load("admin: {token: '${TOKEN}'}", {"TOKEN": "[1, 2]\nx: y"})
        self.assertEqual(config.admin.token, "[1, 2]\nx: y")

    def test_unterminated_placeholder(self) -> None:
        [line] = problems("admin: {token: 'x${TOKEN'}", {"TOKEN": "t"})
        self.assertTrue(line.startswith("gw.yaml: admin.token: unterminated placeholder '${TOKEN'"), line)

    def test_invalid_variable_name(self) -> None:
        [line] = problems("admin: {token: '${1X}'}", {})
        self.assertTrue(line.startswith("gw.yaml: admin.token: invalid placeholder '${1X}'"), line)

    def test_unset_variable_does_not_cascade(self) -> None:
        # The failed value is not also reported as empty, wrong type or missing.
        self.assertEqual(
            problems("server: {workers: '${WORKERS}', listen_addr: '${ADDR}'}", {}),
            [
                ("gw.yaml: server.workers: environment variable WORKERS is not set"
                " (set it, or give a default: ${WORKERS:-default})"),
                ("gw.yaml: server.listen_addr: environment variable ADDR is not set"
                " (set it, or give a default: ${ADDR:-default})"),
            ],
        )

    def test_keys_are_not_interpolated(self) -> None:
        [line] = problems("server: {'${KEY}': 1}", {"KEY": "workers"})
        self.assertIn('server["${KEY}"]: unknown key', line)

    def test_environ_defaults_to_os_environ(self) -> None:
        import os

        self.patch(os, "environ", {"TXGW_TEST_TOKEN": "from-os"})
        config = parse_config(BASE + "admin: {token: '${TXGW_TEST_TOKEN}'}")
        self.assertEqual(config.admin.token, "from-os")
