"""The gateway as a process: ``twistd -n txgateway`` starting, refusing, probing, installed.

These run the real console scripts of the venv (``twistd``, ``txgateway``)
and a real ``pip install`` of this checkout, the way a user or an
orchestrator meets the gateway.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
from pathlib import Path
from typing import Any

import yaml
from twisted.trial.unittest import SkipTest, TestCase

from tests.integration.harness import (
    LOCALHOST,
    PYTHON,
    ROOT,
    TWISTD,
    EchoUpstream,
    GatewayProcess,
    child_environment,
    curl,
    exit_code,
    exit_signal,
    free_port,
    run,
)

TXGATEWAY = str(Path(PYTHON).with_name("txgateway"))
#: Every command here is bounded: a gateway that does not exit is a failure, not a hang.
TIMEOUT = "/usr/bin/timeout"


def minimal_config(upstream_port: int = 1) -> dict[str, Any]:
    return {
        "upstreams": {"users": {"servers": [{"address": f"{LOCALHOST}:{upstream_port}"}]}},
        "routes": [{"name": "users", "match": {"path": "/users/*"}, "upstream": "users"}],
    }


class ProcessTests(TestCase):
    timeout = 180

    def write_config(self, name: str, config: dict[str, Any] | str) -> Path:
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        path = directory / name
        path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
        return path

    async def twistd(self, config: Path, seconds: int = 30) -> tuple[int, str]:
        """Run ``twistd -n txgateway -c NAME`` from the config's directory: (status, stdout+stderr)."""
        out, err, code = await run(
            TIMEOUT, str(seconds), TWISTD, "--pidfile=", "-n", "txgateway", "-c", config.name,
            env=child_environment(), path=str(config.parent),
        )  # fmt: skip
        return code, (out + err).decode("utf-8", "replace")

    def listening_socket(self) -> int:
        """A port held by a listening socket (outside the reactor) for this test."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((LOCALHOST, free_port()))
        sock.listen(1)
        self.addCleanup(sock.close)
        port: int = sock.getsockname()[1]
        return port

    async def test_bad_config_refuses_to_start(self) -> None:
        bad = self.write_config(
            "bad.yaml",
            f"""\
server:
  listen_addr: "{LOCALHOST}:{free_port()}"
  limts: {{max_body_bytes: 1MiB}}
admin:
  listen_addr: "{LOCALHOST}:{free_port()}"
upstreams:
  users: {{servers: [{{address: "{LOCALHOST}:9001"}}]}}
routes:
  - name: users
    match: {{path: /users/*}}
    upstream: userz
""",
        )
        code, output = await self.twistd(bad)
        self.assertNotIn(code, (0, 124), output)
        self.assertIn("bad.yaml: server.limts: unknown key (did you mean 'limits'?)", output)
        self.assertIn("bad.yaml: routes[0].upstream: unknown upstream 'userz'", output)
        self.assertIn("did you mean 'users'?", output)
        self.assertNotIn("Traceback", output)
        # The same problems as `txgateway check`.
        out, err, check_code = await run(
            TXGATEWAY, "check", "-c", "bad.yaml", env=child_environment(), path=str(bad.parent)
        )
        self.assertNotEqual(check_code, 0)
        problems = {line for line in (out + err).decode().splitlines() if line.startswith("bad.yaml: ")}
        self.assertEqual(len(problems), 2, out + err)
        for problem in problems:
            self.assertIn(problem, output)

    async def test_unparsable_yaml_refuses_to_start(self) -> None:
        bad = self.write_config("broken.yaml", "server: [unclosed\n  listen_addr: x\n")
        code, output = await self.twistd(bad)
        self.assertNotIn(code, (0, 124), output)
        self.assertIn("broken.yaml", output)
        self.assertNotIn("Traceback", output)

    async def test_proxy_port_in_use(self) -> None:
        port = self.listening_socket()
        config = minimal_config()
        config["server"] = {"listen_addr": f"{LOCALHOST}:{port}"}
        config["admin"] = {"listen_addr": f"{LOCALHOST}:{free_port()}"}
        code, output = await self.twistd(self.write_config("gateway.yaml", config))
        self.assertEqual(code, 1, output)
        self.assertIn(f"cannot listen on tcp:{port}:interface={LOCALHOST}", output)
        self.assertIn("Address already in use", output)
        self.assertNotIn("Traceback", output)

    async def test_admin_port_in_use(self) -> None:
        port = self.listening_socket()
        config = minimal_config()
        config["server"] = {"listen_addr": f"{LOCALHOST}:{free_port()}"}
        config["admin"] = {"listen_addr": f"{LOCALHOST}:{port}"}
        code, output = await self.twistd(self.write_config("gateway.yaml", config))
        self.assertEqual(code, 1, output)
        self.assertIn(f"cannot listen on tcp:{port}:interface={LOCALHOST}", output)
        self.assertNotIn("Traceback", output)

    async def test_health_ready_and_clean_shutdown(self) -> None:
        echo = EchoUpstream()
        upstream_port = echo.listen(0)
        self.addCleanup(echo.stop)
        gateway = GatewayProcess(minimal_config(upstream_port))
        self.addCleanup(gateway.stop)
        await gateway.start()
        admin = f"http://{LOCALHOST}:{gateway.admin_port}"
        health = await curl(f"{admin}/health")
        self.assertEqual(health.status, 200)
        self.assertEqual(json.loads(health.body), {"status": "ok"})
        ready = await curl(f"{admin}/ready")
        self.assertEqual(ready.status, 200)
        self.assertEqual(json.loads(ready.body)["status"], "ready")
        proxied = await curl(gateway.url("/users/1"))
        self.assertEqual(proxied.status, 200)
        self.assertEqual(json.loads(proxied.body)["path"], "/users/1")
        await gateway.stop()
        log = gateway.log()
        # twistd shuts down cleanly on SIGTERM, then re-raises it so the
        # status says what ended it (Twisted's _exitSignal).
        self.assertIn(exit_signal(gateway.exit_reason), (None, signal.SIGTERM), log)
        if exit_signal(gateway.exit_reason) is None:
            self.assertEqual(exit_code(gateway.exit_reason), 0, log)  # type: ignore[arg-type]
        self.assertIn("Received SIGTERM, shutting down.", log)
        self.assertIn("Server Shut Down.", log)
        self.assertNotIn("Traceback", log)

    async def test_plugin_found_after_normal_install(self) -> None:
        """``pip install`` (not editable) of this checkout: twistd finds the txgateway plugin.

        The checkout is copied first so the build leaves nothing in it.  The
        venv's editable install puts the checkout itself on ``sys.path``; the
        probe removes it, so only the installed copy can answer.
        """
        work = Path(self.mktemp()).resolve()
        source, target, elsewhere = work / "source", work / "target", work / "elsewhere"
        shutil.copytree(
            ROOT,
            source,
            ignore=shutil.ignore_patterns(
                ".git", ".venv", "_trial_temp*", "build", "dist", "*.egg-info", "__pycache__",
                ".mypy_cache", ".ruff_cache", ".hypothesis", "dropin.cache",
            ),
        )  # fmt: skip
        elsewhere.mkdir()
        pip = (PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target))
        out, err, code = await run(
            TIMEOUT, "300", *pip, "--no-build-isolation", str(source), env=child_environment(), path=str(elsewhere)
        )
        how = "--no-build-isolation"
        if code != 0:
            output = (out + err).decode("utf-8", "replace")
            if "bdist_wheel" not in output and "wheel" not in output and "setuptools" not in output:
                self.fail(f"pip install --no-build-isolation failed:\n{output}")
            # The venv lacks the build backend's requirements (pyproject.toml:
            # setuptools>=68 and wheel); a normal isolated build fetches them.
            print(
                "\n  note: pip install --no-build-isolation failed, the venv lacks the build requirements "
                "(setuptools>=68, wheel); retrying with build isolation",
                end=" ",
            )
            shutil.rmtree(target, ignore_errors=True)
            out, err, code = await run(TIMEOUT, "300", *pip, str(source), env=child_environment(), path=str(elsewhere))
            if code != 0:
                raise SkipTest(
                    "cannot build the package: --no-build-isolation needs setuptools>=68 and wheel in the venv, "
                    f"and an isolated build failed too:\n{(out + err).decode('utf-8', 'replace')[-2000:]}"
                )
            how = "build isolation"
        probe = f"""
import os, sys
target = os.path.realpath({str(target)!r})
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") == target
               or not os.path.exists(os.path.join(p or ".", "txgateway", "__init__.py"))]
from twisted.plugin import getPlugins
from twisted.application.service import IServiceMaker
import twisted.plugins
names = [p.tapname for p in getPlugins(IServiceMaker)]
import txgateway.tap
print(names)
print(sys.modules["twisted.plugins.txgateway_plugin"].__file__)
print(txgateway.tap.__file__)
"""
        env = child_environment(PYTHONPATH=str(target))
        out, err, code = await run(PYTHON, "-c", probe, env=env, path=str(elsewhere))
        self.assertEqual(code, 0, (out + err).decode())
        names, plugin_file, tap_file = out.decode().strip().splitlines()[-3:]
        self.assertIn("'txgateway'", names, f"installed with {how}")
        self.assertTrue(plugin_file.startswith(str(target)), plugin_file)
        self.assertTrue(tap_file.startswith(str(target)), tap_file)
