"""The `azure` provider end to end: the real openai SDK -> router -> a protocol-enforcing fake Azure OpenAI.

Also home of :func:`openai_chat_requests`, the Hypothesis strategy of valid OpenAI chat requests
that the other provider property tests reuse.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import openai
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubellm.router._errors import ContentFilterError, RateLimitError
from kubellm.router.config._schema import DeploymentConfig
from kubellm.router.inbound._openai_validate import validate
from kubellm.router.providers import Operation, RequestContext
from kubellm.router.providers.azure import AzureOpenAIProvider
from tests.fakes.azure_upstream import (
    BLOCKED_OUTPUT,
    BLOCKED_PROMPT,
    FakeAzure,
    Fault,
    Reply,
    WireError,
    embedding_vector,
    stream_bytes,
    validate_api_version,
    validate_chat,
    validate_headers,
)
from tests.support.openai_requests import PNG, TIME, WEATHER
from tests.support.servers import RouterProcess

KEY = "azure-key-0123456789abcdef"
ENTRA = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.fake.token"
BAD_KEY = "azure-wrong-secret-4242"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeAzure]:
    with FakeAzure(api_key=KEY, entra_token=ENTRA) as server:
        yield server


@pytest.fixture(scope="module")
def router(fake: FakeAzure) -> Iterator[RouterProcess]:
    def dep(model: str, **extra: Any) -> dict[str, Any]:
        return {
            "model": model,
            "provider": "azure",
            "upstreamModel": "gpt4o-prod",
            "baseUrl": fake.base_url,
            "apiVersion": "2024-10-21",
            "apiKeyEnv": "AZ_KEY",
            **extra,
        }

    config = {
        "deployments": [
            dep("gpt"),
            dep("gpt-entra", apiKeyEnv="AZ_ENTRA"),
            dep("gpt-old", apiVersion="2024-06-01"),
            dep("gpt-old-drop", apiVersion="2024-06-01", dropUnsupportedParams=True),
            dep("gpt-badkey", apiKeyEnv="AZ_BAD"),
            dep("embed", upstreamModel="embed-prod"),
            dep("gpt-429a"),
            dep("gpt-429b"),
            dep("gpt-failover", name="gone", upstreamModel="deleted-deployment"),
            dep("gpt-failover", name="live", priority=1),
        ],
        "settings": {"numRetries": 1},
    }
    env = {"AZ_KEY": KEY, "AZ_ENTRA": f"entra:{ENTRA}", "AZ_BAD": BAD_KEY}
    with RouterProcess(config, env=env) as proc:
        yield proc


@pytest.fixture
def client(router: RouterProcess, fake: FakeAzure) -> openai.OpenAI:
    fake.faults.clear()
    fake.replies.clear()
    return openai.OpenAI(base_url=router.v1, api_key="unused", max_retries=0)


def _ctx(
    version: str | None = "2024-10-21",
    stream: bool = False,
    include_usage: bool = False,
    key: str = KEY,
    drop: bool = False,
    operation: Operation = Operation.CHAT,
) -> RequestContext:
    dep = DeploymentConfig(
        model="gpt",
        provider="azure",
        upstream_model="gpt4o-prod",
        api_version=version,
        base_url="https://res.openai.azure.com",
        drop_unsupported_params=drop,
    )
    return RequestContext("req1", operation, "gpt", dep, stream, include_usage, api_key=key)


def _user(text: str = "hi") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# --- requests -------------------------------------------------------------------------------------


@pytest.mark.covers("azure", "chat")
def test_chat_reaches_the_deployment_url_with_the_api_key(client: openai.OpenAI, fake: FakeAzure) -> None:
    reply = client.chat.completions.create(
        model="gpt",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        seed=7,
        user="u-1",
    )
    assert reply.choices[0].message.content == "azure gpt4o-prod says hi"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == 2
    seen = fake.last
    assert seen.path == "/openai/deployments/gpt4o-prod/chat/completions"
    assert seen.query == {"api-version": "2024-10-21"}
    assert seen.headers["api-key"] == KEY and "Authorization" not in seen.headers
    assert (seen.body["seed"], seen.body["user"]) == (7, "u-1")


@pytest.mark.covers("azure", "chat")
def test_entra_credential_is_sent_as_a_bearer_token(client: openai.OpenAI, fake: FakeAzure) -> None:
    client.chat.completions.create(model="gpt-entra", messages=_user())
    assert fake.last.headers["Authorization"] == f"Bearer {ENTRA}"
    assert "api-key" not in fake.last.headers


def test_missing_api_version_fails_at_config_load() -> None:
    from kubellm.router import parse_config
    from kubellm.router.config._schema import ConfigError
    from kubellm.router.core._state import build_state

    config = parse_config(
        {"deployments": [{"model": "m", "provider": "azure", "baseUrl": "http://127.0.0.1:9"}]}
    )
    with pytest.raises(ConfigError) as info:
        build_state(config)
    assert info.value.message == "deployments[0].apiVersion: required by provider 'azure'"


def test_completions_use_the_legacy_path(client: openai.OpenAI, fake: FakeAzure) -> None:
    assert client.completions.create(model="gpt", prompt="say hi").choices[0].text == "azure text"
    assert fake.last.path == "/openai/deployments/gpt4o-prod/completions"


# --- streams --------------------------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.covers("azure", "stream", "stream_usage")
def test_stream(client: openai.OpenAI, fake: FakeAzure, include_usage: bool) -> None:
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(client.chat.completions.create(model="gpt", messages=_user(), stream=True, **extra))
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "azure gpt4o-prod says hi"
    )
    # Azure's prompt_filter_results preamble (empty id, no choices) never reaches the client.
    assert all(c.id == "chatcmpl-AZfake" for c in chunks)
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == (1 if include_usage else 0)
    if include_usage:
        assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens_details is not None
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 2
    assert fake.last.body["stream_options"] == {"include_usage": True}  # always asked, for metering


@pytest.mark.covers("azure", "stream")
def test_old_api_version_gets_no_stream_options(client: openai.OpenAI, fake: FakeAzure) -> None:
    chunks = list(client.chat.completions.create(model="gpt-old", messages=_user(), stream=True))
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "azure gpt4o-prod says hi"
    )
    assert "stream_options" not in fake.last.body
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="gpt-old", messages=_user(), stream=True, stream_options={"include_usage": True}
        )
    assert info.value.body["param"] == "stream_options"  # type: ignore[index]
    chunks = list(
        client.chat.completions.create(
            model="gpt-old-drop", messages=_user(), stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks and "stream_options" not in fake.last.body


@pytest.mark.covers("azure", "stream", "tools")
def test_stream_translator_is_independent_of_byte_boundaries() -> None:
    body = {"messages": _user(), "stream": True, "stream_options": {"include_usage": True}}
    calls = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
        },
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"zone":"UTC"}'}},
    ]
    raw = stream_bytes(body, Reply("Let me check", calls, "tool_calls")).replace(b"\n\n", b"\r\n\r\n", 4)
    provider = AzureOpenAIProvider()

    def run(pieces: list[bytes]) -> list[Any]:
        translator = provider.stream_translator(_ctx(stream=True, include_usage=True))
        out = [p for piece in pieces for p in translator.feed(piece)] + translator.finish()
        assert translator.error is None and translator.usage is not None
        assert translator.usage.cached_tokens == 2
        return [orjson.loads(p) if isinstance(p, bytes) else p for p in out]

    whole = run([raw])
    assert all(c["id"] == "chatcmpl-AZfake" for c in whole)
    args = "".join(
        tc["function"].get("arguments", "")
        for c in whole
        if c["choices"]
        for tc in c["choices"][0]["delta"].get("tool_calls", [])
        if tc["index"] == 1
    )
    assert args == '{"zone":"UTC"}'
    assert run([raw[i : i + 1] for i in range(len(raw))]) == whole
    for cut in range(1, len(raw), 3):
        assert run([raw[:cut], raw[cut:]]) == whole


# --- tools, vision, JSON --------------------------------------------------------------------------


@pytest.mark.covers("azure", "tools")
def test_parallel_tool_calls_and_tool_results(client: openai.OpenAI, fake: FakeAzure) -> None:
    messages: list[Any] = _user("weather and time in Oslo?")
    first = client.chat.completions.create(model="gpt", messages=messages, tools=[WEATHER, TIME])  # type: ignore[list-item]
    calls = first.choices[0].message.tool_calls or []
    assert first.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]  # type: ignore[union-attr]
    assert json.loads(calls[0].function.arguments) == {"city": "fake"}  # type: ignore[union-attr]
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages += [
        {"role": "tool", "tool_call_id": c.id, "content": f"result {i}"} for i, c in enumerate(calls)
    ]
    second = client.chat.completions.create(model="gpt", messages=messages, tools=[WEATHER, TIME])  # type: ignore[list-item]
    assert second.choices[0].message.content == "the tool said result 1"
    assert [m["role"] for m in fake.last.body["messages"]] == ["user", "assistant", "tool", "tool"]


@pytest.mark.covers("azure", "tools", "stream")
def test_streamed_tool_call_arguments_arrive_as_deltas(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gpt", messages=_user("weather?"), stream=True, tools=[WEATHER, TIME]
        )
    )  # type: ignore[list-item]
    pieces: dict[int, list[str]] = {}
    for chunk in chunks:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            pieces.setdefault(call.index, []).append(call.function.arguments or "")  # type: ignore[union-attr]
    assert len(pieces[0]) > 2  # several argument deltas, not one blob
    assert json.loads("".join(pieces[0])) == {"city": "fake"}
    assert json.loads("".join(pieces[1])) == {"zone": "fake"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.covers("azure", "vision")
def test_image_parts_pass_through(client: openai.OpenAI, fake: FakeAzure) -> None:
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"}},
    ]
    client.chat.completions.create(model="gpt", messages=[{"role": "user", "content": content}])  # type: ignore[misc]
    assert fake.last.body["messages"][0]["content"] == content


@pytest.mark.covers("azure", "json_mode")
def test_json_mode_and_json_schema(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="gpt", messages=_user("answer in JSON"), response_format={"type": "json_object"}
    )
    assert json.loads(reply.choices[0].message.content or "") == {"answer": "azure"}
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    reply = client.chat.completions.create(
        model="gpt",
        messages=_user("a city"),
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    )
    assert json.loads(reply.choices[0].message.content or "") == {"city": "fake"}


@pytest.mark.covers("azure", "embeddings")
def test_embeddings_in_both_encodings(client: openai.OpenAI, fake: FakeAzure) -> None:
    result = client.embeddings.create(model="embed", input=["hello", "world"])  # the SDK asks for base64
    assert [d.embedding for d in result.data] == [
        pytest.approx(embedding_vector(t)) for t in ("hello", "world")
    ]
    assert fake.last.path == "/openai/deployments/embed-prod/embeddings"
    assert fake.last.body["encoding_format"] == "base64"
    floats = client.embeddings.create(model="embed", input="hello", encoding_format="float", dimensions=3)
    assert floats.data[0].embedding == embedding_vector("hello", 3)
    assert result.usage.prompt_tokens == 2


# --- errors ---------------------------------------------------------------------------------------


def test_blocked_prompt_is_a_content_filter_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt", messages=_user(f"tell me {BLOCKED_PROMPT}"))
    assert info.value.code == "content_filter"
    assert "violence: medium" in info.value.message


def test_filtered_completion_is_a_content_filter_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt", messages=_user(BLOCKED_OUTPUT))
    assert info.value.code == "content_filter" and "violence: high" in info.value.message


def test_filtered_stream_ends_with_a_content_filter_error_event(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="gpt", messages=_user(BLOCKED_OUTPUT), stream=True)
    texts = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            texts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    assert "".join(texts) == "It was a dark"
    assert info.value.code == "content_filter"


def test_context_length_exceeded(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt", messages=_user("x " * 3000))
    assert info.value.code == "context_length_exceeded"


def test_rate_limit_keeps_retry_after(client: openai.OpenAI, fake: FakeAzure) -> None:
    body = {
        "error": {
            "code": "429",
            "message": "Requests to the ChatCompletions_Create Operation under Azure "
            "OpenAI API version 2024-10-21 have exceeded token rate limit. Please retry after 6 seconds.",
        }
    }
    fake.queue(Fault(429, body, {"retry-after-ms": "5200"}), Fault(429, body, {"Retry-After": "6"}))
    for model in ("gpt-429a", "gpt-429b"):  # 429 cools the deployment down: one each
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model=model, messages=_user())
        assert info.value.response.headers["retry-after"] == "6"


def test_bad_key_is_never_echoed(client: openai.OpenAI, router: RouterProcess) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model="gpt-badkey", messages=_user())
    assert BAD_KEY not in str(info.value.body) and BAD_KEY not in router.logs()


def test_missing_deployment_fails_over(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-failover", messages=_user())
    assert raw.headers["x-kubellm-deployment"] == "live" and raw.headers["x-kubellm-attempts"] == "2"


def test_error_mapping_without_http() -> None:
    provider = AzureOpenAIProvider()
    err = provider.map_error(
        400,
        {},
        orjson.dumps(
            {
                "error": {
                    "code": "content_filter",
                    "message": "filtered",
                    "innererror": {
                        "code": "ResponsibleAIPolicyViolation",
                        "content_filter_result": {"hate": {"filtered": True, "severity": "high"}},
                    },
                }
            }
        ),
    )
    assert isinstance(err, ContentFilterError) and "hate: high" in err.message
    limited = provider.map_error(
        429, {"retry-after-ms": "1500"}, b'{"error":{"code":"429","message":"slow"}}'
    )
    assert isinstance(limited, RateLimitError) and limited.headers == {"Retry-After": "2"}


# --- property: any valid OpenAI chat request is a valid Azure request -----------------------------

_ident = st.from_regex(r"[a-zA-Z0-9_-]{1,12}", fullmatch=True)
_text = st.text(min_size=1, max_size=12)
_text_part = _text.map(lambda t: {"type": "text", "text": t})
_image_part = st.sampled_from([f"data:image/png;base64,{PNG}", "https://example.com/a.jpg"]).map(
    lambda u: {"type": "image_url", "image_url": {"url": u}}
)
_args = st.dictionaries(_ident, st.one_of(st.integers(-5, 5), _text, st.booleans()), max_size=3)


@st.composite
def _turn(draw: st.DrawFn, names: list[str], images: bool) -> list[dict[str, Any]]:
    kind = draw(st.sampled_from(["user", "assistant", "system", "tools"]))
    parts = st.one_of(_text_part, _image_part) if images else _text_part
    if kind == "user":
        return [{"role": "user", "content": draw(st.one_of(_text, st.lists(parts, min_size=1, max_size=3)))}]
    if kind == "assistant":
        return [
            {
                "role": "assistant",
                "content": draw(st.one_of(_text, st.lists(_text_part, min_size=1, max_size=2))),
            }
        ]
    if kind == "system":
        return [{"role": draw(st.sampled_from(["system", "developer"])), "content": draw(_text)}]
    ids = draw(st.lists(_ident, min_size=1, max_size=3, unique=True))
    calls = [
        {
            "id": f"call_{i}",
            "type": "function",
            "function": {
                "name": draw(st.sampled_from(names)),
                "arguments": orjson.dumps(draw(_args)).decode(),
            },
        }
        for i in ids
    ]
    assistant = {"role": "assistant", "content": draw(st.one_of(st.none(), _text)), "tool_calls": calls}
    return [assistant, *({"role": "tool", "tool_call_id": c["id"], "content": draw(_text)} for c in calls)]


@st.composite
def openai_chat_requests(
    draw: st.DrawFn, *, images: bool = True, user: bool = True, json_word: bool = True
) -> dict[str, Any]:
    """A valid OpenAI chat request: history with tool exchanges, tools, and sampling parameters."""
    names = draw(st.lists(_ident, min_size=1, max_size=3, unique=True))
    turns = draw(st.lists(_turn(names, images), min_size=1, max_size=6))
    messages = [m for turn in turns for m in turn]
    if messages[-1]["role"] not in ("user", "tool"):
        messages.append({"role": "user", "content": "and now, in JSON?" if json_word else "and now?"})
    body: dict[str, Any] = {"model": "gpt", "messages": messages}
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
    optional: dict[str, Any] = {
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "max_tokens": st.integers(1, 4096),
        "max_completion_tokens": st.integers(1, 4096),
        "seed": st.integers(0, 99),
        "n": st.just(1),
        "stop": st.one_of(_ident, st.lists(_ident, min_size=1, max_size=4)),
        "presence_penalty": st.floats(0, 1),
        "frequency_penalty": st.floats(0, 1),
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
                        },
                    },
                },
            ]
        ),
    }
    if user:
        optional["user"] = _ident
    for name, strategy in optional.items():
        if draw(st.booleans()):
            body[name] = draw(strategy)
    if body.get("response_format", {}).get("type") == "json_object" and not json_word:
        del body["response_format"]
    if (
        "json" not in orjson.dumps(messages).decode().lower()
        and body.get("response_format", {}).get("type") == "json_object"
    ):
        messages.append({"role": "user", "content": "reply in JSON"})
    return body


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=openai_chat_requests(),
    stream=st.booleans(),
    include_usage=st.booleans(),
    version=st.sampled_from(["2024-06-01", "2024-10-21", "2025-04-01-preview"]),
    entra=st.booleans(),
)
@pytest.mark.covers("azure", "chat", "tools", "vision", "json_mode")
def test_any_valid_openai_request_is_a_valid_azure_request(
    body: dict[str, Any], stream: bool, include_usage: bool, version: str, entra: bool
) -> None:
    if stream:
        body = {
            **body,
            "stream": True,
            **({"stream_options": {"include_usage": True}} if include_usage else {}),
        }
    validate(Operation.CHAT, body)  # a request the router itself accepts
    key = f"entra:{ENTRA}" if entra else KEY
    request = AzureOpenAIProvider().build_request(
        body, _ctx(version, stream, stream and include_usage, key, drop=True)
    )
    url = urlsplit(request.url)
    assert url.path == "/openai/deployments/gpt4o-prod/chat/completions"
    sent_version = validate_api_version(parse_qs(url.query)["api-version"][0])
    validate_headers(request.headers, KEY, ENTRA)
    sent = orjson.loads(request.body or b"")
    try:
        validate_chat(sent, sent_version)
    except WireError as err:  # pragma: no cover - shows the failing request
        raise AssertionError(f"{err.message}\n{sent}") from None
