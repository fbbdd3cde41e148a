"""The text of prompts and answers in every dialect the router speaks, read and rewritten in one walk.

A guardrail sees a request as a list of text slots, each ``(role, text)``, in a fixed order: the
system prompt (Anthropic ``system``, Responses ``instructions``), then every message's text
parts (OpenAI and Anthropic ``messages``, Responses ``input``, tool results included), then a
completion's ``prompt`` or an embedding's ``input``. :func:`map_request` visits the same slots in
the same order and rebuilds the body around the texts the visitor returns, so a redaction (or a
webhook's rewritten ``messages``) lands where the text came from. Non-text parts (images, tool
calls, token arrays) are kept as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..providers import Operation

#: ``visit(role, text) -> text``: sees one text slot, returns what it becomes.
Visit = Callable[[str, str], str]

_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})


def _content(content: Any, role: str, visit: Visit) -> Any:
    """A message's content: a string, or a list of parts (text parts and tool results carry text)."""
    if isinstance(content, str):
        return visit(role, content)
    if not isinstance(content, list):
        return content
    out: list[Any] = []
    for part in content:
        if isinstance(part, str):
            out.append(visit(role, part))
        elif isinstance(part, dict) and part.get("type") in _TEXT_PARTS and isinstance(part.get("text"), str):
            out.append({**part, "text": visit(role, part["text"])})
        elif isinstance(part, dict) and part.get("type") == "tool_result" and "content" in part:
            out.append({**part, "content": _content(part["content"], "tool", visit)})
        else:
            out.append(part)
    return out


def _messages(messages: Any, visit: Visit) -> Any:
    if not isinstance(messages, list):
        return messages
    out: list[Any] = []
    for message in messages:
        if isinstance(message, str):  # a Responses input item may be a bare string
            out.append(visit("user", message))
        elif isinstance(message, dict) and "content" in message:
            role = str(message.get("role") or "user")
            out.append({**message, "content": _content(message["content"], role, visit)})
        elif isinstance(message, dict) and isinstance(message.get("output"), str):
            out.append({**message, "output": visit("tool", message["output"])})  # function_call_output
        else:
            out.append(message)
    return out


def _prompt(value: Any, visit: Visit) -> Any:
    """A completion's ``prompt`` or an embedding's ``input``: a string or a list of strings."""
    if isinstance(value, str):
        return visit("user", value)
    if isinstance(value, list):
        return [visit("user", v) if isinstance(v, str) else v for v in value]
    return value


def map_request(body: dict[str, Any], operation: Operation, visit: Visit) -> dict[str, Any]:
    """``body`` with every prompt text replaced by ``visit(role, text)``; ``body`` is not changed."""
    out = dict(body)
    if "system" in body:
        out["system"] = _content(body["system"], "system", visit)
    if isinstance(body.get("instructions"), str):
        out["instructions"] = visit("system", body["instructions"])
    if "messages" in body:
        out["messages"] = _messages(body["messages"], visit)
    if "prompt" in body:
        out["prompt"] = _prompt(body["prompt"], visit)
    if "input" in body:
        value = body["input"]
        if operation is Operation.RESPONSES and isinstance(value, list):
            out["input"] = _messages(value, visit)
        else:
            out["input"] = _prompt(value, visit)
    return out


def request_texts(body: dict[str, Any], operation: Operation) -> list[tuple[str, str]]:
    """Every prompt text slot as ``(role, text)``, in :func:`map_request`'s order."""
    found: list[tuple[str, str]] = []

    def collect(role: str, text: str) -> str:
        found.append((role, text))
        return text

    map_request(body, operation, collect)
    return found


def map_answer(doc: Any, wire: Operation, visit: Visit) -> Any:
    """A whole answer (in ``wire``'s dialect) with every answer text replaced by ``visit``."""
    if not isinstance(doc, dict):
        return doc
    if wire is Operation.MESSAGES:
        return (
            {**doc, "content": _content(doc.get("content"), "assistant", visit)} if "content" in doc else doc
        )
    if wire is Operation.RESPONSES:
        return {**doc, "output": _messages(doc.get("output"), visit)} if "output" in doc else doc
    choices = doc.get("choices")
    if not isinstance(choices, list):
        return doc
    out: list[Any] = []
    for choice in choices:
        if not isinstance(choice, dict):
            out.append(choice)
        elif isinstance(choice.get("message"), dict):
            message = choice["message"]
            if "content" in message:
                message = {**message, "content": _content(message["content"], "assistant", visit)}
            out.append({**choice, "message": message})
        elif isinstance(choice.get("text"), str):  # a legacy completion
            out.append({**choice, "text": visit("assistant", choice["text"])})
        else:
            out.append(choice)
    return {**doc, "choices": out}


def answer_texts(doc: Any, wire: Operation) -> list[str]:
    found: list[str] = []

    def collect(role: str, text: str) -> str:
        found.append(text)
        return text

    map_answer(doc, wire, collect)
    return found
