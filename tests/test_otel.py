"""OpenTelemetry traces over OTLP/HTTP, end to end: a real router process and a fake collector."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import MASTER_KEY, UPSTREAM_KEY, openai_deployment
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.fakes.otlp_collector import FakeCollector, SpanView
from tests.support.servers import RouterProcess

KEYS = {"LOGGED_KEY": "sk-otel-logged-0123456789", "PLAIN_KEY": "sk-otel-plain-0123456789"}
OTEL_TOKEN = "Bearer otel-export-token"
DETAILS = "gen_ai.client.inference.operation.details"


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    with FakeCollector(required_headers={"Authorization": OTEL_TOKEN}) as fake:
        yield fake


def _config(fake: FakeOpenAI, otel: dict[str, Any] | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "deployments": [
            openai_deployment(fake, name="dep"),
            openai_deployment(fake, name="emb", model="emb", upstreamModel="upstream-emb"),
        ],
        "keys": [
            {"name": "logged", "keyEnv": "LOGGED_KEY", "logPayloads": True},
            {"name": "plain", "keyEnv": "PLAIN_KEY"},
        ],
        "settings": {"numRetries": 0},
    }
    if otel is not None:
        config["settings"]["otel"] = otel
    return config


def _client(router: RouterProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.v1, api_key=key, max_retries=0)


def _pair(spans: list[SpanView], request_id: str) -> tuple[SpanView, SpanView | None]:
    """The router's SERVER span of a request and its CLIENT child, if any."""
    server = next(s for s in spans if s.attributes.get("kubellm.request_id") == request_id)
    children = [s for s in spans if s.parent_span_id == server.span_id]
    assert len(children) <= 1
    return server, (children[0] if children else None)


def test_spans_follow_the_genai_semantic_conventions(
    fake_openai: FakeOpenAI, collector: FakeCollector, start_router: Callable[..., RouterProcess]
) -> None:
    otel = {
        "endpoint": collector.endpoint,
        "headersEnv": "OTEL_HEADERS",
        "serviceName": "kubellm-test",
        "flushIntervalSeconds": 0.2,
    }
    env = {
        **KEYS,
        "KUBELLM_MASTER_KEY": MASTER_KEY,
        "OTEL_HEADERS": orjson.dumps({"Authorization": OTEL_TOKEN}).decode(),
    }
    router = start_router(_config(fake_openai, otel), env=env)
    before = time.time_ns()
    plain = _client(router, KEYS["PLAIN_KEY"]).chat.completions.with_raw_response.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "hello plain"}],
        max_tokens=5,
        temperature=0.5,
        top_p=0.9,
    )
    answer = plain.parse()
    with _client(router, KEYS["LOGGED_KEY"]).chat.completions.with_streaming_response.create(
        model="gpt-test",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello logged"}],
        stream=True,
    ) as streamed:
        streamed_id = streamed.headers["x-request-id"]
        streamed_text = "".join(c.choices[0].delta.content or "" for c in streamed.parse() if c.choices)
    embedded = _client(router, KEYS["PLAIN_KEY"]).embeddings.with_raw_response.create(
        model="emb", input="vector"
    )
    fake_openai.queue(Fault(status=500))
    with pytest.raises(openai.InternalServerError) as failed:
        _client(router, KEYS["PLAIN_KEY"]).chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "fail"}]
        )
    spans = collector.wait_for_spans(8)
    after = time.time_ns()
    assert collector.rejected == []
    assert {s.resource["service.name"] for s in spans} == {"kubellm-test"}
    assert {s.scope for s in spans} == {"kubellm.router"}

    # Non-streamed chat: the router's SERVER span and the upstream call's CLIENT span, one trace.
    server, client = _pair(spans, plain.headers["x-request-id"])
    assert client is not None
    assert (server.name, server.kind) == ("chat gpt-test", "SPAN_KIND_SERVER")
    assert (client.name, client.kind) == ("chat upstream-model", "SPAN_KIND_CLIENT")
    assert client.trace_id == server.trace_id and server.parent_span_id == ""
    assert before <= server.start_ns <= client.start_ns <= client.end_ns <= server.end_ns <= after
    assert server.status == client.status == "STATUS_CODE_UNSET"
    assert server.attributes["gen_ai.operation.name"] == "chat"
    assert server.attributes["gen_ai.request.model"] == "gpt-test"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["kubellm.key.name"] == "plain"
    assert server.attributes["kubellm.deployment"] == "dep"
    assert not any(k.startswith("gen_ai.usage") for k in server.attributes)  # counted once, on the CLIENT
    assert answer.usage is not None
    expected = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai-compatible",
        "gen_ai.request.model": "upstream-model",
        "gen_ai.request.max_tokens": 5,
        "gen_ai.request.temperature": 0.5,
        "gen_ai.request.top_p": 0.9,
        "gen_ai.response.model": "upstream-model",
        "gen_ai.response.id": answer.id,
        "gen_ai.response.finish_reasons": ["stop"],
        "gen_ai.usage.input_tokens": answer.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": answer.usage.completion_tokens,
        "server.address": "127.0.0.1",
        "server.port": fake_openai.server.port,
    }
    assert {k: client.attributes.get(k) for k in expected} == expected
    assert "error.type" not in client.attributes
    assert server.events == client.events == []  # this key did not opt into payload logging

    # Streamed chat from a key that logs payloads: prompt and answer as a span event.
    server, client = _pair(spans, streamed_id)
    assert client is not None and server.attributes["kubellm.stream"] is True
    assert server.attributes["kubellm.time_to_first_token_ms"] > 0
    assert client.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert client.attributes["gen_ai.usage.output_tokens"] > 0
    [(name, at, details)] = client.events
    assert name == DETAILS and at == client.end_ns
    assert orjson.loads(details["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "be brief"}]},
        {"role": "user", "parts": [{"type": "text", "content": "hello logged"}]},
    ]
    assert orjson.loads(details["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": streamed_text}], "finish_reason": "stop"}
    ]

    # Embeddings: input tokens only.
    server, client = _pair(spans, embedded.headers["x-request-id"])
    assert client is not None and client.name == "embeddings upstream-emb"
    assert client.attributes["gen_ai.operation.name"] == "embeddings"
    assert client.attributes["gen_ai.usage.input_tokens"] == 1
    assert "gen_ai.usage.output_tokens" not in client.attributes

    # A failed request: error status and error.type on both spans.
    server, client = _pair(spans, failed.value.response.headers["x-request-id"])
    assert client is not None
    for span in (server, client):
        assert span.status == "STATUS_CODE_ERROR" and span.attributes["error.type"] == "500"
    assert server.attributes["http.response.status_code"] == 500

    raw = b"".join(e.body for e in collector.exports)
    for secret in [*KEYS.values(), MASTER_KEY, UPSTREAM_KEY, "otel-export-token"]:
        assert secret.encode() not in raw
    assert "otel-export-token" not in router.logs()


def test_sampling_ratio_zero_exports_nothing_and_one_exports_everything(
    fake_openai: FakeOpenAI, start_router: Callable[..., RouterProcess]
) -> None:
    with FakeCollector() as none, FakeCollector() as every:
        config = _config(fake_openai, {"endpoint": every.endpoint, "flushIntervalSeconds": 0.2})
        # A second OTLP destination, as a sink, sampling nothing.
        config["settings"]["sinks"] = [
            {
                "type": "otlp",
                "name": "sampled-out",
                "url": none.endpoint,
                "sampleRatio": 0,
                "flushIntervalSeconds": 0.2,
            }
        ]
        router = start_router(config, env=KEYS)
        for _ in range(3):
            _client(router, KEYS["PLAIN_KEY"]).chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "hi"}]
            )
        assert len(every.wait_for_spans(6)) == 6
        router.stop()  # shutdown flushes every sink: anything the other one held would be sent now
        assert none.exports == []


def test_the_clients_trace_context_is_joined(
    fake_openai: FakeOpenAI, collector: FakeCollector, start_router: Callable[..., RouterProcess]
) -> None:
    otel = {"endpoint": collector.endpoint, "flushIntervalSeconds": 0.2, "headersEnv": "OTEL_HEADERS"}
    env = {**KEYS, "OTEL_HEADERS": orjson.dumps({"Authorization": OTEL_TOKEN}).decode()}
    router = start_router(_config(fake_openai, otel), env=env)
    client = _client(router, KEYS["PLAIN_KEY"])
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    messages: Any = [{"role": "user", "content": "traced"}]

    def call(traceparent: str) -> str:
        reply = client.chat.completions.with_raw_response.create(
            model="gpt-test",
            messages=messages,
            extra_headers={"traceparent": traceparent, "tracestate": "vendor=1"},
        )
        return reply.headers["x-request-id"]

    joined = call(f"00-{trace_id}-{parent_id}-01")
    unsampled = call(f"00-{'1' * 32}-{'2' * 16}-00")  # the caller decided not to sample this trace
    invalid = call("not-a-traceparent")
    spans = collector.wait_for_spans(4)
    server, inference = _pair(spans, joined)
    assert inference is not None
    assert server.trace_id == inference.trace_id == trace_id
    assert server.parent_span_id == parent_id
    assert not [s for s in spans if s.attributes.get("kubellm.request_id") == unsampled]
    root, _ = _pair(spans, invalid)
    assert root.parent_span_id == "" and root.trace_id != trace_id


def _shadowed_sdk(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A tracing SDK (``opentelemetry.sdk.trace``) that records being imported, then fails.

    ``opentelemetry`` and ``opentelemetry.sdk`` are namespace packages, so a regular
    ``opentelemetry/sdk/trace`` package earlier on the path wins over the installed one. (The
    API is imported by FastAPI itself, and redis-py probes the metrics SDK: neither makes spans.)
    """
    marker = tmp_path / "tracing-sdk-was-imported"
    package = tmp_path / "shadow" / "opentelemetry" / "sdk" / "trace"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        f"open({str(marker)!r}, 'a').write('imported\\n')\nraise ImportError('shadowed by the test')\n"
    )
    path = os.pathsep.join(p for p in (str(tmp_path / "shadow"), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path}, marker


def test_without_otel_settings_the_sdk_is_never_imported(
    fake_openai: FakeOpenAI, start_router: Callable[..., RouterProcess], tmp_path: Path
) -> None:
    env, marker = _shadowed_sdk(tmp_path)
    router = start_router(_config(fake_openai, None), env={**KEYS, **env})
    client = _client(router, KEYS["LOGGED_KEY"])
    client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    stream = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    router.stop()
    assert not marker.exists(), "the router imported the tracing SDK with no otel settings"
    assert "observability sinks" not in router.logs()


def test_with_otel_settings_the_sdk_is_imported_and_a_missing_sdk_only_disables_tracing(
    fake_openai: FakeOpenAI,
    collector: FakeCollector,
    start_router: Callable[..., RouterProcess],
    tmp_path: Path,
) -> None:
    """The control for the test above: the same shadow package is seen when tracing is configured."""
    env, marker = _shadowed_sdk(tmp_path)
    router = start_router(_config(fake_openai, {"endpoint": collector.endpoint}), env={**KEYS, **env})
    answer = _client(router, KEYS["PLAIN_KEY"]).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content
    assert marker.exists()
    assert "sink otel (otlp) is disabled: the OpenTelemetry SDK is not installed" in router.logs()
