"""The router config: one pydantic schema, shared by the YAML file and the operator.

The operator renders exactly this document from ModelDeployment and ApiKey
resources, so it is the contract between the two. Field docs here are the
source of ``docs/config.md`` (``kubellm config-docs`` regenerates it).
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from .._errors import KubellmError
from ._identity import IdentitySettings, OidcMatch, ServiceAccountMatch
from ._modes import Mode


class ConfigError(KubellmError):
    """A config document that cannot be used; the message names the field."""


def _no_control_characters(value: str) -> str:
    # Names travel in response headers, metric labels and log lines.
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("must not contain control characters (line breaks, tabs, ...)")
    return value


#: A name that appears in headers, metrics and logs.
Label = Annotated[str, AfterValidator(_no_control_characters)]


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, validate_default=True
    )


class Pricing(_Model):
    """Prices in USD: per one million tokens, per image, per rerank search unit, per million characters
    spoken or per second transcribed. Unset fields fall back to the shipped price table."""

    input_per_million: Decimal | None = Field(None, ge=0, description="USD per 1M prompt tokens.")
    output_per_million: Decimal | None = Field(None, ge=0, description="USD per 1M completion tokens.")
    cached_input_per_million: Decimal | None = Field(
        None,
        ge=0,
        description="USD per 1M cached prompt tokens, read from the provider's prompt cache "
        "(defaults to the input price).",
    )
    cache_write_input_per_million: Decimal | None = Field(
        None,
        ge=0,
        description="USD per 1M prompt tokens written to the provider's prompt cache, such as "
        "Anthropic's `cache_creation_input_tokens` (defaults to the input price).",
    )
    per_image: Decimal | None = Field(None, ge=0, description="USD per generated image (image models).")
    per_search_unit: Decimal | None = Field(
        None,
        ge=0,
        description="USD per rerank search unit (Cohere's `billed_units.search_units`; on Bedrock, per "
        "query of up to 100 documents).",
    )
    per_million_characters: Decimal | None = Field(
        None, ge=0, description="USD per 1M characters of input text turned into speech (`/v1/audio/speech`)."
    )
    per_second: Decimal | None = Field(
        None,
        ge=0,
        description="USD per second of audio transcribed or translated (`/v1/audio/transcriptions`, "
        "`/v1/audio/translations`), as the provider reports the duration.",
    )


class Timeouts(_Model):
    """Upstream timeouts in seconds. A request may lower them with the `x-kubellm-timeout` header."""

    connect: float = Field(5.0, gt=0, description="TCP and TLS connect timeout.")
    first_token: float | None = Field(
        None, gt=0, description="Time to the first streamed byte (streams) or to the response headers."
    )
    idle: float | None = Field(None, gt=0, description="Longest gap between two streamed chunks.")
    total: float = Field(600.0, gt=0, description="Whole request, including the streamed body.")


class Limits(_Model):
    """Request and token limits. Unset means unlimited."""

    rpm: int | None = Field(None, ge=1, description="Requests per minute.")
    tpm: int | None = Field(None, ge=1, description="Tokens (prompt + completion) per minute.")
    max_parallel_requests: int | None = Field(None, ge=1, description="Concurrent in-flight requests.")


class MockOptions(_Model):
    """Behaviour of the built-in `mock` provider."""

    latency_ms: float = Field(0.0, ge=0, description="Delay before the response (or first chunk).")
    chunk_delay_ms: float = Field(0.0, ge=0, description="Delay between streamed chunks.")
    reply: str | None = Field(
        None, description="Fixed reply text. Unset: a deterministic reply derived from the prompt."
    )


class DeploymentConfig(_Model):
    """One upstream model deployment. Deployments sharing `model` form a model group."""

    name: Label = Field(
        "", description="Unique deployment id, shown in `x-kubellm-deployment`. Default: `<model>-<index>`."
    )
    model: Label = Field(..., min_length=1, description="Public model name clients send (the model group).")
    provider: str = Field(..., description="Provider adapter, e.g. `openai`, `openai-compatible`, `mock`.")
    mode: Mode | list[Mode] | None = Field(
        None,
        description="What it serves: `chat`, `embedding`, `image`, `audio`, `rerank`, `moderation`, or a "
        "list of them; requests of other kinds skip it. Default: derived from the upstream model's name "
        "(`dall-e-3`: image, `rerank-v3.5`: rerank, otherwise chat), and chat and embedding requests "
        "still reach it. See docs/routing.md.",
    )
    upstream_model: str | None = Field(
        None, description="Model or deployment id sent upstream. Default: `model`."
    )
    base_url: str | None = Field(None, description="Upstream base URL. Default: the provider's own.")
    api_key_env: str | None = Field(
        None, description="Environment variable that holds the upstream credential."
    )
    api_key_file: str | None = Field(None, description="File that holds the upstream credential.")
    api_key: str | None = Field(
        None,
        description="Inline upstream credential. Prefer `apiKeyEnv`/`apiKeyFile`; the operator uses this "
        "field only inside the config Secret it renders.",
    )
    api_version: str | None = Field(None, description="Azure OpenAI `api-version`.")
    region: str | None = Field(None, description="Cloud region (Bedrock).")
    project: str | None = Field(None, description="Cloud project (Vertex AI).")
    location: str | None = Field(None, description="Cloud location (Vertex AI).")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra headers sent upstream.")
    weight: float = Field(1.0, ge=0, description="Relative share of traffic within its priority tier.")
    priority: int = Field(
        0, ge=0, description="Priority tier; a higher number gets traffic only when lower tiers cannot serve."
    )
    limits: Limits = Field(
        default_factory=Limits, description="Per-deployment limits; saturated deployments are skipped."
    )
    context_window: int | None = Field(None, ge=1, description="Largest prompt + completion in tokens.")
    pricing: Pricing = Field(default_factory=Pricing, description="Overrides the shipped price table.")
    timeouts: Timeouts = Field(default_factory=Timeouts, description="Upstream timeouts.")
    drop_unsupported_params: bool = Field(
        False, description="Silently drop parameters the provider cannot honour instead of answering 400."
    )
    cache: bool = Field(False, description="Opt this deployment into the response cache.")
    log_payloads: bool = Field(False, description="Log prompts and responses for this deployment.")
    mock: MockOptions = Field(default_factory=MockOptions, description="Options of the `mock` provider.")

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        from ..providers import provider_names

        names = provider_names()
        if value not in names:
            raise ValueError(f"unknown provider {value!r}; known: {', '.join(sorted(names))}")
        return value

    @field_validator("mode", mode="before")
    @classmethod
    def _modes(cls, value: Any) -> Any:
        from ._modes import MODES

        names = value if isinstance(value, list) else [value]
        if value is None:
            return value
        if not names or len(set(map(str, names))) != len(names):
            raise ValueError("must name at least one mode, each once")
        for name in names:
            if name not in MODES:
                raise ValueError(f"unknown mode {name!r}; known: {', '.join(MODES)}")
        return value

    @model_validator(mode="after")
    def _one_credential_source(self) -> DeploymentConfig:
        given = [f for f in ("api_key_env", "api_key_file", "api_key") if getattr(self, f) is not None]
        if len(given) > 1:
            raise ValueError(f"set at most one of {', '.join(to_camel(f) for f in given)}")
        return self


GuardrailType = Literal["regex-deny", "regex-redact", "blocked-terms", "max-prompt-size", "webhook"]
GuardrailStage = Literal["pre", "post"]


class GuardrailConfig(_Model):
    """A named check on prompts (`pre`) and answers (`post`); groups and keys name the ones they use.

    See docs/guardrails.md for what each type does, on streams too, and the webhook's contract.
    """

    name: Label = Field(
        ..., min_length=1, description="Name that groups and keys refer to; in errors and metrics."
    )
    type: GuardrailType = Field(
        ...,
        description="`regex-deny`, `regex-redact`, `blocked-terms`, `max-prompt-size` or `webhook`.",
    )
    stages: list[GuardrailStage] | None = Field(
        None,
        description="`pre` (the prompt, before any upstream call), `post` (the answer). Default: both; "
        "`max-prompt-size`: `pre` only.",
    )
    patterns: list[str] = Field(
        default_factory=list, description="`regex-deny`, `regex-redact`: Python regular expressions."
    )
    ignore_case: bool = Field(False, description="`regex-deny`, `regex-redact`: match case-insensitively.")
    replacement: str = Field(
        "[REDACTED]", description="`regex-redact`: what each match is replaced with (`\\1` etc. allowed)."
    )
    terms: list[str] = Field(
        default_factory=list,
        description="`blocked-terms`: words or phrases, matched case-insensitively as whole words.",
    )
    max_chars: int | None = Field(
        None, ge=1, description="`max-prompt-size`: most characters of prompt text."
    )
    max_tokens: int | None = Field(
        None, ge=1, description="`max-prompt-size`: most prompt tokens (the router's cheap estimate)."
    )
    url: str | None = Field(None, description="`webhook`: the URL the check is POSTed to.")
    headers_env: str | None = Field(
        None, description="`webhook`: environment variable holding extra request headers as a JSON object."
    )
    timeout_seconds: float = Field(2.0, gt=0, le=60, description="`webhook`: longest wait for its answer.")
    fail_open: bool = Field(
        False,
        description="`webhook`: when it fails or times out, let the request through (true) or refuse it "
        "with 503 (false).",
    )
    stream_window_chars: int = Field(
        64,
        ge=0,
        le=65536,
        description="Streams (`regex-redact`, `regex-deny`, `blocked-terms`): characters of the answer held "
        "back so that a match split across chunks is still redacted or refused before the client sees "
        "it (adds that much delay to the stream).",
    )

    @model_validator(mode="after")
    def _fields_of_type(self) -> GuardrailConfig:
        import re

        needs = {
            "regex-deny": "patterns",
            "regex-redact": "patterns",
            "blocked-terms": "terms",
            "webhook": "url",
        }.get(self.type)
        if needs is not None and not getattr(self, needs):
            raise ValueError(f"a {self.type} guardrail needs {needs}")
        if self.type == "max-prompt-size":
            if self.max_chars is None and self.max_tokens is None:
                raise ValueError("a max-prompt-size guardrail needs maxChars or maxTokens")
            if self.stages is not None and "post" in self.stages:
                raise ValueError("stages: a max-prompt-size guardrail checks prompts only (pre)")
        for i, pattern in enumerate(self.patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"patterns[{i}]: not a valid regular expression: {exc}") from None
        if self.stages is not None and not self.stages:
            raise ValueError("stages: name at least one of pre, post")
        return self


class ModelGroupConfig(_Model):
    """Settings shared by every deployment of one public model name."""

    name: Label = Field(..., min_length=1, description="The public model name.")
    strategy: Literal["weighted-random", "least-busy", "lowest-latency", "usage-based", "lowest-cost"] = (
        Field("weighted-random", description="Load-balancing strategy.")
    )
    fallbacks: list[str] = Field(
        default_factory=list, description="Model groups to try, in order, when this group cannot answer."
    )
    context_window_fallbacks: list[str] = Field(
        default_factory=list,
        description="Model groups to try when the prompt is too long for every deployment here.",
    )
    content_policy_fallbacks: list[str] = Field(
        default_factory=list, description="Model groups to try when a deployment refuses on content policy."
    )
    latency_tolerance: float = Field(
        0.1, ge=0, description="`lowest-latency`: deployments within this fraction of the best share load."
    )
    aliases: list[Label] = Field(
        default_factory=list, description="Other names clients may send for this group."
    )
    guardrails: list[str] = Field(
        default_factory=list, description="Guardrails (by name) every request to this group passes."
    )


class Budget(_Model):
    """A spend limit that resets each period (aligned to UTC calendar boundaries or the epoch)."""

    amount_usd: Decimal = Field(..., ge=0, description="USD allowed per period.")
    period: str = Field(
        "monthly",
        description="`daily`, `weekly` (ISO weeks), `monthly`, or a duration like `30m`, `12h`, `7d`.",
    )

    @field_validator("period")
    @classmethod
    def _period(cls, value: str) -> str:
        from ..metering._budget import validate_period

        return validate_period(value)


class KeyConfig(_Model):
    """A virtual API key. Only its SHA-256 hash is stored."""

    name: Label = Field(..., min_length=1, description="Key id, shown in logs, metrics and status.")
    key_hash: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the key (what the operator renders)."
    )
    key_env: str | None = Field(None, description="Environment variable holding the key itself.")
    key_prefix: str | None = Field(
        None,
        max_length=16,
        description="Non-secret start of the key (e.g. `sk-Ab12`), shown in logs and status.",
    )
    models: list[str] = Field(default_factory=list, description="Model groups it may use; empty means all.")
    limits: Limits = Field(default_factory=Limits, description="Per-key limits.")
    budget: Budget | None = Field(None, description="Spend limit per period.")
    expires_at: datetime | None = Field(
        None, description="After this instant (RFC 3339) the key is rejected."
    )
    disabled: bool = Field(False, description="Reject every request made with this key.")
    cache: bool = Field(False, description="Opt this key's requests into the response cache.")
    log_payloads: bool = Field(False, description="Log prompts and responses of this key's requests.")
    guardrails: list[str] = Field(
        default_factory=list,
        description="Guardrails (by name) this key's requests pass, in addition to the model group's.",
    )
    owner: str | None = Field(None, description="Who the key belongs to (metadata).")
    team: str | None = Field(
        None, description="The owner's team: a `teams` entry of this name adds its limits, budget and models."
    )
    metadata: dict[str, str] = Field(
        default_factory=dict, description="Free-form labels, copied to usage records."
    )

    @model_validator(mode="after")
    def _one_source(self) -> KeyConfig:
        if (self.key_hash is None) == (self.key_env is None):
            raise ValueError("set exactly one of keyHash, keyEnv")
        return self


class TeamConfig(_Model):
    """A team: limits, budget and models shared by every key (and identity) whose `team` names it.

    A request is admitted only if both the key's and its team's limits and budgets admit it."""

    name: Label = Field(
        ..., min_length=1, description="Team id, as keys' `team` names it (the operator: NAMESPACE/NAME)."
    )
    models: list[str] = Field(
        default_factory=list,
        description="Model groups its keys may use (they must allow it too); empty means all.",
    )
    limits: Limits = Field(default_factory=Limits, description="Limits shared by all of its keys.")
    budget: Budget | None = Field(None, description="Spend limit per period shared by all of its keys.")


class IdentityBindingConfig(_Model):
    """What callers with a bearer JWT may do: each identity it covers (`sa:NAMESPACE/NAME`,
    `oidc:ISSUER/SUBJECT`) is metered like a key of its own, with these models, limits and budget."""

    name: Label = Field(..., min_length=1, description="Binding id (the operator: NAMESPACE/NAME).")
    service_accounts: list[ServiceAccountMatch] = Field(
        default_factory=list, description="ServiceAccounts it covers."
    )
    oidc: list[OidcMatch] = Field(default_factory=list, description="OIDC callers it covers.")
    models: list[str] = Field(default_factory=list, description="Model groups it may use; empty means all.")
    limits: Limits = Field(default_factory=Limits, description="Limits of each identity it covers.")
    budget: Budget | None = Field(None, description="Spend limit per period of each identity it covers.")
    team: str | None = Field(None, description="The identities' team.")
    disabled: bool = Field(False, description="Refuse the identities it covers.")
    cache: bool = Field(False, description="Opt their requests into the response cache.")
    guardrails: list[str] = Field(
        default_factory=list, description="Guardrails (by name) their requests pass, besides the group's."
    )


class CooldownSettings(_Model):
    """The per-deployment circuit breaker."""

    failure_threshold: int = Field(
        3, ge=1, description="Failures within `windowSeconds` that open the breaker."
    )
    window_seconds: float = Field(60.0, gt=0, description="Window over which failures are counted.")
    cooldown_seconds: float = Field(
        30.0, gt=0, description="How long an open breaker keeps a deployment out."
    )
    probe_timeout_seconds: float = Field(
        30.0, gt=0, description="A half-open probe that has not finished by then may be retried by another."
    )


class CacheSettings(_Model):
    """The exact-match response cache (opt-in per deployment or per key)."""

    ttl_seconds: float = Field(300.0, gt=0, description="How long a cached answer is served.")
    max_entries: int = Field(10_000, ge=1, description="In-memory backend: entries kept (LRU).")
    max_entry_bytes: int = Field(1_048_576, ge=1, description="Answers larger than this are not cached.")


class ResponsesSettings(_Model):
    """Stored responses of the Responses API (`store`, `previous_response_id`, `GET /v1/responses/{id}`).

    Read once at start. Kept in Redis when `redis` is configured (shared by every replica), else in
    process memory.
    """

    ttl_seconds: float = Field(
        2_592_000.0,
        gt=0,
        description="How long a stored response is kept after it was last written or read (default 30 days).",
    )
    max_entries: int = Field(
        10_000, ge=1, description="In-memory backend: responses kept (the least recently used go first)."
    )


class RedisSettings(_Model):
    """Where the shared state lives. Without a URL, state is kept in process memory."""

    url: str | None = Field(None, description="`redis://host:port/db`; must not contain a password.")
    url_env: str | None = Field(None, description="Environment variable holding the Redis URL.")
    password_env: str | None = Field(None, description="Environment variable holding the Redis password.")
    key_prefix: str = Field(
        "kubellm:",
        description="Prefix of every key the router writes. In cluster mode keep it free of `{}`: a hash "
        "tag here would put every key in one slot.",
    )
    fail_open: bool = Field(
        True, description="When Redis is unreachable, admit requests (true) or reject them with 503 (false)."
    )
    mode: Literal["standalone", "cluster", "sentinel"] = Field(
        "standalone",
        description="`standalone`: one Redis at `url`. `cluster`: a Redis Cluster, seeded by `url` and/or "
        "`nodes`; keys are tagged per key and per deployment so they spread over the shards. `sentinel`: "
        "the master Sentinel names `masterName`, found through `sentinels`.",
    )
    nodes: list[str] = Field(
        default_factory=list, description="Cluster mode: seed nodes as `host:port` (besides `url`)."
    )
    sentinels: list[str] = Field(
        default_factory=list, description="Sentinel mode: the sentinels, `host:port`."
    )
    master_name: str | None = Field(None, description="Sentinel mode: the monitored master's name.")
    sentinel_password_env: str | None = Field(
        None, description="Sentinel mode: environment variable holding the sentinels' own password."
    )
    db: int = Field(0, ge=0, description="Sentinel mode: the database number (standalone: in `url`).")
    ledger_wait_replicas: int = Field(
        0,
        ge=0,
        le=16,
        description="A ledger batch counts as stored once this many replicas acknowledged it (`WAIT`); "
        "with Sentinel, 1 means a failover loses no record the router already confirmed.",
    )

    @model_validator(mode="after")
    def _mode_needs(self) -> RedisSettings:
        if self.mode == "sentinel" and not (self.sentinels and self.master_name):
            raise ValueError("redis.mode sentinel needs redis.sentinels and redis.masterName")
        if self.mode == "cluster" and not (self.url or self.url_env or self.nodes):
            raise ValueError("redis.mode cluster needs redis.url, redis.urlEnv or redis.nodes")
        for addr in [*self.nodes, *self.sentinels]:
            host, _, port = addr.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"redis node {addr!r} is not host:port")
        return self


class LeaseSettings(_Model):
    """Quota leasing: each replica admits from small slices of its limits leased from Redis (see
    docs/keys-and-metering.md, "Quota leasing"). Only with `settings.redis`."""

    enabled: bool = Field(
        False,
        description="Lease slices of rpm/tpm limits and budgets instead of one Redis script per request. "
        "Standalone and Sentinel Redis only: on a Redis Cluster admission stays per request, slot by slot.",
    )
    target_ms: float = Field(
        250.0, gt=0, le=10_000, description="A slice aims to last this long at the replica's own recent rate."
    )
    max_fraction: float = Field(
        0.1,
        gt=0,
        le=1,
        description="A slice is at most this fraction of a limit's remaining capacity, so replicas cannot "
        "starve each other.",
    )
    min_slice: int = Field(
        2,
        ge=1,
        description="A limit whose capped slice would hold fewer than this many requests' worth is admitted "
        "exactly, one script per request (small limits, and any limit near its end).",
    )
    ttl_seconds: float = Field(
        2.0,
        gt=0,
        le=60,
        description="A slice's lifetime; rpm/tpm slices also end with the 1 s window bucket they are "
        "counted in. Unused budget slice of a replica that died frees after this long.",
    )


class OtelSettings(_Model):
    """OpenTelemetry traces (GenAI semantic conventions) over OTLP/HTTP; needs the `otel` extra.

    Read once at start. Unset: no span is ever created and the tracing SDK is not imported.
    """

    endpoint: str = Field(
        ..., min_length=1, description="OTLP/HTTP base URL; spans go to `{endpoint}/v1/traces`."
    )
    headers_env: str | None = Field(
        None,
        description="Environment variable holding export headers as a JSON object (e.g. `Authorization`).",
    )
    service_name: str = Field("kubellm", description="`service.name` of the exported spans.")
    sample_ratio: float = Field(1.0, ge=0, le=1, description="Share of requests traced, decided by trace id.")
    batch_size: int = Field(512, ge=1, le=10_000, description="Requests per export.")
    flush_interval_seconds: float = Field(
        5.0, gt=0, description="Longest wait before a partial batch is exported."
    )
    max_queue: int = Field(10_000, ge=1, description="Requests waiting for export; beyond, they are dropped.")
    timeout_seconds: float = Field(10.0, gt=0, description="Timeout of one export request.")


#: Sink types; `otlp` is the OpenTelemetry exporter, the others POST JSON (see docs/observability.md).
SinkType = Literal[
    "webhook",
    "otlp",
    "langfuse",
    "posthog",
    "mixpanel",
    "lunary",
    "helicone",
    "sentry",
    "supabase",
    "traceloop",
]


class SinkConfig(_Model):
    """A destination for one event per finished request, fed off the request path in batches.

    Read once at start. Credentials come from environment variables, never from the config.
    """

    type: SinkType = Field(
        ...,
        description="`webhook`, `otlp`, `langfuse`, `posthog`, `mixpanel`, `lunary`, `helicone`, `sentry`, "
        "`supabase` or `traceloop`.",
    )
    name: str | None = Field(None, description="Label in `kubellm_sink_*` metrics. Default: the type.")
    url: str | None = Field(
        None,
        description="Webhook URL, OTLP base URL, the Supabase project URL, or the service's base URL "
        "(default: its cloud endpoint; Traceloop: `https://api.traceloop.com`).",
    )
    headers_env: str | None = Field(
        None, description="Environment variable holding extra request headers as a JSON object."
    )
    api_key_env: str | None = Field(
        None,
        description="Environment variable holding the PostHog project API key, Mixpanel project token, "
        "Lunary public key, Helicone API key, Supabase API key (one allowed to insert into `table`) or "
        "Traceloop API key.",
    )
    dsn_env: str | None = Field(None, description="`sentry`: environment variable with the project's DSN.")
    environment: str | None = Field(None, description="`sentry`: the events' `environment`.")
    table: str = Field(
        "kubellm_requests",
        description="`supabase`: the table rows are inserted into (see its SQL in the docs).",
    )
    db_schema: str | None = Field(
        None, description="`supabase`: the table's schema, when it is not one the API exposes by default."
    )
    public_key_env: str | None = Field(
        None, description="Langfuse: environment variable with the public key."
    )
    secret_key_env: str | None = Field(
        None, description="Langfuse: environment variable with the secret key."
    )
    batch_size: int = Field(100, ge=1, le=10_000, description="Requests per POST (per export for `otlp`).")
    flush_interval_seconds: float = Field(
        2.0, gt=0, description="Longest wait before a partial batch is sent."
    )
    max_queue: int = Field(10_000, ge=1, description="Requests waiting to be sent; beyond, they are dropped.")
    max_retries: int = Field(
        5, ge=0, le=20, description="Retries of a failed batch, with exponential backoff."
    )
    timeout_seconds: float = Field(10.0, gt=0, description="Timeout of one delivery request.")
    include_payloads: bool = Field(
        False,
        description="Send prompts and answers, for requests whose key or deployment has `logPayloads`.",
    )
    service_name: str = Field(
        "kubellm", description="`otlp`, `traceloop`: `service.name` of the exported spans."
    )
    sample_ratio: float = Field(1.0, ge=0, le=1, description="`otlp`, `traceloop`: share of requests traced.")

    @model_validator(mode="after")
    def _required(self) -> SinkConfig:
        needs = {
            "webhook": ("url",),
            "otlp": ("url",),
            "langfuse": ("public_key_env", "secret_key_env"),
            "posthog": ("api_key_env",),
            "mixpanel": ("api_key_env",),
            "lunary": ("api_key_env",),
            "helicone": ("api_key_env",),
            "sentry": ("dsn_env",),
            "supabase": ("url", "api_key_env"),
            "traceloop": ("api_key_env",),
        }[self.type]
        missing = [to_camel(f) for f in needs if not getattr(self, f)]
        if missing:
            raise ValueError(f"a {self.type} sink needs {', '.join(missing)}")
        return self


class RouterSettings(_Model):
    """Process-wide router settings."""

    master_key_env: str = Field(
        "KUBELLM_MASTER_KEY", description="Environment variable holding the admin master key."
    )
    master_key_hash: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the master key, instead of the env var."
    )
    max_request_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest accepted request body; larger gets 413."
    )
    max_upload_bytes: int = Field(
        25 * 1024 * 1024,
        ge=1024,
        description="Largest multipart upload (audio to transcribe or translate, a file for "
        "`/v1/files`); larger gets 413 naming the field.",
    )
    reload_interval_seconds: float = Field(
        1.0, gt=0, description="How often the config file is checked for changes."
    )
    num_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="Retries after the first attempt within a model group (and each fallback).",
    )
    initial_backoff_seconds: float = Field(
        0.1,
        ge=0,
        description="First retry delay when the same deployment must be retried; doubles, with jitter.",
    )
    max_backoff_seconds: float = Field(5.0, ge=0, description="Largest retry delay.")
    request_timeout_seconds: float = Field(
        600.0, gt=0, description="Per-request deadline across every attempt and fallback."
    )
    queue_wait_seconds: float = Field(
        0.0, ge=0, description="How long a request may wait for a saturated model group before getting 429."
    )
    drain_delay_seconds: float = Field(
        5.0,
        ge=0,
        description=(
            "On SIGTERM, seconds to keep serving while readiness reports draining; every response in"
            " that time says `Connection: close`, so keep-alive clients reconnect elsewhere. 0 stops at once."
        ),
    )
    cooldown: CooldownSettings = Field(
        default_factory=lambda: CooldownSettings(), description="Circuit breaker."
    )
    cache: CacheSettings = Field(default_factory=lambda: CacheSettings(), description="Response cache.")
    responses: ResponsesSettings = Field(
        default_factory=lambda: ResponsesSettings(), description="Stored responses of the Responses API."
    )
    redis: RedisSettings = Field(
        default_factory=lambda: RedisSettings(),
        description="Shared state between replicas; unset: in memory.",
    )
    leasing: LeaseSettings = Field(
        default_factory=lambda: LeaseSettings(), description="Quota leasing (with `redis` only)."
    )
    budget_reserve_tokens: int = Field(
        4096,
        ge=1,
        description="Completion tokens a budgeted request reserves (at the group's highest price) when it "
        "sets no `max_tokens`/`max_completion_tokens`, or when its group's upstream billed more than a "
        "request allowed. A `contextWindow` on every deployment of the group lowers it to the room the "
        "prompt leaves. See docs/keys-and-metering.md.",
    )
    access_log: bool = Field(True, description="Write one JSON access log line per request.")
    otel: OtelSettings | None = Field(
        None, description="OpenTelemetry traces over OTLP; unset: no tracing at all."
    )
    sinks: list[SinkConfig] = Field(
        default_factory=list, description="Where per-request usage and log events are sent."
    )
    state_dir: str | None = Field(
        None,
        description="Local state (embedded ledger, ledger journal). Default: `$KUBELLM_STATE_DIR` or "
        "`~/.local/state/kubellm`.",
    )
    identity: IdentitySettings = Field(
        default_factory=lambda: IdentitySettings(),
        description="ServiceAccount and OIDC bearer tokens as credentials.",
    )


class RouterConfig(_Model):
    """The whole router config document."""

    deployments: list[DeploymentConfig] = Field(default_factory=list, description="Upstream deployments.")
    model_groups: list[ModelGroupConfig] = Field(
        default_factory=list, description="Optional per-group settings (strategy, fallbacks, aliases)."
    )
    keys: list[KeyConfig] = Field(default_factory=list, description="Virtual API keys.")
    teams: list[TeamConfig] = Field(
        default_factory=list, description="Teams: limits, budgets and models shared by their keys."
    )
    identity_bindings: list[IdentityBindingConfig] = Field(
        default_factory=list, description="What ServiceAccount and OIDC callers may do."
    )
    guardrails: list[GuardrailConfig] = Field(
        default_factory=list, description="Named guardrails that model groups and keys refer to."
    )
    settings: RouterSettings = Field(default_factory=RouterSettings, description="Router settings.")

    @model_validator(mode="after")
    def _names(self) -> RouterConfig:
        seen: set[str] = set()
        named: list[DeploymentConfig] = []
        index: dict[str, int] = {}
        for dep in self.deployments:
            name = dep.name
            if not name:
                index[dep.model] = index.get(dep.model, 0) + 1
                name = f"{dep.model}-{index[dep.model]}"
                dep = dep.model_copy(update={"name": name})
            if name in seen:
                raise ValueError(f"duplicate deployment name {name!r}")
            seen.add(name)
            named.append(dep)
        object.__setattr__(self, "deployments", named)
        groups = {d.model for d in named}
        edges: dict[str, list[str]] = {}
        for group in self.model_groups:
            for field in ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks"):
                for target in getattr(group, field):
                    if target not in groups:
                        where = f"modelGroups[{group.name}].{to_camel(field)}"
                        raise ValueError(f"{where}: no deployment serves {target!r}")
                    edges.setdefault(group.name, []).append(target)
        cycle = find_cycle(edges)
        if cycle:
            raise ValueError(f"modelGroups: fallback loop {' -> '.join(cycle)}")
        self._check_guardrail_names()
        teams = [t.name for t in self.teams]
        for name in teams:
            if teams.count(name) > 1:
                raise ValueError(f"teams: duplicate name {name!r}")
        return self

    def _check_guardrail_names(self) -> None:
        defined: set[str] = set()
        for guard in self.guardrails:
            if guard.name in defined:
                raise ValueError(f"guardrails: duplicate name {guard.name!r}")
            defined.add(guard.name)
        users = [(f"modelGroups[{g.name}]", g.guardrails) for g in self.model_groups]
        users += [(f"keys[{k.name}]", k.guardrails) for k in self.keys]
        users += [(f"identityBindings[{b.name}]", b.guardrails) for b in self.identity_bindings]
        for where, names in users:
            for name in names:
                if name not in defined:
                    raise ValueError(f"{where}.guardrails: no guardrail is named {name!r}")

    @property
    def version(self) -> str:
        """Content hash of the config, stable across key order."""
        doc = self.model_dump(mode="json", by_alias=True)
        return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    """A fallback cycle, as the path that closes it, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in edges.get(node, []):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in list(edges):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def _location(loc: tuple[int | str, ...], doc: Any) -> str:
    parts: list[str] = []
    node = doc
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + item)
        try:
            node = node[item]
        except (KeyError, IndexError, TypeError):
            node = None
    return "".join(parts)


def validation_message(exc: ValidationError, doc: Any) -> str:
    lines = []
    for err in exc.errors():
        where = _location(err["loc"], doc)
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {msg}" if where else msg)
    return "; ".join(lines)


def parse_config(doc: Any, *, source: str = "config") -> RouterConfig:
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: the document must be a mapping, got {type(doc).__name__}")
    try:
        return RouterConfig.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {validation_message(exc, doc)}") from None


def load_config(path: str | os.PathLike[str]) -> RouterConfig:
    """Read and validate a YAML (or JSON) config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    return parse_config(doc, source=str(p))


def embedded_default() -> RouterConfig:
    """The config `kubellm router` serves with no arguments: two mock deployments of one model."""
    return parse_config(
        {
            "deployments": [
                {"name": "mock-a", "model": "mock-gpt", "provider": "mock", "weight": 1},
                {"name": "mock-b", "model": "mock-gpt", "provider": "mock", "weight": 1},
                {"name": "mock-embed", "model": "mock-embedding", "provider": "mock"},
            ]
        },
        source="embedded default",
    )
