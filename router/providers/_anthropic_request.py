"""OpenAI chat requests as Anthropic Messages API requests (see :mod:`.anthropic`).

System and developer messages become the top-level ``system``; the rest become
alternating user/assistant turns: consecutive same-role messages are merged,
tool results become ``tool_result`` blocks leading a user turn, assistant tool
calls become ``tool_use`` blocks. ``max_tokens`` is required upstream, so it
defaults to :data:`DEFAULT_MAX_TOKENS`; ``temperature`` is clamped to 0..1.
"""

from __future__ import annotations

import re
from typing import Any

from .._errors import InvalidRequestError
from ._base import RequestContext
from ._translate import (
    content_text,
    max_tokens,
    parse_data_url,
    reject_unsupported,
    split_system,
    stop_list,
    tool_arguments,
)

DEFAULT_MAX_TOKENS = 4096

#: The forced tool that carries a ``json_object`` answer.
JSON_TOOL = "json_object"
_JSON_TOOL_DEF = {
    "name": JSON_TOOL,
    "description": "Respond with your complete answer as one JSON object.",
    "input_schema": {"type": "object"},
}
_UNSUPPORTED = frozenset(
    {"seed", "n", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias"}
)
#: Values of unsupported parameters that ask for nothing, so need not be rejected.
_NEUTRAL: tuple[tuple[str, object], ...] = (
    ("n", 1),
    ("logprobs", False),
    ("presence_penalty", 0),
    ("frequency_penalty", 0),
    ("logit_bias", {}),
)
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_BAD_ID_CHARS = re.compile(r"[^a-zA-Z0-9_-]")


def anthropic_tool_id(raw: Any) -> str:
    """Anthropic tool ids match ``^[a-zA-Z0-9_-]+$``; OpenAI's may hold any character."""
    return _BAD_ID_CHARS.sub("_", str(raw or "")) or "call"


def _text_blocks(text: str) -> list[dict[str, Any]]:
    # Anthropic rejects text blocks that are empty or whitespace only.
    return [{"type": "text", "text": text}] if text.strip() else []


def openai_image_to_anthropic(part: dict[str, Any], param: str) -> dict[str, Any]:
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise InvalidRequestError(
            f"'{param}.image_url.url': expected a string", param=f"{param}.image_url.url"
        )
    inline = parse_data_url(url, f"{param}.image_url.url")
    if inline is None:
        return {"type": "image", "source": {"type": "url", "url": url}}
    if inline.mime_type not in IMAGE_TYPES:
        raise InvalidRequestError(
            f"'{param}.image_url.url': provider 'anthropic' accepts {', '.join(sorted(IMAGE_TYPES))} images, "
            f"not {inline.mime_type}",
            param=f"{param}.image_url.url",
        )
    return {
        "type": "image",
        "source": {"type": "base64", "media_type": inline.mime_type, "data": inline.data},
    }


def openai_content_to_anthropic(content: Any, param: str) -> list[dict[str, Any]]:
    """User (or tool result) content as Anthropic blocks: text and images."""
    if content is None:
        return []
    if isinstance(content, str):
        return _text_blocks(content)
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            blocks += _text_blocks(str(part.get("text") or ""))
        elif kind == "image_url":
            blocks.append(openai_image_to_anthropic(part, f"{param}[{j}]"))
        else:
            raise InvalidRequestError(
                f"'{param}[{j}]': content parts of type {kind!r} are not supported by provider 'anthropic'",
                param=f"{param}[{j}]",
                code="unsupported_content",
            )
    return blocks


def _assistant_blocks(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    blocks = _text_blocks(content_text(message.get("content")))
    for j, call in enumerate(message.get("tool_calls") or []):
        fn = call.get("function") or {}
        param = f"{where}.tool_calls[{j}].function.arguments"
        args = tool_arguments(fn.get("arguments"), param)
        if not isinstance(args, dict):
            raise InvalidRequestError(f"'{param}': tool call arguments must be a JSON object", param=param)
        blocks.append(
            {
                "type": "tool_use",
                "id": anthropic_tool_id(call.get("id")),
                "name": fn.get("name"),
                "input": args,
            }
        )
    return blocks


def _append_turn(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        merged: list[dict[str, Any]] = turns[-1]["content"] + blocks
        # Anthropic wants a user turn's tool results ahead of any other content.
        merged.sort(key=lambda b: b["type"] != "tool_result")
        turns[-1]["content"] = merged
    else:
        turns.append({"role": role, "content": blocks})


def openai_messages_to_anthropic(messages: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """The top-level system prompt and alternating turns, starting with a user turn."""
    system, _ = split_system(messages)
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role, where = message.get("role"), f"messages[{i}]"
        if role in ("system", "developer"):
            continue
        if role == "user":
            _append_turn(
                turns, "user", openai_content_to_anthropic(message.get("content"), f"{where}.content")
            )
        elif role == "assistant":
            _append_turn(turns, "assistant", _assistant_blocks(message, where))
        elif role == "tool":
            result: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": anthropic_tool_id(message.get("tool_call_id")),
            }
            parts = openai_content_to_anthropic(message.get("content"), f"{where}.content")
            if parts:
                result["content"] = parts
            _append_turn(turns, "user", [result])
        else:
            raise InvalidRequestError(
                f"'{where}.role': provider 'anthropic' does not support the legacy {role!r} role; use tools",
                param=f"{where}.role",
            )
    if turns and turns[-1]["role"] == "assistant":
        # A final assistant turn is a prefill, which may not end in whitespace.
        last = turns[-1]["content"]
        if last[-1]["type"] == "text":
            last[-1]["text"] = last[-1]["text"].rstrip()
    if not turns or turns[0]["role"] != "user":
        # Anthropic needs a user turn first; OpenAI allows none (system only) or an assistant opener.
        turns.insert(0, {"role": "user", "content": [{"type": "text", "text": "."}]})
    return (system if system and system.strip() else None), turns


def openai_tools_to_anthropic(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for tool in tools:
        fn = tool["function"]
        schema = fn.get("parameters")
        if not isinstance(schema, dict):
            schema = {"type": "object", "properties": {}}
        elif schema.get("type") != "object":
            schema = {**schema, "type": "object"}
        spec: dict[str, Any] = {"name": fn["name"], "input_schema": schema}
        if fn.get("description"):
            spec["description"] = fn["description"]
        if fn.get("strict") is True:
            spec["strict"] = True
        out.append(spec)
    return out


def openai_tool_choice_to_anthropic(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice == "none":
        return {"type": "none"}
    if choice is None or choice == "auto":
        spec: dict[str, Any] = {"type": "auto"}
    elif choice == "required":
        spec = {"type": "any"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        spec = {"type": "tool", "name": choice["function"].get("name")}
    else:
        raise InvalidRequestError(
            "'tool_choice': provider 'anthropic' accepts auto, none, required or a function",
            param="tool_choice",
        )
    if parallel is False:
        spec["disable_parallel_tool_use"] = True
    elif choice is None:
        return None
    return spec


def _response_format(body: dict[str, Any], payload: dict[str, Any]) -> None:
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in (None, "text"):
        return
    assert isinstance(fmt, dict)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequestError(
                "'response_format.json_schema.schema': expected an object",
                param="response_format.json_schema.schema",
            )
        payload["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
        return
    if kind != "json_object":
        raise InvalidRequestError(
            f"'response_format.type': {kind!r} is not supported by provider 'anthropic'",
            param="response_format.type",
        )
    user_tools = bool(payload.get("tools"))
    payload["tools"] = [*payload.get("tools", []), _JSON_TOOL_DEF]
    choice = body.get("tool_choice")
    if not user_tools or choice == "none":
        payload["tool_choice"] = {"type": "tool", "name": JSON_TOOL, "disable_parallel_tool_use": True}
    elif choice in (None, "auto", "required"):
        payload["tool_choice"] = {**payload.get("tool_choice", {}), "type": "any"}


def openai_request_to_anthropic(body: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
    body = dict(body)
    for name, neutral in _NEUTRAL:
        if name in body and body[name] == neutral:
            del body[name]
    reject_unsupported(body, _UNSUPPORTED, ctx, "anthropic")
    system, turns = openai_messages_to_anthropic(body["messages"])
    payload: dict[str, Any] = {
        "model": ctx.upstream_model,
        "max_tokens": max_tokens(body) or DEFAULT_MAX_TOKENS,
        "messages": turns,
    }
    if system is not None:
        payload["system"] = system
    stop = stop_list(body)
    if stop:
        payload["stop_sequences"] = stop
    if body.get("temperature") is not None:
        payload["temperature"] = min(body["temperature"], 1)
    if body.get("top_p") is not None:
        payload["top_p"] = body["top_p"]
    if isinstance(body.get("user"), str) and body["user"]:
        payload["metadata"] = {"user_id": body["user"]}
    if body.get("tools"):
        payload["tools"] = openai_tools_to_anthropic(body["tools"])
        choice = openai_tool_choice_to_anthropic(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None:
            payload["tool_choice"] = choice
    _response_format(body, payload)
    if ctx.stream:
        payload["stream"] = True
    return payload
