"""The router: from (method, host, path, headers) to a route and its upstream path.

Routes are compiled once, when the configuration is loaded, into a
:class:`~txgateway.routing.radix.RadixTree`.  A request is matched by path
priority first (static segment > ``{param}`` > wildcard, with backtracking),
then, among routes sharing a pattern, by specificity: exact host, then
``*.domain`` host, then no host; more header matchers first; then config
order.  A candidate is accepted when its host, headers and method all match;
if none is, the answer is 405 with ``Allow`` when some route matched
everything but the method, else 404.

Hosts are compared lower-cased, without ``:port`` or a trailing dot.  Header
matchers compare exact bytes (names lower-case, values UTF-8) and a header
sent several times matches if any of its values does.  A route allowing GET
also allows HEAD.  ``rewrite`` takes precedence over ``strip_prefix``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from txgateway.config.model import RouteConfig
from txgateway.errors import MethodNotAllowed, NotFound
from txgateway.routing.pattern import (
    PathPattern,
    RewriteTemplate,
    compile_pattern,
    compile_rewrite,
    compile_strip_prefix,
    normalize_path,
)
from txgateway.routing.radix import RadixTree

__all__ = ["Match", "Router", "normalize_host"]

Headers = Sequence[tuple[bytes, bytes]]


@dataclass(slots=True)
class Match:
    """The route a request matched."""

    route: RouteConfig
    #: Captured parameters, still percent-encoded; a wildcard's rest has no leading '/'.
    params: dict[str, str]
    #: The normalized path after ``strip_prefix`` / ``rewrite``, without query.
    upstream_path: str


def normalize_host(host: str) -> str:
    """``Host``/``:authority`` as routes compare it: lower-case, no port, no trailing dot."""
    host = host.lower()
    if ":" not in host and not host.endswith("."):
        return host
    if host.startswith("["):
        end = host.find("]")
        if end > 0:
            return host[: end + 1]
        return host
    colon = host.rfind(":")
    if colon >= 0:
        host = host[:colon]
    return host.rstrip(".")


class _Candidate:
    """One route, precompiled for the checks and the path work done per request."""

    __slots__ = (
        "headers",
        "host",
        "host_is_suffix",
        "methods",
        "params",
        "pattern",
        "rewrite",
        "route",
        "sort_key",
        "strip",
        "strip_slash",
    )

    def __init__(self, route: RouteConfig, order: int) -> None:
        match = route.match
        pattern = compile_pattern(match.path)
        self.route = route
        self.params = _params_builder(pattern.param_names)
        self.host: str | None = None
        self.host_is_suffix = False
        if match.host is not None:
            host = normalize_host(match.host)
            if host.startswith("*."):
                host = host[1:]
                self.host_is_suffix = True
            if not host.strip(".") or "*" in host:
                raise ValueError(f"bad host {match.host!r}: use a name or *.domain")
            self.host = host
        self.headers = tuple(
            (name.lower().encode("ascii"), value.encode("utf-8"))
            for name, value in match.headers
        )
        methods: frozenset[str] | None = None
        if match.methods:
            methods = frozenset(match.methods)
            if "GET" in methods:
                methods |= {"HEAD"}
        self.methods = methods
        self.rewrite: RewriteTemplate | None = None
        self.strip = ""
        if route.rewrite is not None:
            self.rewrite = compile_rewrite(route.rewrite, pattern.param_names)
        elif route.strip_prefix is not None:
            self.strip = compile_strip_prefix(route.strip_prefix)
        self.strip_slash = self.strip + "/"
        if self.host is None:
            host_rank: tuple[int, int] = (2, 0)
        elif self.host_is_suffix:
            host_rank = (1, -len(self.host))
        else:
            host_rank = (0, 0)
        self.sort_key = (host_rank, -len(self.headers), order)
        self.pattern: PathPattern = pattern

    def accepts_host_and_headers(self, host: str | None, headers: Headers) -> bool:
        """Whether the raw ``host`` and ``headers`` satisfy this route's matchers."""
        if self.host is not None:
            if host is None:
                return False
            host = normalize_host(host)
            if self.host_is_suffix:
                if not (host.endswith(self.host) and len(host) > len(self.host)):
                    return False
            elif host != self.host:
                return False
        return not self.headers or _has_headers(headers, self.headers)

    def upstream_path(self, path: str, captures: list[str]) -> str:
        if self.rewrite is not None:
            return self.rewrite.expand(captures)
        strip = self.strip
        if strip:
            if path == strip:
                return "/"
            if path.startswith(self.strip_slash):
                return path[len(strip) :]
        return path


def _params_builder(names: tuple[str, ...]) -> Callable[[list[str]], dict[str, str]]:
    # dict(zip(...)) costs several times a dict display: specialize the
    # usual small counts.
    if len(names) == 1:
        (a,) = names
        return lambda values: {a: values[0]}
    if len(names) == 2:
        a, b = names
        return lambda values: {a: values[0], b: values[1]}
    if len(names) == 3:
        a, b, c = names
        return lambda values: {a: values[0], b: values[1], c: values[2]}
    return lambda values: dict(zip(names, values, strict=True))


def _has_headers(headers: Headers, wanted: tuple[tuple[bytes, bytes], ...]) -> bool:
    for name, value in wanted:
        for have_name, have_value in headers:
            if have_name == name and have_value == value:
                break
        else:
            return False
    return True


_Request = tuple[str, str | None, Headers]


def _select(candidates: Sequence[_Candidate], request: _Request) -> _Candidate | None:
    # The hot path: the common route (no host, no headers) costs two
    # attribute tests and a set membership.
    method, host, headers = request
    for candidate in candidates:
        if (
            candidate.host is not None or candidate.headers
        ) and not candidate.accepts_host_and_headers(host, headers):
            continue
        methods = candidate.methods
        if methods is None or method in methods:
            return candidate
    return None


class Router:
    """Matches requests against the configured routes; build one per configuration."""

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        """Compile ``routes``; raises ``ValueError`` naming the route at fault."""
        self.routes = tuple(routes)
        candidates = []
        for order, route in enumerate(self.routes):
            try:
                candidates.append(_Candidate(route, order))
            except ValueError as e:
                raise ValueError(f"routes[{order}] ({route.name}): {e}") from None
        candidates.sort(key=lambda c: c.sort_key)
        self._tree: RadixTree[_Candidate] = RadixTree()
        for candidate in candidates:
            self._tree.insert(candidate.pattern, candidate)

    def match(
        self, method: str, host: str | None, path: str, headers: Headers
    ) -> Match:
        """The route for this request.

        ``path`` is the raw, percent-encoded path without the query string.
        Raises ``BadRequest`` for a malformed path, ``NotFound`` when no route
        matches, ``MethodNotAllowed`` (with the allowed methods) when routes
        match everything but the method.
        """
        path = normalize_path(path)
        found = self._tree.lookup(path, _select, (method, host, headers))
        if found is None:
            raise self._miss(host, path, headers)
        candidate, captures = found
        return Match(
            candidate.route,
            candidate.params(captures) if captures else {},
            candidate.upstream_path(path, captures),
        )

    def _miss(self, host: str | None, path: str, headers: Headers) -> Exception:
        allow: set[str] = set()
        for group in self._tree.candidates(path):
            for candidate in group:
                if candidate.methods is not None and candidate.accepts_host_and_headers(
                    host, headers
                ):
                    allow |= candidate.methods
        if allow:
            return MethodNotAllowed(sorted(allow))
        return NotFound()
