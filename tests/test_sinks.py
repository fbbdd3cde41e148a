"""Observability sinks, end to end: a real router process feeding protocol-enforcing fake receivers."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import orjson
import pytest

from kubellm.router import ConfigError, parse_config
from tests.conftest import MASTER_KEY, UPSTREAM_KEY, openai_deployment
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.fakes.otlp_collector import FakeCollector
from tests.fakes.sink_receivers import (
    FakeHelicone,
    FakeLangfuse,
    FakeLunary,
    FakeMixpanel,
    FakePostHog,
    FakeWebhook,
)
from tests.support.servers import RouterProcess, http_get

KEYS = {"LOGGED_KEY": "sk-logged-0123456789abcdef", "PLAIN_KEY": "sk-plain-0123456789abcdef"}
SINK_ENV = {
    "HOOK_HEADERS": '{"Authorization": "Bearer hook-token"}',
    "LANGFUSE_PUBLIC": "pk-lf-test",
    "LANGFUSE_SECRET": "sk-lf-test",
    "POSTHOG_KEY": "phc_test",
    "MIXPANEL_TOKEN": "mp-token-test",
    "LUNARY_KEY": "lunary-public-test",
    "HELICONE_KEY": "sk-helicone-test",
}
SECRETS = [*KEYS.values(), MASTER_KEY, UPSTREAM_KEY]
FAST = {"flushIntervalSeconds": 0.2, "batchSize": 10, "includePayloads": True}
PRICING = {"inputPerMillion": "1", "outputPerMillion": "2"}
#: Requests the shared traffic sends; every sink gets one event (or event pair) per request.
REQUESTS = 4


def _keys() -> list[dict[str, Any]]:
    return [
        {
            "name": "logged",
            "keyEnv": "LOGGED_KEY",
            "logPayloads": True,
            "owner": "alice",
            "team": "research",
            "metadata": {"costCenter": "42"},
        },
        {"name": "plain", "keyEnv": "PLAIN_KEY"},
    ]


def _client(router: RouterProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.v1, api_key=key, max_retries=0)


def metric(router: RouterProcess, name: str, sink: str) -> float:
    text = http_get(router.base_url + "/metrics")[1].decode()
    found = re.search(rf'^{name}{{sink="{re.escape(sink)}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def wait_metric(router: RouterProcess, name: str, sink: str, value: float, timeout: float = 15) -> float:
    deadline = time.monotonic() + timeout
    seen = 0.0
    while time.monotonic() < deadline:
        seen = metric(router, name, sink)
        if seen >= value:
            return seen
        time.sleep(0.05)
    return seen


@dataclass
class Stack:
    fake: FakeOpenAI
    webhook: FakeWebhook
    langfuse: FakeLangfuse
    posthog: FakePostHog
    mixpanel: FakeMixpanel
    lunary: FakeLunary
    helicone: FakeHelicone
    collector: FakeCollector
    router: RouterProcess
    #: request id -> which request it was: "plain", "stream", "error", "master".
    ids: dict[str, str]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    webhook, langfuse, posthog = FakeWebhook(), FakeLangfuse(), FakePostHog()
    mixpanel, lunary, helicone, collector = FakeMixpanel(), FakeLunary(), FakeHelicone(), FakeCollector()
    servers = [fake, webhook, langfuse, posthog, mixpanel, lunary, helicone, collector]
    for server in servers:
        server.start()
    config = {
        "deployments": [openai_deployment(fake, name="dep", pricing=PRICING)],
        "keys": _keys(),
        "settings": {
            "numRetries": 0,
            "otel": {"endpoint": collector.endpoint, "flushIntervalSeconds": 0.2},
            "sinks": [
                {"type": "webhook", "url": webhook.url, "headersEnv": "HOOK_HEADERS", **FAST},
                {
                    "type": "langfuse",
                    "url": langfuse.base_url,
                    "publicKeyEnv": "LANGFUSE_PUBLIC",
                    "secretKeyEnv": "LANGFUSE_SECRET",
                    **FAST,
                },
                {"type": "posthog", "url": posthog.base_url, "apiKeyEnv": "POSTHOG_KEY", **FAST},
                {"type": "mixpanel", "url": mixpanel.base_url, "apiKeyEnv": "MIXPANEL_TOKEN", **FAST},
                {"type": "lunary", "url": lunary.base_url, "apiKeyEnv": "LUNARY_KEY", **FAST},
                {"type": "helicone", "url": helicone.base_url, "apiKeyEnv": "HELICONE_KEY", **FAST},
            ],
        },
    }
    env = {"TEST_UPSTREAM_KEY": UPSTREAM_KEY, "KUBELLM_MASTER_KEY": MASTER_KEY, **KEYS, **SINK_ENV}
    router = RouterProcess(config, env=env)
    ids: dict[str, str] = {}
    try:
        router.start()
        raw = _client(router, KEYS["PLAIN_KEY"]).chat.completions.with_raw_response.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hello plain"}],
            max_tokens=7,
            temperature=0.5,
        )
        ids[raw.headers["x-request-id"]] = "plain"
        with _client(router, KEYS["LOGGED_KEY"]).chat.completions.with_streaming_response.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hello logged"}],
            stream=True,
            stream_options={"include_usage": True},
        ) as streamed:
            ids[streamed.headers["x-request-id"]] = "stream"
            assert "says hi" in "".join(
                c.choices[0].delta.content or "" for c in streamed.parse() if c.choices
            )
        fake.queue(Fault(status=500))
        with pytest.raises(openai.InternalServerError) as info:
            _client(router, KEYS["LOGGED_KEY"]).chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "this one fails"}]
            )
        ids[info.value.response.headers["x-request-id"]] = "error"
        raw = _client(router, MASTER_KEY).chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": "hello master"}]
        )
        ids[raw.headers["x-request-id"]] = "master"
        yield Stack(fake, webhook, langfuse, posthog, mixpanel, lunary, helicone, collector, router, ids)
    finally:
        router.stop()
        for server in servers:
            server.stop()


def test_webhook_posts_one_flat_event_per_request(stack: Stack) -> None:
    events = {e["request_id"]: e for e in stack.webhook.wait_for(REQUESTS)}
    assert {stack.ids[i] for i in events} == {"plain", "stream", "error", "master"}
    by = {stack.ids[i]: e for i, e in events.items()}
    plain, streamed, error, master = by["plain"], by["stream"], by["error"], by["master"]
    assert plain["key"] == "plain" and plain["status"] == 200 and plain["stream"] is False
    assert plain["deployment"] == "dep" and plain["provider"] == "openai-compatible"
    assert plain["upstream_model"] == plain["response_model"] == "upstream-model"
    assert plain["response_id"] == "chatcmpl-fake" and plain["finish_reasons"] == ["stop"]
    assert plain["params"] == {"temperature": 0.5, "max_tokens": 7}
    assert plain["prompt_tokens"] > 0 and plain["completion_tokens"] > 0
    assert plain["cost_usd"] == pytest.approx((plain["prompt_tokens"] + 2 * plain["completion_tokens"]) / 1e6)
    # Payloads only for the key that opted in.
    assert plain["request"] is None and plain["response"] is None
    assert streamed["request"]["messages"] == [{"role": "user", "content": "hello logged"}]
    assert "says hi" in streamed["response"] and streamed["stream"] is True
    assert streamed["ttft_ms"] is not None and streamed["ttft_ms"] <= streamed["latency_ms"]
    assert streamed["key_owner"] == "alice" and streamed["key_metadata"] == {"costCenter": "42"}
    assert error["status"] == 500 and error["error_type"] == "500" and error["deployment"] == "dep"
    assert error["prompt_tokens"] is None and error["cost_usd"] is None
    assert master["key"] == "master"


def test_langfuse_gets_a_trace_and_a_generation_per_request(stack: Stack) -> None:
    events = stack.langfuse.wait_for(2 * REQUESTS)
    traces = {e["body"]["id"]: e["body"] for e in events if e["type"] == "trace-create"}
    generations = {e["body"]["traceId"]: e["body"] for e in events if e["type"] == "generation-create"}
    assert set(traces) == set(generations) == set(stack.ids)
    by = {stack.ids[i]: (traces[i], generations[i]) for i in stack.ids}
    trace, gen = by["plain"]
    assert trace["name"] == gen["name"] == "chat gpt-test"
    assert trace["userId"] == "plain" and gen["model"] == "upstream-model"
    assert gen["modelParameters"] == {"temperature": "0.5", "max_tokens": 7}
    usage = gen["usageDetails"]
    assert usage["input"] > 0 and usage["total"] == usage["input"] + usage["output"]
    assert gen["costDetails"]["total"] > 0 and gen["level"] == "DEFAULT"
    assert "input" not in gen and "output" not in gen
    trace, gen = by["stream"]
    assert gen["input"] == [{"role": "user", "content": "hello logged"}]
    assert "says hi" in gen["output"]["content"] and "completionStartTime" in gen
    assert trace["userId"] == "alice"
    _, gen = by["error"]
    assert gen["level"] == "ERROR" and gen["statusMessage"] == "HTTP 500"


def test_posthog_gets_ai_generation_events(stack: Stack) -> None:
    events = stack.posthog.wait_for(REQUESTS)
    assert {e["event"] for e in events} == {"$ai_generation"}
    by = {stack.ids[e["properties"]["$ai_trace_id"]]: e for e in events}
    plain = by["plain"]["properties"]
    assert by["plain"]["distinct_id"] == plain["distinct_id"] == "plain"
    assert plain["$ai_model"] == "upstream-model" and plain["$ai_provider"] == "openai-compatible"
    assert plain["$ai_input_tokens"] > 0 and plain["$ai_output_tokens"] > 0
    assert plain["$ai_is_error"] is False and plain["$ai_http_status"] == 200
    assert plain["$ai_base_url"] == stack.fake.base_url
    assert "$ai_input" not in plain and "$ai_output_choices" not in plain
    streamed = by["stream"]["properties"]
    assert streamed["$ai_stream"] is True and streamed["$ai_time_to_first_token"] > 0
    assert streamed["$ai_input"] == [{"role": "user", "content": "hello logged"}]
    assert "says hi" in streamed["$ai_output_choices"][0]["content"]
    error = by["error"]["properties"]
    assert error["$ai_is_error"] is True and error["$ai_error"] == "HTTP 500"


def test_mixpanel_imports_one_event_per_request(stack: Stack) -> None:
    events = stack.mixpanel.wait_for(REQUESTS)
    props = {stack.ids[e["properties"]["request_id"]]: e["properties"] for e in events}
    assert len({p["$insert_id"] for p in props.values()}) == REQUESTS
    assert props["plain"]["distinct_id"] == "plain" and props["plain"]["model"] == "gpt-test"
    assert props["stream"]["key_costCenter"] == "42" and "says hi" in props["stream"]["response"]
    assert props["error"]["status"] == 500


def test_lunary_gets_run_start_and_end_events(stack: Stack) -> None:
    events = stack.lunary.wait_for(2 * REQUESTS)
    runs: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        runs.setdefault(event["runId"], []).append(event)
    assert len(runs) == REQUESTS
    by = {stack.ids[r[0]["metadata"]["request_id"]]: r for r in runs.values()}
    start, end = by["plain"]
    assert start["event"] == "start" and start["type"] == "llm" and start["input"] is None
    assert end["event"] == "end" and end["tokensUsage"]["prompt"] > 0
    start, end = by["stream"]
    assert (
        start["input"] == [{"role": "user", "content": "hello logged"}]
        and "says hi" in end["output"]["content"]
    )
    assert by["error"][1]["event"] == "error"


def test_helicone_gets_one_log_per_request(stack: Stack) -> None:
    logs = stack.helicone.wait_for(REQUESTS)
    by = {stack.ids[log["providerRequest"]["meta"]["Helicone-Property-Request-Id"]]: log for log in logs}
    plain = by["plain"]
    assert plain["providerResponse"]["status"] == 200
    assert plain["providerResponse"]["json"]["usage"]["prompt_tokens"] > 0
    assert "messages" not in plain["providerRequest"]["json"]
    assert by["stream"]["providerRequest"]["json"]["messages"][0]["content"] == "hello logged"
    assert by["error"]["providerResponse"]["status"] == 500


def test_no_secret_appears_in_any_sink_output(stack: Stack) -> None:
    for receiver, count in ((stack.webhook, REQUESTS), (stack.posthog, REQUESTS), (stack.helicone, REQUESTS)):
        receiver.wait_for(count)
    stack.collector.wait_for_spans(2 * REQUESTS)
    bodies = [
        *stack.webhook.bodies,
        *stack.langfuse.bodies,
        *stack.posthog.bodies,
        *stack.mixpanel.bodies,
        *stack.lunary.bodies,
        *stack.helicone.bodies,
        *(e.body for e in stack.collector.exports),
    ]
    spans = orjson.dumps([span.__dict__ for span in stack.collector.spans], default=str)
    everything = b"\n".join([*bodies, spans, stack.router.logs().encode()])
    for secret in SECRETS:
        assert secret.encode() not in everything, secret
    # The sinks' own credentials go only into their own requests' headers (or PostHog's body).
    logs = stack.router.logs()
    for name, value in SINK_ENV.items():
        if name != "HOOK_HEADERS":
            assert value not in logs, name
    assert "hook-token" not in logs


def _retry_config(ok: FakeWebhook, reject: FakeWebhook) -> dict[str, Any]:
    return {
        "deployments": [{"name": "mock", "model": "m", "provider": "mock"}],
        "settings": {
            "sinks": [
                {"type": "webhook", "name": "flaky", "url": ok.url, "headersEnv": "HOOK_HEADERS", **FAST},
                {
                    "type": "webhook",
                    "name": "strict",
                    "url": reject.url,
                    "headersEnv": "HOOK_HEADERS",
                    **FAST,
                },
                # Credentials unset: this sink is skipped and the others run.
                {"type": "langfuse", "publicKeyEnv": "NO_SUCH_PUBLIC", "secretKeyEnv": "NO_SUCH_SECRET"},
            ]
        },
    }


def test_failed_batches_are_retried_with_backoff_and_rejected_ones_dropped() -> None:
    with FakeWebhook() as flaky, FakeWebhook() as strict:
        flaky.fail_next(503, 500)
        strict.fail_next(400)
        with RouterProcess(_retry_config(flaky, strict), env=SINK_ENV) as router:
            client = openai.OpenAI(base_url=router.v1, api_key="unused", max_retries=0)
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            assert len(flaky.wait_for(1)) == 1
            assert wait_metric(router, "kubellm_sink_events_total", "flaky", 1) == 1
            assert metric(router, "kubellm_sink_errors_total", "flaky") == 2
            assert flaky.requests == 3
            assert wait_metric(router, "kubellm_sink_dropped_total", "strict", 1) == 1
            assert metric(router, "kubellm_sink_errors_total", "strict") == 1
            assert strict.requests == 1 and strict.events == []  # a 400 is not retried
            logs = router.logs()
            assert "sink langfuse (langfuse) is disabled" in logs and "NO_SUCH_PUBLIC" in logs


def test_a_full_queue_drops_and_counts_and_a_stuck_receiver_never_slows_requests() -> None:
    with FakeWebhook() as slow, FakeWebhook() as never:
        slow.hang = 30
        config = {
            "deployments": [{"name": "mock", "model": "m", "provider": "mock"}],
            "settings": {
                "sinks": [
                    # Never flushed during the test: holds 3 events, drops the rest.
                    {
                        "type": "webhook",
                        "name": "full",
                        "url": never.url,
                        "headersEnv": "HOOK_HEADERS",
                        "maxQueue": 3,
                        "batchSize": 100,
                        "flushIntervalSeconds": 600,
                    },
                    # Its receiver hangs: one batch in flight, a small queue behind it.
                    {
                        "type": "webhook",
                        "name": "stuck",
                        "url": slow.url,
                        "headersEnv": "HOOK_HEADERS",
                        "maxQueue": 2,
                        "batchSize": 1,
                        "timeoutSeconds": 2,
                        "maxRetries": 0,
                    },
                ]
            },
        }
        with RouterProcess(config, env=SINK_ENV) as router:
            client = openai.OpenAI(base_url=router.v1, api_key="unused", max_retries=0)
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "warm up"}])
            started = time.monotonic()
            for i in range(9):
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"n{i}"}])
            elapsed = time.monotonic() - started
            assert elapsed < 5, f"requests took {elapsed:.1f}s while a sink receiver hung"
            assert metric(router, "kubellm_sink_dropped_total", "full") == 10 - 3
            assert metric(router, "kubellm_sink_dropped_total", "stuck") >= 10 - 1 - 2
            assert never.requests == 0
            slow.release()


def test_sink_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="url"):
        parse_config({"settings": {"sinks": [{"type": "webhook"}]}})
    with pytest.raises(ConfigError, match="publicKeyEnv, secretKeyEnv"):
        parse_config({"settings": {"sinks": [{"type": "langfuse"}]}})
    with pytest.raises(ConfigError, match="type"):
        parse_config({"settings": {"sinks": [{"type": "splunk", "url": "http://x"}]}})
    config = parse_config({"settings": {"sinks": [{"type": "posthog", "apiKeyEnv": "PH"}]}})
    assert config.settings.sinks[0].include_payloads is False and config.settings.otel is None
