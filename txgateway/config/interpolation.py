"""``${VAR}`` and ``${VAR:-default}`` in configuration values.

Substitution works on the string scalars of the parsed YAML tree, not on the
raw text, so an environment value can never change the document's structure
and an unset variable is reported at the config path where it is used.
``$${`` writes a literal ``${``.  As in the shell, ``:-`` uses the default
when the variable is unset *or* empty.

A string that received a substitution comes back as :class:`Interpolated`,
which numeric and boolean fields accept (``port: ${PORT:-8080}``); plain YAML
strings in those fields stay type errors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from txgateway.config.errors import ConfigProblem, child_path, item_path

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Interpolated(str):
    """A string built (at least partly) from the environment."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Unresolved:
    """Stands where a value could not be built; its problem is already reported."""

    text: str


def substitute(text: str, environ: Mapping[str, str]) -> tuple[str, bool, list[str]]:
    """Fill the placeholders of one string.

    Returns the result, whether anything came from a placeholder, and a
    message per placeholder that could not be filled.
    """
    out: list[str] = []
    errors: list[str] = []
    used = False
    i = 0
    while True:
        j = text.find("$", i)
        if j < 0:
            out.append(text[i:])
            break
        if text.startswith("$${", j):
            out.append(text[i:j] + "${")
            i = j + 3
            continue
        if not text.startswith("${", j):
            out.append(text[i : j + 1])
            i = j + 1
            continue
        out.append(text[i:j])
        end = text.find("}", j + 2)
        if end < 0:
            errors.append(
                f"unterminated placeholder {text[j:]!r}: close it with '}}' (write $${{ for a literal ${{)"
            )
            break
        body = text[j + 2 : end]
        name, has_default, default = body.partition(":-")
        if not _NAME.match(name):
            errors.append(
                f"invalid placeholder '${{{body}}}': expected ${{NAME}} or ${{NAME:-default}}"
                " (write $${ for a literal ${)"
            )
        elif environ.get(name):
            out.append(environ[name])
            used = True
        elif has_default:
            out.append(default)
            used = True
        elif name in environ:
            out.append("")
            used = True
        else:
            errors.append(
                f"environment variable {name} is not set"
                f" (set it, or give a default: ${{{name}:-default}})"
            )
        i = end + 1
    return "".join(out), used, errors


def interpolate(
    tree: object, environ: Mapping[str, str], problems: list[ConfigProblem], path: str = ""
) -> object:
    """A copy of ``tree`` with every string scalar substituted.

    Problems are appended to ``problems``; each failed scalar becomes an
    :class:`Unresolved` so later checks stay quiet about it.
    """
    return _walk(tree, environ, problems, path, set())


def _walk(
    node: object,
    environ: Mapping[str, str],
    problems: list[ConfigProblem],
    path: str,
    active: set[int],
) -> object:
    if isinstance(node, str):
        result, used, errors = substitute(node, environ)
        if errors:
            problems.extend(ConfigProblem(path, message) for message in errors)
            return Unresolved(node)
        return Interpolated(result) if used else result
    if isinstance(node, (dict, list)):
        if id(node) in active:
            problems.append(ConfigProblem(path, "a YAML alias refers to its own parent (recursive structure)"))
            return Unresolved("")
        active.add(id(node))
        try:
            if isinstance(node, dict):
                return {
                    key: _walk(value, environ, problems, child_path(path, key), active)
                    for key, value in node.items()
                }
            return [
                _walk(value, environ, problems, item_path(path, index), active)
                for index, value in enumerate(node)
            ]
        finally:
            active.discard(id(node))
    return node
