"""The HTTP sinks: a generic webhook, and the ingestion APIs of services that need no SDK.

Each vendor sink maps :class:`Facts` onto that service's documented batch
ingestion API with one plain POST per batch:

* Langfuse: ``POST /api/public/ingestion`` (basic auth public:secret key), a ``trace-create``
  and a ``generation-create`` event per request; answers 207 with per-event errors.
* PostHog: ``POST /batch/`` with the project API key in the body, one ``$ai_generation``
  (``$ai_embedding`` for embeddings) event per request, as its LLM analytics expects.
* Mixpanel: ``POST /import?strict=1`` (basic auth with the project token), one event per request.
* Lunary: ``POST /v1/runs/ingest`` (bearer public key), an ``llm`` run ``start`` and ``end``/``error``.
* Helicone: ``POST /custom/v1/log`` (bearer API key), one request log per request.

Prompts and answers go out only when the sink has ``includePayloads`` and the
request's key or deployment opted into payload logging.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from ._base import HttpSink, Sink, env_headers, env_secret, log
from ._record import Facts, Record, iso, usage_event

if TYPE_CHECKING:
    from ...config._schema import SinkConfig


def sink_options(cfg: SinkConfig) -> dict[str, Any]:
    return {
        "batch_size": cfg.batch_size,
        "flush_interval": cfg.flush_interval_seconds,
        "max_queue": cfg.max_queue,
        "max_retries": cfg.max_retries,
        "timeout": cfg.timeout_seconds,
    }


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _model(f: Facts) -> str:
    return f.response_model or f.upstream_model or f.requested_model


class VendorSink(HttpSink):
    """An HTTP sink whose URL is a service's base URL plus a fixed ingestion path."""

    default_url: ClassVar[str] = ""
    path: ClassVar[str] = ""

    def __init__(self, name: str, cfg: SinkConfig, auth: dict[str, str]) -> None:
        base = (cfg.url or self.default_url).rstrip("/")
        super().__init__(
            name, base + self.path, {**env_headers(cfg.headers_env), **auth}, **sink_options(cfg)
        )
        self.include_payloads = cfg.include_payloads

    def payloads(self, f: Facts) -> bool:
        return self.include_payloads and f.payloads_allowed

    @classmethod
    def from_config(cls, name: str, cfg: SinkConfig) -> Sink:
        raise NotImplementedError


class WebhookSink(VendorSink):
    """POSTs a JSON array of :func:`usage_event` objects to any URL."""

    kind = "webhook"

    def encode(self, batch: list[Record]) -> bytes:
        return orjson.dumps([usage_event(r.facts, with_payloads=self.include_payloads) for r in batch])

    @classmethod
    def from_config(cls, name: str, cfg: SinkConfig) -> Sink:
        return cls(name, cfg, {})


def _map_value(value: Any) -> Any:
    """Langfuse ``modelParameters`` values are strings, integers, booleans or lists of strings."""
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, list):
        return [str(v) for v in value]
    return str(value)


class LangfuseSink(VendorSink):
    kind = "langfuse"
    default_url = "https://cloud.langfuse.com"
    path = "/api/public/ingestion"

    def encode(self, batch: list[Record]) -> bytes:
        now = iso(time.time_ns())
        events: list[dict[str, Any]] = []
        for rec in batch:
            f = rec.facts
            metadata = {
                "request_id": f.request_id,
                "model_group": f.model_group,
                "deployment": f.deployment,
                "provider": f.provider,
                "key": f.key,
                "status": f.status,
                "stream": f.stream,
                "cached": f.cached,
                "attempts": f.attempts,
                "usage_estimated": bool(f.usage and f.usage.estimated),
                **({"key_metadata": f.key_metadata} if f.key_metadata else {}),
            }
            trace: dict[str, Any] = {
                "id": f.request_id,
                "timestamp": iso(f.start_ns),
                "name": f.span_name,
                "userId": f.key_owner or f.key,
                "metadata": metadata,
                "tags": [f.model_group],
            }
            generation: dict[str, Any] = {
                "id": f"{f.request_id}-generation",
                "traceId": f.request_id,
                "name": f.span_name,
                "startTime": iso(f.start_ns),
                "endTime": iso(f.end_ns),
                "model": _model(f),
                "modelParameters": {k: _map_value(v) for k, v in f.params.items()},
                "level": "ERROR" if f.failed else "DEFAULT",
                "metadata": metadata,
            }
            if f.first_token_ns is not None:
                generation["completionStartTime"] = iso(f.first_token_ns)
            if f.failed:
                generation["statusMessage"] = f"HTTP {f.status}"
            if f.usage is not None:
                u = f.usage
                generation["usageDetails"] = {
                    "input": u.prompt_tokens,
                    "output": u.completion_tokens,
                    "total": u.total_tokens,
                }
                generation["usage"] = {
                    "input": u.prompt_tokens,
                    "output": u.completion_tokens,
                    "total": u.total_tokens,
                    "unit": "TOKENS",
                }
            if f.cost_usd is not None:
                generation["costDetails"] = {"total": f.cost_usd}
            if self.payloads(f):
                trace["input"] = generation["input"] = f.input
                output = f.output_messages()
                trace["output"] = generation["output"] = output[0] if len(output) == 1 else output
            for kind, body in (("trace-create", trace), ("generation-create", generation)):
                events.append({"id": str(uuid.uuid4()), "timestamp": now, "type": kind, "body": body})
        return orjson.dumps({"batch": events, "metadata": {"sdk_name": "kubellm", "batch_size": len(events)}})

    def check(self, status: int, body: bytes) -> None:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        failures = doc.get("errors") if isinstance(doc, dict) else None
        if failures:
            # Langfuse reports invalid events in a 207; resending them would fail the same way.
            self.errors.inc()
            first = failures[0] if isinstance(failures[0], dict) else {}
            log.warning(
                "sink %s: Langfuse rejected %d events (first: status %s, %s)",
                self.name,
                len(failures),
                first.get("status"),
                first.get("message"),
            )

    @classmethod
    def from_config(cls, name: str, cfg: SinkConfig) -> Sink:
        public = env_secret(cfg.public_key_env, "publicKeyEnv")
        secret = env_secret(cfg.secret_key_env, "secretKeyEnv")
        return cls(name, cfg, {"Authorization": _basic(public, secret)})


class PostHogSink(VendorSink):
    kind = "posthog"
    default_url = "https://us.i.posthog.com"
    path = "/batch/"

    def __init__(self, name: str, cfg: SinkConfig, api_key: str) -> None:
        super().__init__(name, cfg, {})
        self._api_key = api_key

    def event(self, f: Facts) -> dict[str, Any]:
        u = f.usage
        props: dict[str, Any] = {
            "distinct_id": f.key,
            "$ai_trace_id": f.request_id,
            "$ai_span_name": f.span_name,
            "$ai_model": _model(f),
            "$ai_provider": f.provider or "kubellm",
            "$ai_input_tokens": u.prompt_tokens if u else 0,
            "$ai_latency": f.latency_ms / 1000,
            "$ai_http_status": f.status,
            "$ai_base_url": f.base_url,
            "$ai_is_error": f.failed,
            "$ai_stream": f.stream,
            "$ai_model_parameters": f.params,
            "kubellm_request_id": f.request_id,
            "kubellm_model_group": f.model_group,
            "kubellm_deployment": f.deployment,
            "kubellm_key": f.key,
            "kubellm_cached": f.cached,
            "kubellm_attempts": f.attempts,
            "kubellm_usage_estimated": bool(u and u.estimated),
        }
        if f.gen_ai_operation != "embeddings":
            props["$ai_output_tokens"] = u.completion_tokens if u else 0
        if u is not None and u.cached_tokens:
            props["$ai_cache_read_input_tokens"] = u.cached_tokens
        if u is not None and u.cache_write_tokens:
            props["$ai_cache_creation_input_tokens"] = u.cache_write_tokens
        if f.ttft_ms is not None:
            props["$ai_time_to_first_token"] = f.ttft_ms / 1000
        if f.failed:
            props["$ai_error"] = f"HTTP {f.status}"
        if f.cost_usd is not None:
            props["$ai_total_cost_usd"] = f.cost_usd
        if f.key_owner:
            props["kubellm_key_owner"] = f.key_owner
        if f.key_team:
            props["kubellm_key_team"] = f.key_team
        if self.payloads(f):
            props["$ai_input"] = f.input
            if f.gen_ai_operation != "embeddings":
                props["$ai_output_choices"] = f.output_messages()
        name = "$ai_embedding" if f.gen_ai_operation == "embeddings" else "$ai_generation"
        return {"event": name, "distinct_id": f.key, "timestamp": iso(f.end_ns), "properties": props}

    def encode(self, batch: list[Record]) -> bytes:
        events = [self.event(r.facts) for r in batch]
        return orjson.dumps({"api_key": self._api_key, "historical_migration": False, "batch": events})

    @classmethod
    def from_config(cls, name: str, cfg: SinkConfig) -> Sink:
        return cls(name, cfg, env_secret(cfg.api_key_env, "apiKeyEnv (PostHog project API key)"))


class MixpanelSink(VendorSink):
    kind = "mixpanel"
    default_url = "https://api.mixpanel.com"
    path = "/import?strict=1"
    event_name = "LLM Request"

    def encode(self, batch: list[Record]) -> bytes:
        events = []
        for rec in batch:
            f = rec.facts
            props = usage_event(f, with_payloads=self.include_payloads)
            for name in ("type", "timestamp", "key_metadata", "params", "request", "response"):
                props.pop(name)
            if self.payloads(f):
                # Mixpanel keeps string properties short; the text is what is worth keeping.
                props["request"] = orjson.dumps(f.input).decode()
                props["response"] = f.answer
            props.update({f"key_{k}": v for k, v in f.key_metadata.items()})
            props.update(
                {
                    "time": f.end_ns // 1_000_000,
                    "distinct_id": f.key,
                    "$insert_id": f.request_id,
                }
            )
            events.append({"event": self.event_name, "properties": props})
        return orjson.dumps(events)

    @classmethod
    def from_config(cls, name: str, cfg: SinkConfig) -> Sink:
        token = env_secret(cfg.api_key_env, "apiKeyEnv (Mixpanel project token)")
        return cls(name, cfg, {"Authorization": _basic(token, "")})


class LunarySink(VendorSink):
    kind = "lunary"
    default_url = "https://api.lunary.ai"
    path = "/v1/runs/ingest"

    def encode(self, batch: list[Record]) -> bytes:
        events: list[dict[str, Any]] = []
        for rec in batch:
            f = rec.facts
            run_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"kubellm:{f.request_id}"))
            payloads = self.payloads(f)
            kind = "embed" if f.gen_ai_operation == "embeddings" else "llm"
            start = {
                "type": kind,
                "event": "start",
                "runId": run_id,
                "timestamp": iso(f.start_ns),
                "name": _model(f),
                "input": f.input if payloads else None,
                "params": f.params,
                "userId": f.key,
                "tags": [f.model_group],
                "metadata": {
                    "request_id": f.request_id,
                    "deployment": f.deployment,
                    "provider": f.provider,
                    "cached": f.cached,
                    "attempts": f.attempts,
                },
            }
            end: dict[str, Any] = {"type": kind, "runId": run_id, "timestamp": iso(f.end_ns)}
            if f.failed:
                end.update(event="error", error={"message": f"HTTP {f.status}"})
            else:
                output = f.output_messages() if payloads else []
                end.update(event="end", output=(output[0] if len(output) == 1 else output) or None)
            if f.usage is not None:
                end["tokensUsage"] = {
                    "prompt": f.usage.prompt_tokens,
                    "completion": f.usage.completion_tokens,
                }
            events += [start, end]
        return orjson.dumps({"events": events})

    @classmethod
    def from_config(cls, name: str, cfg: SinkConfig) -> Sink:
        key = env_secret(cfg.api_key_env, "apiKeyEnv (Lunary public key)")
        return cls(name, cfg, {"Authorization": f"Bearer {key}"})


def _timing(ns: int) -> dict[str, int]:
    return {"seconds": ns // 1_000_000_000, "milliseconds": ns // 1_000_000 % 1000}


class HeliconeSink(VendorSink):
    """Helicone's custom-log endpoint takes one request per call: a batch is several POSTs."""

    kind = "helicone"
    default_url = "https://api.worker.helicone.ai"
    path = "/custom/v1/log"

    def log(self, f: Facts) -> bytes:
        payloads = self.payloads(f)
        request: dict[str, Any] = {"model": _model(f), **f.params}
        if f.stream:
            request["stream"] = True
        response: dict[str, Any] = {"model": _model(f)}
        if f.response_id:
            response["id"] = f.response_id
        if payloads and f.body is not None:
            for name in ("messages", "prompt", "input"):
                if name in f.body:
                    request[name] = f.body[name]
            response["choices"] = [
                {"index": c.index, "message": c.message(), "finish_reason": c.finish_reason}
                for c in f.choices
            ]
        if f.usage is not None:
            response["usage"] = f.usage.to_openai()
        if f.failed:
            response["error"] = {"message": f"HTTP {f.status}"}
        meta = {
            "Helicone-User-Id": f.key,
            "Helicone-Property-Model-Group": f.model_group,
            "Helicone-Property-Deployment": f.deployment or "",
            "Helicone-Property-Request-Id": f.request_id,
        }
        timing: dict[str, Any] = {"startTime": _timing(f.start_ns), "endTime": _timing(f.end_ns)}
        if f.ttft_ms is not None:
            timing["timeToFirstToken"] = f.ttft_ms
        return orjson.dumps(
            {
                "providerRequest": {"url": "custom-model-nopath", "json": request, "meta": meta},
                "providerResponse": {"json": response, "status": f.status, "headers": {}},
                "timing": timing,
            }
        )

    def encode(self, batch: list[Record]) -> list[bytes]:
        return [self.log(r.facts) for r in batch]

    @classmethod
    def from_config(cls, name: str, cfg: SinkConfig) -> Sink:
        key = env_secret(cfg.api_key_env, "apiKeyEnv (Helicone API key)")
        return cls(name, cfg, {"Authorization": f"Bearer {key}"})


VENDORS: dict[str, type[VendorSink]] = {
    cls.kind: cls for cls in (WebhookSink, LangfuseSink, PostHogSink, MixpanelSink, LunarySink, HeliconeSink)
}
