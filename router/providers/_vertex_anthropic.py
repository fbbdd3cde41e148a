"""Claude on Vertex AI spoken natively: Anthropic's Messages API through rawPredict.

A ``/v1/messages`` request to a Vertex AI deployment of a Claude model (``upstreamModel``
``claude-…``, e.g. ``claude-sonnet-4@20250514``, or ``publishers/anthropic/models/…``) goes to
``POST …/projects/{project}/locations/{location}/publishers/anthropic/models/{model}:rawPredict``
(``:streamRawPredict`` when streamed, answered as Anthropic's SSE stream) with the client's body as
Vertex AI documents it for Claude: every field as sent except ``model`` (the URL names it), plus
``anthropic_version: vertex-2023-10-16``; betas travel in the ``anthropic-beta`` header. Token
counting: ``…/publishers/anthropic/models/count-tokens:rawPredict``, the body keeping its model.
Chat requests to Claude are translated as for the anthropic provider (:data:`CHAT`) and take the
same route.
"""

from __future__ import annotations

from typing import Any

from ._anthropic_native import BETA_HEADER, VERTEX_ANTHROPIC_VERSION, betas, native_body
from ._anthropic_request import openai_request_to_anthropic
from ._base import RequestContext
from .anthropic import AnthropicProvider

#: The anthropic provider's chat translation (answers and streams), which Claude on Vertex shares.
CHAT = AnthropicProvider()

_PUBLISHER = "publishers/anthropic/models/"


def is_claude(model: str) -> bool:
    return model.startswith("claude") or _PUBLISHER in model


def model_name(ctx: RequestContext) -> str:
    """The Claude model id as Vertex AI names it in the URL (``claude-sonnet-4@20250514``)."""
    model = ctx.upstream_model
    return model.rsplit(_PUBLISHER, 1)[1] if _PUBLISHER in model else model


def messages_body(body: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
    payload = native_body(body, ctx, model_in_body=False)
    payload["anthropic_version"] = VERTEX_ANTHROPIC_VERSION
    return payload


def chat_body(body: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
    """An OpenAI chat request as Vertex AI's Claude body."""
    payload = openai_request_to_anthropic(body, ctx)
    payload.pop("model", None)
    payload["anthropic_version"] = VERTEX_ANTHROPIC_VERSION
    return payload


def count_body(body: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
    return {**body, "model": model_name(ctx), "anthropic_version": VERTEX_ANTHROPIC_VERSION}


def headers(ctx: RequestContext, auth: dict[str, str]) -> dict[str, str]:
    out = {"Content-Type": "application/json", **auth}
    out.update({k: v for k, v in ctx.deployment.headers.items() if k.lower() != BETA_HEADER})
    flags = betas(ctx)
    if flags:
        out[BETA_HEADER] = ",".join(flags)
    return out
