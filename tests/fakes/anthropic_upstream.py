"""A fake Anthropic Messages API that enforces the wire protocol of the official reference.

It rejects what api.anthropic.com rejects (:mod:`tests.fakes.anthropic_wire`): a missing or wrong
``x-api-key``, no ``anthropic-version`` header, a malformed ``anthropic-beta`` header, and every
body the real API refuses. It records each request's headers and body as received, so tests can
check that ``cache_control``, ``thinking``, ``top_k``, documents, server tools and betas arrived.

Prompt caching is simulated: a request with ``cache_control`` breakpoints writes its prefix (tools,
system, messages up to the last breakpoint) to the cache the first time, reporting those tokens
as ``cache_creation_input_tokens``, and reads it afterwards (``cache_read_input_tokens``);
``input_tokens`` counts the rest. With ``thinking`` enabled the answer starts with a ``thinking``
block (streamed as ``thinking_delta`` and ``signature_delta``). ``POST /v1/messages/count_tokens``
answers ``{"input_tokens": N}``, N being what a message with that input would report in all.

Streams follow the documented event sequence with ``event:``/``data:`` framing:
``message_start``, per block ``content_block_start`` / ``content_block_delta`` /
``content_block_stop`` (a ``ping`` after the first start), ``message_delta``,
``message_stop``.
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

from tests.fakes.anthropic_wire import (
    API_VERSION,
    IMAGE_TYPES,
    WireError,
    error_body,
    error_response,
    validate_count_request,
    validate_headers,
    validate_request,
)
from tests.support.servers import FakeServer, ThreadedApp

__all__ = [
    "API_VERSION",
    "IMAGE_TYPES",
    "FakeAnthropic",
    "Fault",
    "Reply",
    "WireError",
    "error_body",
    "error_response",
    "frame",
    "message_for",
    "stream_events",
    "validate_headers",
    "validate_request",
]
THINKING_TEXT = "The user greets me; a short friendly answer fits."
SIGNATURE = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"


def sample(schema: Any) -> Any:
    """A small value that fits a JSON schema, as a model would produce."""
    if not isinstance(schema, dict):
        return "fake"
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {k: sample(v) for k, v in props.items()} if props else {"answer": "fake"}
    if schema.get("enum"):
        return schema["enum"][0]
    return {"array": [], "integer": 1, "number": 1.5, "boolean": True, "null": None}.get(str(kind), "fake")


@dataclass
class Reply:
    """A scripted answer: content blocks as the API returns them."""

    content: list[dict[str, Any]]
    stop_reason: str = "end_turn"
    stop_sequence: str | None = None


@dataclass
class Fault:
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    hang: float = 0.0
    #: For streams: after the first delta, send an ``error`` event of this type and end.
    stream_error: str | None = None


@dataclass
class Seen:
    headers: dict[str, str]
    body: dict[str, Any]
    at: float


def _words(text: str) -> int:
    return len(text.split())


def message_for(
    body: dict[str, Any], reply: Reply, usage: dict[str, int], model: str | None = None
) -> dict[str, Any]:
    return {
        "id": "msg_fake01",
        "type": "message",
        "role": "assistant",
        "model": model or body["model"],
        "content": reply.content,
        "stop_reason": reply.stop_reason,
        "stop_sequence": reply.stop_sequence,
        "usage": usage,
    }


def thinks(body: dict[str, Any]) -> bool:
    thinking = body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")


def cache_prefix(body: dict[str, Any]) -> bytes | None:
    """The prompt up to its last cache_control breakpoint (tools, then system, then messages), or
    None without breakpoints: what the prompt cache stores and looks up."""
    segments: list[Any] = list(body.get("tools") or [])
    system = body.get("system")
    segments += system if isinstance(system, list) else [system]
    for message in body.get("messages") or []:
        content = message.get("content")
        segments += content if isinstance(content, list) else [content]
    marked = [i for i, seg in enumerate(segments) if isinstance(seg, dict) and seg.get("cache_control")]
    if not marked:
        return None
    return orjson.dumps(segments[: marked[-1] + 1])


def prompt_words(body: dict[str, Any]) -> int:
    """The fake's token count of a request's input (cache reads and writes included)."""
    return _words(orjson.dumps([body.get("system"), body["messages"]]).decode()) + 3


def stream_events(message: dict[str, Any], error: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The events Anthropic streams for ``message``, in order."""
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**message["usage"], "output_tokens": 1},
    }
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": start})
    ]
    for index, block in enumerate(message["content"]):
        first: dict[str, Any]
        if block["type"] == "text":
            first = {"type": "text", "text": ""}
            words = block["text"].split(" ")
            deltas = [{"type": "text_delta", "text": (" " if i else "") + w} for i, w in enumerate(words)]
        elif block["type"] == "thinking":
            first = {"type": "thinking", "thinking": ""}
            words = block["thinking"].split(" ")
            deltas = [
                {"type": "thinking_delta", "thinking": (" " if i else "") + w} for i, w in enumerate(words)
            ]
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
        else:
            first = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            raw = orjson.dumps(block["input"]).decode()
            cut = [0, len(raw) // 3, 2 * len(raw) // 3, len(raw)]
            deltas = [{"type": "input_json_delta", "partial_json": ""}]
            deltas += [
                {"type": "input_json_delta", "partial_json": raw[a:b]}
                for a, b in itertools.pairwise(cut)
                if b > a
            ]
        events.append(
            ("content_block_start", {"type": "content_block_start", "index": index, "content_block": first})
        )
        if index == 0:
            events.append(("ping", {"type": "ping"}))
        for n, delta in enumerate(deltas):
            events.append(
                ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
            )
            if error is not None and n == 0:
                events.append(("error", error_body(error, error.replace("_error", "").title())))
                return events
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    events.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]},
                "usage": {"output_tokens": message["usage"]["output_tokens"]},
            },
        )
    )
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def frame(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class FakeAnthropic(FakeServer):
    def __init__(
        self,
        api_key: str = "sk-ant-test",
        reply: str | None = None,
        cache_read: int = 0,
        cache_creation: int = 0,
    ) -> None:
        self.api_key = api_key
        self.reply = reply
        self.cache_read = cache_read
        self.cache_creation = cache_creation
        #: Prompt prefixes in the simulated prompt cache, by model.
        self.cached_prefixes: set[tuple[str, bytes]] = set()
        self.seen: list[Seen] = []
        #: count_tokens requests, as received.
        self.counted: list[Seen] = []
        self.faults: list[Fault] = []
        self.replies: list[Reply] = []
        self._lock = threading.Lock()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        self.server = ThreadedApp(app)

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self.replies.extend(replies)

    @property
    def last(self) -> dict[str, Any]:
        return self.seen[-1].body

    def default_reply(self, body: dict[str, Any]) -> Reply:
        tools = {t["name"]: t for t in body.get("tools") or []}
        choice = body.get("tool_choice") or {}
        forced = (
            choice.get("name")
            if choice.get("type") == "tool"
            else (next(iter(tools)) if choice.get("type") == "any" else None)
        )
        if forced is not None:
            block = {
                "type": "tool_use",
                "id": "toolu_fake01",
                "name": forced,
                "input": sample(tools[forced].get("input_schema")),
            }
            return Reply([block], "tool_use")
        fmt = (body.get("output_config") or {}).get("format")
        if fmt is not None:
            return Reply([{"type": "text", "text": orjson.dumps(sample(fmt["schema"])).decode()}])
        text = self.reply if self.reply is not None else f"claude says hi to {body['model']}"
        for stop in body.get("stop_sequences") or []:
            if stop in text:
                return Reply([{"type": "text", "text": text[: text.index(stop)]}], "stop_sequence", stop)
        words = text.split(" ")
        if len(words) > body["max_tokens"]:
            return Reply([{"type": "text", "text": " ".join(words[: body["max_tokens"]])}], "max_tokens")
        return Reply([{"type": "text", "text": text}])

    def _usage(self, body: dict[str, Any], reply: Reply, model: str) -> dict[str, int]:
        total = prompt_words(body)
        output = sum(
            _words(b.get("text", b.get("thinking", ""))) + (8 if b["type"] == "tool_use" else 0)
            for b in reply.content
        )
        written, read = self.cache_creation, self.cache_read
        prefix = cache_prefix(body) if not (written or read) else None
        if prefix is not None:
            size = min(_words(prefix.decode()), total - 1)
            with self._lock:
                hit = (model, prefix) in self.cached_prefixes
                self.cached_prefixes.add((model, prefix))
            read, written = (size, 0) if hit else (0, size)
            total -= size
        return {
            "input_tokens": total,
            "output_tokens": output or 1,
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": read,
        }

    def answer(self, body: dict[str, Any], model: str | None = None) -> tuple[Fault | None, dict[str, Any]]:
        """The fault to inject, and the message a validated ``body`` gets (``model`` when the URL
        names it, as on Bedrock and Vertex AI): shared with the fakes of Claude on those clouds."""
        with self._lock:
            fault = self.faults.pop(0) if self.faults else None
            scripted = self.replies.pop(0) if self.replies else None
        reply = scripted or self.default_reply(body)
        if thinks(body) and not any(b["type"] == "thinking" for b in reply.content):
            thought = {"type": "thinking", "thinking": THINKING_TEXT, "signature": SIGNATURE}
            reply = Reply([thought, *reply.content], reply.stop_reason, reply.stop_sequence)
        name = model or body["model"]
        return fault, message_for(body, reply, self._usage(body, reply, name), name)

    async def _count_tokens(self, request: web.Request) -> web.Response:
        try:
            validate_headers(request.headers, self.api_key)
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                raise WireError("There was an issue with your request body: it is not valid JSON") from None
            self.counted.append(Seen(dict(request.headers), body, time.monotonic()))
            validate_count_request(body)
        except WireError as err:
            return err.response()
        return web.json_response({"input_tokens": prompt_words(body)})

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        try:
            validate_headers(request.headers, self.api_key)
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                raise WireError("There was an issue with your request body: it is not valid JSON") from None
            self.seen.append(Seen(dict(request.headers), body, time.monotonic()))
            validate_request(body)
        except WireError as err:
            return err.response()
        fault, message = self.answer(body)
        if fault is not None and fault.hang:
            await asyncio.sleep(fault.hang)
        if fault is not None and fault.status is not None:
            payload = fault.body or error_body("api_error", f"injected {fault.status}")
            return web.Response(
                status=fault.status,
                body=orjson.dumps(payload),
                content_type="application/json",
                headers=fault.headers,
            )
        headers = {"request-id": "req_fake"}
        if not body.get("stream"):
            return web.Response(body=orjson.dumps(message), content_type="application/json", headers=headers)
        resp = web.StreamResponse(
            headers={
                **headers,
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            }
        )
        await resp.prepare(request)
        for event, data in stream_events(message, fault.stream_error if fault else None):
            await resp.write(frame(event, data))
        await resp.write_eof()
        return resp
