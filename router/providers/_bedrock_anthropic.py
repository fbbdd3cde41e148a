"""Claude on Amazon Bedrock spoken natively: Anthropic's Messages API through InvokeModel.

A ``/v1/messages`` request to a Bedrock deployment of an Anthropic model (its model id names
``anthropic.``: ``anthropic.claude-…``, ``us.anthropic.claude-…`` inference profiles, their ARNs)
goes to ``POST /model/{modelId}/invoke`` (``/invoke-with-response-stream`` when streamed) with the
client's body as Bedrock's Claude request: every field as sent except ``model`` (the URL names it)
and ``stream`` (the URL says it), plus ``anthropic_version: bedrock-2023-05-31`` and the betas as
the body's ``anthropic_beta`` list (Bedrock reads no ``anthropic-beta`` header). The answer is
Anthropic's message; a stream is AWS event-stream framed, each ``chunk`` event carrying one
Anthropic stream event, base64-encoded, in ``bytes``: :class:`BedrockMessagesStream` unwraps them.

Token counting uses Bedrock's CountTokens (``POST /model/{modelId}/count-tokens``, the would-be
InvokeModel body base64-encoded in ``input.invokeModel.body``), answered as ``inputTokens``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson

from .._errors import UpstreamProtocolError
from ._anthropic_native import BEDROCK_ANTHROPIC_VERSION, MessagesStream, betas, json_doc
from ._base import Payload, RequestContext
from ._bedrock_converse import _EXCEPTION_STATUS, bedrock_error
from ._eventstream import EventStreamDecoder

#: What Bedrock's CountTokens needs of an InvokeModel body that a count request has none of.
_COUNT_MAX_TOKENS = 1


def is_anthropic_model(model_id: str) -> bool:
    """Whether a Bedrock model id (or inference profile, or ARN) is one of Anthropic's models."""
    lowered = model_id.lower()
    return lowered.startswith("anthropic.") or ".anthropic." in lowered or "/anthropic." in lowered


def invoke_body(body: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
    """The client's Messages request as Bedrock's InvokeModel body for Claude."""
    payload = {k: v for k, v in body.items() if k not in ("model", "stream")}
    payload["anthropic_version"] = BEDROCK_ANTHROPIC_VERSION
    flags = betas(ctx, payload.pop("anthropic_beta", None))
    if flags:
        payload["anthropic_beta"] = flags
    return payload


def count_body(body: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
    """A CountTokens request for a count_tokens body: InvokeModel's body, base64-encoded."""
    payload = invoke_body(body, ctx)
    # InvokeModel requires max_tokens (above a thinking budget); a count does not depend on it.
    thinking = payload.get("thinking")
    budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
    floor = budget + 1 if isinstance(budget, int) and not isinstance(budget, bool) else _COUNT_MAX_TOKENS
    payload.setdefault("max_tokens", floor)
    return {"input": {"invokeModel": {"body": base64.b64encode(orjson.dumps(payload)).decode()}}}


class BedrockMessagesStream(MessagesStream):
    """InvokeModelWithResponseStream's event-stream frames, unwrapped into Anthropic's events."""

    def __init__(self) -> None:
        super().__init__("bedrock")
        self._decoder = EventStreamDecoder()

    def feed(self, data: bytes) -> list[Payload]:
        out: list[Payload] = []
        for message in self._decoder.feed(data):
            if message.message_type in ("exception", "error"):
                name = message.exception_type or message.header(":error-code") or "UnknownError"
                doc = json_doc(message.payload, "a stream exception", "bedrock") if message.payload else {}
                text = doc.get("message") or doc.get("Message") or message.header(":error-message") or name
                raise bedrock_error(_EXCEPTION_STATUS.get(name, 500), name, str(text), {}, "bedrock")
            if message.event_type != "chunk":
                continue
            chunk = json_doc(message.payload, "a stream chunk", "bedrock")
            try:
                event = base64.b64decode(str(chunk.get("bytes") or ""), validate=True)
            except (binascii.Error, ValueError):
                raise UpstreamProtocolError("bedrock: a stream chunk's bytes are not base64") from None
            out += self.event(None, event)
        return out

    def flush(self) -> list[Payload]:
        self._decoder.close()
        return []
