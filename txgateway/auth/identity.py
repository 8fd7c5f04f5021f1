"""Who made the request, as the auth middleware established it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Identity:
    #: The consumer id: the JWT ``sub`` or the API key's consumer.
    consumer: str
    roles: frozenset[str] = frozenset()
    permissions: frozenset[str] = frozenset()
    #: The verified JWT claims (empty for API keys).
    claims: Mapping[str, object] = field(default_factory=dict)
    #: How it was established: "jwt" or "api_key".
    method: str = "jwt"
