"""Translation between OpenAI chat requests and Amazon Bedrock's Converse / ConverseStream API.

Requests: system messages become ``system`` text blocks; messages become
``user``/``assistant`` messages of content blocks (``text``, ``image``,
``toolUse``, ``toolResult``), consecutive messages of one role merged because
Converse wants them to alternate; tool messages become ``toolResult`` blocks of
a user message. ``response_format`` ``json_schema`` uses ``outputConfig``
(structured output); ``json_object``, which Converse has no switch for, adds a
system instruction. Tool-call ids Bedrock would reject (its pattern is
``[a-zA-Z0-9_.:-]{1,64}``) are replaced by a stable digest, the same for the
call and its result.

Responses and stream events (decoded from AWS event-stream frames by
:mod:`._eventstream`) are rendered as OpenAI chat completions and chunks.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

import orjson

from .._errors import (
    ContentFilterError,
    ContextLengthExceededError,
    InvalidRequestError,
    KubellmError,
    RateLimitError,
    UpstreamProtocolError,
    UpstreamStatusError,
)
from ._base import Payload, ProviderResponse, RequestContext, StreamTranslator, Usage, map_status_error
from ._eventstream import EventMessage, EventStreamDecoder
from ._translate import (
    ChunkBuilder,
    arguments_json,
    chat_completion,
    content_text,
    max_tokens,
    parse_data_url,
    reject_unsupported,
    split_system,
    stop_list,
    tool_arguments,
    tool_call,
)

UNSUPPORTED = frozenset({
    "seed", "n", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "logit_bias",
    "functions", "function_call", "audio", "modalities", "prediction", "web_search_options",
    "reasoning_effort",
})  # fmt: skip
#: Values of unsupported parameters that ask for nothing and are dropped silently.
_NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False}
_TOOL_ID = re.compile(r"[a-zA-Z0-9_.:-]{1,64}")
_METADATA = re.compile(r"[^a-zA-Z0-9\s:_@$#=/+,\-.]")
_IMAGE_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
}
JSON_INSTRUCTION = "Respond with one valid JSON object and nothing else."
_STOP_REASONS = {
    "end_turn": "stop", "stop_sequence": "stop", "tool_use": "tool_calls", "max_tokens": "length",
    "model_context_window_exceeded": "length", "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}  # fmt: skip
_CONTEXT_MARKERS = (
    "input is too long",
    "too many input tokens",
    "too many tokens",
    "prompt is too long",
    "context window",
    "context length",
    "model_context_window_exceeded",
)
AUTH_ERRORS = frozenset({
    "AccessDeniedException", "UnrecognizedClientException", "InvalidSignatureException",
    "ExpiredTokenException", "IncompleteSignatureException", "MissingAuthenticationTokenException",
    "InvalidClientTokenId", "SignatureDoesNotMatch", "UnauthorizedException",
})  # fmt: skip


# ---------------------------------------------------------------- requests


def bedrock_tool_id(call_id: Any) -> str:
    """The id itself if Bedrock accepts it, else a stable digest of it."""
    text = str(call_id or "")
    if _TOOL_ID.fullmatch(text):
        return text
    return "t_" + hashlib.sha256(text.encode()).hexdigest()[:40]


def _image_block(url: str, param: str) -> dict[str, Any]:
    if url.startswith("s3://"):
        ext = url.rsplit(".", 1)[-1].lower()
        fmt = {"jpg": "jpeg"}.get(ext, ext)
        if fmt not in _IMAGE_FORMATS.values():
            raise InvalidRequestError(f"'{param}': cannot tell the image format of {url!r}", param=param)
        return {"image": {"format": fmt, "source": {"s3Location": {"uri": url}}}}
    image = parse_data_url(url, param)
    if image is None:
        raise InvalidRequestError(
            f"'{param}': Bedrock takes images as base64 data URLs or s3:// URIs, not http(s) URLs",
            param=param,
        )
    found = _IMAGE_FORMATS.get(image.mime_type)
    if found is None:
        raise InvalidRequestError(f"'{param}': image type {image.mime_type!r} is not supported", param=param)
    return {"image": {"format": found, "source": {"bytes": image.data}}}


def _user_blocks(content: Any, param: str) -> list[dict[str, Any]]:
    if isinstance(content, str) or content is None:
        return [{"text": content}] if content and content.strip() else []
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if part.get("type") == "text":
            if (part.get("text") or "").strip():
                blocks.append({"text": part["text"]})
        elif part.get("type") == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise InvalidRequestError(
                    f"'{where}.image_url.url' is required", param=f"{where}.image_url.url"
                )
            blocks.append(_image_block(url, f"{where}.image_url.url"))
        else:
            raise InvalidRequestError(
                f"'{where}': part type {part.get('type')!r} is not supported by Bedrock", param=where
            )
    return blocks


def _append(messages: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    if not blocks:
        return
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": role, "content": blocks})


def openai_messages_to_converse(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], set[str]]:
    """Converse messages, and the names of the tools the history uses."""
    out: list[dict[str, Any]] = []
    used: set[str] = set()
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "user":
            _append(out, "user", _user_blocks(message.get("content"), f"messages[{i}].content"))
        elif role == "assistant":
            blocks: list[dict[str, Any]] = []
            text = content_text(message.get("content"))
            if text.strip():
                blocks.append({"text": text})
            for j, call in enumerate(message.get("tool_calls") or []):
                fn = call.get("function") or {}
                where = f"messages[{i}].tool_calls[{j}]"
                args = tool_arguments(fn.get("arguments"), f"{where}.function.arguments")
                if not isinstance(args, dict):
                    raise InvalidRequestError(
                        f"'{where}.function.arguments' must be a JSON object", param=where
                    )
                used.add(fn.get("name", ""))
                blocks.append(
                    {
                        "toolUse": {
                            "toolUseId": bedrock_tool_id(call.get("id")),
                            "name": fn.get("name"),
                            "input": args,
                        }
                    }
                )
            _append(out, "assistant", blocks)
        elif role == "tool":
            text = content_text(message.get("content"))
            result = {
                "toolUseId": bedrock_tool_id(message.get("tool_call_id")),
                "content": [{"text": text}] if text else [],
            }
            _append(out, "user", [{"toolResult": result}])
        else:
            raise InvalidRequestError(
                f"'messages[{i}].role': {role!r} messages are not supported by Bedrock",
                param=f"messages[{i}].role",
            )
    if out and out[0]["role"] != "user":
        raise InvalidRequestError(
            "'messages': Bedrock conversations must start with a user message", param="messages"
        )
    return out, used


def _tool_config(body: dict[str, Any], used: set[str]) -> dict[str, Any] | None:
    choice = body.get("tool_choice")
    specs: list[dict[str, Any]] = []
    for i, tool in enumerate(body.get("tools") or []):
        if tool.get("type", "function") != "function":
            raise InvalidRequestError(
                f"'tools[{i}].type': only function tools are supported", param=f"tools[{i}]"
            )
        fn = tool["function"]
        spec: dict[str, Any] = {
            "name": fn["name"],
            "inputSchema": {"json": fn.get("parameters") or {"type": "object", "properties": {}}},
        }
        if fn.get("description"):
            spec["description"] = fn["description"]
        specs.append({"toolSpec": spec})
    if choice == "none" and not used:
        return None
    declared = {s["toolSpec"]["name"] for s in specs}
    # Converse refuses toolUse/toolResult blocks without a toolConfig: declare what the history used.
    specs += [
        {"toolSpec": {"name": n, "inputSchema": {"json": {"type": "object"}}}}
        for n in sorted(used - declared)
    ]
    if not specs:
        return None
    config: dict[str, Any] = {"tools": specs}
    if choice == "auto":
        config["toolChoice"] = {"auto": {}}
    elif choice == "required":
        config["toolChoice"] = {"any": {}}
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if not isinstance(name, str):
            raise InvalidRequestError("'tool_choice.function.name' is required", param="tool_choice")
        config["toolChoice"] = {"tool": {"name": name}}
    return config


def openai_to_converse_request(body: dict[str, Any], ctx: RequestContext, provider: str) -> dict[str, Any]:
    body = {k: v for k, v in body.items() if not (k in _NEUTRAL and v == _NEUTRAL[k])}
    reject_unsupported(body, UNSUPPORTED, ctx, provider)
    if body.get("parallel_tool_calls") is False:
        reject_unsupported({"parallel_tool_calls": False}, frozenset({"parallel_tool_calls"}), ctx, provider)
    system, rest = split_system(body["messages"])
    messages, used = openai_messages_to_converse(rest)
    if not messages:
        raise InvalidRequestError(
            "'messages': Bedrock needs at least one non-empty message", param="messages"
        )
    request: dict[str, Any] = {"messages": messages}
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_object":
        system = f"{system}\n\n{JSON_INSTRUCTION}" if system and system.strip() else JSON_INSTRUCTION
    elif fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema") or {}
        schema = {
            "schema": orjson.dumps(spec.get("schema") or {"type": "object"}).decode(),
            "name": str(spec.get("name") or "response"),
        }
        if spec.get("description"):
            schema["description"] = spec["description"]
        request["outputConfig"] = {"textFormat": {"type": "json_schema", "structure": {"jsonSchema": schema}}}
    if system and system.strip():
        request["system"] = [{"text": system}]
    inference: dict[str, Any] = {}
    limit = max_tokens(body)
    if limit is not None:
        inference["maxTokens"] = limit
    temperature = body.get("temperature")
    if temperature is not None:
        if temperature > 1:
            raise InvalidRequestError(
                f"'temperature': Bedrock takes 0 to 1, got {temperature}", param="temperature"
            )
        inference["temperature"] = temperature
    if body.get("top_p") is not None:
        inference["topP"] = body["top_p"]
    stops = [s for s in stop_list(body) or [] if s]
    if stops:
        inference["stopSequences"] = stops
    if inference:
        request["inferenceConfig"] = inference
    tool_config = _tool_config(body, used)
    if tool_config:
        request["toolConfig"] = tool_config
    user = body.get("user")
    if isinstance(user, str) and user:
        request["requestMetadata"] = {"user": _METADATA.sub("_", user)[:256]}
    return request


# --------------------------------------------------------------- responses


def bedrock_stop_reason_to_openai(reason: str | None) -> str | None:
    if reason is None:
        return None
    return _STOP_REASONS.get(reason, "stop")


def converse_usage_to_openai(usage: Any) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    read = int(usage.get("cacheReadInputTokens") or 0)
    written = int(usage.get("cacheWriteInputTokens") or 0)
    return Usage(
        prompt_tokens=int(usage.get("inputTokens") or 0) + read + written,
        completion_tokens=int(usage.get("outputTokens") or 0),
        cached_tokens=read,
        cache_write_tokens=written,
    )


def converse_response_to_openai(raw: bytes, ctx: RequestContext, provider: str) -> ProviderResponse:
    try:
        doc = orjson.loads(raw)
        blocks = doc["output"]["message"]["content"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise UpstreamProtocolError(
            f"{provider}: the Converse answer is not in the documented shape"
        ) from None
    text = "".join(b["text"] for b in blocks if isinstance(b.get("text"), str))
    calls = [
        tool_call(b["toolUse"]["toolUseId"], b["toolUse"]["name"], arguments_json(b["toolUse"].get("input")))
        for b in blocks
        if isinstance(b.get("toolUse"), dict)
    ]
    finish = bedrock_stop_reason_to_openai(doc.get("stopReason")) or "stop"
    if finish == "content_filter" and not text and not calls:
        raise ContentFilterError(f"{provider}: the answer was blocked ({doc.get('stopReason')})")
    usage = converse_usage_to_openai(doc.get("usage"))
    body = chat_completion(
        ctx, content=text or (None if calls else ""), finish_reason=finish, usage=usage, tool_calls=calls
    )
    return ProviderResponse(body, usage)


class ConverseStreamTranslator(StreamTranslator):
    """ConverseStream's event-stream frames to OpenAI chunks, as they arrive.

    The stream ends with ``messageStop`` then ``metadata`` (the usage): a stream cut between
    the two lost its usage, so it is incomplete too.
    """

    terminator = "messageStop and metadata"

    def __init__(self, ctx: RequestContext, provider: str) -> None:
        self._provider = provider
        self._decoder = EventStreamDecoder()
        self._builder = ChunkBuilder(ctx)
        self._tools: dict[int, int] = {}  # content block index -> tool call index
        self._said = False
        self._finished = False

    def feed(self, data: bytes) -> list[Payload]:
        out: list[Payload] = []
        for message in self._decoder.feed(data):
            self._event(message, out)
        return out

    def flush(self) -> list[Payload]:
        self._decoder.close()
        return []

    def _event(self, message: EventMessage, out: list[Payload]) -> None:
        kind = message.message_type
        if kind in ("exception", "error"):
            payload = _json(message.payload)
            name = message.exception_type or message.header(":error-code") or "UnknownError"
            text = (
                payload.get("message") or payload.get("Message") or message.header(":error-message") or name
            )
            raise bedrock_error(_EXCEPTION_STATUS.get(name, 500), name, str(text), {}, self._provider)
        event = message.event_type
        payload = _json(message.payload)
        if event == "contentBlockStart":
            start = (payload.get("start") or {}).get("toolUse")
            if isinstance(start, dict):
                n = self._tools[int(payload.get("contentBlockIndex", -1))] = len(self._tools)
                self._said = True
                out.append(
                    self._builder.tool_call_start(n, start.get("toolUseId", ""), start.get("name", ""))
                )
        elif event == "contentBlockDelta":
            delta = payload.get("delta") or {}
            if isinstance(delta.get("text"), str) and delta["text"]:
                self._said = True
                out.append(self._builder.text(delta["text"]))
            elif isinstance(delta.get("toolUse"), dict):
                block = self._tools.get(int(payload.get("contentBlockIndex", -1)))
                if block is None:
                    raise UpstreamProtocolError(
                        f"{self._provider}: a toolUse delta for a block that never started"
                    )
                if delta["toolUse"].get("input"):
                    out.append(self._builder.tool_call_arguments(block, delta["toolUse"]["input"]))
        elif event == "messageStop":
            reason = bedrock_stop_reason_to_openai(payload.get("stopReason")) or "stop"
            if reason == "content_filter" and not self._said:
                raise ContentFilterError(
                    f"{self._provider}: the answer was blocked ({payload.get('stopReason')})"
                )
            self._finished = True
            out.append(self._builder.finish(reason))
        elif event == "metadata":
            self.complete = self._finished
            self.usage = converse_usage_to_openai(payload.get("usage"))
            chunk = self._builder.usage(self.usage) if self.usage is not None else None
            if chunk is not None:
                out.append(chunk)


def _json(payload: bytes) -> dict[str, Any]:
    if not payload:
        return {}
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError("bedrock: a stream event payload is not JSON") from None
    return doc if isinstance(doc, dict) else {}


# ------------------------------------------------------------------ errors

_EXCEPTION_STATUS = {
    "throttlingException": 429, "validationException": 400, "modelStreamErrorException": 424,
    "internalServerException": 500, "serviceUnavailableException": 503,
}  # fmt: skip


def bedrock_error(
    status: int, error_type: str, message: str, headers: Mapping[str, str], provider: str
) -> KubellmError:
    """An AWS error (``x-amzn-ErrorType`` or a stream exception event) as the router's error."""
    kind = error_type.split(":", 1)[0]
    kind = kind[:1].upper() + kind[1:]
    lowered = message.lower()
    if (
        kind in ("ThrottlingException", "ServiceQuotaExceededException", "TooManyRequestsException")
        or status == 429
    ):
        retry = headers.get("Retry-After") or headers.get("retry-after")
        return RateLimitError(f"{provider}: {message}", headers={"Retry-After": retry} if retry else None)
    if kind in AUTH_ERRORS or status == 401:
        return map_status_error(401, headers, (message, kind), provider=provider)
    if any(m in lowered for m in _CONTEXT_MARKERS):
        return ContextLengthExceededError(f"{provider}: {message}", param="messages")
    if kind in ("ModelStreamErrorException", "ModelErrorException"):
        return UpstreamStatusError(f"{provider}: {message}", status=502, code=kind)
    return map_status_error(status, headers, (message, kind), provider=provider)
