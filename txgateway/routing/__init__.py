"""Request routing: which route serves a request, and the path sent upstream.

:class:`Router` compiles the configured routes once into a radix tree over
path segments; :meth:`Router.match` is called on every request by every
protocol.  :mod:`txgateway.routing.pattern` holds the path syntax (patterns,
rewrite templates, :func:`normalize_path`) that the config validator reuses.
"""

from txgateway.routing.pattern import (
    WILDCARD_NAME,
    PathPattern,
    RewriteTemplate,
    compile_pattern,
    compile_rewrite,
    compile_strip_prefix,
    normalize_path,
)
from txgateway.routing.radix import RadixTree
from txgateway.routing.router import Match, Router, normalize_host

__all__ = [
    "WILDCARD_NAME",
    "Match",
    "PathPattern",
    "RadixTree",
    "RewriteTemplate",
    "Router",
    "compile_pattern",
    "compile_rewrite",
    "compile_strip_prefix",
    "normalize_host",
    "normalize_path",
]
