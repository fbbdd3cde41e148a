"""The shared base of every backend that already speaks OpenAI's wire format.

Requests get only their ``model`` rewritten; responses and stream chunks pass
through as the upstream's own bytes, parsed only to read usage.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

from .._errors import UpstreamError, UpstreamProtocolError
from .._sse import SSEDecoder, SSEEvent
from ._base import (
    Operation,
    Payload,
    Provider,
    ProviderResponse,
    RequestContext,
    StreamTranslator,
    UpstreamRequest,
    Usage,
    extract_error_message,
)
from ._openai_responses import ResponsesPassthroughTranslator, usage_from_responses

_PATHS = {
    Operation.CHAT: "/chat/completions",
    Operation.COMPLETION: "/completions",
    Operation.EMBEDDING: "/embeddings",
    Operation.RESPONSES: "/responses",
}


class OpenAIPassthroughTranslator(StreamTranslator):
    """Forwards OpenAI chunks untouched, noting usage and hiding what the client did not ask for.

    An ``{"error": …}`` event (OpenAI, vLLM, TGI and others send one when generation fails
    mid-stream) becomes :attr:`error` instead of passing through as the upstream wrote it: the
    dispatcher renders it as the router's own error event, scrubbed of credentials.
    """

    __slots__ = ("_decoder", "_include_usage", "_provider")

    def __init__(self, include_usage: bool, provider: str = "upstream") -> None:
        self._decoder = SSEDecoder()
        self._include_usage = include_usage
        self._provider = provider

    def feed(self, data: bytes) -> list[Payload]:
        return self.forward(self._decoder.feed(data))

    def flush(self) -> list[Payload]:
        return self.forward(self._decoder.close())

    def forward(self, events: list[SSEEvent]) -> list[Payload]:
        """Upstream events to client payloads; subclasses filter vendor-specific events before calling it."""
        out: list[Payload] = []
        for event in events:
            data: bytes = event.data
            if self.complete:
                break
            if not data:
                continue
            if data == b"[DONE]":
                self.complete = True
                break
            # A cheap test first: only a payload with an "error" key can be an error event.
            if b'"error"' in data and self._error_event(data):
                break
            if b'"usage"' in data:
                try:
                    chunk = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise UpstreamProtocolError("upstream sent a stream chunk that is not JSON") from None
                usage = Usage.from_openai(chunk.get("usage")) if isinstance(chunk, dict) else None
                if usage is not None:
                    self.usage = usage
                    if not self._include_usage:
                        if not chunk.get("choices"):
                            continue
                        chunk.pop("usage", None)
                        data = orjson.dumps(chunk)
            out.append(data)
        return out

    def _error_event(self, data: bytes) -> bool:
        """Whether ``data`` is an error event (then :attr:`error` is set from it)."""
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(doc, dict) or doc.get("error") in (None, "") or doc.get("choices"):
            return False
        message, code = extract_error_message(data)
        self.error = UpstreamError(f"{self._provider}: {message}", code=code or "upstream_stream_error")
        return True


class OpenAIShapedProvider(Provider):
    """Base for OpenAI, Azure OpenAI and every OpenAI-compatible vendor."""

    operations = frozenset({Operation.CHAT, Operation.COMPLETION, Operation.EMBEDDING})
    #: Whether the upstream accepts ``stream_options.include_usage``.
    supports_stream_usage: ClassVar[bool] = True

    def url(self, ctx: RequestContext) -> str:
        return self.base_url(ctx) + _PATHS[ctx.operation]

    def auth_headers(self, ctx: RequestContext) -> dict[str, str]:
        return {"Authorization": f"Bearer {ctx.api_key}"} if ctx.api_key else {}

    def prepare_body(self, body: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        # A copy: the client's body is reused by later attempts and logged as the client sent it.
        body = {**body, "model": ctx.upstream_model}
        if ctx.operation is Operation.RESPONSES:
            return body  # usage always comes in response.completed; stream_options means else there
        if ctx.stream and self.supports_stream_usage and not ctx.include_usage:
            # Ask for usage even when the client did not, so metering sees real numbers.
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return body

    def build_request(self, body: dict[str, Any], ctx: RequestContext) -> UpstreamRequest:
        headers = {"Content-Type": "application/json", **self.auth_headers(ctx), **ctx.deployment.headers}
        payload = orjson.dumps(self.prepare_body(body, ctx))
        return UpstreamRequest("POST", self.url(ctx), headers, payload)

    def parse_response(self, raw: bytes, ctx: RequestContext) -> ProviderResponse:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamProtocolError(
                f"{self.name}: upstream answered with a body that is not JSON"
            ) from None
        if not isinstance(doc, dict):
            raise UpstreamProtocolError(f"{self.name}: upstream answered with a JSON {type(doc).__name__}")
        if ctx.operation is Operation.RESPONSES:
            return ProviderResponse(raw, usage_from_responses(doc.get("usage")))
        return ProviderResponse(raw, Usage.from_openai(doc.get("usage")))

    def stream_translator(self, ctx: RequestContext) -> StreamTranslator:
        if ctx.operation is Operation.RESPONSES:
            return ResponsesPassthroughTranslator(self.name)
        return OpenAIPassthroughTranslator(ctx.include_usage, self.name)
