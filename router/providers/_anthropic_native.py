"""Anthropic's Messages API spoken natively: the anthropic provider, Claude on Bedrock and on Vertex AI.

A ``/v1/messages`` request to a deployment that speaks Messages passes through as the client sent
it: ``cache_control``, ``thinking``, ``top_k``, documents, server tools and any field the router
does not know reach the upstream unchanged. The router sets only what is its own: the model (the
deployment's), the credentials, ``anthropic-version`` and, on Bedrock and Vertex, where their
wire formats put them (:func:`native_body`). The client's ``anthropic-beta`` header is forwarded
(joined with the deployment's own), as a header to Anthropic and Vertex AI and as the body's
``anthropic_beta`` list to Bedrock.

The answer comes back as sent: a JSON message passes through untouched (its usage read on the
way), and a stream passes through event by event as :class:`Event` payloads (:class:`MessagesStream`),
its usage read from ``message_start`` and ``message_delta``, complete at ``message_stop``. An
``error`` event becomes the translator's :attr:`~StreamTranslator.error`, which the core turns into
the stream's last event, so it is not passed on twice.

The protocol pieces both the native path and the chat translation (:mod:`.anthropic`) use live
here too: usage, stream error types, error mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from .._errors import ContentFilterError, KubellmError, UpstreamProtocolError, UpstreamStatusError
from .._sse import SSEDecoder
from ._base import (
    Event,
    Payload,
    ProviderResponse,
    RequestContext,
    StreamTranslator,
    Usage,
    map_status_error,
)

#: The Anthropic API version the router speaks to api.anthropic.com (its own, not the client's).
ANTHROPIC_VERSION = "2023-06-01"
#: The ``anthropic_version`` body field Bedrock's InvokeModel requires for Claude.
BEDROCK_ANTHROPIC_VERSION = "bedrock-2023-05-31"
#: The ``anthropic_version`` body field Vertex AI's rawPredict requires for Claude.
VERTEX_ANTHROPIC_VERSION = "vertex-2023-10-16"
BETA_HEADER = "anthropic-beta"

#: HTTP status of each documented error type, for errors that arrive inside a stream.
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


def anthropic_usage_to_openai(usage: Any) -> Usage | None:
    """Anthropic's ``input_tokens`` excludes cache reads and writes; its docs define the total input
    as input + cache_creation + cache_read, which is what ``prompt_tokens`` reports."""
    if not isinstance(usage, dict):
        return None
    read = int(usage.get("cache_read_input_tokens") or 0)
    written = int(usage.get("cache_creation_input_tokens") or 0)
    return Usage(
        prompt_tokens=int(usage.get("input_tokens") or 0) + read + written,
        completion_tokens=int(usage.get("output_tokens") or 0),
        cached_tokens=read,
        cache_write_tokens=written,
    )


def anthropic_error_to_kubellm(
    status: int, headers: Mapping[str, str], message: str, kind: str | None
) -> KubellmError:
    if kind == "authentication_error":
        status = 401
    if kind == "overloaded_error" or status == 529:
        retry_after = headers.get("Retry-After") or headers.get("retry-after")
        # Anthropic's 529 is an unavailable upstream: 503, retryable, and it counts against the deployment.
        return UpstreamStatusError(
            f"anthropic: {message}",
            status=503,
            code="overloaded",
            headers={"Retry-After": retry_after} if retry_after else None,
        )
    if status == 400 and "content filtering" in message.lower():
        return ContentFilterError(f"anthropic: {message}")
    return map_status_error(status, headers, (message, kind), provider="anthropic")


def json_doc(raw: bytes, what: str, provider: str = "anthropic") -> dict[str, Any]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError(f"{provider}: upstream sent {what} that is not JSON") from None
    if not isinstance(doc, dict):
        raise UpstreamProtocolError(f"{provider}: upstream sent {what} that is not a JSON object")
    return doc


# ------------------------------------------------------------------------------ requests


def betas(ctx: RequestContext, *more: Any) -> list[str]:
    """The beta flags to send: the deployment's ``anthropic-beta`` header, the client's, and any
    ``more`` lists (a Bedrock body's own ``anthropic_beta``), in that order, each once."""
    found: list[str] = []
    configured = next((v for k, v in ctx.deployment.headers.items() if k.lower() == BETA_HEADER), "")
    sources: list[Any] = [configured, ctx.client_headers.get(BETA_HEADER, ""), *more]
    for source in sources:
        items = source.split(",") if isinstance(source, str) else source if isinstance(source, list) else []
        for item in items:
            flag = str(item).strip()
            if flag and flag not in found:
                found.append(flag)
    return found


def native_body(body: dict[str, Any], ctx: RequestContext, *, model_in_body: bool = True) -> dict[str, Any]:
    """The client's Messages request as the upstream gets it: the deployment's model (or none, where
    the URL names it), and ``stream`` as the core decided; every other field as sent."""
    payload = dict(body)
    if model_in_body:
        payload["model"] = ctx.upstream_model
    else:
        payload.pop("model", None)
    if bool(payload.get("stream")) != ctx.stream:
        payload["stream"] = ctx.stream
    return payload


def anthropic_headers(ctx: RequestContext) -> dict[str, str]:
    """api.anthropic.com's headers: the router's version and key, the deployment's headers, the betas."""
    headers = {"content-type": "application/json", "anthropic-version": ANTHROPIC_VERSION}
    if ctx.api_key:
        headers["x-api-key"] = ctx.api_key
    headers.update({k: v for k, v in ctx.deployment.headers.items() if k.lower() != BETA_HEADER})
    flags = betas(ctx)
    if flags:
        headers[BETA_HEADER] = ",".join(flags)
    return headers


# ------------------------------------------------------------------------------ answers


def parse_native(raw: bytes, provider: str = "anthropic") -> ProviderResponse:
    """A Messages answer passes through as sent; only its usage is read."""
    doc = json_doc(raw, "a response", provider)
    return ProviderResponse(raw, anthropic_usage_to_openai(doc.get("usage")))


def parse_count(raw: bytes, provider: str = "anthropic", field: str = "input_tokens") -> int:
    """``input_tokens`` of a count_tokens answer (``inputTokens`` for Bedrock's CountTokens)."""
    doc = json_doc(raw, "a token count", provider)
    count = doc.get(field)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise UpstreamProtocolError(f"{provider}: the token count answer has no {field}")
    return count


class MessagesStream(StreamTranslator):
    """Native Messages stream events, passed through one by one as :class:`Event` payloads.

    Subclasses decode their upstream's framing (SSE, Bedrock's event stream) and hand each event's
    JSON to :meth:`event`.
    """

    terminator = "the final message stop event"

    def __init__(self, provider: str = "anthropic") -> None:
        self._provider = provider
        self._usage: dict[str, Any] = {}
        self._stopped = False

    def event(self, name: str | None, data: bytes) -> list[Payload]:
        if not data or self._stopped or self.error is not None:
            return []
        doc = json_doc(data, "a stream event", self._provider)
        kind = doc.get("type") or name or ""
        if kind == "message_start":
            message = doc.get("message")
            self._take_usage(message.get("usage") if isinstance(message, dict) else None)
        elif kind == "message_delta":
            self._take_usage(doc.get("usage"))
            # The final counts: should message_stop never come, the ledger still has them.
            self.usage = anthropic_usage_to_openai(self._usage)
        elif kind == "message_stop":
            self._stopped = self.complete = True
            self.usage = anthropic_usage_to_openai(self._usage) if self._usage else self.usage
        elif kind == "error":
            found = doc.get("error")
            err: dict[str, Any] = found if isinstance(found, dict) else {}
            err_kind = err.get("type")
            status = ERROR_STATUS.get(str(err_kind), 500)
            self.error = anthropic_error_to_kubellm(status, {}, str(err.get("message") or err_kind), err_kind)
            return []  # the core sends the error as the stream's last event
        return [Event(name or kind, data)]

    def _take_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            # message_delta repeats counts cumulatively; a null means "unchanged".
            self._usage.update({k: v for k, v in usage.items() if v is not None})


class SSEMessagesStream(MessagesStream):
    """A Messages stream framed as server-sent events (Anthropic, Vertex AI's streamRawPredict)."""

    def __init__(self, provider: str = "anthropic") -> None:
        super().__init__(provider)
        self._decoder = SSEDecoder()

    def feed(self, data: bytes) -> list[Payload]:
        return [p for e in self._decoder.feed(data) for p in self.event(e.event, e.data)]

    def flush(self) -> list[Payload]:
        return [p for e in self._decoder.close() for p in self.event(e.event, e.data)]
