"""Turning command-line choices into a config source.

The CLI passes its choices through environment variables so that worker
processes started by uvicorn build exactly the same app.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..providers import get_provider, provider_names
from ..server._app import ConfigSource
from ._schema import ConfigError, embedded_default, parse_config

ENV_CONFIG = "KUBELLM_CONFIG"
ENV_MODEL = "KUBELLM_MODEL"
ENV_BASE_URL = "KUBELLM_MODEL_BASE_URL"


def single_model_source(spec: str, base_url: str | None = None) -> ConfigSource:
    """`provider/model`: one deployment, credentials from the provider's usual variable."""
    provider_name, sep, model = spec.partition("/")
    if not sep or not model:
        raise ConfigError(f"--model {spec!r}: expected provider/model, e.g. openai/gpt-4o-mini")
    if provider_name not in provider_names():
        known = ", ".join(sorted(provider_names()))
        raise ConfigError(f"--model {spec!r}: unknown provider {provider_name!r}; known: {known}")
    provider = get_provider(provider_name)
    deployment: dict[str, object] = {
        "name": f"{provider_name}-{model}".replace("/", "-"),
        "model": model,
        "provider": provider_name,
        "upstreamModel": model,
    }
    if base_url:
        deployment["baseUrl"] = base_url
    if provider.default_api_key_env and provider_name != "mock":
        deployment["apiKeyEnv"] = provider.default_api_key_env
    doc = {"deployments": [deployment], "modelGroups": [{"name": model, "aliases": [spec]}]}
    return ConfigSource(config=parse_config(doc, source=f"--model {spec}"))


def source_from_env(env: Mapping[str, str]) -> ConfigSource:
    if env.get(ENV_CONFIG):
        return ConfigSource(path=Path(env[ENV_CONFIG]))
    if env.get(ENV_MODEL):
        return single_model_source(env[ENV_MODEL], env.get(ENV_BASE_URL))
    return ConfigSource(config=embedded_default())
