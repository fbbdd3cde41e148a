"""Images, moderations, rerank and audio requests as their validators check them
(:mod:`..inbound.surface`, :mod:`..audio._api`), and the answers of those routes and of files and
batches (:mod:`..files._routes`).

Multipart bodies are text fields and file parts: a field described as an integer, number or
boolean is sent as its text (``5``, ``0.5``, ``true``), which is what the router parses.
"""

from __future__ import annotations

from ..audio._api import SPEECH_MEDIA, TRANSCRIPT_FORMATS
from ..inbound._surface import MAX_DOCUMENTS, MAX_IMAGES
from ._schema import Schema, integer, nullable, number, obj

#: A file part (OpenAPI 3.1's spelling of OpenAPI 3.0's ``format: binary``).
_FILE: Schema = {"type": "string", "contentMediaType": "application/octet-stream"}
#: The audio and files routes' parser refuses a part without a field name.
_NAMED_PARTS: Schema = {"propertyNames": {"minLength": 1}}
_NON_BLANK: Schema = {"type": "string", "pattern": "\\S"}
_MODEL_OPTIONAL: Schema = {
    "type": ["string", "null"],
    "minLength": 1,
    "description": "A model group of the router; left out, the first group serving the route's mode",
}
_MODEL: Schema = {"type": "string", "minLength": 1, "description": "A model group of the router"}
_IN_PATH: Schema = {"description": "Ignored: the deployment in the path names the model group"}
_NO_STREAM: Schema = {
    "enum": [False, None, "false"],
    "description": "Streamed answers are not supported on this route: true is a 400",
}
#: An integer as decimal digits (multipart sends them so; JSON may too): the router reads both.
_DIGITS_1_TO_10: Schema = {"type": "string", "pattern": "^\\s*0*([1-9]|10)\\s*$"}
_DIGITS_1_TO_10000: Schema = {"type": "string", "pattern": "^\\s*0*([1-9][0-9]{0,3}|10000)\\s*$"}

_IMAGE_OPTIONS: Schema = {
    name: nullable("string")
    for name in ("size", "quality", "style", "user", "background", "output_format", "moderation")
}


def _model(in_path: bool, optional: bool = True) -> Schema:
    return _IN_PATH if in_path else (_MODEL_OPTIONAL if optional else _MODEL)


def image_request(in_path: bool = False) -> Schema:
    properties: Schema = {
        "model": _model(in_path),
        "prompt": _NON_BLANK,
        "n": {"anyOf": [integer(1, MAX_IMAGES), _DIGITS_1_TO_10]},
        "response_format": {"enum": ["url", "b64_json", None]},
        "stream": _NO_STREAM,
        **_IMAGE_OPTIONS,
    }
    return obj(properties, ["prompt"])


def image_edit_request(in_path: bool = False) -> Schema:
    """The multipart form of ``/v1/images/edits``: text fields and the image file(s)."""
    properties: Schema = {
        "model": _model(in_path),
        "image": {**_FILE, "description": "The image to edit (several: repeat the image[] field instead)"},
        "mask": _FILE,
        "prompt": _NON_BLANK,
        "n": integer(1, MAX_IMAGES, nullable=False),
        "response_format": {"enum": ["url", "b64_json"]},
        "stream": {"const": False, "description": "true is a 400"},
        **{name: {"type": "string"} for name in _IMAGE_OPTIONS},
    }
    return obj(properties, ["image", "prompt"])


_MODERATION_PART: Schema = {
    "anyOf": [
        {"type": "string"},
        obj({"type": {"enum": ["text", "image_url"]}}, ["type"]),
    ]
}


def moderation_request() -> Schema:
    properties: Schema = {
        "model": _MODEL_OPTIONAL,
        "input": {
            "anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": _MODERATION_PART}],
            "description": "A string, or an array of strings and text/image_url parts",
        },
        "stream": _NO_STREAM,
    }
    return obj(properties, ["input"])


def rerank_request() -> Schema:
    document: Schema = {"anyOf": [{"type": "string"}, obj({"text": {"type": "string"}}, ["text"])]}
    properties: Schema = {
        "model": _MODEL_OPTIONAL,
        "query": _NON_BLANK,
        "documents": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_DOCUMENTS,
            "items": document,
            "description": "Strings, or Jina's objects with a text",
        },
        "top_n": {"anyOf": [integer(1, MAX_DOCUMENTS), _DIGITS_1_TO_10000]},
        "max_tokens_per_doc": integer(1, 1_000_000),
        "return_documents": {"enum": [True, False, None, "true", "false"]},
        "stream": _NO_STREAM,
    }
    return obj(properties, ["query", "documents"])


def speech_request(in_path: bool = False) -> Schema:
    voice: Schema = {
        "anyOf": [
            {"type": "string", "minLength": 1},
            obj({"id": {"type": "string", "minLength": 1}}, ["id"]),
        ],
        "description": "A voice name, or an object with the id of a custom voice",
    }
    properties: Schema = {
        "model": _IN_PATH if in_path else _MODEL,
        "input": {"type": "string", "minLength": 1},
        "voice": voice,
        "response_format": {"enum": list(SPEECH_MEDIA)},
        "speed": number(0.25, 4.0, nullable=False),
        "stream_format": {"enum": ["audio", "sse"]},
        "instructions": {"type": "string"},
    }
    required = ["input", "voice"] if in_path else ["model", "input", "voice"]
    return obj(properties, required)


def transcription_request(in_path: bool = False) -> Schema:
    """The multipart form of ``/v1/audio/transcriptions`` and ``/translations``."""
    properties: Schema = {
        "model": _IN_PATH if in_path else _MODEL,
        "file": {
            **_FILE,
            "minLength": 1,
            "description": "The audio; at most settings.maxUploadBytes (else a 413)",
        },
        "response_format": {"enum": sorted(TRANSCRIPT_FORMATS)},
        "temperature": number(0, 1, nullable=False),
        "language": {"type": "string"},
        "prompt": {"type": "string"},
        "stream": {"const": False, "description": "true is a 400"},
    }
    return obj(properties, ["file"] if in_path else ["file", "model"], **_NAMED_PARTS)


FILE_PURPOSES = ["assistants", "batch", "fine-tune", "vision", "user_data", "evals"]


def file_upload_request() -> Schema:
    properties: Schema = {
        "file": {
            **_FILE,
            "description": "At most settings.maxUploadBytes (else a 413); for purpose batch, JSON lines "
            "whose body.model all name one model group",
        },
        "purpose": {"enum": FILE_PURPOSES},
        "model": {
            "type": "string",
            "minLength": 1,
            "description": "The model group the file is for (or an x-kubellm-model header); not read for "
            "purpose batch, whose lines name it",
        },
    }
    return {
        **obj(properties, ["file", "purpose"], **_NAMED_PARTS),
        "anyOf": [{"required": ["model"]}, {"properties": {"purpose": {"const": "batch"}}}],
    }


def batch_request() -> Schema:
    properties: Schema = {
        "input_file_id": {"type": "string", "minLength": 1, "description": "A batch file the key uploaded"},
        "endpoint": {"type": "string", "description": "e.g. /v1/chat/completions"},
        "completion_window": {"type": "string", "description": "24h"},
        "metadata": nullable("object"),
    }
    return obj(properties, ["input_file_id", "endpoint", "completion_window"])


# --------------------------------------------------------------------------- answers

IMAGES = obj(
    {
        "created": {"type": "integer"},
        "data": {
            "type": "array",
            "items": obj({"b64_json": {"type": "string"}, "url": {"type": "string"}, "revised_prompt": {}}),
        },
        "usage": {"type": "object"},
    },
    ["data"],
)

MODERATION = obj(
    {
        "id": {"type": "string"},
        "model": {"type": "string"},
        "results": {
            "type": "array",
            "items": obj(
                {
                    "flagged": {"type": "boolean"},
                    "categories": {"type": "object"},
                    "category_scores": {"type": "object"},
                },
                ["flagged", "categories"],
            ),
        },
    },
    ["results"],
)

RERANK = obj(
    {
        "id": {"type": "string"},
        "model": {"type": "string"},
        "results": {
            "type": "array",
            "items": obj(
                {
                    "index": {"type": "integer", "minimum": 0},
                    "relevance_score": {"type": "number"},
                    "document": obj({"text": {"type": "string"}}),
                },
                ["index", "relevance_score"],
            ),
        },
        "meta": {"type": "object"},
        "usage": {"type": "object"},
    },
    ["results"],
)

TRANSCRIPTION = obj(
    {"text": {"type": "string"}, "usage": {"type": "object"}, "duration": {"type": "number"}}, ["text"]
)

FILE = obj(
    {
        "id": {"type": "string"},
        "object": {"const": "file"},
        "bytes": {"type": ["integer", "null"]},
        "created_at": {"type": ["integer", "null"]},
        "filename": {"type": "string"},
        "purpose": {"type": "string"},
        "status": {"type": "string"},
    },
    ["id", "object"],
)

DELETED_FILE = obj(
    {"id": {"type": "string"}, "object": {"const": "file"}, "deleted": {"type": "boolean"}},
    ["id", "deleted"],
)

BATCH = obj(
    {
        "id": {"type": "string"},
        "object": {"const": "batch"},
        "endpoint": {"type": "string"},
        "input_file_id": {"type": "string"},
        "status": {"type": "string"},
        "output_file_id": {"type": ["string", "null"]},
        "error_file_id": {"type": ["string", "null"]},
        "request_counts": {"type": "object"},
    },
    ["id", "object", "status"],
)


def page(item: Schema) -> Schema:
    """A cursor page of the caller's objects, newest first."""
    return obj(
        {
            "object": {"const": "list"},
            "data": {"type": "array", "items": item},
            "first_id": nullable("string"),
            "last_id": nullable("string"),
            "has_more": {"type": "boolean"},
        },
        ["object", "data", "has_more"],
    )
