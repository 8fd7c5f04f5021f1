"""The real tools the suite drives (redis-server, etcd, chromium, promtool...)."""

from __future__ import annotations

import os

from twisted.trial.unittest import FailTest, SkipTest


def missing(reason: str) -> Exception:
    """What a test raises when a tool `make test` installs is absent: a failure
    in CI (``CI`` set), where every test must really run, a skip elsewhere."""
    return FailTest(reason) if os.environ.get("CI") else SkipTest(reason)
