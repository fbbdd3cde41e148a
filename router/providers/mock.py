"""The built-in `mock` provider: deterministic answers computed in-process.

It answers in OpenAI's wire format through the same path as a real upstream,
so streaming, usage accounting and load balancing behave as they would in
production. Token counts follow a word-piece estimate close to real tokenizers.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from .._sse import DONE, frame
from .._tokens import count_tokens, prompt_tokens, text_of
from ._base import Operation, RequestContext, UpstreamClient, UpstreamResponse
from ._openai_shaped import OpenAIShapedProvider


def reply_for(body: dict[str, Any], fixed: str | None) -> str:
    if fixed is not None:
        return fixed
    if "messages" in body:
        users = [m for m in body["messages"] if m.get("role") == "user"]
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

    async def send(
        self, client: UpstreamClient, body: dict[str, Any], ctx: RequestContext
    ) -> UpstreamResponse:
        body = self.prepare_body(body, ctx)
        if ctx.stream:
            return _LocalResponse(self._stream(body, ctx), "text/event-stream")
        return _LocalResponse(self._whole(body, ctx), "application/json")

    async def _whole(self, body: dict[str, Any], ctx: RequestContext) -> AsyncIterator[bytes]:
        opts = ctx.deployment.mock
        if opts.latency_ms:
            await asyncio.sleep(opts.latency_ms / 1000)
        if ctx.operation is Operation.EMBEDDING:
            yield orjson.dumps(self._embedding(body, ctx))
            return
        words, finish = self._reply_words(body, ctx)
        text = " ".join(words)
        n = int(body.get("n") or 1)
        completion = count_tokens(text) * n
        usage = {
            "prompt_tokens": prompt_tokens(body),
            "completion_tokens": completion,
            "total_tokens": prompt_tokens(body) + completion,
        }
        if ctx.operation is Operation.COMPLETION:
            choices: list[dict[str, Any]] = [
                {"index": i, "text": text, "logprobs": None, "finish_reason": finish} for i in range(n)
            ]
            obj = "text_completion"
        else:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
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
                "usage": usage,
                "system_fingerprint": "kubellm-mock",
            }
        )

    async def _stream(self, body: dict[str, Any], ctx: RequestContext) -> AsyncIterator[bytes]:
        opts = ctx.deployment.mock
        if opts.latency_ms:
            await asyncio.sleep(opts.latency_ms / 1000)
        words, finish = self._reply_words(body, ctx)
        chat = ctx.operation is Operation.CHAT
        base = {
            "id": f"mock-{ctx.request_id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": ctx.created,
            "model": ctx.upstream_model,
            "system_fingerprint": "kubellm-mock",
        }
        if chat:
            yield frame(
                {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
        for i, word in enumerate(words):
            if opts.chunk_delay_ms:
                await asyncio.sleep(opts.chunk_delay_ms / 1000)
            piece = word if i == 0 else " " + word
            choice: dict[str, Any] = (
                {"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}
                if chat
                else {"index": 0, "text": piece, "logprobs": None, "finish_reason": None}
            )
            yield frame({**base, "choices": [choice]})
        last: dict[str, Any] = (
            {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}
            if chat
            else {"index": 0, "text": "", "logprobs": None, "finish_reason": finish}
        )
        yield frame({**base, "choices": [last]})
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            completion = count_tokens(" ".join(words))
            usage = {
                "prompt_tokens": prompt_tokens(body),
                "completion_tokens": completion,
                "total_tokens": prompt_tokens(body) + completion,
            }
            yield frame({**base, "choices": [], "usage": usage})
        yield DONE

    def _reply_words(self, body: dict[str, Any], ctx: RequestContext) -> tuple[list[str], str]:
        words = reply_for(body, ctx.deployment.mock.reply).split()
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and limit > 0:
            kept: list[str] = []
            used = 0
            for word in words:
                used += count_tokens(word)
                if used > limit:
                    return kept, "length"
                kept.append(word)
        return words, "stop"

    def _embedding(self, body: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        if inputs and all(isinstance(i, int) for i in inputs):
            inputs = [inputs]
        dims = int(body.get("dimensions") or 8)
        data = [
            {"object": "embedding", "index": i, "embedding": embed(str(item), dims)}
            for i, item in enumerate(inputs)
        ]
        tokens = prompt_tokens({"input": inputs})
        return {
            "object": "list",
            "data": data,
            "model": ctx.upstream_model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
