"""The floor of a Python proxy on Twisted: the least an HTTP/1.1 relay can do.

Issue 9 measured "a bare Twisted protocol with the httptools parser on both
sides" at 0.55x nginx before any gateway code existed.  This is that program,
so the suite can show the same ceiling in the same run as the gateway: it
parses each request with httptools, sends it on over one keep-alive
connection to the upstream per client connection, parses the answer with
httptools and writes it back.  No routing, no header rules, no timeouts, no
error handling beyond closing: it is a measuring stick, never a server.

    python bench/reference_proxy.py LISTEN_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import sys

import httptools
from twisted.internet import reactor
from twisted.internet.protocol import ClientFactory, Factory, Protocol


class Upstream(Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.parts: list[bytes] = []

    def connectionMade(self) -> None:
        self.client.upstream_ready(self)

    def dataReceived(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.parts = [b"HTTP/1.1 %d OK\r\n" % self.parser.get_status_code()]

    def on_header(self, name: bytes, value: bytes) -> None:
        self.parts.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        self.parts[0] = b"HTTP/1.1 %d OK\r\n" % self.parser.get_status_code()
        self.parts.append(b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.parts.append(body)

    def on_message_complete(self) -> None:
        self.client.transport.write(b"".join(self.parts))

    def connectionLost(self, reason: object = None) -> None:
        self.client.transport.loseConnection()


class UpstreamFactory(ClientFactory):
    def __init__(self, client: Client) -> None:
        self.client = client

    def buildProtocol(self, addr: object) -> Upstream:
        return Upstream(self.client)

    def clientConnectionFailed(self, connector: object, reason: object) -> None:
        self.client.transport.loseConnection()


class Client(Protocol):
    upstream_port = 0

    def connectionMade(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.upstream: Upstream | None = None
        self.waiting: bytes = b""
        self.parts: list[bytes] = []
        reactor.connectTCP("127.0.0.1", self.upstream_port, UpstreamFactory(self))

    def upstream_ready(self, upstream: Upstream) -> None:
        self.upstream = upstream
        if self.waiting:
            upstream.transport.write(self.waiting)
            self.waiting = b""

    def dataReceived(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.parts = [self.parser.get_method() + b" " + url + b" HTTP/1.1\r\n"]

    def on_header(self, name: bytes, value: bytes) -> None:
        self.parts.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        self.parts.append(b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.parts.append(body)

    def on_message_complete(self) -> None:
        request = b"".join(self.parts)
        if self.upstream is None:
            self.waiting += request
        else:
            self.upstream.transport.write(request)

    def connectionLost(self, reason: object = None) -> None:
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


def main() -> None:
    listen, upstream = int(sys.argv[1]), int(sys.argv[2])
    Client.upstream_port = upstream
    reactor.listenTCP(listen, Factory.forProtocol(Client), backlog=4096, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
