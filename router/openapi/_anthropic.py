"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``) as the router checks it.

A deployment that does not speak Messages gets the request translated
(:func:`.._anthropic_inbound.anthropic_request_to_openai`): these schemas describe what that
translation takes, which every deployment takes. Deployments that speak Messages natively forward
the rest of Anthropic's API (documents, server tools, ...) to the upstream as it is.
"""

from __future__ import annotations

from ._schema import INT_MAX, Schema, integer, obj

_IMAGE_SOURCE = obj({"type": {"enum": ["base64", "url"]}}, ["type"])


def _typed(kind: str, then: Schema) -> Schema:
    return {"if": {"required": ["type"], "properties": {"type": {"const": kind}}}, "then": then}


_IMAGE = _typed("image", {"required": ["source"], "properties": {"source": _IMAGE_SOURCE}})

_RESULT_BLOCK: Schema = {**obj({}), "allOf": [_IMAGE]}

_USER_BLOCK: Schema = {
    **obj({"type": {"enum": ["text", "image", "tool_result"]}}, ["type"]),
    "allOf": [
        _IMAGE,
        _typed(
            "tool_result",
            {
                "properties": {
                    "content": {
                        "anyOf": [
                            {"type": "string"},
                            {"type": "array", "items": _RESULT_BLOCK},
                            {"type": "null"},
                        ]
                    }
                }
            },
        ),
    ],
}

_ASSISTANT_BLOCK = obj({"type": {"enum": ["text", "tool_use", "thinking", "redacted_thinking"]}}, ["type"])


def _content(block: Schema) -> Schema:
    return {"anyOf": [{"type": "string"}, {"type": "array", "items": block}]}


def _role(role: str, then: Schema) -> Schema:
    return {"if": {"required": ["role"], "properties": {"role": {"const": role}}}, "then": then}


_MESSAGE: Schema = {
    **obj({"role": {"enum": ["user", "assistant", "system"]}, "content": {}}, ["role"]),
    "allOf": [
        _role("user", {"required": ["content"], "properties": {"content": _content(_USER_BLOCK)}}),
        _role("assistant", {"required": ["content"], "properties": {"content": _content(_ASSISTANT_BLOCK)}}),
    ],
}

_TOOL = obj(
    {
        "type": {"enum": ["custom", None]},
        "name": {"type": "string"},
        "input_schema": {"type": ["object", "null"]},
    },
    ["name"],
)

_TOOL_CHOICE = obj({"type": {"enum": ["auto", "any", "tool", "none"]}, "name": {"type": "string"}}, ["type"])

#: ``tool_choice`` is read only beside a non-empty ``tools``.
_CHOICE_NEEDS_TOOLS: Schema = {
    "if": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}},
    "then": {"properties": {"tool_choice": {"anyOf": [_TOOL_CHOICE, {"type": "null"}]}}},
}

#: Text blocks' text is kept; any other block is left out.
_SYSTEM: Schema = {"type": ["string", "array", "null"]}

_MODEL: Schema = {"type": "string", "minLength": 1, "description": "A model group of the router"}
_MESSAGES: Schema = {"type": "array", "minItems": 1, "items": _MESSAGE}
_TOOLS: Schema = {"type": ["array", "null"], "items": _TOOL}


def messages_request() -> Schema:
    properties = {
        "model": _MODEL,
        "max_tokens": integer(1, INT_MAX, nullable=False),
        "messages": _MESSAGES,
        "system": _SYSTEM,
        "stream": {"type": "boolean"},
        "tools": _TOOLS,
        "tool_choice": {},
    }
    return {**obj(properties, ["model", "max_tokens", "messages"]), **_CHOICE_NEEDS_TOOLS}


def count_tokens_request() -> Schema:
    properties = {
        "model": _MODEL,
        "messages": {"type": "array", "minItems": 1},
        "tools": {"type": ["array", "null"]},
    }
    return obj(properties, ["model", "messages"])


MESSAGE = obj(
    {
        "id": {"type": "string"},
        "type": {"const": "message"},
        "role": {"const": "assistant"},
        "content": {"type": "array", "items": obj({"type": {"type": "string"}}, ["type"])},
        "stop_reason": {"type": ["string", "null"]},
        "usage": obj({"input_tokens": {"type": "integer"}, "output_tokens": {"type": "integer"}}),
    },
    ["type", "content"],
)

TOKEN_COUNT = obj({"input_tokens": {"type": "integer", "minimum": 0}}, ["input_tokens"])
