"""``admin``: a listener reachable from other hosts must have a token."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from txgateway.config import ConfigError, parse_config
from txgateway.config.model import AdminConfig
from txgateway.config.schema import admin_bind_is_local

HINT = ': set a token (e.g. token: "${ADMIN_TOKEN}" with ADMIN_TOKEN in the environment) or bind 127.0.0.1'


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    try:
        parse_config(text, source="gw.yaml", environ=environ or {})
    except ConfigError as error:
        return [line.removeprefix("gw.yaml: ") for line in str(error).splitlines()]
    return []


def admin(text: str, environ: dict[str, str] | None = None) -> AdminConfig:
    return parse_config(text, source="gw.yaml", environ=environ or {}).admin


class AdminBindTests(SynchronousTestCase):
    def test_non_loopback_bind_needs_a_token(self) -> None:
        self.assertEqual(
            problems("admin: {listen_addr: '0.0.0.0:9090'}"),
            ["admin.token: required when admin.listen_addr binds a non-loopback address"
             " (tcp:9090:interface=0.0.0.0)" + HINT],
        )  # fmt: skip
        self.assertEqual(
            problems("admin: {listen: 'tcp:9090'}"),
            ["admin.token: required when admin.listen binds a non-loopback address (tcp:9090)" + HINT],
        )
        for listen in ("listen_addr: ':9090'", "listen_addr: '10.1.2.3:9090'", "listen_addr: '[::]:9090'",
                       "listen: 'tcp6:9090'", "listen: 'systemd:domain=INET:index=0'"):  # fmt: skip
            [problem] = problems(f"admin: {{{listen}}}")
            self.assertTrue(problem.startswith("admin.token: required when admin.listen"), problem)

    def test_empty_token_from_the_environment_counts_as_none(self) -> None:
        text = "admin: {listen_addr: '0.0.0.0:9090', token: '${ADMIN_TOKEN:-}'}"
        [problem] = problems(text)
        self.assertTrue(problem.startswith("admin.token: required"), problem)
        self.assertEqual(admin(text, {"ADMIN_TOKEN": "s3cret"}).token, "s3cret")

    def test_with_a_token_any_bind_is_fine(self) -> None:
        config = admin("admin: {listen_addr: '0.0.0.0:9191', token: abc}")
        self.assertEqual((config.listen, config.token), ("tcp:9191:interface=0.0.0.0", "abc"))

    def test_local_binds_need_no_token(self) -> None:
        for text in ("{}", "admin: {listen_addr: '127.0.0.1:9090'}", "admin: {listen_addr: '127.0.0.2:9090'}",
                     "admin: {listen_addr: '[::1]:9090'}", "admin: {listen_addr: 'localhost:9090'}",
                     "admin: {listen: 'unix:/run/txgateway-admin.sock'}", "admin: {listen: 'tcp:9090:127.0.0.1'}"):  # fmt: skip
            self.assertEqual(problems(text), [], text)

    def test_one_problem_per_mistake(self) -> None:
        """A mistyped or unresolved token is reported once, as that."""
        self.assertEqual(
            problems("admin: {listen_addr: '0.0.0.0:9090', token: 123}"),
            ["admin.token: expected a string, got an integer (123)"],
        )
        [problem] = problems("admin: {listen_addr: '0.0.0.0:9090', token: '${ADMIN_TOKEN}'}")
        self.assertIn("ADMIN_TOKEN is not set", problem)

    def test_bind_classification(self) -> None:
        local = ("tcp:9090:interface=127.0.0.1", "tcp6:9090:interface=\\:\\:1", "unix:/tmp/a.sock",
                 "ssl:9443:privateKey=k.pem:interface=127.0.0.1", "tcp:9090:interface=localhost")  # fmt: skip
        remote = ("tcp:9090", "tcp:9090:interface=0.0.0.0", "tcp6:9090:interface=\\:\\:", "ssl:9443:privateKey=k.pem",
                  "tcp:9090:interface=gateway.internal", "systemd:domain=INET:index=0")  # fmt: skip
        for listen in local:
            self.assertTrue(admin_bind_is_local(listen), listen)
        for listen in remote:
            self.assertFalse(admin_bind_is_local(listen), listen)
