"""The response cache: a pipeline stage that answers GET/HEAD from stored responses.

:mod:`.policy` decides what may be stored and for how long, :mod:`.entry`
is what is stored, :mod:`.memory` and :mod:`.redis` keep it,
:mod:`.tee` copies a body while it streams, :mod:`.coalesce` turns
concurrent misses into one upstream request, :mod:`.middleware` is the stage.
"""

from txgateway.cache.entry import Entry
from txgateway.cache.memory import MemoryStore
from txgateway.cache.middleware import ResponseCache, for_route

__all__ = ["Entry", "MemoryStore", "ResponseCache", "for_route"]
