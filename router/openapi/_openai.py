"""OpenAI's chat completions, completions and embeddings: requests as :mod:`.._validate` checks them.

A body valid under these schemas passes the validator; one invalid under them is refused with a 400
naming the field. Fields the router does not interpret pass through to the upstream as they are.
"""

from __future__ import annotations

from typing import Any

from ..inbound._openai_validate import MAX_DIMENSIONS, ROLES
from ._schema import INT_MAX, INT_MIN, NOTHING, Schema, integer, nullable, number, obj

_PART: Schema = {
    **obj({"type": {"type": "string"}}, ["type"]),
    "if": {"required": ["type"], "properties": {"type": {"const": "text"}}},
    "then": {"required": ["text"], "properties": {"text": {"type": "string"}}},
}

_NAMED = obj({"name": {"type": "string"}}, ["name"])
_FUNCTION = obj({"function": _NAMED}, ["function"])

_MESSAGE: Schema = {
    **obj(
        {
            "role": {"enum": sorted(ROLES)},
            "content": {
                "anyOf": [{"type": "string"}, {"type": "array", "items": _PART}, {"type": "null"}],
                "description": "Required, except on an assistant message (which may send null, or "
                "leave it out when it has tool_calls or function_call)",
            },
            "tool_calls": {"type": ["array", "null"], "items": _FUNCTION},
            "function_call": {**_NAMED, "type": ["object", "null"]},
            "tool_call_id": {"description": "Required on tool messages"},
        },
        ["role"],
    ),
    "allOf": [
        {
            "if": {"required": ["role"], "properties": {"role": {"const": "assistant"}}},
            "then": {
                "anyOf": [
                    {"required": ["content"]},
                    {
                        "required": ["tool_calls"],
                        "properties": {"tool_calls": {"type": "array", "minItems": 1}},
                    },
                    {"required": ["function_call"], "properties": {"function_call": {"type": "object"}}},
                ]
            },
            "else": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
        },
        {
            "if": {"required": ["role"], "properties": {"role": {"const": "tool"}}},
            "then": {"required": ["tool_call_id"], "properties": {"tool_call_id": {"type": "string"}}},
        },
    ],
}

_TOKEN: Schema = {"type": "integer", "minimum": INT_MIN, "maximum": INT_MAX}
TOKEN_INPUT: Schema = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "minItems": 1, "items": {"type": "string"}},
        {"type": "array", "minItems": 1, "items": _TOKEN},
        {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1, "items": _TOKEN}},
    ],
    "description": "A string, an array of strings, an array of tokens, or an array of token arrays",
}

_SAMPLING: Schema = {
    "temperature": number(0, 2),
    "top_p": number(0, 1),
    "presence_penalty": number(-2, 2),
    "frequency_penalty": number(-2, 2),
    "n": integer(1, 128),
    "max_tokens": integer(1),
    "max_completion_tokens": integer(1),
    "seed": integer(INT_MIN, 2**63 - 1),
    "stop": {
        "anyOf": [
            {"type": "string"},
            {"type": "array", "maxItems": 4, "items": {"type": "string"}},
            {"type": "null"},
        ]
    },
}

_STREAM: Schema = {
    "stream": nullable("boolean"),
    "stream_options": {
        **obj({"include_usage": nullable("boolean")}),
        "type": ["object", "null"],
        "description": "Only with stream: true",
    },
}

#: The upstream is the config's choice: a request naming one is refused (see _validate).
_NO_TARGET: Schema = {
    "api_base": {**NOTHING, "description": "Refused: the router's config picks the upstream"},
    "base_url": {**NOTHING, "description": "Refused: the router's config picks the upstream"},
}

_STREAM_OPTIONS_NEED_STREAM: Schema = {
    "if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
    "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
}


def _request(required: list[str], properties: Schema, in_path: bool, **extra: Any) -> Schema:
    model: Schema = (
        {"description": "Ignored: the deployment in the path names the model group"}
        if in_path
        else {"type": "string", "minLength": 1, "description": "A model group of the router"}
    )
    return {
        **obj({"model": model, **_NO_TARGET, **properties}, required if in_path else ["model", *required]),
        **extra,
    }


def chat_request(in_path: bool = False) -> Schema:
    properties = {
        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
        **_STREAM,
        **_SAMPLING,
        "tools": {"type": ["array", "null"], "items": _FUNCTION},
        "response_format": {**obj({"type": {"type": "string"}}, ["type"]), "type": ["object", "null"]},
    }
    return _request(["messages"], properties, in_path, **_STREAM_OPTIONS_NEED_STREAM)


def completion_request(in_path: bool = False) -> Schema:
    properties = {"prompt": TOKEN_INPUT, "messages": NOTHING, **_STREAM, **_SAMPLING}
    return _request(["prompt"], properties, in_path, **_STREAM_OPTIONS_NEED_STREAM)


def embedding_request(in_path: bool = False) -> Schema:
    properties = {
        "input": TOKEN_INPUT,
        "messages": NOTHING,
        "dimensions": integer(1, MAX_DIMENSIONS),
        "encoding_format": {"enum": ["float", "base64", None]},
    }
    return _request(["input"], properties, in_path)


# --------------------------------------------------------------------------- answers

_USAGE = obj({"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}})

CHAT_COMPLETION = obj(
    {
        "id": {"type": "string"},
        "object": {"const": "chat.completion"},
        "model": {"type": "string"},
        "choices": {
            "type": "array",
            "items": obj({"index": {"type": "integer"}, "message": obj({"role": {"type": "string"}})}),
        },
        "usage": _USAGE,
    },
    ["object", "choices"],
)

TEXT_COMPLETION = obj(
    {
        "id": {"type": "string"},
        "object": {"const": "text_completion"},
        "model": {"type": "string"},
        "choices": {"type": "array", "items": obj({"text": {"type": "string"}})},
        "usage": _USAGE,
    },
    ["object", "choices"],
)

EMBEDDINGS = obj(
    {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": obj(
                {
                    "object": {"const": "embedding"},
                    "index": {"type": "integer"},
                    "embedding": {
                        "anyOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}],
                        "description": "Floats, or base64 little-endian float32 (encoding_format: base64)",
                    },
                },
                ["embedding"],
            ),
        },
        "model": {"type": "string"},
        "usage": _USAGE,
    },
    ["object", "data"],
)
