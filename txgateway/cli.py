"""The ``txgateway`` command: ``check``, ``demo`` and ``version``.

``txgateway check -c FILE`` is what CI and humans run before a deploy: it
loads the file exactly as the gateway would and either shows what would be
served (listeners and the route table, exit 0) or lists every problem as
``FILE: path: message`` on stderr (exit 1).  It never shows a traceback for
a bad file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from txgateway import __version__
from txgateway.config import ConfigError, GatewayConfig, load_config
from txgateway.config.model import UpstreamConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="txgateway", description="txgateway, an API gateway on Twisted.")
    parser.add_argument("--version", action="version", version=f"txgateway {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = commands.add_parser("check", help="validate a configuration file and show what it serves")
    check.add_argument("-c", "--config", required=True, metavar="FILE", help="the YAML configuration file")

    demo = commands.add_parser("demo", help="run the demo echo upstream on its own")
    demo.add_argument("--interface", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    demo.add_argument("--port", type=int, default=9001, help="port to listen on (default: %(default)s)")

    commands.add_parser("version", help="print the version")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command in ``argv`` (default ``sys.argv[1:]``); the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 2)
    if args.command == "check":
        return check(args.config, sys.stdout, sys.stderr)
    if args.command == "demo":
        from txgateway.demo import run_demo

        return run_demo(args.interface, args.port)
    if args.command == "version":
        print(f"txgateway {__version__}", file=sys.stdout)
        return 0
    parser.print_help(sys.stderr)
    return 2


def check(path: str, out: TextIO, err: TextIO) -> int:
    """Validate ``path``; a summary on ``out`` (0) or every problem on ``err`` (1)."""
    try:
        config = load_config(path)
    except ConfigError as error:
        for line in error.lines():
            print(line, file=err)
        return 1
    out.write(describe_config(config, path))
    return 0


def describe_config(config: GatewayConfig, path: str) -> str:
    """Listeners and route table of a valid configuration, as ``check`` prints them."""
    lines = [f"{path}: OK", "", "Listeners:"]
    listeners = [("http", endpoint) for endpoint in config.server.listen]
    if config.server.tls is not None:
        listeners.append(("https", config.server.tls.listen))
    listeners.append(("admin", config.admin.listen))
    lines.extend(_table([(kind, endpoint) for kind, endpoint in listeners], indent="  "))
    lines.append("")
    if not config.routes:
        lines.append("Routes: none (every request is answered 404 not_found)")
        return "\n".join(lines) + "\n"
    rows: list[tuple[str, ...]] = []
    for route in config.routes:
        upstream = config.upstreams.get(route.upstream)
        rewrite = []
        if route.strip_prefix:
            rewrite.append(f"strip {route.strip_prefix}")
        if route.rewrite:
            rewrite.append(f"rewrite {route.rewrite}")
        rows.append(
            (
                route.name,
                ",".join(route.match.methods) or "*",
                route.match.host or "*",
                route.match.path,
                _describe_upstream(route.upstream, upstream),
                "; ".join(rewrite),
            )
        )
    header: tuple[str, ...] = ("NAME", "METHODS", "HOST", "PATH", "UPSTREAM", "REWRITE")
    if not any(row[-1] for row in rows):
        header, rows = header[:-1], [row[:-1] for row in rows]
    lines.append(f"Routes ({len(rows)}):")
    lines.extend(_table([header, *rows], indent="  "))
    return "\n".join(lines) + "\n"


def _describe_upstream(name: str, upstream: UpstreamConfig | None) -> str:
    if upstream is None:
        return name
    targets = [
        server.address if server.weight == 1 else f"{server.address} (weight {server.weight})"
        for server in upstream.servers
    ]
    if upstream.discovery is not None:
        discovery = upstream.discovery
        port = f":{discovery.port}" if discovery.port is not None else ""
        targets.append(f"{discovery.type} {discovery.name}{port}")
    protocol = f" [{upstream.protocol}]" if upstream.protocol != "http" else ""
    return f"{name}{protocol} -> {', '.join(targets)}"


def _table(rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        (indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))).rstrip()
        for row in rows
    ]
