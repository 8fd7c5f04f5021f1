"""The in-process store: an LRU bounded by bytes.

Every entry is charged its body, its headers and a fixed overhead
(:attr:`Entry.size`); the total stays within ``max_bytes``.  A lookup that
finds an expired entry drops it; when a new entry pushes the total over the
budget, expired entries go first (cheapest first to lose: they serve no
hits), then the least recently used.  One store is shared by every caching
route of the process (one budget), lives in ``Runtime.shared`` and so
survives reloads; a reload that changes ``max_bytes`` resizes it.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Hashable
from itertools import count
from typing import Any

from txgateway.cache.entry import Entry, Headers, PrimaryKey, VaryIndex
from txgateway.cache.policy import vary_values


class MemoryStore:
    def __init__(self, max_bytes: int, size_gauge: Any = None) -> None:
        """``size_gauge`` (a Prometheus gauge, ``txgateway_cache_stored_bytes``)
        is set to ``size`` whenever it changes; None: not reported."""
        self.max_bytes = max_bytes
        #: Bytes charged for what is stored now.
        self.size = 0
        self._gauge = size_gauge
        #: Least recently used first.
        self._items: OrderedDict[Hashable, Entry | VaryIndex] = OrderedDict()
        #: (expires, sequence, key, entry): stale items are skipped when popped.
        self._expiry: list[tuple[float, int, Hashable, Entry]] = []
        self._sequence = count()

    def __len__(self) -> int:
        """Stored entries (Vary indexes not counted)."""
        return sum(1 for item in self._items.values() if item.__class__ is Entry)

    def resize(self, max_bytes: int, now: float) -> None:
        self.max_bytes = max_bytes
        self._evict(now)
        self._report()

    def _report(self) -> None:
        if self._gauge is not None:
            self._gauge.set(self.size)

    def lookup(self, key: PrimaryKey, headers: Headers, now: float) -> Entry | None:
        items = self._items
        item = items.get(key)
        if item is None:
            return None
        slot: Hashable = key
        if isinstance(item, VaryIndex):
            slot = (key, vary_values(item.names, headers))
            variant = items.get(slot)
            if not isinstance(variant, Entry):
                return None
            items.move_to_end(key)
            item = variant
        if now >= item.expires:
            self._remove(slot)
            self._report()
            return None
        items.move_to_end(slot)
        return item

    def store(self, key: PrimaryKey, entry: Entry, now: float) -> None:
        if entry.size > self.max_bytes or entry.expires <= now:
            return
        items = self._items
        slot: Hashable
        if entry.vary:
            index = items.get(key)
            if not (isinstance(index, VaryIndex) and index.names == entry.vary):
                if index is not None:
                    self._remove(key)
                index = VaryIndex(entry.vary)
                items[key] = index
                self.size += index.size
            else:
                items.move_to_end(key)
            slot = (key, entry.variant)
            index.variants.add(slot)
        else:
            slot = key
        old = items.pop(slot, None)
        if old is not None:
            self.size -= old.size
            if isinstance(old, VaryIndex):
                for variant in old.variants:
                    self._drop(variant)
        items[slot] = entry
        self.size += entry.size
        expiry = self._expiry
        heapq.heappush(expiry, (entry.expires, next(self._sequence), slot, entry))
        if len(expiry) > 2 * len(items) + 1024:
            self._expiry = [item for item in expiry if items.get(item[2]) is item[3]]
            heapq.heapify(self._expiry)
        self._evict(now)
        self._report()

    def invalidate(self, key: PrimaryKey) -> None:
        self._remove(key)
        self._report()

    def _evict(self, now: float) -> None:
        if self.size <= self.max_bytes:
            return
        items, expiry = self._items, self._expiry
        while expiry and expiry[0][0] <= now and self.size > self.max_bytes:
            _, _, slot, entry = heapq.heappop(expiry)
            if items.get(slot) is entry:
                self._remove(slot)
        while self.size > self.max_bytes and items:
            self._remove(next(iter(items)))

    def _drop(self, slot: Hashable) -> None:
        """Remove one item, no bookkeeping beyond its size."""
        item = self._items.pop(slot, None)
        if item is not None:
            self.size -= item.size

    def _remove(self, slot: Hashable) -> None:
        """Remove an entry (and its Vary index once empty) or an index (and its variants)."""
        items = self._items
        item = items.pop(slot, None)
        if item is None:
            return
        self.size -= item.size
        if isinstance(item, VaryIndex):
            for variant in item.variants:
                self._drop(variant)
        elif item.vary:
            assert isinstance(slot, tuple)
            primary = slot[0]
            index = items.get(primary)
            if isinstance(index, VaryIndex):
                index.variants.discard(slot)
                if not index.variants:
                    self._drop(primary)
