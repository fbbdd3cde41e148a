"""In-process tests of the Responses API translators and store (no server, no network).

Every Response and stream event the translators make is checked against OpenAI's published
OpenAPI description (tests/support/openai_spec.py).
"""

from __future__ import annotations

import asyncio
import traceback
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubellm.router._errors import InvalidRequestError
from kubellm.router.inbound.responses import (
    BrokenChainError,
    ChatToResponsesStream,
    MemoryResponseStore,
    StoredResponse,
    chat_completion_to_response,
    check_request,
    history,
    response_skeleton,
    responses_request_to_chat,
    with_ids,
)
from kubellm.router.providers import Usage
from tests.support.openai_spec import validate_fast, validate_stream_event

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def full_request() -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city":"Paris"}',
            },
            {
                "type": "function_call",
                "call_id": "call_2",
                "name": "get_weather",
                "arguments": '{"city":"Lyon"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {
                "type": "function_call_output",
                "call_id": "call_2",
                "output": [{"type": "input_text", "text": "rain"}],
            },
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "And so?"}]},
        ],
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "text": {"format": {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}},
        "max_output_tokens": 64,
        "temperature": 0.5,
        "reasoning": {"effort": "low"},
        "store": True,
    }


def test_the_request_fixture_is_a_valid_create_response() -> None:
    validate_fast("CreateResponse", full_request())


def test_request_to_chat_maps_every_field() -> None:
    chat = responses_request_to_chat(full_request())
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Lyon"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
        {"role": "user", "content": "And so?"},
    ]
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": WEATHER["parameters"],
                "description": "The weather in a city",
                "strict": True,
            },
        }
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
    }
    assert chat["max_completion_tokens"] == 64
    assert chat["temperature"] == 0.5
    assert chat["reasoning_effort"] == "low"
    assert "stream" not in chat
    validate_fast("CreateChatCompletionRequest", chat)


def test_string_input_history_and_stream() -> None:
    history_items = [
        {"type": "message", "role": "user", "content": "hi"},
        {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "hello", "annotations": [], "logprobs": []}]},
    ]  # fmt: skip
    chat = responses_request_to_chat({"model": "m", "input": "again", "stream": True}, history_items)
    assert chat["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}


def test_text_then_function_call_in_one_assistant_turn() -> None:
    items = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "let me look"},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
    ]
    messages = responses_request_to_chat({"model": "m", "input": items})["messages"]
    assert messages[1]["content"] == "let me look" and messages[1]["tool_calls"][0]["id"] == "c"


def test_images_stay_parts_and_allowed_tools_narrow_the_tools() -> None:
    other = {**WEATHER, "name": "other"}
    body = {
        "model": "m",
        "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "what is this"},
            {"type": "input_image", "image_url": "https://example.com/a.png", "detail": "low"},
        ]}],
        "tools": [WEATHER, other],
        "tool_choice": {"type": "allowed_tools", "mode": "required",
                        "tools": [{"type": "function", "name": "other"}]},
    }  # fmt: skip
    validate_fast("CreateResponse", body)
    chat = responses_request_to_chat(body)
    assert chat["messages"][0]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "https://example.com/a.png", "detail": "low"},
    }
    assert [t["function"]["name"] for t in chat["tools"]] == ["other"]
    assert chat["tool_choice"] == "required"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"model": "m", "input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"model": "m", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"model": "m", "input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
         "input[0].content[0].type"),
        ({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}},
         "text.format.schema"),
        ({"model": "m", "input": "x", "tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice"),
    ],
)  # fmt: skip
def test_untranslatable_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        responses_request_to_chat(body)
    assert caught.value.param == param and caught.value.status == 400


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": "m"}, "input"),
        ({"model": "m", "input": "x", "stream": "yes"}, "stream"),
        ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "m", "input": "x", "background": True}, "background"),
        ({"model": "m", "input": 7}, "input"),
        ({"model": "m", "input": "x", "previous_response_id": ""}, "previous_response_id"),
    ],
)
def test_check_request_names_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_request(body)
    assert caught.value.param == param


def test_previous_response_id_alone_is_a_request() -> None:
    check_request({"model": "m", "previous_response_id": "resp_1", "input": "next"})


def chat_doc(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "upstream-model",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    }


def test_chat_completion_to_response_text() -> None:
    body = full_request()
    response = chat_completion_to_response(chat_doc({"content": "Hello!"}), body, "resp_1", 100, None)
    validate_fast("Response", response)
    assert response["status"] == "completed" and response["id"] == "resp_1"
    assert response["output"][0]["content"][0]["text"] == "Hello!"
    assert response["usage"]["input_tokens"] == 11 and response["usage"]["output_tokens"] == 7
    assert response["instructions"] == "Be brief." and response["max_output_tokens"] == 64
    assert response["tools"][0]["name"] == "get_weather"
    assert response["text"]["format"]["type"] == "json_schema"


def test_chat_completion_to_response_tool_calls_and_usage_override() -> None:
    calls = [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
        },
        {
            "id": "call_b",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
        },
    ]
    doc = chat_doc({"content": None, "tool_calls": calls}, "tool_calls")
    response = chat_completion_to_response(doc, {"model": "m", "input": "x"}, "resp_2", 100, Usage(3, 4))
    validate_fast("Response", response)
    assert [(o["type"], o["call_id"], o["arguments"]) for o in response["output"]] == [
        ("function_call", "call_a", '{"city":"Oslo"}'),
        ("function_call", "call_b", '{"city":"Rome"}'),
    ]
    assert response["usage"]["total_tokens"] == 7


def test_chat_completion_cut_off_is_incomplete() -> None:
    response = chat_completion_to_response(
        chat_doc({"content": "Hel"}, "length"), {"model": "m"}, "r", 1, None
    )
    validate_fast("Response", response)
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["status"] == "incomplete"


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "upstream-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def run_stream(chunks: list[dict[str, Any]], body: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    stream = ChatToResponsesStream(body or {"model": "m", "input": "x"}, "resp_s", 5)
    events = [event for c in chunks for event in stream.chunk(c)]
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    events += stream.chunk({**chunk({}), "choices": [], "usage": usage})
    return events + stream.close()


def check_sequence(events: list[dict[str, Any]]) -> None:
    for event in events:
        validate_stream_event(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_stream_text() -> None:
    chunks = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo"}),
    ]
    events = run_stream([*chunks, chunk({}, "stop")])
    check_sequence(events)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    assert events[6]["text"] == "Hello"
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == "Hello"
    assert final["usage"]["input_tokens"] == 5 and final["model"] == "upstream-model"
    assert final["output"][0]["id"] == events[2]["item"]["id"] == events[4]["item_id"]


def test_stream_text_then_two_tool_calls() -> None:
    chunks = [
        chunk({"role": "assistant", "content": "Checking."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]}),
        chunk({}, "tool_calls"),
    ]  # fmt: skip
    events = run_stream(chunks)
    check_sequence(events)
    kinds = [e["type"] for e in events]
    assert kinds.count("response.output_item.added") == 3 and kinds.count("response.output_item.done") == 3
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [(d["name"], d["arguments"], d["output_index"]) for d in done] == [
        ("get_weather", '{"city":"Oslo"}', 1),
        ("get_weather", '{"city":"Rome"}', 2),
    ]
    output = events[-1]["response"]["output"]
    assert [o["type"] for o in output] == ["message", "function_call", "function_call"]
    assert output[1]["call_id"] == "call_a" and output[2]["arguments"] == '{"city":"Rome"}'


def test_stream_refusal_reasoning_and_length() -> None:
    chunks = [chunk({"reasoning_content": "hmm"}), chunk({"refusal": "I can't"}), chunk({}, "length")]
    events = run_stream(chunks)
    check_sequence(events)
    assert events[-1]["type"] == "response.incomplete"
    output = events[-1]["response"]["output"]
    assert output[0]["type"] == "reasoning" and output[1]["content"][0] == {
        "type": "refusal",
        "refusal": "I can't",
    }


def test_stream_failure_part_way() -> None:
    stream = ChatToResponsesStream({"model": "m", "input": "x"}, "resp_f", 5)
    events = stream.chunk(chunk({"content": "Hel"})) + stream.fail(
        502, "upstream_error", "the upstream broke"
    )
    check_sequence(events)
    assert [e["type"] for e in events[-4:]] == [
        "response.content_part.done",
        "response.output_item.done",
        "error",
        "response.failed",
    ]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"] == {
        "code": "server_error",
        "message": "the upstream broke",
    }
    assert stream.close() == [] and stream.chunk(chunk({"content": "x"})) == []


def test_skeleton_defaults_validate() -> None:
    validate_fast("Response", response_skeleton({"model": "m"}, "resp_x", 1))


def stored(response_id: str, previous: str | None, said: str, answer: str) -> StoredResponse:
    response = chat_completion_to_response(
        chat_doc({"content": answer}), {"model": "m", "input": said, "previous_response_id": previous},
        response_id, 1, None,
    )  # fmt: skip
    return StoredResponse(response=response, input=with_ids([{"role": "user", "content": said}]))


def test_memory_store_isolation_chain_ttl_and_bound() -> None:
    async def scenario() -> None:
        store = MemoryResponseStore(ttl_seconds=60, max_entries=3)
        await store.put("alice", stored("resp_1", None, "hi", "hello"))
        await store.put("alice", stored("resp_2", "resp_1", "again", "hello again"))
        assert await store.get("bob", "resp_1") is None
        assert not await store.delete("bob", "resp_1")
        items = await history(store, "alice", "resp_2")
        assert [(i.get("role"), i["content"][0]["text"]) for i in items] == [
            ("user", "hi"), ("assistant", "hello"), ("user", "again"), ("assistant", "hello again"),
        ]  # fmt: skip
        assert "id" not in items[0] and items[1]["id"].startswith("msg_")
        with pytest.raises(BrokenChainError):
            await history(store, "bob", "resp_2")
        # Reading renews: resp_1 is now the most recent, so the bound evicts resp_2 first.
        await store.get("alice", "resp_1")
        await store.put("alice", stored("resp_3", None, "a", "b"))
        await store.put("alice", stored("resp_4", None, "a", "b"))
        assert len(store) == 3 and await store.get("alice", "resp_2") is None
        assert await store.get("alice", "resp_1") is not None
        assert await store.delete("alice", "resp_1") and await store.get("alice", "resp_1") is None
        short = MemoryResponseStore(ttl_seconds=0.05, max_entries=10)
        await short.put("alice", stored("resp_t", None, "a", "b"))
        await asyncio.sleep(0.1)
        assert await short.get("alice", "resp_t") is None

    asyncio.run(scenario())


def test_memory_store_copies() -> None:
    async def scenario() -> None:
        store = MemoryResponseStore(ttl_seconds=60, max_entries=3)
        entry = stored("resp_1", None, "hi", "hello")
        await store.put("k", entry)
        entry.response["output"].clear()
        got = await store.get("k", "resp_1")
        assert got is not None and got.response["output"]

    asyncio.run(scenario())


def test_redis_store() -> None:
    from redis.asyncio import Redis

    from kubellm.router.inbound.responses import RedisResponseStore
    from tests.support.redis_server import RedisServer

    with RedisServer() as srv:

        async def scenario() -> None:
            client = Redis.from_url(srv.url)
            try:
                store = RedisResponseStore(client, "kubellm:", ttl_seconds=60)
                await store.put("alice", stored("resp_1", None, "hi", "hello"))
                assert await store.get("bob", "resp_1") is None
                got = await store.get("alice", "resp_1")
                assert got is not None and got.response["output"][0]["content"][0]["text"] == "hello"
                keys = [k.decode() for k in await client.keys("*")]
                assert len(keys) == 1 and keys[0].startswith("kubellm:responses:") and "alice" not in keys[0]
                assert 0 < await client.pttl(keys[0]) <= 60_000
                assert not await store.delete("bob", "resp_1")
                assert await store.delete("alice", "resp_1") and await store.get("alice", "resp_1") is None
            finally:
                await client.aclose()

        asyncio.run(scenario())


def test_the_fake_upstream_speaks_valid_responses() -> None:
    """The fake OpenAI's Responses answers are what the router's native path is tested against."""
    from tests.fakes import responses_wire

    body = {"model": "m", "input": "hi", "tools": [WEATHER]}
    responses_wire.validate_request(body)
    for response in (
        responses_wire.build_response(body, "hello"),
        responses_wire.build_response({"model": "m", "input": "hi", "text": full_request()["text"]}, "x"),
    ):
        validate_fast("Response", response)
        check_sequence(responses_wire.stream_events(response))
    with pytest.raises(responses_wire.ResponsesWireError, match="No tool call found"):
        responses_wire.validate_request(
            {"model": "m", "input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}
        )
    with pytest.raises(responses_wire.ResponsesWireError, match="Invalid request"):
        responses_wire.validate_request({"model": "m", "input": [{"type": "bogus"}]})


_ANY = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
_ITEM = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning", "bogus"]),
        "role": st.sampled_from(["user", "assistant", "system", "developer", "tool"]),
        "content": st.one_of(_ANY, st.lists(st.fixed_dictionaries(
            {"type": st.sampled_from(["input_text", "output_text", "input_image", "refusal", "input_file"])},
            optional={"text": _ANY, "image_url": _ANY, "refusal": _ANY}), max_size=3)),
        "call_id": _ANY, "name": _ANY, "arguments": _ANY, "output": _ANY, "id": _ANY,
    },
)  # fmt: skip
_REQUEST = st.fixed_dictionaries(
    {"model": st.just("m")},
    optional={
        "input": st.one_of(_ANY, st.lists(_ITEM, max_size=4)),
        **{name: _ANY for name in ("instructions", "tools", "tool_choice", "text", "reasoning", "metadata",
                                   "temperature", "top_p", "max_output_tokens", "stream", "store", "user")},
    },
)  # fmt: skip


@settings(
    max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
@given(body=_REQUEST)
def test_any_request_translates_renders_or_is_a_400(body: dict[str, Any]) -> None:
    """Hostile shapes: a 400 naming a field, never a crash of the translation or the renderers."""
    from kubellm.router._errors import KubellmError
    from kubellm.router.inbound.responses import ResponsesApi

    store = MemoryResponseStore(60, 10)
    api = ResponsesApi(lambda: store)
    try:
        api.validate(body)
        chat = api.to_chat(body)
    except KubellmError as err:
        assert err.status == 400 and err.param, err
        return
    except Exception:  # pragma: no cover - shows what crashed
        pytest.fail(f"crashed on {body!r}:\n{traceback.format_exc()}")
    assert chat["messages"]
    response = chat_completion_to_response(chat_doc({"content": "x"}), body, "resp_h", 1, None)
    validate_fast("Response", response)
    stream = ChatToResponsesStream(body, "resp_h", 1)
    for event in stream.chunk(chunk({"content": "x"})) + stream.close():
        validate_stream_event(event)
