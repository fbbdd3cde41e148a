"""Sentry, Supabase and Traceloop sinks, end to end: a real router process and protocol-enforcing fakes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import orjson
import pytest

from kubellm.router import ConfigError, parse_config
from kubellm.router.observability.sinks._supabase import COLUMNS, table_sql
from tests.conftest import MASTER_KEY, UPSTREAM_KEY, openai_deployment
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.fakes.otlp_collector import FakeCollector
from tests.fakes.sentry_supabase import FakeSentry, FakeSupabase
from tests.support.servers import RouterProcess
from tests.test_sinks import metric, wait_metric

KEYS = {"LOGGED_KEY": "sk-logged-sentry-0123456789", "PLAIN_KEY": "sk-plain-sentry-0123456789"}
SUPABASE_KEY, TRACELOOP_KEY = "sb-service-key", "tl-api-key-0123"
FAST = {"flushIntervalSeconds": 0.2, "batchSize": 10, "includePayloads": True}
SECRET_PROMPT = "the secret plan of the plain key"


@dataclass
class Stack:
    fake: FakeOpenAI
    sentry: FakeSentry
    supabase: FakeSupabase
    traceloop: FakeCollector
    router: RouterProcess
    ids: dict[str, str]


def _config(
    fake: FakeOpenAI, sentry: FakeSentry, supabase: FakeSupabase, tl: FakeCollector
) -> dict[str, Any]:
    return {
        "deployments": [
            openai_deployment(fake, name="dep"),
            openai_deployment(fake, name="dep-backup", model="backup"),
        ],
        "modelGroups": [{"name": "gpt-test", "fallbacks": ["backup"]}],
        "keys": [
            {"name": "logged", "keyEnv": "LOGGED_KEY", "logPayloads": True},
            {"name": "plain", "keyEnv": "PLAIN_KEY"},
        ],
        "settings": {
            "numRetries": 0,
            "sinks": [
                {"type": "sentry", "dsnEnv": "SENTRY_DSN", "environment": "test", **FAST},
                {"type": "supabase", "url": supabase.base, "apiKeyEnv": "SUPABASE_KEY", **FAST},
                {"type": "traceloop", "url": tl.endpoint, "apiKeyEnv": "TRACELOOP_KEY", **FAST},
            ],
        },
    }


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    sentry, supabase = FakeSentry(), FakeSupabase(COLUMNS, api_key=SUPABASE_KEY)
    traceloop = FakeCollector(required_headers={"Authorization": f"Bearer {TRACELOOP_KEY}"})
    servers = [fake, sentry, supabase, traceloop]
    for server in servers:
        server.start()
    env = {
        "TEST_UPSTREAM_KEY": UPSTREAM_KEY,
        "KUBELLM_MASTER_KEY": MASTER_KEY,
        "SENTRY_DSN": sentry.dsn(),
        "SUPABASE_KEY": SUPABASE_KEY,
        "TRACELOOP_KEY": TRACELOOP_KEY,
        **KEYS,
    }
    router = RouterProcess(_config(fake, sentry, supabase, traceloop), env=env)
    ids: dict[str, str] = {}
    try:
        router.start()
        plain = openai.OpenAI(base_url=router.v1, api_key=KEYS["PLAIN_KEY"], max_retries=0)
        logged = openai.OpenAI(base_url=router.v1, api_key=KEYS["LOGGED_KEY"], max_retries=0)
        raw = plain.chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": "hello"}]
        )
        ids[raw.headers["x-request-id"]] = "ok"
        # The group and its fallback both fail: fallbacks ran out.
        fake.queue(Fault(status=500), Fault(status=503))
        with pytest.raises(openai.APIStatusError) as info:
            plain.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": SECRET_PROMPT}]
            )
        ids[info.value.response.headers["x-request-id"]] = "exhausted"
        fake.queue(Fault(status=500))
        with pytest.raises(openai.InternalServerError) as info2:
            logged.chat.completions.create(
                model="backup", messages=[{"role": "user", "content": "logged fails"}]
            )
        ids[info2.value.response.headers["x-request-id"]] = "logged-error"
        with pytest.raises(openai.NotFoundError) as info3:  # a client mistake: not Sentry's business
            plain.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        ids[info3.value.response.headers.get("x-request-id", "none")] = "client-error"
        yield Stack(fake, sentry, supabase, traceloop, router, ids)
    finally:
        router.stop()
        for server in servers:
            server.stop()


def test_sentry_gets_one_grouped_event_per_failed_request(stack: Stack) -> None:
    events = stack.sentry.wait_for(2)
    assert wait_metric(stack.router, "kubellm_sink_events_total", "sentry", 2) == 2
    by = {e["tags"]["request_id"]: e for e in events}
    assert {stack.ids[i] for i in by} == {"exhausted", "logged-error"}  # no success, no 4xx
    exhausted = next(e for i, e in by.items() if stack.ids[i] == "exhausted")
    logged = next(e for i, e in by.items() if stack.ids[i] == "logged-error")
    # Grouped by error type, code, model group and deployment, never by the message text.
    assert exhausted["fingerprint"][0] == "kubellm" and exhausted["fingerprint"][3:] == [
        "gpt-test",
        "dep-backup",
    ]
    assert logged["fingerprint"][3:] == ["backup", "dep-backup"]
    assert (
        exhausted["tags"]["fallbacks_exhausted"] == "true"
        and logged["tags"]["fallbacks_exhausted"] == "false"
    )
    assert exhausted["contexts"]["kubellm"]["groups_tried"] == ["gpt-test", "backup"]
    assert exhausted["tags"]["status"] == "503" and exhausted["environment"] == "test"
    assert exhausted["level"] == "error" and exhausted["exception"]["values"][0]["value"].startswith(
        "HTTP 503"
    )
    # The prompt goes only with the key's opt-in.
    assert "extra" not in exhausted and SECRET_PROMPT.encode() not in b"".join(stack.sentry.bodies)
    assert logged["extra"]["request"] == [{"role": "user", "content": "logged fails"}]
    auth = stack.sentry.headers[0]["X-Sentry-Auth"]
    assert auth.startswith("Sentry sentry_version=7, sentry_key=") and "sentry_client=kubellm/" in auth
    assert stack.sentry.rejected == []


def test_supabase_gets_one_row_per_request(stack: Stack) -> None:
    stack.supabase.wait_for(len(stack.ids) - 1)  # the unknown model never reached a model group
    rows = stack.supabase.rows
    by = {stack.ids[i]: r for i, r in rows.items()}
    assert set(by) == {"ok", "exhausted", "logged-error"}
    assert by["ok"]["status"] == 200 and by["ok"]["prompt_tokens"] > 0 and by["ok"]["request"] is None
    assert by["exhausted"]["error_code"] is not None and by["exhausted"]["status"] == 503
    assert by["logged-error"]["request"]["messages"][0]["content"] == "logged fails"
    assert all("return=minimal" in p and "resolution=ignore-duplicates" in p for p in stack.supabase.prefer)
    assert stack.supabase.rejected == []
    assert set(COLUMNS) <= set(table_sql().replace(",", " ").split())


def test_traceloop_gets_otlp_spans_with_openllmetry_attributes(stack: Stack) -> None:
    spans = stack.traceloop.wait_for_spans(2 * 3 - 0)
    clients = [s for s in spans if s.kind == "SPAN_KIND_CLIENT"]
    ok = next(s for s in clients if s.attributes.get("gen_ai.usage.prompt_tokens"))
    assert ok.attributes["llm.request.type"] == "chat"
    assert ok.attributes["gen_ai.usage.prompt_tokens"] == ok.attributes["gen_ai.usage.input_tokens"]
    assert ok.resource["service.name"] == "kubellm"
    logged = [s for s in clients if "gen_ai.prompt.0.content" in s.attributes]
    assert [s.attributes["gen_ai.prompt.0.content"] for s in logged] == ["logged fails"]
    assert stack.traceloop.rejected == []


def test_no_credential_reaches_a_destination_or_the_log(stack: Stack) -> None:
    stack.sentry.wait_for(2)
    stack.traceloop.wait_for_spans(4)
    spans = orjson.dumps([s.__dict__ for s in stack.traceloop.spans], default=str)
    everything = b"\n".join(
        [*stack.sentry.bodies, *stack.supabase.bodies, spans, stack.router.logs().encode()]
    )
    for secret in [
        *KEYS.values(),
        MASTER_KEY,
        UPSTREAM_KEY,
        SUPABASE_KEY,
        TRACELOOP_KEY,
        stack.sentry.public_key,
    ]:
        assert secret.encode() not in everything, secret


def _down_config(sentry_dsn_port: int, supabase: FakeSupabase, sentry: FakeSentry) -> dict[str, Any]:
    opts = {"flushIntervalSeconds": 0.2, "batchSize": 1, "maxQueue": 2, "maxRetries": 1, "timeoutSeconds": 1}
    return {
        "deployments": [{"name": "mock", "model": "m", "provider": "mock"}],
        "settings": {
            "sinks": [
                {
                    "type": "supabase",
                    "name": "hung",
                    "url": supabase.base,
                    "apiKeyEnv": "SUPABASE_KEY",
                    **opts,
                },
                {"type": "sentry", "name": "hung-sentry", "dsnEnv": "SENTRY_DSN", **opts},
                {
                    "type": "traceloop",
                    "name": "gone",
                    "url": f"http://127.0.0.1:{sentry_dsn_port}",
                    "apiKeyEnv": "TRACELOOP_KEY",
                    **opts,
                },
            ]
        },
    }


def test_destinations_down_or_hanging_never_fail_requests_and_drops_are_counted() -> None:
    from tests.support.servers import free_port

    dead = free_port()
    with FakeSupabase(COLUMNS, api_key=SUPABASE_KEY) as supabase, FakeSentry() as sentry:
        supabase.hang = sentry.hang = 30
        env = {"SUPABASE_KEY": SUPABASE_KEY, "SENTRY_DSN": sentry.dsn(), "TRACELOOP_KEY": TRACELOOP_KEY}
        with RouterProcess(_down_config(dead, supabase, sentry), env=env) as router:
            client = openai.OpenAI(base_url=router.v1, api_key="unused", max_retries=0)
            for i in range(8):
                reply = client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": f"n{i}"}]
                )
                assert reply.choices[0].message.content
            # One batch in flight against the hanging table, two queued, the rest dropped and counted.
            assert wait_metric(router, "kubellm_sink_dropped_total", "hung", 8 - 1 - 2) >= 8 - 1 - 2
            # The refused port: exports fail (and are counted) while the queue behind them overflows.
            assert wait_metric(router, "kubellm_sink_errors_total", "gone", 1) >= 1
            assert wait_metric(router, "kubellm_sink_dropped_total", "gone", 1) >= 1
            assert metric(router, "kubellm_sink_events_total", "hung-sentry") == 0  # no failure to report
            supabase.release()
            sentry.release()


def test_supabase_4xx_is_dropped_and_counted_5xx_retried() -> None:
    with (
        FakeSupabase(COLUMNS, api_key=SUPABASE_KEY) as ok,
        FakeSupabase({"request_id": "text primary key"}, api_key=SUPABASE_KEY) as narrow,
    ):
        ok.fail_next(503, 500)
        config = {
            "deployments": [{"name": "mock", "model": "m", "provider": "mock"}],
            "settings": {
                "sinks": [
                    {
                        "type": "supabase",
                        "name": "flaky",
                        "url": ok.base,
                        "apiKeyEnv": "SUPABASE_KEY",
                        **FAST,
                    },
                    {
                        "type": "supabase",
                        "name": "narrow",
                        "url": narrow.base,
                        "apiKeyEnv": "SUPABASE_KEY",
                        **FAST,
                    },
                ]
            },
        }
        with RouterProcess(config, env={"SUPABASE_KEY": SUPABASE_KEY}) as router:
            client = openai.OpenAI(base_url=router.v1, api_key="unused", max_retries=0)
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            assert len(ok.wait_for(1)) == 1 and ok.requests == 3
            assert wait_metric(router, "kubellm_sink_events_total", "flaky", 1) == 1
            assert metric(router, "kubellm_sink_errors_total", "flaky") == 2
            assert wait_metric(router, "kubellm_sink_dropped_total", "narrow", 1) == 1
            assert narrow.requests == 1 and narrow.rejected[0]["code"] == "PGRST204"  # not retried
            logs = router.logs()
            assert "PGRST204" in logs and SUPABASE_KEY not in logs


def test_new_sink_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="dsnEnv"):
        parse_config({"settings": {"sinks": [{"type": "sentry"}]}})
    with pytest.raises(ConfigError, match="url, apiKeyEnv"):
        parse_config({"settings": {"sinks": [{"type": "supabase"}]}})
    with pytest.raises(ConfigError, match="apiKeyEnv"):
        parse_config({"settings": {"sinks": [{"type": "traceloop"}]}})
    with pytest.raises(ConfigError, match="dsn"):  # no inline credentials
        parse_config({"settings": {"sinks": [{"type": "sentry", "dsnEnv": "D", "dsn": "https://k@h/1"}]}})


def test_sentry_429_is_retried_after_its_retry_after_and_a_401_dropped() -> None:
    with FakeSentry() as limited, FakeSentry() as wrong_key:
        limited.fail_next(429)
        bad_dsn = wrong_key.dsn().replace(wrong_key.public_key, "f" * 32)
        config = {
            "deployments": [
                openai_deployment(FakeOpenAI(api_key=UPSTREAM_KEY), name="dead", baseUrl="http://127.0.0.1:1")
            ],
            "settings": {
                "numRetries": 0,
                "sinks": [
                    {"type": "sentry", "name": "limited", "dsnEnv": "DSN_A", **FAST},
                    {"type": "sentry", "name": "wrong", "dsnEnv": "DSN_B", **FAST},
                ],
            },
        }
        env = {"TEST_UPSTREAM_KEY": UPSTREAM_KEY, "DSN_A": limited.dsn(), "DSN_B": bad_dsn}
        with RouterProcess(config, env=env) as router:
            client = openai.OpenAI(base_url=router.v1, api_key="unused", max_retries=0)
            with pytest.raises(openai.APIStatusError) as info:  # the upstream refuses connections
                client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
            assert info.value.status_code >= 500
            (event,) = limited.wait_for(1)
            assert event["exception"]["values"][0]["type"] == "upstream_connect_error"
            assert event["fingerprint"] == [
                "kubellm",
                "upstream_error",
                "upstream_connect_error",
                "gpt-test",
                "dead",
            ]
            assert limited.requests == 2 and metric(router, "kubellm_sink_errors_total", "limited") == 1
            assert wait_metric(router, "kubellm_sink_dropped_total", "wrong", 1) == 1
            assert wrong_key.requests == 1 and wrong_key.rejected == ["invalid api key"]  # not retried
            assert "f" * 32 not in router.logs()


@pytest.mark.parametrize(
    ("dsn", "url", "key"),
    [
        ("https://abc@o1.ingest.sentry.io/42", "https://o1.ingest.sentry.io/api/42/envelope/", "abc"),
        (
            "https://abc:secret@sentry.example.com:9000/sub/7",
            "https://sentry.example.com:9000/sub/api/7/envelope/",
            "abc",
        ),
    ],
)
def test_dsn_names_the_envelope_endpoint(dsn: str, url: str, key: str) -> None:
    from kubellm.router.observability.sinks._sentry import parse_dsn

    assert parse_dsn(dsn) == (url, key)


@pytest.mark.parametrize("dsn", ["https://sentry.io/42", "https://k@sentry.io/abc", "ftp://k@h/1"])
def test_a_bad_dsn_is_refused_without_quoting_it(dsn: str) -> None:
    from kubellm.router.observability.sinks._base import SinkSetupError
    from kubellm.router.observability.sinks._sentry import parse_dsn

    with pytest.raises(SinkSetupError) as info:
        parse_dsn(dsn)
    assert dsn not in str(info.value)
