"""The `cohere` provider end to end: the real openai SDK -> router -> a strict fake Cohere v2 API."""

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
from kubellm.router.providers.cohere import CohereProvider, cohere_finish_reason_to_openai
from tests.fakes.azure_upstream import embedding_vector
from tests.fakes.cohere_upstream import (
    BLOCKED,
    FakeCohere,
    Fault,
    Reply,
    WireError,
    stream_bytes,
    usage_for,
    validate_chat,
    validate_headers,
)
from tests.support.openai_requests import PNG, TIME, WEATHER
from tests.support.servers import RouterProcess
from tests.test_provider_azure import openai_chat_requests

KEY = "co-test-key-0123456789"
BAD_KEY = "co-wrong-secret-4242"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeCohere]:
    with FakeCohere(api_key=KEY) as server:
        yield server


@pytest.fixture(scope="module")
def router(fake: FakeCohere) -> Iterator[RouterProcess]:
    def dep(model: str, **extra: Any) -> dict[str, Any]:
        return {
            "model": model,
            "provider": "cohere",
            "upstreamModel": "command-a-03-2025",
            "baseUrl": fake.base_url,
            "apiKeyEnv": "CO_TEST_KEY",
            **extra,
        }

    config = {
        "deployments": [
            dep("command"),
            dep("command-v2", baseUrl=fake.base_url + "/v2"),
            dep("command-drop", dropUnsupportedParams=True),
            dep("command-badkey", apiKeyEnv="CO_BAD_KEY"),
            dep("command-429"),
            dep("embed", upstreamModel="embed-v4.0"),
        ],
        "settings": {"numRetries": 0},
    }
    with RouterProcess(config, env={"CO_TEST_KEY": KEY, "CO_BAD_KEY": BAD_KEY}) as proc:
        yield proc


@pytest.fixture
def client(router: RouterProcess, fake: FakeCohere) -> openai.OpenAI:
    fake.faults.clear()
    fake.replies.clear()
    return openai.OpenAI(base_url=router.v1, api_key="unused", max_retries=0)


def _user(text: str = "hi") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def _ctx(stream: bool = False, include_usage: bool = False, drop: bool = True) -> RequestContext:
    dep = DeploymentConfig(
        model="command", provider="cohere", upstream_model="command-a-03-2025", drop_unsupported_params=drop
    )
    return RequestContext("req1", Operation.CHAT, "command", dep, stream, include_usage, api_key=KEY)


def _text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# --- chat -----------------------------------------------------------------------------------------


@pytest.mark.covers("cohere", "chat")
def test_chat_request_and_response_are_translated(client: openai.OpenAI, fake: FakeCohere) -> None:
    reply = client.chat.completions.create(
        model="command",
        temperature=0.3,
        top_p=1.0,
        max_tokens=50,
        seed=9,
        stop=["zzz"],
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": "be kind"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi!"},
            {"role": "user", "content": "again"},
        ],
    )
    assert reply.choices[0].message.content == "cohere says hi to command-a-03-2025"
    assert reply.choices[0].finish_reason == "stop" and reply.id == "c14c80c3-18eb-4519-9460-6c92edd8cfb4"
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens == 6 + 64  # usage.tokens (the fake's words + template), not billed_units
    assert reply.usage.prompt_tokens_details.cached_tokens == 16
    sent = fake.last
    assert sent.path == "/v2/chat" and sent.headers["Authorization"] == f"Bearer {KEY}"
    assert sent.body["messages"] == [
        {"role": "system", "content": "be brief\n\nbe kind"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi!"},
        {"role": "user", "content": "again"},
    ]
    assert (sent.body["p"], sent.body["max_tokens"], sent.body["seed"], sent.body["stop_sequences"]) == (
        0.99,
        50,
        9,
        ["zzz"],
    )


@pytest.mark.covers("cohere", "chat")
def test_finish_reasons(client: openai.OpenAI, fake: FakeCohere) -> None:
    reply = client.chat.completions.create(model="command-v2", messages=_user(), stop=["hi"])
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == ("cohere says ", "stop")
    fake.script(Reply("cut", finish_reason="MAX_TOKENS"))
    assert (
        client.chat.completions.create(model="command", messages=_user()).choices[0].finish_reason == "length"
    )
    assert cohere_finish_reason_to_openai("TOOL_CALL") == "tool_calls"
    assert cohere_finish_reason_to_openai("ERROR") is None


@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.covers("cohere", "stream", "stream_usage")
def test_stream(client: openai.OpenAI, fake: FakeCohere, include_usage: bool) -> None:
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(client.chat.completions.create(model="command", messages=_user(), stream=True, **extra))
    assert _text(chunks) == "cohere says hi to command-a-03-2025"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == (1 if include_usage else 0)
    if include_usage:
        assert usage[0] is not None and usage[0].completion_tokens == 5 and chunks[-1].choices == []
    assert fake.last.body["stream"] is True and "stream_options" not in fake.last.body


def test_stream_error_finish_becomes_an_error_event(client: openai.OpenAI, fake: FakeCohere) -> None:
    fake.script(Reply("partial answer", finish_reason="ERROR", error="internal generation failure"))
    with pytest.raises(openai.APIError) as info:
        list(client.chat.completions.create(model="command", messages=_user(), stream=True))
    assert "internal generation failure" in info.value.message


@pytest.mark.covers("cohere", "stream", "tools", "stream_usage")
def test_stream_translator_is_independent_of_byte_boundaries() -> None:
    calls = [
        {
            "id": "get_weather_1x",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Madrid"}'},
        },
        {"id": "get_time_2y", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    reply = Reply(tool_calls=calls, tool_plan="I will check both.", finish_reason="TOOL_CALL")
    raw = stream_bytes(reply, usage_for("a b c", reply)).replace(b"\n", b"\r\n", 7)
    provider = CohereProvider()
    ctx = _ctx(stream=True, include_usage=True)  # one context: chunks carry its `created` second

    def run(pieces: list[bytes]) -> list[Any]:
        translator = provider.stream_translator(ctx)
        out = [p for piece in pieces for p in translator.feed(piece)] + translator.finish()
        assert translator.error is None and translator.usage is not None
        assert (translator.usage.prompt_tokens, translator.usage.cached_tokens) == (67, 16)
        return out

    whole = run([raw])
    deltas = [c["choices"][0]["delta"] for c in whole if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "I will check both."
    args = "".join(
        tc["function"]["arguments"] for d in deltas for tc in d.get("tool_calls", []) if tc["index"] == 0
    )
    assert args == '{"city": "Madrid"}'
    assert whole[-2]["choices"][0]["finish_reason"] == "tool_calls" and whole[-1]["usage"]["total_tokens"] > 0
    assert run([raw[i : i + 1] for i in range(len(raw))]) == whole
    for cut in range(1, len(raw), 3):
        assert run([raw[:cut], raw[cut:]]) == whole


def test_truncated_stream_is_an_error() -> None:
    raw = stream_bytes(Reply("a b c"), usage_for("x", Reply("a b c")))
    translator = CohereProvider().stream_translator(_ctx(stream=True))
    translator.feed(raw[: raw.index(b"event: message-end")])
    translator.finish()
    assert translator.error is not None and translator.error.retryable


# --- tools, vision, JSON --------------------------------------------------------------------------


@pytest.mark.covers("cohere", "tools")
def test_parallel_tool_calls_and_tool_results(client: openai.OpenAI, fake: FakeCohere) -> None:
    messages: list[Any] = _user("weather and time in Madrid?")
    first = client.chat.completions.create(model="command", messages=messages, tools=[WEATHER, TIME])  # type: ignore[list-item]
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and message.content == "I will call the tools."
    calls = message.tool_calls or []
    assert [(c.id, c.function.name) for c in calls] == [  # type: ignore[union-attr]
        ("get_weather_0x7q", "get_weather"),
        ("get_time_1x7q", "get_time"),
    ]
    assert json.loads(calls[0].function.arguments) == {"city": "fake"}  # type: ignore[union-attr]
    assert fake.last.body["tools"][0] == {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": WEATHER["function"]["parameters"],
        },
    }
    messages.append(message.model_dump(exclude_none=True))
    messages += [
        {"role": "tool", "tool_call_id": c.id, "content": f"result {i}"} for i, c in enumerate(calls)
    ]
    second = client.chat.completions.create(model="command", messages=messages, tools=[WEATHER, TIME])  # type: ignore[list-item]
    assert second.choices[0].message.content == "the tool said result 1"
    sent = fake.last.body["messages"]
    assert sent[1] == {
        "role": "assistant",
        "tool_plan": "I will call the tools.",
        "tool_calls": [c.model_dump() for c in calls],
    }
    assert sent[2] == {"role": "tool", "tool_call_id": "get_weather_0x7q", "content": "result 0"}


@pytest.mark.covers("cohere", "tools")
def test_tool_choice_mapping(client: openai.OpenAI, fake: FakeCohere) -> None:
    client.chat.completions.create(
        model="command", messages=_user(), tools=[WEATHER, TIME], tool_choice="required"
    )  # type: ignore[list-item]
    assert fake.last.body["tool_choice"] == "REQUIRED"
    client.chat.completions.create(
        model="command", messages=_user(), tools=[WEATHER, TIME], tool_choice="none"
    )  # type: ignore[list-item]
    assert fake.last.body["tool_choice"] == "NONE"
    client.chat.completions.create(
        model="command",
        messages=_user(),
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert fake.last.body["tool_choice"] == "REQUIRED"
    assert [t["function"]["name"] for t in fake.last.body["tools"]] == ["get_time"]


@pytest.mark.covers("cohere", "tools", "stream")
def test_streamed_tool_call_arguments_arrive_as_deltas(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(model="command", messages=_user(), stream=True, tools=[WEATHER, TIME])
    )  # type: ignore[list-item]
    pieces: dict[int, list[str]] = {}
    for chunk in chunks:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            pieces.setdefault(call.index, []).append(call.function.arguments or "")  # type: ignore[union-attr]
    assert len(pieces[0]) > 2
    assert json.loads("".join(pieces[0])) == {"city": "fake"} and json.loads("".join(pieces[1])) == {
        "zone": "fake"
    }
    assert _text(chunks) == "I will call the tools."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.covers("cohere", "vision")
def test_image_parts(client: openai.OpenAI, fake: FakeCohere) -> None:
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"}},
    ]
    client.chat.completions.create(model="command", messages=[{"role": "user", "content": content}])  # type: ignore[misc]
    assert fake.last.body["messages"][0]["content"] == content
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="command",
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}],
                }
            ],
        )
    assert info.value.body["param"] == "messages[0].content[0].type"  # type: ignore[index]


@pytest.mark.covers("cohere", "json_mode")
def test_json_mode_and_json_schema(client: openai.OpenAI, fake: FakeCohere) -> None:
    reply = client.chat.completions.create(
        model="command", messages=_user("JSON please"), response_format={"type": "json_object"}
    )
    assert json.loads(reply.choices[0].message.content or "") == {"answer": "fake"}
    assert fake.last.body["response_format"] == {"type": "json_object"}
    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}
    reply = client.chat.completions.create(
        model="command",
        messages=_user("a book"),
        response_format={"type": "json_schema", "json_schema": {"name": "book", "schema": schema}},
    )
    assert json.loads(reply.choices[0].message.content or "") == {"title": "fake"}
    assert fake.last.body["response_format"] == {"type": "json_object", "json_schema": schema}


@pytest.mark.covers("cohere", "embeddings")
def test_embeddings(client: openai.OpenAI, fake: FakeCohere) -> None:
    result = client.embeddings.create(model="embed", input=["hello", "world"])  # the SDK asks for base64
    assert [d.embedding for d in result.data] == [
        pytest.approx(embedding_vector(t)) for t in ("hello", "world")
    ]
    assert result.usage.prompt_tokens == 2
    assert fake.last.path == "/v2/embed"
    assert fake.last.body == {
        "model": "embed-v4.0",
        "texts": ["hello", "world"],
        "input_type": "search_document",
        "embedding_types": ["float"],
    }
    floats = client.embeddings.create(
        model="embed",
        input="hi",
        encoding_format="float",
        dimensions=256,
        extra_body={"input_type": "search_query"},
    )
    assert floats.data[0].embedding == embedding_vector("hi", 256)
    assert (fake.last.body["input_type"], fake.last.body["output_dimension"]) == ("search_query", 256)


# --- errors ---------------------------------------------------------------------------------------


def test_unsupported_parameters(client: openai.OpenAI, fake: FakeCohere) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="command", messages=_user(), logprobs=True)
    assert info.value.body["param"] == "logprobs" and "cohere" in info.value.message  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="command", messages=_user(), n=2)
    assert info.value.body["param"] == "n"  # type: ignore[index]
    client.chat.completions.create(model="command-drop", messages=_user(), logprobs=True, n=2, user="u")
    assert set(fake.last.body) == {"model", "messages"}


def test_prompt_too_long(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="command", messages=_user("word " * 500))
    assert info.value.code == "context_length_exceeded"


def test_blocked_by_usage_policy(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="command", messages=_user(f"tell me {BLOCKED}"))
    assert info.value.code == "content_filter"


def test_rate_limit_keeps_retry_after(client: openai.OpenAI, fake: FakeCohere) -> None:
    fake.queue(
        Fault(
            429, "You are using a Trial key, which is limited to 20 API calls / minute.", {"Retry-After": "7"}
        )
    )
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="command-429", messages=_user())
    assert info.value.response.headers["retry-after"] == "7"


def test_bad_key_is_never_echoed(client: openai.OpenAI, router: RouterProcess) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model="command-badkey", messages=_user())
    assert BAD_KEY not in str(info.value.body) and BAD_KEY not in router.logs()


# --- property: any valid OpenAI chat request is a valid Cohere request ----------------------------


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=openai_chat_requests(), stream=st.booleans(), include_usage=st.booleans())
@pytest.mark.covers("cohere", "chat", "tools", "vision", "json_mode")
def test_any_valid_openai_request_is_a_valid_cohere_request(
    body: dict[str, Any], stream: bool, include_usage: bool
) -> None:
    if stream:
        body = {
            **body,
            "stream": True,
            **({"stream_options": {"include_usage": True}} if include_usage else {}),
        }
    validate(Operation.CHAT, body)
    request = CohereProvider().build_request(body, _ctx(stream, stream and include_usage))
    assert request.url == "https://api.cohere.com/v2/chat"
    validate_headers(request.headers, KEY)
    sent = orjson.loads(request.body or b"")
    try:
        validate_chat(sent)
    except WireError as err:  # pragma: no cover - shows the failing request
        raise AssertionError(f"{err.message}\n{sent}") from None
    assert sent.get("stream", False) is stream
