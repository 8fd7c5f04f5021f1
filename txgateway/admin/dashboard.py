"""The dashboard: a read-only page at ``/`` on the admin listener.

Plain HTML, CSS and JavaScript from ``txgateway/admin/static/`` (shipped in
the package, no CDN, no build step), read once when the admin site is built.
The page polls ``/admin/stats`` and asks for the admin token when it gets a
401; it keeps the token in ``sessionStorage`` and sends it as a bearer
header.  Only the shipped files are served (``/`` and ``/static/NAME``); no
directory listing, and anything else is the admin JSON 404.
"""

from __future__ import annotations

from importlib.resources import files

from twisted.web.resource import Resource
from twisted.web.server import Request

from txgateway.admin.page import ErrorPage, NoSuchEndpoint, write_error
from txgateway.errors import MethodNotAllowed

CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
    ".ico": b"image/x-icon",
}

#: The page loads nothing but its own files and talks to nothing but this listener.
SECURITY_HEADERS = (
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)


def static_files() -> dict[str, tuple[bytes, bytes]]:
    """Every shipped dashboard file: name -> (content type, content)."""
    found: dict[str, tuple[bytes, bytes]] = {}
    directory = files("txgateway.admin").joinpath("static")
    for entry in directory.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES:
            found[entry.name] = (CONTENT_TYPES[suffix], entry.read_bytes())
    return found


class StaticFile(Resource):
    isLeaf = True

    def __init__(self, content_type: bytes, content: bytes) -> None:
        super().__init__()
        self._content_type = content_type
        self._content = content

    def render(self, request: Request) -> bytes:
        if request.postpath and request.postpath != [b""]:
            return write_error(request, NoSuchEndpoint())
        if request.method not in (b"GET", b"HEAD"):
            return write_error(request, MethodNotAllowed(("GET", "HEAD")))
        request.setHeader(b"content-type", self._content_type)
        request.setHeader(b"cache-control", b"no-cache")
        for name, value in SECURITY_HEADERS:
            request.setHeader(name, value)
        return self._content


class StaticDirectory(Resource):
    """``/static/NAME``: one of the shipped files, or the JSON 404."""

    def __init__(self, shipped: dict[str, tuple[bytes, bytes]]) -> None:
        super().__init__()
        self._files = {name.encode("utf-8"): StaticFile(*item) for name, item in shipped.items()}

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self._files.get(path) or ErrorPage(NoSuchEndpoint())

    def render(self, request: Request) -> bytes:
        return write_error(request, NoSuchEndpoint())


def dashboard() -> tuple[StaticFile, StaticDirectory]:
    """The page for ``/`` and the resource for ``/static/``."""
    shipped = static_files()
    content_type, content = shipped["index.html"]
    return StaticFile(content_type, content), StaticDirectory(shipped)
