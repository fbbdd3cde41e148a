"""The built-in `mock` provider: deterministic answers computed in-process.

It answers in OpenAI's wire format through the same path as a real upstream,
so streaming, usage accounting and load balancing behave as they would in
production. Token counts follow a word-piece estimate close to real tokenizers.

It honours what clients ask for, so that a newcomer can try it all on the default install:
``encoding_format: base64`` on embeddings (the Node SDK's default), ``tools`` and ``tool_choice``
(a tool call whose arguments validate against the tool's schema, then text once a ``tool``
message answers it) and ``response_format`` (a JSON object, or JSON valid under the schema).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import re
import struct
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .._errors import InvalidRequestError
from .._sse import DONE, frame
from ..metering._tokens import count_tokens, prompt_tokens, text_of
from ._base import Operation, RequestContext, UpstreamClient, UpstreamResponse
from ._embeddings import LocalResponse
from ._mock_json import instance_of
from ._mock_surface import mock_surface
from ._openai_shaped import OpenAIShapedProvider
from ._surface import SURFACE

#: One token per piece, as ``count_tokens`` counts them: JSON streams token by token.
_TOKEN_PIECE = re.compile(r"\s*(?:\w{1,6}|[^\w\s])|\s+")


def reply_for(body: dict[str, Any], fixed: str | None) -> str:
    if fixed is not None:
        return fixed
    if "messages" in body:
        messages = [m for m in body["messages"] if isinstance(m, dict)]
        if messages and messages[-1].get("role") == "tool":
            result = " ".join(text_of(messages[-1].get("content")).split()[:24])
            return f"This is a mock response from kubellm. The tool answered: {result}"
        users = [m for m in messages if m.get("role") == "user"]
        said = text_of(users[-1].get("content")) if users else ""
    else:
        prompt = body.get("prompt", "")
        said = prompt if isinstance(prompt, str) else str(prompt)
    words = said.split()
    echo = " ".join(words[:24]) + (" …" if len(words) > 24 else "")
    return f"This is a mock response from kubellm. You said: {echo}" if echo else "This is a mock response."


def embed(text: str, dimensions: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(digest[i % 32] - 127.5) / 127.5 for i in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [round(v / norm, 6) for v in raw]


def base64_floats(vector: list[float]) -> str:
    """OpenAI's ``encoding_format: base64``: the vector as little-endian float32, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class Answer:
    """What the mock says: text in stream-sized pieces (joined, the content), or a tool call."""

    pieces: list[str]
    finish: str
    tool_call: ToolCall | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        if self.tool_call is not None:
            return count_tokens(self.tool_call.name) + count_tokens(self.tool_call.arguments)
        return count_tokens(self.text)


def _call_answered(messages: list[Any]) -> bool:
    """Whether tool results follow the last assistant turn (a user may add text after them)."""
    for message in reversed(messages):
        if isinstance(message, dict):
            if message.get("role") == "tool":
                return True
            if message.get("role") == "assistant":
                return False
    return False


def _chosen_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    """The function the model calls, or None when it answers in text."""
    tools = [t["function"] for t in body.get("tools") or [] if isinstance(t, dict) and "function" in t]
    if not tools or _call_answered(body.get("messages") or []):
        return None  # no tools, or the last call is answered: say what came back
    choice = body.get("tool_choice")
    if choice == "none":
        return None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        for tool in tools:
            if tool.get("name") == name:
                return dict(tool)
        raise InvalidRequestError(
            f"'tool_choice': no tool named {name!r} in 'tools'", param="tool_choice", code="invalid_value"
        )
    return dict(tools[0])


def _call_id(body: dict[str, Any], name: str) -> str:
    """Deterministic: the same conversation gets the same call id."""
    seed = orjson.dumps([body.get("messages"), name], option=orjson.OPT_SORT_KEYS, default=str)
    return "call_" + hashlib.sha256(seed).hexdigest()[:24]


def _json_reply(body: dict[str, Any], text: str) -> str | None:
    """The content ``response_format`` asks for, or None for plain text."""
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return orjson.dumps({"response": text}).decode()
    if kind == "json_schema":
        spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return orjson.dumps(instance_of(schema if isinstance(schema, dict) else {})).decode()
    return None


def _within(pieces: list[str], limit: Any) -> tuple[list[str], str]:
    """The pieces that fit in ``max_tokens``, and the finish reason that says whether all did."""
    if isinstance(limit, int) and limit > 0:
        used = 0
        for i, piece in enumerate(pieces):
            used += count_tokens(piece)
            if used > limit:
                return pieces[:i], "length"
    return pieces, "stop"


def plan_answer(body: dict[str, Any], operation: Operation, fixed: str | None) -> Answer:
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if operation is Operation.CHAT:
        tool = _chosen_tool(body)
        if tool is not None:
            name = str(tool.get("name"))
            arguments = orjson.dumps(instance_of(tool.get("parameters") or {})).decode()
            return Answer([], "tool_calls", ToolCall(_call_id(body, name), name, arguments))
        structured = _json_reply(body, reply_for(body, fixed))
        if structured is not None:
            return Answer(*_within(_TOKEN_PIECE.findall(structured), limit))
    words = reply_for(body, fixed).split()
    return Answer(*_within([w if i == 0 else " " + w for i, w in enumerate(words)], limit))


def usage_of(body: dict[str, Any], completion: int) -> dict[str, int]:
    """Prompt tokens as a real model bills them: messages, tool calls, tool definitions and schema."""
    prompt = prompt_tokens(body)
    for message in body.get("messages") or []:
        for call in (message.get("tool_calls") or []) if isinstance(message, dict) else []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                prompt += count_tokens(f"{function.get('name')} {function.get('arguments')}")
    for extra in ("tools", "response_format"):
        if body.get(extra):
            prompt += count_tokens(orjson.dumps(body[extra], default=str).decode())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _LocalResponse:
    """An in-process stand-in for an HTTP response, fed by a generator."""

    def __init__(self, chunks: AsyncIterator[bytes], content_type: str) -> None:
        self.status = 200
        self.headers: Mapping[str, str] = {"Content-Type": content_type}
        self._chunks = chunks

    async def read(self) -> bytes:
        return b"".join([c async for c in self._chunks])

    def iter_chunks(self) -> AsyncIterator[bytes]:
        return self._chunks

    def close(self) -> None:
        pass


class MockProvider(OpenAIShapedProvider):
    name = "mock"
    default_base_url = "mock://local"
    #: Images, moderations and rerank too (see _mock_surface), for deployments with that ``mode``.
    operations = OpenAIShapedProvider.operations | SURFACE

    async def send(
        self, client: UpstreamClient, body: dict[str, Any], ctx: RequestContext
    ) -> UpstreamResponse:
        if ctx.operation in SURFACE:
            return LocalResponse(200, {"Content-Type": "application/json"}, mock_surface(body, ctx))
        body = self.prepare_body(body, ctx)
        if ctx.operation is Operation.EMBEDDING:
            return _LocalResponse(self._whole(body, ctx, None), "application/json")
        # Planned before the first byte, so a request the mock cannot answer is a clean error.
        answer = plan_answer(body, ctx.operation, ctx.deployment.mock.reply)
        if ctx.stream:
            return _LocalResponse(self._stream(body, ctx, answer), "text/event-stream")
        return _LocalResponse(self._whole(body, ctx, answer), "application/json")

    async def _whole(
        self, body: dict[str, Any], ctx: RequestContext, answer: Answer | None
    ) -> AsyncIterator[bytes]:
        opts = ctx.deployment.mock
        if opts.latency_ms:
            await asyncio.sleep(opts.latency_ms / 1000)
        if answer is None:
            yield orjson.dumps(self._embedding(body, ctx))
            return
        n = int(body.get("n") or 1)
        choices: list[dict[str, Any]]
        if ctx.operation is Operation.COMPLETION:
            choices = [
                {"index": i, "text": answer.text, "logprobs": None, "finish_reason": answer.finish}
                for i in range(n)
            ]
            obj = "text_completion"
        else:
            message: dict[str, Any] = {"role": "assistant", "content": answer.text, "refusal": None}
            if answer.tool_call is not None:
                message = {**message, "content": None, "tool_calls": [answer.tool_call.to_openai()]}
            choices = [
                {"index": i, "message": message, "logprobs": None, "finish_reason": answer.finish}
                for i in range(n)
            ]
            obj = "chat.completion"
        yield orjson.dumps(
            {
                "id": f"mock-{ctx.request_id}",
                "object": obj,
                "created": ctx.created,
                "model": ctx.upstream_model,
                "choices": choices,
                "usage": usage_of(body, answer.completion_tokens * n),
                "system_fingerprint": "kubellm-mock",
            }
        )

    async def _stream(
        self, body: dict[str, Any], ctx: RequestContext, answer: Answer
    ) -> AsyncIterator[bytes]:
        opts = ctx.deployment.mock
        if opts.latency_ms:
            await asyncio.sleep(opts.latency_ms / 1000)
        chat = ctx.operation is Operation.CHAT
        base = {
            "id": f"mock-{ctx.request_id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": ctx.created,
            "model": ctx.upstream_model,
            "system_fingerprint": "kubellm-mock",
        }
        deltas = _chat_deltas(answer) if chat else [{"text": piece} for piece in answer.pieces]
        for i, delta in enumerate(deltas):
            if opts.chunk_delay_ms and (i > 0 or not chat):  # no delay before the role chunk
                await asyncio.sleep(opts.chunk_delay_ms / 1000)
            choice = {"index": 0, "delta": delta} if chat else {"index": 0, **delta}
            yield frame({**base, "choices": [{**choice, "logprobs": None, "finish_reason": None}]})
        last: dict[str, Any] = {"index": 0, "delta": {}} if chat else {"index": 0, "text": ""}
        yield frame({**base, "choices": [{**last, "logprobs": None, "finish_reason": answer.finish}]})
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            yield frame({**base, "choices": [], "usage": usage_of(body, answer.completion_tokens)})
        yield DONE

    def _embedding(self, body: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        if inputs and all(isinstance(i, int) for i in inputs):
            inputs = [inputs]
        dims = int(body.get("dimensions") or 8)
        packed = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64_floats(vector) if packed else vector,
            }
            for i, vector in enumerate(embed(str(item), dims) for item in inputs)
        ]
        tokens = prompt_tokens({"input": inputs})
        return {
            "object": "list",
            "data": data,
            "model": ctx.upstream_model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


def _chat_deltas(answer: Answer) -> list[dict[str, Any]]:
    """The deltas of a streamed chat answer: the role first, then content or tool-call argument pieces."""
    call = answer.tool_call
    if call is None:
        return [{"role": "assistant", "content": ""}, *({"content": piece} for piece in answer.pieces)]
    head = {"index": 0, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
    pieces = _TOKEN_PIECE.findall(call.arguments)
    return [
        {"role": "assistant", "content": None, "tool_calls": [head]},
        *({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} for piece in pieces),
    ]
