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
]


@schemathesis.hook
def before_load_schema(context: Any, raw_schema: dict[str, Any]) -> None:
    schemas = raw_schema["components"]["schemas"]
    for name in _NAMED_IN_BODY:
        schemas[name]["properties"]["model"] = {"enum": GROUPS}
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


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    meta = case.meta
    body = case.body
    if meta is None or not meta.generation.mode.is_positive or not isinstance(body, dict):
        return True
    named, name = _named_choice(body)
    return not named or not _tool_names(body) or name in _tool_names(body)
