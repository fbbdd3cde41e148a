"""The native Anthropic path end to end: the real anthropic SDK -> the router process -> the fakes.

An Anthropic deployment gets ``/v1/messages`` untranslated (cache_control, thinking, top_k,
documents, server tools, anthropic-beta), cache reads and writes are metered and priced at their
own prices, ``/v1/messages/count_tokens`` is counted upstream or estimated, errors keep Anthropic's
shape, and a group mixing Anthropic and OpenAI deployments still serves through translation.
"""

from __future__ import annotations

import copy
import http.client
import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anthropic
import orjson
import pytest

from kubellm.router.inbound._count_tokens import estimate_input_tokens
from tests.fakes.anthropic_upstream import FakeAnthropic, Fault, prompt_words
from tests.fakes.openai_upstream import FakeOpenAI
from tests.support.servers import RouterProcess
from tests.test_anthropic_native_provider import EPHEMERAL, THINKING_BODY, TOP_K_BODY

ANTHROPIC_KEY = "sk-ant-e2e-upstream"
OPENAI_KEY = "sk-openai-e2e-upstream-0123"
MASTER = "sk-master-e2e-0123456789"
LIMITED = "sk-limited-e2e-0123456789"
UPSTREAM_MODEL = "claude-sonnet-4-20250514"
BETAS = "files-api-2025-04-14,interleaved-thinking-2025-05-14"
PRICING = {
    "inputPerMillion": "3",
    "outputPerMillion": "15",
    "cachedInputPerMillion": "0.30",
    "cacheWriteInputPerMillion": "3.75",
}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(api_key=ANTHROPIC_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def fake_openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=OPENAI_KEY) as server:
        yield server


def _config(fake: FakeAnthropic, fake_openai: FakeOpenAI) -> dict[str, Any]:
    claude = {
        "provider": "anthropic",
        "upstreamModel": UPSTREAM_MODEL,
        "baseUrl": fake.base_url,
        "apiKeyEnv": "TEST_ANTHROPIC_KEY",
        "pricing": PRICING,
    }
    gpt = {
        "provider": "openai-compatible",
        "upstreamModel": "gpt-upstream",
        "baseUrl": fake_openai.base_url,
        "apiKeyEnv": "TEST_OPENAI_KEY",
    }
    return {
        "deployments": [
            {"model": "claude", "name": "claude-native", **claude},
            {"model": "gpt", "name": "gpt-chat", **gpt},
            {"model": "mixed", "name": "mixed-claude", "priority": 0, **claude},
            {"model": "mixed", "name": "mixed-gpt", "priority": 1, **gpt},
        ],
        "keys": [{"name": "limited", "keyEnv": "TEST_LIMITED_KEY", "models": ["gpt"]}],
        "settings": {"numRetries": 1, "cooldown": {"failureThreshold": 1000}},
    }


def _env() -> dict[str, str]:
    return {
        "KUBELLM_MASTER_KEY": MASTER,
        "TEST_ANTHROPIC_KEY": ANTHROPIC_KEY,
        "TEST_OPENAI_KEY": OPENAI_KEY,
        "TEST_LIMITED_KEY": LIMITED,
    }


@pytest.fixture(scope="module")
def router(fake: FakeAnthropic, fake_openai: FakeOpenAI) -> Iterator[RouterProcess]:
    with RouterProcess(_config(fake, fake_openai), env=_env()) as proc:
        yield proc


@pytest.fixture
def client(router: RouterProcess, fake: FakeAnthropic) -> anthropic.Anthropic:
    fake.faults.clear()
    fake.replies.clear()
    return anthropic.Anthropic(base_url=router.base_url, api_key=MASTER, max_retries=0)


#: Sampling fields this SDK release no longer has parameters for: sent through ``extra_body``.
_EXTRA = ("top_k", "top_p", "temperature")


def _params(body: dict[str, Any], model: str = "claude") -> dict[str, Any]:
    return {**copy.deepcopy(body), "model": model}


def _kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` as SDK keyword arguments."""
    kwargs = {k: v for k, v in params.items() if k not in _EXTRA}
    extra = {k: params[k] for k in _EXTRA if k in params}
    return {**kwargs, "extra_body": extra} if extra else kwargs


def _arrived_unchanged(fake: FakeAnthropic, sent: dict[str, Any]) -> None:
    seen = fake.seen[-1]
    assert {k: v for k, v in seen.body.items() if k != "stream"} == {**sent, "model": UPSTREAM_MODEL}
    assert seen.headers["anthropic-beta"] == BETAS
    assert seen.headers["x-api-key"] == ANTHROPIC_KEY  # the router's credential, not the client's


def test_thinking_documents_cache_control_and_betas_arrive_as_sent(
    client: anthropic.Anthropic, fake: FakeAnthropic
) -> None:
    params = _params(THINKING_BODY)
    message = client.messages.create(**params, extra_headers={"anthropic-beta": BETAS})
    _arrived_unchanged(fake, params)
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].signature  # type: ignore[union-attr]
    assert message.model == UPSTREAM_MODEL  # the upstream's answer, passed through


def test_streamed_thinking_passes_through_event_by_event(
    client: anthropic.Anthropic, fake: FakeAnthropic
) -> None:
    params = _params(THINKING_BODY)
    kinds: list[str] = []
    with client.messages.stream(**params, extra_headers={"anthropic-beta": BETAS}) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                kinds.append(event.delta.type)
        final = stream.get_final_message()
    _arrived_unchanged(fake, params)
    assert fake.seen[-1].body["stream"] is True
    assert {"thinking_delta", "signature_delta", "text_delta"} <= set(kinds)
    assert final.content[0].type == "thinking" and final.content[0].signature  # type: ignore[union-attr]


def test_beta_client_and_top_k(client: anthropic.Anthropic, fake: FakeAnthropic) -> None:
    params = _params(TOP_K_BODY)
    message = client.beta.messages.create(
        **_kwargs(params), betas=BETAS.split(",")
    )  # POST /v1/messages?beta=true
    _arrived_unchanged(fake, params)
    assert fake.seen[-1].body["top_k"] == 5
    assert message.content[0].type == "text"


def test_upstream_refusals_keep_anthropics_shape(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            **_params({**THINKING_BODY, "thinking": {"type": "enabled", "budget_tokens": 9}})
        )
    assert "1024" in info.value.message
    assert info.value.body["type"] == "error"  # type: ignore[index]
    assert info.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


def test_an_error_mid_stream_is_an_anthropic_error_event(
    client: anthropic.Anthropic, fake: FakeAnthropic
) -> None:
    fake.faults.append(Fault(stream_error="overloaded_error"))
    with (
        pytest.raises(anthropic.APIStatusError) as info,
        client.messages.stream(**_kwargs(_params(TOP_K_BODY))) as stream,
    ):
        for _ in stream:
            pass
    assert "overloaded" in str(info.value.body)


# --- count_tokens -------------------------------------------------------------------------------------


def _count_body() -> dict[str, Any]:
    return {k: v for k, v in THINKING_BODY.items() if k not in ("max_tokens", "metadata", "service_tier")}


def test_count_tokens_is_native_for_anthropic_deployments(
    client: anthropic.Anthropic, fake: FakeAnthropic
) -> None:
    body = _params(_count_body())
    raw = client.messages.with_raw_response.count_tokens(**body, extra_headers={"anthropic-beta": BETAS})
    assert raw.parse().input_tokens == prompt_words(body)
    assert raw.headers["x-kubellm-token-count"] == "upstream"
    assert raw.headers["x-kubellm-deployment"] == "claude-native"
    seen = fake.counted[-1]
    assert seen.body == {**body, "model": UPSTREAM_MODEL}
    assert seen.headers["anthropic-beta"] == BETAS


def test_count_tokens_is_estimated_for_other_deployments(client: anthropic.Anthropic) -> None:
    body = _params(_count_body(), "gpt")
    raw = client.messages.with_raw_response.count_tokens(**body)
    assert raw.headers["x-kubellm-token-count"] == "estimate"
    counted = raw.parse().input_tokens
    assert counted == estimate_input_tokens(body) and counted > 1600  # the PDF counts as a page
    assert (
        client.messages.count_tokens(model="gpt", messages=[{"role": "user", "content": "hi"}]).input_tokens
        > 0
    )


def test_count_tokens_errors_are_anthropic_shaped(router: RouterProcess) -> None:
    messages = [{"role": "user", "content": "hi"}]
    nobody = anthropic.Anthropic(base_url=router.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        nobody.messages.count_tokens(model="claude", messages=messages)  # type: ignore[arg-type]
    limited = anthropic.Anthropic(base_url=router.base_url, api_key=LIMITED, max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError):
        limited.messages.count_tokens(model="claude", messages=messages)  # type: ignore[arg-type]
    master = anthropic.Anthropic(base_url=router.base_url, api_key=MASTER, max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        master.messages.count_tokens(model="nope", messages=messages)  # type: ignore[arg-type]
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=20)
    try:
        conn.request(
            "POST",
            "/v1/messages/count_tokens",
            orjson.dumps({"model": "claude"}),
            {"x-api-key": MASTER, "content-type": "application/json"},
        )
        resp = conn.getresponse()
        status, doc = resp.status, orjson.loads(resp.read())
    finally:
        conn.close()
    assert status == 400
    assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
    assert "messages" in doc["error"]["message"]


# --- a group of an Anthropic and an OpenAI deployment ------------------------------------------------


def test_a_mixed_group_translates_for_its_openai_deployment(
    client: anthropic.Anthropic, fake: FakeAnthropic, fake_openai: FakeOpenAI
) -> None:
    params = _params(TOP_K_BODY, "mixed")
    native = client.messages.with_raw_response.create(**_kwargs(params))
    assert native.headers["x-kubellm-deployment"] == "mixed-claude"
    assert fake.seen[-1].body["top_k"] == 5
    fake.faults.append(
        Fault(status=529, body={"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
    )
    translated = client.messages.with_raw_response.create(**_kwargs(params))
    assert translated.headers["x-kubellm-deployment"] == "mixed-gpt"
    chat = fake_openai.seen[-1].body
    assert chat["messages"] == [{"role": "user", "content": "Say hi."}] and "top_k" not in chat
    message = translated.parse()
    assert message.type == "message" and message.content[0].type == "text"


# --- metering -----------------------------------------------------------------------------------------


def test_cache_reads_and_writes_are_metered_at_their_own_prices(
    fake: FakeAnthropic, fake_openai: FakeOpenAI
) -> None:
    params = _params(TOP_K_BODY)
    params["messages"][0]["content"][0] = {
        "type": "text",
        "text": "A long shared prefix for this test alone. " * 20,
        "cache_control": EPHEMERAL,
    }
    params["messages"][0]["content"].append({"type": "text", "text": "And a question."})
    with RouterProcess(_config(fake, fake_openai), env=_env()) as router:
        client = anthropic.Anthropic(base_url=router.base_url, api_key=MASTER, max_retries=0)
        first = client.messages.with_raw_response.create(**_kwargs(params))
        with client.messages.stream(**_kwargs(params)) as stream:
            stream.until_done()
            second = stream.get_final_message()
            second_id = stream.response.headers["x-request-id"]
        counted = client.messages.with_raw_response.count_tokens(model="claude", messages=params["messages"])
        router.stop()
        db = sqlite3.connect(router.dir / "state" / "ledger.sqlite")
        rows = {
            r[0]: r[1:]
            for r in db.execute(
                "SELECT request_id, prompt_tokens, completion_tokens, cached_tokens, "
                "cache_write_tokens, cost FROM usage"
            )
        }
        db.close()
    usage = first.parse().usage
    assert usage.cache_creation_input_tokens and not usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens == usage.cache_creation_input_tokens
    assert counted.headers["x-request-id"] not in rows  # counting is not a completion
    for request_id, answer in ((first.headers["x-request-id"], usage), (second_id, second.usage)):
        prompt, completion, read, written, cost = rows[request_id]
        assert (read, written) == (
            answer.cache_read_input_tokens or 0,
            answer.cache_creation_input_tokens or 0,
        )
        assert prompt == answer.input_tokens + read + written and completion == answer.output_tokens
        expected = (
            answer.input_tokens * Decimal("3")
            + read * Decimal("0.30")
            + written * Decimal("3.75")
            + completion * Decimal("15")
        ) / 1_000_000
        assert Decimal(cost) == expected
