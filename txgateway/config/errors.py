"""What goes wrong with a configuration, said so a user can fix it.

Loading never stops at the first mistake: every check records a
:class:`ConfigProblem` and the loader raises one :class:`ConfigError` holding
them all, so ``txgateway check`` can list everything wrong in one run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\-]+\Z")


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One mistake: where it is (``routes[2].upstream``) and what is wrong."""

    path: str
    message: str


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists every reason.

    ``str()`` gives one line per problem, ``{source}: {path}: {message}``
    (the path is left out for problems about the file as a whole).
    """

    def __init__(self, problems: Iterable[ConfigProblem], source: str = "<string>") -> None:
        self.problems: list[ConfigProblem] = list(problems)
        self.source = source
        super().__init__(self.source, self.problems)

    def lines(self) -> list[str]:
        return [
            f"{self.source}: {p.path}: {p.message}" if p.path else f"{self.source}: {p.message}"
            for p in self.problems
        ]

    def __str__(self) -> str:
        return "\n".join(self.lines())


def child_path(path: str, key: object) -> str:
    """The path of ``key`` under ``path``: ``server.limits``, ``upstreams["a.b"]``."""
    text = str(key)
    if not _PLAIN_KEY.match(text):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{path}[{text}]" if path else f"[{text}]"
    return f"{path}.{text}" if path else text


def item_path(path: str, index: int) -> str:
    """The path of list item ``index`` under ``path``: ``routes[2]``."""
    return f"{path}[{index}]"
