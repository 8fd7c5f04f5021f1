"""The demo upstream: an echo service so the default config works out of the box.

``twistd -n txgateway -c etc/gateway.yaml --demo`` runs it inside the gateway
process on 127.0.0.1:9001; ``txgateway demo`` runs it alone.  It answers every
request with a JSON description of what it received (method, path, query,
headers, body size and SHA-256), which is also what the integration tests
use to see exactly what the gateway forwarded.
"""

from __future__ import annotations

import hashlib
import json

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IReactorTCP
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site


class Echo(Resource):
    isLeaf = True
    log = Logger()

    def render(self, request: Request) -> bytes:
        content = request.content.read() if request.content is not None else b""
        headers = [
            [name.decode("latin-1"), value.decode("latin-1")]
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        ]
        payload = {
            "service": "txgateway-demo",
            "method": request.method.decode("latin-1"),
            "path": request.path.decode("latin-1"),
            "query": request.uri.partition(b"?")[2].decode("latin-1"),
            "headers": headers,
            "body_bytes": len(content),
            "body_sha256": hashlib.sha256(content).hexdigest(),
        }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(payload, indent=2).encode("utf-8") + b"\n"


def demo_site() -> Site:
    site = Site(Echo())
    site.noisy = False
    return site


def demo_service(reactor: IReactorTCP, interface: str = "127.0.0.1", port: int = 9001) -> StreamServerEndpointService:
    service = StreamServerEndpointService(TCP4ServerEndpoint(reactor, port, interface=interface), demo_site())
    service._raiseSynchronously = True
    return service


def run_demo(interface: str = "127.0.0.1", port: int = 9001) -> int:
    """Run the echo service alone until interrupted (``txgateway demo``)."""
    import sys

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    reactor.listenTCP(port, demo_site(), interface=interface)  # type: ignore[attr-defined,arg-type,unused-ignore]
    Logger().info("demo echo upstream on http://{interface}:{port}/", interface=interface, port=port)
    reactor.run()  # type: ignore[attr-defined,unused-ignore]
    return 0
