"""OpenAI's Responses API (``/v1/responses``) as the router checks it.

A deployment that does not speak Responses gets the request translated into a chat request
(:func:`..inbound.responses.responses_request_to_chat`), which the chat validator then checks:
these schemas describe what both take, which every deployment takes. Deployments that speak
Responses natively (OpenAI, Azure) also take what chat cannot carry (built-in tools, files).
"""

from __future__ import annotations

from ._schema import NOTHING, Schema, integer, nullable, number, obj


def _when(field: str, value: str, then: Schema) -> Schema:
    return {"if": {"required": [field], "properties": {field: {"const": value}}}, "then": then}


_TEXT_PARTS = ["input_text", "output_text", "text", "refusal"]
_IMAGE_URL: Schema = {
    "required": ["image_url"],
    "properties": {"image_url": {"type": "string", "minLength": 1}},
}
_PART: Schema = {
    "anyOf": [
        {"type": "string"},
        {
            **obj({"type": {"enum": [*_TEXT_PARTS, "input_image"]}}, ["type"]),
            **_when("type", "input_image", _IMAGE_URL),
        },
    ]
}
_TEXT_PART: Schema = {"anyOf": [{"type": "string"}, obj({"type": {"enum": _TEXT_PARTS}}, ["type"])]}

_ID: Schema = {"type": "string", "minLength": 1}

_MESSAGE: Schema = {
    "required": ["role", "content"],
    "properties": {
        "role": {"enum": ["user", "assistant", "system", "developer"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _PART}]},
    },
    **_when(
        "role",
        "assistant",
        {"properties": {"content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]}}},
    ),
}

_OUTPUT_PART = obj({"type": {"enum": ["input_text", "output_text"]}}, ["type"])

_ITEM: Schema = {
    **obj({"type": {"enum": ["message", "function_call", "function_call_output", "reasoning"]}}),
    "description": "An input item; without a type, a message",
    "allOf": [
        {"if": {"not": {"required": ["type"]}}, "then": _MESSAGE},
        _when("type", "message", _MESSAGE),
        _when(
            "type",
            "function_call",
            {"required": ["call_id", "name"], "properties": {"call_id": _ID, "name": _ID}},
        ),
        _when(
            "type",
            "function_call_output",
            {
                "required": ["call_id", "output"],
                "properties": {
                    "call_id": _ID,
                    "output": {"anyOf": [{"type": "string"}, {"type": "array", "items": _OUTPUT_PART}]},
                },
            },
        ),
    ],
}

_TOOL = obj({"type": {"const": "function"}, "name": _ID}, ["type", "name"])

_TOOL_CHOICE: Schema = {
    "anyOf": [
        {"enum": ["auto", "none", "required"]},
        obj({"type": {"const": "function"}, "name": {"type": "string"}}, ["type", "name"]),
        obj(
            {
                "type": {"const": "allowed_tools"},
                "mode": {"enum": ["auto", "required"]},
                "tools": {"type": "array"},
            },
            ["type", "mode", "tools"],
        ),
        {"type": "null"},
    ]
}

_FORMAT: Schema = {
    **obj({"type": {"enum": ["text", "json_object", "json_schema"]}}, ["type"]),
    **_when("type", "json_schema", {"required": ["schema"], "properties": {"schema": {"type": "object"}}}),
}

#: ``tool_choice`` is read only beside a non-empty ``tools``.
_CHOICE_NEEDS_TOOLS: Schema = {
    "if": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}},
    "then": {"properties": {"tool_choice": _TOOL_CHOICE}},
}

_PREVIOUS: Schema = {
    "required": ["previous_response_id"],
    "properties": {"previous_response_id": {"type": "string"}},
}
#: The request must come to at least one message: input, instructions, or a stored turn.
_SOMETHING_TO_SAY: Schema = {
    "anyOf": [
        _PREVIOUS,
        {"required": ["instructions"], "properties": {"instructions": {"type": "string", "minLength": 1}}},
        {"required": ["input"], "properties": {"input": {"type": "string"}}},
        {
            "required": ["input"],
            "properties": {
                "input": {
                    "type": "array",
                    "contains": {
                        "not": {"required": ["type"], "properties": {"type": {"const": "reasoning"}}}
                    },
                }
            },
        },
    ]
}
_INPUT_OR_PREVIOUS: Schema = {
    "anyOf": [_PREVIOUS, {"required": ["input"], "properties": {"input": {"not": {"type": "null"}}}}]
}

_REFUSED = {"enum": [None, False], "description": "Not supported by the router"}


def responses_request() -> Schema:
    properties: Schema = {
        "model": {"type": "string", "minLength": 1, "description": "A model group of the router"},
        "input": {"anyOf": [{"type": "string"}, {"type": "array", "items": _ITEM}, {"type": "null"}]},
        "previous_response_id": {"type": ["string", "null"], "minLength": 1},
        "instructions": nullable("string"),
        "stream": nullable("boolean"),
        "store": nullable("boolean"),
        "parallel_tool_calls": nullable("boolean"),
        "max_output_tokens": integer(1),
        "temperature": number(0, 2),
        "top_p": number(0, 1),
        "top_logprobs": nullable("integer"),
        "prompt_cache_key": nullable("string"),
        "user": nullable("string"),
        "safety_identifier": nullable("string"),
        "metadata": nullable("object"),
        "reasoning": nullable("object"),
        "tools": {"type": ["array", "null"], "items": _TOOL},
        "tool_choice": {"type": ["string", "object", "null"]},
        "text": {**obj({"format": {"anyOf": [_FORMAT, {"type": "null"}]}}), "type": ["object", "null"]},
        "background": _REFUSED,
        "conversation": _REFUSED,
        "prompt": _REFUSED,
        "api_base": NOTHING,
        "base_url": NOTHING,
    }
    return {
        **obj(properties, ["model"]),
        "allOf": [_INPUT_OR_PREVIOUS, _SOMETHING_TO_SAY, _CHOICE_NEEDS_TOOLS],
    }


RESPONSE = obj(
    {
        "id": {"type": "string"},
        "object": {"const": "response"},
        "status": {"type": "string"},
        "model": {"type": "string"},
        "output": {"type": "array", "items": {"type": "object"}},
    },
    ["id", "object", "output"],
)

DELETED = obj(
    {"id": {"type": "string"}, "object": {"const": "response"}, "deleted": {"const": True}},
    ["id", "object", "deleted"],
)

INPUT_ITEMS = obj(
    {
        "object": {"const": "list"},
        "data": {"type": "array", "items": {"type": "object"}},
        "has_more": {"type": "boolean"},
        "first_id": {"type": "string"},
        "last_id": {"type": "string"},
    },
    ["object", "data", "has_more", "first_id", "last_id"],
)
