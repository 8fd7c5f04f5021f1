"""Sizes and durations as users write them.

Sizes are bytes: an integer, or a number with a unit (``512B``, ``10KB``,
``64KiB``, ``10MiB``, ``1GiB``); the ``KB`` family counts in 1000s, the
``KiB`` family in 1024s.  Durations are seconds: an int or a float, or a
string with a unit (``250ms``, ``30s``, ``5m``, ``1h``) for readability.
Both parsers raise :class:`ValueError` with a message fit for the user.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

DURATION_UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}

_NUMBER_WITH_UNIT = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([A-Za-z]*)\s*\Z")

_SIZE_HELP = "expected bytes as an integer or a number with a unit (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB), e.g. 10MiB"
_DURATION_HELP = "expected seconds as a number, or a number with a unit (ms, s, m, h), e.g. 30 or 500ms"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as ``10MiB``; never negative."""
    if _is_number(value):
        assert isinstance(value, (int, float))
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"invalid size {value!r}: a byte count must be a whole number")
        if value < 0:
            raise ValueError(f"invalid size {value!r}: must be >= 0")
        return int(value)
    if not isinstance(value, str):
        raise TypeError(_SIZE_HELP)
    match = _NUMBER_WITH_UNIT.match(value)
    if match is None:
        raise ValueError(f"invalid size {value!r}: {_SIZE_HELP}")
    number, unit = match.groups()
    multiplier = SIZE_UNITS.get(unit.lower() if unit else "b")
    if multiplier is None:
        raise ValueError(f"invalid size {value!r}: unknown unit {unit!r}; {_SIZE_HELP}")
    size = Decimal(number) * multiplier
    if size != size.to_integral_value():
        raise ValueError(f"invalid size {value!r}: is not a whole number of bytes")
    return int(size)


def parse_duration(value: object) -> float:
    """Seconds from an int, a float or a string such as ``500ms``; never negative."""
    if _is_number(value):
        assert isinstance(value, (int, float))
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError(f"invalid duration {value!r}: must be a finite number of seconds")
        if seconds < 0:
            raise ValueError(f"invalid duration {value!r}: must be >= 0")
        return seconds
    if not isinstance(value, str):
        raise TypeError(_DURATION_HELP)
    match = _NUMBER_WITH_UNIT.match(value)
    if match is None:
        raise ValueError(f"invalid duration {value!r}: {_DURATION_HELP}")
    number, unit = match.groups()
    multiplier = DURATION_UNITS.get(unit.lower() if unit else "s")
    if multiplier is None:
        raise ValueError(f"invalid duration {value!r}: unknown unit {unit!r}; {_DURATION_HELP}")
    return float(number) * multiplier
