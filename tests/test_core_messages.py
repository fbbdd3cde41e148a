"""The native Messages path through the core, in process (no sockets, no router process).

``/v1/messages`` to an Anthropic deployment: the client's ``anthropic-beta`` reaches the provider
(``MessagesApi.forward_headers`` -> ``Call.forward_headers`` -> ``RequestContext.client_headers``),
the answer and the stream are rendered exactly as the upstream sent them, the response cache keys
on the betas too, and ``/v1/messages/count_tokens`` is counted upstream or estimated.
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from starlette.responses import Response

from kubellm.router.config._schema import RouterConfig
from kubellm.router.core._router import Router
from kubellm.router.core._services import build_services
from kubellm.router.core._state import build_state
from kubellm.router.inbound._anthropic import MessagesApi
from kubellm.router.inbound._count_tokens import estimate_input_tokens, handle_count_tokens
from kubellm.router.providers import RequestContext, UpstreamRequest, UpstreamResponse
from tests.fakes.anthropic_upstream import Reply, frame, message_for, stream_events
from tests.test_core import BodyInbound, FakeResponse, body_of, completion

KEY = "sk-ant-core-0123456789"
USAGE = {
    "input_tokens": 7,
    "output_tokens": 3,
    "cache_creation_input_tokens": 11,
    "cache_read_input_tokens": 0,
}


@dataclass
class FakeClaude:
    """Answers Messages and count_tokens requests as api.anthropic.com would."""

    seen: list[tuple[str, dict[str, str], dict[str, Any]]] = field(default_factory=list)

    async def send(self, request: UpstreamRequest, ctx: RequestContext) -> UpstreamResponse:
        if request.url.endswith("/chat/completions"):  # the OpenAI-compatible deployment of a mixed group
            self.seen.append((request.url, request.headers, orjson.loads(request.body or b"{}")))
            return completion(orjson.loads(request.body or b"{}"))
        assert request.headers["x-api-key"] == KEY and request.headers["anthropic-version"]
        body = orjson.loads(request.body or b"{}")
        self.seen.append((request.url, request.headers, body))
        if request.url.endswith("/count_tokens"):
            return FakeResponse(200, {}, [b'{"input_tokens": 42}'])
        message = message_for(body, Reply([{"type": "text", "text": "hi there"}]), USAGE)
        if not body.get("stream"):
            return FakeResponse(200, {"content-type": "application/json"}, [orjson.dumps(message)])
        raw = b"".join(frame(n, d) for n, d in stream_events(message))
        return FakeResponse(200, {}, [raw[i : i + 29] for i in range(0, len(raw), 29)])


def make_router(
    tmp_path: Path, provider: str = "anthropic", cache: bool = False
) -> tuple[Router, FakeClaude]:
    config = RouterConfig.model_validate(
        {
            "deployments": [
                {
                    "name": "claude-0",
                    "model": "claude",
                    "provider": provider,
                    "upstreamModel": "claude-sonnet-4-20250514",
                    "baseUrl": "http://anthropic.invalid",
                    "apiKey": KEY,
                    "cache": cache,
                }
            ],
            "settings": {"stateDir": str(tmp_path), "accessLog": False},
        }
    )
    upstream = FakeClaude()
    state = build_state(config)
    return Router(state, build_services(state.config.settings, upstream_client=upstream)), upstream


def _body(stream: bool = False) -> dict[str, Any]:
    return {
        "model": "claude",
        "max_tokens": 50,
        "top_k": 3,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}],
            }
        ],
        **({"stream": True} if stream else {}),
    }


def _serve(router: Router, body: dict[str, Any], beta: str | None = "b-1") -> tuple[Response, bytes]:
    """The response and its body, read on the loop that served it (a stream's upstream generator
    belongs to that loop)."""
    headers = {"anthropic-beta": beta} if beta else {}

    async def main() -> tuple[Response, bytes]:
        response = await router.serve(MessagesApi(), BodyInbound(body, headers))
        return response, await body_of(response)

    return asyncio.run(main())


def test_the_beta_header_and_the_body_reach_the_provider_and_the_answer_comes_back_as_sent(
    tmp_path: Path,
) -> None:
    router, upstream = make_router(tmp_path)
    _, raw = _serve(router, _body())
    url, headers, sent = upstream.seen[-1]
    assert url == "http://anthropic.invalid/v1/messages"
    assert headers["anthropic-beta"] == "b-1"
    assert sent == {**_body(), "model": "claude-sonnet-4-20250514"}
    doc = orjson.loads(raw)
    assert doc["usage"] == USAGE and doc["content"] == [{"type": "text", "text": "hi there"}]


def test_a_stream_is_rendered_event_for_event(tmp_path: Path) -> None:
    router, upstream = make_router(tmp_path)
    _, raw = _serve(router, _body(stream=True))
    message = message_for(
        {**_body(), "model": "claude-sonnet-4-20250514"}, Reply([{"type": "text", "text": "hi there"}]), USAGE
    )
    assert raw == b"".join(frame(n, d) for n, d in stream_events(message))
    assert upstream.seen[-1][2]["stream"] is True


def test_the_cache_keys_on_the_betas(tmp_path: Path) -> None:
    router, upstream = make_router(tmp_path, cache=True)
    first, _ = _serve(router, _body(), "b-1")
    again, _ = _serve(router, _body(), "b-1")
    other, _ = _serve(router, _body(), "b-2")
    assert first.headers["x-kubellm-cache"] == "miss" and again.headers["x-kubellm-cache"] == "hit"
    assert other.headers["x-kubellm-cache"] == "miss"
    assert [h["anthropic-beta"] for _, h, _ in upstream.seen] == ["b-1", "b-2"]


def test_count_tokens_upstream_and_estimated(tmp_path: Path) -> None:
    body = {"model": "claude", "messages": [{"role": "user", "content": "How many tokens is this?"}]}
    router, upstream = make_router(tmp_path)
    counted = asyncio.run(handle_count_tokens(router, BodyInbound(body, {"anthropic-beta": "b-1"})))
    assert orjson.loads(counted.body) == {"input_tokens": 42}
    assert counted.headers["x-kubellm-token-count"] == "upstream"
    url, headers, sent = upstream.seen[-1]
    assert url.endswith("/v1/messages/count_tokens") and headers["anthropic-beta"] == "b-1"
    assert sent == {**body, "model": "claude-sonnet-4-20250514"}

    other, _ = make_router(tmp_path, provider="openai-compatible")
    estimated = asyncio.run(handle_count_tokens(other, BodyInbound(body)))
    assert orjson.loads(estimated.body) == {"input_tokens": estimate_input_tokens(body)}
    assert estimated.headers["x-kubellm-token-count"] == "estimate"
    bad = asyncio.run(handle_count_tokens(other, BodyInbound({"model": "claude", "messages": "x"})))
    assert bad.status_code == 400 and orjson.loads(bad.body)["type"] == "error"


def _mixed_router(tmp_path: Path) -> tuple[Router, FakeClaude]:
    """One Anthropic and one OpenAI-compatible deployment of the same group, same priority."""
    claude = {"provider": "anthropic", "upstreamModel": "claude-sonnet-4-20250514", "apiKey": KEY}
    gpt = {"provider": "openai-compatible", "upstreamModel": "gpt-x", "apiKey": KEY}
    config = RouterConfig.model_validate(
        {
            "deployments": [
                {"name": "claude-0", "model": "claude", "baseUrl": "http://anthropic.invalid", **claude},
                {"name": "gpt-0", "model": "claude", "baseUrl": "http://openai.invalid/v1", **gpt},
            ],
            "settings": {"stateDir": str(tmp_path), "accessLog": False, "numRetries": 0},
        }
    )
    upstream = FakeClaude()
    state = build_state(config)
    return Router(state, build_services(state.config.settings, upstream_client=upstream)), upstream


def test_a_request_only_the_native_dialect_can_carry_goes_to_the_native_deployment(tmp_path: Path) -> None:
    """A document has no chat form: the OpenAI deployment cannot take it, the Anthropic one always does."""
    router, upstream = _mixed_router(tmp_path)
    body = _body()
    body["messages"][0]["content"].insert(
        0, {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "A memo."}}
    )
    responses = [_serve(router, copy.deepcopy(body))[0] for _ in range(12)]
    assert [r.status_code for r in responses] == [200] * 12
    assert {r.headers["x-kubellm-deployment"] for r in responses} == {"claude-0"}
    assert [url for url, _, _ in upstream.seen] == ["http://anthropic.invalid/v1/messages"] * 12
    # A request both can carry still goes to either.
    chosen = {_serve(router, _body())[0].headers["x-kubellm-deployment"] for _ in range(24)}
    assert chosen == {"claude-0", "gpt-0"}
