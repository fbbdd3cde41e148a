"""Shared pieces for providers whose wire format is not OpenAI's.

:class:`ChunkBuilder` makes OpenAI ``chat.completion.chunk`` payloads (never SSE
text), :func:`chat_completion` makes a whole response, and the small helpers
split out the parts of an OpenAI request that most providers handle alike.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

import orjson

from .._errors import InvalidRequestError
from ._base import RequestContext, Usage

_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]+);base64,(?P<data>.*)$", re.DOTALL)


def reject_unsupported(
    body: dict[str, Any], unsupported: frozenset[str], ctx: RequestContext, provider: str
) -> None:
    """Drop parameters the provider cannot honour if the deployment allows it; otherwise answer 400."""
    present = [p for p in unsupported if body.get(p) is not None]
    if not present:
        return
    if ctx.deployment.drop_unsupported_params:
        for param in present:
            body.pop(param, None)
        return
    param = sorted(present)[0]
    raise InvalidRequestError(
        f"provider {provider!r} does not support the parameter {param!r} "
        f"(set dropUnsupportedParams on deployment {ctx.deployment.name!r} to drop it)",
        param=param,
        code="unsupported_parameter",
    )


def content_text(content: Any) -> str:
    """The text of a message's content, whether a string or a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = (p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "".join(t for t in texts if isinstance(t, str))


def split_system(messages: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """System and developer messages joined into one instruction, and the rest in order."""
    system = [content_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer")]
    rest = [m for m in messages if m.get("role") not in ("system", "developer")]
    return ("\n\n".join(system) if system else None), rest


@dataclass(slots=True)
class InlineImage:
    mime_type: str
    data: str  # base64


def parse_data_url(url: str, param: str) -> InlineImage | None:
    """An inline ``data:`` image, or None for an ``http(s)`` URL."""
    match = _DATA_URL.match(url)
    if match is None:
        if url.startswith(("http://", "https://")):
            return None
        raise InvalidRequestError(f"'{param}': expected an http(s) or base64 data URL", param=param)
    try:
        base64.b64decode(match["data"][:64] + "=" * (-len(match["data"][:64]) % 4), validate=True)
    except binascii.Error:
        raise InvalidRequestError(f"'{param}': the data URL is not valid base64", param=param) from None
    return InlineImage(match["mime"], match["data"])


def tool_arguments(raw: Any, param: str) -> Any:
    """OpenAI carries tool-call arguments as a JSON string; most providers want the object."""
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str) or not raw.strip():
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequestError(f"'{param}': tool call arguments are not valid JSON", param=param) from None


def arguments_json(args: Any) -> str:
    return orjson.dumps(args if args is not None else {}).decode()


def max_tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if isinstance(value, int) else None


def stop_list(body: dict[str, Any]) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    return [stop] if isinstance(stop, str) else list(stop)


def chat_completion(
    ctx: RequestContext,
    *,
    content: str | None,
    finish_reason: str | None,
    usage: Usage | None,
    tool_calls: list[dict[str, Any]] | None = None,
    response_id: str | None = None,
) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    doc: dict[str, Any] = {
        "id": response_id or f"chatcmpl-{ctx.request_id}",
        "object": "chat.completion",
        "created": ctx.created,
        "model": ctx.upstream_model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        doc["usage"] = usage.to_openai()
    return orjson.dumps(doc)


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


class ChunkBuilder:
    """Makes the OpenAI chunk payloads of one streamed response."""

    __slots__ = ("_base", "_ctx", "_role_sent")

    def __init__(self, ctx: RequestContext, response_id: str | None = None) -> None:
        self._ctx = ctx
        self._role_sent = False
        self._base = {
            "id": response_id or f"chatcmpl-{ctx.request_id}",
            "object": "chat.completion.chunk",
            "created": ctx.created,
            "model": ctx.upstream_model,
        }

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        if not self._role_sent:
            delta = {"role": "assistant", **delta}
            self._role_sent = True
        return {
            **self._base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }

    def role(self) -> dict[str, Any]:
        return self._chunk({"content": ""})

    def text(self, delta: str) -> dict[str, Any]:
        return self._chunk({"content": delta})

    def tool_call_start(self, index: int, call_id: str, name: str, arguments: str = "") -> dict[str, Any]:
        call = {
            "index": index,
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        return self._chunk({"tool_calls": [call]})

    def tool_call_arguments(self, index: int, delta: str) -> dict[str, Any]:
        return self._chunk({"tool_calls": [{"index": index, "function": {"arguments": delta}}]})

    def finish(self, reason: str) -> dict[str, Any]:
        return self._chunk({}, reason)

    def usage(self, usage: Usage) -> dict[str, Any] | None:
        """The final usage chunk, if the client asked for one."""
        if not self._ctx.include_usage:
            return None
        return {**self._base, "choices": [], "usage": usage.to_openai()}
