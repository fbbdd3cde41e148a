"""The built-in mock, on the embedded default config, honours what clients ask for.

A real `kubellm router` process with no config (what a newcomer starts) and the real `openai` SDK:
``encoding_format: base64`` embeddings decode to the float answer; ``tools`` get a tool call whose
arguments validate against the tool's schema, streamed or not, and text once a tool answers;
``response_format`` gets JSON valid under the schema. Every answer's shape is checked against
OpenAI's published OpenAPI description.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from enum import StrEnum
from typing import Any, Literal

import jsonschema
import openai
import orjson
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from kubellm.router.providers._mock_json import instance_of
from tests.support import openai_spec
from tests.support.servers import RouterProcess

TOOL_REPLY = "This is a mock response from kubellm. The tool answered: sunny, 21 degrees"
USER: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def router() -> Iterator[RouterProcess]:
    with RouterProcess() as proc:  # no config: the embedded default, as `kubellm router` serves it
        yield proc


@pytest.fixture(scope="module")
def client(router: RouterProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.v1, api_key="unused", max_retries=0, timeout=10)


def post(router: RouterProcess, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = requests.post(router.v1 + path, json=body, timeout=10)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def sse_chunks(router: RouterProcess, body: dict[str, Any]) -> list[dict[str, Any]]:
    resp = requests.post(router.v1 + "/chat/completions", json={**body, "stream": True}, timeout=10)
    assert resp.status_code == 200, resp.text
    lines = [line[6:] for line in resp.text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [orjson.loads(line) for line in lines[:-1]]


def float32(values: list[float]) -> list[float]:
    return list(struct.unpack(f"<{len(values)}f", struct.pack(f"<{len(values)}f", *values)))


# --------------------------------------------------------------------------- embeddings


def test_base64_embeddings_decode_to_the_float_answer(router: RouterProcess, client: openai.OpenAI) -> None:
    """The mock ignored encoding_format, so base64-asking clients (the Node SDK) decoded [0, 0]."""
    body = {"model": "mock-embedding", "input": ["hello", "world"], "dimensions": 16}
    floats = post(router, "/embeddings", {**body, "encoding_format": "float"})
    packed = post(router, "/embeddings", {**body, "encoding_format": "base64"})
    assert [d["index"] for d in packed["data"]] == [0, 1]
    for as_float, as_base64 in zip(floats["data"], packed["data"], strict=True):
        raw = base64.b64decode(as_base64["embedding"], validate=True)
        assert len(raw) == 4 * 16
        assert list(struct.unpack("<16f", raw)) == float32(as_float["embedding"])
    assert packed["usage"] == floats["usage"]
    # The Python SDK asks for base64 when the caller names no format, and decodes it itself.
    decoded = client.embeddings.create(model="mock-embedding", input=["hello", "world"], dimensions=16)
    assert [d.embedding for d in decoded.data] == [float32(d["embedding"]) for d in floats["data"]]

    openai_spec.validate("CreateEmbeddingResponse", floats)
    embedding = openai_spec.components()["schemas"]["Embedding"]
    as_string = {**embedding["properties"]["embedding"], "type": "string", "items": None}
    base64_embedding = {**embedding, "properties": {**embedding["properties"], "embedding": as_string}}
    openai_spec.validate("CreateEmbeddingResponse", packed, {"Embedding": base64_embedding})


# --------------------------------------------------------------------------- tools


class Unit(StrEnum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


class Place(BaseModel):
    city: str = Field(min_length=8, max_length=20)
    country_code: str = Field(min_length=2, max_length=2)
    coordinates: list[float] = Field(min_length=2, max_length=2)


class Forecast(BaseModel):
    place: Place
    unit: Unit
    days: int = Field(ge=1, le=14)
    hourly: bool
    kind: Literal["summary", "detailed"]
    alerts: list[Place] = Field(min_length=1)
    note: str | None
    starts: str = Field(json_schema_extra={"format": "date-time"})


WEATHER = Forecast.model_json_schema()
TOOLS: Any = [
    {"type": "function", "function": {"name": "get_forecast", "parameters": WEATHER}},
    {
        "type": "function",
        "function": {
            "name": "lookup_city",
            "parameters": {
                "type": "object",
                "properties": {"name": {"type": "string", "minLength": 3}, "limit": {"type": "integer"}},
                "required": ["name"],
                "additionalProperties": False,
            },
        },
    },
]


def assert_valid(schema: dict[str, Any], arguments: str) -> dict[str, Any]:
    doc = orjson.loads(arguments)
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(doc)
    return dict(doc)


def test_tools_get_a_tool_call_whose_arguments_validate(router: RouterProcess, client: openai.OpenAI) -> None:
    """The mock ignored tools: it answered text, so tool calling could not be tried on the default."""
    done = client.chat.completions.create(model="mock-gpt", messages=USER, tools=TOOLS)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1 and calls[0].type == "function"
    assert calls[0].function.name == "get_forecast" and calls[0].id.startswith("call_")
    Forecast.model_validate(assert_valid(WEATHER, calls[0].function.arguments))
    assert done.usage is not None and done.usage.completion_tokens > 0
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens

    again = client.chat.completions.create(model="mock-gpt", messages=USER, tools=TOOLS)
    assert again.choices[0].message.tool_calls == calls and again.usage == done.usage  # deterministic

    stream = client.chat.completions.create(
        model="mock-gpt", messages=USER, tools=TOOLS, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    heads = [t for d in deltas for t in d.tool_calls or [] if t.id]
    assert [(t.id, t.function and t.function.name) for t in heads] == [(calls[0].id, "get_forecast")]
    pieces = [t.function.arguments or "" for d in deltas for t in d.tool_calls or [] if t.function]
    assert len([p for p in pieces if p]) > 5  # argument deltas, not one blob
    assert "".join(pieces) == calls[0].function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage == done.usage

    raw = post(router, "/chat/completions", {"model": "mock-gpt", "messages": USER, "tools": TOOLS})
    openai_spec.validate("CreateChatCompletionResponse", raw)
    for chunk in sse_chunks(router, {"model": "mock-gpt", "messages": USER, "tools": TOOLS}):
        openai_spec.validate("CreateChatCompletionStreamResponse", chunk)


def test_tool_choice_is_honoured(router: RouterProcess, client: openai.OpenAI) -> None:
    forced = client.chat.completions.create(
        model="mock-gpt",
        messages=USER,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "lookup_city"}},
    )
    calls = forced.choices[0].message.tool_calls
    assert calls is not None and calls[0].function.name == "lookup_city"
    assert assert_valid(TOOLS[1]["function"]["parameters"], calls[0].function.arguments) == {"name": "mock"}

    none = client.chat.completions.create(model="mock-gpt", messages=USER, tools=TOOLS, tool_choice="none")
    assert none.choices[0].finish_reason == "stop" and none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="mock-gpt",
            messages=USER,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert caught.value.status_code == 400 and caught.value.param == "tool_choice"


def test_a_tool_result_gets_a_text_answer(router: RouterProcess, client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="mock-gpt", messages=USER, tools=TOOLS)
    call = first.choices[0].message.tool_calls
    assert call is not None
    history: Any = [
        *USER,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call[0].id, "content": "sunny, 21 degrees"},
    ]
    answer = client.chat.completions.create(model="mock-gpt", messages=history, tools=TOOLS)
    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    assert choice.message.content == TOOL_REPLY
    streamed = client.chat.completions.create(model="mock-gpt", messages=history, tools=TOOLS, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == choice.message.content
    assert answer.usage is not None and answer.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]


# --------------------------------------------------------------------------- structured output


def test_structured_output_parses(router: RouterProcess, client: openai.OpenAI) -> None:
    """The mock ignored response_format: `parse` with a pydantic model failed on its prose."""
    parsed = client.chat.completions.parse(model="mock-gpt", messages=USER, response_format=Forecast)
    forecast = parsed.choices[0].message.parsed
    assert isinstance(forecast, Forecast) and forecast.unit is Unit.CELSIUS
    assert_valid(WEATHER, parsed.choices[0].message.content or "")

    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": WEATHER, "strict": True}}
    body = {"model": "mock-gpt", "messages": USER, "response_format": fmt}
    raw = post(router, "/chat/completions", body)
    assert raw["choices"][0]["message"]["content"] == parsed.choices[0].message.content
    openai_spec.validate("CreateChatCompletionResponse", raw)
    chunks = sse_chunks(router, body)
    for chunk in chunks:
        openai_spec.validate("CreateChatCompletionStreamResponse", chunk)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == raw["choices"][0]["message"]["content"]

    json_mode = client.chat.completions.create(
        model="mock-gpt", messages=USER, response_format={"type": "json_object"}
    )
    doc = orjson.loads(json_mode.choices[0].message.content or "")
    assert isinstance(doc, dict) and "Paris" in doc["response"]


def test_plain_answers_match_the_openai_spec(router: RouterProcess) -> None:
    body = {"model": "mock-gpt", "messages": USER}
    openai_spec.validate("CreateChatCompletionResponse", post(router, "/chat/completions", body))
    for chunk in sse_chunks(router, {**body, "stream_options": {"include_usage": True}}):
        openai_spec.validate("CreateChatCompletionStreamResponse", chunk)
    completion = post(router, "/completions", {"model": "mock-gpt", "prompt": "Say hi"})
    openai_spec.validate("CreateCompletionResponse", completion)


# --------------------------------------------------------------------------- the schema generator

_LEAF = st.one_of(
    st.just({"type": "string"}),
    st.builds(
        lambda low, extra: {"type": "string", "minLength": low, "maxLength": low + extra},
        st.integers(0, 12),
        st.integers(0, 5),
    ),
    st.sampled_from(["date-time", "date", "email", "uuid", "ipv4", "uri"]).map(
        lambda fmt: {"type": "string", "format": fmt}
    ),
    st.builds(
        lambda kind, low, width, open_low: {
            "type": kind,
            ("exclusiveMinimum" if open_low else "minimum"): low,
            "maximum": low + width,
        },
        st.sampled_from(["integer", "number"]),
        st.integers(-50, 50),
        st.integers(2, 10),
        st.booleans(),
    ),
    st.builds(lambda step: {"type": "integer", "minimum": 1, "multipleOf": step}, st.integers(1, 7)),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.text(max_size=5) | st.integers(), min_size=1, max_size=3, unique=True).map(
        lambda values: {"enum": values}
    ),
    st.builds(lambda v: {"const": v}, st.text(max_size=5)),
)


def _compound(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    obj = st.dictionaries(st.text("abcdef", min_size=1, max_size=4), children, max_size=4).flatmap(
        lambda props: st.builds(
            lambda required, closed: {
                "type": "object",
                "properties": props,
                "required": required,
                **({"additionalProperties": False} if closed else {}),
            },
            st.lists(st.sampled_from(sorted(props)), unique=True) if props else st.just([]),
            st.booleans(),
        )
    )
    arr = st.builds(
        lambda items, low, unique: {
            "type": "array",
            "items": items,
            "minItems": low,
            # Distinct items exist for any length only when the items are free strings.
            "uniqueItems": unique and (low <= 1 or items == {"type": "string"}),
        },
        children,
        st.integers(0, 3),
        st.booleans(),
    )
    either = st.lists(children, min_size=1, max_size=3).map(lambda options: {"anyOf": options})
    nullable = children.map(
        lambda s: {**s, "type": [s["type"], "null"]} if isinstance(s.get("type"), str) else s
    )
    return st.one_of(obj, arr, either, nullable)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(schema=st.recursive(_LEAF, _compound, max_leaves=12))
def test_the_generated_instance_validates_against_its_schema(schema: dict[str, Any]) -> None:
    instance = instance_of(schema)
    assert instance == instance_of(schema)  # deterministic
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(instance)


def test_the_generator_follows_refs_and_ends_recursion() -> None:
    class Node(BaseModel):
        name: str
        children: list[Node]
        parent: Node | None

    schema = Node.model_json_schema()
    jsonschema.Draft202012Validator(schema).validate(instance_of(schema))
    tree = {"$defs": {"t": {"type": "object", "properties": {"t": {"$ref": "#/$defs/t"}}, "required": ["t"]}}}
    # A cycle no finite instance satisfies still ends, at the depth limit.
    assert isinstance(instance_of({**tree, "$ref": "#/$defs/t"}), dict)
