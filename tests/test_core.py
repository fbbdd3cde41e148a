"""The core in process: the dispatcher's typed results and the inbound APIs that render them.

No sockets and no router process: the upstream client is a fake implementing the
:class:`UpstreamClient` protocol, answering with what an OpenAI-compatible server would send.
This is the inner-loop tier (``pytest -m "not e2e"``, see docs/development.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.responses import Response, StreamingResponse

from kubellm.router.config._schema import RouterConfig
from kubellm.router.core._dispatch import Call, RequestOptions
from kubellm.router.core._outcome import Answer, Failure, Stream, StreamError
from kubellm.router.core._router import Router
from kubellm.router.core._services import build_services
from kubellm.router.core._state import build_state
from kubellm.router.inbound._anthropic import MessagesApi
from kubellm.router.providers import Operation, RequestContext, UpstreamRequest, UpstreamResponse
from kubellm.router.server._inbound import Inbound

KEY = "sk-Zq9xK2vLpW7mN4rT8bY3cH6"


@dataclass
class FakeResponse:
    status: int
    headers: Mapping[str, str]
    pieces: list[bytes]
    closed: bool = False

    async def read(self) -> bytes:
        return b"".join(self.pieces)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            await asyncio.sleep(0)
            yield piece

    def close(self) -> None:
        self.closed = True


Reply = Callable[[UpstreamRequest, dict[str, Any]], FakeResponse]


@dataclass
class FakeUpstream:
    """An OpenAI-compatible upstream: checks the request line and auth, answers from ``reply``."""

    reply: Reply
    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def send(self, request: UpstreamRequest, ctx: RequestContext) -> UpstreamResponse:
        assert request.method == "POST"
        assert request.headers.get("Authorization") == f"Bearer {KEY}"
        body = orjson.loads(request.body or b"{}")
        self.seen.append((request.url, body))
        return self.reply(request, body)


def completion(body: dict[str, Any], text: str = "hello") -> FakeResponse:
    doc = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }
    return FakeResponse(200, {"content-type": "application/json"}, [orjson.dumps(doc)])


def chunks(body: dict[str, Any], words: list[str], *, done: bool = True) -> FakeResponse:
    events = []
    for i, word in enumerate(words):
        delta: dict[str, Any] = {"content": word} if i else {"role": "assistant", "content": word}
        doc = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": body["model"],
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        }
        events.append(b"data: " + orjson.dumps(doc) + b"\n\n")
    final = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": body["model"],
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": len(words), "total_tokens": 5 + len(words)},
    }
    events.append(b"data: " + orjson.dumps(final) + b"\n\n")
    if done:
        events.append(b"data: [DONE]\n\n")
    # Split across event boundaries, as a network would.
    raw = b"".join(events)
    return FakeResponse(
        200, {"content-type": "text/event-stream"}, [raw[i : i + 37] for i in range(0, len(raw), 37)]
    )


class BodyInbound(Inbound):
    def __init__(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.headers = {"content-type": "application/json", **(headers or {})}
        self._body = orjson.dumps(body)

    async def read(self, limit: int) -> bytes:
        return self._body

    def cancel_on_disconnect(self, task: asyncio.Task[object]) -> Callable[[], None]:
        return lambda: None


def make_router(tmp_path: Path, reply: Reply, deployments: int = 1) -> tuple[Router, FakeUpstream]:
    config = RouterConfig.model_validate(
        {
            "deployments": [
                {
                    "name": f"dep-{i}",
                    "model": "gpt-core",
                    "provider": "openai-compatible",
                    "upstreamModel": f"upstream-{i}",
                    "baseUrl": f"http://upstream-{i}.invalid/v1",
                    "apiKey": KEY,
                }
                for i in range(deployments)
            ],
            "settings": {"stateDir": str(tmp_path), "initialBackoffSeconds": 0.001, "accessLog": False},
        }
    )
    upstream = FakeUpstream(reply)
    state = build_state(config)
    return Router(state, build_services(state.config.settings, upstream_client=upstream)), upstream


async def body_of(response: Response) -> bytes:
    if isinstance(response, StreamingResponse):
        return b"".join(
            [p if isinstance(p, bytes) else str(p).encode() async for p in response.body_iterator]
        )
    return bytes(response.body)


def core_call(
    router: Router, body: dict[str, Any], *, stream: bool = False, operation: Operation = Operation.CHAT
) -> Call:
    """A request as the server layer hands it to the dispatcher."""
    state = router.state
    now = time.monotonic()
    return Call(
        request_id=f"req-{id(body):x}",
        operation=operation,
        body=body,
        stream=stream,
        include_usage=False,
        group=state.groups["gpt-core"],
        caller_label="master",
        key=None,
        options=RequestOptions(),
        state=state,
        started=now,
        deadline=now + 60,
    )


def chat(stream: bool = False) -> dict[str, Any]:
    return {"model": "gpt-core", "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def test_a_chat_answer_is_an_answer_rendered_as_the_upstream_sent_it(tmp_path: Path) -> None:
    router, upstream = make_router(tmp_path, lambda req, body: completion(body))

    async def main() -> Response:
        return await router.handle(Operation.CHAT, BodyInbound(chat()))

    response = asyncio.run(main())
    doc = orjson.loads(response.body)
    assert response.status_code == 200
    assert doc["choices"][0]["message"]["content"] == "hello"
    assert response.headers["x-kubellm-deployment"] == "dep-0"
    url, sent = upstream.seen[0]
    assert url == "http://upstream-0.invalid/v1/chat/completions"
    assert sent["model"] == "upstream-0"


def test_the_dispatcher_returns_typed_results(tmp_path: Path) -> None:
    calls = iter([FakeResponse(500, {}, [b'{"error": {"message": "boom"}}'])])

    def reply(req: UpstreamRequest, body: dict[str, Any]) -> FakeResponse:
        return next(calls, None) or completion(body, "second")

    router, upstream = make_router(tmp_path, reply, deployments=2)

    async def main() -> None:
        first = await router.dispatcher.run(core_call(router, chat()))
        assert isinstance(first, Answer)
        assert first.wire is Operation.CHAT
        assert first.usage is not None and first.usage.total_tokens == 7
        assert first.doc()["choices"][0]["message"]["content"] == "second"
        assert first.headers["x-kubellm-attempts"] == "2"  # the 500 was retried elsewhere

    asyncio.run(main())
    assert len(upstream.seen) == 2


def test_a_failure_is_a_failure_with_the_router_error(tmp_path: Path) -> None:
    router, _ = make_router(
        tmp_path, lambda req, body: FakeResponse(400, {}, [b'{"error": {"message": "no"}}'])
    )

    async def main() -> Response:
        return await router.handle(Operation.CHAT, BodyInbound(chat()))

    response = asyncio.run(main())
    assert response.status_code == 400
    assert orjson.loads(response.body)["error"]["type"] == "invalid_request_error"


def test_a_stream_renders_its_chunks_then_done(tmp_path: Path) -> None:
    router, _ = make_router(tmp_path, lambda req, body: chunks(body, ["a", "b", "c"]))

    async def main() -> bytes:
        return await body_of(await router.handle(Operation.CHAT, BodyInbound(chat(stream=True))))

    text = asyncio.run(main())
    events = [e for e in text.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    words = [orjson.loads(e[6:])["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert "".join(w for w in words if w) == "abc"


def test_a_truncated_stream_ends_with_an_error_and_no_done(tmp_path: Path) -> None:
    router, _ = make_router(tmp_path, lambda req, body: chunks(body, ["a", "b"], done=False))

    async def main() -> tuple[Stream, list[Any]]:
        outcome = await router.dispatcher.run(core_call(router, chat(stream=True), stream=True))
        assert isinstance(outcome, Stream)
        return outcome, [item async for item in outcome.events]

    _, items = asyncio.run(main())
    assert isinstance(items[-1], StreamError)
    assert items[-1].error.code == "upstream_stream_truncated"
    assert all(isinstance(i, list) for i in items[:-1])


def test_messages_over_a_chat_deployment_is_translated_both_ways(tmp_path: Path) -> None:
    router, upstream = make_router(tmp_path, lambda req, body: completion(body, "bonjour"))
    body = {"model": "gpt-core", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}

    async def main() -> Response:
        return await router.serve(MessagesApi(), BodyInbound(body))

    response = asyncio.run(main())
    doc = orjson.loads(response.body)
    assert doc["type"] == "message"
    assert doc["content"] == [{"type": "text", "text": "bonjour"}]
    assert doc["usage"]["input_tokens"] == 5
    assert upstream.seen[0][1]["messages"] == [{"role": "user", "content": "hi"}]


def test_messages_errors_take_anthropic_shape_before_any_upstream_call(tmp_path: Path) -> None:
    router, upstream = make_router(tmp_path, lambda req, body: completion(body))
    body = {"model": "gpt-core", "messages": [{"role": "user", "content": "hi"}]}  # no max_tokens

    async def main() -> Response:
        return await router.serve(MessagesApi(), BodyInbound(body))

    response = asyncio.run(main())
    assert response.status_code == 400
    doc = orjson.loads(response.body)
    assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in doc["error"]["message"]
    assert upstream.seen == []


@pytest.mark.parametrize("stream", [False, True])
def test_no_deployment_for_an_operation_is_a_400_failure(tmp_path: Path, stream: bool) -> None:
    router, _ = make_router(tmp_path, lambda req, body: completion(body))
    # A translated operation, but this call offers no chat form: no deployment can take it.
    c = core_call(router, {"model": "gpt-core"}, stream=stream, operation=Operation.RESPONSES)
    outcome = asyncio.run(router.dispatcher.run(c))
    assert isinstance(outcome, Failure)
    assert outcome.status == 400 and outcome.error.param == "model"
