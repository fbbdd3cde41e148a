"""The `anthropic` provider end to end: the openai SDK -> router -> a protocol-enforcing fake Anthropic."""

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
from kubellm.router.providers.anthropic import AnthropicProvider
from tests.fakes.anthropic_upstream import (
    FakeAnthropic,
    Fault,
    Reply,
    WireError,
    error_body,
    frame,
    message_for,
    stream_events,
    validate_headers,
    validate_request,
)
from tests.support.openai_requests import PNG, WEATHER
from tests.support.servers import RouterProcess

KEY = "sk-ant-test-key"
BAD_KEY = "sk-ant-wrong-secret-4242"
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(api_key=KEY) as server:
        yield server


@pytest.fixture(scope="module")
def router(fake: FakeAnthropic) -> Iterator[RouterProcess]:
    def dep(model: str, **extra: Any) -> dict[str, Any]:
        return {
            "model": model,
            "provider": "anthropic",
            "upstreamModel": "claude-test",
            "baseUrl": fake.base_url,
            "apiKeyEnv": "TEST_ANTHROPIC_KEY",
            **extra,
        }

    # Failures that open a deployment's circuit breaker (429, 5xx, bad key) each get a model of their own.
    config = {
        "deployments": [
            dep("claude"),
            dep("claude-drop", dropUnsupportedParams=True),
            dep("claude-badkey", apiKeyEnv="TEST_BAD_KEY"),
            dep("claude-429"),
            dep("claude-529"),
            dep("claude-stream-error"),
        ],
        "settings": {"numRetries": 0},
    }
    with RouterProcess(config, env={"TEST_ANTHROPIC_KEY": KEY, "TEST_BAD_KEY": BAD_KEY}) as proc:
        yield proc


@pytest.fixture
def client(router: RouterProcess, fake: FakeAnthropic) -> openai.OpenAI:
    fake.faults.clear()
    fake.replies.clear()
    fake.cache_read = fake.cache_creation = 0
    return openai.OpenAI(base_url=router.v1, api_key="unused", max_retries=0)


def _user(text: str = "hi") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def _calls() -> Reply:
    return Reply(
        [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}},
            {
                "type": "tool_use",
                "id": "toolu_01B",
                "name": "get_time",
                "input": {"zone": "Europe/Paris", "fmt": "24h"},
            },
        ],
        "tool_use",
    )


# --- chat -----------------------------------------------------------------------------------------


@pytest.mark.covers("anthropic", "chat")
def test_chat_maps_request_and_response(client: openai.OpenAI, fake: FakeAnthropic) -> None:
    out = client.chat.completions.create(
        model="claude",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": "No emoji."},
            {"role": "user", "content": "hi"},
        ],
        max_tokens=50,
        temperature=0.3,
        top_p=0.9,
        stop=["END"],
        user="user-7",
    )
    assert out.choices[0].message.content == "claude says hi to claude-test"
    assert out.choices[0].finish_reason == "stop"
    assert out.model == "claude-test"
    seen = fake.seen[-1]
    assert seen.headers["x-api-key"] == KEY and seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.body == {
        "model": "claude-test",
        "max_tokens": 50,
        "system": "Be brief.\n\nNo emoji.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "stop_sequences": ["END"],
        "temperature": 0.3,
        "top_p": 0.9,
        "metadata": {"user_id": "user-7"},
    }
    usage = out.usage
    assert usage is not None and usage.completion_tokens == 5 and usage.prompt_tokens > 0


@pytest.mark.covers("anthropic", "chat")
def test_defaults_and_clamps(client: openai.OpenAI, fake: FakeAnthropic) -> None:
    client.chat.completions.create(model="claude", messages=_user(), temperature=1.7)
    assert fake.last["max_tokens"] == 4096  # Anthropic requires it
    assert fake.last["temperature"] == 1  # Anthropic's range is 0..1


@pytest.mark.covers("anthropic", "chat")
def test_history_merges_into_alternating_turns(client: openai.OpenAI, fake: FakeAnthropic) -> None:
    client.chat.completions.create(
        model="claude",
        messages=[
            {"role": "assistant", "content": "Hello, how can I help?"},
            {"role": "user", "content": "one"},
            {"role": "user", "content": [{"type": "text", "text": "two"}]},
            {"role": "assistant", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "three"},
        ],
    )
    turns = [(m["role"], [b["text"] for b in m["content"]]) for m in fake.last["messages"]]
    assert turns == [
        ("user", ["."]),
        ("assistant", ["Hello, how can I help?"]),
        ("user", ["one", "two"]),
        ("assistant", ["a", "b"]),
        ("user", ["three"]),
    ]


@pytest.mark.covers("anthropic", "chat")
def test_stop_reasons(client: openai.OpenAI) -> None:
    cut = client.chat.completions.create(model="claude", messages=_user(), max_tokens=2)
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == ("claude says", "length")
    stopped = client.chat.completions.create(model="claude", messages=_user(), stop="hi")
    assert (stopped.choices[0].message.content, stopped.choices[0].finish_reason) == ("claude says ", "stop")


@pytest.mark.covers("anthropic", "chat", "stream_usage")
def test_usage_counts_cache_reads_and_writes(client: openai.OpenAI, fake: FakeAnthropic) -> None:
    fake.cache_read, fake.cache_creation = 1000, 200
    out = client.chat.completions.create(model="claude", messages=_user())
    usage = out.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 1000
    # Cache writes in OpenAI's schema's own field, so chat clients see (and are billed) them too.
    assert usage.prompt_tokens_details.model_dump()["cache_write_tokens"] == 200
    assert usage.prompt_tokens > 1200  # input + cache writes + cache reads, as Anthropic counts input
    chunks = list(
        client.chat.completions.create(
            model="claude", messages=_user(), stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == usage.prompt_tokens
    details = chunks[-1].usage.prompt_tokens_details
    assert details is not None and details.model_dump()["cache_write_tokens"] == 200


# --- streaming ------------------------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.covers("anthropic", "stream", "stream_usage")
def test_stream(client: openai.OpenAI, fake: FakeAnthropic, include_usage: bool) -> None:
    kwargs: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(client.chat.completions.create(model="claude", messages=_user(), stream=True, **kwargs))
    assert fake.last["stream"] is True and "stream_options" not in fake.last
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "claude says hi to claude-test"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 5  # one per upstream delta
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    usage = [c.usage for c in chunks if c.usage is not None]
    if include_usage:
        assert len(usage) == 1 and usage[0].completion_tokens == 5 and chunks[-1].usage is not None
    else:
        assert usage == []


# --- tools ----------------------------------------------------------------------------------------


@pytest.mark.covers("anthropic", "tools")
def test_parallel_tool_calls(client: openai.OpenAI, fake: FakeAnthropic) -> None:
    fake.script(_calls())
    out = client.chat.completions.create(model="claude", messages=_user("weather?"), tools=[WEATHER, TIME])
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and message.content == "Let me check."
    assert message.tool_calls is not None
    calls = [(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]
    assert calls == [
        ("toolu_01A", "get_weather", {"city": "Paris"}),
        ("toolu_01B", "get_time", {"zone": "Europe/Paris", "fmt": "24h"}),
    ]
    assert fake.last["tools"][0] == {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": WEATHER["function"]["parameters"],
    }
    assert "tool_choice" not in fake.last


@pytest.mark.covers("anthropic", "tools", "stream")
def test_streamed_tool_call_argument_deltas(client: openai.OpenAI, fake: FakeAnthropic) -> None:
    fake.script(_calls())
    chunks = list(
        client.chat.completions.create(
            model="claude", messages=_user("weather?"), tools=[WEATHER, TIME], stream=True
        )
    )
    starts: dict[int, tuple[str | None, str | None]] = {}
    args: dict[int, list[str]] = {}
    for chunk in chunks:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if call.id is not None:
                starts[call.index] = (call.id, call.function.name if call.function else None)
            if call.function and call.function.arguments:
                args.setdefault(call.index, []).append(call.function.arguments)
    assert starts == {0: ("toolu_01A", "get_weather"), 1: ("toolu_01B", "get_time")}
    assert all(len(pieces) > 1 for pieces in args.values())  # deltas, not one buffered string
    assert json.loads("".join(args[1])) == {"zone": "Europe/Paris", "fmt": "24h"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.covers("anthropic", "tools")
def test_tool_history_becomes_tool_use_and_tool_result_blocks(
    client: openai.OpenAI, fake: FakeAnthropic
) -> None:
    client.chat.completions.create(
        model="claude",
        tools=[WEATHER, TIME],
        messages=[
            {"role": "user", "content": "weather and time in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    },
                    {"id": "call.2", "type": "function", "function": {"name": "get_time", "arguments": ""}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call.2", "content": [{"type": "text", "text": "14:00"}]},
            {"role": "user", "content": "thanks"},
        ],
    )
    messages = fake.last["messages"]
    assert messages[1] == {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}},
        ],
    }
    assert messages[2] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": [{"type": "text", "text": "18C"}]},
            {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "14:00"}]},
            {"type": "text", "text": "thanks"},
        ],
    }


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        ({"type": "function", "function": {"name": "get_time"}}, None, {"type": "tool", "name": "get_time"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ],
)
@pytest.mark.covers("anthropic", "tools")
def test_tool_choice(
    client: openai.OpenAI, fake: FakeAnthropic, choice: Any, parallel: bool | None, expected: dict[str, Any]
) -> None:
    kwargs: dict[str, Any] = {"tool_choice": choice} if choice is not None else {}
    if parallel is not None:
        kwargs["parallel_tool_calls"] = parallel
    client.chat.completions.create(model="claude", messages=_user(), tools=[WEATHER, TIME], **kwargs)
    assert fake.last["tool_choice"] == expected


# --- vision and JSON ------------------------------------------------------------------------------


@pytest.mark.covers("anthropic", "vision")
def test_images(client: openai.OpenAI, fake: FakeAnthropic) -> None:
    client.chat.completions.create(
        model="claude",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in these?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://example.com/cat.jpg", "detail": "low"},
                    },
                ],
            }
        ],
    )
    assert fake.last["messages"][0]["content"][1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="claude",
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AAAA"}}],
                }
            ],
        )
    assert "image/tiff" in info.value.message


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.covers("anthropic", "json_mode")
def test_json_object_uses_a_forced_tool(client: openai.OpenAI, fake: FakeAnthropic, stream: bool) -> None:
    kwargs: dict[str, Any] = {
        "model": "claude",
        "messages": _user("JSON please"),
        "response_format": {"type": "json_object"},
    }
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    else:
        out = client.chat.completions.create(**kwargs)
        text = out.choices[0].message.content or ""
        assert out.choices[0].finish_reason == "stop" and out.choices[0].message.tool_calls is None
    assert json.loads(text) == {"answer": "fake"}
    assert fake.last["tool_choice"] == {
        "type": "tool",
        "name": "json_object",
        "disable_parallel_tool_use": True,
    }


@pytest.mark.covers("anthropic", "json_mode")
def test_json_schema_uses_structured_outputs(client: openai.OpenAI, fake: FakeAnthropic) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "rain": {"type": "boolean"}},
        "required": ["city", "rain"],
        "additionalProperties": False,
    }
    out = client.chat.completions.create(
        model="claude",
        messages=_user(),
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "weather", "schema": schema, "strict": True},
        },
    )
    assert json.loads(out.choices[0].message.content or "") == {"city": "fake", "rain": True}
    assert fake.last["output_config"] == {"format": {"type": "json_schema", "schema": schema}}


# --- unsupported parameters and errors ------------------------------------------------------------


def test_seed_is_rejected_unless_dropped(client: openai.OpenAI, fake: FakeAnthropic) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="claude", messages=_user(), seed=7)
    assert "seed" in info.value.message and "anthropic" in info.value.message
    client.chat.completions.create(model="claude-drop", messages=_user(), seed=7, n=1, presence_penalty=0)
    assert "seed" not in fake.last  # and the fake, which forbids unknown fields, accepted it


def test_context_length_exceeded(client: openai.OpenAI, fake: FakeAnthropic) -> None:
    fake.queue(
        Fault(
            status=400,
            body=error_body("invalid_request_error", "prompt is too long: 208310 tokens > 200000 maximum"),
        )
    )
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="claude", messages=_user())
    assert info.value.code == "context_length_exceeded"


def test_refusal_is_a_content_filter(client: openai.OpenAI, fake: FakeAnthropic) -> None:
    fake.script(Reply([], "refusal"))
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="claude", messages=_user())
    assert info.value.code == "content_filter"
    fake.script(Reply([{"type": "text", "text": "I can"}], "refusal"))
    chunks = list(client.chat.completions.create(model="claude", messages=_user(), stream=True))
    assert chunks[-1].choices[0].finish_reason == "content_filter"


def test_rate_limit_keeps_retry_after(client: openai.OpenAI, fake: FakeAnthropic) -> None:
    fake.queue(
        Fault(
            status=429,
            headers={"retry-after": "17"},
            body=error_body("rate_limit_error", "Number of request tokens has exceeded your rate limit"),
        )
    )
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="claude-429", messages=_user())
    assert info.value.response.headers["retry-after"] == "17"


def test_overloaded_is_retryable_unavailable(client: openai.OpenAI, fake: FakeAnthropic) -> None:
    fake.queue(Fault(status=529, body=error_body("overloaded_error", "Overloaded")))
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="claude-529", messages=_user())
    assert info.value.status_code == 503
    err = AnthropicProvider().map_error(529, {}, orjson.dumps(error_body("overloaded_error", "Overloaded")))
    assert err.retryable and err.status == 503


def test_error_event_mid_stream(client: openai.OpenAI, fake: FakeAnthropic) -> None:
    fake.queue(Fault(stream_error="overloaded_error"))
    stream = client.chat.completions.create(model="claude-stream-error", messages=_user(), stream=True)
    with pytest.raises(openai.APIError) as info:
        list(stream)
    assert "Overloaded" in info.value.message


def test_bad_credentials_are_never_echoed(router: RouterProcess, client: openai.OpenAI) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model="claude-badkey", messages=_user())
    assert BAD_KEY not in str(info.value.body) and BAD_KEY not in router.logs()


# --- the stream decoder and the request mapping as plain functions --------------------------------


def _ctx(*, stream: bool = True, include_usage: bool = True, drop: bool = False) -> RequestContext:
    dep = DeploymentConfig(
        name="claude-1",
        model="claude",
        provider="anthropic",
        upstream_model="claude-test",
        drop_unsupported_params=drop,
    )
    return RequestContext(
        "req1", Operation.CHAT, "claude", dep, stream, include_usage, created=1, api_key=KEY
    )


@pytest.mark.covers("anthropic", "stream", "tools")
def test_stream_translator_is_independent_of_byte_boundaries() -> None:
    reply = _calls()
    message = message_for(
        {"model": "claude-test"},
        reply,
        {"input_tokens": 9, "output_tokens": 30, "cache_read_input_tokens": 4},
    )
    raw = b"".join(frame(name, data) for name, data in stream_events(message)).replace(b"\n", b"\r\n", 3)
    provider = AnthropicProvider()

    def run(pieces: list[bytes]) -> list[Any]:
        translator = provider.stream_translator(_ctx())
        out = [p for piece in pieces for p in translator.feed(piece)] + translator.finish()
        assert translator.error is None and translator.usage is not None
        assert (translator.usage.prompt_tokens, translator.usage.cached_tokens) == (13, 4)
        return out

    whole = run([raw])
    assert whole[-1]["usage"]["completion_tokens"] == 30
    assert run([raw[i : i + 1] for i in range(len(raw))]) == whole
    for cut in range(1, len(raw)):
        assert run([raw[:cut], raw[cut:]]) == whole


def test_stream_that_stops_early_is_an_error() -> None:
    message = message_for(
        {"model": "m"}, Reply([{"type": "text", "text": "a b"}]), {"input_tokens": 1, "output_tokens": 2}
    )
    events = stream_events(message)[:-2]
    translator = AnthropicProvider().stream_translator(_ctx())
    translator.feed(b"".join(frame(name, data) for name, data in events))
    translator.finish()
    assert translator.error is not None and translator.error.retryable


_ident = st.from_regex(r"[a-zA-Z0-9_-]{1,12}", fullmatch=True)
_text = st.text(max_size=12)
_text_part = _text.map(lambda t: {"type": "text", "text": t})
_image_part = st.sampled_from(
    [f"data:image/png;base64,{PNG}", "data:image/webp;base64,UklGRg==", "https://example.com/a.jpg"]
).map(lambda u: {"type": "image_url", "image_url": {"url": u}})
_user_msg = st.one_of(_text, st.lists(st.one_of(_text_part, _image_part), min_size=1, max_size=3)).map(
    lambda c: {"role": "user", "content": c}
)
_system_msg = st.builds(
    lambda r, t: {"role": r, "content": t}, st.sampled_from(["system", "developer"]), _text
)
_assistant_msg = st.one_of(_text, st.lists(_text_part, min_size=1, max_size=2)).map(
    lambda c: {"role": "assistant", "content": c}
)
_args = st.dictionaries(_ident, st.one_of(st.integers(-1000, 1000), _text, st.booleans()), max_size=3)


@st.composite
def _tool_exchange(draw: st.DrawFn, names: list[str]) -> list[dict[str, Any]]:
    raw_ids = draw(st.lists(_ident, min_size=1, max_size=3, unique=True))
    ids = [draw(st.sampled_from([f"call_{i}", f"call.{i}", f"toolu_{i}"])) for i in raw_ids]
    calls = [
        {
            "id": i,
            "type": "function",
            "function": {
                "name": draw(st.sampled_from(names)),
                "arguments": draw(_args.map(lambda a: orjson.dumps(a).decode())),
            },
        }
        for i in ids
    ]
    assistant = {"role": "assistant", "content": draw(st.one_of(st.none(), _text)), "tool_calls": calls}
    results = [
        {
            "role": "tool",
            "tool_call_id": i,
            "content": draw(st.one_of(_text, st.lists(_text_part, max_size=2))),
        }
        for i in ids
    ]
    return [assistant, *results]


@st.composite
def openai_requests(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(
        st.lists(_ident, min_size=1, max_size=3, unique=True).filter(lambda n: "json_object" not in n)
    )
    turns = draw(
        st.lists(
            st.one_of(_user_msg, _assistant_msg, _system_msg.map(lambda m: [m]), _tool_exchange(names)),
            min_size=1,
            max_size=6,
        )
    )
    messages = [m for turn in turns for m in (turn if isinstance(turn, list) else [turn])]
    body: dict[str, Any] = {"model": "claude", "messages": messages}
    if draw(st.booleans()):
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": n,
                    "description": "d",
                    "parameters": {"type": "object", "properties": {"x": {"type": "string"}}},
                },
            }
            for n in names
        ]
        choice = draw(st.sampled_from([None, "auto", "none", "required", "specific"]))
        if choice == "specific":
            body["tool_choice"] = {"type": "function", "function": {"name": draw(st.sampled_from(names))}}
        elif choice is not None:
            body["tool_choice"] = choice
        if draw(st.booleans()):
            body["parallel_tool_calls"] = draw(st.booleans())
    optional = {
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "max_tokens": st.integers(1, 10_000),
        "max_completion_tokens": st.integers(1, 10_000),
        "user": _ident,
        "seed": st.integers(0, 99),
        "stop": st.one_of(_ident, st.lists(_ident, min_size=1, max_size=4)),
        "n": st.just(1),
        "presence_penalty": st.floats(-2, 2),
        "response_format": st.sampled_from(
            [
                {"type": "text"},
                {"type": "json_object"},
                {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "o",
                        "schema": {
                            "type": "object",
                            "properties": {"a": {"type": "string"}},
                            "required": ["a"],
                            "additionalProperties": False,
                        },
                    },
                },
            ]
        ),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            body[name] = draw(strategy)
    return body


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=openai_requests(), stream=st.booleans())
@pytest.mark.covers("anthropic", "chat", "tools", "vision", "json_mode")
def test_any_valid_openai_request_is_a_valid_anthropic_request(body: dict[str, Any], stream: bool) -> None:
    validate(Operation.CHAT, body)  # the generated request is one the router accepts
    request = AnthropicProvider().build_request(body, _ctx(stream=stream, drop=True))
    assert request.url == "https://api.anthropic.com/v1/messages"
    validate_headers(request.headers, KEY)
    try:
        validate_request(orjson.loads(request.body or b""))
    except WireError as err:  # pragma: no cover - shows the failing request
        raise AssertionError(f"{err.message}\n{orjson.loads(request.body or b'')}") from None


def _body(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 10, "messages": messages, **extra}


_USE = {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]}
_RESULT = {"type": "tool_result", "tool_use_id": "t1", "content": "ok"}


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        (_body([]), "at least one message"),
        (_body([{"role": "assistant", "content": "x"}]), "first message"),
        (_body([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]), "alternate"),
        (_body([{"role": "system", "content": "x"}]), "role"),
        (_body([{"role": "user", "content": [{"type": "text", "text": " "}]}]), "non-whitespace"),
        (_body([{"role": "user", "content": [_RESULT]}]), "tool_use_id"),
        (
            _body([{"role": "user", "content": "x"}, _USE, {"role": "user", "content": "y"}]),
            "without `tool_result`",
        ),
        (
            _body(
                [
                    {"role": "user", "content": "x"},
                    _USE,
                    {"role": "user", "content": [{"type": "text", "text": "y"}, _RESULT]},
                ]
            ),
            "before any other",
        ),
        (
            _body([{"role": "user", "content": "x"}, {"role": "assistant", "content": [_RESULT]}]),
            "not allowed",
        ),
        (_body([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), "not allowed"),
        (_body([{"role": "user", "content": "x"}], seed=1), "Extra inputs"),
        (_body([{"role": "user", "content": "x"}], tool_choice={"type": "auto"}), "tools"),
        (
            _body([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y "}]),
            "trailing whitespace",
        ),
    ],
)
def test_the_fake_rejects_what_anthropic_rejects(body: dict[str, Any], complaint: str) -> None:
    with pytest.raises(WireError) as info:
        validate_request(body)
    assert complaint in info.value.message
