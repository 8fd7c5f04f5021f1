"""twistd plugin: ``twistd -n txgateway -c config.yaml``."""

from twisted.application.service import ServiceMaker

txgateway = ServiceMaker(
    "txgateway",
    "txgateway.tap",
    "An API gateway: HTTP/1.1, HTTP/2 + gRPC and WebSocket in front of your services",
    "txgateway",
)
