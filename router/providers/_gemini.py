"""Google ``GenerateContent`` answers and streams rendered in OpenAI's format, and Google's errors.

Shared by the ``gemini`` (AI Studio) and ``vertex`` (Vertex AI) providers,
which differ only in URLs, credentials and embeddings; requests are
translated in :mod:`._gemini_request`.

Gemini has no tool-call ids. Answers get ids made from the request id
(``call_<request>_<candidate>_<n>``) unless the upstream sent one. A Gemini 3
``thoughtSignature`` travels inside the id (after ``~sig~``), so a client that
sends the history back returns it untouched.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import orjson

from .._errors import (
    AuthenticationError,
    ContentFilterError,
    ContextLengthExceededError,
    KubellmError,
    RateLimitError,
    UpstreamProtocolError,
)
from .._sse import SSEDecoder, SSEEvent
from ._base import Payload, ProviderResponse, RequestContext, StreamTranslator, Usage, map_status_error
from ._gemini_request import SIGNATURE_SEP, json_schema_to_gemini, openai_to_gemini_request
from ._translate import ChunkBuilder, arguments_json, chat_completion, tool_call

__all__ = [
    "GeminiStreamTranslator",
    "gemini_response_to_openai",
    "json_schema_to_gemini",
    "map_google_error",
    "openai_to_gemini_request",
]

_FILTER_REASONS = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
)
_CONTEXT_MARKERS = ("input token count", "exceeds the maximum number of tokens", "token limit", "too long")


# --------------------------------------------------------------- responses


def gemini_finish_reason_to_openai(reason: str | None, has_tool_calls: bool = False) -> str | None:
    if reason is None:
        return None
    if reason in _FILTER_REASONS:
        return "content_filter"
    if reason == "MAX_TOKENS":
        return "length"
    return "tool_calls" if has_tool_calls else "stop"


def gemini_usage_to_openai(meta: Any) -> Usage | None:
    if not isinstance(meta, dict):
        return None
    return Usage(
        prompt_tokens=int(meta.get("promptTokenCount") or 0) + int(meta.get("toolUsePromptTokenCount") or 0),
        completion_tokens=int(meta.get("candidatesTokenCount") or 0)
        + int(meta.get("thoughtsTokenCount") or 0),
        cached_tokens=int(meta.get("cachedContentTokenCount") or 0),
    )


def call_id(ctx: RequestContext, candidate: int, n: int, part: dict[str, Any]) -> str:
    given = part["functionCall"].get("id")
    base = given if isinstance(given, str) and given else f"call_{ctx.request_id[:24]}_{candidate}_{n}"
    signature = part.get("thoughtSignature")
    return f"{base}{SIGNATURE_SEP}{signature}" if isinstance(signature, str) and signature else base


def _blocked(doc: dict[str, Any], provider: str) -> ContentFilterError | None:
    feedback = doc.get("promptFeedback")
    if isinstance(feedback, dict) and feedback.get("blockReason") and not doc.get("candidates"):
        return ContentFilterError(f"{provider}: the prompt was blocked ({feedback['blockReason']})")
    return None


def _load(raw: bytes, provider: str) -> dict[str, Any]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError(f"{provider}: upstream answered with a body that is not JSON") from None
    if not isinstance(doc, dict):
        raise UpstreamProtocolError(f"{provider}: upstream answered with a JSON {type(doc).__name__}")
    return doc


def gemini_response_to_openai(raw: bytes, ctx: RequestContext, provider: str) -> ProviderResponse:
    doc = _load(raw, provider)
    blocked = _blocked(doc, provider)
    if blocked is not None:
        raise blocked
    usage = gemini_usage_to_openai(doc.get("usageMetadata"))
    choices: list[dict[str, Any]] = []
    for position, cand in enumerate(doc.get("candidates") or []):
        index = int(cand.get("index", position))
        text: list[str] = []
        calls: list[dict[str, Any]] = []
        for part in (cand.get("content") or {}).get("parts") or []:
            if part.get("thought"):
                continue
            if isinstance(part.get("text"), str):
                text.append(part["text"])
            elif isinstance(part.get("functionCall"), dict):
                fc = part["functionCall"]
                calls.append(
                    tool_call(
                        call_id(ctx, index, len(calls), part),
                        fc.get("name", ""),
                        arguments_json(fc.get("args")),
                    )
                )
        finish = gemini_finish_reason_to_openai(cand.get("finishReason"), bool(calls)) or "stop"
        joined = "".join(text)
        if finish == "content_filter" and not joined and not calls and len(doc.get("candidates") or []) == 1:
            raise ContentFilterError(f"{provider}: the answer was blocked ({cand.get('finishReason')})")
        choices.append(
            {
                "index": index,
                "message": {
                    "role": "assistant",
                    "content": joined or (None if calls else ""),
                    **({"tool_calls": calls} if calls else {}),
                },
                "logprobs": None,
                "finish_reason": finish,
            }
        )
    if not choices:
        raise UpstreamProtocolError(f"{provider}: upstream answered with no candidates")
    first = choices[0]
    body = chat_completion(
        ctx,
        content=first["message"]["content"],
        finish_reason=first["finish_reason"],
        usage=usage,
        tool_calls=first["message"].get("tool_calls"),
        response_id=doc.get("responseId") and f"chatcmpl-{doc['responseId']}",
    )
    if len(choices) > 1:
        whole = orjson.loads(body)
        whole["choices"] = sorted(choices, key=lambda c: int(c["index"]))
        body = orjson.dumps(whole)
    return ProviderResponse(body, usage)


class GeminiStreamTranslator(StreamTranslator):
    """``alt=sse`` events, each a whole GenerateContentResponse, to OpenAI chunks."""

    terminator = "a finishReason for every candidate"

    def __init__(self, ctx: RequestContext, provider: str) -> None:
        self._ctx = ctx
        self._provider = provider
        self._sse = SSEDecoder()
        self._builders: dict[int, ChunkBuilder] = {}
        self._calls: dict[int, int] = {}
        self._said: set[int] = set()
        self._finished: set[int] = set()
        self._id: str | None = None

    def feed(self, data: bytes) -> list[Payload]:
        return self._events(self._sse.feed(data))

    def flush(self) -> list[Payload]:
        out = self._events(self._sse.close())
        # No end event: the stream is whole once every candidate it began has its finishReason.
        self.complete = bool(self._finished) and self._finished.issuperset(self._builders)
        if self.complete and self.usage is not None:
            chunk = self._builder(0).usage(self.usage)
            if chunk is not None:
                out.append(chunk)
        return out

    def _builder(self, index: int) -> ChunkBuilder:
        builder = self._builders.get(index)
        if builder is None:
            builder = self._builders[index] = ChunkBuilder(self._ctx, self._id)
        return builder

    def _emit(self, out: list[Payload], index: int, chunk: dict[str, Any]) -> None:
        if index:
            chunk["choices"][0]["index"] = index
        out.append(chunk)

    def _events(self, events: list[SSEEvent]) -> list[Payload]:
        out: list[Payload] = []
        for event in events:
            if not event.data:
                continue
            doc = _load(event.data, self._provider)
            if isinstance(doc.get("error"), dict):
                err = doc["error"]
                raise map_google_error(int(err.get("code") or 500), {}, event.data, self._provider)
            if self._id is None and doc.get("responseId"):
                self._id = f"chatcmpl-{doc['responseId']}"
            usage = gemini_usage_to_openai(doc.get("usageMetadata"))
            if usage is not None:
                self.usage = usage
            blocked = _blocked(doc, self._provider)
            if blocked is not None:
                raise blocked
            for position, cand in enumerate(doc.get("candidates") or []):
                self._candidate(out, int(cand.get("index", position)), cand)
        return out

    def _candidate(self, out: list[Payload], index: int, cand: dict[str, Any]) -> None:
        builder = self._builder(index)
        for part in (cand.get("content") or {}).get("parts") or []:
            if part.get("thought"):
                continue
            if isinstance(part.get("text"), str) and part["text"]:
                self._said.add(index)
                self._emit(out, index, builder.text(part["text"]))
            elif isinstance(part.get("functionCall"), dict):
                n = self._calls.get(index, 0)
                self._calls[index] = n + 1
                self._said.add(index)
                fc = part["functionCall"]
                self._emit(
                    out,
                    index,
                    builder.tool_call_start(n, call_id(self._ctx, index, n, part), fc.get("name", "")),
                )
                self._emit(out, index, builder.tool_call_arguments(n, arguments_json(fc.get("args"))))
        reason = gemini_finish_reason_to_openai(cand.get("finishReason"), index in self._calls)
        if reason is not None and index not in self._finished:
            if reason == "content_filter" and not self._said:
                raise ContentFilterError(
                    f"{self._provider}: the answer was blocked ({cand.get('finishReason')})"
                )
            self._finished.add(index)
            self._emit(out, index, builder.finish(reason))


# ------------------------------------------------------------------ errors


def _retry_after(headers: Mapping[str, str], details: list[Any]) -> str | None:
    given = headers.get("Retry-After") or headers.get("retry-after")
    if given:
        return given
    for detail in details:
        delay = detail.get("retryDelay") if isinstance(detail, dict) else None
        if isinstance(delay, str) and re.fullmatch(r"\d+(\.\d+)?s", delay):
            return str(max(1, math.ceil(float(delay[:-1]))))
    return None


def map_google_error(status: int, headers: Mapping[str, str], raw: bytes, provider: str) -> KubellmError:
    """Google's ``{"error": {"code", "message", "status", "details"}}`` (or a list of them)."""
    try:
        doc: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, list) and doc:
        doc = doc[0]
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict):
        text = raw[:500].decode("utf-8", "replace").strip() or "upstream returned an error with no body"
        return map_status_error(status, headers, (text, None), provider=provider)
    message = str(err.get("message") or "upstream error")
    code = err.get("status")
    details = [d for d in err.get("details") or [] if isinstance(d, dict)]
    reasons = {d.get("reason") for d in details}
    lowered = message.lower()
    if (
        status == 401
        or code in ("UNAUTHENTICATED", "PERMISSION_DENIED")
        or "API_KEY_INVALID" in reasons
        or "api key not valid" in lowered
    ):
        auth = map_status_error(401, headers, (message, code), provider=provider)
        assert isinstance(auth, AuthenticationError)
        return auth
    if status == 429 or code == "RESOURCE_EXHAUSTED":
        retry = _retry_after(headers, details)
        return RateLimitError(f"{provider}: {message}", headers={"Retry-After": retry} if retry else None)
    if status == 400 and any(m in lowered for m in _CONTEXT_MARKERS):
        return ContextLengthExceededError(f"{provider}: {message}", param="messages")
    return map_status_error(status, headers, (message, code), provider=provider)
