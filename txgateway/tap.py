"""``twistd txgateway``: options and the service it runs."""

from __future__ import annotations

import sys

from twisted.application.service import IService, MultiService
from twisted.python import usage

from txgateway.config import ConfigError, load_config


class Options(usage.Options):
    synopsis = "-c CONFIG [--demo]"
    longdesc = "Run the txgateway API gateway on a YAML configuration file."
    optParameters = [
        ["config", "c", None, "Path of the YAML configuration file."],
        ["demo-port", None, 9001, "Port of the demo echo upstream (with --demo).", int],
    ]
    optFlags = [
        ["demo", None, "Also run the demo echo upstream on 127.0.0.1 (see etc/gateway.yaml)."],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("a configuration file is required: -c FILE")
        try:
            self["gateway_config"] = load_config(self["config"])
        except ConfigError as error:
            # The same messages as `txgateway check`, and no traceback.
            print(str(error), file=sys.stderr)
            print(
                f"txgateway: refusing to start: {len(error.problems)} problem(s) in {self['config']}",
                file=sys.stderr,
            )
            raise SystemExit(1) from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from txgateway.service import GatewayService

    gateway = GatewayService(options["gateway_config"], reactor)
    if not options["demo"]:
        return gateway
    from txgateway.demo import demo_service

    top = MultiService()
    demo_service(reactor, "127.0.0.1", options["demo-port"]).setServiceParent(top)
    gateway.setServiceParent(top)
    return top
