"""``/v1/responses``: the real openai SDK against the router, before a chat-only backend (the mock
provider, the OpenAI fake as an OpenAI-compatible chat server) and natively before the OpenAI fake.

Every JSON answer and stream event is checked against OpenAI's published OpenAPI description.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import openai
import orjson
import pytest

from kubellm.router._sse import SSEDecoder
from tests.conftest import UPSTREAM_KEY, openai_deployment
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.support.openai_spec import validate_fast, validate_stream_event
from tests.support.servers import RouterProcess, http_get

KEYS = {"ALICE_KEY": "sk-alice-0123456789abcdef", "BOB_KEY": "sk-bob-0123456789abcdef"}
ALICE, BOB = KEYS["ALICE_KEY"], KEYS["BOB_KEY"]
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
#: Model groups: a chat-only backend, and one that speaks Responses natively.
CHAT_ONLY, NATIVE, COMPAT = "chat-only", "native", "compat"


def config(fake: FakeOpenAI, redis_url: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "deployments": [
            {"name": "mock-dep", "model": CHAT_ONLY, "provider": "mock"},
            openai_deployment(fake, name="native-dep", model=NATIVE, provider="openai"),
            openai_deployment(fake, name="compat-dep", model=COMPAT),
        ],
        "keys": [{"name": "alice", "keyEnv": "ALICE_KEY"}, {"name": "bob", "keyEnv": "BOB_KEY"}],
        "settings": {"numRetries": 0},
    }
    if redis_url:
        doc["settings"]["redis"] = {"url": redis_url}
    return doc


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=UPSTREAM_KEY) as server:
        yield server


@pytest.fixture
def router(fake: FakeOpenAI, start_router: Callable[..., RouterProcess]) -> RouterProcess:
    return start_router(config(fake), env=KEYS)


def client(router: RouterProcess, key: str = ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.v1, api_key=key, max_retries=0)


def post(router: RouterProcess, body: dict[str, Any], key: str = ALICE) -> tuple[int, bytes, str]:
    request = urllib.request.Request(
        router.v1 + "/responses",
        data=orjson.dumps(body),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read(), resp.headers.get("content-type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers.get("content-type", "")


def raw_response(router: RouterProcess, body: dict[str, Any], key: str = ALICE) -> dict[str, Any]:
    status, raw, kind = post(router, body, key)
    assert status == 200 and kind.startswith("application/json"), raw
    doc = orjson.loads(raw)
    validate_fast("Response", doc)
    return dict(doc)


def raw_events(router: RouterProcess, body: dict[str, Any], key: str = ALICE) -> list[dict[str, Any]]:
    """A streamed response's events, each checked against the spec and its ``event:`` line."""
    status, raw, kind = post(router, {**body, "stream": True}, key)
    assert status == 200 and kind.startswith("text/event-stream"), raw
    events = []
    for sse in SSEDecoder().feed(raw):
        doc = orjson.loads(sse.data)
        assert sse.event == doc["type"]
        validate_stream_event(doc)
        events.append(doc)
    numbers = [e["sequence_number"] for e in events]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    return events


def access_lines(router: RouterProcess) -> list[dict[str, Any]]:
    time.sleep(0.3)  # the access log is written off the request path
    return [
        orjson.loads(line)
        for line in router.logs().splitlines()
        if '"request_id"' in line and '"operation":"responses"' in line
    ]


@pytest.mark.parametrize("model", [CHAT_ONLY, NATIVE])
def test_text_not_streamed_and_streamed(router: RouterProcess, fake: FakeOpenAI, model: str) -> None:
    sdk = client(router)
    response = sdk.responses.create(model=model, input="hello there", instructions="Be brief.")
    assert response.status == "completed" and response.output_text
    assert response.instructions == "Be brief." and response.usage is not None
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    with sdk.responses.stream(model=model, input="hello there") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text and final.output_text
    doc = raw_response(router, {"model": model, "input": "hello there"})
    events = raw_events(router, {"model": model, "input": "hello there"})
    kinds = [e["type"] for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == doc["output"][0]["content"][0]["text"]
    native_calls = [s for s in fake.seen if s.path == "/v1/responses"]
    assert bool(native_calls) == (model == NATIVE)
    if model == NATIVE:
        assert native_calls[0].body["model"] == "upstream-model"
        assert "stream_options" not in native_calls[-1].body
    lines = access_lines(router)
    assert len(lines) == 4 and {line["key"] for line in lines} == {"alice"}
    assert all(line["status"] == 200 and line["prompt_tokens"] > 0 for line in lines)
    assert all(line["completion_tokens"] > 0 and not line["usage_estimated"] for line in lines)


@pytest.mark.parametrize("model", [CHAT_ONLY, NATIVE])
@pytest.mark.parametrize("stream", [False, True])
def test_function_tool_round_trip_with_previous_response_id(
    router: RouterProcess, fake: FakeOpenAI, model: str, stream: bool
) -> None:
    sdk = client(router)
    tools: Any = [WEATHER]

    def create(**kwargs: Any) -> Any:
        if not stream:
            return sdk.responses.create(model=model, tools=tools, **kwargs)
        with sdk.responses.stream(model=model, tools=tools, **kwargs) as events:
            kinds = [e.type for e in events]
            assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
            return events.get_final_response()

    first = create(input="What is the weather in Paris?", tool_choice="required")
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert set(orjson.loads(calls[0].arguments)) == {"city"}
    result = {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21 C"}
    second = create(previous_response_id=first.id, input=[result])
    assert second.status == "completed" and second.previous_response_id == first.id
    assert second.output_text and not [i for i in second.output if i.type == "function_call"]
    if model == CHAT_ONLY:
        assert "sunny, 21 C" in second.output_text  # the mock says what the tool answered
    else:
        # The upstream never saw an id of the router's: it got the whole conversation instead.
        sent = [s.body for s in fake.seen if s.path == "/v1/responses"][-1]
        assert "previous_response_id" not in sent
        assert [i.get("type", "message") for i in sent["input"]] == [
            "message",
            "function_call",
            "function_call_output",
        ]
    stored = sdk.responses.retrieve(second.id)
    assert stored.id == second.id and stored.output_text == second.output_text


@pytest.mark.parametrize("model", [CHAT_ONLY, NATIVE])
def test_text_format_json_schema(router: RouterProcess, model: str) -> None:
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    response = client(router).responses.create(model=model, input="Invent a person.", text=fmt)  # type: ignore[arg-type]
    person = orjson.loads(response.output_text)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_schema"


def test_max_output_tokens_and_reasoning_reach_the_chat_backend(
    router: RouterProcess, fake: FakeOpenAI
) -> None:
    body = {"model": COMPAT, "input": "hi", "max_output_tokens": 32, "reasoning": {"effort": "low"}}
    doc = raw_response(router, body)
    assert doc["max_output_tokens"] == 32
    sent = fake.seen[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.body["max_completion_tokens"] == 32 and sent.body["reasoning_effort"] == "low"


def test_get_delete_input_items_and_key_isolation(router: RouterProcess) -> None:
    alice, bob = client(router, ALICE), client(router, BOB)
    first = alice.responses.create(model=CHAT_ONLY, input="remember me")
    status, raw = http_get(router.v1 + f"/responses/{first.id}", {"Authorization": f"Bearer {ALICE}"})
    assert status == 200
    validate_fast("Response", orjson.loads(raw))
    status, raw = http_get(
        router.v1 + f"/responses/{first.id}/input_items", {"Authorization": f"Bearer {ALICE}"}
    )
    items = orjson.loads(raw)
    validate_fast("ResponseItemList", items)
    assert items["data"][0]["content"][0]["text"] == "remember me"
    listed = alice.responses.input_items.list(first.id)
    assert [i.id for i in listed.data] == [items["data"][0]["id"]]
    # Bob can neither read, chain, list nor delete Alice's response: the same 404 as for no response.
    for attempt in (
        lambda: bob.responses.retrieve(first.id),
        lambda: bob.responses.create(model=CHAT_ONLY, input="x", previous_response_id=first.id),
        lambda: bob.responses.input_items.list(first.id),
        lambda: bob.responses.delete(first.id),
    ):
        with pytest.raises(openai.NotFoundError) as caught:
            attempt()
        assert first.id in caught.value.message
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve("resp_never")
    assert alice.responses.retrieve(first.id).id == first.id  # Bob's delete did nothing
    alice.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as caught:
        alice.responses.create(model=CHAT_ONLY, input="x", previous_response_id=first.id)
    assert caught.value.code == "previous_response_not_found"
    unstored = alice.responses.create(model=CHAT_ONLY, input="forget me", store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(unstored.id)


def test_client_mistakes_are_400s_naming_the_field(router: RouterProcess) -> None:
    for body, param in (
        ({"model": CHAT_ONLY}, "input"),
        ({"model": CHAT_ONLY, "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"model": CHAT_ONLY, "input": "x", "max_output_tokens": -1}, "max_output_tokens"),
        ({"model": CHAT_ONLY, "input": "x", "background": True}, "background"),
    ):
        status, raw, _ = post(router, body)
        error = orjson.loads(raw)
        validate_fast("ErrorResponse", error)
        assert status == 400 and error["error"]["param"] == param, raw


@pytest.mark.parametrize("model", [COMPAT, NATIVE])
def test_a_stream_cut_short_fails_with_error_and_response_failed(
    router: RouterProcess, fake: FakeOpenAI, model: str
) -> None:
    fake.faults.append(Fault(drop_after=4))
    events = raw_events(router, {"model": model, "input": "hello there", "tools": [], "store": True})
    assert events[0]["type"] == "response.created"
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert events[-1]["sequence_number"] == events[-2]["sequence_number"] + 1
    with pytest.raises(openai.NotFoundError):
        client(router).responses.retrieve(failed["id"])  # a failed response is not stored


def test_failures_before_the_stream_are_openai_errors(router: RouterProcess, fake: FakeOpenAI) -> None:
    fake.faults.append(Fault(status=429, headers={"Retry-After": "7"}))
    with pytest.raises(openai.RateLimitError) as caught:
        client(router).responses.create(model=NATIVE, input="hi")
    assert caught.value.response.headers["retry-after"] == "7"


def test_stored_responses_are_shared_through_redis(
    fake: FakeOpenAI, start_router: Callable[..., RouterProcess]
) -> None:
    from tests.support.redis_server import RedisServer

    with RedisServer() as redis:
        one = start_router(config(fake, redis.url), env=KEYS)
        two = start_router(config(fake, redis.url), env=KEYS)
        first = client(one).responses.create(model=CHAT_ONLY, input="my name is Ada")
        second = client(two).responses.create(model=CHAT_ONLY, previous_response_id=first.id, input="and so?")
        assert second.previous_response_id == first.id
        assert client(two).responses.retrieve(first.id).output_text == first.output_text
        with pytest.raises(openai.NotFoundError):
            client(two, BOB).responses.retrieve(first.id)
        client(one).responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            client(two).responses.retrieve(first.id)


def test_azure_speaks_responses_natively_from_its_responses_api_versions(
    start_router: Callable[..., RouterProcess],
) -> None:
    from tests.fakes.azure_upstream import FakeAzure

    with FakeAzure(api_key="azure-key-0123456789abcdef") as azure:

        def dep(model: str, version: str) -> dict[str, Any]:
            return {
                "model": model,
                "provider": "azure",
                "upstreamModel": "gpt4o-prod",
                "baseUrl": azure.base_url,
                "apiVersion": version,
                "apiKeyEnv": "AZ_KEY",
            }

        deployments = [dep("az-dated", "2025-04-01-preview"), dep("az-v1", "v1"), dep("az-old", "2024-10-21")]
        router = start_router({"deployments": deployments}, env={"AZ_KEY": "azure-key-0123456789abcdef"})
        sdk = client(router)
        expected = {
            "az-dated": ("/openai/responses", {"api-version": "2025-04-01-preview"}),
            "az-v1": ("/openai/v1/responses", {}),
            "az-old": ("/openai/deployments/gpt4o-prod/chat/completions", {"api-version": "2024-10-21"}),
        }
        for model, (path, query) in expected.items():
            response = sdk.responses.create(model=model, input="hi", tools=[WEATHER])  # type: ignore[list-item]
            call = next(item for item in response.output if item.type == "function_call")
            result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
            follow = sdk.responses.create(model=model, input=[result], previous_response_id=response.id)  # type: ignore[list-item]
            assert follow.output_text == "azure says hi" or model == "az-old", follow
            assert (azure.last.path, azure.last.query) == (path, query)
            assert azure.last.headers["api-key"] == "azure-key-0123456789abcdef"
            if model != "az-old":
                assert azure.last.body["model"] == "gpt4o-prod"
                events = raw_events(router, {"model": model, "input": "hi"})
                assert events[-1]["response"]["output"][0]["content"][0]["text"] == "azure says hi"
