"""What happens once per finished request: metrics, the access log, and the usage record.

When a provider reported no usage, the record's token counts come from a real
tokenizer (cl100k_base) over the prompt and the answer, and are marked estimated.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson

from ..audio._api import audio_usage
from ..core._finished import Finished
from ..metering._tokens import real_count, real_prompt_tokens
from ..providers import Operation, Usage
from ..providers._openai_audio import AUDIO
from . import _metrics as metrics
from ._hub import hub as sinks
from ._logging import access_log

if TYPE_CHECKING:
    from ..core._dispatch import Call
    from ..core._state import Deployment
    from ..metering._meter import Meter


def _answer_text(payloads: list[bytes]) -> str:
    """The generated text in OpenAI response or chunk payloads."""
    parts: list[str] = []
    for raw in payloads:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        for choice in doc.get("choices") or [] if isinstance(doc, dict) else []:
            body: Any = choice.get("message") or choice.get("delta") or {}
            text = body.get("content") if isinstance(body, dict) else None
            parts.append(text if isinstance(text, str) else choice.get("text") or "")
            for call in (body.get("tool_calls") or []) if isinstance(body, dict) else []:
                parts.append(str((call.get("function") or {}).get("arguments") or ""))
    return "".join(parts)


def estimate_usage(call: Call, payloads: list[bytes]) -> Usage:
    if call.operation in AUDIO:
        return audio_usage(call)  # audio is counted in characters and seconds, not tokens
    prompt = real_prompt_tokens(call.body)
    completion = 0 if call.operation is Operation.EMBEDDING else real_count(_answer_text(payloads))
    return Usage(prompt_tokens=prompt, completion_tokens=completion, estimated=True)


def finish_request(
    meter: Meter,
    call: Call,
    dep: Deployment | None,
    status: int,
    usage: Usage | None,
    ttft: float | None,
    payloads: list[bytes] | None = None,
    *,
    cached: bool = False,
) -> Finished:
    """Meter a finished request, then build its one record and report it to the metrics, the
    sinks and the access log; ``payloads`` are the bodies or stream event data it returned."""
    latency = time.monotonic() - call.started
    # A stream that failed part-way still cost what flowed before the failure: estimate it too.
    if usage is None and payloads and not cached:
        usage = estimate_usage(call, payloads)
    spend = (
        meter.finish(call, call.ticket, None if cached else dep, status, usage, latency, ttft)
        if call.ticket is not None
        else 0
    )
    record = Finished(
        call=call,
        dep=dep,
        status=status,
        usage=usage,
        ttft=ttft,
        payloads=payloads,
        latency=latency,
        cached=cached,
        spend=float(spend),
        end_ns=time.time_ns(),
    )
    metrics.recorder.finished(record)
    if sinks.active:  # observability sinks (OTel, webhook, vendors): an O(1) hand-off, off the loop
        sinks.submit(record)
    if call.state.config.settings.access_log and access_log.enabled:
        access_log.emit(_access_fields(record))
    return record


def _access_fields(rec: Finished) -> dict[str, Any]:
    call, usage, dep = rec.call, rec.usage, rec.dep
    fields: dict[str, Any] = {
        "request_id": call.request_id,
        "operation": call.operation.value,
        "model_group": call.group.name,
        "deployment": rec.deployment or None,
        "key": call.caller_label,
        "status": rec.status,
        "stream": call.stream,
        "attempts": call.attempts,
        "cached": rec.cached,
        "latency_ms": round(rec.latency * 1000, 3),
        "ttft_ms": round(rec.ttft * 1000, 3) if rec.ttft is not None else None,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
        "usage_estimated": bool(usage and usage.estimated),
    }
    opted_in = (call.key is not None and call.key.config.log_payloads) or (
        dep is not None and dep.config.log_payloads
    )
    if opted_in:
        fields["request"] = call.body
        fields["response"] = _answer_text(rec.payloads or [])
    return fields
