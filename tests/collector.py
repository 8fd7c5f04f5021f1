"""The garbage collector, held still for tests about reference counting."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def collector_off() -> Iterator[None]:
    """The cyclic collector off: what is freed inside was freed by reference counting."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def referrers(ref: Callable[[], Any]) -> list[Any] | None:
    """What still holds the object behind weak reference ``ref`` (None once it is gone): a failure message."""
    target = ref()
    return None if target is None else gc.get_referrers(target)
