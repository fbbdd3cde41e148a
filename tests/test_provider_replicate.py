"""Replicate end to end: the real openai SDK, a real router process, a protocol-enforcing fake.

Plus the stream translator fed Replicate's SSE split at every byte, and a property test that
every valid chat request translates into a create request the fake's validator accepts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import openai
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubellm.router._errors import (
    ContentFilterError,
    ContextLengthExceededError,
    InvalidRequestError,
    KubellmError,
    RateLimitError,
    UpstreamStatusError,
)
from kubellm.router.config._schema import DeploymentConfig
from kubellm.router.providers import Operation, RequestContext, get_provider
from kubellm.router.providers.replicate import (
    ReplicateProvider,
    ReplicateStreamTranslator,
    _StreamSession,
    replicate_error_to_openai,
)
from tests.conftest import MASTER_KEY
from tests.fakes.replicate_upstream import TOKEN, FakeReplicate, Problem, sse_events, validate_create
from tests.support.servers import RouterProcess
from tests.support.streams import every_split

HASH = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"
LLAMA3 = "meta/meta-llama-3-70b-instruct"
WRONG_TOKEN = "r8_wrong-secret-token-0123456789"
REPLY = "Hello from Replicate! How can I help you today?"
REPLY_PIECES = 9  # the fake's output pieces: one per word, one token each
covers = pytest.mark.covers


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeReplicate]:
    with FakeReplicate() as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh_fake(fake: FakeReplicate) -> None:
    fake.reset()


def _dep(model: str, upstream: str, fake: FakeReplicate, **extra: Any) -> dict[str, Any]:
    dep = {"model": model, "provider": "replicate", "upstreamModel": upstream, "baseUrl": fake.base_url,
           "apiKeyEnv": "TEST_REPLICATE_TOKEN", "name": model}  # fmt: skip
    dep.update(extra)
    return dep


@pytest.fixture(scope="module")
def router(fake: FakeReplicate) -> Iterator[RouterProcess]:
    config = {
        "deployments": [
            _dep("llama3", LLAMA3, fake),
            _dep("versioned", f"someone/some-model:{HASH}", fake),
            _dep("hashonly", HASH, fake),
            _dep("llama2", "meta/llama-2-70b-chat", fake),
            _dep("dropper", LLAMA3, fake, dropUnsupportedParams=True),
            _dep("short", LLAMA3, fake, timeouts={"total": 1.5}),
            _dep("limited", LLAMA3, fake),  # a 429 with Retry-After cools its deployment down
            {**_dep("badkey", LLAMA3, fake), "apiKeyEnv": None, "apiKey": WRONG_TOKEN},
        ],
        # Failures are part of these tests: keep the circuit breaker from taking deployments out.
        "settings": {"numRetries": 1, "cooldown": {"failureThreshold": 1000}},
    }
    env = {"TEST_REPLICATE_TOKEN": TOKEN, "KUBELLM_MASTER_KEY": MASTER_KEY}
    with RouterProcess(config, env=env) as proc:
        yield proc


def _client(router: RouterProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.v1, api_key=MASTER_KEY, max_retries=0, timeout=20)


def _user(text: str = "Say hi") -> list[Any]:
    return [{"role": "user", "content": text}]


def _creates(fake: FakeReplicate) -> list[Any]:
    return [s for s in fake.requests("POST") if s.path.endswith("/predictions")]


def _eventually(check: Any, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


# --- not streamed -------------------------------------------------------------------------------


@covers("replicate", "chat")
def test_chat_official_model_in_sync_mode(router: RouterProcess, fake: FakeReplicate) -> None:
    raw = _client(router).chat.completions.with_raw_response.create(
        model="llama3",
        messages=[{"role": "system", "content": "You are terse."}, *_user()],
        temperature=0.2, top_p=0.9, max_tokens=50, stop=["END", "###"], seed=7, presence_penalty=0.5,
        user="u-1",
    )  # fmt: skip
    completion = raw.parse()
    assert completion.choices[0].message.content == REPLY
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, REPLY_PIECES)
    assert completion.id.startswith("chatcmpl-fakepred")
    assert raw.headers["x-kubellm-deployment"] == "llama3"
    [create] = _creates(fake)
    assert create.path == f"/v1/models/{LLAMA3}/predictions"
    assert create.headers["Authorization"] == f"Bearer {TOKEN}"
    assert create.headers["Prefer"] == "wait=60"
    assert create.body == {
        "input": {
            **{"prompt": "Say hi", "system_prompt": "You are terse.", "max_tokens": 50, "temperature": 0.2},
            **{"top_p": 0.9, "presence_penalty": 0.5, "seed": 7, "stop_sequences": "END,###"},
        }
    }
    assert fake.requests("GET") == []  # sync mode answered; nothing to poll


@covers("replicate", "chat")
@pytest.mark.parametrize("model", ["versioned", "hashonly"])
def test_versioned_models_use_the_predictions_endpoint(
    router: RouterProcess, fake: FakeReplicate, model: str
) -> None:
    completion = _client(router).chat.completions.create(model=model, messages=_user())
    assert completion.choices[0].message.content == REPLY
    [create] = _creates(fake)
    assert create.path == "/v1/predictions"
    assert create.body["version"] == HASH
    assert create.body["input"] == {"prompt": "Say hi"}


@covers("replicate", "chat")
def test_polls_urls_get_when_the_sync_wait_ends_first(router: RouterProcess, fake: FakeReplicate) -> None:
    fake.max_hold, fake.run_seconds = 0.0, 0.6  # the create answers "starting" at once
    completion = _client(router).chat.completions.create(model="llama3", messages=_user())
    assert completion.choices[0].message.content == REPLY
    polls = fake.requests("GET", "/v1/predictions/")
    assert len(polls) >= 2
    assert all(p.headers["Authorization"] == f"Bearer {TOKEN}" for p in polls)
    assert len(_creates(fake)) == 1


def test_polling_stops_at_the_total_timeout_and_cancels(router: RouterProcess, fake: FakeReplicate) -> None:
    fake.max_hold, fake.run_seconds = 0.0, 60.0
    with pytest.raises(openai.InternalServerError) as info:
        _client(router).chat.completions.create(model="short", messages=_user())
    assert info.value.status_code == 504
    assert len(_creates(fake)) == 2  # a timeout is retried once (numRetries: 1)
    assert _eventually(lambda: [p.status for p in fake.predictions.values()] == ["canceled", "canceled"])


@covers("replicate", "chat")
def test_history_becomes_a_transcript_prompt(router: RouterProcess, fake: FakeReplicate) -> None:
    _client(router).chat.completions.create(
        model="llama3",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "Hello!"},
            {"role": "developer", "content": "Use digits."},
            {"role": "user", "content": "What is 2+2?"},
        ],
    )
    inputs = _creates(fake)[0].body["input"]
    assert inputs["prompt"] == "User: Hi\n\nAssistant: Hello!\n\nUser: What is 2+2?"
    assert inputs["system_prompt"] == "Be brief.\n\nUse digits."


@covers("replicate", "chat")
def test_llama2_schema_takes_max_new_tokens(router: RouterProcess, fake: FakeReplicate) -> None:
    completion = _client(router).chat.completions.create(
        model="llama2", messages=_user(), max_tokens=4, temperature=0
    )
    assert completion.choices[0].message.content == "Hello from Replicate! How"
    assert completion.choices[0].finish_reason == "length"
    assert _creates(fake)[0].body["input"] == {"prompt": "Say hi", "max_new_tokens": 4, "temperature": 0.01}


def test_usage_is_absent_when_replicate_reports_no_token_counts(
    router: RouterProcess, fake: FakeReplicate
) -> None:
    fake.report_tokens = False
    completion = _client(router).chat.completions.create(model="llama3", messages=_user())
    assert completion.choices[0].message.content == REPLY
    assert completion.usage is None


# --- streamed -----------------------------------------------------------------------------------


def _stream(router: RouterProcess, model: str = "llama3", **kwargs: Any) -> list[Any]:
    return list(_client(router).chat.completions.create(model=model, messages=_user(), stream=True, **kwargs))


def _text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize(
    "include_usage",
    [
        pytest.param(True, marks=covers("replicate", "stream", "stream_usage")),
        pytest.param(False, marks=covers("replicate", "stream")),
    ],
)
def test_stream(router: RouterProcess, fake: FakeReplicate, include_usage: bool) -> None:
    options: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = _stream(router, **options)
    assert _text(chunks) == REPLY
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == REPLY_PIECES
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert all(c.id.startswith("chatcmpl-fakepred") for c in chunks)
    usage = [c.usage for c in chunks if c.usage is not None]
    if include_usage:
        assert len(usage) == 1 and chunks[-1].usage is not None and not chunks[-1].choices
        assert (usage[0].prompt_tokens, usage[0].completion_tokens) == (2, REPLY_PIECES)
    else:
        assert usage == []
    [create] = _creates(fake)
    assert create.body["stream"] is True and "Prefer" not in create.headers
    [stream] = fake.requests("GET", "/stream/")
    assert stream.headers["Accept"] == "text/event-stream"
    assert stream.headers["Authorization"] == f"Bearer {TOKEN}"
    # After `done`, the finished prediction is fetched once for its token counts.
    assert len(fake.requests("GET", "/v1/predictions/")) == 1


@covers("replicate", "stream")
def test_stream_cut_at_max_tokens_finishes_with_length(router: RouterProcess) -> None:
    chunks = _stream(router, max_tokens=3)
    assert _text(chunks) == "Hello from Replicate!"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


@covers("replicate", "stream")
def test_stream_keeps_newlines_and_unicode(router: RouterProcess, fake: FakeReplicate) -> None:
    fake.pieces = ["Line one\n", "line two\n\n", " 🌍 ünïcode", "\n", "  end"]
    assert _text(_stream(router)) == "".join(fake.pieces)


def test_stream_usage_unknown_without_token_counts(router: RouterProcess, fake: FakeReplicate) -> None:
    fake.report_tokens = False
    chunks = _stream(router, stream_options={"include_usage": True})
    assert _text(chunks) == REPLY
    assert [c for c in chunks if c.usage is not None] == []


def test_model_that_cannot_stream_is_a_400_and_the_prediction_is_canceled(
    router: RouterProcess, fake: FakeReplicate
) -> None:
    fake.streams, fake.run_seconds = False, 5.0
    with pytest.raises(openai.BadRequestError) as info:
        _stream(router)
    assert info.value.body["param"] == "stream"  # type: ignore[index]
    assert _eventually(lambda: any(s.path.endswith("/cancel") for s in fake.requests("POST")))


def test_abandoned_stream_cancels_the_prediction(router: RouterProcess, fake: FakeReplicate) -> None:
    fake.run_seconds = 4.0  # nine pieces, one every ~0.45 s
    stream = _client(router).chat.completions.create(model="llama3", messages=_user(), stream=True)
    next(iter(stream))
    stream.close()
    assert _eventually(lambda: [p.status for p in fake.predictions.values()] == ["canceled"])


# --- errors -------------------------------------------------------------------------------------


def test_bad_token_is_an_auth_error_that_never_echoes_it(router: RouterProcess) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        _client(router).chat.completions.create(model="badkey", messages=_user())
    assert WRONG_TOKEN not in str(info.value.body)
    assert WRONG_TOKEN not in router.logs()


def test_rate_limit_keeps_retry_after(router: RouterProcess, fake: FakeReplicate) -> None:
    detail = "Request was throttled. Expected available in 7 seconds."
    throttled = Problem(429, "Request was throttled.", detail, headers={"Retry-After": "7"})
    fake.faults = [throttled, throttled]
    with pytest.raises(openai.RateLimitError) as info:
        _client(router).chat.completions.create(model="limited", messages=_user())
    assert info.value.response.headers["retry-after"] == "7"
    assert "throttled" in info.value.message


def test_invalid_input_is_a_400_and_not_retried(router: RouterProcess, fake: FakeReplicate) -> None:
    fake.faults = [
        Problem(422, "Input validation failed", "- input.top_k: Must be greater than or equal to 0")
    ]
    with pytest.raises(openai.BadRequestError) as info:
        _client(router).chat.completions.create(model="llama3", messages=_user())
    assert "top_k" in info.value.message
    assert len(_creates(fake)) == 1


@covers("replicate", "chat")
def test_failed_prediction_out_of_memory_is_retried(router: RouterProcess, fake: FakeReplicate) -> None:
    fake.faults = ["CUDA out of memory. Tried to allocate 2.00 GiB"]
    completion = _client(router).chat.completions.create(model="llama3", messages=_user())
    assert completion.choices[0].message.content == REPLY
    assert len(_creates(fake)) == 2


def test_failed_prediction_too_long_is_context_length_exceeded(
    router: RouterProcess, fake: FakeReplicate
) -> None:
    fake.faults = ["Input too long: the prompt has 9000 tokens, the maximum context length is 8192"]
    with pytest.raises(openai.BadRequestError) as info:
        _client(router).chat.completions.create(model="llama3", messages=_user())
    assert info.value.code == "context_length_exceeded"
    assert len(_creates(fake)) == 1


def test_stream_error_before_any_output_is_an_http_error(router: RouterProcess, fake: FakeReplicate) -> None:
    fake.run_seconds = 0.3  # still running at create time: the error arrives in the stream
    fake.faults = ["Prompt is too long for this model"]
    with pytest.raises(openai.BadRequestError) as info:
        _stream(router)
    assert info.value.code == "context_length_exceeded"
    assert len(fake.requests("GET", "/stream/")) == 1


@covers("replicate", "stream")
def test_stream_error_after_output_arrives_as_an_error_event(
    router: RouterProcess, fake: FakeReplicate
) -> None:
    fake.stream_error, fake.stream_error_after = "CUDA error: an illegal memory access was encountered", 2
    received: list[Any] = []
    with pytest.raises(openai.APIError) as info:
        for chunk in _client(router).chat.completions.create(model="llama3", messages=_user(), stream=True):
            received.append(chunk)
    assert _text(received) == "Hello from"
    assert "illegal memory access" in info.value.message


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        ]}]}, "messages[0].content[1]"),
        ({"messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]}, "messages[1].tool_calls"),
        ({"stop": ["a,b"]}, "stop"),
        ({"n": 2}, "n"),
    ],
)  # fmt: skip
def test_unsupported_parameters_are_rejected_or_dropped(
    router: RouterProcess, fake: FakeReplicate, kwargs: dict[str, Any], param: str
) -> None:
    request = {"messages": _user("What is this?"), **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        _client(router).chat.completions.create(model="llama3", **request)
    assert info.value.body["param"] == param  # type: ignore[index]
    assert "replicate" in info.value.message
    assert _creates(fake) == []
    completion = _client(router).chat.completions.create(model="dropper", **request)
    assert completion.choices[0].message.content == REPLY
    inputs = _creates(fake)[0].body["input"]
    assert "stop_sequences" not in inputs and "cat.png" not in str(inputs)


# --- in process: translator, translation, error mapping -----------------------------------------


def _ctx(
    upstream: str = LLAMA3, *, stream: bool = True, include_usage: bool = True, drop: bool = False
) -> RequestContext:
    dep = DeploymentConfig(name="d", model="m", provider="replicate", upstream_model=upstream,
                           base_url="http://replicate.test/v1", drop_unsupported_params=drop)  # fmt: skip
    return RequestContext("req1", Operation.CHAT, "m", dep, stream, include_usage, api_key=TOKEN)


def _run(parts: list[bytes], session: _StreamSession | None = None) -> tuple[list[Any], KubellmError | None]:
    translator = ReplicateStreamTranslator(_ctx(), session)
    out: list[Any] = []
    try:
        for part in parts:
            out += translator.feed(part)
        out += translator.finish()
    except KubellmError as err:
        return out, err
    norm = [orjson.loads(p) if isinstance(p, bytes) else p for p in out]
    return norm, translator.error


PIECES = ["Once", " upon a", " time…\n", "\n", " 🌍 ünïcode", " the end."]
FINAL = {
    "status": "succeeded",
    "input": {"max_tokens": 100},
    "metrics": {"input_token_count": 4, "output_token_count": 6},
}


@covers("replicate", "stream", "stream_usage")
def test_translator_output_is_the_same_at_every_split_point() -> None:
    data = b"".join(sse_events(PIECES))
    whole, error = _run([data], _StreamSession("p1", FINAL))
    assert error is None
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in whole if c["choices"]) == "".join(
        PIECES
    )
    assert whole[-2]["choices"][0]["finish_reason"] == "stop"
    assert whole[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
    for parts in every_split(data):
        assert _run(parts, _StreamSession("p1", FINAL)) == (whole, None)


def test_translator_errors_are_the_same_at_every_split_point() -> None:
    late = b"".join(sse_events(PIECES, "CUDA out of memory", error_after=2))
    early = b"".join(sse_events(PIECES, "input too long for this model", error_after=0))
    late_out, late_err = _run([late])
    assert len(late_out) == 2 and isinstance(late_err, UpstreamStatusError) and late_err.retryable
    for parts in every_split(late):
        out, err = _run(parts)
        assert out == late_out and type(err) is UpstreamStatusError
    for parts in every_split(early):
        out, err = _run(parts)
        assert out == [] and isinstance(err, ContextLengthExceededError)


def test_translator_canceled_and_truncated_streams() -> None:
    canceled = b'event: output\nid: 1:0\ndata: Hi\n\nevent: done\nid: 1:1\ndata: {"reason":"canceled"}\n\n'
    out, err = _run([canceled])
    assert len(out) == 1 and isinstance(err, UpstreamStatusError) and err.code == "prediction_canceled"
    out, err = _run([b"event: output\nid: 1:0\ndata: Hi\n\n"])
    assert len(out) == 1 and err is not None and "done" in err.message
    out, err = _run([b"event: done\nid: 1:0\ndata: {}\n\n"])  # an empty answer is still an answer
    assert err is None and [c["choices"][0]["finish_reason"] for c in out] == ["stop"]


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("CUDA out of memory. Tried to allocate 20.00 MiB", UpstreamStatusError),
        ("Input too long: 9000 tokens", ContextLengthExceededError),
        ("This model's maximum context length is 8192 tokens", ContextLengthExceededError),
        ("NSFW content detected", ContentFilterError),
        ("Prediction interrupted; please retry (code: PA)", UpstreamStatusError),
    ],
)
def test_prediction_error_strings_map_to_router_errors(message: str, kind: type[KubellmError]) -> None:
    err = replicate_error_to_openai(message)
    assert type(err) is kind
    assert err.retryable is (kind is UpstreamStatusError)


def test_map_error_reads_problem_details() -> None:
    provider = get_provider("replicate")
    doc = orjson.dumps(
        {"title": "Unauthenticated", "detail": f"token {WRONG_TOKEN} is invalid", "status": 401}
    )
    auth = provider.map_error(401, {}, doc)
    assert auth.status == 401 and WRONG_TOKEN not in auth.message
    limited = provider.map_error(
        429, {"Retry-After": "3"}, orjson.dumps({"detail": "throttled", "status": 429})
    )
    assert isinstance(limited, RateLimitError) and limited.headers == {"Retry-After": "3"}
    bad = provider.map_error(
        422, {}, orjson.dumps({"title": "Input validation failed", "detail": "- input.x: no"})
    )
    assert isinstance(bad, InvalidRequestError) and bad.status == 400 and "input.x" in bad.message


# --- property: every valid chat request becomes a create request Replicate accepts ---------------

_text_st = st.text(max_size=40)
_content = st.one_of(
    _text_st, st.lists(st.builds(lambda t: {"type": "text", "text": t}, _text_st), max_size=3)
)
_turns = st.lists(st.tuples(_content, _content), min_size=0, max_size=3)
_stop = st.one_of(
    st.none(), st.text(min_size=1, max_size=8), st.lists(st.text(min_size=1, max_size=8), max_size=4)
)
_params = st.fixed_dictionaries({}, optional={
    "temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "max_tokens": st.integers(1, 4096),
    "max_completion_tokens": st.integers(1, 4096), "seed": st.integers(-(2**31), 2**31),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2), "stop": _stop,
    "user": _text_st, "n": st.just(1), "logprobs": st.just(False),
})  # fmt: skip
_models = st.sampled_from(
    [
        LLAMA3,
        f"someone/some-model:{HASH}",
        HASH,
        "meta/llama-2-70b-chat",
        "mistralai/mixtral-8x7b-instruct-v0.1",
    ]
)


@given(
    system=st.lists(_content, max_size=2), turns=_turns, last=_content, params=_params, model=_models,
    stream=st.booleans(), drop=st.booleans(),
)  # fmt: skip
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_valid_chat_request_translates_into_an_accepted_create(
    system: list[Any], turns: list[tuple[Any, Any]], last: Any, params: dict[str, Any], model: str,
    stream: bool, drop: bool,
) -> None:  # fmt: skip
    messages = [{"role": "system", "content": s} for s in system]
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": last})
    body = {"model": "m", "messages": messages, **params}
    ctx = _ctx(model, stream=stream, drop=drop)
    stops = [params["stop"]] if isinstance(params.get("stop"), str) else params.get("stop") or []
    legacy = model.startswith(("meta/llama-2-", "mistralai/mixtral"))
    penalties = "presence_penalty" in params or "frequency_penalty" in params
    rejected = any("," in s for s in stops) or (legacy and penalties)
    try:
        request = ReplicateProvider().build_request(body, ctx)
    except InvalidRequestError as err:
        assert rejected and not drop, err.message
        return
    assert not rejected or drop
    assert request.body is not None
    sent = orjson.loads(request.body)
    assert validate_create(urlsplit(request.url).path, request.headers, sent) is None
    inputs = sent["input"]
    last_text = last if isinstance(last, str) else "".join(p["text"] for p in last)
    assert inputs["prompt"].endswith(last_text)
    kept = [s for s in stops if "," not in s]
    assert inputs.get("stop_sequences", "").split(",") == (kept or [""])
    assert sent.get("stream", False) is stream and ("Prefer" in request.headers) is not stream
