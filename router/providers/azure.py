"""Azure OpenAI: OpenAI's wire format behind per-deployment URLs and an ``api-version``.

URL shape: ``{baseUrl}/openai/deployments/{upstreamModel}/{chat/completions|completions|embeddings}
?api-version={apiVersion}``; ``apiVersion`` is required.

The Responses API (spoken natively from api-version 2025-03-01-preview, ``v1`` or ``preview``;
older deployments get it translated to chat) has no deployment in its path: the deployment name goes in the
body's ``model``. With a dated ``apiVersion`` (``2025-04-01-preview``) the URL is
``{baseUrl}/openai/responses?api-version={apiVersion}``; with ``apiVersion: v1`` (or ``preview``,
sent as ``?api-version=preview``) it is Azure's OpenAI-compatible v1 surface,
``{baseUrl}/openai/v1/responses``.

Credentials: the resolved credential goes in the ``api-key`` header. A Microsoft Entra ID
access token is sent as ``Authorization: Bearer <token>`` instead when the credential is
written ``entra:<token>`` (interim convention until the config has an auth-type field), or
when the deployment's own ``headers`` already carry ``Authorization``/``api-key``.

Azure's content filters answer either a 400 with ``code: content_filter`` (prompt blocked) or
a 200 whose ``finish_reason`` is ``content_filter`` (completion blocked); both become
:class:`ContentFilterError`. Mid-stream, the filtered chunk ends the stream with an error event.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from .._errors import (
    ContentFilterError,
    ContextLengthExceededError,
    InvalidRequestError,
    KubellmError,
    RateLimitError,
    UpstreamStatusError,
)
from .._sse import SSEEvent
from ._base import (
    Operation,
    Payload,
    ProviderResponse,
    RequestContext,
    StreamTranslator,
    UpstreamClient,
    UpstreamResponse,
    extract_error_message,
    map_status_error,
)
from ._content_safety import analyze_request, moderate, moderation_texts
from ._openai_audio import AUDIO, AUDIO_PATHS, AudioRelay
from ._openai_responses import ResponsesPassthroughTranslator
from ._openai_shaped import OpenAIPassthroughTranslator, OpenAIShapedProvider

if TYPE_CHECKING:
    from ..config._schema import DeploymentConfig

#: A credential written ``entra:<token>`` is a Microsoft Entra ID bearer token, not an API key.
ENTRA_PREFIX = "entra:"
#: The first API version whose chat completions accept ``stream_options`` (GA from 2024-10-21).
STREAM_USAGE_SINCE = "2024-09-01"

_PATHS = {
    Operation.CHAT: "/chat/completions",
    Operation.COMPLETION: "/completions",
    Operation.EMBEDDING: "/embeddings",
    Operation.IMAGE: "/images/generations",
    Operation.IMAGE_EDIT: "/images/edits",
    **AUDIO_PATHS,
}
_DATED = re.compile(r"^\d{4}-\d{2}-\d{2}")


def api_version_supports_stream_usage(version: str) -> bool:
    """Dated versions before 2024-09-01 reject ``stream_options``; undated ones (``preview``) accept it."""
    match = _DATED.match(version)
    return match is None or match.group(0) >= STREAM_USAGE_SINCE


def azure_filter_categories(results: Any) -> str:
    """``hate: high, violence: medium`` from a ``content_filter_results`` object."""
    if not isinstance(results, dict):
        return ""
    hits = []
    for category, verdict in results.items():
        if isinstance(verdict, dict) and verdict.get("filtered"):
            severity = verdict.get("severity")
            hits.append(f"{category}: {severity}" if isinstance(severity, str) else str(category))
    return ", ".join(sorted(hits))


def _filtered_error(results: Any, what: str) -> ContentFilterError:
    categories = azure_filter_categories(results)
    detail = f" ({categories})" if categories else ""
    return ContentFilterError(f"azure: the {what} was blocked by Azure OpenAI's content filter{detail}")


def _filtered_choice(choices: Any) -> dict[str, Any] | None:
    """The first choice Azure's content filter cut off, if every choice was."""
    if not isinstance(choices, list) or not choices:
        return None
    filtered = [c for c in choices if isinstance(c, dict) and c.get("finish_reason") == "content_filter"]
    return filtered[0] if filtered and len(filtered) == len(choices) else None


class AzureStreamTranslator(OpenAIPassthroughTranslator):
    """OpenAI passthrough that drops Azure's prompt-filter preamble and fails on a filtered finish."""

    def __init__(self, include_usage: bool) -> None:
        super().__init__(include_usage, "azure")
        self._emitted = False
        self._stopped = False

    def feed(self, data: bytes) -> list[Payload]:
        return self._emit(self._decoder.feed(data))

    def flush(self) -> list[Payload]:
        return self._emit(self._decoder.close())

    def _emit(self, events: list[SSEEvent]) -> list[Payload]:
        kept: list[Any] = []
        for event in events:
            if self._stopped:
                break
            data = event.data
            if b'"content_filter"' in data and b'"finish_reason"' in data:
                chunk = orjson.loads(data)
                choice = _filtered_choice(chunk.get("choices") if isinstance(chunk, dict) else None)
                if choice is not None:
                    self._stopped = True
                    self.error = _filtered_error(choice.get("content_filter_results"), "completion")
                    break
            if b'"prompt_filter_results"' in data and b'"choices":[]' in data and b'"usage"' not in data:
                continue  # Azure's prompt_filter_results preamble: no OpenAI client expects it
            kept.append(event)
        out = self.forward(kept)
        if self.error is not None and not self._emitted and not out:
            # Nothing reached the client yet: fail the request instead of opening a stream.
            raise self.error
        self._emitted = self._emitted or bool(out)
        return out


#: The first api-version of Azure's Responses API (a preview); older deployments get it as chat.
RESPONSES_SINCE = "2025-03-01-preview"


def api_version_has_responses(version: str | None) -> bool:
    """Whether an ``apiVersion`` reaches Azure's Responses API (v1, preview, or dated from 2025-03-01)."""
    if version in ("v1", "preview"):
        return True
    return version is not None and _DATED.match(version) is not None and version >= RESPONSES_SINCE


def _responses_url(base: str, version: str) -> str:
    if version == "v1":
        return f"{base}/openai/v1/responses"
    if version == "preview":
        return f"{base}/openai/v1/responses?api-version=preview"
    return f"{base}/openai/responses?api-version={quote(version, safe='')}"


class AzureOpenAIProvider(OpenAIShapedProvider):
    name = "azure"
    #: Moderations go to Azure AI Content Safety (see _content_safety); images to the deployment.
    operations = (
        OpenAIShapedProvider.operations
        | {Operation.RESPONSES, Operation.IMAGE, Operation.IMAGE_EDIT, Operation.MODERATION}
        | AUDIO
    )

    def speaks(self, operation: Operation, deployment: DeploymentConfig) -> bool:
        if operation is Operation.RESPONSES:
            return api_version_has_responses(deployment.api_version)
        return super().speaks(operation, deployment)

    default_api_key_env = "AZURE_OPENAI_API_KEY"
    required_fields = ("baseUrl", "apiVersion")

    def _api_version(self, ctx: RequestContext) -> str:
        version = ctx.deployment.api_version
        if not version:
            raise InvalidRequestError(
                f"deployment {ctx.deployment.name!r} uses provider 'azure' but sets no apiVersion "
                "(for example apiVersion: 2024-10-21)",
                param="apiVersion",
                code="missing_api_version",
            )
        return version

    def url(self, ctx: RequestContext) -> str:
        version = self._api_version(ctx)
        base = self.base_url(ctx).removesuffix("/openai")
        if ctx.operation is Operation.RESPONSES:
            return _responses_url(base, version)
        deployment = quote(ctx.upstream_model, safe="")
        path = _PATHS[ctx.operation]
        return f"{base}/openai/deployments/{deployment}{path}?api-version={quote(version, safe='')}"

    def auth_headers(self, ctx: RequestContext) -> dict[str, str]:
        key = ctx.api_key
        header = "Ocp-Apim-Subscription-Key" if ctx.operation is Operation.MODERATION else "api-key"
        given = ("authorization", "api-key", "ocp-apim-subscription-key")
        if not key or any(h.lower() in given for h in ctx.deployment.headers):
            return {}
        if key.startswith(ENTRA_PREFIX):
            return {"Authorization": f"Bearer {key[len(ENTRA_PREFIX) :]}"}
        return {header: key}

    async def send(
        self, client: UpstreamClient, body: dict[str, Any], ctx: RequestContext
    ) -> UpstreamResponse:
        if ctx.operation is not Operation.MODERATION:
            return await super().send(client, body, ctx)
        base = self.base_url(ctx).removesuffix("/openai")
        version, auth = self._api_version(ctx), self.auth_headers(ctx)
        requests = [analyze_request(t, ctx, base, version, auth) for t in moderation_texts(body)]
        return await moderate(client, body, ctx, requests)

    def prepare_body(self, body: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        body = dict(body)  # the router reuses the client's body across attempts
        if ctx.operation is Operation.RESPONSES:
            return {**body, "model": ctx.upstream_model}  # the deployment's name
        if ctx.stream and not api_version_supports_stream_usage(self._api_version(ctx)):
            if ctx.include_usage and not ctx.deployment.drop_unsupported_params:
                raise InvalidRequestError(
                    f"provider 'azure' does not support the parameter 'stream_options' with api-version "
                    f"{ctx.deployment.api_version} (stream usage needs {STREAM_USAGE_SINCE} or later; or set "
                    f"dropUnsupportedParams on deployment {ctx.deployment.name!r} to drop it)",
                    param="stream_options",
                    code="unsupported_parameter",
                )
            body.pop("stream_options", None)
            body["model"] = ctx.upstream_model
            return body
        return super().prepare_body(body, ctx)

    def parse_response(self, raw: bytes, ctx: RequestContext) -> ProviderResponse:
        parsed = super().parse_response(raw, ctx)
        if ctx.operation in AUDIO:
            return parsed
        if b'"content_filter"' in raw:
            choice = _filtered_choice(orjson.loads(raw).get("choices"))
            if choice is not None:
                raise _filtered_error(choice.get("content_filter_results"), "completion")
        return parsed

    def stream_translator(self, ctx: RequestContext) -> StreamTranslator:
        if ctx.operation in AUDIO:
            return AudioRelay()
        if ctx.operation is Operation.RESPONSES:
            return ResponsesPassthroughTranslator(self.name)
        return AzureStreamTranslator(ctx.include_usage)

    def map_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> KubellmError:
        message, code = extract_error_message(raw)
        error = _error_object(raw)
        inner = error.get("innererror")
        inner = inner if isinstance(inner, dict) else {}
        if code == "content_filter" or inner.get("code") == "ResponsibleAIPolicyViolation":
            return _filtered_error(
                inner.get("content_filter_result") or inner.get("content_filter_results"), "prompt"
            )
        if code == "context_length_exceeded":
            return ContextLengthExceededError(f"azure: {message}", param="messages")
        if status == 429:
            retry_after = headers.get("Retry-After") or headers.get("retry-after")
            if retry_after is None:
                millis = headers.get("retry-after-ms")
                if millis is not None and millis.replace(".", "", 1).isdigit():
                    retry_after = str(max(1, math.ceil(float(millis) / 1000)))
            extra = {"Retry-After": retry_after} if retry_after else None
            return RateLimitError(f"azure: {message}", headers=extra)
        if status == 404 and code == "DeploymentNotFound":
            err = UpstreamStatusError(f"azure: {message}", status=404, code=code)
            err.retryable = True  # this deployment is misconfigured; another may serve the request
            return err
        return map_status_error(status, headers, (message, code), provider=self.name)


def _error_object(raw: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    err = doc.get("error", doc) if isinstance(doc, dict) else None
    return err if isinstance(err, dict) else {}
