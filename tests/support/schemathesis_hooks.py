"""schemathesis hooks for tests/test_openapi.py (loaded through SCHEMATHESIS_HOOKS).

What the test knows of its router and its upstream that the description cannot say:

* The description names no model group (the config decides them, and can change at any time),
  so nearly every generated request would name a group that does not exist and stop at a 404
  before it reaches a deployment. The test's copy of the description names the router's groups
  (``mock``, and ``missing`` for the 404), so the whole path is exercised: translation, the mock
  provider, rendering.
* A valid, tiny ``x-kubellm-*timeout`` legitimately ends in a 504, which ``not_a_server_error``
  counts against the router: those headers are described but not fuzzed here.
* Like OpenAI, the mock refuses a ``tool_choice`` naming a function that is not among ``tools``
  (an upstream's 400 that no schema can express): valid cases that do so are not sent.
* Audio, files and batches reach a fake of OpenAI's platform (tests/fakes/openai_platform.py),
  which, like OpenAI's transcription models other than the diarizing one, does not answer
  ``response_format: diarized_json``: the test's description leaves that format out. The router
  sends the fields of an upload on as the client named them, and the fake's multipart reader
  (aiohttp's) refuses a field name that is not printable ASCII with a 500: such uploads are not
  sent.
  The fake answers speech as audio bytes whatever ``stream_format`` says (OpenAI's ``sse`` is
  events, which the router relays as they come): the test's description asks for audio only.
* A file part's schema cannot say what the bytes must be: a valid case's ``purpose: batch``
  upload gets a batch file (JSON lines naming the ``mock`` group) instead of random bytes, which
  the router refuses with a 400.
"""

from __future__ import annotations

from typing import Any

import schemathesis

GROUPS = ["mock", "missing"]
_TIMEOUTS = {
    "x-kubellm-timeout",
    "x-kubellm-connect-timeout",
    "x-kubellm-first-token-timeout",
    "x-kubellm-idle-timeout",
}
_NAMED_IN_BODY = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "MessagesRequest",
    "CountTokensRequest",
    "ResponsesRequest",
    "ImageRequest",
    "ImageEditRequest",
    "ModerationRequest",
    "RerankRequest",
    "SpeechRequest",
    "TranscriptionRequest",
    "FileUploadRequest",
]
_TRANSCRIPTIONS = ["TranscriptionRequest", "AzureTranscriptionRequest"]
#: Uploads the router sends on to the fake, field names and all.
_TO_THE_FAKE = ("/audio/transcriptions", "/audio/translations", "/v1/files")
BATCH_FILE = (
    b'{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", '
    b'"body": {"model": "mock", "messages": [{"role": "user", "content": "hi"}]}}\n'
)


@schemathesis.hook
def before_load_schema(context: Any, raw_schema: dict[str, Any]) -> None:
    schemas = raw_schema["components"]["schemas"]
    for name in _NAMED_IN_BODY:
        model = schemas[name]["properties"]["model"]
        schemas[name]["properties"]["model"] = {
            "enum": [*GROUPS, *([None] if "null" in model["type"] else [])]
        }
    for name in ("SpeechRequest", "AzureSpeechRequest"):
        schemas[name]["properties"]["stream_format"] = {"const": "audio"}
    for name in _TRANSCRIPTIONS:
        formats = schemas[name]["properties"]["response_format"]
        formats["enum"] = [f for f in formats["enum"] if f != "diarized_json"]
    for item in raw_schema["paths"].values():
        for operation in item.values():
            params = [p for p in operation.get("parameters", []) if p["name"] not in _TIMEOUTS]
            for param in params:
                if param["in"] == "path" and param["name"] in ("deployment_id", "model"):
                    param["schema"] = {"enum": GROUPS}
            operation["parameters"] = params


def _tool_names(body: dict[str, Any]) -> set[Any]:
    tools = body.get("tools")
    names = set()
    for tool in tools if isinstance(tools, list) else []:
        if isinstance(tool, dict):
            function = tool.get("function")
            names.add(function.get("name") if isinstance(function, dict) else tool.get("name"))
    return names


def _named_choice(body: dict[str, Any]) -> tuple[bool, Any]:
    """Whether ``tool_choice`` names one function (in any of the three dialects), and which."""
    choice = body.get("tool_choice")
    if not isinstance(choice, dict):
        return False, None
    if isinstance(choice.get("function"), dict):  # chat
        return True, choice["function"].get("name")
    if choice.get("type") in ("function", "tool"):  # Responses, Messages
        return True, choice.get("name")
    return False, None


def _positive_body(case: Any) -> dict[str, Any] | None:
    meta = case.meta
    body = case.body
    if meta is None or not meta.generation.mode.is_positive or not isinstance(body, dict):
        return None
    return body


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    body = _positive_body(case)
    if body is not None and body.get("purpose") == "batch" and "file" in body:
        body["file"] = BATCH_FILE
    return case


def _fake_refuses(case: Any) -> bool:
    body = case.body
    if not isinstance(body, dict) or not case.operation.path.endswith(_TO_THE_FAKE):
        return False
    return not all(isinstance(k, str) and k.isascii() and k.isprintable() for k in body)


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    if _fake_refuses(case):
        return False
    body = _positive_body(case)
    if body is None:
        return True
    named, name = _named_choice(body)
    return not named or not _tool_names(body) or name in _tool_names(body)
