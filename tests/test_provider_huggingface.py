"""The `huggingface` (Inference Providers router) and `huggingface-endpoint` (TGI/TEI) providers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubellm.router.config._schema import DeploymentConfig
from kubellm.router.inbound._openai_validate import validate
from kubellm.router.providers import Operation, RequestContext
from kubellm.router.providers.huggingface import HuggingFaceEndpointProvider, HuggingFaceProvider
from tests.fakes.azure_upstream import WireError, embedding_vector, validate_chat
from tests.fakes.huggingface_upstream import (
    FakeHuggingFace,
    Fault,
    HFError,
    reply_for,
    sse,
    tgi_chunks,
    validate_auth,
    validate_tgi_chat,
)
from tests.support.openai_requests import PNG, TIME
from tests.support.servers import RouterProcess
from tests.test_provider_azure import openai_chat_requests

TOKEN = "hf_test_token_0123456789"
BAD_TOKEN = "hf_wrong_secret_4242"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
HF, TGI = "huggingface", "huggingface-endpoint"


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHuggingFace]:
    with FakeHuggingFace("router", token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def tgi() -> Iterator[FakeHuggingFace]:
    with FakeHuggingFace("tgi", token=TOKEN, max_input_words=300) as server:
        yield server


@pytest.fixture(scope="module")
def router(hub: FakeHuggingFace, tgi: FakeHuggingFace) -> Iterator[RouterProcess]:
    def dep(model: str, provider: str, base: str, upstream: str, **extra: Any) -> dict[str, Any]:
        return {
            "model": model,
            "provider": provider,
            "upstreamModel": upstream,
            "baseUrl": base,
            "apiKeyEnv": "HF_TEST_TOKEN",
            **extra,
        }

    config = {
        "deployments": [
            dep("hf", HF, hub.base_url + "/v1", "meta-llama/Llama-3.1-8B-Instruct:novita"),
            dep("hf-embed", HF, hub.base_url + "/v1", "BAAI/bge-small-en-v1.5"),
            dep("hf-badkey", HF, hub.base_url + "/v1", "m", apiKeyEnv="HF_BAD_TOKEN"),
            dep("tgi", TGI, tgi.base_url, "tgi"),
            dep("tgi-v1", TGI, tgi.base_url + "/v1/", "tgi"),
            dep("tei", TGI, tgi.base_url, "BAAI/bge-large-en-v1.5"),
            dep("hf-credits", HF, hub.base_url + "/v1", "m", name="spent"),
            dep("hf-credits", TGI, tgi.base_url, "tgi", name="spare", priority=1),
        ],
        "settings": {"numRetries": 1},
    }
    with RouterProcess(config, env={"HF_TEST_TOKEN": TOKEN, "HF_BAD_TOKEN": BAD_TOKEN}) as proc:
        yield proc


@pytest.fixture
def client(router: RouterProcess, hub: FakeHuggingFace, tgi: FakeHuggingFace) -> openai.OpenAI:
    for fake in (hub, tgi):
        fake.faults.clear()
        fake.token_level = False
    return openai.OpenAI(base_url=router.v1, api_key="unused", max_retries=0)


def _user(text: str = "hi") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def _ctx(
    provider: str, stream: bool = False, include_usage: bool = False, operation: Operation = Operation.CHAT
) -> RequestContext:
    base = (
        "https://router.huggingface.co/v1" if provider == HF else "https://my-ep.endpoints.huggingface.cloud"
    )
    dep = DeploymentConfig(
        model="m", provider=provider, upstream_model="tgi", base_url=base, drop_unsupported_params=True
    )
    return RequestContext("req1", operation, "m", dep, stream, include_usage, api_key=TOKEN)


def _text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# --- the Inference Providers router ---------------------------------------------------------------


@pytest.mark.covers(HF, "chat")
def test_router_chat(client: openai.OpenAI, hub: FakeHuggingFace) -> None:
    reply = client.chat.completions.create(model="hf", messages=_user(), seed=3)
    assert reply.choices[0].message.content == "hf-router says hi to meta-llama/Llama-3.1-8B-Instruct:novita"
    assert reply.usage is not None and reply.usage.total_tokens > 0
    assert hub.last.path == "/v1/chat/completions"
    assert hub.last.headers["Authorization"] == f"Bearer {TOKEN}" and hub.last.body["seed"] == 3


@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.covers(HF, "stream", "stream_usage")
def test_router_stream(client: openai.OpenAI, include_usage: bool) -> None:
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(client.chat.completions.create(model="hf", messages=_user(), stream=True, **extra))
    assert _text(chunks) == "hf-router says hi to meta-llama/Llama-3.1-8B-Instruct:novita"
    assert len([c for c in chunks if c.usage is not None]) == (1 if include_usage else 0)


@pytest.mark.covers(HF, "tools")
def test_router_parallel_tools_and_results(client: openai.OpenAI, hub: FakeHuggingFace) -> None:
    messages: list[Any] = _user("weather and time?")
    first = client.chat.completions.create(model="hf", messages=messages, tools=[WEATHER, TIME])  # type: ignore[list-item]
    calls = first.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]  # type: ignore[union-attr]
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        *({"role": "tool", "tool_call_id": c.id, "content": "sunny"} for c in calls),
    ]
    second = client.chat.completions.create(model="hf", messages=messages, tools=[WEATHER, TIME])  # type: ignore[list-item]
    assert second.choices[0].message.content
    assert [m["role"] for m in hub.last.body["messages"]] == ["user", "assistant", "tool", "tool"]


@pytest.mark.covers(HF, "vision", "json_mode")
def test_router_vision_and_json_schema_pass_through(client: openai.OpenAI, hub: FakeHuggingFace) -> None:
    content = [
        {"type": "text", "text": "describe"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
    ]
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    reply = client.chat.completions.create(
        model="hf",
        messages=[{"role": "user", "content": content}],  # type: ignore[misc]
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    )
    assert json.loads(reply.choices[0].message.content or "") == {"city": "fake"}
    assert hub.last.body["messages"][0]["content"] == content
    assert hub.last.body["response_format"]["json_schema"]["schema"] == schema  # OpenAI's shape, unchanged


@pytest.mark.covers(HF, "embeddings")
def test_router_embeddings_use_feature_extraction(client: openai.OpenAI, hub: FakeHuggingFace) -> None:
    result = client.embeddings.create(model="hf-embed", input=["hello", "world"])  # base64, as the SDK asks
    assert [d.embedding for d in result.data] == [
        pytest.approx(embedding_vector(t)) for t in ("hello", "world")
    ]
    assert hub.last.path == "/hf-inference/models/BAAI/bge-small-en-v1.5/pipeline/feature-extraction"
    assert hub.last.body == {"inputs": ["hello", "world"]}
    assert result.usage.prompt_tokens > 0  # estimated: the pipeline reports none
    floats = client.embeddings.create(model="hf-embed", input="hello", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(embedding_vector("hello"))


def test_router_embeddings_reject_token_level_features(client: openai.OpenAI, hub: FakeHuggingFace) -> None:
    hub.token_level = True
    with pytest.raises(openai.APIStatusError) as info:
        client.embeddings.create(model="hf-embed", input="hello")
    assert info.value.status_code == 502 and "one vector per input" in info.value.message


def test_model_loading_is_503_with_retry_after(client: openai.OpenAI, hub: FakeHuggingFace) -> None:
    hub.queue(
        Fault(503, {"error": "Model BAAI/bge-small-en-v1.5 is currently loading", "estimated_time": 19.2})
    )
    with pytest.raises(openai.InternalServerError) as info:
        client.embeddings.create(model="hf-embed", input="hello")
    assert info.value.status_code == 503 and info.value.response.headers["retry-after"] == "20"


def test_spent_credits_fall_over_to_another_deployment(client: openai.OpenAI, hub: FakeHuggingFace) -> None:
    hub.queue(
        Fault(402, {"error": "You have exceeded your monthly included credits for Inference Providers."})
    )
    raw = client.chat.completions.with_raw_response.create(model="hf-credits", messages=_user())
    assert raw.headers["x-kubellm-deployment"] == "spare"


def test_bad_token_is_never_echoed(client: openai.OpenAI, router: RouterProcess) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model="hf-badkey", messages=_user())
    assert BAD_TOKEN not in str(info.value.body) and BAD_TOKEN not in router.logs()


# --- TGI / TEI endpoints --------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tgi", "tgi-v1"])
@pytest.mark.covers(TGI, "chat")
def test_tgi_chat_at_the_endpoint_root(client: openai.OpenAI, tgi: FakeHuggingFace, model: str) -> None:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "system", "content": "s"}, *_user()]
    )
    assert reply.choices[0].message.content == "tgi says hi to tgi"
    assert tgi.last.path == "/v1/chat/completions" and tgi.last.headers["Authorization"] == f"Bearer {TOKEN}"
    assert client.completions.create(model=model, prompt="x").choices[0].text == "tgi text"
    assert tgi.last.path == "/v1/completions"


@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.covers(TGI, "stream", "stream_usage")
def test_tgi_stream_usage_rides_on_the_last_chunk(client: openai.OpenAI, include_usage: bool) -> None:
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(client.chat.completions.create(model="tgi", messages=_user(), stream=True, **extra))
    assert _text(chunks) == "tgi says hi to tgi"
    assert len([c for c in chunks if c.usage is not None]) == (1 if include_usage else 0)
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.covers(TGI, "stream", "tools")
def test_tgi_streamed_tool_calls(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(model="tgi", messages=_user(), stream=True, tools=[WEATHER, TIME])
    )  # type: ignore[list-item]
    args: dict[int, str] = {}
    for chunk in chunks:
        for call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            args[call.index] = args.get(call.index, "") + (call.function.arguments or "")  # type: ignore[union-attr]
    assert {k: json.loads(v) for k, v in args.items()} == {0: {"city": "fake"}, 1: {"zone": "fake"}}


def test_tgi_generation_error_mid_stream(client: openai.OpenAI, tgi: FakeHuggingFace) -> None:
    tgi.queue(Fault(stream_error=True))
    with pytest.raises(openai.APIError) as info:
        list(client.chat.completions.create(model="tgi", messages=_user(), stream=True))
    assert "CUDA out of memory" in info.value.message


@pytest.mark.covers(TGI, "json_mode", "vision")
def test_tgi_json_modes_become_a_guidance_grammar(client: openai.OpenAI, tgi: FakeHuggingFace) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    reply = client.chat.completions.create(
        model="tgi",
        messages=_user("a city, in JSON"),
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    )
    assert json.loads(reply.choices[0].message.content or "") == {"city": "fake"}
    assert tgi.last.body["response_format"] == {"type": "json_object", "value": schema}
    content = [
        {"type": "text", "text": "json please"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
    ]
    client.chat.completions.create(
        model="tgi",
        messages=[{"role": "user", "content": content}],  # type: ignore[misc]
        response_format={"type": "json_object"},
    )
    assert tgi.last.body["response_format"] == {"type": "json_object", "value": {"type": "object"}}
    assert tgi.last.body["messages"][0]["content"] == content


@pytest.mark.covers(TGI, "embeddings")
def test_tei_embeddings(client: openai.OpenAI, tgi: FakeHuggingFace) -> None:
    result = client.embeddings.create(model="tei", input=["a b", "c"], encoding_format="float")
    assert [d.embedding for d in result.data] == [embedding_vector("a b"), embedding_vector("c")]
    assert tgi.last.path == "/v1/embeddings"


def test_tgi_prompt_too_long(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tgi", messages=_user("word " * 400))
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="tei", input="word " * 400)
    assert info.value.code == "context_length_exceeded"


def test_tgi_rate_limit(client: openai.OpenAI, tgi: FakeHuggingFace) -> None:
    fault = Fault(429, {"error": "Model is overloaded", "error_type": "overloaded"}, {"Retry-After": "3"})
    tgi.queue(fault, fault)  # the router retries once
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="tgi-v1", messages=_user())
    assert info.value.response.headers["retry-after"] == "3"


# --- translators, byte by byte, and the property --------------------------------------------------


@pytest.mark.covers(TGI, "stream", "tools", "stream_usage")
def test_stream_translator_is_independent_of_byte_boundaries() -> None:
    body = {"model": "tgi", "messages": _user(), "tools": [WEATHER, TIME], "stream": True}
    _, calls, finish = reply_for(body, "tgi")
    raw = sse(
        tgi_chunks(
            body,
            "thinking about it",
            calls,
            finish,
            {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14},
        )
    )
    provider = HuggingFaceEndpointProvider()

    def run(pieces: list[bytes], include_usage: bool) -> list[Any]:
        translator = provider.stream_translator(_ctx(TGI, True, include_usage))
        out = [p for piece in pieces for p in translator.feed(piece)] + translator.finish()
        assert (
            translator.error is None and translator.usage is not None and translator.usage.total_tokens == 14
        )
        return [orjson.loads(p) if isinstance(p, bytes) else p for p in out]

    for include_usage in (True, False):
        whole = run([raw], include_usage)
        assert ("usage" in whole[-1]) == include_usage
        assert run([raw[i : i + 1] for i in range(len(raw))], include_usage) == whole
        for cut in range(1, len(raw), 5):
            assert run([raw[:cut], raw[cut:]], include_usage) == whole


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=openai_chat_requests(),
    stream=st.booleans(),
    include_usage=st.booleans(),
    provider=st.sampled_from([HF, TGI]),
)
@pytest.mark.covers(HF, "chat", "tools", "vision", "json_mode")
@pytest.mark.covers(TGI, "chat", "tools", "vision", "json_mode")
def test_any_valid_openai_request_is_one_the_upstream_accepts(
    body: dict[str, Any], stream: bool, include_usage: bool, provider: str
) -> None:
    if stream:
        body = {
            **body,
            "stream": True,
            **({"stream_options": {"include_usage": True}} if include_usage else {}),
        }
    validate(Operation.CHAT, body)
    impl = HuggingFaceProvider() if provider == HF else HuggingFaceEndpointProvider()
    request = impl.build_request(body, _ctx(provider, stream, stream and include_usage))
    expected = (
        "https://router.huggingface.co/v1"
        if provider == HF
        else "https://my-ep.endpoints.huggingface.cloud/v1"
    ) + "/chat/completions"
    assert request.url == expected
    validate_auth(request.headers, TOKEN)
    sent = orjson.loads(request.body or b"")
    try:
        validate_chat(sent) if provider == HF else validate_tgi_chat(sent)
    except (WireError, HFError) as err:  # pragma: no cover - shows the failing request
        raise AssertionError(f"{err}\n{sent}") from None
