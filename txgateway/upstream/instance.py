"""One server of an upstream, as the balancers and the forwarder see it."""

from __future__ import annotations


class Instance:
    __slots__ = ("address", "host", "port", "weight")

    def __init__(self, host: str, port: int, weight: int = 1) -> None:
        self.host = host
        self.port = port
        self.weight = weight
        #: "host:port", for logs, metrics and the access log.
        self.address = f"{host}:{port}"

    def __repr__(self) -> str:
        return f"<Instance {self.address}>"
