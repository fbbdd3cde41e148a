"""OpenAI-compatible vendors as presets: a default base URL, a credential variable, and known quirks.

Each row of :data:`PRESETS` becomes one :class:`PresetProvider` subclass, registered under the
row's name. The quirks come from each vendor's own OpenAI-compatibility notes:

* ``groq``: no ``logprobs``/``top_logprobs``/``logit_bias``, no ``messages[].name``, ``n`` must be 1;
  no embeddings or legacy completions endpoint.
* ``mistral``: spells ``seed`` as ``random_seed``; no ``logit_bias``/``logprobs``/``user``; forbids
  unknown fields, so ``stream_options`` is never sent (its final chunk always carries usage).
* ``deepseek``: the ``/v1`` in its base URL is only for OpenAI compatibility; chat only.
* ``perplexity``: no ``/v1`` path, chat only, no tool calling.
* ``xai``: no embeddings endpoint.
* ``ollama``/``lmstudio``: local servers that need no key; ``vllm`` takes one if started with ``--api-key``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

from .._errors import InvalidRequestError
from ._base import Operation, RequestContext
from ._openai_shaped import OpenAIShapedProvider
from ._translate import reject_unsupported

_ALL = frozenset({Operation.CHAT, Operation.COMPLETION, Operation.EMBEDDING})
_CHAT = frozenset({Operation.CHAT})
_NO_EMBED = frozenset({Operation.CHAT, Operation.COMPLETION})
_CHAT_EMBED = frozenset({Operation.CHAT, Operation.EMBEDDING})
_NO_LOGPROBS = frozenset({"logprobs", "top_logprobs", "logit_bias"})


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    base_url: str
    api_key_env: str | None
    operations: frozenset[Operation] = _ALL
    #: Whether the vendor accepts ``stream_options`` (else it is never sent).
    stream_usage: bool = True
    #: Request parameters the vendor rejects or ignores.
    unsupported: frozenset[str] = frozenset()
    #: Fields of individual messages the vendor rejects.
    unsupported_message_fields: frozenset[str] = frozenset()
    #: OpenAI parameter name -> the vendor's name for it.
    renames: Mapping[str, str] = field(default_factory=dict)
    #: The vendor only returns one choice (``n`` must be 1).
    single_choice: bool = False


PRESETS: tuple[Preset, ...] = (
    Preset("groq", "https://api.groq.com/openai/v1", "GROQ_API_KEY", _CHAT, unsupported=_NO_LOGPROBS,
           unsupported_message_fields=frozenset({"name"}), single_choice=True),
    Preset("mistral", "https://api.mistral.ai/v1", "MISTRAL_API_KEY", _CHAT_EMBED, stream_usage=False,
           unsupported=_NO_LOGPROBS | {"user"}, renames={"seed": "random_seed"}),
    Preset("together", "https://api.together.xyz/v1", "TOGETHER_API_KEY"),
    Preset("fireworks", "https://api.fireworks.ai/inference/v1", "FIREWORKS_API_KEY"),
    Preset("deepseek", "https://api.deepseek.com/v1", "DEEPSEEK_API_KEY", _CHAT),
    Preset("openrouter", "https://openrouter.ai/api/v1", "OPENROUTER_API_KEY", _NO_EMBED),
    Preset("perplexity", "https://api.perplexity.ai", "PERPLEXITY_API_KEY", _CHAT, stream_usage=False,
           unsupported=_NO_LOGPROBS | {"tools", "tool_choice", "parallel_tool_calls"}),
    Preset("xai", "https://api.x.ai/v1", "XAI_API_KEY", _NO_EMBED),
    Preset("ollama", "http://localhost:11434/v1", None),
    Preset("vllm", "http://localhost:8000/v1", "VLLM_API_KEY", _ALL | {Operation.RERANK}),
    Preset("lmstudio", "http://localhost:1234/v1", None, stream_usage=False),
)  # fmt: skip


class PresetProvider(OpenAIShapedProvider):
    """An OpenAI-compatible vendor described by one :class:`Preset` row."""

    preset: ClassVar[Preset]

    def prepare_body(self, body: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        body = dict(body)  # the router reuses the client's body across attempts
        preset = self.preset
        if ctx.operation is not Operation.EMBEDDING:
            reject_unsupported(body, preset.unsupported, ctx, preset.name)
            if preset.single_choice and body.get("n") not in (None, 1):
                reject_unsupported(body, frozenset({"n"}), ctx, preset.name)
            if preset.unsupported_message_fields and isinstance(body.get("messages"), list):
                body["messages"] = self._strip_message_fields(body["messages"], ctx)
            for ours, theirs in preset.renames.items():
                if ours in body:
                    body[theirs] = body.pop(ours)
            if not preset.stream_usage:
                body.pop("stream_options", None)
        return super().prepare_body(body, ctx)

    def _strip_message_fields(self, messages: list[Any], ctx: RequestContext) -> list[Any]:
        fields = self.preset.unsupported_message_fields
        out = []
        for i, message in enumerate(messages):
            present = sorted(f for f in fields if isinstance(message, dict) and f in message)
            if present and not ctx.deployment.drop_unsupported_params:
                param = f"messages[{i}].{present[0]}"
                raise InvalidRequestError(
                    f"provider {self.name!r} does not support the parameter {param!r} "
                    f"(set dropUnsupportedParams on deployment {ctx.deployment.name!r} to drop it)",
                    param=param,
                    code="unsupported_parameter",
                )
            out.append({k: v for k, v in message.items() if k not in fields} if present else message)
        return out


def _provider_class(preset: Preset) -> type[PresetProvider]:
    attrs = {
        "name": preset.name,
        "preset": preset,
        "default_base_url": preset.base_url,
        "default_api_key_env": preset.api_key_env,
        "operations": preset.operations,
        "supports_stream_usage": preset.stream_usage,
        "__doc__": f"The {preset.name} preset: {preset.base_url}",
    }
    class_name = preset.name.title().replace("-", "") + "Provider"
    return cast(type[PresetProvider], type(class_name, (PresetProvider,), attrs))


PRESET_CLASSES: tuple[type[PresetProvider], ...] = tuple(_provider_class(p) for p in PRESETS)


def preset_providers() -> tuple[PresetProvider, ...]:
    """One instance of every preset, for the registry."""
    return tuple(cls() for cls in PRESET_CLASSES)
