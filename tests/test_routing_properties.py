"""Property tests: the router agrees with a plain linear model of the contract."""

from __future__ import annotations

import string
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from txgateway.config.model import RouteConfig, RouteMatch
from txgateway.errors import BadRequest, MethodNotAllowed, NotFound
from txgateway.routing import Router, compile_pattern, normalize_path
from txgateway.routing.pattern import SegmentKind

# Small alphabets so that generated routes collide and overlap a lot.
SEGMENTS = ["a", "b", "c"]
METHODS = ["GET", "POST", "DELETE"]
HOSTS = [None, "a.com", "*.a.com"]
REQUEST_HOSTS = [None, "a.com", "x.a.com", "A.COM:80", "b.com"]

UNRESERVED = set(string.ascii_letters + string.digits + "-._~")
path_chars = st.sampled_from(list("ab.%/-~") + ["%2e", "%2E", "%2f", "%41", ".."])
raw_paths = st.lists(path_chars, max_size=12).map(lambda parts: "/" + "".join(parts))


@st.composite
def patterns(draw: st.DrawFn) -> str:
    count = draw(st.integers(0, 4))
    segments = []
    for i in range(count):
        kinds = ["static", "param"] + (["wild"] if i == count - 1 else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "static":
            segments.append(draw(st.sampled_from(SEGMENTS)))
        elif kind == "param":
            segments.append(f"{{p{i}}}")
        else:
            segments.append(draw(st.sampled_from(["*", f"{{rest{i}:*}}"])))
    if segments and "*" not in segments[-1] and draw(st.booleans()):
        segments.append("")  # trailing slash
    return "/" + "/".join(segments)


@st.composite
def route_lists(draw: st.DrawFn) -> list[RouteConfig]:
    routes = []
    for i in range(draw(st.integers(1, 12))):
        match = RouteMatch(
            path=draw(patterns()),
            methods=tuple(
                draw(st.lists(st.sampled_from(METHODS), unique=True, max_size=2))
            ),
            host=draw(st.sampled_from(HOSTS)),
            headers=draw(st.sampled_from([(), (("x", "1"),)])),
        )
        routes.append(RouteConfig(name=f"r{i}", match=match, upstream="u"))
    return routes


request_paths = st.lists(st.sampled_from(SEGMENTS + ["z"]), max_size=5).flatmap(
    lambda segs: st.sampled_from(["/" + "/".join(segs), "/" + "/".join(segs) + "/"])
)


def model_match(
    routes: Sequence[RouteConfig],
    method: str,
    host: str | None,
    path: str,
    headers: Sequence[tuple[bytes, bytes]],
) -> tuple[str, dict[str, str]] | tuple[None, tuple[str, ...]]:
    """The contract, without a tree: rank every matching route, take the best.

    Returns (route name, params) or (None, allowed methods) for a miss.
    """
    segments = normalize_path(path).split("/")[1:]
    host_name = None if host is None else host.lower().split(":")[0]
    ranked = []
    allow: set[str] = set()
    for order, route in enumerate(routes):
        captured = _match_segments(compile_pattern(route.match.path), segments)
        if captured is None:
            continue
        ranks, params = captured
        wanted = route.match.host
        if wanted is not None:
            if host_name is None:
                continue
            if wanted.startswith("*."):
                if not host_name.endswith(wanted[1:]) or host_name == wanted[1:]:
                    continue
            elif host_name != wanted:
                continue
        if any((n.encode(), v.encode()) not in headers for n, v in route.match.headers):
            continue
        methods = set(route.match.methods)
        if "GET" in methods:
            methods.add("HEAD")
        if methods and method not in methods:
            allow |= methods
            continue
        host_rank = (
            (2, 0)
            if wanted is None
            else (1, -len(wanted))
            if wanted.startswith("*.")
            else (0, 0)
        )
        key = (ranks, host_rank, -len(route.match.headers), order)
        ranked.append((key, route.name, params))
    if ranked:
        _, name, params = min(ranked)
        return name, params
    return None, tuple(sorted(allow))


def _match_segments(
    pattern: object, segments: list[str]
) -> tuple[tuple[int, ...], dict[str, str]] | None:
    ranks: list[int] = []
    params: dict[str, str] = {}
    for i, segment in enumerate(pattern.segments):  # type: ignore[attr-defined]
        if segment.kind == SegmentKind.WILDCARD:
            ranks.append(2)
            params[segment.text] = "/".join(segments[i:])
            return tuple(ranks), params
        if i >= len(segments):
            return None
        if segment.kind == SegmentKind.STATIC:
            if segment.text != segments[i]:
                return None
            ranks.append(0)
        else:
            if not segments[i]:
                return None
            ranks.append(1)
            params[segment.text] = segments[i]
    if len(pattern.segments) != len(segments):  # type: ignore[attr-defined]
        return None
    return tuple(ranks), params


class RouterModelTests(SynchronousTestCase):
    @settings(max_examples=400, deadline=None)
    @given(
        routes=route_lists(),
        method=st.sampled_from(METHODS + ["HEAD"]),
        host=st.sampled_from(REQUEST_HOSTS),
        path=request_paths,
        header=st.booleans(),
    )
    def test_router_agrees_with_model(
        self,
        routes: list[RouteConfig],
        method: str,
        host: str | None,
        path: str,
        header: bool,
    ) -> None:
        headers = [(b"x", b"1")] if header else []
        expected = model_match(routes, method, host, path, headers)
        router = Router(routes)
        try:
            found = router.match(method, host, path, headers)
        except MethodNotAllowed as e:
            self.assertEqual((None, e.allow), expected)
        except NotFound:
            self.assertEqual((None, ()), expected)
        else:
            self.assertEqual((found.route.name, found.params), expected)

    @settings(max_examples=200, deadline=None)
    @given(
        static=st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=4),
        data=st.data(),
    )
    def test_static_route_wins_for_its_exact_path(
        self, static: list[str], data: st.DataObject
    ) -> None:
        position = data.draw(st.integers(0, len(static) - 1))
        with_param = static[:position] + ["{p}"] + static[position + 1 :]
        with_wildcard = static[:position] + ["*"]
        routes = [
            RouteConfig("param", RouteMatch("/" + "/".join(with_param)), "u"),
            RouteConfig("wild", RouteMatch("/" + "/".join(with_wildcard)), "u"),
            RouteConfig("static", RouteMatch("/" + "/".join(static)), "u"),
        ]
        routes = data.draw(st.permutations(routes))
        path = "/" + "/".join(static)
        self.assertEqual(
            Router(routes).match("GET", None, path, []).route.name, "static"
        )


class NormalizePathPropertyTests(SynchronousTestCase):
    @settings(max_examples=500)
    @given(raw_paths)
    def test_never_yields_dot_or_empty_segments(self, raw: str) -> None:
        try:
            path = normalize_path(raw)
        except BadRequest:
            return  # a malformed escape
        segments = path.split("/")
        self.assertEqual(segments[0], "")
        self.assertNotIn("..", segments)
        self.assertNotIn(".", segments)
        self.assertNotIn("", segments[1:-1])
        for escape in path.split("%")[1:]:
            self.assertEqual(escape[:2], escape[:2].upper())
            self.assertNotIn(chr(int(escape[:2], 16)), UNRESERVED)
        self.assertEqual(normalize_path(path), path)
