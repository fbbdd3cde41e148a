"""Provider adapters, one module each, registered by name."""

from __future__ import annotations

from ._base import (
    Operation,
    Payload,
    Provider,
    ProviderResponse,
    RequestContext,
    StreamTranslator,
    UpstreamClient,
    UpstreamRequest,
    UpstreamResponse,
    Usage,
)
from .mock import MockProvider
from .openai import OpenAICompatibleProvider, OpenAIProvider

_REGISTRY: dict[str, Provider] = {}


def register(provider: Provider) -> None:
    _REGISTRY[provider.name] = provider


for _provider in (OpenAIProvider(), OpenAICompatibleProvider(), MockProvider()):
    register(_provider)


def get_provider(name: str) -> Provider:
    return _REGISTRY[name]


def provider_names() -> frozenset[str]:
    return frozenset(_REGISTRY)


__all__ = [
    "Operation",
    "Payload",
    "Provider",
    "ProviderResponse",
    "RequestContext",
    "StreamTranslator",
    "UpstreamClient",
    "UpstreamRequest",
    "UpstreamResponse",
    "Usage",
    "get_provider",
    "provider_names",
    "register",
]
