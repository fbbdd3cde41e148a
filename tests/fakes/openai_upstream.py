"""A fake OpenAI API that enforces the wire protocol of the official reference.

It rejects what api.openai.com rejects (missing bearer token, wrong content
type, missing ``model``/``messages``, unknown roles, ``stream_options`` without
``stream``), so a router that forwards a malformed request fails the test.
Faults can be queued to exercise retries and fallbacks.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.fakes import responses_wire
from tests.support.servers import FakeServer, ThreadedApp

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


@dataclass
class Fault:
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    hang: float = 0.0
    reset: bool = False
    #: For streams: send this many chunks, then cut the connection.
    drop_after: int | None = None
    chunk_delay: float = 0.0


FAULT = web.RequestKey("fault", Fault)


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float


def _error(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


class FakeOpenAI(FakeServer):
    def __init__(
        self,
        api_key: str = "sk-test-key-7Hq2Vw9Lx4",
        name: str = "fake",
        reply: str | None = None,
        chunks: int = 5,
    ) -> None:
        self.api_key = api_key
        self.name = name
        self.reply = reply
        self.chunks = chunks
        #: Like some OpenAI-compatible servers, leave usage out of responses and streams.
        self.report_usage = True
        self.seen: list[Seen] = []
        self.faults: list[Fault] = []
        self.always: Fault | None = None
        #: Requests whose client (the router) went away before the answer was complete.
        self.abandoned = 0
        #: Requests refused with 401 because they did not carry ``api_key`` (not in ``seen``).
        self.refused = 0
        #: Set to a list to give each chat answer its own id and record ``(id, usage)`` for every
        #: answer sent whole with its usage (the chaos tests reconcile the ledger against it).
        self.answered: list[tuple[str, dict[str, int]]] | None = None
        self._answers = itertools.count()
        self._lock = threading.Lock()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/responses", self._responses)
        self.server = ThreadedApp(app)

    @property
    def base_url(self) -> str:
        return self.server.base_url + "/v1"

    @property
    def calls(self) -> int:
        return len(self.seen)

    def _next_fault(self) -> Fault | None:
        with self._lock:
            if self.faults:
                return self.faults.pop(0)
            return self.always

    async def _common(self, request: web.Request) -> tuple[dict[str, Any] | None, web.StreamResponse | None]:
        auth = request.headers.get("Authorization", "")
        if auth != f"Bearer {self.api_key}":
            with self._lock:
                self.refused += 1
            return None, _error(
                401, "Incorrect API key provided.", "invalid_request_error", code="invalid_api_key"
            )
        if request.content_type != "application/json":
            return None, _error(400, "Content-Type must be application/json", "invalid_request_error")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return None, _error(
                400, "We could not parse the JSON body of your request.", "invalid_request_error"
            )
        if not isinstance(body, dict):
            return None, _error(400, "body must be an object", "invalid_request_error")
        self.seen.append(Seen(request.path, dict(request.headers), body, time.monotonic()))
        if not isinstance(body.get("model"), str):
            return None, _error(400, "you must provide a model parameter", "invalid_request_error", "model")
        if "stream_options" in body and not body.get("stream"):
            return None, _error(
                400,
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "invalid_request_error",
                "stream_options",
            )
        fault = self._next_fault()
        if fault is not None:
            if fault.hang:
                deadline = time.monotonic() + fault.hang
                while time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                    if request.transport is None or request.transport.is_closing():
                        self.abandoned += 1
                        return None, web.Response(status=499)
            if fault.reset:
                assert request.transport is not None
                request.transport.abort()
                return None, web.Response(status=500)
            if fault.status is not None:
                payload = fault.body or {
                    "error": {
                        "message": f"{self.name} injected {fault.status}",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                }
                return None, web.Response(
                    status=fault.status,
                    body=orjson.dumps(payload),
                    content_type="application/json",
                    headers=fault.headers,
                )
            request[FAULT] = fault
        return body, None

    def _text(self, body: dict[str, Any]) -> str:
        if self.reply is not None:
            return self.reply
        return f"{self.name} says hi to {body['model']}"

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, failure = await self._common(request)
        if failure is not None:
            return failure
        assert body is not None
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "'messages' is a required property", "invalid_request_error", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                return _error(
                    400,
                    f"Invalid value for 'messages[{i}].role'",
                    "invalid_request_error",
                    f"messages[{i}].role",
                )
        text = self._text(body)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) + 4 for m in messages)
        completion_tokens = len(text.split())
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        answer_id = "chatcmpl-fake"
        if self.answered is not None:
            answer_id = f"chatcmpl-{self.name}-{next(self._answers)}"
        if body.get("stream"):
            return await self._stream(request, body, text, usage, answer_id)
        if self.answered is not None and self.report_usage:
            self.answered.append((answer_id, usage))
        return web.json_response(
            {
                "id": answer_id,
                "object": "chat.completion",
                "created": 1,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                **({"usage": usage} if self.report_usage else {}),
            },
            dumps=lambda d: orjson.dumps(d).decode(),
        )

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        text: str,
        usage: dict[str, int],
        answer_id: str = "chatcmpl-fake",
    ) -> web.StreamResponse:
        fault: Fault | None = request.get(FAULT)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = {
            "id": answer_id,
            "object": "chat.completion.chunk",
            "created": 1,
            "model": body["model"],
        }
        words = text.split()
        per = max(1, len(words) // self.chunks)
        pieces = [" ".join(words[i : i + per]) for i in range(0, len(words), per)]
        events = [
            {
                **base,
                "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                ],
            }
        ]
        events += [
            {
                **base,
                "choices": [
                    {"index": 0, "delta": {"content": (" " if i else "") + p}, "finish_reason": None}
                ],
            }
            for i, p in enumerate(pieces)
        ]
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        options = body.get("stream_options") or {}
        if options.get("include_usage") and self.report_usage:
            events.append({**base, "choices": [], "usage": usage})
        for i, event in enumerate(events):
            if fault is not None and fault.drop_after is not None and i >= fault.drop_after:
                assert request.transport is not None
                request.transport.abort()
                return resp
            if fault is not None and fault.chunk_delay:
                await asyncio.sleep(fault.chunk_delay)
            try:
                await resp.write(b"data: " + orjson.dumps(event) + b"\n\n")
            except ConnectionError:
                self.abandoned += 1
                return resp
            if request.transport is None or request.transport.is_closing():
                self.abandoned += 1
                return resp
        if self.answered is not None and options.get("include_usage") and self.report_usage:
            self.answered.append((answer_id, usage))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body, failure = await self._common(request)
        if failure is not None:
            return failure
        assert body is not None
        if "prompt" not in body:
            return _error(400, "'prompt' is a required property", "invalid_request_error", "prompt")
        text = self._text(body)
        usage = {
            "prompt_tokens": 3,
            "completion_tokens": len(text.split()),
            "total_tokens": 3 + len(text.split()),
        }
        if body.get("stream"):
            return await self._stream_completion(request, body, text, usage)
        return web.json_response(
            {
                "id": "cmpl-fake",
                "object": "text_completion",
                "created": 1,
                "model": body["model"],
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
                "usage": usage,
            }
        )

    async def _stream_completion(
        self, request: web.Request, body: dict[str, Any], text: str, usage: dict[str, int]
    ) -> web.StreamResponse:
        """A streamed legacy completion: ``text_completion`` chunks, then ``data: [DONE]``."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = {"id": "cmpl-fake", "object": "text_completion", "created": 1, "model": body["model"]}
        words = text.split()
        events: list[dict[str, Any]] = [
            {
                **base,
                "choices": [
                    {"index": 0, "text": (" " if i else "") + w, "logprobs": None, "finish_reason": None}
                ],
            }
            for i, w in enumerate(words)
        ]
        events.append(
            {**base, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]}
        )
        if (body.get("stream_options") or {}).get("include_usage") and self.report_usage:
            events.append({**base, "choices": [], "usage": usage})
        for event in events:
            await resp.write(b"data: " + orjson.dumps(event) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body, failure = await self._common(request)
        if failure is not None:
            return failure
        assert body is not None
        if "input" not in body:
            return _error(400, "'input' is a required property", "invalid_request_error", "input")
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return web.json_response(
            {
                "object": "list",
                "model": body["model"],
                "data": [
                    {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                    for i in range(len(inputs))
                ],
                "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
            }
        )

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's Responses API; see :mod:`tests.fakes.responses_wire` for what it enforces."""
        body, failure = await self._common(request)
        if failure is not None:
            return failure
        assert body is not None
        try:
            responses_wire.validate_request(body)
        except responses_wire.ResponsesWireError as err:
            return web.json_response(err.body(), status=err.status)
        fault: Fault | None = request.get(FAULT)
        drop_after = fault.drop_after if fault is not None else None
        return await responses_wire.answer(request, body, self._text(body), drop_after=drop_after)
