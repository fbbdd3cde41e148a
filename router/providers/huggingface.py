"""Hugging Face: the Inference Providers router, and TGI / TEI / Inference Endpoints.

Two providers, one module:

* ``huggingface``: the Inference Providers router (default base ``https://router.huggingface.co/v1``).
  Chat is OpenAI-compatible there. Embeddings go to the HF Inference ``feature-extraction``
  pipeline, ``{router}/hf-inference/models/{model}/pipeline/feature-extraction`` with
  ``{"inputs": [...]}``, which answers a bare array of vectors; this module turns that into an
  OpenAI embedding list (usage estimated: the pipeline reports none).
* ``huggingface-endpoint``: a dedicated Inference Endpoint or a self-hosted TGI/TEI server at
  ``baseUrl`` (the endpoint root). TGI's Messages API serves ``/v1/chat/completions`` and
  ``/v1/completions``; TEI serves OpenAI-compatible ``/v1/embeddings``; all pass through, except
  that JSON modes become TGI's guidance grammar ``{"type": "json_object", "value": <schema>}``.
  TEI's ``POST /rerank`` (``{"query", "texts"}`` -> ``[{"index", "score"}]``) serves ``/v1/rerank``.

Both send the Hugging Face token as ``Authorization: Bearer`` (``HF_TOKEN``). As in the official
``huggingface_hub`` client, a base URL already ending in ``/v1`` is not extended again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import quote

import orjson

from .._errors import (
    ContextLengthExceededError,
    KubellmError,
    UpstreamProtocolError,
    UpstreamStatusError,
)
from ._base import (
    Operation,
    ProviderResponse,
    RequestContext,
    StreamTranslator,
    UpstreamClient,
    UpstreamRequest,
    UpstreamResponse,
    extract_error_message,
    map_status_error,
)
from ._embeddings import LocalResponse, embedding_inputs, estimate_tokens, openai_embedding_response, pack
from ._openai_shaped import OpenAIPassthroughTranslator, OpenAIShapedProvider
from ._surface import finish_rerank, tei_reader, tei_rerank_body
from ._translate import reject_unsupported

ROUTER_BASE_URL = "https://router.huggingface.co/v1"
_PATHS = {
    Operation.CHAT: "/chat/completions",
    Operation.COMPLETION: "/completions",
    Operation.EMBEDDING: "/embeddings",
}
#: TGI and TEI word their "prompt too long" validation errors like this.
_TGI_TOO_LONG = ("must be <=", "must have less than", "input validation error: `inputs` tokens")


def api_root(base_url: str) -> str:
    """The OpenAI-compatible root of a base URL: ``…/v1`` unless it already ends so."""
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def hf_vectors_to_list(doc: Any, count: int) -> list[list[float]]:
    """The ``[[float, …], …]`` feature-extraction answers, checked: one sentence vector per input."""
    if isinstance(doc, list) and count == 1 and doc and all(isinstance(x, int | float) for x in doc):
        doc = [doc]  # a single input may come back as one flat vector
    if (
        not isinstance(doc, list)
        or len(doc) != count
        or not all(isinstance(v, list) and v and all(isinstance(x, int | float) for x in v) for v in doc)
    ):
        raise UpstreamProtocolError(
            "huggingface: feature-extraction did not answer one vector per input "
            "(token-level models need a pooling sentence-embedding model)"
        )
    return [[float(x) for x in v] for v in doc]


class HuggingFaceStreamTranslator(OpenAIPassthroughTranslator):
    """OpenAI passthrough; TGI's in-stream ``{"error": …}`` events are the base class's error events."""

    def __init__(self, include_usage: bool) -> None:
        super().__init__(include_usage, "huggingface")


def openai_response_format_to_tgi(fmt: Any) -> dict[str, Any] | None:
    """TGI's guidance grammar ``{"type": "json_object", "value": <schema>}`` for OpenAI's JSON modes."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return {"type": "json_object", "value": {"type": "object"}}
    if kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        return {"type": "json_object", "value": schema if isinstance(schema, dict) else {"type": "object"}}
    return None  # "text" is TGI's default


class HuggingFaceEndpointProvider(OpenAIShapedProvider):
    """A dedicated Inference Endpoint or self-hosted TGI/TEI server; ``baseUrl`` is its root."""

    name = "huggingface-endpoint"
    required_fields: ClassVar[tuple[str, ...]] = ("baseUrl",)
    default_api_key_env = "HF_TOKEN"
    #: The upstream is TGI: JSON modes become a guidance grammar and ``developer`` turns are
    #: ``system`` turns (TGI hands roles to the model's chat template, which knows no ``developer``).
    tgi: ClassVar[bool] = True

    #: TEI's rerank (``POST {baseUrl}/rerank``, beside ``/v1``).
    operations = OpenAIShapedProvider.operations | {Operation.RERANK}

    def url(self, ctx: RequestContext) -> str:
        if ctx.operation is Operation.RERANK:
            return api_root(self.base_url(ctx)).removesuffix("/v1") + "/rerank"
        return api_root(self.base_url(ctx)) + _PATHS[ctx.operation]

    async def send(
        self, client: UpstreamClient, body: dict[str, Any], ctx: RequestContext
    ) -> UpstreamResponse:
        if ctx.operation is not Operation.RERANK:
            return await super().send(client, body, ctx)
        headers = {"Content-Type": "application/json", **self.auth_headers(ctx), **ctx.deployment.headers}
        request = UpstreamRequest("POST", self.url(ctx), headers, orjson.dumps(tei_rerank_body(body)))
        return await finish_rerank(client, request, body, ctx, self.name, tei_reader(body))

    def prepare_body(self, body: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        body = dict(body)  # the router reuses the client's body across attempts
        if self.tgi and "response_format" in body:
            grammar = openai_response_format_to_tgi(body.pop("response_format"))
            if grammar is not None:
                body["response_format"] = grammar
        if self.tgi and isinstance(body.get("messages"), list):
            body["messages"] = [
                {**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m
                for m in body["messages"]
            ]
        return super().prepare_body(body, ctx)

    def stream_translator(self, ctx: RequestContext) -> StreamTranslator:
        return HuggingFaceStreamTranslator(ctx.include_usage)

    def map_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> KubellmError:
        return hf_error(self.name, status, headers, raw)


class HuggingFaceProvider(HuggingFaceEndpointProvider):
    """The Inference Providers router; embeddings through HF Inference feature-extraction."""

    name = "huggingface"
    operations = OpenAIShapedProvider.operations
    required_fields = ()
    default_base_url = ROUTER_BASE_URL
    tgi = False  # the router speaks OpenAI's request format to every provider

    def feature_extraction_url(self, ctx: RequestContext) -> str:
        origin = self.base_url(ctx).removesuffix("/v1")
        model = quote(ctx.upstream_model, safe="/")
        return f"{origin}/hf-inference/models/{model}/pipeline/feature-extraction"

    def build_request(self, body: dict[str, Any], ctx: RequestContext) -> UpstreamRequest:
        if ctx.operation is not Operation.EMBEDDING:
            return super().build_request(body, ctx)
        reject_unsupported(dict(body), frozenset({"dimensions"}), ctx, self.name)
        payload = {"inputs": embedding_inputs(body, self.name)}
        headers = {"Content-Type": "application/json", **self.auth_headers(ctx), **ctx.deployment.headers}
        return UpstreamRequest("POST", self.feature_extraction_url(ctx), headers, orjson.dumps(payload))

    async def send(
        self, client: UpstreamClient, body: dict[str, Any], ctx: RequestContext
    ) -> UpstreamResponse:
        if ctx.operation is not Operation.EMBEDDING:
            return await super().send(client, body, ctx)
        request = self.build_request(body, ctx)
        texts = embedding_inputs(body, self.name)
        resp = await client.send(request, ctx)
        raw = await resp.read()
        if resp.status >= 400:
            return LocalResponse(resp.status, dict(resp.headers), raw)
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamProtocolError("huggingface: feature-extraction answered with non-JSON") from None
        # feature-extraction reports no token counts: the usage is an estimate.
        return pack(hf_vectors_to_list(doc, len(texts)), estimate_tokens(texts), estimated=True, body=body)

    def parse_response(self, raw: bytes, ctx: RequestContext) -> ProviderResponse:
        if ctx.operation is Operation.EMBEDDING:
            return openai_embedding_response(raw, ctx)
        return super().parse_response(raw, ctx)


def hf_error(provider: str, status: int, headers: Mapping[str, str], raw: bytes) -> KubellmError:
    """TGI/TEI ``{"error", "error_type"}`` and router errors onto the router's classes."""
    message, code = extract_error_message(raw)
    lowered = message.lower()
    if status in (400, 413, 422) and any(marker in lowered for marker in _TGI_TOO_LONG):
        return ContextLengthExceededError(f"{provider}: {message}", param="messages")
    if status == 503:
        retry: dict[str, str] | None = None
        try:
            doc = orjson.loads(raw)
            estimated = doc.get("estimated_time") if isinstance(doc, dict) else None
        except orjson.JSONDecodeError:
            estimated = None
        if isinstance(estimated, int | float) and not isinstance(estimated, bool):
            retry = {"Retry-After": str(max(1, math.ceil(estimated)))}
        return UpstreamStatusError(f"{provider}: {message}", status=503, code=code, headers=retry)
    if status == 402:
        err = UpstreamStatusError(f"{provider}: {message}", status=402, code=code or "insufficient_credits")
        err.retryable = True  # this token's credits are spent; another deployment may still serve
        return err
    return map_status_error(status, headers, (message, code), provider=provider)
