"""The Messages API's request rules, as api.anthropic.com enforces them (for the fakes of Anthropic,
Bedrock's and Vertex AI's Claude).

:func:`validate_request` rejects what the real API rejects: a missing ``model``/``max_tokens``,
empty ``messages``, a first turn that is not ``user``, turns that do not alternate, a ``system``
role inside ``messages``, empty or whitespace-only text blocks, ``tool_result`` blocks outside user
turns or without a matching ``tool_use`` in the turn before (or after other content), ``tool_use``
blocks left unanswered, unknown block types and unknown top-level fields (so a leaked OpenAI
parameter fails); malformed ``cache_control`` (more than four breakpoints, a type other than
``ephemeral``, a ttl other than 5m/1h), ``thinking`` (a budget under 1024 or not under
``max_tokens``; ``top_k`` or a ``temperature`` other than 1 beside it), ``document`` blocks and
server tools.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

API_VERSION = "2023-06-01"
IMAGE_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
_TOOL_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
_TOP_LEVEL = {
    "model",
    "messages",
    "max_tokens",
    "system",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "stream",
    "metadata",
    "tools",
    "tool_choice",
    "output_config",
    "thinking",
    "service_tier",
}
_BLOCKS = {
    "user": {"text", "image", "document", "tool_result", "search_result"},
    "assistant": {
        "text",
        "tool_use",
        "thinking",
        "redacted_thinking",
        "server_tool_use",
        "web_search_tool_result",
    },
}
#: Server tool families (``type`` is ``{family}_{YYYYMMDD}``): the name each must have, its options.
SERVER_TOOLS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "web_search": (
        frozenset({"web_search"}),
        frozenset({"max_uses", "allowed_domains", "blocked_domains", "user_location"}),
    ),
    "web_fetch": (frozenset({"web_fetch"}), frozenset({"max_uses", "allowed_domains", "blocked_domains"})),
    "code_execution": (frozenset({"code_execution"}), frozenset()),
    "bash": (frozenset({"bash"}), frozenset()),
    "text_editor": (
        frozenset({"str_replace_editor", "str_replace_based_edit_tool"}),
        frozenset({"max_characters"}),
    ),
    "computer": (
        frozenset({"computer"}),
        frozenset({"display_width_px", "display_height_px", "display_number"}),
    ),
}
_BETA = re.compile(r"[a-z0-9.-]+(\s*,\s*[a-z0-9.-]+)*")
_COUNT_FIELDS = {
    "model",
    "messages",
    "system",
    "tools",
    "tool_choice",
    "thinking",
    "mcp_servers",
    "output_config",
}
_SERVER_TYPE = re.compile(r"^([a-z_]+)_(\d{8})$")
DOCUMENT_SOURCES = {"base64": "application/pdf", "text": "text/plain"}
MAX_CACHE_BREAKPOINTS = 4


class WireError(Exception):
    """What the real API would answer instead of a message."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.status, self.kind = message, status, kind

    def response(self) -> web.Response:
        return error_response(self.status, self.kind, self.message)


def error_body(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_fake"}


def error_response(
    status: int, kind: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(error_body(kind, message)),
        content_type="application/json",
        headers=dict(headers or {}),
    )


def validate_headers(headers: Mapping[str, str], api_key: str) -> None:
    if headers.get("x-api-key") != api_key:
        raise WireError("invalid x-api-key", 401, "authentication_error")
    if not headers.get("anthropic-version"):
        raise WireError("anthropic-version: header is required")
    if not headers.get("content-type", "").startswith("application/json"):
        raise WireError("content-type: must be application/json")
    beta = headers.get("anthropic-beta")
    if beta is not None and not _BETA.fullmatch(beta):
        raise WireError(f"anthropic-beta: Unexpected value(s) {beta!r} for the `anthropic-beta` header")


def _number(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high
    ):
        raise WireError(f"{name}: Input should be a number from {low} to {high}")


def _text(block: dict[str, Any], where: str) -> None:
    text = block.get("text")
    if not isinstance(text, str):
        raise WireError(f"{where}.text: Field required")
    if not text.strip():
        raise WireError(f"{where}.text: text content blocks must contain non-whitespace text")


def _image(block: dict[str, Any], where: str) -> None:
    source = block.get("source")
    if not isinstance(source, dict):
        raise WireError(f"{where}.source: Field required")
    if source.get("type") == "base64":
        if source.get("media_type") not in IMAGE_TYPES:
            raise WireError(f"{where}.source.media_type: Input should be one of {sorted(IMAGE_TYPES)}")
        if not isinstance(source.get("data"), str) or not source["data"]:
            raise WireError(f"{where}.source.data: Field required")
    elif source.get("type") == "url":
        if not isinstance(source.get("url"), str) or not source["url"].startswith(("http://", "https://")):
            raise WireError(f"{where}.source.url: Input should be an http(s) URL")
    else:
        raise WireError(f"{where}.source.type: Input should be 'base64', 'url' or 'file'")


def cache_control(value: Any, where: str) -> int:
    """1 if a block is a cache breakpoint, 0 if not; WireError if its cache_control is malformed."""
    if value is None:
        return 0
    if not isinstance(value, dict) or value.get("type") != "ephemeral" or set(value) - {"type", "ttl"}:
        raise WireError(f"{where}: Input should be {{'type': 'ephemeral', 'ttl'?: '5m' | '1h'}}")
    if value.get("ttl", "5m") not in ("5m", "1h"):
        raise WireError(f"{where}.ttl: Input should be '5m' or '1h'")
    return 1


def _document(block: dict[str, Any], where: str) -> None:
    source = block.get("source")
    if not isinstance(source, dict):
        raise WireError(f"{where}.source: Field required")
    kind = source.get("type")
    if kind in DOCUMENT_SOURCES:
        if source.get("media_type") != DOCUMENT_SOURCES[kind]:
            raise WireError(f"{where}.source.media_type: Input should be {DOCUMENT_SOURCES[kind]!r}")
        if not isinstance(source.get("data"), str) or not source["data"]:
            raise WireError(f"{where}.source.data: Field required")
    elif kind == "url":
        if not isinstance(source.get("url"), str) or not source["url"].startswith(("http://", "https://")):
            raise WireError(f"{where}.source.url: Input should be an http(s) URL")
    elif kind == "content":
        if not isinstance(source.get("content"), str | list):
            raise WireError(f"{where}.source.content: Input should be a string or a list of blocks")
    elif kind != "file":
        raise WireError(f"{where}.source.type: Input should be 'base64', 'text', 'content', 'url' or 'file'")
    citations = block.get("citations")
    if citations is not None and (not isinstance(citations, dict) or set(citations) - {"enabled"}):
        raise WireError(f"{where}.citations: Input should be {{'enabled': bool}}")
    for name in ("title", "context"):
        if block.get(name) is not None and not isinstance(block[name], str):
            raise WireError(f"{where}.{name}: Input should be a valid string")


def _block(block: Any, role: str, where: str, previous_tool_ids: set[str]) -> None:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise WireError(f"{where}: Input should be an object with a 'type'")
    kind = block["type"]
    if kind not in _BLOCKS[role]:
        raise WireError(f"{where}.type: {kind!r} blocks are not allowed in {role} messages")
    cache_control(block.get("cache_control"), f"{where}.cache_control")
    if kind == "document":
        _document(block, where)
    elif kind == "text":
        _text(block, where)
    elif kind == "image":
        _image(block, where)
    elif kind == "tool_use":
        if not isinstance(block.get("id"), str) or not _TOOL_ID.match(block["id"]):
            raise WireError(f"{where}.id: String should match pattern '^[a-zA-Z0-9_-]+$'")
        if not isinstance(block.get("name"), str) or not block["name"]:
            raise WireError(f"{where}.name: Field required")
        if not isinstance(block.get("input"), dict):
            raise WireError(f"{where}.input: Input should be a valid dictionary")
    elif kind == "tool_result":
        tool_id = block.get("tool_use_id")
        if tool_id not in previous_tool_ids:
            raise WireError(
                f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: {tool_id}. Each "
                "`tool_result` block must have a corresponding `tool_use` block in the previous message."
            )
        content = block.get("content")
        if isinstance(content, list):
            for k, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
                    raise WireError(f"{where}.content.{k}: tool results hold text and image blocks")
                (_text if part["type"] == "text" else _image)(part, f"{where}.content.{k}")
        elif content is not None and not isinstance(content, str):
            raise WireError(f"{where}.content: Input should be a string or a list of blocks")


def _messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise WireError("messages: Field required")
    if not messages:
        raise WireError("messages: at least one message is required")
    previous_role: str | None = None
    open_tool_ids: set[str] = set()
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            raise WireError(f"{where}: Input should be an object with only 'role' and 'content'")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise WireError(f"{where}.role: Input should be 'user' or 'assistant'")
        if i == 0 and role != "user":
            raise WireError('messages: first message must use the "user" role')
        if role == previous_role:
            raise WireError(
                f'messages: roles must alternate between "user" and "assistant", but found '
                f'multiple "{role}" roles in a row'
            )
        final_assistant = role == "assistant" and i == len(messages) - 1
        content = message.get("content")
        if isinstance(content, str):
            blocks: list[Any] = [{"type": "text", "text": content}] if content or not final_assistant else []
        elif isinstance(content, list):
            blocks = content
        else:
            raise WireError(f"{where}.content: Input should be a string or a list of blocks")
        if not blocks and not final_assistant:
            raise WireError(
                "messages: all messages must have non-empty content except for the optional "
                "final assistant message"
            )
        answered: set[str] = set()
        seen_other = False
        for j, block in enumerate(blocks):
            _block(block, role, f"{where}.content.{j}", open_tool_ids)
            if block["type"] == "tool_result":
                if seen_other:
                    raise WireError(
                        f"{where}.content.{j}: tool_result blocks must come before any other content"
                    )
                answered.add(block["tool_use_id"])
            else:
                seen_other = True
        if open_tool_ids - answered:
            raise WireError(
                f"messages.{i - 1}: `tool_use` ids were found without `tool_result` blocks immediately "
                f"after: {', '.join(sorted(open_tool_ids - answered))}. Each `tool_use` block must "
                "have a corresponding `tool_result` block in the next message."
            )
        open_tool_ids = {b["id"] for b in blocks if b["type"] == "tool_use"}
        if (
            final_assistant
            and blocks
            and blocks[-1]["type"] == "text"
            and blocks[-1]["text"] != blocks[-1]["text"].rstrip()
        ):
            raise WireError("messages: final assistant content cannot end with trailing whitespace")
        previous_role = role


def _tools(body: dict[str, Any]) -> set[str]:
    tools = body.get("tools")
    if tools is None:
        return set()
    if not isinstance(tools, list):
        raise WireError("tools: Input should be a valid list")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        if isinstance(tool, dict) and tool.get("type") not in (None, "custom"):
            names.add(_server_tool(tool, f"tools.{i}"))
            continue
        if not isinstance(tool, dict) or set(tool) - {
            "name",
            "description",
            "input_schema",
            "strict",
            "cache_control",
            "type",
        }:
            raise WireError(f"tools.{i}: Extra inputs are not permitted")
        name = tool.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise WireError(f"tools.{i}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'")
        if name in names:
            raise WireError(f"tools: Tool names must be unique: {name}")
        names.add(name)
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise WireError(f"tools.{i}.input_schema.type: Input should be 'object'")
        if "description" in tool and not isinstance(tool["description"], str):
            raise WireError(f"tools.{i}.description: Input should be a valid string")
    return names


def _server_tool(tool: dict[str, Any], where: str) -> str:
    m = _SERVER_TYPE.match(str(tool.get("type")))
    family = SERVER_TOOLS.get(m.group(1)) if m else None
    if family is None:
        raise WireError(f"{where}.type: unknown tool type {tool.get('type')!r}")
    names, options = family
    if tool.get("name") not in names:
        raise WireError(f"{where}.name: Input should be {' or '.join(sorted(names))!r}")
    extra = set(tool) - {"type", "name", "cache_control"} - options
    if extra:
        raise WireError(f"{where}.{sorted(extra)[0]}: Extra inputs are not permitted")
    cache_control(tool.get("cache_control"), f"{where}.cache_control")
    return str(tool["name"])


def _thinking(body: dict[str, Any]) -> None:
    thinking = body.get("thinking")
    if thinking is None:
        return
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "disabled":
        return
    if kind not in ("enabled", "adaptive"):
        raise WireError("thinking.type: Input should be 'enabled', 'adaptive' or 'disabled'")
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1024:
            raise WireError("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
        if budget >= body["max_tokens"]:
            raise WireError("`max_tokens` must be greater than `thinking.budget_tokens`")
    if body.get("top_k") is not None:
        raise WireError("`top_k` is not supported when thinking is enabled")
    if body.get("temperature") not in (None, 1):
        raise WireError("`temperature` may only be set to 1 when thinking is enabled")


def breakpoints(body: dict[str, Any]) -> int:
    """How many cache_control breakpoints a request holds (tools, system, messages)."""
    found = sum(cache_control(t.get("cache_control"), f"tools.{i}.cache_control")
                for i, t in enumerate(body.get("tools") or []) if isinstance(t, dict))  # fmt: skip
    system = body.get("system")
    if isinstance(system, list):
        found += sum(
            cache_control(b.get("cache_control"), f"system.{j}.cache_control") for j, b in enumerate(system)
        )
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else []:
            found += cache_control(block.get("cache_control"), "messages.content.cache_control")
    return found


def _tool_choice(body: dict[str, Any], names: set[str]) -> None:
    choice = body.get("tool_choice")
    if choice is None:
        return
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise WireError("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
    if not names:
        raise WireError("tool_choice: may only be specified while providing tools")
    allowed = {"type", "disable_parallel_tool_use"} | ({"name"} if choice["type"] == "tool" else set())
    if choice["type"] == "none":
        allowed = {"type"}
    if set(choice) - allowed:
        raise WireError("tool_choice: Extra inputs are not permitted")
    if choice["type"] == "tool" and choice.get("name") not in names:
        raise WireError(f"tool_choice.name: no tool named {choice.get('name')!r}")


def validate_request(body: Any) -> None:
    """Raise :class:`WireError` where the real Messages API would reject ``body``."""
    if not isinstance(body, dict):
        raise WireError("body: Input should be an object")
    for name in sorted(set(body) - _TOP_LEVEL):
        raise WireError(f"{name}: Extra inputs are not permitted")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise WireError("model: Field required")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise WireError("max_tokens: Field required (an integer of at least 1)")
    _messages(body.get("messages"))
    system = body.get("system")
    if isinstance(system, list):
        for j, block in enumerate(system):
            if not isinstance(block, dict) or block.get("type") != "text":
                raise WireError(f"system.{j}.type: Input should be 'text'")
            _text(block, f"system.{j}")
    elif system is not None and not isinstance(system, str):
        raise WireError("system: Input should be a string or a list of text blocks")
    _number(body, "temperature", 0, 1)
    _number(body, "top_p", 0, 1)
    top_k = body.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise WireError("top_k: Input should be an integer of at least 0")
    _thinking(body)
    count = breakpoints(body)
    if count > MAX_CACHE_BREAKPOINTS:
        raise WireError(f"A maximum of 4 blocks with cache_control may be provided. Found {count}.")
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)):
        raise WireError("stop_sequences: Input should be a list of strings")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise WireError("stream: Input should be a valid boolean")
    metadata = body.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, dict)
        or set(metadata) - {"user_id"}
        or not isinstance(metadata.get("user_id", ""), str | None)
    ):
        raise WireError("metadata: only 'user_id' (a string) is permitted")
    _tool_choice(body, _tools(body))
    config = body.get("output_config")
    if config is not None:
        fmt = config.get("format") if isinstance(config, dict) else None
        if (
            not isinstance(config, dict)
            or set(config) - {"format", "effort"}
            or (
                fmt is not None
                and (
                    not isinstance(fmt, dict)
                    or fmt.get("type") != "json_schema"
                    or not isinstance(fmt.get("schema"), dict)
                )
            )
        ):
            raise WireError("output_config.format: Input should be {'type': 'json_schema', 'schema': {...}}")


def _system(body: dict[str, Any]) -> None:
    system = body.get("system")
    if isinstance(system, list):
        for j, block in enumerate(system):
            if not isinstance(block, dict) or block.get("type") != "text":
                raise WireError(f"system.{j}.type: Input should be 'text'")
            _text(block, f"system.{j}")
    elif system is not None and not isinstance(system, str):
        raise WireError("system: Input should be a string or a list of text blocks")


def validate_count_request(body: Any) -> None:
    """Raise :class:`WireError` where ``POST /v1/messages/count_tokens`` would reject ``body``:
    the same input as a message, and nothing about the output (no ``max_tokens``)."""
    if not isinstance(body, dict):
        raise WireError("body: Input should be an object")
    for name in sorted(set(body) - _COUNT_FIELDS):
        raise WireError(f"{name}: Extra inputs are not permitted")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise WireError("model: Field required")
    _messages(body.get("messages"))
    _system(body)
    _tool_choice(body, _tools(body))
    thinking = body.get("thinking")
    if thinking is not None and (
        not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "adaptive", "disabled")
    ):
        raise WireError("thinking.type: Input should be 'enabled', 'adaptive' or 'disabled'")
    count = breakpoints(body)
    if count > MAX_CACHE_BREAKPOINTS:
        raise WireError(f"A maximum of 4 blocks with cache_control may be provided. Found {count}.")
