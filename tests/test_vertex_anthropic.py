"""Claude on Vertex AI speaking Messages natively: the anthropic SDK -> the router -> the fake Vertex AI.

The fake checks the service-account access token, the project and location in the URL, and
Vertex AI's Claude body rules: no ``model``, ``anthropic_version: vertex-2023-10-16``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from kubellm.router.config._schema import DeploymentConfig
from kubellm.router.providers import Operation
from kubellm.router.providers.vertex import VertexProvider
from tests.conftest import MASTER_KEY
from tests.fakes.anthropic_upstream import Fault, prompt_words
from tests.fakes.vertex_anthropic import FakeVertexClaude
from tests.support.servers import RouterProcess
from tests.test_anthropic_native_provider import THINKING_BODY

MODEL = "claude-sonnet-4@20250514"
BETAS = "interleaved-thinking-2025-05-14"
PREFIX = "/v1/projects/test-project/locations/us-central1/publishers/anthropic/models"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeVertexClaude]:
    with FakeVertexClaude() as server:
        yield server


@pytest.fixture(scope="module")
def router(fake: FakeVertexClaude, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    key = tmp_path_factory.mktemp("sa") / "sa.json"
    key.write_text(json.dumps(fake.service_account()))

    def dep(model: str, upstream: str) -> dict[str, Any]:
        return {
            "name": model,
            "model": model,
            "provider": "vertex",
            "upstreamModel": upstream,
            "baseUrl": fake.vertex_url,
            "apiKeyFile": str(key),
            "location": fake.location,
        }

    config = {
        "deployments": [dep("claude", MODEL), dep("gemini", "gemini-2.5-pro")],
        "settings": {"numRetries": 0},
    }
    with RouterProcess(config, env={"KUBELLM_MASTER_KEY": MASTER_KEY}) as proc:
        yield proc


@pytest.fixture
def client(router: RouterProcess, fake: FakeVertexClaude) -> anthropic.Anthropic:
    fake.claude.faults.clear()
    return anthropic.Anthropic(base_url=router.base_url, api_key=MASTER_KEY, max_retries=0)


def test_only_claude_models_speak_messages() -> None:
    def speaks(upstream: str) -> bool:
        dep = DeploymentConfig(model="m", provider="vertex", upstream_model=upstream)
        return VertexProvider().speaks(Operation.MESSAGES, dep)

    assert speaks(MODEL) and speaks("publishers/anthropic/models/claude-opus-4-1@20250805")
    assert not speaks("gemini-2.5-pro")


@pytest.mark.parametrize("stream", [False, True])
def test_raw_predict_gets_the_clients_body(
    client: anthropic.Anthropic, fake: FakeVertexClaude, stream: bool
) -> None:
    params = {**copy.deepcopy(THINKING_BODY), "model": "claude"}
    kinds: list[str] = []
    if stream:
        with client.messages.stream(**params, extra_headers={"anthropic-beta": BETAS}) as events:
            kinds = [e.delta.type for e in events if e.type == "content_block_delta"]
            message = events.get_final_message()
    else:
        message = client.messages.create(**params, extra_headers={"anthropic-beta": BETAS})
    path, headers, body = fake.claude_seen[-1]
    assert path == f"{PREFIX}/{MODEL}:{'streamRawPredict' if stream else 'rawPredict'}"
    expected = {k: v for k, v in params.items() if k != "model"}
    assert body == {
        **expected,
        "anthropic_version": "vertex-2023-10-16",
        **({"stream": True} if stream else {}),
    }
    assert headers["anthropic-beta"] == BETAS
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert not stream or {"thinking_delta", "signature_delta"} <= set(kinds)


def test_count_tokens_uses_vertex(client: anthropic.Anthropic, fake: FakeVertexClaude) -> None:
    body = {k: v for k, v in THINKING_BODY.items() if k not in ("max_tokens", "metadata", "service_tier")}
    raw = client.messages.with_raw_response.count_tokens(**{**body, "model": "claude"})
    assert raw.headers["x-kubellm-token-count"] == "upstream"
    assert raw.parse().input_tokens == prompt_words(body)
    path, _, sent = fake.claude_seen[-1]
    assert path == f"{PREFIX}/count-tokens:rawPredict" and sent["model"] == MODEL
    gemini = client.messages.with_raw_response.count_tokens(
        model="gemini", messages=[{"role": "user", "content": "hi"}]
    )
    assert gemini.headers["x-kubellm-token-count"] == "estimate"


def test_claudes_errors_keep_their_shape(client: anthropic.Anthropic, fake: FakeVertexClaude) -> None:
    fake.claude.faults.append(
        Fault(
            status=429, body={"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
        )
    )
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(**{**copy.deepcopy(THINKING_BODY), "model": "claude"})
    assert "slow down" in info.value.message


@pytest.mark.parametrize("stream", [False, True])
def test_chat_to_claude_is_translated_and_sent_through_raw_predict(
    router: RouterProcess, fake: FakeVertexClaude, stream: bool
) -> None:
    chat = openai.OpenAI(base_url=router.v1, api_key=MASTER_KEY, max_retries=0)
    messages: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    if stream:
        chunks = list(chat.chat.completions.create(model="claude", messages=messages, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        text = (
            chat.chat.completions.create(model="claude", messages=messages).choices[0].message.content or ""
        )
    path, _, body = fake.claude_seen[-1]
    assert path == f"{PREFIX}/{MODEL}:{'streamRawPredict' if stream else 'rawPredict'}"
    assert body["system"] == "Be brief." and body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    ]
    assert body["anthropic_version"] == "vertex-2023-10-16" and "model" not in body
    assert text == f"claude says hi to {MODEL}"
