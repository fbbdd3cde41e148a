"""Building blocks of the router's OpenAPI description: JSON Schema helpers and the error shapes."""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

JSON = "application/json"
SSE = "text/event-stream"

#: The integers the router's JSON parser reads (orjson: signed and unsigned 64-bit); others are a 400.
INT_MIN, INT_MAX = -(2**63), 2**64 - 1
#: No value is allowed: the field must be left out.
NOTHING: Schema = {"not": {}}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def number(low: float, high: float, *, nullable: bool = True) -> Schema:
    return {"type": ["number", "null"] if nullable else "number", "minimum": low, "maximum": high}


def integer(low: int, high: int = INT_MAX, *, nullable: bool = True) -> Schema:
    return {"type": ["integer", "null"] if nullable else "integer", "minimum": low, "maximum": high}


def nullable(kind: str) -> Schema:
    return {"type": [kind, "null"]}


def obj(properties: Schema, required: list[str] | None = None, **extra: Any) -> Schema:
    """An object; fields the router does not read pass through, so others are allowed."""
    doc: Schema = {"type": "object", "properties": properties, "additionalProperties": True, **extra}
    if required:
        doc["required"] = required
    return doc


OPENAI_ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"], "description": "The field or header at fault"},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

ANTHROPIC_ERROR: Schema = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
        "request_id": {"type": "string"},
    },
}

#: Why each status is answered, for the descriptions of error responses.
STATUS_REASONS = {
    400: "The request is malformed; the error names the field",
    401: "No API key, or one the router does not know (or disabled, or expired)",
    403: "The key may not use this model group (or endpoint)",
    404: "No such model group (or resource)",
    413: "The request body is larger than settings.maxRequestBodyBytes",
    429: "A rate limit or budget of the key or model group is used up; see Retry-After",
    502: "The upstream failed or answered something the router could not read",
    503: "Every deployment of the model group is cooling down, or the router is draining",
    504: "The upstream did not answer in time",
}

HEADERS: Schema = {
    "x-request-id": {"description": "The router's id of this request", "schema": {"type": "string"}},
    "x-kubellm-model-group": {"description": "The model group that served it", "schema": {"type": "string"}},
    "x-kubellm-deployment": {"description": "The deployment that answered", "schema": {"type": "string"}},
    "x-kubellm-attempts": {"description": "Upstream attempts made", "schema": {"type": "string"}},
}

RETRY_AFTER: Schema = {"description": "Seconds to wait", "schema": {"type": "string"}}


def errors(statuses: tuple[int, ...], schema: str = "Error") -> dict[str, Any]:
    """Error responses for ``statuses``, each with the error body ``schema`` names."""
    out: dict[str, Any] = {}
    for status in statuses:
        answer: Schema = {"description": STATUS_REASONS[status], "content": {JSON: {"schema": ref(schema)}}}
        if status == 429:
            answer["headers"] = {"retry-after": RETRY_AFTER}
        out[str(status)] = answer
    return out


#: Every error a model route can answer (upstream failures included).
MODEL_ERRORS = (400, 401, 403, 404, 413, 429, 502, 503, 504)
