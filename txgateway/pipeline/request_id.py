"""Request ids: kept from the client when sane, otherwise made here.

Generated ids are a random per-process prefix plus a counter: unique across
gateway processes without a syscall or a UUID per request.
"""

from __future__ import annotations

import os
import re

_ACCEPTABLE = re.compile(rb"[\x21-\x7e]{1,200}\Z")


class RequestIds:
    __slots__ = ("_counter", "_prefix")

    def __init__(self, prefix: str | None = None) -> None:
        self._prefix = prefix if prefix is not None else os.urandom(6).hex()
        self._counter = 0

    def next(self) -> str:
        self._counter += 1
        return f"{self._prefix}-{self._counter:x}"

    def for_request(self, incoming: bytes | None) -> str:
        """The client's X-Request-ID if it is printable ASCII of sane size, else a new one."""
        if incoming is not None and _ACCEPTABLE.match(incoming):
            return incoming.decode("ascii")
        return self.next()
