"""Gemini (AI Studio) and Vertex AI end to end: the real openai SDK, a real router, a protocol-enforcing fake.

Plus the stream translator fed Google's SSE split at every byte, a property test that
every valid chat request translates into a GenerateContentRequest the fake's validator
accepts, and the Vertex service-account token flow (JWT verified by the fake, cached).
"""

from __future__ import annotations

import array
import base64
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubellm.router._errors import (
    AuthenticationError,
    ContextLengthExceededError,
    InvalidRequestError,
    RateLimitError,
)
from kubellm.router.config._schema import DeploymentConfig
from kubellm.router.providers import Operation, RequestContext
from kubellm.router.providers._gemini import (
    GeminiStreamTranslator,
    gemini_finish_reason_to_openai,
    map_google_error,
)
from kubellm.router.providers._gemini_request import json_schema_to_gemini
from kubellm.router.providers.gemini import GeminiProvider
from tests.conftest import MASTER_KEY
from tests.fakes.gemini_upstream import (
    DEFAULT_TEXT,
    FakeGemini,
    Fault,
    Reply,
    validate_generate_content,
    validate_schema,
)
from tests.support.servers import RouterProcess
from tests.support.streams import cut_at, every_split

KEY = "AIza-test-gemini-key-0123456789"
WRONG_KEY = "AIza-wrong-secret-key-9876543210"
covers = pytest.mark.covers
BOTH = [pytest.param("gemini-chat", id="gemini"), pytest.param("vertex-chat", id="vertex")]
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGemini]:
    with FakeGemini(api_key=KEY) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(fake: FakeGemini) -> None:
    fake.reset()
    fake.token_lifetime = 3599


@pytest.fixture(scope="module")
def router(fake: FakeGemini, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    keys = tmp_path_factory.mktemp("sa")
    good, short, bad = keys / "sa.json", keys / "sa-short.json", keys / "sa-bad.json"
    good.write_text(json.dumps(fake.service_account()))
    short.write_text(json.dumps({**fake.service_account(), "private_key_id": "key-short"}))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad.write_text(json.dumps({**fake.service_account(other), "private_key_id": "key-bad"}))

    def studio(model: str, upstream: str = "gemini-2.5-flash", **extra: Any) -> dict[str, Any]:
        return {
            "name": model,
            "model": model,
            "provider": "gemini",
            "upstreamModel": upstream,
            "baseUrl": fake.studio_url,
            "apiKeyEnv": "TEST_GEMINI_KEY",
            **extra,
        }

    def vertex(model: str, sa: Path, upstream: str = "gemini-2.5-pro") -> dict[str, Any]:
        return {
            "name": model,
            "model": model,
            "provider": "vertex",
            "upstreamModel": upstream,
            "baseUrl": fake.vertex_url,
            "apiKeyFile": str(sa),
            "location": fake.location,
        }

    config = {
        "deployments": [
            studio("gemini-chat"),
            studio("gemini-drop", dropUnsupportedParams=True),
            studio("gemini-embed", "text-embedding-004"),
            studio("gemini-limited-1"),  # a 429 cools its deployment down: one per rate-limit case
            studio("gemini-limited-2"),
            {**studio("gemini-badkey"), "apiKeyEnv": None, "apiKey": WRONG_KEY},
            vertex("vertex-chat", good),
            vertex("vertex-embed", good, "text-embedding-005"),
            vertex("vertex-short", short),
            vertex("vertex-badsa", bad),
        ],
        "settings": {"numRetries": 0},
    }
    proc = RouterProcess(config, env={"TEST_GEMINI_KEY": KEY, "KUBELLM_MASTER_KEY": MASTER_KEY})
    proc.start()
    yield proc
    proc.stop()


def client(router: RouterProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.v1, api_key=MASTER_KEY, max_retries=0)


def chat(router: RouterProcess, model: str = "gemini-chat", **kwargs: Any) -> Any:
    kwargs.setdefault("messages", [{"role": "user", "content": "hi"}])
    return client(router).chat.completions.create(model=model, **kwargs)


def fc(name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"functionCall": {"name": name, "args": args}}


# ------------------------------------------------------------------ chat


@covers("gemini", "chat")
def test_chat_translates_history_parameters_and_usage(router: RouterProcess, fake: FakeGemini) -> None:
    fake.queue(
        Reply(
            usage={
                "promptTokenCount": 30,
                "candidatesTokenCount": 7,
                "thoughtsTokenCount": 5,
                "cachedContentTokenCount": 12,
                "totalTokenCount": 42,
            }
        )
    )
    reply = chat(
        router,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi! How can I help?"},
            {"role": "user", "content": [{"type": "text", "text": "Tell me a joke"}]},
        ],
        temperature=0.3,
        top_p=0.9,
        max_tokens=256,
        stop=["END"],
        seed=42,
        presence_penalty=0.5,
    )
    assert reply.choices[0].message.content == DEFAULT_TEXT
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (30, 12)
    assert (
        reply.usage.prompt_tokens_details is not None
        and reply.usage.prompt_tokens_details.cached_tokens == 12
    )
    seen = fake.seen[-1]
    assert seen.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert seen.headers["x-goog-api-key"] == KEY
    assert seen.body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert [c["role"] for c in seen.body["contents"]] == ["user", "model", "user"]
    assert seen.body["contents"][1]["parts"] == [{"text": "Hi! How can I help?"}]
    assert seen.body["generationConfig"] == {
        "temperature": 0.3,
        "topP": 0.9,
        "maxOutputTokens": 256,
        "stopSequences": ["END"],
        "seed": 42,
        "presencePenalty": 0.5,
    }


@covers("gemini", "chat")
def test_n_asks_for_several_candidates(router: RouterProcess, fake: FakeGemini) -> None:
    reply = chat(router, n=2)
    assert fake.seen[-1].body["generationConfig"]["candidateCount"] == 2
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[1].message.content == f"{DEFAULT_TEXT} (1)"


def test_consecutive_user_messages_are_merged_into_one_turn(router: RouterProcess, fake: FakeGemini) -> None:
    chat(
        router,
        messages=[
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "c"},
        ],
    )
    assert fake.seen[-1].body["contents"] == [
        {"role": "user", "parts": [{"text": "a"}, {"text": "b"}, {"text": "c"}]}
    ]


@pytest.mark.parametrize("include_usage", [True, False])
@covers("gemini", "stream", "stream_usage")
def test_stream(router: RouterProcess, fake: FakeGemini, include_usage: bool) -> None:
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(chat(router, stream=True, **extra))
    assert fake.seen[-1].path.endswith(":streamGenerateContent") and fake.seen[-1].query == "alt=sse"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == DEFAULT_TEXT
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    usage = [c.usage for c in chunks if c.usage is not None]
    if include_usage:
        assert len(usage) == 1 and chunks[-1].usage is not None
        assert (usage[0].prompt_tokens, usage[0].completion_tokens) == (11, 9)
    else:
        assert usage == []


# ----------------------------------------------------------------- tools


@pytest.mark.parametrize(
    "model",
    [
        pytest.param("gemini-chat", id="gemini", marks=covers("gemini", "tools")),
        pytest.param("vertex-chat", id="vertex", marks=covers("vertex", "tools")),
    ],
)
def test_parallel_tool_calls_and_results_round_trip(
    router: RouterProcess, fake: FakeGemini, model: str
) -> None:
    fake.queue(Reply(parts=[fc("get_weather", {"city": "Paris"}), fc("get_time", {"tz": "CET"})]))
    messages: list[Any] = [{"role": "user", "content": "Weather and time in Paris?"}]
    first = chat(router, model, messages=messages, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required")
    sent = fake.seen[-1].body
    assert sent["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    assert sent["tools"][0]["functionDeclarations"][0] == {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}, "required": ["city"]},
    }
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and message.content is None
    calls = message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"tz": "CET"}),
    ]
    assert len({c.id for c in calls}) == 2
    # The results come back in the other order; Gemini gets them in call order, by name.
    messages += [
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": calls[1].id, "content": "12:00"},
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temp_c": 21}'},
    ]
    second = chat(
        router,
        model,
        messages=messages,
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert second.choices[0].message.content == DEFAULT_TEXT
    body = fake.seen[-1].body
    assert body["toolConfig"]["functionCallingConfig"] == {
        "mode": "ANY",
        "allowedFunctionNames": ["get_time"],
    }
    assert body["contents"][1] == {
        "role": "model",
        "parts": [fc("get_weather", {"city": "Paris"}), fc("get_time", {"tz": "CET"})],
    }
    assert body["contents"][2] == {
        "role": "user",
        "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"temp_c": 21}}},
            {"functionResponse": {"name": "get_time", "response": {"output": "12:00"}}},
        ],
    }


@covers("gemini", "tools", "stream")
def test_streamed_tool_call_arguments_arrive_as_deltas(router: RouterProcess, fake: FakeGemini) -> None:
    fake.queue(
        Reply(
            parts=[
                {"text": "Let me check."},
                fc("get_weather", {"city": "Oslo"}),
                fc("get_time", {"tz": "CET"}),
            ]
        )
    )
    chunks = list(chat(router, stream=True, tools=[WEATHER_TOOL, TIME_TOOL]))
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(delta.index, {"id": "", "name": "", "args": ""})
            entry["id"] += delta.id or ""
            entry["name"] += (delta.function.name or "") if delta.function else ""
            entry["args"] += (delta.function.arguments or "") if delta.function else ""
    assert [(c["name"], json.loads(c["args"])) for c in calls.values()] == [
        ("get_weather", {"city": "Oslo"}),
        ("get_time", {"tz": "CET"}),
    ]
    assert all(c["id"] for c in calls.values())
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]


def test_thought_signature_survives_the_round_trip(router: RouterProcess, fake: FakeGemini) -> None:
    signature = base64.b64encode(b"opaque-thought-signature").decode()
    fake.queue(Reply(parts=[{**fc("get_weather", {"city": "Rome"}), "thoughtSignature": signature}]))
    first = chat(router, tools=[WEATHER_TOOL])
    message = first.choices[0].message
    call = (message.tool_calls or [])[0]
    chat(
        router,
        tools=[WEATHER_TOOL],
        messages=[
            {"role": "user", "content": "Weather in Rome?"},
            message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ],
    )
    assert fake.seen[-1].body["contents"][1]["parts"][0]["thoughtSignature"] == signature


# ---------------------------------------------------------- vision, json


@pytest.mark.parametrize(
    "model",
    [
        pytest.param("gemini-chat", id="gemini", marks=covers("gemini", "vision")),
        pytest.param("vertex-chat", id="vertex", marks=covers("vertex", "vision")),
    ],
)
def test_images_become_inline_data_or_file_data(router: RouterProcess, fake: FakeGemini, model: str) -> None:
    chat(
        router,
        model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://example.com/cat.jpg?size=large", "detail": "low"},
                    },
                ],
            }
        ],
    )
    assert fake.seen[-1].body["contents"][0]["parts"] == [
        {"text": "Compare"},
        {"inlineData": {"mimeType": "image/png", "data": PNG}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/cat.jpg?size=large"}},
    ]
    with pytest.raises(openai.BadRequestError) as info:
        chat(
            router,
            model,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "https://example.com/image"}}],
                }
            ],
        )
    assert "data URL" in info.value.message


@pytest.mark.parametrize(
    "model",
    [
        pytest.param("gemini-chat", id="gemini", marks=covers("gemini", "json_mode")),
        pytest.param("vertex-chat", id="vertex", marks=covers("vertex", "json_mode")),
    ],
)
def test_json_mode_and_json_schema(router: RouterProcess, fake: FakeGemini, model: str) -> None:
    fake.queue(
        Reply(parts=[{"text": '{"ok": true}'}]), Reply(parts=[{"text": '{"name": "Ada", "tags": []}'}])
    )
    reply = chat(router, model, response_format={"type": "json_object"})
    assert json.loads(reply.choices[0].message.content or "") == {"ok": True}
    assert fake.seen[-1].body["generationConfig"] == {"responseMimeType": "application/json"}
    schema = {  # what pydantic's model_json_schema() makes, with $defs, nullable and additionalProperties
        "$defs": {
            "Tag": {
                "type": "object",
                "properties": {"label": {"type": "string"}},
                "required": ["label"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "title": "Person",
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string"},
            "nickname": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "kind": {"type": "string", "enum": ["a", "b"]},
            "tags": {"type": "array", "items": {"$ref": "#/$defs/Tag"}},
        },
        "required": ["name", "nickname", "kind", "tags"],
    }
    reply = chat(
        router,
        model,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "strict": True, "schema": schema},
        },
    )
    assert json.loads(reply.choices[0].message.content or "")["name"] == "Ada"
    config = fake.seen[-1].body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseSchema"] == {
        "type": "OBJECT",
        "title": "Person",
        "required": ["name", "nickname", "kind", "tags"],
        "properties": {
            "name": {"type": "STRING"},
            "nickname": {"type": "STRING", "nullable": True},
            "kind": {"type": "STRING", "enum": ["a", "b"], "format": "enum"},
            "tags": {
                "type": "ARRAY",
                "items": {
                    "type": "OBJECT",
                    "required": ["label"],
                    "properties": {"label": {"type": "STRING"}},
                },
            },
        },
    }


# ------------------------------------------------------------ embeddings


@covers("gemini", "embeddings")
def test_ai_studio_batch_embeddings(router: RouterProcess, fake: FakeGemini) -> None:
    emb = client(router).embeddings.create(
        model="gemini-embed", input=["hello world", "second text"], dimensions=4, encoding_format="float"
    )
    assert [d.index for d in emb.data] == [0, 1] and all(len(d.embedding) == 4 for d in emb.data)
    assert emb.usage.prompt_tokens > 0
    assert fake.seen[-1].path == "/v1beta/models/text-embedding-004:batchEmbedContents"
    assert fake.seen[-1].body == {
        "requests": [
            {
                "model": "models/text-embedding-004",
                "content": {"parts": [{"text": "hello world"}]},
                "outputDimensionality": 4,
            },
            {
                "model": "models/text-embedding-004",
                "content": {"parts": [{"text": "second text"}]},
                "outputDimensionality": 4,
            },
        ]
    }
    # encoding_format=base64 (what the SDK asks for by default) gets little-endian float32s.
    req = urllib.request.Request(
        router.v1 + "/embeddings",
        data=orjson.dumps({"model": "gemini-embed", "input": "hello world", "encoding_format": "base64"}),
        headers={"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as resp:
        packed = json.loads(resp.read())["data"][0]["embedding"]
    floats = array.array("f", base64.b64decode(packed)).tolist()
    assert len(floats) == 8 and floats[:4] == pytest.approx(emb.data[0].embedding, abs=1e-6)


@covers("vertex", "embeddings")
def test_vertex_predict_embeddings(router: RouterProcess, fake: FakeGemini) -> None:
    emb = client(router).embeddings.create(
        model="vertex-embed", input=["one two three", "four"], dimensions=3
    )
    assert [len(d.embedding) for d in emb.data] == [3, 3]
    assert emb.usage.prompt_tokens == 4  # the statistics.token_count Vertex reports
    seen = fake.seen[-1]
    assert seen.path == (
        "/v1/projects/test-project/locations/us-central1/publishers/google/models/text-embedding-005:predict"
    )
    assert seen.body == {
        "instances": [{"content": "one two three"}, {"content": "four"}],
        "parameters": {"outputDimensionality": 3},
    }


# ---------------------------------------------------------------- vertex


@pytest.mark.parametrize("include_usage", [True, False])
@covers("vertex", "chat", "stream", "stream_usage")
def test_vertex_chat_and_stream_with_a_cached_token(
    router: RouterProcess, fake: FakeGemini, include_usage: bool
) -> None:
    before = fake.token_requests
    reply = chat(
        router,
        "vertex-chat",
        messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}],
    )
    assert reply.choices[0].message.content == DEFAULT_TEXT
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(chat(router, "vertex-chat", stream=True, **extra))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == DEFAULT_TEXT
    assert ([c.usage.completion_tokens for c in chunks if c.usage] == [9]) is include_usage
    assert fake.token_requests - before <= 1  # one token for every call while it is fresh
    seen = fake.seen[-1]
    assert seen.path == (
        "/v1/projects/test-project/locations/us-central1/publishers/google/models/"
        "gemini-2.5-pro:streamGenerateContent"
    )
    assert seen.headers["Authorization"].startswith("Bearer ya29.fake-")
    assert fake.seen[0].body["systemInstruction"] == {"parts": [{"text": "sys"}]}


def test_vertex_token_is_refreshed_before_it_expires(router: RouterProcess, fake: FakeGemini) -> None:
    fake.token_lifetime = 120  # inside the refresh margin: every call must fetch a fresh token
    before = fake.token_requests
    for _ in range(3):
        chat(router, "vertex-short")
    assert fake.token_requests - before == 3
    assert len({s.headers["Authorization"] for s in fake.seen}) == 3


def test_vertex_refused_service_account_is_401_without_secrets(
    router: RouterProcess, fake: FakeGemini
) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        chat(router, "vertex-badsa")
    body = json.dumps(info.value.body)
    assert "invalid_grant" in body and "PRIVATE KEY" not in body and "assertion" not in body
    assert "PRIVATE KEY" not in router.logs()
    assert fake.seen == []


# ---------------------------------------------------------------- errors


def test_context_length_is_mapped(router: RouterProcess, fake: FakeGemini) -> None:
    fake.queue(
        Fault(
            400,
            {
                "error": {
                    "code": 400,
                    "status": "INVALID_ARGUMENT",
                    "message": "The input token count (1200000) exceeds the maximum number of tokens "
                    "allowed (1048576).",
                }
            },
        )
    )
    with pytest.raises(openai.BadRequestError) as info:
        chat(router)
    assert info.value.code == "context_length_exceeded"


@pytest.mark.parametrize("stream", [False, True])
def test_blocked_prompt_and_blocked_answer_are_content_filter(
    router: RouterProcess, fake: FakeGemini, stream: bool
) -> None:
    fake.queue(Reply(block_reason="PROHIBITED_CONTENT"), Reply(parts=[], finish_reason="SAFETY"))
    for _ in range(2):
        with pytest.raises(openai.BadRequestError) as info:
            result = chat(router, stream=stream)
            if stream:
                list(result)
        assert info.value.code == "content_filter"


def test_partial_answer_stopped_for_safety_keeps_content(router: RouterProcess, fake: FakeGemini) -> None:
    fake.queue(Reply(parts=[{"text": "Partial"}], finish_reason="RECITATION"))
    reply = chat(router)
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == ("Partial", "content_filter")


def test_rate_limit_keeps_retry_after(router: RouterProcess, fake: FakeGemini) -> None:
    quota = {
        "error": {
            "code": 429,
            "status": "RESOURCE_EXHAUSTED",
            "message": "You exceeded your current quota.",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "16.2s"}],
        }
    }
    fake.queue(Fault(429, quota), Fault(429, quota, {"Retry-After": "7"}))
    for model, expected in (("gemini-limited-1", "17"), ("gemini-limited-2", "7")):
        with pytest.raises(openai.RateLimitError) as info:
            chat(router, model)
        assert info.value.response.headers["retry-after"] == expected


def test_bad_api_key_is_401_and_never_echoed(router: RouterProcess, fake: FakeGemini) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        chat(router, "gemini-badkey")
    assert WRONG_KEY not in json.dumps(info.value.body)
    assert WRONG_KEY not in router.logs()


def test_unsupported_parameter_is_rejected_unless_dropped(router: RouterProcess, fake: FakeGemini) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(router, logit_bias={"50256": -100})
    assert "logit_bias" in info.value.message and "gemini" in info.value.message
    assert fake.seen == []
    assert chat(router, "gemini-drop", logit_bias={"50256": -100}).choices[0].message.content == DEFAULT_TEXT


# ------------------------------------------------------- unit-level checks


def test_google_error_mapping() -> None:
    def err(status: int, code: str, message: str, **extra: Any) -> bytes:
        return orjson.dumps([{"error": {"code": status, "status": code, "message": message, **extra}}])

    assert isinstance(
        map_google_error(403, {}, err(403, "PERMISSION_DENIED", "no"), "vertex"), AuthenticationError
    )
    assert isinstance(
        map_google_error(401, {}, err(401, "UNAUTHENTICATED", "no"), "vertex"), AuthenticationError
    )
    limited = map_google_error(429, {}, err(429, "RESOURCE_EXHAUSTED", "slow down"), "gemini")
    assert isinstance(limited, RateLimitError) and "Retry-After" not in limited.headers
    assert isinstance(
        map_google_error(
            400,
            {},
            err(
                400,
                "INVALID_ARGUMENT",
                "The input token count (5) exceeds the maximum number of tokens allowed (4).",
            ),
            "gemini",
        ),
        ContextLengthExceededError,
    )
    assert map_google_error(503, {}, b"<html>oops</html>", "gemini").retryable


def test_finish_reasons() -> None:
    assert [
        gemini_finish_reason_to_openai(r)
        for r in (
            "STOP",
            "MAX_TOKENS",
            "SAFETY",
            "RECITATION",
            "BLOCKLIST",
            "PROHIBITED_CONTENT",
            "SPII",
            "OTHER",
            None,
        )
    ] == [
        "stop",
        "length",
        "content_filter",
        "content_filter",
        "content_filter",
        "content_filter",
        "content_filter",
        "stop",
        None,
    ]
    assert gemini_finish_reason_to_openai("STOP", has_tool_calls=True) == "tool_calls"


def test_json_schema_conversion_edge_cases() -> None:
    converted = json_schema_to_gemini(
        {
            "type": "object",
            "properties": {
                "n": {"type": ["integer", "null"], "format": "int64"},
                "u": {"type": "string", "format": "uuid"},
                "c": {"const": "x"},
                "v": {"type": ["string", "number"]},
            },
        },
        "p",
    )
    assert converted["properties"] == {
        "n": {"type": "INTEGER", "nullable": True, "format": "int64"},
        "u": {"type": "STRING"},
        "c": {"type": "STRING", "enum": ["x"], "format": "enum"},
        "v": {"anyOf": [{"type": "STRING"}, {"type": "NUMBER"}]},
    }
    with pytest.raises(InvalidRequestError):
        json_schema_to_gemini({"$ref": "#/$defs/Missing"}, "p")
    with pytest.raises(InvalidRequestError):
        json_schema_to_gemini({"$defs": {"A": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"}, "p")


# ----------------------------------------------- stream decoder splitting


def _ctx(stream: bool = True, include_usage: bool = True, **dep: Any) -> RequestContext:
    deployment = DeploymentConfig(
        name="d", model="m", provider="gemini", upstreamModel="gemini-2.5-flash", **dep
    )
    return RequestContext(
        "0123456789abcdef0123456789abcdef",
        Operation.CHAT,
        "m",
        deployment,
        stream,
        include_usage,
        created=1,
        api_key=KEY,
    )


def _sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\r\n\r\n" for e in events)


STREAM = _sse(
    {
        "candidates": [{"content": {"role": "model", "parts": [{"text": "Héllo "}]}, "index": 0}],
        "usageMetadata": {"promptTokenCount": 5},
        "responseId": "r1",
    },
    {
        "candidates": [
            {"content": {"role": "model", "parts": [{"text": "wörld"}, fc("f", {"a": [1, 2]})]}, "index": 0}
        ]
    },
    {
        "candidates": [
            {"content": {"role": "model", "parts": [fc("g", {})]}, "finishReason": "STOP", "index": 0}
        ],
        "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 4, "cachedContentTokenCount": 2},
    },
)


def _run(pieces: list[bytes]) -> list[Any]:
    translator = GeminiStreamTranslator(_ctx(), "gemini")
    out: list[Any] = []
    for piece in pieces:
        out += translator.feed(piece)
    out += translator.finish()
    assert translator.error is None and translator.usage is not None
    return [orjson.loads(p) if isinstance(p, bytes) else p for p in out]


def test_stream_translator_output_is_independent_of_byte_splits() -> None:
    whole = _run([STREAM])
    assert (
        "".join(c["choices"][0]["delta"].get("content") or "" for c in whole if c["choices"]) == "Héllo wörld"
    )
    assert whole[-1]["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 4,
        "total_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    assert whole[-2]["choices"][0]["finish_reason"] == "tool_calls"
    for parts in every_split(STREAM):
        assert _run(parts) == whole, [len(p) for p in parts[:2]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=8))
def test_stream_translator_with_random_splits(cuts: list[int]) -> None:
    assert _run(cut_at(STREAM, cuts)) == _run([STREAM])


def test_error_event_inside_the_stream_is_mapped() -> None:
    translator = GeminiStreamTranslator(_ctx(), "gemini")
    with pytest.raises(RateLimitError):
        translator.feed(_sse({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "quota"}}))


def test_stream_without_finish_reason_is_an_error() -> None:
    translator = GeminiStreamTranslator(_ctx(), "gemini")
    translator.feed(STREAM.split(b"\r\n\r\n")[0] + b"\r\n\r\n")
    translator.finish()
    assert translator.error is not None


# ---------------------------------------------------------- property test

NAMES = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_-]{0,20}", fullmatch=True)
TEXT = st.text(min_size=1, max_size=30)


def _schemas() -> st.SearchStrategy[dict[str, Any]]:
    leaf = st.sampled_from(
        [
            {"type": "string"},
            {"type": "integer"},
            {"type": "number", "minimum": 0},
            {"type": "boolean"},
            {"type": "string", "enum": ["x", "y"]},
            {"type": ["string", "null"]},
            {"type": "string", "format": "date-time"},
            {"type": "string", "format": "uuid"},
            {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            {"type": "string", "description": "d", "default": "x"},
        ]
    )

    def extend(inner: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
        arrays = inner.map(lambda s: {"type": "array", "items": s, "maxItems": 3})
        objects = st.dictionaries(NAMES, inner, min_size=1, max_size=3).flatmap(
            lambda props: st.sets(st.sampled_from(sorted(props))).map(
                lambda req: {
                    "type": "object",
                    "properties": props,
                    "required": sorted(req),
                    "additionalProperties": False,
                }
            )
        )
        return arrays | objects

    return st.recursive(leaf, extend, max_leaves=6)


def _object_schema() -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(NAMES, _schemas(), max_size=4).map(lambda p: {"type": "object", "properties": p})


@st.composite
def chat_requests(draw: st.DrawFn) -> dict[str, Any]:
    tool_names = draw(st.lists(NAMES, max_size=3, unique=True))
    tools = [
        {
            "type": "function",
            "function": {
                "name": n,
                "description": draw(st.text(max_size=20)),
                "parameters": draw(_object_schema()),
            },
        }
        for n in tool_names
    ]
    messages: list[dict[str, Any]] = []
    if draw(st.booleans()):
        messages.append(
            {"role": draw(st.sampled_from(["system", "developer"])), "content": draw(st.text(max_size=20))}
        )
    user_part = st.one_of(
        TEXT.map(lambda t: {"type": "text", "text": t}),
        st.just({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}),
        st.sampled_from(["https://e.com/a.png", "https://e.com/b.jpeg"]).map(
            lambda u: {"type": "image_url", "image_url": {"url": u}}
        ),
    )
    messages.append(
        {"role": "user", "content": draw(st.one_of(TEXT, st.lists(user_part, min_size=1, max_size=3)))}
    )
    calls = 0
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["user", "assistant", "tools"]))
        if kind == "user":
            messages.append({"role": "user", "content": draw(TEXT)})
        elif kind == "assistant":
            messages.append(
                {"role": "assistant", "content": draw(st.one_of(st.none(), st.text(max_size=20)))}
            )
        else:
            names = draw(st.lists(NAMES, min_size=1, max_size=3))
            ids = [f"call_{calls + i}" for i in range(len(names))]
            calls += len(names)
            args = [
                draw(st.dictionaries(NAMES, st.integers() | st.text(max_size=5), max_size=2)) for _ in names
            ]
            messages.append(
                {
                    "role": "assistant",
                    "content": draw(st.one_of(st.none(), st.text(max_size=10))),
                    "tool_calls": [
                        {"id": i, "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
                        for i, n, a in zip(ids, names, args, strict=True)
                    ],
                }
            )
            for i in draw(st.permutations(ids)):
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": i,
                        "content": draw(
                            st.one_of(st.text(max_size=10), st.just('{"ok": 1}'), st.just("[1, 2]"))
                        ),
                    }
                )
            if draw(st.booleans()):
                messages.append({"role": "user", "content": draw(TEXT)})
    body: dict[str, Any] = {"model": "m", "messages": messages}
    optional = {
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "max_tokens": st.integers(1, 8192),
        "max_completion_tokens": st.integers(1, 8192),
        "seed": st.integers(-(2**31), 2**31),
        "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=4)),
        "n": st.integers(1, 4),
        "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
        "response_format": st.one_of(
            st.just({"type": "text"}),
            st.just({"type": "json_object"}),
            _schemas()
            .filter(lambda s: s.get("type") == "object")
            .map(lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}),
        ),
        "user": st.text(max_size=10),
        "reasoning_effort": st.sampled_from(["low", "medium", "high"]),
        "parallel_tool_calls": st.just(True),
        "logprobs": st.just(False),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            body[key] = draw(strategy)
    if tools:
        body["tools"] = tools
        body["tool_choice"] = draw(
            st.sampled_from(
                ["auto", "none", "required", None, {"type": "function", "function": {"name": tool_names[0]}}]
            )
        )
    return body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chat_requests())
def test_every_valid_chat_request_translates_into_one_google_accepts(body: dict[str, Any]) -> None:
    request = GeminiProvider().build_request(body, _ctx(stream=False))
    payload = orjson.loads(request.body or b"")
    assert validate_generate_content(payload) is None, payload
    tool_messages = [m for m in body["messages"] if m["role"] == "tool"]
    responses = [p for c in payload["contents"] for p in c["parts"] if "functionResponse" in p]
    assert len(responses) == len(tool_messages)
    assert request.headers["x-goog-api-key"] == KEY


@settings(max_examples=100, deadline=None)
@given(_schemas())
def test_every_json_schema_converts_into_google_schema(schema: dict[str, Any]) -> None:
    validate_schema(json_schema_to_gemini(schema, "s"), "s")
