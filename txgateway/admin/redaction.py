"""The running configuration as JSON, with every secret replaced by ``"REDACTED"``.

What is hidden:

- any value whose key looks secret (``secret``, ``token``, ``password``,
  ``credential``, ``private``, ``cookie``, ``authorization``, ``signature``,
  ``api_key``, or a name ending in ``key``/``keys``), in the model and in the
  free-form mappings (custom middleware options, discovery options) and
  header lists (a route that sets ``authorization`` on upstream requests);
- the SHA-256 of every API key;
- the user and password of any URL (``redis://:pw@host``, a JWKS URL) and URL
  query parameters with secret-looking names.

A few model fields are named like secrets but are not: the rate-limit
``key`` (consumer, ip...), ``hash_key``, ``api_key_header``, the TLS key
*file path*.  Empty values (no token configured) are shown as they are:
there is nothing to hide, and "no admin token" is worth seeing.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit

from txgateway.config import model

REDACTED = "REDACTED"

_SECRET_NAME = re.compile(
    r"secret|token|passw|credential|private|cookie|authori[sz]ation|signature|api_?key|(?:^|_)keys?$"
)

#: Fields whose values are secrets whatever they are called.
_ALWAYS_SECRET = frozenset({(model.APIKey, "sha256"), (model.JWTConfig, "secret")})
#: Fields named like secrets that hold none: shown (and walked) as they are.
_NOT_SECRET = frozenset(
    {
        (model.RateLimitConfig, "key"),
        (model.UpstreamConfig, "hash_key"),
        (model.AuthConfig, "api_key_header"),
        (model.AuthConfig, "api_keys"),
        (model.TLSConfig, "key"),
    }
)
#: Pairs of names (claim -> header), not names and values.
_NAME_PAIRS = frozenset({(model.AuthConfig, "forward_claims")})
#: The annotation of (name, value) pairs (headers), shown as a mapping.
_NAME_VALUE_PAIRS = "tuple[tuple[str, str], ...]"


def looks_secret(name: str) -> bool:
    """Whether a key, field or header name suggests its value is a secret."""
    return _SECRET_NAME.search(name.lower().replace("-", "_")) is not None


def redacted_config(config: model.GatewayConfig) -> dict[str, object]:
    """``config`` as a JSON-ready mapping, secrets replaced by :data:`REDACTED`."""
    result = _plain(config)
    assert isinstance(result, dict)
    return result


def redact_url(text: str) -> str:
    """``text`` with a URL's credentials and secret-looking query values replaced."""
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return REDACTED
    if "@" in parts.netloc:
        text = text.replace(parts.netloc, f"{REDACTED}@{parts.netloc.rpartition('@')[2]}", 1)
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(looks_secret(name) for name, _ in pairs):
            query = urlencode([(k, REDACTED if looks_secret(k) else v) for k, v in pairs])
            text = text.replace("?" + parts.query, "?" + query, 1)
    return text


def _plain(value: object) -> object:
    """A config value as JSON-ready data, secrets hidden below it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        owner = type(value)
        return {
            f.name: _field(owner, f.name, getattr(value, f.name), f.type == _NAME_VALUE_PAIRS)
            for f in dataclasses.fields(value)
        }
    if isinstance(value, Mapping):
        return {str(name): _named(str(name), item) for name, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, str):
        return redact_url(value)
    return value


def _named(name: str, value: object) -> object:
    if _empty(value):
        return _plain(value)
    if looks_secret(name):
        return REDACTED
    return _plain(value)


def _field(owner: type, name: str, value: object, pairs: bool) -> object:
    """A model field; ``pairs``: a tuple of (name, value) pairs, shown as a mapping."""
    key = (owner, name)
    if key in _ALWAYS_SECRET:
        return value if _empty(value) else REDACTED
    if key in _NOT_SECRET:
        return _plain(value)
    if pairs and isinstance(value, tuple):
        if key in _NAME_PAIRS:
            return {claim: header for claim, header in value}
        return {pair_name: _named(pair_name, item) for pair_name, item in value}
    return _named(name, value)


def _empty(value: object) -> bool:
    return value is None or value == "" or value == () or value == {}
