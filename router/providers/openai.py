"""OpenAI itself, and any server that speaks its API at a base URL of your choosing."""

from __future__ import annotations

from ._base import Operation
from ._openai_shaped import OpenAIShapedProvider


class OpenAIProvider(OpenAIShapedProvider):
    name = "openai"
    #: The Responses API is OpenAI's own; OpenAI-compatible servers are not assumed to have it.
    operations = OpenAIShapedProvider.operations | {Operation.RESPONSES}
    default_api_key_env = "OPENAI_API_KEY"
    default_base_url = "https://api.openai.com/v1"


class OpenAICompatibleProvider(OpenAIShapedProvider):
    """vLLM, Ollama, LM Studio, or any vendor's OpenAI-compatible endpoint; `baseUrl` is required."""

    name = "openai-compatible"
    default_api_key_env = "OPENAI_COMPATIBLE_API_KEY"
    required_fields = ("baseUrl",)
