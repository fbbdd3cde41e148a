"""What a deployment serves: its ``mode`` (chat, embedding, image, audio, rerank, moderation).

A deployment's config may set ``mode`` to one mode or a list. Routing honours it: a request reaches
only deployments whose modes include the mode of its operation (:func:`serves`), and
``/v1/models`` shows each group's modes.

Unset, the mode is derived from the upstream model's name (:func:`infer_mode`: ``dall-e-3`` is an
image model, ``rerank-v3.5`` a reranker, ``omni-moderation-latest`` a moderation model, anything
unrecognised a chat model), and such a deployment keeps serving chat and embedding requests as it
did before modes existed: configs written then keep working unchanged. Only an explicit ``mode``
takes chat or embedding requests away from a deployment.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal, get_args

from ..providers import Operation

if TYPE_CHECKING:
    from ..config._schema import DeploymentConfig

__all__ = ["MODES", "Mode", "deployment_modes", "infer_mode", "operation_mode", "ordered", "serves"]

Mode = Literal["chat", "embedding", "image", "audio", "rerank", "moderation"]
#: Every mode, in the order ``/v1/models`` lists them.
MODES: tuple[Mode, ...] = get_args(Mode)

#: The mode each operation belongs to. An operation missing here is not governed by modes.
_OPERATION_MODE: dict[Operation, Mode] = {
    Operation.CHAT: "chat",
    Operation.COMPLETION: "chat",
    Operation.MESSAGES: "chat",
    Operation.RESPONSES: "chat",
    Operation.EMBEDDING: "embedding",
    Operation.IMAGE: "image",
    Operation.IMAGE_EDIT: "image",
    Operation.MODERATION: "moderation",
    Operation.RERANK: "rerank",
    Operation.AUDIO_SPEECH: "audio",
    Operation.AUDIO_TRANSCRIPTION: "audio",
    Operation.AUDIO_TRANSLATION: "audio",
}

#: What every deployment served before modes existed; a deployment without ``mode`` still does.
_LEGACY: frozenset[Mode] = frozenset({"chat", "embedding"})

#: Name fragments of the upstream model -> its mode, first match wins (checked on the lower-cased
#: last path segment, so ``publishers/google/models/imagen-4.0-generate-001`` is an image model).
_NAME_HINTS: tuple[tuple[Mode, tuple[str, ...]], ...] = (
    ("rerank", ("rerank",)),
    ("moderation", ("moderation",)),
    ("image", ("dall-e", "gpt-image", "imagen", "imagegeneration", "titan-image", "stable-diffusion")),
    ("image", ("sdxl", "sd3", "stability.", "flux")),
    ("audio", ("whisper", "tts", "transcribe", "speech")),
    ("embedding", ("embed",)),
)


def infer_mode(upstream_model: str) -> Mode:
    """The mode a model's name suggests; ``chat`` when it suggests none."""
    name = upstream_model.lower().rsplit("/", 1)[-1]
    for mode, fragments in _NAME_HINTS:
        if any(fragment in name for fragment in fragments):
            return mode
    return "chat"


def operation_mode(operation: Operation) -> Mode | None:
    """The mode ``operation`` belongs to, or None for operations modes do not govern."""
    return _OPERATION_MODE.get(operation)


def ordered(modes: Iterable[str]) -> list[str]:
    """``modes`` without duplicates, in :data:`MODES` order."""
    present = set(modes)
    return [m for m in MODES if m in present]


def deployment_modes(config: DeploymentConfig) -> tuple[frozenset[str], bool]:
    """A deployment's modes, and whether its config set them (else they are inferred)."""
    if config.mode is None:
        return frozenset({infer_mode(config.upstream_model or config.model)}), False
    declared = [config.mode] if isinstance(config.mode, str) else list(config.mode)
    return frozenset(declared), True


def serves(modes: frozenset[str], explicit: bool, operation: Operation) -> bool:
    """Whether a deployment with ``modes`` takes a request for ``operation``."""
    mode = operation_mode(operation)
    if mode is None or mode in modes:
        return True
    return not explicit and mode in _LEGACY
