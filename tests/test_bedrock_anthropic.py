"""Claude on Bedrock speaking Messages natively: the anthropic SDK -> the router -> the fake Bedrock.

The fake verifies SigV4 over the exact bytes, and Bedrock's Claude body rules: no ``model`` or
``stream``, ``anthropic_version: bedrock-2023-05-31``, betas as ``anthropic_beta``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import anthropic
import pytest

from kubellm.router.config._schema import DeploymentConfig
from kubellm.router.providers import Operation
from kubellm.router.providers.bedrock import BedrockProvider
from tests.conftest import MASTER_KEY
from tests.fakes.anthropic_upstream import Fault, prompt_words
from tests.fakes.bedrock_upstream import FakeBedrock
from tests.support.servers import RouterProcess
from tests.test_anthropic_native_provider import THINKING_BODY, TOP_K_BODY

AKID, SECRET = "AKIDEXAMPLETEST01", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
CLAUDE = "anthropic.claude-sonnet-4-20250514-v1:0"
PROFILE_ARN = (
    "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-sonnet-4-20250514-v1:0"
)
BETAS = "interleaved-thinking-2025-05-14"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeBedrock]:
    with FakeBedrock({AKID: (SECRET, None)}) as server:
        yield server


@pytest.fixture(scope="module")
def router(fake: FakeBedrock) -> Iterator[RouterProcess]:
    def dep(model: str, upstream: str) -> dict[str, Any]:
        return {
            "name": model,
            "model": model,
            "provider": "bedrock",
            "upstreamModel": upstream,
            "baseUrl": fake.base_url,
            "region": "us-east-1",
            "apiKeyEnv": "TEST_AWS_KEYS",
        }

    config = {
        "deployments": [
            dep("claude", CLAUDE),
            dep("claude-arn", PROFILE_ARN),
            dep("nova", "amazon.nova-lite-v1:0"),
        ],
        "settings": {"numRetries": 0},
    }
    with RouterProcess(
        config, env={"TEST_AWS_KEYS": f"{AKID}:{SECRET}", "KUBELLM_MASTER_KEY": MASTER_KEY}
    ) as proc:
        yield proc


@pytest.fixture
def client(router: RouterProcess, fake: FakeBedrock) -> anthropic.Anthropic:
    fake.reset()
    fake.claude.faults.clear()
    return anthropic.Anthropic(base_url=router.base_url, api_key=MASTER_KEY, max_retries=0)


def _expected(sent: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in sent.items() if k not in ("model", "stream")}
    return {**body, "anthropic_version": "bedrock-2023-05-31", "anthropic_beta": [BETAS]}


def test_only_anthropic_models_speak_messages() -> None:
    provider = BedrockProvider()

    def speaks(upstream: str) -> bool:
        dep = DeploymentConfig(model="m", provider="bedrock", upstream_model=upstream, region="us-east-1")
        return provider.speaks(Operation.MESSAGES, dep)

    assert speaks(CLAUDE) and speaks(PROFILE_ARN) and speaks("global.anthropic.claude-opus-4-1-20250805-v1:0")
    assert not speaks("amazon.nova-lite-v1:0") and not speaks("meta.llama3-70b-instruct-v1:0")


@pytest.mark.parametrize("model", ["claude", "claude-arn"])
def test_invoke_gets_the_clients_body(client: anthropic.Anthropic, fake: FakeBedrock, model: str) -> None:
    params = {**copy.deepcopy(THINKING_BODY), "model": model}
    message = client.messages.create(**params, extra_headers={"anthropic-beta": BETAS})
    seen = fake.seen[-1]
    upstream = CLAUDE if model == "claude" else PROFILE_ARN
    assert seen.path == f"/model/{upstream}/invoke"
    assert seen.body == _expected(params)
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.usage.input_tokens > 0


def test_the_stream_is_unwrapped_event_by_event(client: anthropic.Anthropic, fake: FakeBedrock) -> None:
    params = {**copy.deepcopy(THINKING_BODY), "model": "claude"}
    kinds: list[str] = []
    with client.messages.stream(**params, extra_headers={"anthropic-beta": BETAS}) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                kinds.append(event.delta.type)
        final = stream.get_final_message()
    assert fake.seen[-1].path == f"/model/{CLAUDE}/invoke-with-response-stream"
    assert fake.seen[-1].body == _expected(params)
    assert {"thinking_delta", "signature_delta", "text_delta"} <= set(kinds)
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0


def test_cache_usage_comes_through(client: anthropic.Anthropic) -> None:
    params = {**copy.deepcopy(TOP_K_BODY), "model": "claude"}
    params["messages"][0]["content"][0]["text"] = "Bedrock's own cached prefix, used only here."
    kwargs = {k: v for k, v in params.items() if k not in ("top_k", "temperature")}
    extra = {"top_k": 5, "temperature": 0.2}
    first = client.messages.create(**kwargs, extra_body=extra)
    second = client.messages.create(**kwargs, extra_body=extra)
    assert first.usage.cache_creation_input_tokens and not first.usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens


def test_an_exception_mid_stream_is_an_anthropic_error(
    client: anthropic.Anthropic, fake: FakeBedrock
) -> None:
    fake.claude.faults.append(Fault(stream_error="overloaded_error"))
    params = {**copy.deepcopy(THINKING_BODY), "model": "claude"}
    with pytest.raises(anthropic.APIStatusError), client.messages.stream(**params) as stream:
        for _ in stream:
            pass


def test_count_tokens_uses_bedrocks_count_tokens(client: anthropic.Anthropic, fake: FakeBedrock) -> None:
    body = {k: v for k, v in THINKING_BODY.items() if k not in ("max_tokens", "metadata", "service_tier")}
    raw = client.messages.with_raw_response.count_tokens(**{**body, "model": "claude"})
    assert raw.headers["x-kubellm-token-count"] == "upstream"
    assert raw.parse().input_tokens == prompt_words(body)
    assert fake.seen[-1].path == f"/model/{CLAUDE}/count-tokens"
    nova = client.messages.with_raw_response.count_tokens(
        model="nova", messages=[{"role": "user", "content": "hi"}]
    )
    assert nova.headers["x-kubellm-token-count"] == "estimate"


def test_other_models_are_translated_to_converse(client: anthropic.Anthropic, fake: FakeBedrock) -> None:
    message = client.messages.create(
        model="nova", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
    )
    assert fake.seen[-1].path == f"/model/{quote('amazon.nova-lite-v1:0', safe=':')}/converse"
    assert message.content[0].type == "text"
