"""Cohere: the v2 Chat API (``POST /v2/chat``) and v2 Embed API (``POST /v2/embed``).

Chat requests are rewritten into Cohere's shape: system/developer messages become one leading
``system`` message, assistant tool calls keep their JSON-string arguments (any assistant text
beside them travels as ``tool_plan``), tool results keep their ``tool_call_id``, ``top_p`` is
``p`` (Cohere accepts 0.01 to 0.99) and ``stop`` is ``stop_sequences``. Cohere rejects unknown
fields, so nothing else passes through.

Streams arrive as SSE events named after their ``type`` (``message-start``, ``content-delta``,
``tool-plan-delta``, ``tool-call-start``/``-delta``/``-end``, ``message-end`` carrying
``finish_reason`` and usage), then ``data: [DONE]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from .._errors import (
    ContentFilterError,
    InvalidRequestError,
    KubellmError,
    UpstreamError,
    UpstreamProtocolError,
)
from .._sse import SSEDecoder
from ._base import (
    Operation,
    Payload,
    Provider,
    ProviderResponse,
    RequestContext,
    StreamTranslator,
    UpstreamClient,
    UpstreamRequest,
    UpstreamResponse,
    Usage,
    extract_error_message,
    map_status_error,
)
from ._embeddings import LocalResponse, embedding_inputs, openai_embedding_response, pack
from ._surface import cohere_rerank_body, finish_rerank, parse_surface, read_cohere
from ._translate import (
    ChunkBuilder,
    chat_completion,
    content_text,
    max_tokens,
    parse_data_url,
    reject_unsupported,
    split_system,
    stop_list,
    tool_call,
)

_UNSUPPORTED = frozenset(
    {"logprobs", "top_logprobs", "logit_bias", "user", "audio", "modalities", "prediction", "functions"}
)
_FINISH = {
    "COMPLETE": "stop",
    "STOP_SEQUENCE": "stop",
    "MAX_TOKENS": "length",
    "TOOL_CALL": "tool_calls",
    "ERROR_TOXIC": "content_filter",
}
#: Cohere's ``p`` must lie within these bounds; OpenAI allows 0 to 1.
P_MIN, P_MAX = 0.01, 0.99
DEFAULT_INPUT_TYPE = "search_document"
_BLOCKED = ("blocked output", "blocked input", "potential violation of our usage policy")


def cohere_finish_reason_to_openai(reason: Any) -> str | None:
    """COMPLETE/STOP_SEQUENCE -> stop, MAX_TOKENS -> length, TOOL_CALL -> tool_calls; ERROR -> None."""
    return _FINISH.get(reason) if isinstance(reason, str) else None


def cohere_usage_to_usage(usage: Any) -> Usage | None:
    """Cohere's ``tokens`` (what the model saw), else ``billed_units``; plus ``cached_tokens``."""
    if not isinstance(usage, dict):
        return None
    counts = usage.get("tokens") if isinstance(usage.get("tokens"), dict) else usage.get("billed_units")
    if not isinstance(counts, dict):
        return None
    cached = usage.get("cached_tokens")
    return Usage(
        prompt_tokens=int(counts.get("input_tokens") or 0),
        completion_tokens=int(counts.get("output_tokens") or 0),
        cached_tokens=int(cached) if isinstance(cached, int | float) else 0,
    )


def _user_content(content: Any, where: str) -> str | list[dict[str, Any]]:
    if not isinstance(content, list):
        return content_text(content)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise InvalidRequestError(f"'{where}.content[{j}].image_url.url' is required", param=where)
            parse_data_url(url, f"{where}.content[{j}].image_url.url")
            detail = image.get("detail") if isinstance(image, dict) else None
            parts.append(
                {"type": "image_url", "image_url": {"url": url, **({"detail": detail} if detail else {})}}
            )
        else:
            raise InvalidRequestError(
                f"provider 'cohere' does not support content parts of type {kind!r}",
                param=f"{where}.content[{j}].type",
                code="unsupported_parameter",
            )
    return parts


def _assistant_message(message: dict[str, Any]) -> dict[str, Any] | None:
    text = content_text(message.get("content"))
    calls = message.get("tool_calls")
    if not calls:
        return {"role": "assistant", "content": text} if text else None
    out: dict[str, Any] = {"role": "assistant", "tool_calls": []}
    for call in calls:
        fn = call.get("function") or {}
        args = fn.get("arguments")
        out["tool_calls"].append(
            tool_call(
                str(call.get("id")),
                str(fn.get("name")),
                args if isinstance(args, str) else orjson.dumps(args or {}).decode(),
            )
        )
    if text:
        out["tool_plan"] = text
    return out


def openai_messages_to_cohere(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    system, _ = split_system(messages)
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "user":
            out.append({"role": "user", "content": _user_content(message.get("content"), f"messages[{i}]")})
        elif role == "assistant":
            converted = _assistant_message(message)
            if converted is not None:
                out.append(converted)
        elif role == "tool":
            text = content_text(message.get("content"))
            out.append({"role": "tool", "tool_call_id": message.get("tool_call_id"), "content": text})
        elif role not in ("system", "developer"):
            raise InvalidRequestError(
                f"provider 'cohere' does not support messages with role {role!r}", param=f"messages[{i}].role"
            )
    return out


def openai_tools_to_cohere(body: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None, bool]:
    """(tools, tool_choice, strict_tools) in Cohere's shape."""
    tools = [
        t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type", "function") == "function"
    ]
    choice = body.get("tool_choice")
    cohere_choice: str | None = None
    if choice == "none":
        cohere_choice = "NONE"
    elif choice == "required":
        cohere_choice = "REQUIRED"
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        tools = [t for t in tools if t["function"].get("name") == name]
        if not tools:
            raise InvalidRequestError(
                f"tool_choice names {name!r}, which is not in 'tools'", param="tool_choice"
            )
        cohere_choice = "REQUIRED"
    converted = []
    for tool in tools:
        fn = tool["function"]
        spec: dict[str, Any] = {
            "name": fn["name"],
            "parameters": fn.get("parameters") or {"type": "object", "properties": {}},
        }
        if fn.get("description"):
            spec["description"] = fn["description"]
        converted.append({"type": "function", "function": spec})
    strict = any(t["function"].get("strict") for t in tools)
    return converted, cohere_choice, strict


def openai_chat_to_cohere(body: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
    body = dict(body)
    reject_unsupported(body, _UNSUPPORTED, ctx, "cohere")
    if body.get("n") not in (None, 1):
        reject_unsupported(body, frozenset({"n"}), ctx, "cohere")
    if body.get("parallel_tool_calls") is False:
        reject_unsupported(body, frozenset({"parallel_tool_calls"}), ctx, "cohere")
    out: dict[str, Any] = {
        "model": ctx.upstream_model,
        "messages": openai_messages_to_cohere(body["messages"]),
    }
    tools, choice, strict = openai_tools_to_cohere(body)
    if tools:
        out["tools"] = tools
        if strict:
            out["strict_tools"] = True
    if choice is not None and (tools or choice == "NONE"):
        out["tool_choice"] = choice
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        out["response_format"] = {"type": "json_object", **({"json_schema": schema} if schema else {})}
    if (stops := stop_list(body)) is not None:
        out["stop_sequences"] = stops
    if (limit := max_tokens(body)) is not None:
        out["max_tokens"] = limit
    if body.get("top_p") is not None:
        out["p"] = min(P_MAX, max(P_MIN, float(body["top_p"])))
    for name in ("temperature", "seed", "frequency_penalty", "presence_penalty"):
        if body.get(name) is not None:
            out[name] = body[name]
    if ctx.stream:
        out["stream"] = True
    return out


def cohere_response_to_openai(doc: dict[str, Any], ctx: RequestContext) -> tuple[bytes, Usage | None]:
    message = _obj(doc.get("message"))
    text = "".join(
        p.get("text", "")
        for p in message.get("content") or []
        if isinstance(p, dict) and p.get("type") == "text"
    )
    calls = [
        tool_call(
            str(c.get("id")),
            str((c.get("function") or {}).get("name")),
            (c.get("function") or {}).get("arguments") or "{}",
        )
        for c in message.get("tool_calls") or []
        if isinstance(c, dict)
    ]
    if calls and not text:
        text = message.get("tool_plan") or ""
    reason = doc.get("finish_reason")
    finish = cohere_finish_reason_to_openai(reason)
    if finish is None:
        raise UpstreamError(
            f"cohere: generation ended with finish_reason {reason!r}", code="upstream_generation_error"
        )
    if finish == "content_filter":
        raise ContentFilterError("cohere: the completion was blocked by Cohere's safety filter")
    usage = cohere_usage_to_usage(doc.get("usage"))
    body = chat_completion(
        ctx,
        content=text or None,
        finish_reason=finish,
        usage=usage,
        tool_calls=calls or None,
        response_id=doc.get("id") if isinstance(doc.get("id"), str) else None,
    )
    return body, usage


class CohereStreamTranslator(StreamTranslator):
    """Cohere v2 chat stream events to OpenAI chunks, as they arrive."""

    terminator = "message-end"

    def __init__(self, ctx: RequestContext) -> None:
        self._ctx = ctx
        self._decoder = SSEDecoder()
        self._chunks = ChunkBuilder(ctx)
        self._tool_index: dict[int, int] = {}
        self._current_tool = -1
        self._ended = False

    def feed(self, data: bytes) -> list[Payload]:
        out: list[Payload] = []
        for event in self._decoder.feed(data):
            self._event(event.data, out)
        return out

    def flush(self) -> list[Payload]:
        out: list[Payload] = []
        for event in self._decoder.close():
            self._event(event.data, out)
        return out

    def _event(self, data: bytes, out: list[Payload]) -> None:
        if not data or data == b"[DONE]" or self._ended:
            return
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamProtocolError("cohere: stream event data is not JSON") from None
        event = _obj(event)
        kind = event.get("type")
        delta = _obj(event.get("delta"))
        message = _obj(delta.get("message"))
        if kind == "message-start":
            if isinstance(event.get("id"), str):
                self._chunks = ChunkBuilder(self._ctx, event["id"])
            out.append(self._chunks.role())
        elif kind == "content-delta":
            content = message.get("content")
            text = content.get("text") if isinstance(content, dict) else None
            if text:
                out.append(self._chunks.text(text))
        elif kind == "tool-plan-delta":
            if message.get("tool_plan"):
                out.append(self._chunks.text(message["tool_plan"]))
        elif kind == "tool-call-start":
            call = _obj(message.get("tool_calls"))
            fn = _obj(call.get("function"))
            self._current_tool = len(self._tool_index)
            self._tool_index[event.get("index", self._current_tool)] = self._current_tool
            out.append(
                self._chunks.tool_call_start(
                    self._current_tool, str(call.get("id")), str(fn.get("name")), fn.get("arguments") or ""
                )
            )
        elif kind == "tool-call-delta":
            call = _obj(message.get("tool_calls"))
            fn = _obj(call.get("function"))
            index = self._tool_index.get(event.get("index", -1), self._current_tool)
            if fn.get("arguments") and index >= 0:
                out.append(self._chunks.tool_call_arguments(index, fn["arguments"]))
        elif kind == "message-end":
            self._end(delta, out)

    def _end(self, delta: dict[str, Any], out: list[Payload]) -> None:
        self._ended = self.complete = True
        self.usage = cohere_usage_to_usage(delta.get("usage"))
        reason = delta.get("finish_reason")
        finish = cohere_finish_reason_to_openai(reason)
        if finish is None:
            detail = (
                delta.get("error") if isinstance(delta.get("error"), str) else f"finish_reason {reason!r}"
            )
            self.error = UpstreamError(
                f"cohere: generation failed: {detail}", code="upstream_generation_error"
            )
            return
        if finish == "content_filter":
            self.error = ContentFilterError("cohere: the completion was blocked by Cohere's safety filter")
            return
        out.append(self._chunks.finish(finish))
        if self.usage is not None and (chunk := self._chunks.usage(self.usage)) is not None:
            out.append(chunk)


def openai_embeddings_to_cohere(body: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": ctx.upstream_model,
        "texts": embedding_inputs(body, "cohere"),
        # Cohere-specific and optional here: a client may send it as an extra body field.
        "input_type": body.get("input_type") or DEFAULT_INPUT_TYPE,
        "embedding_types": ["float"],
    }
    if body.get("dimensions") is not None:
        out["output_dimension"] = body["dimensions"]
    return out


def cohere_embeddings_to_vectors(doc: dict[str, Any], count: int) -> tuple[list[list[float]], int]:
    """(vectors, billed input tokens) from a v2 embed answer."""
    vectors = _obj(doc.get("embeddings")).get("float")
    if not isinstance(vectors, list) or len(vectors) != count:
        raise UpstreamProtocolError("cohere: embed did not answer one embeddings.float vector per text")
    tokens = _obj(_obj(doc.get("meta")).get("billed_units")).get("input_tokens")
    return vectors, int(tokens) if isinstance(tokens, int | float) else 0


class CohereProvider(Provider):
    name = "cohere"
    operations = frozenset({Operation.CHAT, Operation.EMBEDDING, Operation.RERANK})
    default_api_key_env = "CO_API_KEY"
    default_base_url = "https://api.cohere.com"

    def _url(self, ctx: RequestContext, path: str) -> str:
        return self.base_url(ctx).removesuffix("/v2").removesuffix("/v1") + path

    def build_request(self, body: dict[str, Any], ctx: RequestContext) -> UpstreamRequest:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if ctx.api_key:
            headers["Authorization"] = f"Bearer {ctx.api_key}"
        if ctx.operation is Operation.EMBEDDING:
            payload, path = openai_embeddings_to_cohere(body, ctx), "/v2/embed"
        elif ctx.operation is Operation.RERANK:
            payload, path = cohere_rerank_body(body, ctx.upstream_model), "/v2/rerank"
        else:
            payload, path = openai_chat_to_cohere(body, ctx), "/v2/chat"
            if ctx.stream:
                headers["Accept"] = "text/event-stream"
        return UpstreamRequest(
            "POST", self._url(ctx, path), {**headers, **ctx.deployment.headers}, orjson.dumps(payload)
        )

    async def send(
        self, client: UpstreamClient, body: dict[str, Any], ctx: RequestContext
    ) -> UpstreamResponse:
        if ctx.operation is Operation.RERANK:
            request = self.build_request(body, ctx)
            return await finish_rerank(client, request, body, ctx, self.name, read_cohere)
        if ctx.operation is not Operation.EMBEDDING:
            return await client.send(self.build_request(body, ctx), ctx)
        # OpenAI's embedding answer depends on the request's encoding_format, which
        # parse_response cannot see: read the answer here and hand over a neutral document.
        request = self.build_request(body, ctx)
        resp = await client.send(request, ctx)
        raw = await resp.read()
        if resp.status >= 400:
            return LocalResponse(resp.status, dict(resp.headers), raw)
        vectors, tokens = cohere_embeddings_to_vectors(_json(raw), len(embedding_inputs(body, self.name)))
        return pack(vectors, tokens, estimated=False, body=body)

    def parse_response(self, raw: bytes, ctx: RequestContext) -> ProviderResponse:
        if ctx.operation is Operation.EMBEDDING:
            return openai_embedding_response(raw, ctx)
        if ctx.operation is Operation.RERANK:
            return parse_surface(raw, ctx, self.name)
        body, usage = cohere_response_to_openai(_json(raw), ctx)
        return ProviderResponse(body, usage)

    def stream_translator(self, ctx: RequestContext) -> StreamTranslator:
        return CohereStreamTranslator(ctx)

    def map_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> KubellmError:
        message, code = extract_error_message(raw)
        if status == 498:  # Cohere's "invalid token"
            status = 401
        if status == 400 and any(marker in message.lower() for marker in _BLOCKED):
            return ContentFilterError(f"cohere: {message}")
        return map_status_error(status, headers, (message, code), provider=self.name)


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _json(raw: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError("cohere: upstream answered with a body that is not JSON") from None
    if not isinstance(doc, dict):
        raise UpstreamProtocolError(f"cohere: upstream answered with a JSON {type(doc).__name__}")
    return doc
