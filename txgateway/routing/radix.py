"""A radix tree over path segments, holding values keyed by path pattern.

Lookup walks one node per path segment, preferring at each node the static
child, then the ``{param}`` child, then a wildcard, and backtracking to the
next choice when a branch finds nothing acceptable deeper down.  Children are
found by dict lookup, so the cost depends on the depth of the path, not on
how many patterns the tree holds.  Fully static patterns are also indexed by
their whole path, which answers the commonest lookups with one dict access.

Several values may share a pattern; they are kept in insertion order and the
caller's ``select`` picks among them (host, headers, method), so "the path
matched but nothing here accepts the request" backtracks like a path miss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from txgateway.routing.pattern import PathPattern, SegmentKind

__all__ = ["RadixTree"]

V = TypeVar("V")
C = TypeVar("C")


class _Node(Generic[V]):
    __slots__ = ("leaf", "param", "rest", "static")

    def __init__(self) -> None:
        self.static: dict[str, _Node[V]] = {}
        self.param: _Node[V] | None = None
        #: Values whose pattern ends at this node.
        self.leaf: list[V] = []
        #: Values whose pattern ends with a wildcard below this node.
        self.rest: list[V] = []


class RadixTree(Generic[V]):
    """Values keyed by :class:`PathPattern`, looked up by normalized path."""

    def __init__(self) -> None:
        self._root: _Node[V] = _Node()
        self._exact: dict[str, list[V]] = {}

    def insert(self, pattern: PathPattern, value: V) -> None:
        """Add ``value`` under ``pattern``, after any value already there."""
        node = self._root
        for segment in pattern.segments:
            if segment.kind == SegmentKind.STATIC:
                child = node.static.get(segment.text)
                if child is None:
                    child = node.static[segment.text] = _Node()
                node = child
            elif segment.kind == SegmentKind.PARAM:
                if node.param is None:
                    node.param = _Node()
                node = node.param
            else:
                node.rest.append(value)
                return
        node.leaf.append(value)
        if pattern.is_static:
            self._exact[pattern.static_path] = node.leaf

    def lookup(
        self, path: str, select: Callable[[Sequence[V], C], V | None], context: C
    ) -> tuple[V, list[str]] | None:
        """The first value ``select`` accepts, in priority order, with its captures.

        ``path`` must be normalized (see ``normalize_path``).  ``select`` gets
        the values of one pattern at a time plus ``context`` and returns the
        one it accepts or None.  Captures are the raw parameter values in
        pattern order, the wildcard's rest last.
        """
        values = self._exact.get(path)
        if values is not None:
            value = select(values, context)
            if value is not None:
                return value, []
        segments = path.split("/")
        count = len(segments)
        captures: list[str] = []
        # Depth-first, iteratively: each node tries its static child (stage
        # 0), then its param child (1), then its wildcard (2).  A node with
        # an untried alternative leaves a backtrack entry on the stack.
        stack: list[tuple[_Node[V], int, int, int]] = []
        node = self._root
        index = 1
        stage = 0
        while True:
            if index == count:
                if node.leaf:
                    value = select(node.leaf, context)
                    if value is not None:
                        return value, captures
                if node.rest:
                    value = select(node.rest, context)
                    if value is not None:
                        captures.append("")
                        return value, captures
            else:
                segment = segments[index]
                if stage == 0:
                    child = node.static.get(segment)
                    if child is not None:
                        if node.param is not None or node.rest:
                            stack.append((node, index, len(captures), 1))
                        node = child
                        index += 1
                        continue
                if stage < 2:
                    child = node.param
                    if child is not None and segment:
                        if node.rest:
                            stack.append((node, index, len(captures), 2))
                        captures.append(segment)
                        node = child
                        index += 1
                        stage = 0
                        continue
                if node.rest:
                    value = select(node.rest, context)
                    if value is not None:
                        captures.append("/".join(segments[index:]))
                        return value, captures
            if not stack:
                return None
            node, index, kept, stage = stack.pop()
            del captures[kept:]

    def candidates(self, path: str) -> Iterator[Sequence[V]]:
        """Every group of values whose pattern matches ``path``, in priority order."""
        segments = path.split("/")
        return _groups(self._root, segments, 1, len(segments))


def _groups(
    node: _Node[V], segments: list[str], index: int, count: int
) -> Iterator[Sequence[V]]:
    if index == count:
        if node.leaf:
            yield node.leaf
        if node.rest:
            yield node.rest
        return
    segment = segments[index]
    child = node.static.get(segment)
    if child is not None:
        yield from _groups(child, segments, index + 1, count)
    if node.param is not None and segment:
        yield from _groups(node.param, segments, index + 1, count)
    if node.rest:
        yield node.rest
