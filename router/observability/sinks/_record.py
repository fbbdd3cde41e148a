"""One finished request as the sinks see it.

The request path builds a :class:`~.._finished.Finished` record (a handful of
references and a clock reading) and nothing else. Everything derived from it,
parsing the answer payloads, pricing, the payload opt-in, happens once per
record in the sink thread, through :attr:`Finished.facts` (:func:`derive`).

What never gets here: the caller's key secret, the master key and upstream
credentials. A record carries the key's *name* and metadata, the deployment's
name, provider and host, and, only when the key or the deployment opted into
payload logging, the request body and the answer.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from ...core._finished import Finished
from ...metering._pricing import price_for, usage_cost
from ...providers import Operation, Usage

if TYPE_CHECKING:
    from ...core._dispatch import Call
    from ...core._state import Deployment

#: kubellm operation -> ``gen_ai.operation.name``.
GEN_AI_OPERATION = {
    Operation.CHAT: "chat",
    Operation.COMPLETION: "text_completion",
    Operation.EMBEDDING: "embeddings",
}

#: kubellm provider -> the well-known ``gen_ai.provider.name`` value, where the conventions name one.
GEN_AI_PROVIDER = {
    "openai": "openai",
    "azure": "azure.ai.openai",
    "anthropic": "anthropic",
    "bedrock": "aws.bedrock",
    "cohere": "cohere",
    "deepseek": "deepseek",
    "gemini": "gcp.gemini",
    "vertex": "gcp.vertex_ai",
    "groq": "groq",
    "mistral": "mistral_ai",
    "perplexity": "perplexity",
    "xai": "x_ai",
}

#: Request parameters worth reporting, by their OpenAI names.
_PARAMS = ("temperature", "top_p", "frequency_penalty", "presence_penalty", "seed", "n", "stop")


def iso(ns: int) -> str:
    """RFC 3339 UTC with milliseconds, as every vendor API here accepts."""
    moment = dt.datetime.fromtimestamp(ns / 1e9, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class Choice:
    """One answer choice, assembled from a response or from stream chunks."""

    index: int
    content: str = ""
    finish_reason: str | None = None
    tool_calls: dict[int, dict[str, str]] = field(default_factory=dict)

    def message(self) -> dict[str, Any]:
        """As an OpenAI assistant message."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = [
                {
                    "id": c.get("id", ""),
                    "type": "function",
                    "function": {"name": c.get("name", ""), "arguments": c.get("arguments", "")},
                }
                for _, c in sorted(self.tool_calls.items())
            ]
        return msg


@dataclass(slots=True)
class Facts:
    """Everything a sink may report about one request; computed once, in the sink thread."""

    request_id: str
    operation: str
    gen_ai_operation: str
    requested_model: str
    model_group: str
    deployment: str | None
    provider: str | None
    gen_ai_provider: str | None
    upstream_model: str | None
    base_url: str | None
    server_address: str | None
    server_port: int | None
    key: str
    key_owner: str | None
    key_team: str | None
    key_metadata: dict[str, str]
    status: int
    error_type: str | None
    #: The router's error (OpenAI ``type`` and ``code``) for a failed request, when it named one.
    error_kind: str | None
    error_code: str | None
    #: The error text; it can quote the upstream (and so the prompt): sent only with the payload opt-in.
    error_message: str | None
    #: The model groups a failed request went through: more than one when fallbacks ran out.
    groups_tried: tuple[str, ...]
    stream: bool
    cached: bool
    attempts: int
    start_ns: int
    end_ns: int
    latency_ms: float
    ttft_ms: float | None
    usage: Usage | None
    cost_usd: float | None
    max_tokens: int | None
    params: dict[str, Any]
    response_id: str | None
    response_model: str | None
    finish_reasons: list[str]
    #: The client's ``traceparent`` and ``tracestate`` headers, if it sent them.
    trace_context: tuple[str, str | None] | None
    #: The key or the deployment opted into payload logging; the fields below are empty otherwise.
    payloads_allowed: bool
    body: dict[str, Any] | None
    choices: list[Choice]

    @property
    def failed(self) -> bool:
        return self.status >= 400

    @property
    def first_token_ns(self) -> int | None:
        return self.start_ns + int(self.ttft_ms * 1e6) if self.ttft_ms is not None else None

    @property
    def span_name(self) -> str:
        """The GenAI span name: ``{gen_ai.operation.name} {gen_ai.request.model}``."""
        return f"{self.gen_ai_operation} {self.requested_model}".strip()

    @property
    def input(self) -> Any:
        """The prompt: chat messages, a completion prompt or embedding input (payload opt-in only)."""
        if self.body is None:
            return None
        for name in ("messages", "prompt", "input"):
            if name in self.body:
                return self.body[name]
        return None

    @property
    def answer(self) -> str:
        """The generated text of every choice, joined (payload opt-in only)."""
        return "".join(c.content for c in self.choices)

    def output_messages(self) -> list[dict[str, Any]]:
        return [c.message() for c in self.choices]


#: What the sinks receive: the request's one finished-request record.
Record = Finished


def _sanitized_url(url: str | None) -> tuple[str | None, str | None, int | None]:
    """(scheme://host[:port]/path, host, port) with any user info and query string removed."""
    if not url:
        return None, None, None
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
    except ValueError:
        return None, None, None
    if host is None:
        return None, None, None
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return f"{parts.scheme}://{netloc}{parts.path}".rstrip("/"), host, port


def _scan(payloads: list[bytes]) -> tuple[str | None, str | None, list[Choice]]:
    """Response id, response model and the choices of OpenAI response or chunk payloads."""
    response_id: str | None = None
    model: str | None = None
    choices: dict[int, Choice] = {}
    for raw in payloads:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(doc, dict):
            continue
        response_id = response_id or (doc.get("id") if isinstance(doc.get("id"), str) else None)
        model = model or (doc.get("model") if isinstance(doc.get("model"), str) else None)
        for item in doc.get("choices") or []:
            if not isinstance(item, dict):
                continue
            index = item.get("index", 0) if isinstance(item.get("index"), int) else 0
            choice = choices.setdefault(index, Choice(index))
            body = item.get("message") or item.get("delta") or {}
            if not isinstance(body, dict):
                body = {}
            text = body.get("content")
            if isinstance(text, str):
                choice.content += text
            elif isinstance(item.get("text"), str):
                choice.content += item["text"]
            for call in body.get("tool_calls") or []:
                if not isinstance(call, dict):
                    continue
                slot = choice.tool_calls.setdefault(call.get("index", len(choice.tool_calls)), {})
                if call.get("id"):
                    slot["id"] = str(call["id"])
                function = call.get("function") or {}
                if function.get("name"):
                    slot["name"] = str(function["name"])
                slot["arguments"] = slot.get("arguments", "") + str(function.get("arguments") or "")
            if isinstance(item.get("finish_reason"), str):
                choice.finish_reason = item["finish_reason"]
    return response_id, model, [choices[i] for i in sorted(choices)]


def _price(dep: Deployment, usage: Usage) -> float | None:
    price = price_for(dep.config.upstream_model or dep.config.model, dep.config.pricing)
    if price is None:
        return None
    return float(usage_cost(usage, price))


def _last_deployment(call: Call) -> Deployment | None:
    """The deployment a failed request tried last (the request path reports none for failures)."""
    if call.last_deployment is None:
        return None
    for group in call.state.groups.values():
        for dep in group.deployments:
            if dep.name == call.last_deployment:
                return dep
    return None


def derive(rec: Record) -> Facts:
    call, dep = rec.call, rec.dep
    if dep is None and not rec.cached:
        dep = _last_deployment(call)
    body = call.body
    operation = call.operation
    key_config = call.key.config if call.key is not None else None
    provider = dep.config.provider if dep is not None else None
    base_url, host, port = _sanitized_url(
        (dep.config.base_url or dep.provider.default_base_url) if dep is not None else None
    )
    allowed = bool((key_config is not None and key_config.log_payloads) or (dep and dep.config.log_payloads))
    scan = rec.payloads if (rec.payloads and operation is not Operation.EMBEDDING) else []
    response_id, response_model, choices = _scan(scan)
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    params = {name: body[name] for name in _PARAMS if body.get(name) is not None}
    if isinstance(max_tokens, int):
        params["max_tokens"] = max_tokens
    start_ns = rec.end_ns - int(rec.latency * 1e9)
    usage = rec.usage
    err = call.error if rec.status >= 400 else None
    return Facts(
        request_id=call.request_id,
        operation=operation.value,
        gen_ai_operation=GEN_AI_OPERATION.get(operation, operation.value),
        requested_model=call.group.name,  # the body's model may have been rewritten for upstream
        model_group=call.group.name,
        deployment="cache" if rec.cached else (dep.name if dep is not None else None),
        provider=provider,
        gen_ai_provider=GEN_AI_PROVIDER.get(provider, provider) if provider else None,
        upstream_model=(dep.config.upstream_model or dep.config.model) if dep is not None else None,
        base_url=base_url,
        server_address=host,
        server_port=port,
        key=call.caller_label,
        key_owner=key_config.owner if key_config else None,
        key_team=key_config.team if key_config else None,
        key_metadata=dict(key_config.metadata) if key_config else {},
        status=rec.status,
        error_type=str(rec.status) if rec.status >= 400 else None,
        error_kind=err.type if err is not None else None,
        error_code=err.code if err is not None else None,
        error_message=err.message if err is not None else None,
        groups_tried=call.groups_tried,
        stream=call.stream,
        cached=rec.cached,
        attempts=call.attempts,
        start_ns=start_ns,
        end_ns=rec.end_ns,
        latency_ms=round(rec.latency * 1000, 3),
        ttft_ms=round(rec.ttft * 1000, 3) if rec.ttft is not None else None,
        usage=usage,
        cost_usd=_price(dep, usage) if (dep is not None and usage is not None and not rec.cached) else None,
        max_tokens=max_tokens if isinstance(max_tokens, int) else None,
        params=params,
        response_id=response_id,
        response_model=response_model,
        finish_reasons=[c.finish_reason for c in choices if c.finish_reason],
        trace_context=call.trace_context,
        payloads_allowed=allowed,
        body=body if allowed else None,
        choices=choices if allowed else [],
    )


def usage_event(f: Facts, *, with_payloads: bool) -> dict[str, Any]:
    """The generic event, one flat JSON object per request, as the webhook sink posts it.

    Every key is always present (null when unknown), so the objects of a batch share one shape:
    a database's bulk-insert endpoint can take the array as it is.
    """
    usage = f.usage
    include = with_payloads and f.payloads_allowed
    return {
        "type": "kubellm.request",
        "request_id": f.request_id,
        "timestamp": iso(f.end_ns),
        "start_time": iso(f.start_ns),
        "operation": f.operation,
        "model": f.requested_model,
        "model_group": f.model_group,
        "deployment": f.deployment,
        "provider": f.provider,
        "upstream_model": f.upstream_model,
        "response_model": f.response_model,
        "response_id": f.response_id,
        "finish_reasons": f.finish_reasons,
        "key": f.key,
        "key_owner": f.key_owner,
        "key_team": f.key_team,
        "key_metadata": f.key_metadata,
        "status": f.status,
        "error_type": f.error_type,
        "stream": f.stream,
        "cached": f.cached,
        "attempts": f.attempts,
        "latency_ms": f.latency_ms,
        "ttft_ms": f.ttft_ms,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
        "cached_tokens": usage.cached_tokens if usage else None,
        "total_tokens": usage.total_tokens if usage else None,
        "usage_estimated": bool(usage and usage.estimated),
        "cost_usd": f.cost_usd,
        "params": f.params,
        "request": f.body if include else None,
        "response": f.answer if include else None,
    }
