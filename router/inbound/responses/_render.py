"""Response objects: the skeleton echoing the request, and a chat.completion rendered as one.

A Response echoes the request's settings (``instructions``, ``tools``, ``tool_choice``,
``text``...) with OpenAI's defaults where the client left them out, so that clients reading
them back (the SDKs' typed models, agents resuming a turn) see what they would from OpenAI.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from ...providers import Usage


def new_id(prefix: str) -> str:
    """An id in OpenAI's style (``resp_…``, ``msg_…``, ``fc_…``), unguessable: ids are capabilities
    only together with the API key that stored them, but need not help an attacker either."""
    return f"{prefix}_{secrets.token_hex(24)}"


def as_dict(value: Any) -> dict[str, Any]:
    """``value`` if it is an object, else an empty one (for fields a peer may send as anything)."""
    return value if isinstance(value, dict) else {}


def _echo_tool(tool: Any) -> Any:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        return tool
    echoed = {
        "type": "function",
        "name": tool.get("name"),
        "description": tool.get("description"),
        "parameters": tool.get("parameters"),
        "strict": tool.get("strict"),
    }
    return {**tool, **echoed}


def _echo_text(text: Any) -> dict[str, Any]:
    if not isinstance(text, dict):
        return {"format": {"type": "text"}}
    fmt = text.get("format")
    return {**text, "format": fmt if isinstance(fmt, dict) else {"type": "text"}}


def response_skeleton(
    body: dict[str, Any], response_id: str, created_at: int, *, model: str | None = None
) -> dict[str, Any]:
    """An in-progress Response for ``body``, with no output yet."""
    tools = body["tools"] if isinstance(body.get("tools"), list) else []
    metadata = body.get("metadata")
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": False,
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model or body.get("model"),
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": body.get("reasoning") if isinstance(body.get("reasoning"), dict) else None,
        "store": body.get("store") is not False,
        "temperature": body.get("temperature", 1.0),
        "text": _echo_text(body.get("text")),
        "tool_choice": body.get("tool_choice") if body.get("tool_choice") is not None else "auto",
        "tools": [_echo_tool(tool) for tool in tools],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "metadata": metadata if isinstance(metadata, dict) else {},
    } | {name: body[name] for name in ("user", "safety_identifier") if isinstance(body.get(name), str)}


def usage_to_responses(usage: Usage | None) -> dict[str, Any]:
    usage = usage or Usage()
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, parts: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": parts}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "reasoning",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": "completed",
    }


#: Chat finish reasons that leave a Response incomplete, and why.
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def finish(response: dict[str, Any], finish_reason: str | None, usage: Usage | None) -> dict[str, Any]:
    """Mark ``response`` finished (completed, or incomplete for a cut-off answer), with its usage."""
    reason = INCOMPLETE.get(finish_reason or "")
    response["status"] = "incomplete" if reason else "completed"
    response["incomplete_details"] = {"reason": reason} if reason else None
    response["completed_at"] = int(time.time()) if not reason else None
    response["usage"] = usage_to_responses(usage)
    return response


def _message_text(message: dict[str, Any]) -> tuple[str | None, str | None]:
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
    refusal = message.get("refusal")
    return (content or None, refusal if isinstance(refusal, str) and refusal else None)


def chat_completion_to_response(
    doc: dict[str, Any], body: dict[str, Any], response_id: str, created_at: int, usage: Usage | None
) -> dict[str, Any]:
    """A chat.completion as the Response to the Responses request ``body``."""
    response = response_skeleton(body, response_id, created_at, model=doc.get("model"))
    choices = doc.get("choices") or [{}]
    choice = as_dict(choices[0])
    message = as_dict(choice.get("message"))
    finish_reason = choice.get("finish_reason")
    status = "incomplete" if finish_reason in INCOMPLETE else "completed"
    output: list[dict[str, Any]] = []
    thinking = message.get("reasoning_content")
    if isinstance(thinking, str) and thinking:
        output.append(reasoning_item(new_id("rs"), thinking))
    text, refusal = _message_text(message)
    if text is not None or refusal is not None:
        parts = [text_part(text)] if text is not None else []
        parts += [{"type": "refusal", "refusal": refusal}] if refusal is not None else []
        output.append(message_item(new_id("msg"), parts, status))
    for call in message.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            continue
        arguments = fn.get("arguments")
        output.append(
            function_call_item(
                new_id("fc"),
                str(call.get("id") or new_id("call")),
                str(fn.get("name") or ""),
                arguments if isinstance(arguments, str) else "{}",
                "completed",
            )
        )
    response["output"] = output
    return finish(response, finish_reason, usage or Usage.from_openai(doc.get("usage")))


def failed(response: dict[str, Any], code: str, message: str) -> dict[str, Any]:
    """Mark ``response`` failed; ``code`` is one of the Responses error codes."""
    response["status"] = "failed"
    response["error"] = {"code": code, "message": message}
    return response


def output_text(response: dict[str, Any]) -> str:
    """The text of a Response's messages, joined (the SDKs' ``output_text``)."""
    return "".join(
        str(part.get("text") or "")
        for item in response.get("output") or []
        if isinstance(item, dict) and item.get("type") == "message"
        for part in item.get("content") or []
        if isinstance(part, dict) and part.get("type") == "output_text"
    )
