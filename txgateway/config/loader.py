"""Reading a configuration file: bytes -> YAML tree -> ``${VAR}`` -> model.

Everything that can go wrong on the way (no such file, a directory, not
UTF-8, bad YAML, a duplicate key, the wrong top level) is a
:class:`ConfigError` with a path or a line and column, never a traceback.

The YAML dialect is PyYAML's safe loader with YAML 1.2 booleans: only
``true``/``false`` are booleans, so ``on:`` (as in ``retry.on``), ``yes`` and
``no`` stay strings instead of silently turning into ``True``/``False``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import yaml
from yaml.nodes import MappingNode, ScalarNode

from txgateway.config.errors import ConfigError, ConfigProblem
from txgateway.config.interpolation import interpolate
from txgateway.config.model import GatewayConfig
from txgateway.config.schema import build_config, describe

_BOOL_TAG = "tag:yaml.org,2002:bool"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Dialect(yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
    """Safe loading, YAML 1.2 booleans, and duplicate keys recorded as problems."""

    yaml_implicit_resolvers: ClassVar[dict[str, list[tuple[str, re.Pattern[str]]]]] = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    duplicates: list[ConfigProblem]

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[object, object]:
        seen: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            key, mark = (key_node.tag, key_node.value), key_node.start_mark
            if key not in seen:
                seen[key] = mark.line + 1
                continue
            self.duplicates.append(
                ConfigProblem(
                    f"line {mark.line + 1}, column {mark.column + 1}",
                    f"duplicate key {key_node.value!r} (first given at line {seen[key]})",
                )
            )
        return super().construct_mapping(node, deep=deep)


_Dialect.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


class _Loader(
    yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, yaml.composer.Composer, _Dialect
):
    """The pure-Python parser: the clearest error messages."""

    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        _Dialect.__init__(self)
        self.duplicates = []


try:
    from yaml.cyaml import CParser
except ImportError:  # PyYAML built without libyaml
    CParser = None


_FastLoader: type[_Dialect] | None = None
if CParser is not None:

    class _LibYAMLLoader(CParser, _Dialect):
        """The same dialect on libyaml's parser (PyYAML has it on Debian and in
        its wheels): several times faster on a large file (10,000 routes)."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            _Dialect.__init__(self)
            self.duplicates = []

    _FastLoader = _LibYAMLLoader


def read_yaml(text: str, source: str = "<string>") -> object:
    """The YAML document in ``text``; :class:`ConfigError` when it is not valid.

    libyaml reads it when available; its error messages are terser, so a file
    it refuses is read again by the pure-Python parser for the message.
    """
    if _FastLoader is not None:
        fast: Any = _FastLoader(text)
        try:
            tree = fast.get_single_data()
        except (yaml.YAMLError, ValueError):
            pass
        else:
            if fast.duplicates:
                raise ConfigError(fast.duplicates, source)
            return tree
        finally:
            fast.dispose()
    loader = _Loader(text)
    try:
        tree = loader.get_single_data()
    except yaml.MarkedYAMLError as error:
        raise ConfigError([_yaml_problem(error)], source) from None
    except (yaml.YAMLError, ValueError) as error:
        raise ConfigError([ConfigProblem("", f"invalid YAML: {error}")], source) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ConfigError(loader.duplicates, source)
    return tree


def _yaml_problem(error: yaml.MarkedYAMLError) -> ConfigProblem:
    mark = error.problem_mark or error.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    message = error.problem or "syntax error"
    if error.context:
        context_mark = error.context_mark
        at = f" (line {context_mark.line + 1})" if context_mark is not None else ""
        message = f"{error.context}{at}, {message}"
    return ConfigProblem(where, f"invalid YAML: {message}")


def parse_config(
    text: str, source: str = "<string>", environ: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Validate configuration ``text``; ``source`` names it in problems."""
    tree = read_yaml(text, source)
    if tree is None:
        raise ConfigError(
            [ConfigProblem("", "the configuration is empty: expected a mapping with server, upstreams, routes, ...")],
            source,
        )
    if not isinstance(tree, dict):
        raise ConfigError(
            [ConfigProblem("", f"the top level must be a mapping (server, upstreams, routes, ...), got {describe(tree)}")],
            source,
        )
    problems: list[ConfigProblem] = []
    tree = interpolate(tree, os.environ if environ is None else environ, problems)
    return build_config(tree, source=source, problems=problems)


def load_config(path: str, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Load and validate the configuration file at ``path``.

    ``environ`` (default: ``os.environ``) fills ``${VAR}`` placeholders.
    """
    return parse_config(read_config_text(path), source=path, environ=environ)


def read_config_text(path: str) -> str:
    """The text of the configuration file at ``path``; ConfigError naming it when unreadable."""
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except FileNotFoundError:
        raise ConfigError([ConfigProblem("", "no such file")], path) from None
    except IsADirectoryError:
        raise ConfigError([ConfigProblem("", "is a directory, not a configuration file")], path) from None
    except PermissionError:
        raise ConfigError([ConfigProblem("", "permission denied")], path) from None
    except OSError as error:
        raise ConfigError([ConfigProblem("", f"cannot read: {error.strerror or error}")], path) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(
            [ConfigProblem("", f"not a UTF-8 text file (invalid byte at offset {error.start})")], path
        ) from None
