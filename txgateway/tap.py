"""``twistd txgateway``: options and the service it runs."""

from __future__ import annotations

import sys

from twisted.application.service import IService
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
        ["worker", None, "Internal: run as a worker of a supervisor (server.workers > 1)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["inherit"] = []

    def opt_inherit(self, value: str) -> None:
        """Internal (with --worker): listen on the inherited socket FD for the
        endpoint DESCRIPTION instead of binding it: DESCRIPTION=FD (repeatable)."""
        self["inherit"].append(value)

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("a configuration file is required: -c FILE")
        if self["inherit"] and not self["worker"]:
            raise usage.UsageError("--inherit is for workers (--worker) only")
        if self["worker"]:
            from txgateway.workers import become_worker, parse_inherited

            become_worker()
            try:
                self["inherited"] = parse_inherited(self["inherit"])
            except ValueError as error:
                raise usage.UsageError(str(error)) from None
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

    from txgateway.heap import Heap
    from txgateway.service import GatewayService

    config = options["gateway_config"]
    if options["worker"]:
        # The supervisor runs the demo upstream, if any.
        return GatewayService(config, reactor, watch=True, inherited=options["inherited"], heap=Heap(reactor))
    if config.server.workers > 1:
        from txgateway.workers import WorkerSupervisor

        supervisor = WorkerSupervisor(config, options["config"], reactor, owns_process=True)
        if options["demo"]:
            from txgateway.demo import demo_service

            # A child: it stops only after every worker has drained.
            demo_service(reactor, "127.0.0.1", options["demo-port"]).setServiceParent(supervisor)
        return supervisor
    gateway = GatewayService(config, reactor, watch=True, heap=Heap(reactor))
    if not options["demo"]:
        return gateway
    from txgateway.demo import demo_service

    # A child of the gateway: it starts first and stops only after the
    # gateway has drained the requests it was serving.
    demo_service(reactor, "127.0.0.1", options["demo-port"]).setServiceParent(gateway)
    return gateway
