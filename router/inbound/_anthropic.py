"""Anthropic's Messages API (``POST /v1/messages``), served in front of any deployment.

:class:`MessagesApi` is an inbound API of the core (:meth:`Router.serve`: authentication, model
groups, retries, metering). A deployment that speaks Messages natively gets the request as the
client sent it and its answer passes through. Any other deployment gets it translated into an
OpenAI chat request, and its answer is translated back: a JSON body into an Anthropic message,
OpenAI chunks, as they arrive, into Anthropic's named SSE events. Errors take Anthropic's shape
``{"type": "error", "error": {"type", "message"}}``.

Native deployments: the anthropic provider, and Claude on Bedrock and Vertex AI
(:mod:`.providers._anthropic_native`). The client's ``anthropic-beta`` header is forwarded to them
(:attr:`MessagesApi.forward_headers`).

Not carried over by the translation: ``top_k``, ``thinking`` and other Anthropic-only options
(dropped); server tools, documents and files (400). Usage maps back as
``input_tokens = prompt_tokens - cached_tokens - cache_write_tokens``,
``cache_read_input_tokens = cached_tokens`` and
``cache_creation_input_tokens = cache_write_tokens``.

``POST /v1/messages/count_tokens`` is served by :mod:`._count_tokens`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from starlette.responses import Response, StreamingResponse

from .._errors import InvalidRequestError, KubellmError
from .._sse import frame, frame_named
from ..core._outcome import Failure, Outcome, Stream, StreamError, StreamEvent
from ..providers import Operation, Usage
from ..providers._translate import content_text
from ._base import JSON, SSE, InboundApi, Requested
from ._openai_validate import as_integer

if TYPE_CHECKING:
    from ..core._dispatch import Call

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
#: The router's own error types (OpenAI-style), for errors that arrive inside a stream.
_STREAM_ERROR_TYPES = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "not_found_error": "not_found_error",
    "rate_limit_error": "rate_limit_error",
    "service_unavailable": "overloaded_error",
    "upstream_error": "api_error",
}
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _bad(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"{param}: {message}", param=param)


def anthropic_error(status: int, message: str, request_id: str | None = None) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    doc: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    if request_id:
        doc["request_id"] = request_id
    return doc


def _image_to_openai(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif isinstance(source, dict) and source.get("type") == "url":
        url = str(source.get("url"))
    else:
        raise _bad(f"{where}.source", "only base64 and url image sources are supported")
    return {"type": "image_url", "image_url": {"url": url}}


def _user_to_openai(content: Any, where: str) -> list[dict[str, Any]]:
    """One user turn: its tool results as tool messages first, then the rest as a user message."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise _bad(f"{where}.content", "expected a string or a list of content blocks")
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text") or "")})
        elif kind == "image":
            parts.append(_image_to_openai(block, f"{where}.content.{j}"))
        elif kind == "tool_result":
            result = block.get("content")
            blocks = [{"type": "text", "text": result}] if isinstance(result, str) else result
            blocks = [] if blocks is None else blocks
            if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
                raise _bad(f"{where}.content.{j}.content", "expected a string or a list of content blocks")
            texts = [str(b.get("text") or "") for b in blocks if b.get("type") == "text"]
            # OpenAI tool messages carry text only: images of a result follow in the user message.
            parts += [_image_to_openai(b, f"{where}.content.{j}") for b in blocks if b.get("type") == "image"]
            out.append(
                {"role": "tool", "tool_call_id": str(block.get("tool_use_id")), "content": "\n".join(texts)}
            )
        else:
            raise _bad(f"{where}.content.{j}.type", f"content blocks of type {kind!r} are not supported")
    if parts:
        only_text = len(parts) == 1 and parts[0]["type"] == "text"
        out.append({"role": "user", "content": parts[0]["text"] if only_text else parts})
    return out


def _assistant_to_openai(content: Any, where: str) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise _bad(f"{where}.content", "expected a string or a list of content blocks")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text") or ""))
        elif kind == "tool_use":
            args = orjson.dumps(block.get("input") or {}).decode()
            calls.append(
                {
                    "id": str(block.get("id")),
                    "type": "function",
                    "function": {"name": str(block.get("name")), "arguments": args},
                }
            )
        elif kind not in ("thinking", "redacted_thinking"):
            raise _bad(f"{where}.content.{j}.type", f"content blocks of type {kind!r} are not supported")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _tools_to_openai(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _bad("tools", "expected a list")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
            raise _bad(f"tools.{i}", "only custom tools (name, description, input_schema) are supported")
        if not isinstance(tool.get("name"), str):
            raise _bad(f"tools.{i}.name", "Field required (a string)")
        schema = tool.get("input_schema")
        if schema is not None and not isinstance(schema, dict):
            raise _bad(f"tools.{i}.input_schema", "expected a JSON schema object")
        parameters = schema or {"type": "object", "properties": {}}
        fn: dict[str, Any] = {"name": tool["name"], "parameters": parameters}
        if tool.get("description"):
            fn["description"] = tool["description"]
        if tool.get("strict") is True:
            fn["strict"] = True
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice_to_openai(choice: Any, openai: dict[str, Any]) -> None:
    if not isinstance(choice, dict):
        raise _bad("tool_choice", "expected an object")
    kind = choice.get("type")
    mapped = {"auto": "auto", "any": "required", "none": "none"}.get(str(kind))
    if kind == "tool":
        openai["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif mapped is not None:
        openai["tool_choice"] = mapped
    else:
        raise _bad("tool_choice.type", "expected auto, any, tool or none")
    if choice.get("disable_parallel_tool_use") is True:
        openai["parallel_tool_calls"] = False


def anthropic_request_to_openai(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages request as the OpenAI chat request the router serves."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "Field required")
    limit = as_integer(body.get("max_tokens"))
    if limit is None or limit < 1:
        raise _bad("max_tokens", "Field required (an integer of at least 1)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "Field required (a non-empty list)")
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        raise _bad("system", "Input should be a string or a list of text blocks")
    if system is not None:
        out.append({"role": "system", "content": system if isinstance(system, str) else content_text(system)})
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        role = message.get("role") if isinstance(message, dict) else None
        if role == "user":
            out += _user_to_openai(message.get("content"), where)
        elif role == "assistant":
            out.append(_assistant_to_openai(message.get("content"), where))
        elif role == "system":
            text = message.get("content")
            out.append({"role": "system", "content": text if isinstance(text, str) else content_text(text)})
        else:
            raise _bad(f"{where}.role", "Input should be 'user' or 'assistant'")
    openai: dict[str, Any] = {"model": model, "messages": out, "max_tokens": limit}
    if body.get("stream"):
        openai["stream"] = True
        openai["stream_options"] = {"include_usage": True}
    stops = body.get("stop_sequences")
    if stops:
        openai["stop"] = stops
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            openai[name] = body[name]
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        openai["user"] = metadata["user_id"]
    tools = _tools_to_openai(body["tools"]) if body.get("tools") is not None else []
    if tools:
        openai["tools"] = tools
    if body.get("tool_choice") is not None and openai.get("tools"):
        _tool_choice_to_openai(body["tool_choice"], openai)
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        openai["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": fmt.get("schema"), "strict": True},
        }
    return openai


def openai_finish_reason_to_anthropic(reason: str | None) -> str:
    return _STOP_REASONS.get(reason or "stop", "end_turn")


def openai_usage_to_anthropic(usage: Usage | None) -> dict[str, int]:
    usage = usage or Usage()
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens - usage.cache_write_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
    }


def _arguments_object(raw: Any) -> dict[str, Any]:
    try:
        args = orjson.loads(raw) if isinstance(raw, str) and raw.strip() else {}
    except orjson.JSONDecodeError:
        return {}
    return args if isinstance(args, dict) else {}


def openai_response_to_anthropic(doc: dict[str, Any], message_id: str) -> dict[str, Any]:
    choices = doc.get("choices") or [{}]
    message = choices[0].get("message") or {}
    text = message.get("content")
    text = content_text(text) if isinstance(text, list) else text or message.get("refusal")
    content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": str(call.get("id")),
                "name": str(fn.get("name")),
                "input": _arguments_object(fn.get("arguments")),
            }
        )
    stop = openai_finish_reason_to_anthropic(choices[0].get("finish_reason"))
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": doc.get("model"),
        "content": content,
        "stop_reason": "tool_use" if message.get("tool_calls") else stop,
        "stop_sequence": None,
        "usage": openai_usage_to_anthropic(Usage.from_openai(doc.get("usage"))),
    }


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return frame_named(name, {"type": name, **payload})


class AnthropicEventStream:
    """OpenAI chunk payloads, as they arrive, into Anthropic stream events (framed)."""

    def __init__(self, message_id: str) -> None:
        self._id = message_id
        self._started = False
        self._done = False
        self._block: int | None = None  # the open content block
        self._text_open = False
        self._blocks = 0
        self._tools: dict[int, int] = {}  # OpenAI tool call index -> block index
        self._finish: str | None = None
        self._usage: Usage | None = None

    def event(self, data: bytes) -> list[bytes]:
        """One upstream SSE ``data`` payload."""
        if self._done or not data:
            return []
        if data == b"[DONE]":
            return self.close()
        doc = orjson.loads(data)
        if isinstance(doc.get("error"), dict) and not doc.get("choices"):
            return self.fail(doc["error"])
        return self.chunk(doc)

    def _start(self, model: Any) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        message = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": openai_usage_to_anthropic(None),
        }
        return [_event("message_start", {"message": message}), _event("ping", {})]

    def _open(self, block: dict[str, Any]) -> list[bytes]:
        out = self._close_block()
        self._block = self._blocks
        self._blocks += 1
        return [*out, _event("content_block_start", {"index": self._block, "content_block": block})]

    def _close_block(self) -> list[bytes]:
        if self._block is None:
            return []
        index, self._block, self._text_open = self._block, None, False
        return [_event("content_block_stop", {"index": index})]

    def chunk(self, doc: dict[str, Any]) -> list[bytes]:
        out = self._start(doc.get("model"))
        if doc.get("usage"):
            self._usage = Usage.from_openai(doc["usage"])
        for choice in doc.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content") or delta.get("refusal")
            if text:
                if not self._text_open:
                    out += self._open({"type": "text", "text": ""})
                    self._text_open = True
                out.append(
                    _event(
                        "content_block_delta",
                        {"index": self._block, "delta": {"type": "text_delta", "text": text}},
                    )
                )
            for call in delta.get("tool_calls") or []:
                position, fn = call.get("index", 0), call.get("function") or {}
                if position not in self._tools:
                    out += self._open(
                        {
                            "type": "tool_use",
                            "id": str(call.get("id") or f"toolu_{position}"),
                            "name": str(fn.get("name") or ""),
                            "input": {},
                        }
                    )
                    self._tools[position] = self._blocks - 1
                if fn.get("arguments"):
                    out.append(
                        _event(
                            "content_block_delta",
                            {
                                "index": self._tools[position],
                                "delta": {"type": "input_json_delta", "partial_json": fn["arguments"]},
                            },
                        )
                    )
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return out

    def close(self) -> list[bytes]:
        """The OpenAI stream ended: close the message."""
        if self._done:
            return []
        self._done = True
        out = [*self._start(None), *self._close_block()]
        stop = "tool_use" if self._tools else openai_finish_reason_to_anthropic(self._finish)
        delta = {"stop_reason": stop, "stop_sequence": None}
        out.append(_event("message_delta", {"delta": delta, "usage": openai_usage_to_anthropic(self._usage)}))
        out.append(_event("message_stop", {}))
        return out

    def cut_short(self) -> list[bytes]:
        """The OpenAI stream ended: an error event unless it ended with ``[DONE]`` or an error.

        The router's own streams always do; this keeps a message_stop from ever being made up.
        """
        if self._done:
            return []
        return self.fail({"type": "upstream_error", "message": "the stream ended before it was complete"})

    def fail(self, error: dict[str, Any]) -> list[bytes]:
        self._done = True
        kind = _STREAM_ERROR_TYPES.get(str(error.get("type")), "api_error")
        if error.get("code") == "overloaded":
            kind = "overloaded_error"
        return [_event("error", {"error": {"type": kind, "message": str(error.get("message"))}})]


async def _translated(events: AsyncIterator[StreamEvent], out: AnthropicEventStream) -> AsyncIterator[bytes]:
    """A chat stream (the core's OpenAI chunk payloads) as Anthropic events."""
    async for batch in events:
        if isinstance(batch, StreamError):
            yield b"".join(out.fail(batch.error.to_dict()["error"]))
            return
        framed = [f for p in batch if isinstance(p, bytes) for f in out.chunk(orjson.loads(p))]
        if framed:
            yield b"".join(framed)
    yield b"".join(out.close())


async def _native(events: AsyncIterator[StreamEvent], out: AnthropicEventStream) -> AsyncIterator[bytes]:
    """A native Messages stream: the upstream's events as they are."""
    async for batch in events:
        if isinstance(batch, StreamError):
            yield b"".join(out.fail(batch.error.to_dict()["error"]))
            return
        yield b"".join([frame(p) for p in batch])


class MessagesApi(InboundApi):
    """``POST /v1/messages``."""

    operation = Operation.MESSAGES
    forward_headers = frozenset({"anthropic-beta"})

    def validate(self, body: dict[str, Any]) -> Requested:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _bad("model", "required, a non-empty string")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad("stream", "expected a boolean")
        return Requested(model=model, stream=stream, include_usage=stream)

    def to_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        return anthropic_request_to_openai(body)

    def render(self, outcome: Outcome, call: Call) -> Response:
        if isinstance(outcome, Failure):
            return self.render_error(outcome.error, outcome.headers)
        headers = {k: v for k, v in outcome.headers.items() if k.startswith("x-") or k == "cache-control"}
        message_id = f"msg_{call.request_id}"
        if isinstance(outcome, Stream):
            stream = AnthropicEventStream(message_id)
            relay = _native if outcome.wire is Operation.MESSAGES else _translated
            return StreamingResponse(relay(outcome.events, stream), media_type=SSE, headers=headers)
        if outcome.wire is Operation.MESSAGES:
            return Response(outcome.body, media_type=JSON, headers=headers)
        doc = openai_response_to_anthropic(outcome.doc(), message_id)
        return Response(orjson.dumps(doc), media_type=JSON, headers=headers)

    def render_error(self, err: KubellmError, headers: dict[str, str]) -> Response:
        message = err.message
        if err.code == "context_length_exceeded" and "prompt is too long" not in message:
            message = f"prompt is too long: {message}"  # what Anthropic clients look for
        headers = {**headers, **err.headers}
        doc = anthropic_error(err.status, message, headers.get("x-request-id"))
        return Response(orjson.dumps(doc), status_code=err.status, media_type=JSON, headers=headers)
