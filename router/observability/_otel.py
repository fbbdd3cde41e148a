"""OpenTelemetry traces of finished requests, following the GenAI semantic conventions.

Imported only when ``settings.otel`` or an ``otlp`` sink is configured: without
one, the tracing SDK and the exporter are never imported and no span is ever created.

Spans are not built while a request runs. :mod:`kubellm.router.observability._hub` hands
each finished request's :class:`Record` to :class:`OtlpSink` on the sink thread,
which builds the spans with explicit start and end timestamps and exports a
batch at a time over OTLP/HTTP (protobuf) to ``{endpoint}/v1/traces``.

Per request:

* a ``SERVER`` span for the router, named ``{gen_ai.operation.name} {requested model}``, the
  child of the client's span when the request carried a W3C ``traceparent`` header (and sampled
  as that header says),
  with the HTTP status, ``error.type`` and the router's own ``kubellm.*`` attributes;
* for a request that reached a deployment, a ``CLIENT`` child span for the upstream
  inference, named ``{gen_ai.operation.name} {upstream model}``, carrying the GenAI
  attributes (provider, request parameters, response id/model/finish reasons,
  token usage, ``server.address``). Only this span carries usage, so backends that
  turn GenAI spans into generations count each request once. It covers the whole
  upstream operation, retries included, as the conventions ask.

Prompts and answers are added as a ``gen_ai.client.inference.operation.details``
span event, and only when the request's key or deployment opted into payload logging.
The caller's key secret, the master key and upstream credentials are never attributes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .sinks._base import DeliveryError, Sink
from .sinks._record import Facts, Record

#: Where the prompt and the answer go, when the request opted in.
DETAILS_EVENT = "gen_ai.client.inference.operation.details"
_TRACE_CONTEXT = TraceContextTextMapPropagator()


def traces_url(endpoint: str) -> str:
    """``{endpoint}/v1/traces``, unless the endpoint already names the traces path."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


class _Collect(SpanProcessor):
    """Keeps ended spans for the batch being encoded (the sink thread is the only user)."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    parts: list[dict[str, Any]] = []
    for part in content if isinstance(content, list) else []:
        if isinstance(part, dict) and part.get("type") == "text":
            parts.append({"type": "text", "content": str(part.get("text", ""))})
        elif isinstance(part, dict):
            parts.append({"type": str(part.get("type", "unknown"))})  # media is not copied
    return parts


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw
    return raw


def input_messages(f: Facts) -> list[dict[str, Any]]:
    """The prompt in the conventions' input-messages shape (``role`` and ``parts``)."""
    prompt = f.input
    if f.gen_ai_operation != "chat":
        items = prompt if isinstance(prompt, list) else [prompt]
        return [{"role": "user", "parts": [{"type": "text", "content": str(i)} for i in items]}]
    out: list[dict[str, Any]] = []
    for msg in prompt if isinstance(prompt, list) else []:
        if not isinstance(msg, dict):
            continue
        role = str(msg.get("role", "user"))
        if role == "tool":
            parts = [
                {"type": "tool_call_response", "id": msg.get("tool_call_id"), "response": msg.get("content")}
            ]
        else:
            parts = _parts(msg.get("content"))
            for call in msg.get("tool_calls") or []:
                function = call.get("function") or {} if isinstance(call, dict) else {}
                parts.append(
                    {
                        "type": "tool_call",
                        "id": call.get("id") if isinstance(call, dict) else None,
                        "name": function.get("name"),
                        "arguments": _arguments(function.get("arguments")),
                    }
                )
        out.append({"role": role, "parts": parts})
    return out


def output_messages(f: Facts) -> list[dict[str, Any]]:
    out = []
    for choice in f.choices:
        parts: list[dict[str, Any]] = [{"type": "text", "content": choice.content}] if choice.content else []
        for _, call in sorted(choice.tool_calls.items()):
            parts.append(
                {
                    "type": "tool_call",
                    "id": call.get("id"),
                    "name": call.get("name"),
                    "arguments": _arguments(call.get("arguments")),
                }
            )
        out.append({"role": "assistant", "parts": parts, "finish_reason": choice.finish_reason or ""})
    return out


def _request_attributes(f: Facts) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    p = f.params
    if f.max_tokens is not None:
        attrs["gen_ai.request.max_tokens"] = f.max_tokens
    for name in ("temperature", "top_p", "frequency_penalty", "presence_penalty"):
        if isinstance(p.get(name), int | float) and not isinstance(p.get(name), bool):
            attrs[f"gen_ai.request.{name}"] = float(p[name])
    if isinstance(p.get("seed"), int):
        attrs["gen_ai.request.seed"] = p["seed"]
    if isinstance(p.get("n"), int) and p["n"] != 1:
        attrs["gen_ai.request.choice.count"] = p["n"]
    stop = p.get("stop")
    if isinstance(stop, str | list):
        attrs["gen_ai.request.stop_sequences"] = [stop] if isinstance(stop, str) else [str(s) for s in stop]
    return attrs


def server_attributes(f: Facts) -> dict[str, Any]:
    """The router's SERVER span."""
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": f.gen_ai_operation,
        "gen_ai.request.model": f.requested_model,
        "http.request.method": "POST",
        "http.response.status_code": f.status,
        "kubellm.request_id": f.request_id,
        "kubellm.model_group": f.model_group,
        "kubellm.key.name": f.key,
        "kubellm.stream": f.stream,
        "kubellm.cache.hit": f.cached,
        "kubellm.attempts": f.attempts,
    }
    if f.deployment:
        attrs["kubellm.deployment"] = f.deployment
    if f.error_type:
        attrs["error.type"] = f.error_type
    if f.cost_usd is not None:
        attrs["kubellm.cost_usd"] = f.cost_usd
    if f.ttft_ms is not None:
        attrs["kubellm.time_to_first_token_ms"] = f.ttft_ms
    if f.key_team:
        attrs["kubellm.key.team"] = f.key_team
    return attrs


def client_attributes(f: Facts) -> dict[str, Any]:
    """The upstream inference's CLIENT span: the GenAI attributes."""
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": f.gen_ai_operation,
        "gen_ai.request.model": f.upstream_model or f.requested_model,
        **_request_attributes(f),
        "kubellm.deployment": f.deployment or "",
        "kubellm.attempts": f.attempts,
    }
    if f.gen_ai_provider:
        attrs["gen_ai.provider.name"] = f.gen_ai_provider
        attrs["gen_ai.system"] = f.gen_ai_provider  # the attribute's name before semconv 1.37
    if f.server_address:
        attrs["server.address"] = f.server_address
        if f.server_port:
            attrs["server.port"] = f.server_port
    if f.response_model:
        attrs["gen_ai.response.model"] = f.response_model
    if f.response_id:
        attrs["gen_ai.response.id"] = f.response_id
    if f.finish_reasons:
        attrs["gen_ai.response.finish_reasons"] = f.finish_reasons
    if f.usage is not None:
        attrs["gen_ai.usage.input_tokens"] = f.usage.prompt_tokens
        if f.gen_ai_operation != "embeddings":
            attrs["gen_ai.usage.output_tokens"] = f.usage.completion_tokens
        if f.usage.cached_tokens:
            attrs["gen_ai.usage.cache_read.input_tokens"] = f.usage.cached_tokens
        if f.usage.cache_write_tokens:
            attrs["gen_ai.usage.cache_creation.input_tokens"] = f.usage.cache_write_tokens
        attrs["kubellm.usage.estimated"] = f.usage.estimated
    if f.error_type:
        attrs["error.type"] = f.error_type
    return attrs


#: kubellm operation -> OpenLLMetry's ``llm.request.type``.
_LLM_REQUEST_TYPE = {"chat": "chat", "text_completion": "completion", "embeddings": "embedding"}


def openllmetry_attributes(f: Facts, *, payloads: bool) -> dict[str, Any]:
    """The attributes Traceloop's OpenLLMetry conventions read besides the GenAI ones."""
    attrs: dict[str, Any] = {"llm.request.type": _LLM_REQUEST_TYPE.get(f.gen_ai_operation, "unknown")}
    if f.usage is not None:
        attrs["gen_ai.usage.prompt_tokens"] = f.usage.prompt_tokens
        attrs["gen_ai.usage.completion_tokens"] = f.usage.completion_tokens
        attrs["llm.usage.total_tokens"] = f.usage.total_tokens
    if payloads:
        for i, msg in enumerate(input_messages(f)):
            attrs[f"gen_ai.prompt.{i}.role"] = msg["role"]
            text = "".join(str(p.get("content", "")) for p in msg["parts"] if p.get("type") == "text")
            attrs[f"gen_ai.prompt.{i}.content"] = text
        for i, choice in enumerate(f.choices):
            attrs[f"gen_ai.completion.{i}.role"] = "assistant"
            attrs[f"gen_ai.completion.{i}.content"] = choice.content
            if choice.finish_reason:
                attrs[f"gen_ai.completion.{i}.finish_reason"] = choice.finish_reason
    return attrs


class OtlpSink(Sink):
    kind = "otlp"

    def __init__(
        self,
        name: str,
        *,
        endpoint: str,
        headers: dict[str, str],
        service_name: str,
        sample_ratio: float,
        openllmetry: bool = False,
        include_payloads: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(name, **options)
        #: Add OpenLLMetry's attributes (the ``traceloop`` preset).
        self.openllmetry = openllmetry
        #: ``otlp`` sends payloads whenever the request opted in; ``traceloop`` also needs includePayloads.
        self.include_payloads = include_payloads
        from ... import __version__

        self.endpoint = traces_url(endpoint)
        self._exporter = OTLPSpanExporter(
            endpoint=self.endpoint, headers=headers or None, timeout=self.timeout
        )
        self._collect = _Collect()
        provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
            resource=Resource.create({"service.name": service_name, "service.version": __version__}),
            shutdown_on_exit=False,
        )
        provider.add_span_processor(self._collect)
        self._tracer = provider.get_tracer("kubellm.router", __version__)

    def spans(self, f: Facts) -> None:
        tracer = self._tracer
        parent = None
        if f.trace_context is not None:
            traceparent, tracestate = f.trace_context
            carrier = {"traceparent": traceparent, **({"tracestate": tracestate} if tracestate else {})}
            parent = _TRACE_CONTEXT.extract(carrier)  # an invalid header gives a root span
        server = tracer.start_span(
            f.span_name,
            context=parent,
            kind=SpanKind.SERVER,
            start_time=f.start_ns,
            attributes=server_attributes(f),
        )
        if not server.is_recording():
            return  # sampled out
        inference: Span = server
        if f.upstream_model is not None and not f.cached:
            name = f"{f.gen_ai_operation} {f.upstream_model}"
            inference = tracer.start_span(
                name,
                context=trace.set_span_in_context(server),
                kind=SpanKind.CLIENT,
                start_time=f.start_ns,
                attributes=client_attributes(f),
            )
        payloads = f.payloads_allowed and self.include_payloads
        if self.openllmetry and inference is not server:
            inference.set_attributes(openllmetry_attributes(f, payloads=payloads))
        if payloads:
            details = {"gen_ai.input.messages": orjson.dumps(input_messages(f)).decode()}
            if f.gen_ai_operation != "embeddings":
                details["gen_ai.output.messages"] = orjson.dumps(output_messages(f)).decode()
            inference.add_event(DETAILS_EVENT, details, timestamp=f.end_ns)
        for span in {id(inference): inference, id(server): server}.values():
            if f.failed:
                span.set_status(Status(StatusCode.ERROR, f"HTTP {f.status}"))
            span.end(end_time=f.end_ns)

    def encode(self, batch: list[Record]) -> list[ReadableSpan] | None:
        self._collect.spans = []
        for rec in batch:
            self.spans(rec.facts)
        spans, self._collect.spans = self._collect.spans, []
        return spans or None

    async def deliver(self, prepared: Any) -> None:
        # The exporter is synchronous (it has its own HTTP client): run it off the sink loop.
        result = await asyncio.get_running_loop().run_in_executor(None, self._exporter.export, prepared)
        if result is not SpanExportResult.SUCCESS:
            raise DeliveryError("OTLP export failed", retryable=True)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._exporter.shutdown)
