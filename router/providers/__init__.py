"""Provider adapters, one module each, registered by name."""

from __future__ import annotations

from ._base import (
    TRANSLATED,
    Event,
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
from .anthropic import AnthropicProvider
from .azure import AzureOpenAIProvider
from .bedrock import BedrockProvider
from .cohere import CohereProvider
from .gemini import GeminiProvider
from .huggingface import HuggingFaceEndpointProvider, HuggingFaceProvider
from .mock import MockProvider
from .openai import OpenAICompatibleProvider, OpenAIProvider
from .presets import preset_providers
from .replicate import ReplicateProvider
from .vertex import VertexProvider

_REGISTRY: dict[str, Provider] = {}


def register(provider: Provider) -> None:
    _REGISTRY[provider.name] = provider


_BUILTIN: tuple[Provider, ...] = (
    OpenAIProvider(),
    OpenAICompatibleProvider(),
    MockProvider(),
    AnthropicProvider(),
    ReplicateProvider(),
    GeminiProvider(),
    VertexProvider(),
    BedrockProvider(),
    AzureOpenAIProvider(),
    HuggingFaceProvider(),
    HuggingFaceEndpointProvider(),
    CohereProvider(),
    *preset_providers(),
)
for _provider in _BUILTIN:
    register(_provider)


def get_provider(name: str) -> Provider:
    return _REGISTRY[name]


def provider_names() -> frozenset[str]:
    return frozenset(_REGISTRY)


__all__ = [
    "TRANSLATED",
    "Event",
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
