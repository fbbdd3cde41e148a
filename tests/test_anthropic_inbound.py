"""`POST /v1/messages`: the real anthropic SDK against the router, before mock, OpenAI and Anthropic."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import anthropic
import orjson
import pytest
from aiohttp import web
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from kubellm.router.inbound._anthropic import AnthropicEventStream, anthropic_request_to_openai
from tests.conftest import MASTER_KEY, UPSTREAM_KEY
from tests.fakes.anthropic_upstream import FakeAnthropic, Reply, error_body
from tests.fakes.anthropic_upstream import Fault as AnthropicFault
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.support.openai_requests import PNG
from tests.support.servers import RouterProcess

ANTHROPIC_KEY = "sk-ant-inbound"
WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}}}
EVENTS: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)


class ToolCallingOpenAI(FakeOpenAI):
    """The OpenAI fake, answering ``tool_choice: "required"`` with two parallel tool calls."""

    CALLS = (("call_w", "get_weather", '{"city":"Paris"}'), ("call_t", "get_time", '{"zone":"Europe/Paris"}'))

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        peek = orjson.loads(await request.read())
        if peek.get("tool_choice") != "required":
            return await super()._chat(request)
        body, failure = await self._common(request)
        if failure is not None:
            return failure
        assert body is not None
        base = {"id": "chatcmpl-tools", "created": 1, "model": body["model"]}
        usage = {"prompt_tokens": 20, "completion_tokens": 12, "total_tokens": 32}
        if not body.get("stream"):
            calls = [
                {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                for i, n, a in self.CALLS
            ]
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            choice = {"index": 0, "message": message, "finish_reason": "tool_calls"}
            return web.json_response(
                {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return (
                b"data: "
                + orjson.dumps({**base, "object": "chat.completion.chunk", "choices": [choice]})
                + b"\n\n"
            )

        await resp.write(chunk({"role": "assistant", "content": None}))
        for index, (call_id, name, args) in enumerate(self.CALLS):
            start = {
                "index": index,
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": ""},
            }
            await resp.write(chunk({"tool_calls": [start]}))
            for piece in (args[: len(args) // 2], args[len(args) // 2 :]):
                await resp.write(chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}))
        await resp.write(chunk({}, "tool_calls"))
        tail = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
        await resp.write(b"data: " + orjson.dumps(tail) + b"\n\ndata: [DONE]\n\n")
        await resp.write_eof()
        return resp


@pytest.fixture(scope="module")
def fake_openai() -> Iterator[FakeOpenAI]:
    with ToolCallingOpenAI(api_key=UPSTREAM_KEY) as fake:
        yield fake


@pytest.fixture(scope="module")
def fake_anthropic() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(api_key=ANTHROPIC_KEY) as fake:
        yield fake


@pytest.fixture(scope="module")
def router(fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic) -> Iterator[RouterProcess]:
    def openai_dep(model: str) -> dict[str, Any]:
        return {
            "model": model,
            "provider": "openai-compatible",
            "upstreamModel": "upstream-model",
            "baseUrl": fake_openai.base_url,
            "apiKeyEnv": "TEST_UPSTREAM_KEY",
        }

    def anthropic_dep(model: str) -> dict[str, Any]:
        return {
            "model": model,
            "provider": "anthropic",
            "upstreamModel": "claude-test",
            "baseUrl": fake_anthropic.base_url,
            "apiKeyEnv": "TEST_ANTHROPIC_KEY",
        }

    config = {
        "deployments": [
            {"model": "mock-model", "provider": "mock"},
            openai_dep("gpt-test"),
            openai_dep("gpt-429"),
            anthropic_dep("claude"),
            anthropic_dep("claude-err"),
        ],
        "settings": {"numRetries": 0},
    }
    env = {
        "KUBELLM_MASTER_KEY": MASTER_KEY,
        "TEST_UPSTREAM_KEY": UPSTREAM_KEY,
        "TEST_ANTHROPIC_KEY": ANTHROPIC_KEY,
    }
    with RouterProcess(config, env=env) as proc:
        yield proc


@pytest.fixture
def client(
    router: RouterProcess, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> anthropic.Anthropic:
    fake_openai.faults.clear()
    fake_anthropic.faults.clear()
    fake_anthropic.replies.clear()
    return anthropic.Anthropic(base_url=router.base_url, api_key=MASTER_KEY, max_retries=0)


def _post(router: RouterProcess, path: str, body: dict[str, Any], key: str = MASTER_KEY) -> tuple[int, bytes]:
    req = urllib.request.Request(
        router.base_url + path,
        data=orjson.dumps(body),
        headers={"x-api-key": key, "anthropic-version": "2023-06-01", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.headers["content-type"].startswith(
                "text/event-stream" if body.get("stream") else "application/json"
            )
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Anthropic SSE frames, each checked against the SDK's own event types."""
    frames = raw.split(b"\n\n")
    assert frames[-1] == b""
    out = []
    for block in frames[:-1]:
        event_line, data_line = block.split(b"\n")
        assert event_line.startswith(b"event: ") and data_line.startswith(b"data: ")
        name, data = event_line[7:].decode(), orjson.loads(data_line[6:])
        assert data["type"] == name
        if name not in ("ping", "error"):  # the SDK's event union has no type for these two
            EVENTS.validate_python(data)
        out.append((name, data))
    return out


def _tool_history() -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "two tools", "signature": "sig"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": [{"type": "text", "text": "14:00"}],
                },
                {"type": "text", "text": "Thanks!"},
            ],
        },
    ]


# --- in front of the mock provider ----------------------------------------------------------------


def test_mock_message(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model="mock-model",
        max_tokens=100,
        system="Be nice.",
        messages=[{"role": "user", "content": "hello there"}],
    )
    Message.model_validate(message.model_dump())
    assert message.content[0].type == "text"
    assert message.content[0].text == "This is a mock response from kubellm. You said: hello there"
    assert message.stop_reason == "end_turn" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0


def test_mock_stream(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model="mock-model", max_tokens=100, messages=[{"role": "user", "content": "hello there"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "This is a mock response from kubellm. You said: hello there"
    assert final.content[0].type == "text" and final.content[0].text == text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0 and final.usage.input_tokens > 0


def test_mock_accepts_tool_history(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model="mock-model", max_tokens=100, tools=[WEATHER, TIME], messages=_tool_history()
    )
    assert message.content[0].type == "text" and "Thanks!" in message.content[0].text


def test_max_tokens_limits_the_mock(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model="mock-model", max_tokens=3, messages=[{"role": "user", "content": "x"}]
    )
    assert message.stop_reason == "max_tokens"


# --- in front of an OpenAI upstream ---------------------------------------------------------------


def test_openai_upstream_gets_a_translated_request(
    client: anthropic.Anthropic, fake_openai: FakeOpenAI
) -> None:
    message = client.messages.create(
        model="gpt-test",
        max_tokens=64,
        system=[{"type": "text", "text": "Be brief."}],
        messages=[
            *_tool_history()[:2],
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "content": [
                            {
                                "type": "image",
                                "source": {"type": "url", "url": "https://example.com/clock.png"},
                            }
                        ],
                    },
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                    {"type": "text", "text": "Thanks!"},
                ],
            },
        ],
        tools=[WEATHER, TIME],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        stop_sequences=["END"],
        metadata={"user_id": "user-9"},
        extra_body={"temperature": 0.2, "top_p": 0.8, "top_k": 5},  # this SDK version no longer has them
    )
    assert message.stop_reason == "tool_use"  # the upstream answers "required" with tool calls
    body = fake_openai.seen[-1].body
    assert body == {
        "model": "upstream-model",
        "max_tokens": 64,
        "stop": ["END"],
        "temperature": 0.2,
        "top_p": 0.8,
        "user": "user-9",
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "parameters": WEATHER["input_schema"],
                },
            },
            {"type": "function", "function": {"name": "get_time", "parameters": TIME["input_schema"]}},
        ],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather and time in Paris?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    },
                    {
                        "id": "toolu_2",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": "{}"},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": ""},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "https://example.com/clock.png"}},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    {"type": "text", "text": "Thanks!"},
                ],
            },
        ],
    }


def test_openai_upstream_stream_has_anthropic_events(router: RouterProcess, fake_openai: FakeOpenAI) -> None:
    status, raw = _post(
        router,
        "/messages",
        {
            "model": "gpt-test",
            "max_tokens": 50,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    assert status == 200
    events = _events(raw)
    names = [name for name, _ in events]
    deltas = names.count("content_block_delta")
    assert deltas >= 2
    assert names == [
        "message_start",
        "ping",
        "content_block_start",
        *["content_block_delta"] * deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == "fake says hi to upstream-model"
    final = events[-2][1]
    assert final["delta"]["stop_reason"] == "end_turn" and final["usage"]["output_tokens"] == 5
    assert fake_openai.seen[-1].body["stream_options"] == {"include_usage": True}


def test_openai_upstream_stream_with_the_sdk(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model="gpt-test", max_tokens=50, tools=[WEATHER], messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text == "fake says hi to upstream-model"
    assert final.usage.input_tokens > 0 and final.usage.output_tokens == 5


@pytest.mark.parametrize("stream", [False, True])
def test_openai_upstream_tool_calls_become_tool_use(client: anthropic.Anthropic, stream: bool) -> None:
    kwargs: dict[str, Any] = {
        "model": "gpt-test",
        "max_tokens": 100,
        "tools": [WEATHER, TIME],
        "tool_choice": {"type": "any"},
        "messages": [{"role": "user", "content": "go"}],
    }
    if stream:
        with client.messages.stream(**kwargs) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**kwargs)
    assert message.stop_reason == "tool_use"
    blocks = [
        (b.type, getattr(b, "id", None), getattr(b, "name", None), getattr(b, "input", None))
        for b in message.content
    ]
    assert blocks == [
        ("tool_use", "call_w", "get_weather", {"city": "Paris"}),
        ("tool_use", "call_t", "get_time", {"zone": "Europe/Paris"}),
    ]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (20, 12)


def test_non_streamed_body_is_an_anthropic_message(router: RouterProcess) -> None:
    status, raw = _post(
        router,
        "/v1/messages",
        {"model": "gpt-test", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert status == 200
    doc = orjson.loads(raw)
    Message.model_validate(doc)
    assert set(doc) == {"id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"}
    assert doc["type"] == "message" and doc["stop_sequence"] is None


# --- in front of an Anthropic upstream: tool use and JSON both ways -------------------------------


def _tool_reply() -> Reply:
    return Reply(
        [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_01B", "name": "get_time", "input": {"zone": "Europe/Paris"}},
        ],
        "tool_use",
    )


def test_tool_use_round_trip(client: anthropic.Anthropic, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.script(_tool_reply())
    message = client.messages.create(
        model="claude", max_tokens=200, tools=[WEATHER, TIME], messages=_tool_history()
    )
    assert message.stop_reason == "tool_use"
    blocks = [(b.type, getattr(b, "id", None), getattr(b, "input", None)) for b in message.content]
    assert blocks == [
        ("text", None, None),
        ("tool_use", "toolu_01A", {"city": "Paris"}),
        ("tool_use", "toolu_01B", {"zone": "Europe/Paris"}),
    ]
    upstream = fake_anthropic.last  # an Anthropic upstream gets the request untranslated
    assert upstream["messages"] == _tool_history()
    assert upstream["tools"] == [WEATHER, TIME]


def test_streamed_tool_use_round_trip(client: anthropic.Anthropic, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.script(_tool_reply())
    json_deltas = 0
    with client.messages.stream(
        model="claude",
        max_tokens=200,
        tools=[WEATHER, TIME],
        messages=[{"role": "user", "content": "Weather?"}],
    ) as stream:
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                json_deltas += 1
        final = stream.get_final_message()
    assert json_deltas >= 4  # argument pieces arrive as they are generated
    assert final.stop_reason == "tool_use"
    inputs = [b.input for b in final.content if b.type == "tool_use"]
    assert inputs == [{"city": "Paris"}, {"zone": "Europe/Paris"}]


def test_json_schema_round_trip(client: anthropic.Anthropic, fake_anthropic: FakeAnthropic) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    message = client.messages.create(
        model="claude",
        max_tokens=100,
        messages=[{"role": "user", "content": "x"}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )
    assert message.content[0].type == "text" and orjson.loads(message.content[0].text) == {"city": "fake"}
    assert fake_anthropic.last["output_config"] == {"format": {"type": "json_schema", "schema": schema}}


# --- errors, in Anthropic's shape -----------------------------------------------------------------


def test_bad_key_is_an_anthropic_authentication_error(router: RouterProcess) -> None:
    bad = anthropic.Anthropic(base_url=router.base_url, api_key="sk-not-the-key-31337", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        bad.messages.create(model="mock-model", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "authentication_error"
    assert "sk-not-the-key-31337" not in str(info.value.body)


def test_bearer_token_is_accepted(router: RouterProcess) -> None:
    bearer = anthropic.Anthropic(base_url=router.base_url, auth_token=MASTER_KEY, max_retries=0)
    message = bearer.messages.create(
        model="mock-model", max_tokens=50, messages=[{"role": "user", "content": "x"}]
    )
    assert message.content


def test_unknown_model_and_invalid_request(client: anthropic.Anthropic, router: RouterProcess) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert info.value.body["error"]["type"] == "not_found_error"
    status, raw = _post(
        router, "/v1/messages", {"model": "mock-model", "messages": [{"role": "user", "content": "x"}]}
    )
    doc = orjson.loads(raw)
    assert status == 400 and doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in doc["error"]["message"]


def test_upstream_rate_limit(client: anthropic.Anthropic, fake_openai: FakeOpenAI) -> None:
    fake_openai.queue(Fault(status=429, headers={"Retry-After": "9"}))
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(model="gpt-429", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert info.value.response.headers["retry-after"] == "9"
    assert info.value.body["error"]["type"] == "rate_limit_error"


def test_context_length_keeps_anthropic_wording(
    client: anthropic.Anthropic, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.queue(
        AnthropicFault(
            status=400,
            body=error_body("invalid_request_error", "prompt is too long: 250000 tokens > 200000 maximum"),
        )
    )
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="claude", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert "prompt is too long" in info.value.message


def test_error_event_mid_stream(client: anthropic.Anthropic, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.queue(AnthropicFault(stream_error="overloaded_error"))
    seen: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as info,
        client.messages.stream(
            model="claude-err", max_tokens=50, messages=[{"role": "user", "content": "x"}]
        ) as stream,
    ):
        seen.extend(event.type for event in stream)
    assert "message_start" in seen
    assert isinstance(info.value.body, dict) and info.value.body["error"]["type"] == "overloaded_error"


# --- the translators as plain functions -----------------------------------------------------------


def test_openai_chunks_become_anthropic_events() -> None:
    stream = AnthropicEventStream("msg_1")
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return orjson.dumps({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    calls = [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}]
    frames = [
        *stream.event(chunk({"role": "assistant", "content": ""})),
        *stream.event(chunk({"content": "Hi"})),
        *stream.event(chunk({"tool_calls": calls})),
        *stream.event(chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]})),
        *stream.event(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]})),
        *stream.event(
            chunk(
                {"tool_calls": [{"index": 1, "id": "call_b", "function": {"name": "g", "arguments": "{}"}}]}
            )
        ),
        *stream.event(chunk({}, "tool_calls")),
        *stream.event(
            orjson.dumps(
                {
                    **base,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": 10,
                        "completion_tokens": 4,
                        "prompt_tokens_details": {"cached_tokens": 3},
                    },
                }
            )
        ),
        *stream.event(b"[DONE]"),
    ]
    events = _events(b"".join(frames))
    summary = [
        (n, d.get("index"), (d.get("delta") or d.get("content_block") or {}).get("type")) for n, d in events
    ]
    assert summary == [
        ("message_start", None, None),
        ("ping", None, None),
        ("content_block_start", 0, "text"),
        ("content_block_delta", 0, "text_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, "tool_use"),
        ("content_block_delta", 1, "input_json_delta"),
        ("content_block_delta", 1, "input_json_delta"),
        ("content_block_stop", 1, None),
        ("content_block_start", 2, "tool_use"),
        ("content_block_delta", 2, "input_json_delta"),
        ("content_block_stop", 2, None),
        ("message_delta", None, None),
        ("message_stop", None, None),
    ]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert events[-2][1]["usage"] == {
        "input_tokens": 7,
        "output_tokens": 4,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 3,
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m", "max_tokens": 5, "messages": []}, "messages"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}],
            },
            "messages.0.content.0.type",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            },
            "tools.0",
        ),
    ],
)
def test_request_translation_names_the_bad_field(body: dict[str, Any], param: str) -> None:
    from kubellm.router._errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as info:
        anthropic_request_to_openai(body)
    assert info.value.param == param
