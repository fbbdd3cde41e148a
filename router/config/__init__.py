"""The router config: its schema and the generated reference."""

from ._docs import config_reference
from ._modes import MODES
from ._schema import (
    ConfigError,
    DeploymentConfig,
    GuardrailConfig,
    IdentityBindingConfig,
    KeyConfig,
    ModelGroupConfig,
    RedisSettings,
    RouterConfig,
    RouterSettings,
    embedded_default,
    find_cycle,
    load_config,
    parse_config,
    validation_message,
)

__all__ = [
    "MODES",
    "ConfigError",
    "DeploymentConfig",
    "GuardrailConfig",
    "IdentityBindingConfig",
    "KeyConfig",
    "ModelGroupConfig",
    "RedisSettings",
    "RouterConfig",
    "RouterSettings",
    "config_reference",
    "embedded_default",
    "find_cycle",
    "load_config",
    "parse_config",
    "validation_message",
]
