"""The router end to end, with the real openai SDK against a real fake upstream."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import openai
import pytest

from tests.conftest import MASTER_KEY, UPSTREAM_KEY, openai_deployment
from tests.fakes.openai_upstream import FakeOpenAI
from tests.support.servers import RouterProcess


def _client(router: RouterProcess, key: str = MASTER_KEY, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.v1, api_key=key, max_retries=0, **kwargs)


@pytest.fixture
def router(fake_openai: FakeOpenAI, start_router: Callable[..., RouterProcess]) -> RouterProcess:
    return start_router(
        {"deployments": [openai_deployment(fake_openai, name="dep-a")]},
        env={"KUBELLM_MASTER_KEY": MASTER_KEY},
    )


def test_chat_completion_sync(router: RouterProcess, fake_openai: FakeOpenAI) -> None:
    raw = _client(router).chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "fake says hi to upstream-model"
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert raw.headers["x-kubellm-deployment"] == "dep-a"
    assert raw.headers["x-kubellm-model-group"] == "gpt-test"
    seen = fake_openai.seen[-1]
    assert seen.body["model"] == "upstream-model"
    assert seen.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_unknown_parameters_pass_through_unchanged(router: RouterProcess, fake_openai: FakeOpenAI) -> None:
    tools = [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    ]
    _client(router).chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "hi"}],
        tools=tools,  # type: ignore[arg-type]
        tool_choice="auto",
        response_format={"type": "json_object"},
        n=2,
        logprobs=True,
        seed=7,
        user="u-1",
        extra_body={"vendor_knob": {"nested": [1, 2]}},
    )
    body = fake_openai.seen[-1].body
    assert body["tools"] == tools
    assert body["tool_choice"] == "auto"
    assert body["response_format"] == {"type": "json_object"}
    assert (body["n"], body["logprobs"], body["seed"], body["user"]) == (2, True, 7, "u-1")
    assert body["vendor_knob"] == {"nested": [1, 2]}


def test_chat_completion_async(router: RouterProcess) -> None:
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=router.v1, api_key=MASTER_KEY, max_retries=0)
        results = await asyncio.gather(
            *[
                client.chat.completions.create(
                    model="gpt-test", messages=[{"role": "user", "content": str(i)}]
                )
                for i in range(20)
            ]
        )
        await client.close()
        return [r.choices[0].message.content or "" for r in results]

    assert asyncio.run(run()) == ["fake says hi to upstream-model"] * 20


@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_stream(router: RouterProcess, fake_openai: FakeOpenAI, include_usage: bool) -> None:
    kwargs: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = _client(router).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True, **kwargs
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "fake says hi to upstream-model"
    usage_chunks = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert len(usage_chunks) == 1 and usage_chunks[0].usage is not None
        assert usage_chunks[0].usage.completion_tokens == 5
        assert chunks[-1].usage is not None
    else:
        assert usage_chunks == []
    # The router always asks the upstream for usage, to meter streams.
    assert fake_openai.seen[-1].body["stream_options"] == {"include_usage": True}


def test_stream_is_framed_as_sse_and_ends_with_done(router: RouterProcess) -> None:
    import urllib.request

    req = urllib.request.Request(
        router.v1 + "/chat/completions",
        data=b'{"model":"gpt-test","stream":true,"messages":[{"role":"user","content":"x"}]}',
        headers={"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        body = resp.read()
    events = body.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    assert all(e.startswith(b"data: {") for e in events[:-2])
    assert body.count(b"[DONE]") == 1


def test_completions_and_embeddings(router: RouterProcess) -> None:
    client = _client(router)
    text = client.completions.create(model="gpt-test", prompt="say hi")
    assert text.choices[0].text == "fake says hi to upstream-model"
    emb = client.embeddings.create(model="gpt-test", input=["a", "b"])
    assert [d.index for d in emb.data] == [0, 1]


def test_models_list_and_paths_without_v1(router: RouterProcess) -> None:
    client = _client(router)
    assert [m.id for m in client.models.list()] == ["gpt-test"]
    bare = openai.OpenAI(base_url=router.base_url, api_key=MASTER_KEY, max_retries=0)
    reply = bare.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content


def test_master_key_is_required(router: RouterProcess) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        _client(router, key="sk-wrong").chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}]
        )
    assert "sk-wrong" not in str(info.value.body)
    with pytest.raises(openai.AuthenticationError):
        _client(router, key="sk-wrong").models.list()


def test_upstream_error_keeps_status_and_message(router: RouterProcess, fake_openai: FakeOpenAI) -> None:
    from tests.fakes.openai_upstream import Fault

    fake_openai.queue(
        Fault(
            status=400,
            body={
                "error": {
                    "message": "bad temperature thing",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            },
        )
    )
    with pytest.raises(openai.BadRequestError) as info:
        _client(router).chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}]
        )
    assert "bad temperature thing" in info.value.message


def test_upstream_bad_credentials_never_echo_the_key(
    fake_openai: FakeOpenAI, start_router: Callable[..., RouterProcess]
) -> None:
    router = start_router(
        {"deployments": [openai_deployment(fake_openai)]},
        env={"TEST_UPSTREAM_KEY": "sk-this-is-wrong-secret"},
    )
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=router.v1, api_key="x", max_retries=0).chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}]
        )
    assert "sk-this-is-wrong-secret" not in str(info.value.body)
    assert "sk-this-is-wrong-secret" not in router.logs()
