"""The named schemas of the router's OpenAPI description."""

from __future__ import annotations

from . import _anthropic, _openai, _responses, _surface
from ._schema import ANTHROPIC_ERROR, OPENAI_ERROR, Schema, obj

#: The last instant /admin/spend takes (9999-12-31T23:59:59Z), as Unix seconds.
LATEST = 253402300799

#: RFC 3339 times /admin/spend reads, 1970 to 9999 in UTC (other offsets and days past the 28th
#: are read too, when they name a real instant in that range; the pattern keeps to those that do).
_UTC = (
    r"^(19[7-9][0-9]|[2-9][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?Z$"
)

_TOTALS = obj(
    {
        "requests": {"type": "integer"},
        "promptTokens": {"type": "integer"},
        "completionTokens": {"type": "integer"},
        "spendUsd": {"type": "string", "description": "A plain decimal string"},
    },
    ["requests", "promptTokens", "completionTokens", "spendUsd"],
)

_MODEL = obj(
    {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
    },
    ["id", "object"],
)


def _event(data: Schema, name: Schema | None = None, description: str = "") -> Schema:
    """One server-sent event: ``data`` is the JSON document it carries."""
    payload: Schema = {"type": "string", "contentMediaType": "application/json", "contentSchema": data}
    properties: Schema = {"data": payload}
    if name is not None:
        properties["event"] = name
    return {**obj(properties, ["data"]), "description": description}


def _openai_event(chunk: Schema, description: str) -> Schema:
    """OpenAI's streams: unnamed events of chunks (an error instead, if it fails), then [DONE]."""
    event = _event({"anyOf": [chunk, OPENAI_ERROR]})
    done = obj({"data": {"const": "[DONE]"}}, ["data"])
    return {"anyOf": [done, event], "description": description}


_CHUNK = obj(
    {"object": {"const": "chat.completion.chunk"}, "choices": {"type": "array"}}, ["object", "choices"]
)
_TEXT_CHUNK = obj(
    {"object": {"const": "text_completion"}, "choices": {"type": "array"}}, ["object", "choices"]
)
_TYPED = obj({"type": {"type": "string"}}, ["type"])
_MESSAGE_EVENTS = [
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
    "ping",
    "error",
]


def components() -> dict[str, Schema]:
    return {
        "Error": {**OPENAI_ERROR, "description": "An OpenAI-style error"},
        "AnthropicError": {**ANTHROPIC_ERROR, "description": "An Anthropic-style error (/v1/messages)"},
        "ChatCompletionRequest": _openai.chat_request(),
        "CompletionRequest": _openai.completion_request(),
        "EmbeddingRequest": _openai.embedding_request(),
        "AzureChatCompletionRequest": _openai.chat_request(in_path=True),
        "AzureCompletionRequest": _openai.completion_request(in_path=True),
        "AzureEmbeddingRequest": _openai.embedding_request(in_path=True),
        "MessagesRequest": _anthropic.messages_request(),
        "CountTokensRequest": _anthropic.count_tokens_request(),
        "ResponsesRequest": _responses.responses_request(),
        "ChatCompletion": _openai.CHAT_COMPLETION,
        "ChatCompletionEvent": _openai_event(_CHUNK, "An event of a chat completion stream"),
        "CompletionEvent": _openai_event(_TEXT_CHUNK, "An event of a text completion stream"),
        "MessageEvent": _event(_TYPED, {"enum": _MESSAGE_EVENTS}, "An event of a Messages stream"),
        "ResponseEvent": _event(
            _TYPED, {"type": "string", "pattern": "^(response\\.|error$)"}, "An event of a Responses stream"
        ),
        "TextCompletion": _openai.TEXT_COMPLETION,
        "Embeddings": _openai.EMBEDDINGS,
        "Message": _anthropic.MESSAGE,
        "TokenCount": _anthropic.TOKEN_COUNT,
        "Response": _responses.RESPONSE,
        "DeletedResponse": _responses.DELETED,
        "InputItemList": _responses.INPUT_ITEMS,
        "Model": _MODEL,
        **_surface_components(),
        "ModelList": obj(
            {"object": {"const": "list"}, "data": {"type": "array", "items": _MODEL}}, ["object", "data"]
        ),
        "KeyInfo": obj(
            {
                "key": {"type": "string"},
                "master": {"type": "boolean"},
                "usage": obj({"since": {"type": "string"}}),
                "teamPolicy": obj({"name": {"type": "string"}}, ["name"]),
            },
            ["key"],
        ),
        "Spend": obj(
            {
                "since": {"type": "string", "format": "date-time"},
                "until": {"type": "string", "format": "date-time"},
                "by": {"enum": ["key", "team", "model_group", "deployment"]},
                "groups": {"type": "object", "additionalProperties": _TOTALS},
                "total": _TOTALS,
            },
            ["since", "until", "by", "groups", "total"],
        ),
        "Instant": {
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": LATEST},
                {"type": "string", "pattern": _UTC},
            ],
            "description": "Unix seconds, or an RFC 3339 time; 1970 to 9999",
        },
        "Readiness": obj(
            {
                "status": {"enum": ["ready", "draining", "waiting-for-config"]},
                "configVersion": {"type": ["string", "null"]},
                "modelGroups": {"type": "integer"},
                "degraded": {"type": "boolean"},
                "deployments": {"type": "object"},
            },
            ["status"],
        ),
    }


def _surface_components() -> dict[str, Schema]:
    return {
        "ImageRequest": _surface.image_request(),
        "AzureImageRequest": _surface.image_request(in_path=True),
        "ImageEditRequest": _surface.image_edit_request(),
        "AzureImageEditRequest": _surface.image_edit_request(in_path=True),
        "ModerationRequest": _surface.moderation_request(),
        "RerankRequest": _surface.rerank_request(),
        "SpeechRequest": _surface.speech_request(),
        "AzureSpeechRequest": _surface.speech_request(in_path=True),
        "TranscriptionRequest": _surface.transcription_request(),
        "AzureTranscriptionRequest": _surface.transcription_request(in_path=True),
        "FileUploadRequest": _surface.file_upload_request(),
        "BatchRequest": _surface.batch_request(),
        "Images": _surface.IMAGES,
        "Moderation": _surface.MODERATION,
        "Rerank": _surface.RERANK,
        "Transcription": _surface.TRANSCRIPTION,
        "File": _surface.FILE,
        "FileList": _surface.page(_surface.FILE),
        "DeletedFile": _surface.DELETED_FILE,
        "Batch": _surface.BATCH,
        "BatchList": _surface.page(_surface.BATCH),
    }
