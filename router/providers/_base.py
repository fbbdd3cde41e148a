"""The provider interface.

A provider is a translator, not a client. Its narrow core:

* :meth:`Provider.build_request` turns an OpenAI-shaped request into one upstream HTTP request;
* :meth:`Provider.parse_response` turns the upstream body into OpenAI-shaped JSON bytes and usage;
* :meth:`Provider.stream_translator` returns a per-request :class:`StreamTranslator` that turns
  upstream stream bytes into OpenAI chunk payloads (never SSE text: ``_sse`` frames them);
* :meth:`Provider.map_error` turns an upstream error response into a :class:`KubellmError`.

Optional capabilities live beside it: a provider whose call takes several HTTP
round trips (Replicate) or never leaves the process (mock) overrides :meth:`Provider.send`.
"""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic.alias_generators import to_snake

from .._errors import (
    AuthenticationError,
    ContentFilterError,
    ContextLengthExceededError,
    InvalidRequestError,
    KubellmError,
    PermissionDeniedError,
    RateLimitError,
    UpstreamStatusError,
    UpstreamStreamTruncatedError,
)
from .._sse import Event as Event
from .._sse import Payload as Payload

if TYPE_CHECKING:
    from ..config._schema import DeploymentConfig, Timeouts


class Operation(StrEnum):
    """What a client asks for. A provider lists the operations it speaks natively in
    :attr:`Provider.operations`; :data:`TRANSLATED` ones reach the others as chat requests."""

    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    #: Anthropic's Messages API.
    MESSAGES = "messages"
    #: OpenAI's Responses API.
    RESPONSES = "responses"
    #: ``/v1/images/generations`` (JSON) and ``/v1/images/edits`` (multipart), see :mod:`..inbound.surface`.
    IMAGE = "image"
    IMAGE_EDIT = "image_edit"
    #: ``/v1/moderations``.
    MODERATION = "moderation"
    #: ``/v1/rerank``, in Cohere's (and Jina's) shape.
    RERANK = "rerank"
    #: OpenAI's audio API: text to speech (a binary answer, relayed as it arrives).
    AUDIO_SPEECH = "audio_speech"
    #: OpenAI's audio API: speech to text, uploaded as multipart.
    AUDIO_TRANSCRIPTION = "audio_transcription"
    AUDIO_TRANSLATION = "audio_translation"
    #: OpenAI's files and batches APIs: served beside the dispatcher (see router/files), named
    #: here for the upstream calls they make.
    FILES = "files"
    BATCHES = "batches"


#: Operations a deployment that does not speak them natively serves through a chat request.
TRANSLATED = frozenset({Operation.MESSAGES, Operation.RESPONSES})
#: Operations whose answers the response cache does not keep (binary audio, uploads).
UNCACHED = frozenset({Operation.AUDIO_SPEECH, Operation.AUDIO_TRANSCRIPTION, Operation.AUDIO_TRANSLATION})


#: The largest token count one request may report; larger counts are clamped to it.
MAX_TOKENS = 2**31 - 1


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Prompt tokens read from the provider's prompt cache (part of ``prompt_tokens``).
    cached_tokens: int = 0
    estimated: bool = False
    #: Prompt tokens written to the provider's prompt cache (part of ``prompt_tokens`` too):
    #: Anthropic bills them above the input price.
    cache_write_tokens: int = 0
    #: Images generated (priced per image where the price says so).
    images: int = 0
    #: Rerank search units (Cohere's ``billed_units.search_units``; Bedrock's queries).
    search_units: int = 0
    #: Characters of text turned into speech (priced per character).
    characters: int = 0
    #: Seconds of audio transcribed or translated (priced per second).
    audio_seconds: float = 0.0

    def __post_init__(self) -> None:
        # Counts come from upstreams: negative or absurd ones would corrupt metering (a negative
        # cost refunds a budget; a count past 64 bits jams the ledger's batch forever), so clamp.
        self.prompt_tokens = min(max(self.prompt_tokens, 0), MAX_TOKENS)
        self.completion_tokens = min(max(self.completion_tokens, 0), MAX_TOKENS)
        self.cached_tokens = min(max(self.cached_tokens, 0), self.prompt_tokens)
        uncached = self.prompt_tokens - self.cached_tokens
        self.cache_write_tokens = min(max(self.cache_write_tokens, 0), uncached)
        self.images = min(max(self.images, 0), MAX_TOKENS)
        self.search_units = min(max(self.search_units, 0), MAX_TOKENS)
        self.characters = min(max(self.characters, 0), MAX_TOKENS)
        seconds = self.audio_seconds
        self.audio_seconds = min(max(seconds, 0.0), 1e9) if seconds == seconds else 0.0  # NaN: 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_openai(self) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.cached_tokens or self.cache_write_tokens:
            details = usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
            if self.cache_write_tokens:
                # OpenAI's schema names this field; it is absent unless a cache was written.
                details["cache_write_tokens"] = self.cache_write_tokens
        return usage

    @classmethod
    def from_openai(cls, usage: Any) -> Usage | None:
        if not isinstance(usage, dict):
            return None
        details = usage.get("prompt_tokens_details")
        if not isinstance(details, dict):
            details = {}
        return cls(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            cached_tokens=int(details.get("cached_tokens") or 0),
            cache_write_tokens=int(details.get("cache_write_tokens") or 0),
        )


@dataclass(slots=True)
class RequestContext:
    """What a provider may know about the request it translates."""

    request_id: str
    operation: Operation
    public_model: str
    deployment: DeploymentConfig
    stream: bool = False
    #: The client asked for a final usage chunk (``stream_options.include_usage``).
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    #: The credential resolved for this deployment, if any.
    api_key: str | None = None
    #: Timeouts of this attempt when the request overrides the deployment's.
    timeouts: Timeouts | None = None
    #: The request's deadline across all attempts, on the ``time.monotonic()`` clock.
    deadline: float | None = None
    #: Client request headers a native operation forwards upstream, by lower-case name: only those
    #: the inbound API passes on (``anthropic-beta`` on ``/v1/messages``), never credentials.
    client_headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def upstream_model(self) -> str:
        return self.deployment.upstream_model or self.deployment.model

    @property
    def effective_timeouts(self) -> Timeouts:
        return self.timeouts or self.deployment.timeouts

    @property
    def total_timeout(self) -> float:
        """Seconds this attempt may take in all: its total timeout, cut short by the deadline."""
        total = self.effective_timeouts.total
        if self.deadline is None:
            return total
        return min(total, self.deadline - time.monotonic())


@dataclass(slots=True)
class UpstreamRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None = None


@dataclass(slots=True)
class ProviderResponse:
    body: bytes
    usage: Usage | None = None


class UpstreamResponse(Protocol):
    """A response being received; :mod:`.._upstream` wraps aiohttp's in this shape."""

    status: int
    headers: Mapping[str, str]

    async def read(self) -> bytes: ...

    def iter_chunks(self) -> AsyncIterator[bytes]: ...

    def close(self) -> None: ...


class UpstreamClient(Protocol):
    async def send(self, request: UpstreamRequest, ctx: RequestContext) -> UpstreamResponse: ...


class StreamTranslator(ABC):
    """Per-request state machine from upstream stream bytes to OpenAI chunk payloads.

    Each protocol says how a stream ends (OpenAI's ``data: [DONE]``, Anthropic's
    ``message_stop``...). A translator sets :attr:`complete` when it has seen that end;
    :meth:`finish` turns a body that stopped short of it into :attr:`error`, so a
    connection closed early never reaches the client as a whole answer.
    """

    #: Usage reported by the upstream, known once the stream ends.
    usage: Usage | None = None
    #: Set when the upstream signalled an error inside the stream.
    error: KubellmError | None = None
    #: Set once the upstream sent the last event its protocol defines.
    complete: bool = False
    #: That last event, as the truncation error names it (never spelt "[DONE]": naive clients
    #: look for that string anywhere in the stream).
    terminator: ClassVar[str] = "the final DONE event"

    @abstractmethod
    def feed(self, data: bytes) -> list[Payload]:
        """Consume the next bytes of the upstream body; return chunks ready to send."""

    def flush(self) -> list[Payload]:
        """The upstream body ended; return any chunks still held back (subclasses override this)."""
        return []

    def finish(self) -> list[Payload]:
        """The upstream body ended: the held-back chunks, and :attr:`error` set if it ended early."""
        out = self.flush()
        if self.error is None and not self.complete:
            self.error = UpstreamStreamTruncatedError(
                f"the upstream stream ended before its end event ({self.terminator}): the answer is cut short"
            )
        return out


class Provider(ABC):
    name: ClassVar[str]
    operations: ClassVar[frozenset[Operation]] = frozenset({Operation.CHAT})
    #: Environment variable a `provider/model` quick start reads the credential from.
    default_api_key_env: ClassVar[str | None] = None
    default_base_url: ClassVar[str | None] = None

    @abstractmethod
    def build_request(self, body: dict[str, Any], ctx: RequestContext) -> UpstreamRequest: ...

    @abstractmethod
    def parse_response(self, raw: bytes, ctx: RequestContext) -> ProviderResponse: ...

    @abstractmethod
    def stream_translator(self, ctx: RequestContext) -> StreamTranslator: ...

    def speaks(self, operation: Operation, deployment: DeploymentConfig) -> bool:
        """Whether ``deployment`` serves ``operation`` natively (a provider whose models differ,
        such as Bedrock's Anthropic models, overrides this)."""
        return operation in self.operations

    #: Deployment fields this provider cannot work without, by their config (camelCase) names.
    required_fields: ClassVar[tuple[str, ...]] = ()

    def check_deployment(self, deployment: DeploymentConfig, credential: str | None = None) -> str | None:
        """A problem with a deployment's settings, as ``field: reason``, found when the config loads.

        ``credential`` is the resolved credential where the router loads the config; the operator
        passes none (it sees only an inline ``apiKey``)."""
        for name in self.required_fields:
            if getattr(deployment, to_snake(name)) is None:
                return f"{name}: required by provider {self.name!r}"
        return None

    def credentials(self, deployment: DeploymentConfig, api_key: str | None) -> list[str]:
        """Every secret this deployment's requests carry upstream, for :mod:`.._redact`.

        The resolved credential and the values of the deployment's own headers (a custom
        ``X-Api-Key``, say); providers that derive other secrets from it add those.
        """
        found = [api_key] if api_key else []
        found += [v for k, v in deployment.headers.items() if k.lower() not in _PLAIN_HEADERS]
        return found

    def map_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> KubellmError:
        return map_status_error(status, headers, extract_error_message(raw), provider=self.name)

    async def send(
        self, client: UpstreamClient, body: dict[str, Any], ctx: RequestContext
    ) -> UpstreamResponse:
        """Perform the call. Providers with multi-step protocols override this."""
        return await client.send(self.build_request(body, ctx), ctx)

    async def count_tokens(
        self, client: UpstreamClient, body: dict[str, Any], ctx: RequestContext
    ) -> int | None:
        """The upstream's own count of an Anthropic Messages request's input tokens
        (``POST /v1/messages/count_tokens``), or None when it has no such API: the router then
        estimates. ``ctx.operation`` is :attr:`Operation.MESSAGES`."""
        return None

    def base_url(self, ctx: RequestContext) -> str:
        url = ctx.deployment.base_url or self.default_base_url
        if not url:
            raise InvalidRequestError(f"deployment {ctx.deployment.name!r} has no baseUrl", param="baseUrl")
        return url.rstrip("/")


def missing_extra(provider: str, extra: str, *modules: str) -> str | None:
    """``provider: ...`` naming the extra to install when an optional dependency cannot be
    imported, so that the config is refused when it loads rather than every request failing."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            return (
                f"provider: {provider!r} needs the optional dependency {module.split('.')[0]}, which is "
                f"not installed: pip install 'kubellm[{extra}]'"
            )
    return None


#: Deployment headers whose values are protocol, not secrets (redacting them would garble messages).
_PLAIN_HEADERS = frozenset(
    {"content-type", "accept", "user-agent", "anthropic-version", "anthropic-beta", "api-version"}
)

_CONTEXT_MARKERS = (
    "context_length_exceeded",
    "context length",
    "maximum context",
    "too many tokens",
    "prompt is too long",
    "input is too long",
    "exceeds the context window",
)
_FILTER_MARKERS = ("content_filter", "content management policy", "safety", "content_policy")


def extract_error_message(raw: bytes) -> tuple[str, str | None]:
    """The upstream's own error message and code, from the common JSON error shapes."""
    import orjson

    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw[:500].decode("utf-8", "replace").strip()
        return (text or "upstream returned an error with no body", None)
    err: Any = doc.get("error", doc) if isinstance(doc, dict) else doc
    if isinstance(err, list) and err:
        err = err[0]
    if isinstance(err, str):
        return (err, None)
    if isinstance(err, dict):
        message = err.get("message") or err.get("detail") or err.get("error") or doc
        code = err.get("code") or err.get("type") or err.get("status")
        return (str(message), str(code) if code is not None else None)
    return (str(doc)[:500], None)


def map_status_error(
    status: int, headers: Mapping[str, str], parsed: tuple[str, str | None], *, provider: str
) -> KubellmError:
    """Map an upstream status and message onto the router's error classes."""
    message, code = parsed
    lowered = f"{message} {code or ''}".lower()
    prefix = f"{provider}: "
    if status == 401:
        # Never echo what the upstream said about the credential: it may quote it.
        auth = AuthenticationError(
            prefix + "the upstream rejected the deployment's credentials",
            code="upstream_authentication_error",
        )
        auth.retryable = True  # another deployment may hold a valid credential
        return auth
    if status == 403:
        return PermissionDeniedError(prefix + message)
    if status == 429:
        retry_after = headers.get("Retry-After") or headers.get("retry-after")
        return RateLimitError(prefix + message, headers={"Retry-After": retry_after} if retry_after else None)
    if any(m in lowered for m in _CONTEXT_MARKERS):
        return ContextLengthExceededError(prefix + message, param="messages")
    if status == 400 and any(m in lowered for m in _FILTER_MARKERS):
        return ContentFilterError(prefix + message)
    return UpstreamStatusError(prefix + message, status=status, code=code)
