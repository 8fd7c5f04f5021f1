"""The ``txgateway`` command, run in-process: exit codes and what it prints."""

from __future__ import annotations

import io
import os
import sys
import textwrap

from twisted.trial.unittest import SynchronousTestCase

import txgateway
from txgateway.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "etc", "examples")


class CLITestCase(SynchronousTestCase):
    def run_cli(self, *argv: str, environ: dict[str, str] | None = None) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        self.patch(os, "environ", dict(environ or {}))
        code = main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as stream:
            stream.write(textwrap.dedent(text))
        return path


class CheckTests(CLITestCase):
    def test_valid_file_prints_listeners_and_routes(self) -> None:
        path = os.path.join(EXAMPLES, "full.yaml")
        code, out, err = self.run_cli("check", "-c", path)
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(lines[0], f"{path}: OK")
        self.assertIn("Listeners:", lines)
        self.assertIn("  http   tcp:8080:interface=0.0.0.0", lines)
        self.assertIn("  admin  tcp:9090:interface=127.0.0.1", lines)
        self.assertIn("Routes (2):", lines)
        header = lines[lines.index("Routes (2):") + 1].split()
        self.assertEqual(header, ["NAME", "METHODS", "HOST", "PATH", "UPSTREAM", "REWRITE"])
        users = next(line for line in lines if line.strip().startswith("users-api"))
        self.assertEqual(
            users.split(None, 4),
            ["users-api", "GET,PUT", "api.example.com", "/api/users/{id}",
             "users -> 127.0.0.1:9001       strip /api; rewrite /v2/users/{id}"],
        )
        orders = next(line for line in lines if line.strip().startswith("orders-api"))
        self.assertIn("orders -> dns localhost:9001", orders)
        self.assertTrue(orders.endswith("strip /api"), orders)

    def test_table_without_rewrites_has_no_rewrite_column(self) -> None:
        path = self.write(
            """
            upstreams:
              api: {protocol: grpc, servers: ["10.0.0.1:50051", {address: "10.0.0.2:50051", weight: 2}]}
            routes:
              - {name: grpc, match: {path: "/pkg.Service/*", methods: [POST]}, upstream: api}
            """
        )
        code, out, err = self.run_cli("check", "-c", path)
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(lines[lines.index("Routes (1):") + 1].split(), ["NAME", "METHODS", "HOST", "PATH", "UPSTREAM"])
        self.assertEqual(
            lines[-1].split(None, 4),
            ["grpc", "POST", "*", "/pkg.Service/*", "api [grpc] -> 10.0.0.1:50051, 10.0.0.2:50051 (weight 2)"],
        )

    def test_seed_without_routes(self) -> None:
        code, out, err = self.run_cli(
            "check", "-c", os.path.join(EXAMPLES, "fechatter.yaml"), environ={"JWT_SECRET": "s3cret"}
        )
        self.assertEqual((code, err), (0, ""))
        self.assertIn("Routes: none (every request is answered 404 not_found)", out.splitlines())

    def test_tls_listener_shown(self) -> None:
        cert = self.write("cert")
        key = self.write("key")
        path = self.write(f"server: {{tls: {{listen_addr: '127.0.0.1:8443', cert: '{cert}', key: '{key}'}}}}\n")
        code, out, _ = self.run_cli("check", "-c", path)
        self.assertEqual(code, 0)
        self.assertIn("  https  ssl:8443:interface=127.0.0.1:certKey=", out)

    def test_every_problem_on_stderr(self) -> None:
        path = self.write(
            """
            server:
              limts: {}
            upstreams:
              users: {servers: ["127.0.0.1:9001"]}
              orders: {servers: ["127.0.0.1:9002"]}
            routes:
              - {match: {path: /a}, upstream: users}
              - {match: {path: /b}, upstream: orders}
              - {match: {path: /c}, upstream: userz}
            middleware:
              auth: {jwt_secret: "${JWT_SECRET}"}
            """
        )
        code, out, err = self.run_cli("check", "-c", path)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(
            err.splitlines(),
            [
                f"{path}: server.limts: unknown key (did you mean 'limits'?)",
                f"{path}: routes[2].upstream: unknown upstream 'userz' (known: orders, users) (did you mean 'users'?)",
                (f"{path}: middleware.auth.jwt_secret: environment variable JWT_SECRET is not set"
                " (set it, or give a default: ${JWT_SECRET:-default})"),
            ],
        )

    def test_seed_without_jwt_secret_fails(self) -> None:
        path = os.path.join(EXAMPLES, "fechatter.yaml")
        code, out, err = self.run_cli("check", "-c", path)
        self.assertEqual((code, out), (1, ""))
        self.assertIn(f"{path}: middleware.auth.jwt_secret: environment variable JWT_SECRET is not set", err)

    def test_unusable_files_never_traceback(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        binary = self.mktemp()
        with open(binary, "wb") as stream:
            stream.write(b"\x00\xff\xfe binary")
        cases = {
            "/nonexistent/gateway.yaml": "/nonexistent/gateway.yaml: no such file",
            directory: f"{directory}: is a directory, not a configuration file",
            self.write("server: [unclosed\n"): "invalid YAML",
            self.write("just a sentence\n"): "the top level must be a mapping",
            binary: "not a UTF-8 text file",
        }
        for path, expected in cases.items():
            code, out, err = self.run_cli("check", "-c", path)
            self.assertEqual((code, out), (1, ""), path)
            self.assertIn(expected, err)
            self.assertTrue(err.startswith(f"{path}: "), err)
            self.assertNotIn("Traceback", err)

    def test_config_option_required(self) -> None:
        code, _out, err = self.run_cli("check")
        self.assertEqual(code, 2)
        self.assertIn("the following arguments are required: -c/--config", err)


class OtherCommandTests(CLITestCase):
    def test_version(self) -> None:
        self.assertEqual(self.run_cli("version"), (0, f"txgateway {txgateway.__version__}\n", ""))
        code, out, _ = self.run_cli("--version")
        self.assertEqual((code, out), (0, f"txgateway {txgateway.__version__}\n"))

    def test_no_command_prints_usage(self) -> None:
        code, out, err = self.run_cli()
        self.assertEqual((code, out), (2, ""))
        self.assertIn("usage: txgateway", err)
        self.assertIn("check", err)

    def test_unknown_command(self) -> None:
        code, _, err = self.run_cli("serve")
        self.assertEqual(code, 2)
        self.assertIn("invalid choice: 'serve'", err)

    def test_help(self) -> None:
        code, out, _ = self.run_cli("--help")
        self.assertEqual(code, 0)
        self.assertIn("demo", out)

    def test_demo_runs_the_demo_upstream(self) -> None:
        import txgateway.demo

        calls: list[tuple[str, int]] = []

        def run_demo(interface: str = "127.0.0.1", port: int = 9001) -> int:
            calls.append((interface, port))
            return 0

        self.patch(txgateway.demo, "run_demo", run_demo)
        self.assertEqual(self.run_cli("demo")[0], 0)
        self.assertEqual(self.run_cli("demo", "--interface", "0.0.0.0", "--port", "9100")[0], 0)
        self.assertEqual(calls, [("127.0.0.1", 9001), ("0.0.0.0", 9100)])
