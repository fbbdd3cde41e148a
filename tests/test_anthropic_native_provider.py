"""The anthropic provider speaking Messages natively (in process, and over loopback to the fake).

The request passes through: only the model, the router's key and version and the betas are the
router's. The answer passes through byte for byte; streams pass through event by event, whatever
the byte boundaries, with usage (cache reads and writes included) read on the way.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from kubellm.router.config._schema import DeploymentConfig
from kubellm.router.providers import Event, Operation, RequestContext
from kubellm.router.providers.anthropic import AnthropicProvider
from kubellm.router.upstream._pool import UpstreamPool
from tests.fakes.anthropic_upstream import (
    SIGNATURE,
    FakeAnthropic,
    Reply,
    WireError,
    frame,
    message_for,
    prompt_words,
    stream_events,
    validate_count_request,
    validate_request,
)

KEY = "sk-ant-native-key"
PDF = "JVBERi0xLjQKJcOkw7zDtsOfCjIgMCBvYmoKPDwvTGVuZ3RoIDMgMCBSPj4Kc3RyZWFtCg=="
EPHEMERAL = {"type": "ephemeral"}

#: What Claude Code style clients send: cached system and tools, a cached PDF, thinking, a server tool.
THINKING_BODY: dict[str, Any] = {
    "model": "claude",
    "max_tokens": 4096,
    "system": [
        {"type": "text", "text": "You are a careful assistant."},
        {"type": "text", "text": "Long project instructions go here.", "cache_control": EPHEMERAL},
    ],
    "messages": [
        {
            "role": "user",
            "content": [
                {
                    "type": "document",
                    "source": {"type": "base64", "media_type": "application/pdf", "data": PDF},
                    "title": "spec.pdf",
                    "citations": {"enabled": True},
                    "cache_control": {"type": "ephemeral", "ttl": "1h"},
                },
                {"type": "text", "text": "Summarise the spec in one line."},
            ],
        }
    ],
    "thinking": {"type": "enabled", "budget_tokens": 2048},
    "tools": [
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 2},
        {
            "name": "lookup",
            "description": "Look a term up.",
            "input_schema": {"type": "object", "properties": {"term": {"type": "string"}}},
            "cache_control": EPHEMERAL,
        },
    ],
    "metadata": {"user_id": "u-1"},
    "service_tier": "auto",
}
TOP_K_BODY: dict[str, Any] = {
    "model": "claude",
    "max_tokens": 64,
    "top_k": 5,
    "temperature": 0.2,
    "stop_sequences": ["END"],
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Say hi.", "cache_control": EPHEMERAL}]}
    ],
}


def ctx(
    operation: Operation = Operation.MESSAGES,
    *,
    stream: bool = False,
    beta: str | None = "files-api-2025-04-14, interleaved-thinking-2025-05-14",
    base_url: str | None = None,
    headers: dict[str, str] | None = None,
) -> RequestContext:
    dep = DeploymentConfig(
        name="claude-1",
        model="claude",
        provider="anthropic",
        upstream_model="claude-sonnet-4-20250514",
        base_url=base_url,
        headers=headers or {},
    )
    return RequestContext(
        "req1",
        operation,
        "claude",
        dep,
        stream,
        stream,
        created=1,
        api_key=KEY,
        client_headers={"anthropic-beta": beta} if beta else {},
    )


def test_anthropic_speaks_messages_natively() -> None:
    provider = AnthropicProvider()
    assert provider.speaks(Operation.MESSAGES, ctx().deployment)
    assert provider.speaks(Operation.CHAT, ctx().deployment)


@pytest.mark.parametrize("body", [THINKING_BODY, TOP_K_BODY], ids=["thinking", "top_k"])
@pytest.mark.parametrize("stream", [False, True])
def test_the_body_passes_through_with_the_deployments_model(body: dict[str, Any], stream: bool) -> None:
    sent = {**copy.deepcopy(body), **({"stream": True} if stream else {})}
    request = AnthropicProvider().build_request(sent, ctx(stream=stream))
    upstream = orjson.loads(request.body or b"")
    assert upstream == {**sent, "model": "claude-sonnet-4-20250514"}
    validate_request(upstream)  # and Anthropic would take it
    assert request.url == "https://api.anthropic.com/v1/messages"
    assert request.headers["x-api-key"] == KEY
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert request.headers["anthropic-beta"] == "files-api-2025-04-14,interleaved-thinking-2025-05-14"


def test_betas_join_the_deployments_own_and_the_client_cannot_override_the_key() -> None:
    context = ctx(beta="files-api-2025-04-14", headers={"Anthropic-Beta": "context-1m-2025-08-07"})
    request = AnthropicProvider().build_request(dict(TOP_K_BODY), context)
    assert request.headers["anthropic-beta"] == "context-1m-2025-08-07,files-api-2025-04-14"
    assert "Anthropic-Beta" not in request.headers
    assert request.headers["x-api-key"] == KEY
    no_beta = AnthropicProvider().build_request(dict(TOP_K_BODY), ctx(beta=None))
    assert "anthropic-beta" not in no_beta.headers


def test_a_stream_flag_the_core_did_not_choose_is_corrected() -> None:
    request = AnthropicProvider().build_request({**TOP_K_BODY, "stream": True}, ctx(stream=False))
    assert orjson.loads(request.body or b"")["stream"] is False


def _thinking_message(usage: dict[str, int]) -> dict[str, Any]:
    reply = Reply(
        [
            {"type": "thinking", "thinking": "Let me read the spec first.", "signature": SIGNATURE},
            {"type": "text", "text": "The spec defines a tiny PDF."},
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "x"}},
        ]
    )
    return message_for({"model": "claude-sonnet-4-20250514"}, reply, usage)


USAGE = {
    "input_tokens": 9,
    "output_tokens": 30,
    "cache_creation_input_tokens": 200,
    "cache_read_input_tokens": 1000,
}


def test_the_answer_passes_through_byte_for_byte_with_cache_usage() -> None:
    raw = orjson.dumps(_thinking_message(USAGE))
    parsed = AnthropicProvider().parse_response(raw, ctx())
    assert parsed.body is raw
    assert parsed.usage is not None
    assert (parsed.usage.prompt_tokens, parsed.usage.completion_tokens) == (1209, 30)
    assert (parsed.usage.cached_tokens, parsed.usage.cache_write_tokens) == (1000, 200)


def _stream_bytes(message: dict[str, Any], error: str | None = None) -> tuple[bytes, list[tuple[str, Any]]]:
    events = stream_events(message, error)
    # CRLF line ends in places: the decoder must take either.
    return b"".join(frame(n, d) for n, d in events).replace(b"\n", b"\r\n", 3), events


def _run(pieces: list[bytes], stream: bool = True) -> tuple[list[Any], Any]:
    translator = AnthropicProvider().stream_translator(ctx(stream=stream))
    out = [p for piece in pieces for p in translator.feed(piece)] + translator.finish()
    return out, translator


def test_the_stream_passes_through_event_by_event_at_any_byte_boundary() -> None:
    raw, events = _stream_bytes(_thinking_message(USAGE))
    whole, translator = _run([raw])
    assert translator.complete and translator.error is None
    assert all(isinstance(p, Event) for p in whole)
    # Every upstream event, thinking and signature deltas included, in order and unchanged.
    assert [(p.name, orjson.loads(p.data)) for p in whole] == events
    assert {d["delta"]["type"] for n, d in events if n == "content_block_delta"} >= {
        "thinking_delta",
        "signature_delta",
    }
    usage = translator.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.cache_write_tokens) == (
        1209,
        30,
        1000,
        200,
    )
    assert _run([raw[i : i + 1] for i in range(len(raw))])[0] == whole
    for cut in range(1, len(raw), 7):
        assert _run([raw[:cut], raw[cut:]])[0] == whole


def test_an_error_event_becomes_the_streams_error_and_is_not_passed_on() -> None:
    raw, _ = _stream_bytes(_thinking_message(USAGE), error="overloaded_error")
    out, translator = _run([raw])
    assert translator.error is not None and translator.error.status == 503
    assert all(p.name != "error" for p in out)
    assert not translator.complete


def test_a_stream_cut_before_message_stop_is_an_error_with_its_usage_kept() -> None:
    events = stream_events(_thinking_message(USAGE))[:-1]  # message_delta arrived, message_stop did not
    _, translator = _run([b"".join(frame(n, d) for n, d in events)])
    assert translator.error is not None and "message stop" in translator.error.message
    assert translator.usage is not None and translator.usage.cache_write_tokens == 200


# --- over loopback, against the fake ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(api_key=KEY) as server:
        yield server


def _exchange(fake: FakeAnthropic, body: dict[str, Any], stream: bool) -> tuple[int, list[Any], Any]:
    provider = AnthropicProvider()
    context = ctx(stream=stream, base_url=fake.base_url)

    async def go() -> tuple[int, list[Any], Any]:
        pool = UpstreamPool()
        try:
            resp = await pool.send(provider.build_request(body, context), context)
            if not stream:
                raw = await resp.read()
                return resp.status, [raw], provider.parse_response(raw, context).usage
            translator = provider.stream_translator(context)
            out = [p async for chunk in resp.iter_chunks() for p in translator.feed(chunk)]
            out += translator.finish()
            assert translator.error is None
            return resp.status, out, translator.usage
        finally:
            await pool.stop()

    return asyncio.run(go())


@pytest.mark.parametrize("stream", [False, True])
def test_the_fake_gets_exactly_what_the_client_sent(fake: FakeAnthropic, stream: bool) -> None:
    body = {**copy.deepcopy(THINKING_BODY), **({"stream": True} if stream else {})}
    status, out, usage = _exchange(fake, body, stream)
    assert status == 200
    seen = fake.seen[-1]
    assert seen.body == {**body, "model": "claude-sonnet-4-20250514"}
    assert seen.headers["anthropic-beta"] == "files-api-2025-04-14,interleaved-thinking-2025-05-14"
    if stream:
        assert out[0].name == "message_start" and out[-1].name == "message_stop"
        assert any(b'"thinking_delta"' in p.data for p in out)
    else:
        assert orjson.loads(out[0])["content"][0]["type"] == "thinking"
    assert usage is not None and usage.prompt_tokens == prompt_words(body)


def test_prompt_cache_writes_then_reads(fake: FakeAnthropic) -> None:
    body = copy.deepcopy(TOP_K_BODY)
    body["messages"][0]["content"][0]["text"] = "A prompt no other test caches."
    _, _, first = _exchange(fake, body, False)
    _, _, second = _exchange(fake, {**body, "stream": True}, True)
    assert first.cache_write_tokens > 0 and first.cached_tokens == 0
    assert second.cached_tokens == first.cache_write_tokens and second.cache_write_tokens == 0
    assert first.prompt_tokens == second.prompt_tokens


def test_count_tokens_is_forwarded(fake: FakeAnthropic) -> None:
    body = {k: v for k, v in THINKING_BODY.items() if k not in ("max_tokens", "metadata", "service_tier")}
    context = ctx(base_url=fake.base_url + "/v1")  # a baseUrl ending in /v1 works too

    async def go() -> int | None:
        pool = UpstreamPool()
        try:
            return await AnthropicProvider().count_tokens(pool, body, context)
        finally:
            await pool.stop()

    assert asyncio.run(go()) == prompt_words(body)
    seen = fake.counted[-1]
    assert seen.body == {**body, "model": "claude-sonnet-4-20250514"}
    assert seen.headers["x-api-key"] == KEY and seen.headers["anthropic-version"]


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 100}}, "1024"),
        ({"thinking": {"type": "enabled", "budget_tokens": 5000}}, "greater than `thinking.budget_tokens`"),
        ({"top_k": 3}, "top_k"),
        ({"tools": [{"type": "web_search_20250305", "name": "search"}]}, "web_search"),
        ({"tools": [{"type": "teleport_20250101", "name": "teleport"}]}, "unknown tool type"),
        ({"system": [{"type": "text", "text": "x", "cache_control": {"type": "forever"}}]}, "ephemeral"),
        (
            {"system": [{"type": "text", "text": str(i), "cache_control": EPHEMERAL} for i in range(4)]},
            "maximum of 4",
        ),
    ],
)
def test_the_fake_rejects_malformed_native_fields(change: dict[str, Any], complaint: str) -> None:
    with pytest.raises(WireError) as info:
        validate_request({**THINKING_BODY, **change})
    assert complaint in info.value.message


def test_the_fake_rejects_a_bad_document_and_a_count_with_max_tokens() -> None:
    body = copy.deepcopy(THINKING_BODY)
    body["messages"][0]["content"][0]["source"]["media_type"] = "image/png"
    with pytest.raises(WireError, match="application/pdf"):
        validate_request(body)
    with pytest.raises(WireError, match="max_tokens"):
        validate_count_request(
            {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
        )
