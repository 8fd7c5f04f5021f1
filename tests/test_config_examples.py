"""Every example configuration shipped under etc/ passes ``txgateway check``."""

from __future__ import annotations

import io
import os
import sys

from twisted.trial.unittest import SynchronousTestCase

from txgateway.cli import main

ETC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc")

#: Variables an example documents as required (the seed's ${JWT_SECRET} has no default).
REQUIRED_ENVIRONMENT = {"fechatter.yaml": {"JWT_SECRET": "example-secret"}}


def example_files() -> list[str]:
    found: list[str] = []
    for directory, _, names in os.walk(ETC):
        found.extend(os.path.join(directory, name) for name in names if name.endswith((".yaml", ".yml")))
    return sorted(found)


class ExampleTests(SynchronousTestCase):
    def test_examples_exist(self) -> None:
        names = {os.path.relpath(path, ETC) for path in example_files()}
        self.assertTrue({"examples/fechatter.yaml", "examples/full.yaml"} <= names, names)

    def test_every_example_passes_check(self) -> None:
        failures = []
        for path in example_files():
            out, err = io.StringIO(), io.StringIO()
            self.patch(sys, "stdout", out)
            self.patch(sys, "stderr", err)
            self.patch(os, "environ", dict(REQUIRED_ENVIRONMENT.get(os.path.basename(path), {})))
            if main(["check", "-c", path]) != 0:
                failures.append(err.getvalue())
        self.assertEqual(failures, [])
