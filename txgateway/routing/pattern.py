"""Path syntax: route patterns, rewrite templates and request-path normalization.

A route pattern is an absolute path whose segments are one of:

- static text, matched exactly (after the percent-encoding normalization below);
- ``{name}``: exactly one non-empty segment, captured as ``name``;
- ``{name:*}``: the rest of the path, possibly empty, captured as ``name``;
  only as the last segment;
- ``*``: the same as ``{*:*}``, an unnamed rest captured under the name ``*``.
  A rewrite template refers to it as ``{*}``.

Parameter names are ``[A-Za-z_][A-Za-z0-9_]*`` (or the reserved ``*``) and
unique within a pattern.  A segment is either all static text or one whole
``{...}``: ``/files/{name}.json`` is an error.  A trailing slash is
significant (``/users/`` and ``/users`` are different patterns); empty
segments elsewhere (``/a//b``) and dot segments are errors, because a
normalized request path never contains them.

Request paths are normalized by :func:`normalize_path` before matching, and
static pattern text gets the same percent-encoding treatment at compile time,
so ``/%61dmin`` and ``/admin`` are the same path to the router and the
upstream.  Matching and captured values stay percent-encoded otherwise.

Every ``compile_*`` function raises ``ValueError`` with a message meant for
the person who wrote the configuration.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

from txgateway.errors import BadRequest

__all__ = [
    "WILDCARD_NAME",
    "PathPattern",
    "RewriteTemplate",
    "Segment",
    "SegmentKind",
    "compile_pattern",
    "compile_rewrite",
    "compile_strip_prefix",
    "normalize_path",
]

#: The parameter name of an unnamed trailing ``*``; ``{*}`` in a rewrite.
WILDCARD_NAME = "*"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_HEXDIGITS = "0123456789abcdefABCDEF"
#: Every two-character hex escape body, mapped to its RFC 3986 section 6.2.2
#: normal form: unreserved characters decoded, everything else upper-cased.
_ESCAPES: dict[str, str] = {}
for _hi in _HEXDIGITS:
    for _lo in _HEXDIGITS:
        _char = chr(int(_hi + _lo, 16))
        _ESCAPES[_hi + _lo] = (
            _char if _char in _UNRESERVED else "%" + (_hi + _lo).upper()
        )
del _hi, _lo, _char
#: Characters that can never be part of a request path as we receive it.
_FORBIDDEN = frozenset("?#") | frozenset(chr(c) for c in range(0x21)) | {"\x7f"}


class SegmentKind:
    STATIC = "static"
    PARAM = "param"
    WILDCARD = "wildcard"


@dataclass(frozen=True, slots=True)
class Segment:
    """One segment of a pattern: static ``text``, or the parameter's name."""

    kind: str
    text: str


@dataclass(frozen=True, slots=True)
class PathPattern:
    """A compiled route pattern; build it with :func:`compile_pattern`."""

    #: The pattern as written in the configuration.
    source: str
    segments: tuple[Segment, ...]
    #: Captured parameter names in path order; a wildcard's name comes last.
    param_names: tuple[str, ...]

    @property
    def wildcard(self) -> str | None:
        """The name the rest of the path is captured under, if any."""
        if self.segments and self.segments[-1].kind == SegmentKind.WILDCARD:
            return self.segments[-1].text
        return None

    @property
    def is_static(self) -> bool:
        return not self.param_names

    @property
    def static_path(self) -> str:
        """The normalized path a static pattern matches exactly."""
        return "/" + "/".join(s.text for s in self.segments)


@dataclass(frozen=True, slots=True)
class RewriteTemplate:
    """An upstream path template with ``{name}`` placeholders; see :func:`compile_rewrite`."""

    source: str
    #: ``str.format`` string whose fields are indexes into the captured values.
    format: str
    #: True when literal dots could combine with values into a dot segment.
    may_form_dot_segment: bool

    def expand(self, values: Sequence[str]) -> str:
        """The path for captured ``values``, in the pattern's ``param_names`` order."""
        path = self.format.format(*values)
        if self.may_form_dot_segment and "/." in path:
            path = _clean_segments(path)
        return path


def compile_pattern(path: str) -> PathPattern:
    """Parse a route pattern, or raise ``ValueError`` saying what is wrong."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"path pattern must start with '/': {path!r}")
    raw = path.split("/")[1:]
    segments: list[Segment] = []
    names: list[str] = []
    for index, text in enumerate(raw):
        last = index == len(raw) - 1
        if text == "*" or (text.startswith("{") and text.endswith(":*}")):
            name = WILDCARD_NAME if text == "*" else text[1:-3]
            if name != WILDCARD_NAME:
                _check_name(name, path)
            if not last:
                raise ValueError(
                    f"wildcard {text!r} must be the last segment of {path!r}"
                )
            segment = Segment(SegmentKind.WILDCARD, name)
        elif text.startswith("{") and text.endswith("}") and text.count("{") == 1:
            name = text[1:-1]
            if ":" in name:
                raise ValueError(
                    f"unknown parameter kind in {text!r} of {path!r}: use {{name}} or {{name:*}}"
                )
            _check_name(name, path)
            segment = Segment(SegmentKind.PARAM, name)
        else:
            if text.count("{") != text.count("}"):
                brace = (
                    "'{' without '}'"
                    if text.count("{") > text.count("}")
                    else "'}' without '{'"
                )
                raise ValueError(f"{brace} in {text!r} of path pattern {path!r}")
            if "{" in text or "}" in text:
                raise ValueError(
                    f"a parameter must be a whole segment, like /{{id}}/: {text!r} in {path!r}"
                )
            if text == "" and not last:
                raise ValueError(f"empty segment ('//') in path pattern {path!r}")
            text = _normalize_text(text, "path pattern", path)
            if text in (".", ".."):
                raise ValueError(
                    f"dot segment {text!r} in path pattern {path!r} can never match"
                )
            segment = Segment(SegmentKind.STATIC, text)
        if segment.kind != SegmentKind.STATIC:
            if segment.text in names:
                raise ValueError(
                    f"duplicate parameter name {segment.text!r} in {path!r}"
                )
            names.append(segment.text)
        segments.append(segment)
    return PathPattern(source=path, segments=tuple(segments), param_names=tuple(names))


def compile_rewrite(template: str, param_names: Sequence[str]) -> RewriteTemplate:
    """Parse a rewrite template whose ``{name}`` refer to ``param_names``."""
    if not isinstance(template, str) or not template.startswith("/"):
        raise ValueError(f"rewrite must start with '/': {template!r}")
    pieces: list[str] = []
    literal_dot = False
    rest = template
    while rest:
        opening = rest.find("{")
        literal = rest if opening < 0 else rest[:opening]
        if "}" in literal:
            raise ValueError(f"'}}' without '{{' in rewrite {template!r}")
        literal = _normalize_text(literal, "rewrite", template)
        literal_dot = literal_dot or "." in literal
        pieces.append(literal)
        if opening < 0:
            break
        closing = rest.find("}", opening)
        if closing < 0:
            raise ValueError(f"'{{' without '}}' in rewrite {template!r}")
        name = rest[opening + 1 : closing]
        if name not in param_names:
            known = ", ".join(param_names) or "none"
            raise ValueError(
                f"rewrite {template!r} uses {{{name}}}, which the path pattern does not capture"
                f" (captured: {known})"
            )
        pieces.append(f"{{{param_names.index(name)}}}")
        rest = rest[closing + 1 :]
    for piece in template.split("/")[1:]:
        if piece in (".", ".."):
            raise ValueError(f"dot segment {piece!r} in rewrite {template!r}")
    return RewriteTemplate(
        source=template, format="".join(pieces), may_form_dot_segment=literal_dot
    )


def compile_strip_prefix(prefix: str) -> str:
    """The normalized form of a ``strip_prefix``: no trailing slash, ``""`` for ``/``."""
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        raise ValueError(f"strip_prefix must start with '/': {prefix!r}")
    if any(c in prefix for c in "{}*"):
        raise ValueError(f"strip_prefix is a literal path, not a pattern: {prefix!r}")
    normal = _normalize_text(prefix, "strip_prefix", prefix).rstrip("/")
    if "//" in normal or any(s in (".", "..") for s in normal.split("/")):
        raise ValueError(
            f"strip_prefix must not contain empty or dot segments: {prefix!r}"
        )
    return normal


def normalize_path(path: str) -> str:
    """The canonical form of a raw request path (no query), used for routing and upstream.

    Percent-encoded unreserved characters are decoded and other escapes
    upper-cased (RFC 3986 6.2.2), so ``%2e``/``%2E`` become dots; dot segments
    are then removed (RFC 3986 5.2.4) and runs of slashes merged, so no path
    can climb out of the route it matched.  ``%2F`` stays encoded: it is data
    inside a segment, not a separator.  Raises ``BadRequest`` for a path not
    starting with ``/`` or with a malformed escape.
    """
    if not path.startswith("/"):
        raise BadRequest("request path must start with '/'")
    if "%" in path:
        try:
            path = _normalize_escapes(path)
        except ValueError:
            raise BadRequest("malformed percent-encoding in request path") from None
    if "/." in path or "//" in path:
        path = _clean_segments(path)
    return path


def _normalize_escapes(text: str) -> str:
    parts = text.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        escaped = _ESCAPES.get(part[:2])
        if escaped is None:
            raise ValueError(part)
        out.append(escaped)
        out.append(part[2:])
    return "".join(out)


def _clean_segments(path: str) -> str:
    """Remove dot segments and empty segments, keeping a trailing slash."""
    segments = path.split("/")
    out: list[str] = []
    for segment in segments:
        if segment == "..":
            if out:
                out.pop()
        elif segment and segment != ".":
            out.append(segment)
    if out and segments[-1] in ("", ".", ".."):
        return "/" + "/".join(out) + "/"
    return "/" + "/".join(out)


def _normalize_text(text: str, what: str, whole: str) -> str:
    bad = sorted({c for c in text if c in _FORBIDDEN})
    if bad:
        raise ValueError(
            f"{what} {whole!r} contains characters not allowed in a path: {bad!r}"
        )
    if "%" not in text:
        return text
    try:
        return _normalize_escapes(text)
    except ValueError:
        raise ValueError(f"malformed percent-encoding in {what} {whole!r}") from None


def _check_name(name: str, pattern: str) -> None:
    if not name:
        raise ValueError(f"empty parameter name in {pattern!r}")
    if not _NAME.match(name):
        raise ValueError(
            f"bad parameter name {name!r} in {pattern!r}: use letters, digits and '_',"
            " not starting with a digit"
        )
