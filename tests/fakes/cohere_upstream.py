"""A fake Cohere v2 API (``/v2/chat``, ``/v2/embed``) that enforces the documented wire protocol.

It rejects what api.cohere.com rejects: a missing or wrong ``Authorization: Bearer`` key
(401 ``invalid api token``), unknown top-level fields (so a leaked OpenAI parameter such as
``top_p``, ``stop`` or ``n`` fails), roles other than system/user/assistant/tool, assistant turns
with neither content nor tool calls, ``tool_plan`` without tool calls, tool-call arguments that are
not JSON strings, tool results whose ``tool_call_id`` answers no earlier call, ``p`` outside
0.01..0.99, more than 5 ``stop_sequences``, ``tool_choice`` other than REQUIRED/NONE, a
``response_format`` other than text/json_object (with an object ``json_schema``), and embed calls
without ``input_type`` or ``embedding_types``. Errors are ``{"id", "message"}``.
:func:`validate_chat` and :func:`validate_embed` are the same checks as plain functions.

Streams use the documented v2 events with ``event:``/``data:`` framing (``message-start``,
``content-start``/``-delta``/``-end``, ``tool-plan-delta``, ``tool-call-start``/``-delta``/``-end``,
``message-end`` with ``finish_reason`` and usage), then ``data: [DONE]``. A prompt longer than
``max_prompt_chars`` is ``too many tokens``; one containing :data:`BLOCKED` is refused as a
usage-policy violation.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.fakes import surface_wire
from tests.fakes.azure_upstream import embedding_vector, sample
from tests.support.servers import FakeServer, ThreadedApp

BLOCKED = "something forbidden"
CHAT_FIELDS = frozenset({
    "model", "messages", "tools", "strict_tools", "documents", "citation_options", "response_format",
    "safety_mode", "max_tokens", "stop_sequences", "temperature", "seed", "frequency_penalty",
    "presence_penalty",
    "k", "p", "logprobs", "tool_choice", "thinking", "stream", "priority",
})  # fmt: skip
EMBED_FIELDS = frozenset(
    {
        "model",
        "texts",
        "images",
        "inputs",
        "input_type",
        "embedding_types",
        "output_dimension",
        "truncate",
        "max_tokens",
    }
)
INPUT_TYPES = {"search_document", "search_query", "classification", "clustering", "image"}
_IMAGE_URL = re.compile(r"^(https?://\S+|data:image/(png|jpeg|webp|gif);base64,[A-Za-z0-9+/=]+)$")


class WireError(Exception):
    def __init__(self, message: str, status: int = 400, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.headers = message, status, dict(headers or {})

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            content_type="application/json",
            headers=self.headers,
            body=orjson.dumps({"id": "5d7a1d3f-fake", "message": self.message}),
        )


def _bad(message: str) -> WireError:
    return WireError(f"invalid request: {message}")


def validate_headers(headers: Mapping[str, str], api_key: str) -> None:
    if headers.get("Authorization") != f"Bearer {api_key}":
        raise WireError("invalid api token", status=401)


def _texts(content: Any, where: str, allowed: set[str]) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise _bad(f"{where}.content must be a string or a non-empty list of content items")
    texts = []
    for j, item in enumerate(content):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind not in allowed:
            raise _bad(f"{where}.content[{j}].type must be one of {sorted(allowed)}")
        if kind == "text":
            if not isinstance(item.get("text"), str):
                raise _bad(f"{where}.content[{j}].text is required")
            texts.append(item["text"])
        elif kind == "image_url":
            url = (item.get("image_url") or {}).get("url")
            if not isinstance(url, str) or not _IMAGE_URL.match(url):
                raise _bad(f"{where}.content[{j}].image_url.url must be an https or base64 data URL")
            if set(item["image_url"]) - {"url", "detail"}:
                raise _bad(f"{where}.content[{j}].image_url has unknown fields")
        elif kind == "document" and not isinstance(item.get("document"), dict):
            raise _bad(f"{where}.content[{j}].document is required")
    return " ".join(texts)


def _messages(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list")
    called: set[str] = set()
    prompt = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role == "system":
            prompt.append(_texts(m.get("content"), where, {"text"}))
        elif role == "user":
            prompt.append(_texts(m.get("content"), where, {"text", "image_url"}))
        elif role == "assistant":
            calls = m.get("tool_calls")
            if set(m) - {"role", "content", "tool_calls", "tool_plan", "citations"}:
                raise _bad(f"{where} has unknown fields {sorted(set(m) - {'role', 'content', 'tool_calls'})}")
            if calls is None and m.get("tool_plan") is not None:
                raise _bad(f"{where}.tool_plan is only allowed with tool_calls")
            if calls is None:
                if not _texts(m.get("content"), where, {"text"}):
                    raise _bad(f"{where}: assistant message must have content or tool_calls")
            else:
                if not isinstance(calls, list) or not calls:
                    raise _bad(f"{where}.tool_calls must be a non-empty list")
                for j, call in enumerate(calls):
                    fn = call.get("function") if isinstance(call, dict) else None
                    if (
                        not isinstance(call.get("id"), str)
                        or call.get("type") != "function"
                        or not isinstance(fn, dict)
                        or not isinstance(fn.get("name"), str)
                        or not isinstance(fn.get("arguments"), str)
                    ):
                        raise _bad(
                            f"{where}.tool_calls[{j}] must have id, type 'function', function.name and "
                            "function.arguments (a JSON string)"
                        )
                    try:
                        orjson.loads(fn["arguments"])
                    except orjson.JSONDecodeError:
                        raise _bad(f"{where}.tool_calls[{j}].function.arguments is not valid JSON") from None
                    called.add(call["id"])
        elif role == "tool":
            if m.get("tool_call_id") not in called:
                raise _bad(
                    f"{where}.tool_call_id does not match any tool call in an earlier assistant message"
                )
            prompt.append(_texts(m.get("content"), where, {"text", "document"}))
        else:
            raise _bad(f"{where}.role must be one of system, user, assistant, tool")
    return " ".join(prompt)


def validate_chat(body: Any) -> str:
    """Raise :class:`WireError` for a chat body Cohere would refuse; return the prompt text."""
    if not isinstance(body, dict):
        raise _bad("body must be an object")
    for name in body:
        if name not in CHAT_FIELDS:
            raise _bad(f"unknown field: parameter '{name}' is not a valid field")
    if not isinstance(body.get("model"), str):
        raise _bad("model is required")
    prompt = _messages(body.get("messages"))
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools must be a list")
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if (
                tool.get("type") != "function"
                or not isinstance(fn, dict)
                or not isinstance(fn.get("name"), str)
                or not isinstance(fn.get("parameters", {}), dict)
                or set(fn) - {"name", "description", "parameters"}
            ):
                raise _bad(
                    f"tools[{i}] must be {{type: function, function: {{name, description, parameters}}}}"
                )
    if body.get("tool_choice") is not None:
        if body["tool_choice"] not in ("REQUIRED", "NONE"):
            raise _bad("tool_choice must be one of REQUIRED, NONE")
        if body["tool_choice"] == "REQUIRED" and not tools:
            raise _bad("tool_choice REQUIRED needs tools")
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind not in ("text", "json_object") or set(fmt) - {"type", "json_schema"}:
            raise _bad("response_format.type must be one of text, json_object")
        schema = fmt.get("json_schema")
        if schema is not None and (
            kind != "json_object" or not isinstance(schema, dict) or schema.get("type") != "object"
        ):
            raise _bad("response_format.json_schema must be an object schema and needs type json_object")
    p = body.get("p")
    if p is not None and not (isinstance(p, int | float) and 0.01 <= p <= 0.99):
        raise _bad("p must be between 0.01 and 0.99")
    temperature = body.get("temperature")
    if temperature is not None and not (isinstance(temperature, int | float) and temperature >= 0):
        raise _bad("temperature must be non-negative")
    for name in ("frequency_penalty", "presence_penalty"):
        value = body.get(name)
        if value is not None and not (isinstance(value, int | float) and 0 <= value <= 1):
            raise _bad(f"{name} must be between 0 and 1")
    stops = body.get("stop_sequences")
    if stops is not None and (
        not isinstance(stops, list) or len(stops) > 5 or not all(isinstance(s, str) for s in stops)
    ):
        raise _bad("stop_sequences must be a list of at most 5 strings")
    if body.get("max_tokens") is not None and not (
        isinstance(body["max_tokens"], int) and body["max_tokens"] > 0
    ):
        raise _bad("max_tokens must be a positive integer")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise _bad("stream must be a boolean")
    return prompt


def validate_embed(body: Any) -> list[str]:
    if not isinstance(body, dict):
        raise _bad("body must be an object")
    for name in body:
        if name not in EMBED_FIELDS:
            raise _bad(f"unknown field: parameter '{name}' is not a valid field")
    if body.get("input_type") not in INPUT_TYPES:
        raise _bad("input_type is required and must be one of " + ", ".join(sorted(INPUT_TYPES)))
    if not isinstance(body.get("embedding_types"), list) or not body["embedding_types"]:
        raise _bad("embedding_types is required")
    texts = body.get("texts")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise _bad("texts must be a non-empty list of strings")
    if len(texts) > 96:
        raise _bad("texts must contain at most 96 items")
    if body.get("output_dimension") not in (None, 256, 512, 1024, 1536):
        raise _bad("output_dimension must be one of 256, 512, 1024, 1536")
    return texts


@dataclass
class Reply:
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tool_plan: str = ""
    finish_reason: str = "COMPLETE"
    error: str | None = None


@dataclass
class Fault:
    status: int
    message: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float


def default_reply(body: dict[str, Any]) -> Reply:
    last = body["messages"][-1]
    tools = [t["function"] for t in body.get("tools") or []]
    if tools and body.get("tool_choice") != "NONE" and last["role"] != "tool":
        calls = [
            {
                "id": f"{t['name']}_{i}x7q",
                "type": "function",
                "function": {
                    "name": t["name"],
                    "arguments": orjson.dumps(sample(t.get("parameters"))).decode(),
                },
            }
            for i, t in enumerate(tools[:2])
        ]
        return Reply(tool_calls=calls, tool_plan="I will call the tools.", finish_reason="TOOL_CALL")
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_object":
        return Reply(orjson.dumps(sample(fmt.get("json_schema") or {"properties": {"answer": {}}})).decode())
    if last["role"] == "tool":
        return Reply(f"the tool said {last['content']}")
    text = f"cohere says hi to {body['model']}"
    for stop in body.get("stop_sequences") or []:
        if stop in text:
            return Reply(text[: text.index(stop)], finish_reason="STOP_SEQUENCE")
    return Reply(text)


def usage_for(prompt: str, reply: Reply) -> dict[str, Any]:
    out = len(reply.text.split()) + 7 * len(reply.tool_calls) + len(reply.tool_plan.split())
    inp = len(prompt.split())
    return {
        "billed_units": {"input_tokens": inp, "output_tokens": out},
        "tokens": {"input_tokens": inp + 64, "output_tokens": out},
        "cached_tokens": 16,
    }


def response_doc(reply: Reply, usage: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant"}
    if reply.tool_calls:
        message.update(tool_plan=reply.tool_plan, tool_calls=reply.tool_calls)
    else:
        message["content"] = [{"type": "text", "text": reply.text}]
    return {
        "id": "c14c80c3-18eb-4519-9460-6c92edd8cfb4",
        "message": message,
        "finish_reason": reply.finish_reason,
        "usage": usage,
    }


def stream_events(reply: Reply, usage: dict[str, Any]) -> list[dict[str, Any]]:
    """The v2 chat stream events for ``reply``, in order."""
    events: list[dict[str, Any]] = [
        {
            "id": "29f14a5a-11de-4cae-9800-25e4747408ea",
            "type": "message-start",
            "delta": {
                "message": {
                    "role": "assistant",
                    "content": [],
                    "tool_plan": "",
                    "tool_calls": [],
                    "citations": [],
                }
            },
        }
    ]
    if reply.tool_calls:
        events += [
            {"type": "tool-plan-delta", "delta": {"message": {"tool_plan": (" " if i else "") + w}}}
            for i, w in enumerate(reply.tool_plan.split(" "))
        ]
        for index, call in enumerate(reply.tool_calls):
            args = call["function"]["arguments"]
            events.append(
                {
                    "type": "tool-call-start",
                    "index": index,
                    "delta": {
                        "message": {
                            "tool_calls": {
                                "id": call["id"],
                                "type": "function",
                                "function": {"name": call["function"]["name"], "arguments": ""},
                            }
                        }
                    },
                }
            )
            events += [
                {
                    "type": "tool-call-delta",
                    "index": index,
                    "delta": {"message": {"tool_calls": {"function": {"arguments": args[a : a + 5]}}}},
                }
                for a in range(0, len(args), 5)
            ]
            events.append({"type": "tool-call-end", "index": index})
    else:
        events.append(
            {
                "type": "content-start",
                "index": 0,
                "delta": {"message": {"content": {"type": "text", "text": ""}}},
            }
        )
        events += [
            {
                "type": "content-delta",
                "index": 0,
                "delta": {"message": {"content": {"text": (" " if i else "") + w}}},
                "logprobs": None,
            }
            for i, w in enumerate(reply.text.split(" "))
        ]
        events.append({"type": "content-end", "index": 0})
    end: dict[str, Any] = {"finish_reason": reply.finish_reason, "usage": usage}
    if reply.error is not None:
        end["error"] = reply.error
    events.append({"type": "message-end", "delta": end})
    return events


def frame(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def stream_bytes(reply: Reply, usage: dict[str, Any]) -> bytes:
    return b"".join(frame(e) for e in stream_events(reply, usage)) + b"data: [DONE]\n\n"


class FakeCohere(FakeServer):
    def __init__(self, api_key: str = "co-test-key", max_prompt_chars: int = 2000) -> None:
        self.api_key, self.max_prompt_chars = api_key, max_prompt_chars
        self.seen: list[Seen] = []
        self.faults: list[Fault] = []
        self.replies: list[Reply] = []
        self._lock = threading.Lock()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v2/chat", self._chat)
        app.router.add_post("/v2/embed", self._embed)
        app.router.add_post("/v2/rerank", self._rerank)
        self.server = ThreadedApp(app)

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self.replies.extend(replies)

    @property
    def last(self) -> Seen:
        return self.seen[-1]

    async def _begin(self, request: web.Request) -> dict[str, Any]:
        validate_headers(request.headers, self.api_key)
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise _bad("body is not valid JSON") from None
        self.seen.append(Seen(request.path, dict(request.headers), body, time.monotonic()))
        with self._lock:
            fault = self.faults.pop(0) if self.faults else None
        if fault is not None:
            raise WireError(fault.message, fault.status, fault.headers)
        return body  # type: ignore[no-any-return]

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._begin(request)
            prompt = validate_chat(body)
            if len(prompt) > self.max_prompt_chars:
                raise WireError(
                    f"too many tokens: size limit exceeded by {len(prompt) - self.max_prompt_chars} "
                    "tokens. Try using shorter or fewer inputs, or setting prompt_truncation='AUTO'."
                )
            if BLOCKED in prompt:
                raise WireError(
                    "blocked output: please adjust your prompt and try again, as this generation may "
                    "be a potential violation of our Usage Policy"
                )
        except WireError as err:
            return err.response()
        with self._lock:
            reply = self.replies.pop(0) if self.replies else default_reply(body)
        usage = usage_for(prompt, reply)
        if not body.get("stream"):
            return web.Response(
                body=orjson.dumps(response_doc(reply, usage)), content_type="application/json"
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for event in stream_events(reply, usage):
            await resp.write(frame(event))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _rerank(self, request: web.Request) -> web.StreamResponse:
        """Cohere's v2 rerank (see tests.fakes.surface_wire)."""
        try:
            body = await self._begin(request)
            return web.json_response(surface_wire.cohere_rerank(body))
        except surface_wire.SurfaceWireError as err:
            return WireError(err.message, err.status).response()
        except WireError as err:
            return err.response()

    async def _embed(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._begin(request)
            texts = validate_embed(body)
        except WireError as err:
            return err.response()
        dims = body.get("output_dimension") or 4
        return web.json_response(
            {
                "id": "da6e531f-fake",
                "texts": texts,
                "response_type": "embeddings_by_type",
                "embeddings": {"float": [embedding_vector(t, dims) for t in texts]},
                "meta": {
                    "api_version": {"version": "2"},
                    "billed_units": {"input_tokens": sum(len(t.split()) for t in texts)},
                },
            }
        )
