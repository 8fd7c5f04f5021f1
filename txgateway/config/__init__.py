"""Configuration: the YAML contract (shared CONFIG.md) loaded into the model.

``load_config(path)`` / ``parse_config(text)`` give an immutable
:class:`~txgateway.config.model.GatewayConfig` or raise :class:`ConfigError`
listing every problem found, each with its path.
"""

from txgateway.config.errors import ConfigError, ConfigProblem
from txgateway.config.loader import load_config, parse_config
from txgateway.config.model import GatewayConfig

__all__ = ["ConfigError", "ConfigProblem", "GatewayConfig", "load_config", "parse_config"]
