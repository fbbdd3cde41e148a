"""kubellm.router: the OpenAI-compatible data plane.

The public surface is re-exported here; everything in ``_modules`` is private.
"""

from ._app import ConfigSource, create_app
from ._config import (
    ConfigError,
    DeploymentConfig,
    KeyConfig,
    ModelGroupConfig,
    RouterConfig,
    RouterSettings,
    embedded_default,
    load_config,
    parse_config,
)
from ._errors import KubellmError

__all__ = [
    "ConfigError",
    "ConfigSource",
    "DeploymentConfig",
    "KeyConfig",
    "KubellmError",
    "ModelGroupConfig",
    "RouterConfig",
    "RouterSettings",
    "create_app",
    "embedded_default",
    "load_config",
    "parse_config",
]
