"""Path syntax: route patterns, rewrite templates, strip prefixes, normalize_path."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from txgateway.errors import BadRequest
from txgateway.routing import (
    WILDCARD_NAME,
    compile_pattern,
    compile_rewrite,
    compile_strip_prefix,
    normalize_path,
)


class CompilePatternTests(SynchronousTestCase):
    def test_param_names_in_order(self) -> None:
        pattern = compile_pattern("/svc/users/{id}/orders/{order_id}")
        self.assertEqual(pattern.param_names, ("id", "order_id"))
        self.assertIsNone(pattern.wildcard)
        self.assertFalse(pattern.is_static)

    def test_static(self) -> None:
        pattern = compile_pattern("/health")
        self.assertEqual(pattern.param_names, ())
        self.assertTrue(pattern.is_static)
        self.assertEqual(pattern.static_path, "/health")

    def test_named_wildcard_comes_last(self) -> None:
        pattern = compile_pattern("/files/{bucket}/{key:*}")
        self.assertEqual(pattern.param_names, ("bucket", "key"))
        self.assertEqual(pattern.wildcard, "key")

    def test_trailing_star_is_named_star(self) -> None:
        pattern = compile_pattern("/static/*")
        self.assertEqual(pattern.param_names, (WILDCARD_NAME,))
        self.assertEqual(WILDCARD_NAME, "*")

    def test_root_and_trailing_slash(self) -> None:
        self.assertEqual(compile_pattern("/").static_path, "/")
        self.assertEqual(compile_pattern("/users/").static_path, "/users/")

    def test_static_text_is_normalized(self) -> None:
        self.assertEqual(
            compile_pattern("/%61pi/caf%c3%a9").static_path, "/api/caf%C3%A9"
        )

    def assertRejected(self, path: str, *fragments: str) -> None:
        with self.assertRaises(ValueError) as caught:
            compile_pattern(path)
        message = str(caught.exception)
        self.assertIn(repr(path), message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_errors(self) -> None:
        self.assertRejected("api/users", "must start with '/'")
        self.assertRejected("", "must start with '/'")
        self.assertRejected("/users/{}", "empty parameter name")
        self.assertRejected("/a/{id}/b/{id}", "duplicate parameter name 'id'")
        self.assertRejected("/a/{id}/{id:*}", "duplicate parameter name 'id'")
        self.assertRejected("/a/{user-id}", "bad parameter name 'user-id'")
        self.assertRejected("/a/{1st}", "bad parameter name '1st'")
        self.assertRejected("/a/*/b", "must be the last segment")
        self.assertRejected("/a/{rest:*}/b", "must be the last segment")
        self.assertRejected("/a/{id", "'{' without '}'")
        self.assertRejected("/a/id}", "'}' without '{'")
        self.assertRejected("/a/x{id}", "whole segment")
        self.assertRejected("/a/{id}.json", "whole segment")
        self.assertRejected("/a/{id:int}", "unknown parameter kind")
        self.assertRejected("/a//b", "empty segment")
        self.assertRejected("/a/../b", "dot segment")
        self.assertRejected("/a/%2E", "dot segment")
        self.assertRejected("/a/%zz", "percent-encoding")
        self.assertRejected("/a b", "not allowed")
        self.assertRejected("/a?b=1", "not allowed")


class CompileRewriteTests(SynchronousTestCase):
    def test_substitutes_by_name(self) -> None:
        template = compile_rewrite("/v2/{b}/x/{a}", ("a", "b"))
        self.assertEqual(template.expand(["1", "2"]), "/v2/2/x/1")

    def test_placeholder_inside_segment(self) -> None:
        template = compile_rewrite("/v2/user-{id}.json", ("id",))
        self.assertEqual(template.expand(["7"]), "/v2/user-7.json")

    def test_unnamed_wildcard(self) -> None:
        template = compile_rewrite("/assets/{*}", (WILDCARD_NAME,))
        self.assertEqual(template.expand(["css/a.css"]), "/assets/css/a.css")

    def test_empty_rest_cannot_form_dot_segment(self) -> None:
        template = compile_rewrite("/a/.{*}", (WILDCARD_NAME,))
        self.assertEqual(template.expand([""]), "/a/")

    def test_errors(self) -> None:
        cases = [
            ("v2/{id}", ("id",), "must start with '/'"),
            ("/v2/{uid}", ("id",), "(captured: id)"),
            ("/v2/{uid}", (), "(captured: none)"),
            ("/v2/{id", ("id",), "'{' without '}'"),
            ("/v2/id}", ("id",), "'}' without '{'"),
            ("/v2/{id}?x=1", ("id",), "not allowed"),
            ("/v2/../{id}", ("id",), "dot segment"),
        ]
        for template, names, fragment in cases:
            with self.assertRaises(ValueError) as caught:
                compile_rewrite(template, names)
            self.assertIn(fragment, str(caught.exception))


class CompileStripPrefixTests(SynchronousTestCase):
    def test_normal_form(self) -> None:
        self.assertEqual(compile_strip_prefix("/api"), "/api")
        self.assertEqual(compile_strip_prefix("/api/"), "/api")
        self.assertEqual(compile_strip_prefix("/"), "")

    def test_errors(self) -> None:
        for prefix in ["api", "/api/{v}", "/a//b", "/a/../b"]:
            self.assertRaises(ValueError, compile_strip_prefix, prefix)


class NormalizePathTests(SynchronousTestCase):
    def test_plain_paths_unchanged(self) -> None:
        for path in ["/", "/a", "/a/b/", "/a/b.c/d..e/.f", "/a%20b"]:
            self.assertEqual(normalize_path(path), path)

    def test_rfc3986_dot_segments(self) -> None:
        cases = {
            "/a/b/c/./../../g": "/a/g",
            "/a/b/..": "/a/",
            "/a/b/.": "/a/b/",
            "/..": "/",
            "/../../x": "/x",
            "/public/../admin": "/admin",
            "/a/./b/./": "/a/b/",
        }
        for raw, normal in cases.items():
            self.assertEqual(normalize_path(raw), normal, raw)

    def test_encoded_dot_segments(self) -> None:
        for raw in [
            "/public/%2e%2e/admin",
            "/public/%2E%2E/admin",
            "/public/.%2e/admin",
        ]:
            self.assertEqual(normalize_path(raw), "/admin")
        self.assertEqual(normalize_path("/a/%2e/b"), "/a/b")

    def test_merges_slashes(self) -> None:
        self.assertEqual(normalize_path("//admin//x/"), "/admin/x/")

    def test_percent_encoding_normal_form(self) -> None:
        # Unreserved characters decoded, others upper-cased and kept.
        self.assertEqual(normalize_path("/%61dmin/%7euser"), "/admin/~user")
        self.assertEqual(normalize_path("/a%2fb/c%3f"), "/a%2Fb/c%3F")

    def test_encoded_slash_is_not_a_separator(self) -> None:
        self.assertEqual(normalize_path("/public/..%2fadmin"), "/public/..%2Fadmin")

    def test_double_encoding_decoded_once(self) -> None:
        self.assertEqual(normalize_path("/a/%252e%252e/b"), "/a/%252e%252e/b")

    def test_bad_requests(self) -> None:
        for raw in ["", "*", "admin", "http://x/", "/a%zz", "/a%2", "/%"]:
            self.assertRaises(BadRequest, normalize_path, raw)
