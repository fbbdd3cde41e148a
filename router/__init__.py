"""kubellm.router: the OpenAI-compatible data plane.

The public surface is re-exported here; everything in ``_modules`` is private.
"""

from ._errors import KubellmError
from .config._quickstart import ENV_BASE_URL, ENV_CONFIG, ENV_MODEL, source_from_env
from .config._schema import (
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
from .observability._logging import configure as configure_logging
from .server._app import (
    ENV_KUBE_SECRET,
    ENV_KUBECONFIG,
    ENV_REQUIRE_AUTH,
    ConfigSource,
    app_from_env,
    create_app,
)
from .server._protocol import ENV_HEADER_TIMEOUT, ENV_MAX_HEADER_BYTES, GuardedHttpToolsProtocol
from .server._supervisor import run as run_workers

__all__ = [
    "ENV_BASE_URL",
    "ENV_CONFIG",
    "ENV_HEADER_TIMEOUT",
    "ENV_KUBECONFIG",
    "ENV_KUBE_SECRET",
    "ENV_MAX_HEADER_BYTES",
    "ENV_MODEL",
    "ENV_REQUIRE_AUTH",
    "ConfigError",
    "ConfigSource",
    "DeploymentConfig",
    "GuardedHttpToolsProtocol",
    "KeyConfig",
    "KubellmError",
    "ModelGroupConfig",
    "RouterConfig",
    "RouterSettings",
    "app_from_env",
    "configure_logging",
    "create_app",
    "embedded_default",
    "load_config",
    "parse_config",
    "run_workers",
    "source_from_env",
]
