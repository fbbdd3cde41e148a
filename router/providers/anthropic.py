"""Anthropic's Messages API (``POST {baseUrl}/v1/messages``).

Requests are mapped in :mod:`._anthropic_request`. JSON output:
``response_format`` ``json_schema`` becomes ``output_config.format``
(Anthropic's structured outputs: constrained decoding, the answer is the
text); ``json_object`` has no schema to give, so it becomes a forced tool
:data:`JSON_TOOL` whose input, always an object, is returned as the text.

Usage: Anthropic's ``input_tokens`` excludes cache reads and writes; its docs
define the total input as input + cache_creation + cache_read, which is what
``prompt_tokens`` reports, with ``cache_read_input_tokens`` as ``cached_tokens``.
A ``refusal`` stop is a :class:`ContentFilterError` when the whole answer is
refused, and ``finish_reason: content_filter`` once a stream has begun.

``/v1/messages`` requests (:attr:`Operation.MESSAGES`) are not translated: see
:mod:`._anthropic_native`. ``POST /v1/messages/count_tokens`` is forwarded as is
(:meth:`AnthropicProvider.count_tokens`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from .._errors import ContentFilterError, KubellmError
from .._sse import SSEDecoder, SSEEvent
from ._anthropic_native import (
    ERROR_STATUS,
    SSEMessagesStream,
    anthropic_error_to_kubellm,
    anthropic_headers,
    anthropic_usage_to_openai,
    json_doc,
    native_body,
    parse_count,
    parse_native,
)
from ._anthropic_request import JSON_TOOL, openai_request_to_anthropic
from ._base import (
    Operation,
    Payload,
    Provider,
    ProviderResponse,
    RequestContext,
    StreamTranslator,
    UpstreamClient,
    UpstreamRequest,
    extract_error_message,
)
from ._translate import ChunkBuilder, arguments_json, chat_completion, tool_call

_STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def anthropic_stop_reason_to_openai(reason: str | None) -> str:
    return _STOP_REASONS.get(reason or "end_turn", "stop")


class AnthropicStreamTranslator(StreamTranslator):
    """Anthropic stream events, as they arrive, into OpenAI chunks."""

    terminator = "the final message stop event"

    def __init__(self, ctx: RequestContext) -> None:
        self._decoder = SSEDecoder()
        self._chunks = ChunkBuilder(ctx)
        self._usage: dict[str, Any] = {}
        self._tool_index: dict[int, int] = {}  # Anthropic block index -> OpenAI tool call index
        self._json_blocks: set[int] = set()
        self._finished = False
        self._stopped = False

    def feed(self, data: bytes) -> list[Payload]:
        return self._handle(self._decoder.feed(data))

    def flush(self) -> list[Payload]:
        return self._handle(self._decoder.close())

    def _handle(self, events: list[SSEEvent]) -> list[Payload]:
        out: list[Payload] = []
        for event in events:
            if not event.data or self._stopped or self.error is not None:
                continue
            doc = json_doc(event.data, "a stream event")
            kind = doc.get("type") or event.event
            if kind == "message_start":
                self._usage.update(doc.get("message", {}).get("usage") or {})
                out.append(self._chunks.role())
            elif kind == "content_block_start":
                out += self._block_start(doc.get("index", 0), doc.get("content_block") or {})
            elif kind == "content_block_delta":
                out += self._delta(doc.get("index", 0), doc.get("delta") or {})
            elif kind == "message_delta":
                self._usage.update({k: v for k, v in (doc.get("usage") or {}).items() if v is not None})
                # The final counts: should message_stop never come, the ledger still has them.
                self.usage = anthropic_usage_to_openai(self._usage)
                out.append(self._finish(doc.get("delta", {}).get("stop_reason")))
            elif kind == "message_stop":
                self._stopped = self.complete = True
                if not self._finished:
                    out.append(self._finish(None))
                self.usage = anthropic_usage_to_openai(self._usage)
                if self.usage is not None and (chunk := self._chunks.usage(self.usage)) is not None:
                    out.append(chunk)
            elif kind == "error":
                err = doc.get("error") or {}
                err_kind = err.get("type")
                status = ERROR_STATUS.get(err_kind or "", 500)
                self.error = anthropic_error_to_kubellm(
                    status, {}, str(err.get("message") or err_kind), err_kind
                )
        return out

    def _block_start(self, index: int, block: dict[str, Any]) -> list[Payload]:
        if block.get("type") == "text" and block.get("text"):
            return [self._chunks.text(block["text"])]
        if block.get("type") != "tool_use":
            return []
        if block.get("name") == JSON_TOOL:
            self._json_blocks.add(index)
            return []
        call = self._tool_index[index] = len(self._tool_index)
        return [self._chunks.tool_call_start(call, str(block.get("id")), str(block.get("name")))]

    def _delta(self, index: int, delta: dict[str, Any]) -> list[Payload]:
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return [self._chunks.text(delta["text"])]
        if kind == "input_json_delta" and delta.get("partial_json"):
            if index in self._json_blocks:
                return [self._chunks.text(delta["partial_json"])]
            if index in self._tool_index:
                return [self._chunks.tool_call_arguments(self._tool_index[index], delta["partial_json"])]
        return []  # thinking, signature and citation deltas have no OpenAI counterpart

    def _finish(self, reason: str | None) -> Payload:
        self._finished = True
        finish = anthropic_stop_reason_to_openai(reason)
        if finish == "tool_calls" and not self._tool_index:
            finish = "stop"  # only the JSON tool was used
        return self._chunks.finish(finish)


class AnthropicProvider(Provider):
    name = "anthropic"
    operations = frozenset({Operation.CHAT, Operation.MESSAGES})
    default_api_key_env = "ANTHROPIC_API_KEY"
    default_base_url = "https://api.anthropic.com"

    def url(self, ctx: RequestContext, path: str = "/messages") -> str:
        base = self.base_url(ctx)
        return base + (path if base.endswith("/v1") else "/v1" + path)

    def build_request(self, body: dict[str, Any], ctx: RequestContext) -> UpstreamRequest:
        if ctx.operation is Operation.MESSAGES:
            payload = native_body(body, ctx)
        else:
            payload = openai_request_to_anthropic(body, ctx)
        return UpstreamRequest("POST", self.url(ctx), anthropic_headers(ctx), orjson.dumps(payload))

    async def count_tokens(
        self, client: UpstreamClient, body: dict[str, Any], ctx: RequestContext
    ) -> int | None:
        """``POST /v1/messages/count_tokens`` upstream, the client's body with the deployment's model."""
        payload = {**body, "model": ctx.upstream_model}
        request = UpstreamRequest(
            "POST", self.url(ctx, "/messages/count_tokens"), anthropic_headers(ctx), orjson.dumps(payload)
        )
        resp = await client.send(request, ctx)
        raw = await resp.read()
        if resp.status >= 400:
            raise self.map_error(resp.status, resp.headers, raw)
        return parse_count(raw)

    def parse_response(self, raw: bytes, ctx: RequestContext) -> ProviderResponse:
        if ctx.operation is Operation.MESSAGES:
            return parse_native(raw)
        doc = json_doc(raw, "a response")
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in doc.get("content") or []:
            if block.get("type") == "text":
                texts.append(str(block.get("text") or ""))
            elif block.get("type") == "tool_use" and block.get("name") == JSON_TOOL:
                texts.append(arguments_json(block.get("input")))
            elif block.get("type") == "tool_use":
                calls.append(
                    tool_call(
                        str(block.get("id")), str(block.get("name")), arguments_json(block.get("input"))
                    )
                )
        usage = anthropic_usage_to_openai(doc.get("usage"))
        finish = anthropic_stop_reason_to_openai(doc.get("stop_reason"))
        if finish == "content_filter":
            raise ContentFilterError("anthropic: the model declined to answer (stop_reason 'refusal')")
        if finish == "tool_calls" and not calls:
            finish = "stop"
        content = "".join(texts) if texts or not calls else None
        body = chat_completion(
            ctx, content=content, finish_reason=finish, usage=usage, tool_calls=calls or None
        )
        return ProviderResponse(body, usage)

    def stream_translator(self, ctx: RequestContext) -> StreamTranslator:
        if ctx.operation is Operation.MESSAGES:
            return SSEMessagesStream()
        return AnthropicStreamTranslator(ctx)

    def map_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> KubellmError:
        message, kind = extract_error_message(raw)
        return anthropic_error_to_kubellm(status, headers, message, kind)
