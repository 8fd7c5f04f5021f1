"""An admin page: one JSON answer per request, failures rendered the gateway's way.

Every admin answer, the successes and the refusals, is JSON with
``cache-control: no-store``; refusals are :class:`~txgateway.errors.GatewayError`
rendered by :func:`~txgateway.errors.render_json`, as on the proxy listener,
so no admin path ever answers with twisted.web's HTML error pages.
"""

from __future__ import annotations

import json
from typing import ClassVar

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from txgateway.errors import GatewayError, MethodNotAllowed, NotFound, render_json

#: What an admin page answers: a status and a JSON document.
Answer = tuple[int, object]


class NoSuchEndpoint(NotFound):
    default_message = "no such admin endpoint"


def write_json(request: Request, status: int, payload: object) -> bytes:
    """Set the status and headers of a JSON answer and return its body."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")


def write_error(request: Request, error: GatewayError) -> bytes:
    status, headers, body = render_json(error, None)
    request.setResponseCode(status)
    for name, value in headers:
        request.setHeader(name, value)
    return body


class ErrorPage(Resource):
    """Answers every request with ``error`` (unknown path, refused token...)."""

    isLeaf = True

    def __init__(self, error: GatewayError) -> None:
        super().__init__()
        self._error = error

    def render(self, request: Request) -> bytes:
        return write_error(request, self._error)


class JSONPage(Resource):
    """A leaf answering ``answer(request)`` as JSON for the methods in ``allowed``.

    Other methods get 405 with ``Allow``, deeper paths 404, and an unexpected
    exception a logged 500 without details: never a traceback, never HTML.
    """

    isLeaf = True
    allowed: ClassVar[tuple[str, ...]] = ("GET", "HEAD")
    log = Logger()

    def answer(self, request: Request) -> Answer:
        raise NotImplementedError

    def render(self, request: Request) -> bytes:
        if request.postpath and request.postpath != [b""]:
            return write_error(request, NoSuchEndpoint())
        method = request.method.decode("latin-1")
        if method not in self.allowed:
            message = f"{method} is not allowed here; use {' or '.join(self.allowed)}"
            return write_error(request, MethodNotAllowed(self.allowed, message))
        try:
            status, payload = self.answer(request)
        except GatewayError as error:
            return write_error(request, error)
        except Exception:  # noqa: BLE001 - a bug answers 500, never a traceback
            self.log.failure(
                "admin page {path} failed", path=b"/".join(request.prepath or []).decode("latin-1", "replace")
            )
            return write_error(request, GatewayError("the admin page failed; see the gateway log"))
        return write_json(request, status, payload)
