"""Google Gemini through the AI Studio API (``generativelanguage.googleapis.com``).

Chat: ``models/{model}:generateContent`` and ``:streamGenerateContent?alt=sse``.
Embeddings: ``models/{model}:batchEmbedContents`` (which reports no token
counts: usage is estimated). The key travels in the ``x-goog-api-key`` header.
The translation itself lives in :mod:`._gemini`, shared with Vertex AI.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import orjson

from .._errors import InvalidRequestError, KubellmError, UpstreamProtocolError
from ._base import (
    Operation,
    Provider,
    ProviderResponse,
    RequestContext,
    StreamTranslator,
    UpstreamClient,
    UpstreamRequest,
    UpstreamResponse,
)
from ._embeddings import LocalResponse, embedding_inputs, estimate_tokens, openai_embedding_response, pack
from ._gemini import (
    GeminiStreamTranslator,
    gemini_response_to_openai,
    map_google_error,
    openai_to_gemini_request,
)
from ._imagen import finish_imagen, imagen_request
from ._surface import parse_surface


class GoogleGenAIProvider(Provider):
    """What AI Studio and Vertex AI share: the GenerateContent translation and Google's errors."""

    #: Images: Imagen models through ``:predict`` (see _imagen).
    operations = frozenset({Operation.CHAT, Operation.EMBEDDING, Operation.IMAGE})

    @abstractmethod
    def model_url(self, ctx: RequestContext, method: str) -> str:
        """The URL of ``{model}:{method}``."""

    @abstractmethod
    def auth_headers(self, ctx: RequestContext) -> dict[str, str]: ...

    @abstractmethod
    def embedding_request(
        self, texts: list[str], body: dict[str, Any], ctx: RequestContext
    ) -> tuple[str, Any]:
        """The URL and JSON body of an embedding call."""

    @abstractmethod
    def embedding_vectors(self, doc: Any) -> tuple[list[list[float]], int | None]:
        """The vectors of an embedding answer and its token count, if the API reports one."""

    def build_request(self, body: dict[str, Any], ctx: RequestContext) -> UpstreamRequest:
        return self.make_request(body, ctx, self.auth_headers(ctx))

    def make_request(
        self, body: dict[str, Any], ctx: RequestContext, auth: dict[str, str]
    ) -> UpstreamRequest:
        headers = {"Content-Type": "application/json", **auth, **ctx.deployment.headers}
        if ctx.operation is Operation.EMBEDDING:
            url, payload = self.embedding_request(embedding_inputs(body, self.name), body, ctx)
        elif ctx.operation is Operation.CHAT:
            method = "streamGenerateContent?alt=sse" if ctx.stream else "generateContent"
            url, payload = self.model_url(ctx, method), openai_to_gemini_request(body, ctx, self.name)
        elif ctx.operation is Operation.IMAGE:
            url, payload = self.model_url(ctx, "predict"), imagen_request(body, ctx, self.name)
        else:
            raise InvalidRequestError(f"provider {self.name!r} serves chat and embeddings only")
        return UpstreamRequest("POST", url, headers, orjson.dumps(payload))

    async def send(
        self, client: UpstreamClient, body: dict[str, Any], ctx: RequestContext
    ) -> UpstreamResponse:
        return await self.send_request(client, self.build_request(body, ctx), body, ctx)

    async def send_request(
        self, client: UpstreamClient, request: UpstreamRequest, body: dict[str, Any], ctx: RequestContext
    ) -> UpstreamResponse:
        resp = await client.send(request, ctx)
        if ctx.operation is Operation.IMAGE:
            return await finish_imagen(resp, body, self.name)
        if ctx.operation is not Operation.EMBEDDING:
            return resp
        return await self.finish_embedding(resp, body)

    async def finish_embedding(self, resp: UpstreamResponse, body: dict[str, Any]) -> UpstreamResponse:
        raw = await resp.read()
        if resp.status >= 400:
            return LocalResponse(resp.status, resp.headers, raw)
        try:
            vectors, tokens = self.embedding_vectors(orjson.loads(raw))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise UpstreamProtocolError(
                f"{self.name}: the embedding answer is not in the documented shape"
            ) from None
        texts = embedding_inputs(body, self.name)
        if tokens is None:
            return pack(vectors, estimate_tokens(texts), estimated=True, body=body)
        return pack(vectors, tokens, estimated=False, body=body)

    def parse_response(self, raw: bytes, ctx: RequestContext) -> ProviderResponse:
        if ctx.operation is Operation.EMBEDDING:
            return openai_embedding_response(raw, ctx)
        if ctx.operation is Operation.IMAGE:
            return parse_surface(raw, ctx, self.name)
        return gemini_response_to_openai(raw, ctx, self.name)

    def stream_translator(self, ctx: RequestContext) -> StreamTranslator:
        return GeminiStreamTranslator(ctx, self.name)

    def map_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> KubellmError:
        return map_google_error(status, headers, raw, self.name)


class GeminiProvider(GoogleGenAIProvider):
    name = "gemini"
    default_api_key_env = "GEMINI_API_KEY"
    default_base_url = "https://generativelanguage.googleapis.com/v1beta"

    def _model(self, ctx: RequestContext) -> str:
        model = ctx.upstream_model
        return model if model.startswith(("models/", "tunedModels/")) else f"models/{model}"

    def model_url(self, ctx: RequestContext, method: str) -> str:
        return f"{self.base_url(ctx)}/{self._model(ctx)}:{method}"

    def auth_headers(self, ctx: RequestContext) -> dict[str, str]:
        return {"x-goog-api-key": ctx.api_key} if ctx.api_key else {}

    def embedding_request(
        self, texts: list[str], body: dict[str, Any], ctx: RequestContext
    ) -> tuple[str, Any]:
        model = self._model(ctx)
        extra: dict[str, Any] = {}
        if body.get("dimensions") is not None:
            extra["outputDimensionality"] = body["dimensions"]
        if isinstance(body.get("task_type"), str):
            extra["taskType"] = body["task_type"]
        requests = [{"model": model, "content": {"parts": [{"text": t}]}, **extra} for t in texts]
        return self.model_url(ctx, "batchEmbedContents"), {"requests": requests}

    def embedding_vectors(self, doc: Any) -> tuple[list[list[float]], int | None]:
        return [e["values"] for e in doc["embeddings"]], None
