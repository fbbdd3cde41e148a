"""Gemini on Google Cloud Vertex AI.

Chat: ``projects/{project}/locations/{location}/publishers/google/models/{model}:generateContent``
(and ``:streamGenerateContent?alt=sse``); embeddings: the same path with ``:predict``
(``text-embedding-*`` / ``gemini-embedding-*`` models, which report token counts).

Credentials: the deployment's credential (``apiKeyFile`` pointing at the key file
is the usual choice) is a service-account key JSON; without one, the file named
by ``GOOGLE_APPLICATION_CREDENTIALS`` is used. Access tokens come from the
JWT-bearer flow in :mod:`._google_auth` and are cached per service account.
``project`` defaults to the key's ``project_id`` (then ``GOOGLE_CLOUD_PROJECT``),
``location`` to ``GOOGLE_CLOUD_LOCATION`` or ``us-central1``; ``upstreamModel`` may
also be a full ``projects/.../endpoints/...`` resource name.

Claude models (``upstreamModel: claude-…``) speak Anthropic's Messages API natively through
rawPredict (:mod:`._vertex_anthropic`): ``/v1/messages`` requests pass through untranslated, and
``/v1/messages/count_tokens`` is counted by Vertex AI. Chat requests to them are translated as for
the anthropic provider and sent through rawPredict too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from .._errors import AuthenticationError, InvalidRequestError, KubellmError
from . import _vertex_anthropic as claude
from ._anthropic_native import (
    SSEMessagesStream,
    anthropic_error_to_kubellm,
    parse_count,
    parse_native,
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
    missing_extra,
)
from ._google_auth import ServiceAccount, TokenCache, load_service_account, service_account_secrets
from .gemini import GoogleGenAIProvider

if TYPE_CHECKING:
    from ..config._schema import DeploymentConfig


class VertexProvider(GoogleGenAIProvider):
    name = "vertex"

    def __init__(self) -> None:
        self.tokens = TokenCache()

    def speaks(self, operation: Operation, deployment: DeploymentConfig) -> bool:
        """Claude models speak Messages natively (rawPredict)."""
        if operation is Operation.MESSAGES:
            return claude.is_claude(deployment.upstream_model or deployment.model)
        return operation in self.operations

    def check_deployment(self, deployment: DeploymentConfig, credential: str | None = None) -> str | None:
        """Service-account tokens are signed JWTs: without cryptography no request could be made."""
        return super().check_deployment(deployment, credential) or missing_extra(
            self.name,
            "vertex",
            "cryptography.hazmat.primitives.serialization",
            "cryptography.hazmat.primitives.asymmetric.padding",
        )

    def credentials(self, deployment: DeploymentConfig, api_key: str | None) -> list[str]:
        """The key's secret fields; the access tokens are registered as :class:`TokenCache` gets them."""
        found = super().credentials(deployment, None)
        return [*found, *service_account_secrets(api_key)] if api_key else found

    def account(self, ctx: RequestContext) -> ServiceAccount:
        credential = ctx.api_key
        if credential is None:
            path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
            if not path:
                raise InvalidRequestError(
                    f"vertex: deployment {ctx.deployment.name!r} has no credential: set apiKeyFile to a "
                    "service-account key file, or GOOGLE_APPLICATION_CREDENTIALS",
                    code="missing_credential",
                )
            try:
                credential = Path(path).read_text()
            except OSError as exc:
                raise InvalidRequestError(
                    f"vertex: cannot read GOOGLE_APPLICATION_CREDENTIALS: {exc.strerror}",
                    code="missing_credential",
                ) from None
        return load_service_account(credential, self.name)

    def _location(self, ctx: RequestContext) -> str:
        return ctx.deployment.location or os.environ.get("GOOGLE_CLOUD_LOCATION") or "us-central1"

    def _project(self, ctx: RequestContext) -> str:
        project = (
            ctx.deployment.project or self.account(ctx).project_id or os.environ.get("GOOGLE_CLOUD_PROJECT")
        )
        if not project:
            raise InvalidRequestError(
                f"vertex: deployment {ctx.deployment.name!r} has no project", param="project"
            )
        return project

    def base_url(self, ctx: RequestContext) -> str:
        if ctx.deployment.base_url:
            return ctx.deployment.base_url.rstrip("/")
        location = self._location(ctx)
        host = (
            "aiplatform.googleapis.com" if location == "global" else f"{location}-aiplatform.googleapis.com"
        )
        return f"https://{host}/v1"

    def model_url(self, ctx: RequestContext, method: str) -> str:
        model = ctx.upstream_model
        if not model.startswith("projects/"):
            parent = f"projects/{self._project(ctx)}/locations/{self._location(ctx)}"
            model = (
                f"{parent}/{model}"
                if model.startswith("publishers/")
                else f"{parent}/publishers/google/models/{model}"
            )
        return f"{self.base_url(ctx)}/{model}:{method}"

    def anthropic_url(self, ctx: RequestContext, model: str, method: str) -> str:
        if ctx.upstream_model.startswith("projects/") and model != "count-tokens":
            return f"{self.base_url(ctx)}/{ctx.upstream_model}:{method}"
        parent = f"projects/{self._project(ctx)}/locations/{self._location(ctx)}"
        return f"{self.base_url(ctx)}/{parent}/publishers/anthropic/models/{model}:{method}"

    def make_request(
        self, body: dict[str, Any], ctx: RequestContext, auth: dict[str, str]
    ) -> UpstreamRequest:
        if ctx.operation is Operation.MESSAGES:
            payload = orjson.dumps(claude.messages_body(body, ctx))
        elif ctx.operation is Operation.CHAT and claude.is_claude(ctx.upstream_model):
            payload = orjson.dumps(claude.chat_body(body, ctx))
        else:
            return super().make_request(body, ctx, auth)
        method = "streamRawPredict" if ctx.stream else "rawPredict"
        url = self.anthropic_url(ctx, claude.model_name(ctx), method)
        return UpstreamRequest("POST", url, claude.headers(ctx, auth), payload)

    async def count_tokens(
        self, client: UpstreamClient, body: dict[str, Any], ctx: RequestContext
    ) -> int | None:
        """Vertex AI's count-tokens:rawPredict, for Claude models."""
        if not claude.is_claude(ctx.upstream_model):
            return None
        token = await self.tokens.get(client, self.account(ctx), ctx, self.name)
        url = self.anthropic_url(ctx, "count-tokens", "rawPredict")
        payload = orjson.dumps(claude.count_body(body, ctx))
        request = UpstreamRequest(
            "POST", url, claude.headers(ctx, {"Authorization": f"Bearer {token}"}), payload
        )
        resp = await client.send(request, ctx)
        raw = await resp.read()
        if resp.status >= 400:
            raise self.map_error(resp.status, resp.headers, raw)
        return parse_count(raw, self.name)

    def parse_response(self, raw: bytes, ctx: RequestContext) -> ProviderResponse:
        if ctx.operation is Operation.MESSAGES:
            return parse_native(raw, self.name)
        if ctx.operation is Operation.CHAT and claude.is_claude(ctx.upstream_model):
            return claude.CHAT.parse_response(raw, ctx)
        return super().parse_response(raw, ctx)

    def stream_translator(self, ctx: RequestContext) -> StreamTranslator:
        if ctx.operation is Operation.MESSAGES:
            return SSEMessagesStream(self.name)
        if ctx.operation is Operation.CHAT and claude.is_claude(ctx.upstream_model):
            return claude.CHAT.stream_translator(ctx)
        return super().stream_translator(ctx)

    def map_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> KubellmError:
        """Claude's errors come in Anthropic's shape; Vertex AI's own (auth, quota) in Google's."""
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict) and doc.get("type") == "error":
            message, kind = extract_error_message(raw)
            return anthropic_error_to_kubellm(status, headers, message, kind)
        return super().map_error(status, headers, raw)

    def auth_headers(self, ctx: RequestContext) -> dict[str, str]:
        """Headers with the cached token; :meth:`send` fetches one first when there is none."""
        token = self.tokens.peek(self.account(ctx))
        if token is None:
            raise AuthenticationError(
                "vertex: no access token was fetched for this request", code="no_access_token"
            )
        return {"Authorization": f"Bearer {token}"}

    async def send(
        self, client: UpstreamClient, body: dict[str, Any], ctx: RequestContext
    ) -> UpstreamResponse:
        token = await self.tokens.get(client, self.account(ctx), ctx, self.name)
        request = self.make_request(body, ctx, {"Authorization": f"Bearer {token}"})
        return await self.send_request(client, request, body, ctx)

    def embedding_request(
        self, texts: list[str], body: dict[str, Any], ctx: RequestContext
    ) -> tuple[str, Any]:
        task = {"task_type": body["task_type"]} if isinstance(body.get("task_type"), str) else {}
        payload: dict[str, Any] = {"instances": [{"content": t, **task} for t in texts]}
        if body.get("dimensions") is not None:
            payload["parameters"] = {"outputDimensionality": body["dimensions"]}
        return self.model_url(ctx, "predict"), payload

    def embedding_vectors(self, doc: Any) -> tuple[list[list[float]], int | None]:
        vectors: list[list[float]] = []
        tokens = 0
        for prediction in doc["predictions"]:
            embedding = prediction["embeddings"]
            vectors.append(embedding["values"])
            tokens += int((embedding.get("statistics") or {}).get("token_count") or 0)
        return vectors, tokens
