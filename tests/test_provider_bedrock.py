"""Amazon Bedrock end to end: the real openai SDK, a real router, a fake checking SigV4 and Converse.

Plus the ConverseStream translator fed event-stream frames split at every byte, and a property
test that every valid chat request translates into a Converse body the fake's validator accepts.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubellm.router._errors import (
    AuthenticationError,
    ContextLengthExceededError,
    InvalidRequestError,
    RateLimitError,
    UpstreamStatusError,
)
from kubellm.router.config._schema import DeploymentConfig
from kubellm.router.providers import Operation, RequestContext
from kubellm.router.providers._bedrock_converse import (
    ConverseStreamTranslator,
    bedrock_error,
    bedrock_stop_reason_to_openai,
    bedrock_tool_id,
)
from kubellm.router.providers.bedrock import BedrockProvider, StaticCredentials, parse_aws_credential
from tests.conftest import MASTER_KEY
from tests.fakes.bedrock_upstream import (
    DEFAULT_TEXT,
    FakeBedrock,
    Fault,
    Reply,
    converse_stream_frames,
    exception_frame,
    validate_converse,
)
from tests.support.servers import RouterProcess
from tests.support.streams import cut_at, every_split

AKID, SECRET = "AKIDEXAMPLETEST01", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SESSION_AKID, SESSION_SECRET, SESSION_TOKEN = (
    "ASIAEXAMPLETEST02",
    "session/secret+key",
    "FwoGZXIvYXdzEXAMPLE//token=",
)
CHAIN_AKID, CHAIN_SECRET = "AKIDCHAINTEST03", "chain-secret-key"
WRONG_SECRET = "this-is-a-wrong-secret-never-echo"
API_KEY = "ABSKQmVkcm9ja0FQSUtleS1leGFtcGxl"
CLAUDE = "anthropic.claude-3-5-sonnet-20240620-v1:0"
PROFILE_ARN = (
    "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-sonnet-20240620-v1:0"
)
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
covers = pytest.mark.covers
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


def tool_use(call_id: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"toolUse": {"toolUseId": call_id, "name": name, "input": args}}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeBedrock]:
    creds = {
        AKID: (SECRET, None),
        SESSION_AKID: (SESSION_SECRET, SESSION_TOKEN),
        CHAIN_AKID: (CHAIN_SECRET, None),
    }
    with FakeBedrock(creds, api_key=API_KEY) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(fake: FakeBedrock) -> None:
    fake.reset()


@pytest.fixture(scope="module")
def router(fake: FakeBedrock) -> Iterator[RouterProcess]:
    def dep(model: str, upstream: str = CLAUDE, **extra: Any) -> dict[str, Any]:
        return {
            "name": model,
            "model": model,
            "provider": "bedrock",
            "upstreamModel": upstream,
            "baseUrl": fake.base_url,
            "region": "us-east-1",
            "apiKeyEnv": "TEST_AWS_KEYS",
            **extra,
        }

    session = json.dumps(
        {"accessKeyId": SESSION_AKID, "secretAccessKey": SESSION_SECRET, "sessionToken": SESSION_TOKEN}
    )
    config = {
        "deployments": [
            dep("claude"),
            dep("claude-arn", PROFILE_ARN),
            dep("claude-session", apiKeyEnv=None, apiKey=session),
            {**dep("claude-chain", apiKeyEnv=None), "region": None},
            dep("claude-apikey", apiKeyEnv=None, apiKey=API_KEY),
            dep("claude-badkey", apiKeyEnv=None, apiKey=f"{AKID}:{WRONG_SECRET}"),
            dep("claude-drop", dropUnsupportedParams=True),
            dep("claude-limited-1"),
            dep("claude-limited-2"),
            dep("claude-failing"),  # errors that open the circuit breaker, kept off the other deployments
            dep("titan", "amazon.titan-embed-text-v2:0"),
            dep("cohere", "cohere.embed-english-v3"),
        ],
        "settings": {"numRetries": 0},
    }
    env = {
        "TEST_AWS_KEYS": f"{AKID}:{SECRET}",
        "KUBELLM_MASTER_KEY": MASTER_KEY,
        # The standard chain, for the deployment without a credential: environment keys, nothing else.
        "AWS_ACCESS_KEY_ID": CHAIN_AKID,
        "AWS_SECRET_ACCESS_KEY": CHAIN_SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    proc = RouterProcess(config, env=env)
    proc.start()
    yield proc
    proc.stop()


def client(router: RouterProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.v1, api_key=MASTER_KEY, max_retries=0)


def chat(router: RouterProcess, model: str = "claude", **kwargs: Any) -> Any:
    kwargs.setdefault("messages", [{"role": "user", "content": "hi"}])
    return client(router).chat.completions.create(model=model, **kwargs)


# ------------------------------------------------------------------ chat


@covers("bedrock", "chat")
def test_chat_translates_history_parameters_and_usage(router: RouterProcess, fake: FakeBedrock) -> None:
    fake.queue(
        Reply(usage={"inputTokens": 5, "outputTokens": 7, "totalTokens": 22, "cacheReadInputTokens": 10})
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
        user="alice@example.com",
    )
    assert reply.choices[0].message.content == DEFAULT_TEXT
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (15, 7)
    assert (
        reply.usage.prompt_tokens_details is not None
        and reply.usage.prompt_tokens_details.cached_tokens == 10
    )
    seen = fake.seen[-1]
    assert seen.path == f"/model/{CLAUDE}/converse"
    assert seen.headers["Authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={AKID}/")
    assert seen.body == {
        "system": [{"text": "Be brief."}],
        "messages": [
            {"role": "user", "content": [{"text": "Hello"}]},
            {"role": "assistant", "content": [{"text": "Hi! How can I help?"}]},
            {"role": "user", "content": [{"text": "Tell me a joke"}]},
        ],
        "inferenceConfig": {"maxTokens": 256, "temperature": 0.3, "topP": 0.9, "stopSequences": ["END"]},
        "requestMetadata": {"user": "alice@example.com"},
    }


@pytest.mark.parametrize("model", ["claude-arn", "claude-session", "claude-chain", "claude-apikey"])
def test_every_credential_source_and_arn_model_ids(
    router: RouterProcess, fake: FakeBedrock, model: str
) -> None:
    assert chat(router, model).choices[0].message.content == DEFAULT_TEXT
    seen = fake.seen[-1]
    if model == "claude-arn":
        assert seen.path == f"/model/{PROFILE_ARN}/converse"
    if model == "claude-session":
        assert seen.headers["X-Amz-Security-Token"] == SESSION_TOKEN
    if model == "claude-chain":
        assert f"Credential={CHAIN_AKID}/" in seen.headers["Authorization"]
    if model == "claude-apikey":
        assert seen.headers["Authorization"] == f"Bearer {API_KEY}"


def test_the_fake_rejects_a_request_whose_body_changed_after_signing(fake: FakeBedrock) -> None:
    deployment = DeploymentConfig(
        name="d",
        model="m",
        provider="bedrock",
        upstreamModel=PROFILE_ARN,
        baseUrl=fake.base_url,
        region="us-east-1",
    )
    ctx = RequestContext("r", Operation.CHAT, "m", deployment, api_key=f"{AKID}:{SECRET}")
    request = BedrockProvider().build_request(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, ctx
    )

    def send(body: bytes, headers: dict[str, str]) -> tuple[int, bytes, str]:
        req = urllib.request.Request(request.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req) as resp:
                return resp.status, resp.read(), ""
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), exc.headers.get("x-amzn-ErrorType", "")

    assert send(request.body or b"", request.headers)[0] == 200
    status, _, kind = send((request.body or b"").replace(b"hi", b"ho"), request.headers)
    assert status == 403 and kind.startswith("InvalidSignatureException")
    status, _, kind = send(request.body or b"", {**request.headers, "Content-Type": "application/json; x=1"})
    assert status == 403 and kind.startswith("InvalidSignatureException")


@pytest.mark.parametrize("include_usage", [True, False])
@covers("bedrock", "stream", "stream_usage")
def test_stream(router: RouterProcess, fake: FakeBedrock, include_usage: bool) -> None:
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(chat(router, stream=True, **extra))
    assert fake.seen[-1].path == f"/model/{CLAUDE}/converse-stream"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == DEFAULT_TEXT
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    usage = [c.usage for c in chunks if c.usage is not None]
    if include_usage:
        assert len(usage) == 1 and chunks[-1].usage is not None
        assert (usage[0].prompt_tokens, usage[0].completion_tokens) == (12, 10)
    else:
        assert usage == []


# ----------------------------------------------------------------- tools


@covers("bedrock", "tools")
def test_parallel_tool_calls_and_results_round_trip(router: RouterProcess, fake: FakeBedrock) -> None:
    fake.queue(
        Reply(
            blocks=[
                {"text": "Checking."},
                tool_use("tooluse_a1", "get_weather", {"city": "Paris"}),
                tool_use("tooluse_b2", "get_time", {"tz": "CET"}),
            ],
            stop_reason="tool_use",
        )
    )
    messages: list[Any] = [{"role": "user", "content": "Weather and time in Paris?"}]
    first = chat(router, messages=messages, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required")
    sent = fake.seen[-1].body["toolConfig"]
    assert sent["toolChoice"] == {"any": {}}
    assert sent["tools"][0] == {
        "toolSpec": {
            "name": "get_weather",
            "description": "Weather in a city",
            "inputSchema": {"json": WEATHER_TOOL["function"]["parameters"]},
        }
    }  # type: ignore[index]
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and message.content == "Checking."
    calls = message.tool_calls or []
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("tooluse_a1", "get_weather", {"city": "Paris"}),
        ("tooluse_b2", "get_time", {"tz": "CET"}),
    ]
    messages += [
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": "tooluse_b2", "content": "12:00"},
        {"role": "tool", "tool_call_id": "tooluse_a1", "content": '{"temp_c": 21}'},
        {"role": "user", "content": "Thanks!"},
    ]
    chat(
        router,
        messages=messages,
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    body = fake.seen[-1].body
    assert body["toolConfig"]["toolChoice"] == {"tool": {"name": "get_time"}}
    assert body["messages"][1]["content"][1:] == [
        tool_use("tooluse_a1", "get_weather", {"city": "Paris"}),
        tool_use("tooluse_b2", "get_time", {"tz": "CET"}),
    ]
    assert body["messages"][2] == {
        "role": "user",
        "content": [
            {"toolResult": {"toolUseId": "tooluse_b2", "content": [{"text": "12:00"}]}},
            {"toolResult": {"toolUseId": "tooluse_a1", "content": [{"text": '{"temp_c": 21}'}]}},
            {"text": "Thanks!"},
        ],
    }


def test_tool_history_without_tools_and_foreign_ids(router: RouterProcess, fake: FakeBedrock) -> None:
    long_id = "call_" + "x" * 80 + "~sig~c2ln"  # e.g. an id minted by another provider
    chat(
        router,
        messages=[
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": long_id,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": long_id, "content": ""},
        ],
    )
    body = fake.seen[-1].body
    assert body["toolConfig"] == {
        "tools": [{"toolSpec": {"name": "get_weather", "inputSchema": {"json": {"type": "object"}}}}]
    }
    use_id = body["messages"][1]["content"][0]["toolUse"]["toolUseId"]
    assert use_id == bedrock_tool_id(long_id) == body["messages"][2]["content"][0]["toolResult"]["toolUseId"]


@covers("bedrock", "tools", "stream")
def test_streamed_tool_call_arguments_arrive_as_deltas(router: RouterProcess, fake: FakeBedrock) -> None:
    fake.queue(
        Reply(
            blocks=[
                tool_use("tooluse_1", "get_weather", {"city": "Oslo", "unit": "celsius"}),
                tool_use("tooluse_2", "get_time", {"tz": "CET"}),
            ],
            stop_reason="tool_use",
        )
    )
    chunks = list(chat(router, stream=True, tools=[WEATHER_TOOL, TIME_TOOL]))
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(
                delta.index,
                {
                    "id": "",
                    "name": "",
                    "args": [],
                },
            )
            entry["id"] += delta.id or ""
            entry["name"] += (delta.function.name or "") if delta.function else ""
            if delta.function and delta.function.arguments:
                entry["args"].append(delta.function.arguments)
    assert [(c["id"], c["name"], json.loads("".join(c["args"]))) for c in calls.values()] == [
        ("tooluse_1", "get_weather", {"city": "Oslo", "unit": "celsius"}),
        ("tooluse_2", "get_time", {"tz": "CET"}),
    ]
    assert len(calls[0]["args"]) > 1  # the arguments arrived in pieces, as Bedrock sent them
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]


# ---------------------------------------------------------- vision, json


@covers("bedrock", "vision")
def test_images_are_sent_as_bytes(router: RouterProcess, fake: FakeBedrock) -> None:
    chat(
        router,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    {"type": "image_url", "image_url": {"url": "s3://bucket/cat.jpg"}},
                ],
            }
        ],
    )
    assert fake.seen[-1].body["messages"][0]["content"] == [
        {"text": "What is this?"},
        {"image": {"format": "png", "source": {"bytes": PNG}}},
        {"image": {"format": "jpeg", "source": {"s3Location": {"uri": "s3://bucket/cat.jpg"}}}},
    ]
    with pytest.raises(openai.BadRequestError) as info:
        chat(
            router,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}],
                }
            ],
        )
    assert "data URL" in info.value.message


@covers("bedrock", "json_mode")
def test_json_mode_and_json_schema(router: RouterProcess, fake: FakeBedrock) -> None:
    fake.queue(Reply(blocks=[{"text": '{"ok": true}'}]), Reply(blocks=[{"text": '{"name": "Ada"}'}]))
    reply = chat(
        router,
        response_format={"type": "json_object"},
        messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}],
    )
    assert json.loads(reply.choices[0].message.content or "") == {"ok": True}
    assert fake.seen[-1].body["system"] == [
        {"text": "Be terse.\n\nRespond with one valid JSON object and nothing else."}
    ]
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}},
        "required": ["name"],
        "additionalProperties": False,
    }
    reply = chat(
        router,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "description": "A person", "strict": True, "schema": schema},
        },
    )
    assert json.loads(reply.choices[0].message.content or "") == {"name": "Ada"}
    output = fake.seen[-1].body["outputConfig"]["textFormat"]
    assert output["type"] == "json_schema"
    assert output["structure"]["jsonSchema"]["name"] == "person"
    assert json.loads(output["structure"]["jsonSchema"]["schema"]) == schema


# ------------------------------------------------------------ embeddings


@covers("bedrock", "embeddings")
def test_titan_and_cohere_embeddings(router: RouterProcess, fake: FakeBedrock) -> None:
    emb = client(router).embeddings.create(
        model="titan", input=["one two", "three four five"], dimensions=256
    )
    assert [len(d.embedding) for d in emb.data] == [256, 256] and [d.index for d in emb.data] == [0, 1]
    assert emb.usage.prompt_tokens == 5  # Titan's inputTextTokenCount, summed over its one-input calls
    assert sorted(s.body["inputText"] for s in fake.seen) == ["one two", "three four five"]
    assert all(s.path == "/model/amazon.titan-embed-text-v2:0/invoke" for s in fake.seen)
    fake.reset()
    emb = client(router).embeddings.create(
        model="cohere", input=["a b", "c"], extra_body={"input_type": "search_query"}
    )
    assert [len(d.embedding) for d in emb.data] == [6, 6]
    assert emb.usage.prompt_tokens == 3  # from X-Amzn-Bedrock-Input-Token-Count
    assert fake.seen[-1].body == {"texts": ["a b", "c"], "input_type": "search_query"}


# ---------------------------------------------------------------- errors


def test_context_length_is_mapped(router: RouterProcess, fake: FakeBedrock) -> None:
    fake.queue(Fault(400, "ValidationException", "Input is too long for requested model."))
    with pytest.raises(openai.BadRequestError) as info:
        chat(router)
    assert info.value.code == "context_length_exceeded"


def test_throttling_is_429_keeping_retry_after(router: RouterProcess, fake: FakeBedrock) -> None:
    fake.queue(
        Fault(
            429,
            "ThrottlingException",
            "Too many requests, please wait before trying again.",
            {"Retry-After": "3"},
        )
    )
    with pytest.raises(openai.RateLimitError) as info:
        chat(router, "claude-limited-1")
    assert info.value.response.headers["retry-after"] == "3"
    # A throttlingException event before any content is still a 429 (the stream has not begun).
    fake.queue(Reply(exception=("throttlingException", "Too many tokens, please wait."), exception_after=1))
    with pytest.raises(openai.RateLimitError):
        list(chat(router, "claude-limited-2", stream=True))


def test_exception_mid_stream_becomes_an_error_event(router: RouterProcess, fake: FakeBedrock) -> None:
    fake.queue(
        Reply(exception=("modelStreamErrorException", "The model stopped unexpectedly."), exception_after=3)
    )
    with pytest.raises(openai.APIError) as info:
        list(chat(router, "claude-failing", stream=True))
    assert "stopped unexpectedly" in str(info.value.message)


@pytest.mark.parametrize("stream", [False, True])
def test_filtered_answer_is_content_filter(router: RouterProcess, fake: FakeBedrock, stream: bool) -> None:
    fake.queue(Reply(blocks=[], stop_reason="content_filtered"))
    with pytest.raises(openai.BadRequestError) as info:
        result = chat(router, stream=stream)
        if stream:
            list(result)
    assert info.value.code == "content_filter"
    fake.queue(
        Reply(blocks=[{"text": "Sorry, I cannot help with that."}], stop_reason="guardrail_intervened")
    )
    reply = chat(router)
    assert reply.choices[0].finish_reason == "content_filter"


@pytest.mark.parametrize(
    "fault",
    [
        Fault(
            403, "AccessDeniedException", "You don't have access to the model with the specified model ID."
        ),
        Fault(403, "UnrecognizedClientException", "The security token included in the request is invalid."),
    ],
)
def test_access_errors_are_401(router: RouterProcess, fake: FakeBedrock, fault: Fault) -> None:
    fake.queue(fault)
    with pytest.raises(openai.AuthenticationError):
        chat(router, "claude-failing")


def test_bad_secret_is_401_and_never_echoed(router: RouterProcess, fake: FakeBedrock) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        chat(router, "claude-badkey")
    assert WRONG_SECRET not in json.dumps(info.value.body)
    assert WRONG_SECRET not in router.logs() and SECRET not in router.logs()


def test_unsupported_parameters(router: RouterProcess, fake: FakeBedrock) -> None:
    for kwargs in ({"seed": 1}, {"n": 2}, {"logit_bias": {"1": 1}}):
        with pytest.raises(openai.BadRequestError) as info:
            chat(router, **kwargs)
        assert next(iter(kwargs)) in info.value.message and "bedrock" in info.value.message
    with pytest.raises(openai.BadRequestError):
        chat(router, temperature=1.5)
    assert fake.seen == []
    assert chat(router, n=1, presence_penalty=0, logprobs=False).choices[0].message.content == DEFAULT_TEXT
    assert chat(router, "claude-drop", seed=1).choices[0].message.content == DEFAULT_TEXT


# ------------------------------------------------------- unit-level checks


def test_credential_formats() -> None:
    assert parse_aws_credential("AK:SK") == StaticCredentials("AK", "SK")
    assert parse_aws_credential(" AK:SK:TOKEN\n") == StaticCredentials("AK", "SK", "TOKEN")
    assert parse_aws_credential(
        '{"AccessKeyId": "AK", "SecretAccessKey": "SK", "SessionToken": "T"}'
    ) == StaticCredentials("AK", "SK", "T")
    assert parse_aws_credential(API_KEY) == API_KEY
    with pytest.raises(InvalidRequestError) as info:
        parse_aws_credential("just-a-secret-value")
    assert "just-a-secret-value" not in info.value.message


def test_error_and_stop_reason_mapping() -> None:
    assert isinstance(
        bedrock_error(400, "ValidationException:http://x", "too many input tokens", {}, "bedrock"),
        ContextLengthExceededError,
    )
    assert isinstance(bedrock_error(429, "throttlingException", "slow", {}, "bedrock"), RateLimitError)
    assert isinstance(
        bedrock_error(403, "InvalidSignatureException", "sig", {}, "bedrock"), AuthenticationError
    )
    stream_error = bedrock_error(424, "modelStreamErrorException", "boom", {}, "bedrock")
    assert isinstance(stream_error, UpstreamStatusError) and stream_error.retryable
    assert [
        bedrock_stop_reason_to_openai(r)
        for r in (
            "end_turn",
            "stop_sequence",
            "tool_use",
            "max_tokens",
            "guardrail_intervened",
            "content_filtered",
            "model_context_window_exceeded",
            None,
        )
    ] == ["stop", "stop", "tool_calls", "length", "content_filter", "content_filter", "length", None]


# ----------------------------------------------- stream decoder splitting


def _ctx(include_usage: bool = True) -> RequestContext:
    deployment = DeploymentConfig(
        name="d", model="m", provider="bedrock", upstreamModel=CLAUDE, region="us-east-1"
    )
    return RequestContext(
        "req-1", Operation.CHAT, "m", deployment, True, include_usage, created=1, api_key=f"{AKID}:{SECRET}"
    )


STREAM = b"".join(
    converse_stream_frames(
        [
            {"text": "Grüße aus Bedrock"},
            tool_use("tooluse_9", "get_weather", {"city": "Zürich", "days": [1, 2]}),
        ],
        "tool_use",
        {"inputTokens": 9, "outputTokens": 4, "totalTokens": 13, "cacheReadInputTokens": 2},
    )
)


def _run(pieces: list[bytes]) -> list[Any]:
    translator = ConverseStreamTranslator(_ctx(), "bedrock")
    out: list[Any] = []
    for piece in pieces:
        out += translator.feed(piece)
    out += translator.finish()
    assert translator.error is None and translator.usage is not None
    return out


def test_stream_translator_output_is_independent_of_byte_splits() -> None:
    whole = _run([STREAM])
    assert (
        "".join(c["choices"][0]["delta"].get("content") or "" for c in whole if c["choices"])
        == "Grüße aus Bedrock"
    )
    assert whole[-1]["usage"] == {
        "prompt_tokens": 11,
        "completion_tokens": 4,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    for parts in every_split(STREAM):
        assert _run(parts) == whole, [len(p) for p in parts[:2]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=10))
def test_stream_translator_with_random_splits(cuts: list[int]) -> None:
    assert _run(cut_at(STREAM, cuts)) == _run([STREAM])


def test_stream_exception_and_truncation() -> None:
    translator = ConverseStreamTranslator(_ctx(), "bedrock")
    with pytest.raises(RateLimitError):
        translator.feed(exception_frame("throttlingException", "slow down"))
    translator = ConverseStreamTranslator(_ctx(), "bedrock")
    translator.feed(STREAM[:-5])
    with pytest.raises(Exception, match="ended inside a message"):
        translator.finish()


# ---------------------------------------------------------- property test

NAMES = st.from_regex(r"[a-zA-Z0-9_-]{1,20}", fullmatch=True)
TEXT = st.text(min_size=1, max_size=30).filter(str.strip)
SCHEMAS = st.recursive(
    st.sampled_from(
        [{"type": "string"}, {"type": "integer"}, {"type": ["number", "null"]}, {"enum": ["a", "b"]}]
    ),
    lambda inner: (
        inner.map(lambda s: {"type": "array", "items": s})
        | st.dictionaries(NAMES, inner, min_size=1, max_size=3).map(
            lambda p: {"type": "object", "properties": p}
        )
    ),
    max_leaves=5,
)


@st.composite
def chat_requests(draw: st.DrawFn) -> dict[str, Any]:
    tool_names = draw(st.lists(NAMES, max_size=3, unique=True))
    tools = [
        {
            "type": "function",
            "function": {
                "name": n,
                "description": draw(st.text(max_size=20)),
                "parameters": {
                    "type": "object",
                    "properties": draw(st.dictionaries(NAMES, SCHEMAS, max_size=3)),
                },
            },
        }
        for n in tool_names
    ]
    messages: list[dict[str, Any]] = []
    if draw(st.booleans()):
        messages.append(
            {"role": draw(st.sampled_from(["system", "developer"])), "content": draw(st.text(max_size=20))}
        )
    part = st.one_of(
        TEXT.map(lambda t: {"type": "text", "text": t}),
        st.just({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}),
    )
    messages.append(
        {"role": "user", "content": draw(st.one_of(TEXT, st.lists(part, min_size=1, max_size=3)))}
    )
    n = 0
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["user", "assistant", "tools"]))
        if kind == "user":
            messages.append({"role": "user", "content": draw(st.one_of(TEXT, st.text(max_size=3)))})
        elif kind == "assistant":
            messages.append(
                {"role": "assistant", "content": draw(st.one_of(st.none(), st.text(max_size=20)))}
            )
        else:
            names = draw(st.lists(NAMES, min_size=1, max_size=3))
            ids = [
                draw(st.sampled_from([f"call_{n}_{i}", f"tooluse_{n}{i}", f"x{n}{i}/{'y' * 70}"]))
                for i in range(len(names))
            ]
            n += 1
            messages.append(
                {
                    "role": "assistant",
                    "content": draw(st.one_of(st.none(), st.text(max_size=10))),
                    "tool_calls": [
                        {
                            "id": i,
                            "type": "function",
                            "function": {
                                "name": name,
                                "arguments": json.dumps(draw(st.dictionaries(NAMES, st.integers()))),
                            },
                        }
                        for i, name in zip(ids, names, strict=True)
                    ],
                }
            )
            for i in draw(st.permutations(ids)):
                messages.append({"role": "tool", "tool_call_id": i, "content": draw(st.text(max_size=10))})
    body: dict[str, Any] = {"model": "m", "messages": messages}
    optional = {
        "temperature": st.floats(0, 1),
        "top_p": st.floats(0, 1),
        "max_tokens": st.integers(1, 8192),
        "max_completion_tokens": st.integers(1, 8192),
        "n": st.just(1),
        "presence_penalty": st.just(0),
        "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=4)),
        "user": st.text(max_size=40),
        "parallel_tool_calls": st.just(True),
        "logprobs": st.just(False),
        "response_format": st.sampled_from(
            [
                {"type": "text"},
                {"type": "json_object"},
                {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "r",
                        "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
                    },
                },
            ]
        ),
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
@given(chat_requests(), st.booleans())
def test_every_valid_chat_request_translates_into_one_bedrock_accepts(
    body: dict[str, Any], stream: bool
) -> None:
    ctx = _ctx()
    ctx.stream = stream
    request = BedrockProvider().build_request(body, ctx)
    payload = orjson.loads(request.body or b"")
    assert validate_converse(payload) is None, payload
    assert request.url.endswith("/converse-stream" if stream else "/converse")
    assert "Signature=" in request.headers["Authorization"]
    results = [b for m in payload["messages"] for b in m["content"] if "toolResult" in b]
    assert len(results) == len([m for m in body["messages"] if m["role"] == "tool"])
