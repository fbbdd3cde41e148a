"""A fake Anthropic Messages API that enforces the wire protocol of the official reference.

It rejects what api.anthropic.com rejects: a missing or wrong ``x-api-key``, no
``anthropic-version`` header, a missing ``model``/``max_tokens``, empty
``messages``, a first turn that is not ``user``, turns that do not alternate, a
``system`` role inside ``messages``, empty or whitespace-only text blocks,
``tool_result`` blocks outside user turns or without a matching ``tool_use`` in
the turn before (or after other content), ``tool_use`` blocks left unanswered,
unknown block types and unknown top-level fields (so a leaked OpenAI parameter
fails). :func:`validate_request` is the same check as a plain function.

Streams follow the documented event sequence with ``event:``/``data:`` framing:
``message_start``, per block ``content_block_start`` / ``content_block_delta`` /
``content_block_stop`` (a ``ping`` after the first start), ``message_delta``,
``message_stop``.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.support.servers import FakeServer, ThreadedApp

API_VERSION = "2023-06-01"
IMAGE_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
_TOOL_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
_TOP_LEVEL = {
    "model",
    "messages",
    "max_tokens",
    "system",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "stream",
    "metadata",
    "tools",
    "tool_choice",
    "output_config",
    "thinking",
    "service_tier",
}
_BLOCKS = {
    "user": {"text", "image", "document", "tool_result", "search_result"},
    "assistant": {"text", "tool_use", "thinking", "redacted_thinking"},
}


class WireError(Exception):
    """What the real API would answer instead of a message."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.status, self.kind = message, status, kind

    def response(self) -> web.Response:
        return error_response(self.status, self.kind, self.message)


def error_body(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_fake"}


def error_response(
    status: int, kind: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(error_body(kind, message)),
        content_type="application/json",
        headers=dict(headers or {}),
    )


def validate_headers(headers: Mapping[str, str], api_key: str) -> None:
    if headers.get("x-api-key") != api_key:
        raise WireError("invalid x-api-key", 401, "authentication_error")
    if not headers.get("anthropic-version"):
        raise WireError("anthropic-version: header is required")
    if not headers.get("content-type", "").startswith("application/json"):
        raise WireError("content-type: must be application/json")


def _number(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high
    ):
        raise WireError(f"{name}: Input should be a number from {low} to {high}")


def _text(block: dict[str, Any], where: str) -> None:
    text = block.get("text")
    if not isinstance(text, str):
        raise WireError(f"{where}.text: Field required")
    if not text.strip():
        raise WireError(f"{where}.text: text content blocks must contain non-whitespace text")


def _image(block: dict[str, Any], where: str) -> None:
    source = block.get("source")
    if not isinstance(source, dict):
        raise WireError(f"{where}.source: Field required")
    if source.get("type") == "base64":
        if source.get("media_type") not in IMAGE_TYPES:
            raise WireError(f"{where}.source.media_type: Input should be one of {sorted(IMAGE_TYPES)}")
        if not isinstance(source.get("data"), str) or not source["data"]:
            raise WireError(f"{where}.source.data: Field required")
    elif source.get("type") == "url":
        if not isinstance(source.get("url"), str) or not source["url"].startswith(("http://", "https://")):
            raise WireError(f"{where}.source.url: Input should be an http(s) URL")
    else:
        raise WireError(f"{where}.source.type: Input should be 'base64', 'url' or 'file'")


def _block(block: Any, role: str, where: str, previous_tool_ids: set[str]) -> None:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise WireError(f"{where}: Input should be an object with a 'type'")
    kind = block["type"]
    if kind not in _BLOCKS[role]:
        raise WireError(f"{where}.type: {kind!r} blocks are not allowed in {role} messages")
    if kind == "text":
        _text(block, where)
    elif kind == "image":
        _image(block, where)
    elif kind == "tool_use":
        if not isinstance(block.get("id"), str) or not _TOOL_ID.match(block["id"]):
            raise WireError(f"{where}.id: String should match pattern '^[a-zA-Z0-9_-]+$'")
        if not isinstance(block.get("name"), str) or not block["name"]:
            raise WireError(f"{where}.name: Field required")
        if not isinstance(block.get("input"), dict):
            raise WireError(f"{where}.input: Input should be a valid dictionary")
    elif kind == "tool_result":
        tool_id = block.get("tool_use_id")
        if tool_id not in previous_tool_ids:
            raise WireError(
                f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: {tool_id}. Each "
                "`tool_result` block must have a corresponding `tool_use` block in the previous message."
            )
        content = block.get("content")
        if isinstance(content, list):
            for k, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
                    raise WireError(f"{where}.content.{k}: tool results hold text and image blocks")
                (_text if part["type"] == "text" else _image)(part, f"{where}.content.{k}")
        elif content is not None and not isinstance(content, str):
            raise WireError(f"{where}.content: Input should be a string or a list of blocks")


def _messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise WireError("messages: Field required")
    if not messages:
        raise WireError("messages: at least one message is required")
    previous_role: str | None = None
    open_tool_ids: set[str] = set()
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            raise WireError(f"{where}: Input should be an object with only 'role' and 'content'")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise WireError(f"{where}.role: Input should be 'user' or 'assistant'")
        if i == 0 and role != "user":
            raise WireError('messages: first message must use the "user" role')
        if role == previous_role:
            raise WireError(
                f'messages: roles must alternate between "user" and "assistant", but found '
                f'multiple "{role}" roles in a row'
            )
        final_assistant = role == "assistant" and i == len(messages) - 1
        content = message.get("content")
        if isinstance(content, str):
            blocks: list[Any] = [{"type": "text", "text": content}] if content or not final_assistant else []
        elif isinstance(content, list):
            blocks = content
        else:
            raise WireError(f"{where}.content: Input should be a string or a list of blocks")
        if not blocks and not final_assistant:
            raise WireError(
                "messages: all messages must have non-empty content except for the optional "
                "final assistant message"
            )
        answered: set[str] = set()
        seen_other = False
        for j, block in enumerate(blocks):
            _block(block, role, f"{where}.content.{j}", open_tool_ids)
            if block["type"] == "tool_result":
                if seen_other:
                    raise WireError(
                        f"{where}.content.{j}: tool_result blocks must come before any other content"
                    )
                answered.add(block["tool_use_id"])
            else:
                seen_other = True
        if open_tool_ids - answered:
            raise WireError(
                f"messages.{i - 1}: `tool_use` ids were found without `tool_result` blocks immediately "
                f"after: {', '.join(sorted(open_tool_ids - answered))}. Each `tool_use` block must "
                "have a corresponding `tool_result` block in the next message."
            )
        open_tool_ids = {b["id"] for b in blocks if b["type"] == "tool_use"}
        if (
            final_assistant
            and blocks
            and blocks[-1]["type"] == "text"
            and blocks[-1]["text"] != blocks[-1]["text"].rstrip()
        ):
            raise WireError("messages: final assistant content cannot end with trailing whitespace")
        previous_role = role


def _tools(body: dict[str, Any]) -> set[str]:
    tools = body.get("tools")
    if tools is None:
        return set()
    if not isinstance(tools, list):
        raise WireError("tools: Input should be a valid list")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or set(tool) - {
            "name",
            "description",
            "input_schema",
            "strict",
            "cache_control",
            "type",
        }:
            raise WireError(f"tools.{i}: Extra inputs are not permitted")
        name = tool.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise WireError(f"tools.{i}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'")
        if name in names:
            raise WireError(f"tools: Tool names must be unique: {name}")
        names.add(name)
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise WireError(f"tools.{i}.input_schema.type: Input should be 'object'")
        if "description" in tool and not isinstance(tool["description"], str):
            raise WireError(f"tools.{i}.description: Input should be a valid string")
    return names


def _tool_choice(body: dict[str, Any], names: set[str]) -> None:
    choice = body.get("tool_choice")
    if choice is None:
        return
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise WireError("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
    if not names:
        raise WireError("tool_choice: may only be specified while providing tools")
    allowed = {"type", "disable_parallel_tool_use"} | ({"name"} if choice["type"] == "tool" else set())
    if choice["type"] == "none":
        allowed = {"type"}
    if set(choice) - allowed:
        raise WireError("tool_choice: Extra inputs are not permitted")
    if choice["type"] == "tool" and choice.get("name") not in names:
        raise WireError(f"tool_choice.name: no tool named {choice.get('name')!r}")


def validate_request(body: Any) -> None:
    """Raise :class:`WireError` where the real Messages API would reject ``body``."""
    if not isinstance(body, dict):
        raise WireError("body: Input should be an object")
    for name in sorted(set(body) - _TOP_LEVEL):
        raise WireError(f"{name}: Extra inputs are not permitted")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise WireError("model: Field required")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise WireError("max_tokens: Field required (an integer of at least 1)")
    _messages(body.get("messages"))
    system = body.get("system")
    if isinstance(system, list):
        for j, block in enumerate(system):
            if not isinstance(block, dict) or block.get("type") != "text":
                raise WireError(f"system.{j}.type: Input should be 'text'")
            _text(block, f"system.{j}")
    elif system is not None and not isinstance(system, str):
        raise WireError("system: Input should be a string or a list of text blocks")
    _number(body, "temperature", 0, 1)
    _number(body, "top_p", 0, 1)
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)):
        raise WireError("stop_sequences: Input should be a list of strings")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise WireError("stream: Input should be a valid boolean")
    metadata = body.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, dict)
        or set(metadata) - {"user_id"}
        or not isinstance(metadata.get("user_id", ""), str | None)
    ):
        raise WireError("metadata: only 'user_id' (a string) is permitted")
    _tool_choice(body, _tools(body))
    config = body.get("output_config")
    if config is not None:
        fmt = config.get("format") if isinstance(config, dict) else None
        if (
            not isinstance(config, dict)
            or set(config) - {"format", "effort"}
            or (
                fmt is not None
                and (
                    not isinstance(fmt, dict)
                    or fmt.get("type") != "json_schema"
                    or not isinstance(fmt.get("schema"), dict)
                )
            )
        ):
            raise WireError("output_config.format: Input should be {'type': 'json_schema', 'schema': {...}}")


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


def message_for(body: dict[str, Any], reply: Reply, usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": "msg_fake01",
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": reply.content,
        "stop_reason": reply.stop_reason,
        "stop_sequence": reply.stop_sequence,
        "usage": usage,
    }


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
        self.seen: list[Seen] = []
        self.faults: list[Fault] = []
        self.replies: list[Reply] = []
        self._lock = threading.Lock()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/messages", self._messages)
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
                "input": sample(tools[forced]["input_schema"]),
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

    def _usage(self, body: dict[str, Any], reply: Reply) -> dict[str, int]:
        prompt = orjson.dumps([body.get("system"), body["messages"]]).decode()
        output = sum(_words(b.get("text", "")) + (8 if b["type"] == "tool_use" else 0) for b in reply.content)
        return {
            "input_tokens": _words(prompt) + 3,
            "output_tokens": output or 1,
            "cache_creation_input_tokens": self.cache_creation,
            "cache_read_input_tokens": self.cache_read,
        }

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
        with self._lock:
            fault = self.faults.pop(0) if self.faults else None
            scripted = self.replies.pop(0) if self.replies else None
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
        reply = scripted or self.default_reply(body)
        message = message_for(body, reply, self._usage(body, reply))
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
