"""Router: which route a request gets, its parameters and its upstream path."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.trial.unittest import SynchronousTestCase

from txgateway.config.model import RouteConfig, RouteMatch
from txgateway.errors import BadRequest, MethodNotAllowed, NotFound
from txgateway.routing import Match, Router


def route(
    name: str,
    path: str,
    methods: Sequence[str] = (),
    host: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    strip_prefix: str | None = None,
    rewrite: str | None = None,
) -> RouteConfig:
    return RouteConfig(
        name=name,
        match=RouteMatch(
            path=path, methods=tuple(methods), host=host, headers=tuple(headers)
        ),
        upstream="backend",
        strip_prefix=strip_prefix,
        rewrite=rewrite,
    )


def match(
    router: Router,
    path: str,
    method: str = "GET",
    host: str | None = None,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> Match:
    return router.match(method, host, path, headers)


def name(router: Router, path: str, **kwargs: object) -> str:
    return match(router, path, **kwargs).route.name  # type: ignore[arg-type]


class PathMatchingTests(SynchronousTestCase):
    def test_static(self) -> None:
        router = Router([route("health", "/health"), route("root", "/")])
        found = match(router, "/health")
        self.assertEqual(found.route.name, "health")
        self.assertEqual(found.params, {})
        self.assertEqual(found.upstream_path, "/health")
        self.assertEqual(name(router, "/"), "root")

    def test_params_are_raw(self) -> None:
        router = Router([route("order", "/users/{id}/orders/{oid}")])
        found = match(router, "/users/a%20b/orders/x%2Fy")
        self.assertEqual(found.params, {"id": "a%20b", "oid": "x%2Fy"})

    def test_many_params(self) -> None:
        router = Router([route("deep", "/{a}/{b}/{c}/{d}/{e}")])
        self.assertEqual(
            match(router, "/1/2/3/4/5").params,
            {"a": "1", "b": "2", "c": "3", "d": "4", "e": "5"},
        )

    def test_param_is_one_non_empty_segment(self) -> None:
        router = Router([route("user", "/users/{id}")])
        for path in ["/users", "/users/", "/users/1/2", "/users/1/"]:
            self.assertRaises(NotFound, match, router, path)

    def test_trailing_slash_is_significant(self) -> None:
        router = Router([route("list", "/users"), route("slash", "/users/")])
        self.assertEqual(name(router, "/users"), "list")
        self.assertEqual(name(router, "/users/"), "slash")
        self.assertRaises(NotFound, match, Router([route("list", "/users")]), "/users/")

    def test_wildcard_matches_rest_including_empty(self) -> None:
        router = Router([route("static", "/static/*")])
        for path, rest in [
            ("/static", ""),
            ("/static/", ""),
            ("/static/a", "a"),
            ("/static/a/b", "a/b"),
            ("/static/a/b/", "a/b/"),
        ]:
            found = match(router, path)
            self.assertEqual(found.params, {"*": rest}, path)
            self.assertEqual(found.upstream_path, path)
        self.assertRaises(NotFound, match, router, "/staticx")

    def test_named_wildcard(self) -> None:
        router = Router([route("files", "/files/{bucket}/{key:*}")])
        found = match(router, "/files/b1/dir/file.txt")
        self.assertEqual(found.params, {"bucket": "b1", "key": "dir/file.txt"})

    def test_catch_all(self) -> None:
        router = Router([route("all", "/*")])
        self.assertEqual(match(router, "/").params, {"*": ""})
        self.assertEqual(match(router, "/x/y").params, {"*": "x/y"})

    def test_not_found(self) -> None:
        router = Router([route("user", "/users/{id}")])
        with self.assertRaises(NotFound) as caught:
            match(router, "/orders/1")
        self.assertEqual(caught.exception.status, 404)

    def test_no_routes(self) -> None:
        self.assertRaises(NotFound, match, Router([]), "/")


class PriorityTests(SynchronousTestCase):
    def test_static_then_param_then_wildcard(self) -> None:
        # Config order is the reverse of the priority on purpose.
        router = Router(
            [
                route("wild", "/users/*"),
                route("param", "/users/{id}"),
                route("static", "/users/me"),
            ]
        )
        self.assertEqual(name(router, "/users/me"), "static")
        self.assertEqual(name(router, "/users/42"), "param")
        self.assertEqual(name(router, "/users/42/x"), "wild")
        self.assertEqual(name(router, "/users"), "wild")

    def test_backtracks_from_static_to_param(self) -> None:
        router = Router([route("static", "/a/b/c"), route("param", "/a/{x}/d")])
        found = match(router, "/a/b/d")
        self.assertEqual(found.route.name, "param")
        self.assertEqual(found.params, {"x": "b"})

    def test_backtracks_to_wildcard(self) -> None:
        router = Router(
            [
                route("static", "/a/b/c"),
                route("param", "/a/{x}/d"),
                route("wild", "/a/*"),
            ]
        )
        found = match(router, "/a/b/e")
        self.assertEqual(found.route.name, "wild")
        self.assertEqual(found.params, {"*": "b/e"})

    def test_backtracks_to_shallower_wildcard(self) -> None:
        router = Router([route("deep", "/a/{x}/{y}/z"), route("wild", "/*")])
        found = match(router, "/a/1/2/q")
        self.assertEqual(found.route.name, "wild")
        self.assertEqual(found.params, {"*": "a/1/2/q"})

    def test_exact_end_beats_wildcard_at_same_place(self) -> None:
        router = Router([route("wild", "/docs/*"), route("exact", "/docs")])
        self.assertEqual(name(router, "/docs"), "exact")
        self.assertEqual(name(router, "/docs/"), "wild")

    def test_param_names_may_differ_between_routes(self) -> None:
        router = Router([route("u", "/users/{id}"), route("p", "/users/{uid}/posts")])
        self.assertEqual(match(router, "/users/1").params, {"id": "1"})
        self.assertEqual(match(router, "/users/2/posts").params, {"uid": "2"})

    def test_method_mismatch_backtracks(self) -> None:
        router = Router(
            [
                route("me", "/users/me", methods=["GET"]),
                route("delete", "/users/{id}", methods=["DELETE"]),
            ]
        )
        self.assertEqual(name(router, "/users/me", method="GET"), "me")
        self.assertEqual(name(router, "/users/me", method="DELETE"), "delete")

    def test_ten_thousand_routes_all_reachable(self) -> None:
        routes = []
        for i in range(2500):
            routes.append(route(f"o{i}", f"/svc{i}/users/{{id}}/orders/{{oid}}"))
            routes.append(route(f"h{i}", f"/svc{i}/health"))
            routes.append(route(f"s{i}", f"/svc{i}/static/*"))
            routes.append(route(f"u{i}", f"/svc{i}/users/{{id}}"))
        router = Router(routes)
        for i in range(0, 2500, 7):
            self.assertEqual(name(router, f"/svc{i}/users/1/orders/2"), f"o{i}")
            self.assertEqual(name(router, f"/svc{i}/health"), f"h{i}")
            self.assertEqual(name(router, f"/svc{i}/static/a.css"), f"s{i}")
            self.assertEqual(name(router, f"/svc{i}/users/1"), f"u{i}")
        self.assertRaises(NotFound, match, router, "/svc2500/health")


class MethodTests(SynchronousTestCase):
    def test_405_with_sorted_allow(self) -> None:
        router = Router([route("user", "/users/{id}", methods=["PUT", "GET"])])
        self.assertEqual(name(router, "/users/1", method="PUT"), "user")
        with self.assertRaises(MethodNotAllowed) as caught:
            match(router, "/users/1", method="DELETE")
        error = caught.exception
        self.assertEqual(error.status, 405)
        self.assertEqual(error.allow, ("GET", "HEAD", "PUT"))
        self.assertEqual(error.headers, [(b"allow", b"GET, HEAD, PUT")])

    def test_allow_is_the_union_of_matching_routes(self) -> None:
        router = Router(
            [
                route("read", "/items/{id}", methods=["GET"]),
                route("write", "/items/{id}", methods=["POST"]),
                route("wild", "/items/*", methods=["DELETE"]),
                route("other", "/orders/{id}", methods=["PATCH"]),
            ]
        )
        with self.assertRaises(MethodNotAllowed) as caught:
            match(router, "/items/1", method="PATCH")
        self.assertEqual(caught.exception.allow, ("DELETE", "GET", "HEAD", "POST"))

    def test_empty_methods_allow_any(self) -> None:
        router = Router([route("any", "/x")])
        for method in ["GET", "POST", "DELETE", "OPTIONS", "PURGE"]:
            self.assertEqual(name(router, "/x", method=method), "any")

    def test_head_matches_get(self) -> None:
        router = Router([route("get", "/x", methods=["GET"])])
        self.assertEqual(name(router, "/x", method="HEAD"), "get")

    def test_head_without_get_is_405(self) -> None:
        router = Router([route("post", "/x", methods=["POST"])])
        with self.assertRaises(MethodNotAllowed) as caught:
            match(router, "/x", method="HEAD")
        self.assertEqual(caught.exception.allow, ("POST",))

    def test_no_405_for_routes_excluded_by_host(self) -> None:
        router = Router([route("api", "/x", methods=["GET"], host="api.example.com")])
        self.assertRaises(
            NotFound, match, router, "/x", method="POST", host="other.com"
        )
        with self.assertRaises(MethodNotAllowed):
            match(router, "/x", method="POST", host="api.example.com")


class HostTests(SynchronousTestCase):
    def setUp(self) -> None:
        # Config order is the reverse of the specificity on purpose.
        self.router = Router(
            [
                route("any", "/h"),
                route("wild", "/h", host="*.example.com"),
                route("exact", "/h", host="api.example.com"),
            ]
        )

    def test_exact_then_wildcard_then_none(self) -> None:
        self.assertEqual(name(self.router, "/h", host="api.example.com"), "exact")
        self.assertEqual(name(self.router, "/h", host="www.example.com"), "wild")
        self.assertEqual(name(self.router, "/h", host="other.org"), "any")
        self.assertEqual(name(self.router, "/h", host=None), "any")

    def test_case_and_port_ignored(self) -> None:
        self.assertEqual(name(self.router, "/h", host="API.Example.COM:8443"), "exact")
        self.assertEqual(name(self.router, "/h", host="api.example.com."), "exact")
        self.assertEqual(name(self.router, "/h", host="WWW.example.com:80"), "wild")

    def test_wildcard_host_needs_a_subdomain(self) -> None:
        router = Router([route("wild", "/h", host="*.example.com")])
        self.assertEqual(name(router, "/h", host="a.b.example.com"), "wild")
        for host in ["example.com", "badexample.com", None]:
            self.assertRaises(NotFound, match, router, "/h", host=host)

    def test_longer_wildcard_is_more_specific(self) -> None:
        router = Router(
            [
                route("broad", "/h", host="*.example.com"),
                route("narrow", "/h", host="*.eu.example.com"),
            ]
        )
        self.assertEqual(name(router, "/h", host="a.eu.example.com"), "narrow")
        self.assertEqual(name(router, "/h", host="a.us.example.com"), "broad")

    def test_route_host_written_with_case_and_port(self) -> None:
        router = Router([route("r", "/h", host="API.example.com:8080")])
        self.assertEqual(name(router, "/h", host="api.example.com"), "r")

    def test_ipv6_host(self) -> None:
        router = Router([route("v6", "/h", host="[::1]")])
        self.assertEqual(name(router, "/h", host="[::1]:8080"), "v6")

    def test_path_priority_comes_before_host(self) -> None:
        router = Router(
            [
                route("param", "/users/{id}", host="api.example.com"),
                route("static", "/users/me"),
            ]
        )
        self.assertEqual(name(router, "/users/me", host="api.example.com"), "static")

    def test_bad_host(self) -> None:
        for host in ["*", "*.", "a.*.com"]:
            self.assertRaises(ValueError, Router, [route("r", "/", host=host)])


class HeaderTests(SynchronousTestCase):
    def test_exact_value_match(self) -> None:
        router = Router(
            [
                route("v1", "/api"),
                route("v2", "/api", headers=[("X-API-Version", "2")]),
            ]
        )
        self.assertEqual(name(router, "/api", headers=[(b"x-api-version", b"2")]), "v2")
        self.assertEqual(name(router, "/api", headers=[(b"x-api-version", b"3")]), "v1")
        self.assertEqual(
            name(router, "/api", headers=[(b"x-api-version", b"2 ")]), "v1"
        )
        self.assertEqual(name(router, "/api"), "v1")

    def test_more_header_matchers_first(self) -> None:
        router = Router(
            [
                route("one", "/api", headers=[("a", "1")]),
                route("two", "/api", headers=[("a", "1"), ("b", "2")]),
            ]
        )
        both = [(b"a", b"1"), (b"b", b"2")]
        self.assertEqual(name(router, "/api", headers=both), "two")
        self.assertEqual(name(router, "/api", headers=[(b"a", b"1")]), "one")

    def test_any_occurrence_of_a_repeated_header(self) -> None:
        router = Router([route("r", "/api", headers=[("x-tenant", "b")])])
        headers = [(b"x-tenant", b"a"), (b"x-tenant", b"b")]
        self.assertEqual(name(router, "/api", headers=headers), "r")

    def test_unmatched_headers_404(self) -> None:
        router = Router([route("r", "/api", methods=["GET"], headers=[("x", "1")])])
        self.assertRaises(NotFound, match, router, "/api", method="POST")

    def test_config_order_breaks_ties(self) -> None:
        router = Router([route("first", "/x"), route("second", "/x")])
        self.assertEqual(name(router, "/x"), "first")


class UpstreamPathTests(SynchronousTestCase):
    def test_strip_prefix(self) -> None:
        router = Router([route("api", "/api/*", strip_prefix="/api")])
        for path, upstream in [
            ("/api/users/1", "/users/1"),
            ("/api", "/"),
            ("/api/", "/"),
            ("/api/users/", "/users/"),
        ]:
            self.assertEqual(match(router, path).upstream_path, upstream, path)

    def test_strip_prefix_only_at_segment_boundary(self) -> None:
        router = Router([route("all", "/*", strip_prefix="/api/")])
        self.assertEqual(match(router, "/apix/1").upstream_path, "/apix/1")
        self.assertEqual(match(router, "/api/1").upstream_path, "/1")

    def test_rewrite(self) -> None:
        router = Router([route("u", "/api/users/{id}", rewrite="/v2/users/{id}")])
        self.assertEqual(
            match(router, "/api/users/a%2Fb").upstream_path, "/v2/users/a%2Fb"
        )

    def test_rewrite_with_wildcards(self) -> None:
        router = Router(
            [
                route("s", "/static/*", rewrite="/cdn/{*}"),
                route("f", "/files/{b}/{key:*}", rewrite="/buckets/{b}/objects/{key}"),
            ]
        )
        self.assertEqual(
            match(router, "/static/css/a.css").upstream_path, "/cdn/css/a.css"
        )
        self.assertEqual(match(router, "/static").upstream_path, "/cdn/")
        self.assertEqual(
            match(router, "/files/b1/x/y").upstream_path, "/buckets/b1/objects/x/y"
        )

    def test_rewrite_takes_precedence_over_strip_prefix(self) -> None:
        router = Router(
            [route("r", "/api/{id}", strip_prefix="/api", rewrite="/v2/{id}")]
        )
        self.assertEqual(match(router, "/api/7").upstream_path, "/v2/7")

    def test_upstream_path_is_normalized(self) -> None:
        router = Router([route("all", "/*")])
        self.assertEqual(match(router, "/a/./b/../c//%7e").upstream_path, "/a/c/~")

    def test_bad_route_names_the_route(self) -> None:
        with self.assertRaises(ValueError) as caught:
            Router([route("ok", "/a"), route("broken", "/b/{id}", rewrite="/c/{uid}")])
        self.assertIn("routes[1] (broken)", str(caught.exception))
        self.assertRaises(ValueError, Router, [route("bad", "/a/{")])


class PathSafetyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.router = Router(
            [
                route("public", "/public/*"),
                route("admin", "/admin/*"),
                route("files", "/files/{name}"),
            ]
        )

    def test_dot_segments_cannot_escape_a_route(self) -> None:
        for path in [
            "/public/../admin/users",
            "/public/%2e%2e/admin/users",
            "/public/%2E%2E/admin/users",
            "/public/.%2E/admin/users",
            "/public/./../admin/users",
            "//admin//users",
        ]:
            found = match(self.router, path)
            self.assertEqual(found.route.name, "admin", path)
            self.assertEqual(found.upstream_path, "/admin/users", path)

    def test_cannot_climb_above_root(self) -> None:
        found = match(self.router, "/../../public/x")
        self.assertEqual(
            (found.route.name, found.upstream_path), ("public", "/public/x")
        )

    def test_encoded_slash_stays_in_its_segment(self) -> None:
        found = match(self.router, "/public/..%2fadmin")
        self.assertEqual(found.route.name, "public")
        self.assertEqual(found.params, {"*": "..%2Fadmin"})
        self.assertEqual(match(self.router, "/files/a%2Fb").params, {"name": "a%2Fb"})

    def test_encoded_unreserved_characters_match_plain_routes(self) -> None:
        found = match(self.router, "/%61dmin/%75sers")
        self.assertEqual(
            (found.route.name, found.upstream_path), ("admin", "/admin/users")
        )

    def test_encoded_static_patterns(self) -> None:
        router = Router([route("cafe", "/caf%c3%a9")])
        self.assertEqual(name(router, "/caf%C3%A9"), "cafe")
        self.assertEqual(name(router, "/caf%c3%a9"), "cafe")

    def test_malformed_paths_are_bad_requests(self) -> None:
        for path in ["", "admin", "*", "/a%2", "/a%g0"]:
            with self.assertRaises(BadRequest) as caught:
                match(self.router, path)
            self.assertEqual(caught.exception.status, 400)
