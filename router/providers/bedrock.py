"""Amazon Bedrock: chat through Converse / ConverseStream, embeddings through InvokeModel.

``POST https://bedrock-runtime.{region}.amazonaws.com/model/{modelId}/converse`` (or
``/converse-stream``, answered in AWS event-stream framing), SigV4-signed for the
``bedrock`` service by botocore's signer over the exact bytes sent. The request
URL is signed in the form aiohttp puts on the wire (yarl normalizes ``%3A`` in
an ARN model id to ``:``), so inference-profile and provisioned-model ARNs work.

Anthropic models also speak Anthropic's Messages API natively, through InvokeModel
(:mod:`._bedrock_anthropic`): ``/v1/messages`` requests pass through untranslated.

Credentials, in order:

* the deployment's credential (``apiKeyEnv``/``apiKeyFile``/``apiKey``, e.g. a Secret) holding
  ``ACCESS_KEY_ID:SECRET_ACCESS_KEY`` or ``ACCESS_KEY_ID:SECRET_ACCESS_KEY:SESSION_TOKEN``, or JSON
  ``{"accessKeyId", "secretAccessKey", "sessionToken"}`` (the ``aws_access_key_id`` / STS
  ``AccessKeyId`` spellings work too), or a Bedrock API key (``ABSK...``, sent as a bearer token);
* otherwise botocore's standard chain: environment, shared config and credentials files,
  web identity (IRSA / EKS Pod Identity), container and instance metadata; refreshed by botocore.

``region`` falls back to ``AWS_REGION`` / ``AWS_DEFAULT_REGION``. Embeddings: Amazon Titan text
embeddings (one input per InvokeModel call, sent concurrently) and Cohere embed (96 inputs a call,
``input_type`` from the request, default ``search_document``).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from .. import _redact as redact
from .._errors import InvalidRequestError, KubellmError, UpstreamProtocolError
from ._anthropic_native import parse_count, parse_native
from ._base import (
    Operation,
    Provider,
    ProviderResponse,
    RequestContext,
    StreamTranslator,
    UpstreamClient,
    UpstreamRequest,
    UpstreamResponse,
    missing_extra,
)
from ._bedrock_anthropic import BedrockMessagesStream, count_body, invoke_body, is_anthropic_model
from ._bedrock_converse import (
    ConverseStreamTranslator,
    bedrock_error,
    converse_response_to_openai,
    openai_to_converse_request,
)
from ._embeddings import LocalResponse, embedding_inputs, estimate_tokens, openai_embedding_response, pack
from ._surface import bedrock_reader, bedrock_rerank_body, finish_rerank, parse_surface

if TYPE_CHECKING:
    from ..config._schema import DeploymentConfig

COHERE_BATCH = 96
_API_KEY_PREFIXES = ("ABSK", "bedrock-api-key-")


@dataclass(frozen=True, slots=True)
class StaticCredentials:
    access_key: str
    secret_key: str
    token: str | None = None


def parse_aws_credential(text: str) -> StaticCredentials | str:
    """Keys from the deployment's credential, or a Bedrock API key (returned as the bare string)."""
    text = text.strip()
    if text.startswith(_API_KEY_PREFIXES):
        return text
    if text.startswith("{"):
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict):

            def pick(*names: str) -> str | None:
                for name in names:
                    if isinstance(doc.get(name), str) and doc[name]:
                        return str(doc[name])
                return None

            key = pick("accessKeyId", "AccessKeyId", "aws_access_key_id")
            secret = pick("secretAccessKey", "SecretAccessKey", "aws_secret_access_key")
            if key and secret:
                return StaticCredentials(
                    key, secret, pick("sessionToken", "SessionToken", "aws_session_token")
                )
    else:
        parts = text.split(":", 2)
        if len(parts) >= 2 and parts[0] and parts[1]:
            return StaticCredentials(parts[0], parts[1], parts[2] if len(parts) == 3 and parts[2] else None)
    raise InvalidRequestError(
        "bedrock: the deployment's credential is neither ACCESS_KEY_ID:SECRET_ACCESS_KEY[:SESSION_TOKEN], "
        "the same as JSON, nor a Bedrock API key",
        code="invalid_credential",
    )


class _DefaultChain:
    """botocore's credential chain, resolved once per process; botocore refreshes what expires."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._source: Any = None
        #: The credentials last handed out (botocore refreshes them behind ``_source``).
        self.last: Any = None

    def get(self) -> Any:
        with self._lock:
            if self._source is None:
                import botocore.session  # type: ignore[import-untyped]

                self._source = botocore.session.Session().get_credentials()
            if self._source is None:
                raise InvalidRequestError(
                    "bedrock: no AWS credentials: set the deployment's credential or configure the standard "
                    "AWS chain (environment, profile, web identity, instance role)",
                    code="missing_credential",
                )
            frozen = self._source.get_frozen_credentials()
            if frozen is not self.last:
                self.last = frozen
                redact.remember([frozen.access_key, frozen.secret_key, frozen.token])
            return frozen


class BedrockProvider(Provider):
    name = "bedrock"
    #: Rerank: Cohere's and Amazon's rerankers through InvokeModel (see _surface).
    operations = frozenset({Operation.CHAT, Operation.EMBEDDING, Operation.RERANK})

    def __init__(self) -> None:
        self._chain = _DefaultChain()

    def speaks(self, operation: Operation, deployment: DeploymentConfig) -> bool:
        """Anthropic's models speak Messages natively (InvokeModel); every model speaks chat."""
        if operation is Operation.MESSAGES:
            return is_anthropic_model(deployment.upstream_model or deployment.model)
        return operation in self.operations

    def check_deployment(self, deployment: DeploymentConfig, credential: str | None = None) -> str | None:
        """SigV4 signing and the AWS credential chain need botocore; a Bedrock API key does not."""
        problem = super().check_deployment(deployment, credential)
        if problem:
            return problem
        text = credential if credential is not None else deployment.api_key
        if text is None and (deployment.api_key_env or deployment.api_key_file):
            return None  # read only where the router runs, which checks again with it
        if text is not None and text.strip().startswith(_API_KEY_PREFIXES):
            return None
        return missing_extra(self.name, "bedrock", "botocore.auth", "botocore.awsrequest", "botocore.session")

    def credentials(self, deployment: DeploymentConfig, api_key: str | None) -> list[str]:
        """The access key id, secret key and session token rather than the JSON they came in, whose
        field names are no secret; the default chain's keys are registered when it resolves them."""
        found = super().credentials(deployment, None)
        if not api_key:
            return found
        try:
            parsed = parse_aws_credential(api_key)
        except InvalidRequestError:
            return [*found, api_key]
        if isinstance(parsed, str):
            return [*found, parsed]
        return [*found, parsed.access_key, parsed.secret_key, *([parsed.token] if parsed.token else [])]

    def region(self, ctx: RequestContext) -> str:
        region = ctx.deployment.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not region:
            raise InvalidRequestError(
                f"bedrock: deployment {ctx.deployment.name!r} has no region", param="region"
            )
        return region

    def base_url(self, ctx: RequestContext) -> str:
        if ctx.deployment.base_url:
            return ctx.deployment.base_url.rstrip("/")
        return f"https://bedrock-runtime.{self.region(ctx)}.amazonaws.com"

    def url(self, ctx: RequestContext, operation: str) -> str:
        return f"{self.base_url(ctx)}/model/{quote(ctx.upstream_model, safe='')}/{operation}"

    def signed(self, ctx: RequestContext, url: str, payload: bytes, accept: str) -> UpstreamRequest:
        """A request signed over exactly the URL, headers and body bytes that will be sent."""
        import yarl

        url = str(yarl.URL(url))  # what aiohttp will put on the wire
        headers = {"Content-Type": "application/json", "Accept": accept, **ctx.deployment.headers}
        credential = parse_aws_credential(ctx.api_key) if ctx.api_key else self._chain.get()
        if isinstance(credential, str):
            return UpstreamRequest("POST", url, {**headers, "Authorization": f"Bearer {credential}"}, payload)
        from botocore.auth import SigV4Auth  # type: ignore[import-untyped]
        from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]

        request = AWSRequest(method="POST", url=url, data=payload, headers=headers)
        SigV4Auth(credential, "bedrock", self.region(ctx)).add_auth(request)
        return UpstreamRequest("POST", url, dict(request.headers.items()), payload)

    def build_request(self, body: dict[str, Any], ctx: RequestContext) -> UpstreamRequest:
        if ctx.operation is Operation.EMBEDDING:
            return self.embedding_requests(body, ctx)[0]
        if ctx.operation is Operation.MESSAGES:
            payload = orjson.dumps(invoke_body(body, ctx))
            if ctx.stream:
                url = self.url(ctx, "invoke-with-response-stream")
                return self.signed(ctx, url, payload, "application/vnd.amazon.eventstream")
            return self.signed(ctx, self.url(ctx, "invoke"), payload, "application/json")
        if ctx.operation is Operation.RERANK:
            payload = orjson.dumps(bedrock_rerank_body(body, ctx.upstream_model))
            return self.signed(ctx, self.url(ctx, "invoke"), payload, "application/json")
        if ctx.operation is not Operation.CHAT:
            raise InvalidRequestError("bedrock serves chat, embeddings, rerank and Anthropic messages only")
        payload = orjson.dumps(openai_to_converse_request(body, ctx, self.name))
        if ctx.stream:
            return self.signed(
                ctx, self.url(ctx, "converse-stream"), payload, "application/vnd.amazon.eventstream"
            )
        return self.signed(ctx, self.url(ctx, "converse"), payload, "application/json")

    # ---------------------------------------------------------- embeddings

    def _embedding_kind(self, ctx: RequestContext) -> str:
        model = ctx.upstream_model
        if "cohere.embed" in model:
            return "cohere"
        if "titan-embed" in model or "nova" in model:
            return "titan"
        raise InvalidRequestError(
            f"bedrock: embeddings support Amazon Titan and Cohere embed models, not {model!r}", param="model"
        )

    def embedding_requests(self, body: dict[str, Any], ctx: RequestContext) -> list[UpstreamRequest]:
        texts = embedding_inputs(body, self.name)
        dims = body.get("dimensions")
        if self._embedding_kind(ctx) == "titan":
            payloads: list[dict[str, Any]] = [
                {"inputText": t, **({"dimensions": dims} if dims is not None else {})} for t in texts
            ]
        else:
            extra: dict[str, Any] = {"input_type": body.get("input_type") or "search_document"}
            if dims is not None:
                extra["output_dimension"] = dims
            if isinstance(body.get("truncate"), str):
                extra["truncate"] = body["truncate"]
            payloads = [
                {"texts": texts[i : i + COHERE_BATCH], **extra} for i in range(0, len(texts), COHERE_BATCH)
            ]
        url = self.url(ctx, "invoke")
        return [self.signed(ctx, url, orjson.dumps(p), "application/json") for p in payloads]

    async def send(
        self, client: UpstreamClient, body: dict[str, Any], ctx: RequestContext
    ) -> UpstreamResponse:
        if ctx.operation is Operation.RERANK:
            request = self.build_request(body, ctx)
            return await finish_rerank(client, request, body, ctx, self.name, bedrock_reader(body))
        if ctx.operation is not Operation.EMBEDDING:
            return await client.send(self.build_request(body, ctx), ctx)
        kind = self._embedding_kind(ctx)

        async def call(request: UpstreamRequest) -> tuple[UpstreamResponse, bytes]:
            resp = await client.send(request, ctx)
            return resp, await resp.read()

        answers = await asyncio.gather(*(call(r) for r in self.embedding_requests(body, ctx)))
        vectors: list[list[float]] = []
        tokens: int | None = 0
        for resp, raw in answers:
            if resp.status >= 400:
                return LocalResponse(resp.status, resp.headers, raw)
            try:
                doc = orjson.loads(raw)
                if kind == "titan":
                    vectors.append(doc["embedding"])
                    counted = doc.get("inputTextTokenCount")
                else:
                    found = doc["embeddings"]
                    vectors.extend(found["float"] if isinstance(found, dict) else found)
                    counted = None
            except (orjson.JSONDecodeError, KeyError, TypeError):
                raise UpstreamProtocolError(
                    "bedrock: the embedding answer is not in the documented shape"
                ) from None
            header = resp.headers.get("X-Amzn-Bedrock-Input-Token-Count")
            counted = (
                counted if counted is not None else (int(header) if header and header.isdigit() else None)
            )
            tokens = None if tokens is None or counted is None else tokens + int(counted)
        if tokens is None:
            return pack(
                vectors, estimate_tokens(embedding_inputs(body, self.name)), estimated=True, body=body
            )
        return pack(vectors, tokens, estimated=False, body=body)

    # ------------------------------------------------------------ answers

    async def count_tokens(
        self, client: UpstreamClient, body: dict[str, Any], ctx: RequestContext
    ) -> int | None:
        """Bedrock's CountTokens, for Anthropic models."""
        if not is_anthropic_model(ctx.upstream_model):
            return None
        payload = orjson.dumps(count_body(body, ctx))
        resp = await client.send(
            self.signed(ctx, self.url(ctx, "count-tokens"), payload, "application/json"), ctx
        )
        raw = await resp.read()
        if resp.status >= 400:
            raise self.map_error(resp.status, resp.headers, raw)
        return parse_count(raw, self.name, "inputTokens")

    def parse_response(self, raw: bytes, ctx: RequestContext) -> ProviderResponse:
        if ctx.operation is Operation.MESSAGES:
            return parse_native(raw, self.name)
        if ctx.operation is Operation.EMBEDDING:
            return openai_embedding_response(raw, ctx)
        if ctx.operation is Operation.RERANK:
            return parse_surface(raw, ctx, self.name)
        return converse_response_to_openai(raw, ctx, self.name)

    def stream_translator(self, ctx: RequestContext) -> StreamTranslator:
        if ctx.operation is Operation.MESSAGES:
            return BedrockMessagesStream()
        return ConverseStreamTranslator(ctx, self.name)

    def map_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> KubellmError:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            doc = {}
        message = doc.get("message") or doc.get("Message") or raw[:300].decode("utf-8", "replace").strip()
        kind = headers.get("x-amzn-ErrorType") or str(doc.get("__type") or "").rsplit("#", 1)[-1]
        return bedrock_error(status, kind, str(message or "upstream error"), headers, self.name)
