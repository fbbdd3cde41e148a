"""OpenAI's Responses API spoken natively (OpenAI, Azure OpenAI): usage, and the stream relay.

The request body passes through with only ``model`` rewritten; the answer passes through as the
upstream's bytes, parsed only for its usage. A stream's events pass through as named
:class:`~.._sse.Event`\\ s; ``response.completed`` and ``response.incomplete`` end it (their
``response.usage`` is the request's usage), while ``response.failed`` and ``error`` events become
:attr:`StreamTranslator.error`, which the Responses renderer turns into its own (scrubbed)
``error`` and ``response.failed`` events.
"""

from __future__ import annotations

from typing import Any

import orjson

from .._errors import RateLimitError, UpstreamError, UpstreamProtocolError
from .._sse import Event, SSEDecoder, SSEEvent
from ._base import Payload, StreamTranslator, Usage

#: Events after which a Responses stream is over.
_TERMINAL = frozenset({"response.completed", "response.incomplete"})
_FAILED = frozenset({"response.failed", "error"})


def usage_from_responses(usage: Any) -> Usage | None:
    """A Responses ``usage`` object as the router's :class:`Usage` (None if there is none)."""
    if not isinstance(usage, dict):
        return None
    details = usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return Usage(
        prompt_tokens=int(usage.get("input_tokens") or 0),
        completion_tokens=int(usage.get("output_tokens") or 0),
        cached_tokens=int(cached or 0),
    )


def _upstream_failure(doc: dict[str, Any], provider: str) -> UpstreamError | RateLimitError:
    """The error a ``response.failed`` or ``error`` event reports."""
    response = doc.get("response")
    error = response.get("error") if isinstance(response, dict) else doc
    error = error if isinstance(error, dict) else {}
    message = str(error.get("message") or "the upstream reported that the response failed")
    code = error.get("code")
    if code == "rate_limit_exceeded":
        return RateLimitError(f"{provider}: {message}")
    return UpstreamError(f"{provider}: {message}", code=str(code) if code else "upstream_stream_error")


class ResponsesPassthroughTranslator(StreamTranslator):
    """Relays a native Responses stream as named events, noting usage, the end and failures."""

    terminator = "response.completed"

    def __init__(self, provider: str) -> None:
        self._decoder = SSEDecoder()
        self._provider = provider

    def feed(self, data: bytes) -> list[Payload]:
        return self._forward(self._decoder.feed(data))

    def flush(self) -> list[Payload]:
        return self._forward(self._decoder.close())

    def _forward(self, events: list[SSEEvent]) -> list[Payload]:
        out: list[Payload] = []
        for event in events:
            if self.complete or self.error is not None:
                break
            if not event.data or event.data == b"[DONE]":
                continue
            name = event.event
            if name is None or name in _TERMINAL or name in _FAILED:
                # Only the few terminal events are parsed; deltas pass through as they came.
                name = self._terminal(event.data)
                if self.error is not None:
                    break
            out.append(Event(name, event.data))
        return out

    def _terminal(self, data: bytes) -> str:
        """Note what a terminal (or unnamed) event says; returns its type."""
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamProtocolError(f"{self._provider}: sent a stream event that is not JSON") from None
        doc = doc if isinstance(doc, dict) else {}
        name = str(doc.get("type"))
        if name in _FAILED:
            self.error = _upstream_failure(doc, self._provider)
        elif name in _TERMINAL:
            response = doc.get("response")
            if isinstance(response, dict):
                self.usage = usage_from_responses(response.get("usage"))
            self.complete = True
        return name
