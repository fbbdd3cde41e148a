"""Fake Hugging Face upstreams: the Inference Providers router, and a TGI/TEI endpoint.

``mode="router"`` serves what ``https://router.huggingface.co`` serves: the OpenAI-compatible
``/v1/chat/completions`` (OpenAI's request rules, :func:`tests.fakes.azure_upstream.validate_chat`)
and HF Inference ``/hf-inference/models/{model}/pipeline/feature-extraction``, which takes
``{"inputs": [...]}`` and answers a bare array of vectors (or a 503 while the model loads).

``mode="tgi"`` serves a TGI Messages API plus TEI: ``/v1/chat/completions``, ``/v1/completions``
and ``/v1/embeddings``. TGI's JSON mode is a guidance grammar ``{"type": "json_object", "value":
<schema>}`` (OpenAI's ``json_schema`` object fails to deserialize, 422); prompts over
``max_input_words`` fail TGI's input validation (422 ``error_type: validation``); errors are
``{"error": ..., "error_type": ...}``; the last stream chunk carries ``usage`` as TGI sends it;
a fault can break a stream with TGI's in-band ``{"error": ..., "error_type": "generation"}`` event.

Both require ``Authorization: Bearer <HF token>``. :func:`validate_tgi_chat` and
:func:`validate_feature_extraction` are the request checks as plain functions.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web

from tests.fakes import surface_wire
from tests.fakes.azure_upstream import WireError as AzureWireError
from tests.fakes.azure_upstream import embedding_vector, sample, validate_chat
from tests.support.servers import FakeServer, ThreadedApp

ROLES = {"system", "user", "assistant", "tool"}
FEATURE_EXTRACTION_FIELDS = {"inputs", "normalize", "prompt_name", "truncate", "truncation_direction"}


class HFError(Exception):
    def __init__(
        self,
        message: str,
        status: int = 422,
        error_type: str = "validation",
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.error_type, self.extra = (
            message,
            status,
            error_type,
            dict(extra or {}),
        )

    def response(self) -> web.Response:
        body = {"error": self.message, "error_type": self.error_type, **self.extra}
        return web.Response(status=self.status, body=orjson.dumps(body), content_type="application/json")


def validate_auth(headers: Mapping[str, str], token: str) -> None:
    if headers.get("Authorization") != f"Bearer {token}":
        raise HFError("Invalid credentials in Authorization header", status=401, error_type="authentication")


def validate_tgi_chat(body: Any) -> None:
    """Raise :class:`HFError` for a body TGI's Messages API would refuse."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise HFError("Failed to deserialize the JSON body into the target type: missing field `messages`")
    called: set[str] = set()
    for i, m in enumerate(body["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise HFError(
                f"Failed to deserialize the JSON body into the target type: messages[{i}].role: "
                "unknown variant"
            )
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("text", "image_url") or (
                    kind == "image_url" and not isinstance((part.get("image_url") or {}).get("url"), str)
                ):
                    raise HFError(
                        f"Failed to deserialize the JSON body into the target type: messages[{i}]."
                        "content: data did not match any variant"
                    )
        elif content is not None and not isinstance(content, str):
            raise HFError(f"messages[{i}].content: invalid type")
        for call in m.get("tool_calls") or []:
            fn = call.get("function") or {}
            if not isinstance(call.get("id"), str) or not isinstance(fn.get("name"), str):
                raise HFError(f"messages[{i}].tool_calls: missing field `id` or `function.name`")
            called.add(call["id"])
        if m["role"] == "tool" and m.get("tool_call_id") not in called:
            raise HFError(f"messages[{i}]: tool message must answer an earlier tool call")
        if m["role"] != "assistant" and content is None:
            raise HFError(f"messages[{i}]: missing field `content`")
    fmt = body.get("response_format")
    if fmt is not None and (
        not isinstance(fmt, dict)
        or fmt.get("type") not in ("json", "json_object", "regex")
        or "value" not in fmt
    ):
        raise HFError(
            "Failed to deserialize the JSON body into the target type: response_format: missing field `value`"
        )
    tools = body.get("tools")
    names = {
        t["function"]["name"]
        for t in tools or []
        if isinstance(t, dict) and isinstance(t.get("function"), dict)
    }
    choice = body.get("tool_choice")
    if choice is not None:
        if not tools:
            raise HFError("Tool error: tool_choice requires tools")
        if isinstance(choice, dict) and (choice.get("function") or {}).get("name") not in names:
            raise HFError("Tool error: Tool not found in tools")
        if not isinstance(choice, dict) and choice not in ("auto", "none", "required"):
            raise HFError("Failed to deserialize the JSON body into the target type: tool_choice")
    if "stream_options" in body and not body.get("stream"):
        raise HFError("stream_options is only allowed with stream")


def validate_feature_extraction(body: Any) -> list[str]:
    if not isinstance(body, dict) or "inputs" not in body:
        raise HFError("Input should be a valid dictionary with an `inputs` field", status=400)
    unknown = set(body) - FEATURE_EXTRACTION_FIELDS
    if unknown:
        raise HFError(f"Unexpected fields: {sorted(unknown)}", status=400)
    inputs = body["inputs"] if isinstance(body["inputs"], list) else [body["inputs"]]
    if not inputs or not all(isinstance(i, str) and i for i in inputs):
        raise HFError("`inputs` must be a non-empty string or list of strings", status=400)
    return inputs


@dataclass
class Fault:
    status: int | None = None
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    #: For streams: send one chunk, then TGI's in-band generation error.
    stream_error: bool = False


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: Any
    at: float


def reply_for(body: dict[str, Any], name: str) -> tuple[str | None, list[dict[str, Any]], str]:
    """(content, tool_calls, finish_reason) a model would produce for ``body``."""
    tools = [t["function"] for t in body.get("tools") or []]
    last = body["messages"][-1]
    if tools and body.get("tool_choice") != "none" and last["role"] != "tool":
        calls = [
            {
                "id": f"call_{i}",
                "type": "function",
                "function": {
                    "name": t["name"],
                    "arguments": orjson.dumps(sample(t.get("parameters"))).decode(),
                },
            }
            for i, t in enumerate(tools[:2])
        ]
        return None, calls, "tool_calls"
    fmt = body.get("response_format") or {}
    if fmt.get("type") in ("json", "json_object"):
        return orjson.dumps(sample(fmt.get("value"))).decode(), [], "stop"
    if fmt.get("type") == "json_schema":
        return orjson.dumps(sample(fmt["json_schema"].get("schema"))).decode(), [], "stop"
    return f"{name} says hi to {body.get('model')}", [], "stop"


def tgi_chunks(
    body: dict[str, Any], content: str | None, calls: list[dict[str, Any]], finish: str, usage: dict[str, int]
) -> list[dict[str, Any]]:
    """TGI's chat stream: every chunk has ``usage: null`` except the last, which carries it."""
    base = {
        "object": "chat.completion.chunk",
        "id": "",
        "created": 1730000000,
        "model": body.get("model"),
        "system_fingerprint": "3.0.1-sha-bb9095a",
    }

    def chunk(delta: dict[str, Any], reason: str | None = None, use: Any = None) -> dict[str, Any]:
        return {
            **base,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", **delta},
                    "logprobs": None,
                    "finish_reason": reason,
                }
            ],
            "usage": use,
        }

    out = (
        [chunk({"content": (" " if i else "") + w}) for i, w in enumerate((content or "").split(" "))]
        if content
        else []
    )
    for index, call in enumerate(calls):
        args = call["function"]["arguments"]
        out.append(
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": call["function"]["name"], "arguments": ""},
                        }
                    ]
                }
            )
        )
        out += [
            chunk({"tool_calls": [{"index": index, "function": {"arguments": args[a : a + 3]}}]})
            for a in range(0, len(args), 3)
        ]
    out.append(chunk({"content": ""}, finish, usage))
    return out


def sse(chunks: list[dict[str, Any]]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


class FakeHuggingFace(FakeServer):
    def __init__(
        self, mode: Literal["router", "tgi"], token: str = "hf_test_token", max_input_words: int = 500
    ) -> None:
        self.mode, self.token, self.max_input_words = mode, token, max_input_words
        self.name = "hf-router" if mode == "router" else "tgi"
        self.seen: list[Seen] = []
        self.faults: list[Fault] = []
        self.token_level = False  # feature-extraction answers per-token vectors (a non-pooling model)
        self._lock = threading.Lock()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        if mode == "router":
            app.router.add_post("/hf-inference/models/{model:.+}/pipeline/feature-extraction", self._features)
        else:
            app.router.add_post("/v1/completions", self._completions)
            app.router.add_post("/v1/embeddings", self._embeddings)
            app.router.add_post("/rerank", self._rerank)  # TEI, see tests.fakes.surface_wire
        self.server = ThreadedApp(app)

    @property
    def last(self) -> Seen:
        return self.seen[-1]

    async def _begin(self, request: web.Request) -> tuple[Any, Fault | None]:
        validate_auth(request.headers, self.token)
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise HFError("Failed to parse the request body as JSON", status=400) from None
        self.seen.append(Seen(request.path, dict(request.headers), body, time.monotonic()))
        with self._lock:
            fault = self.faults.pop(0) if self.faults else None
        if fault is not None and fault.status is not None:
            raise _Raw(fault)
        return body, fault

    async def _rerank(self, request: web.Request) -> web.StreamResponse:
        try:
            body, _ = await self._begin(request)
            return web.json_response(surface_wire.tei_rerank(body))
        except surface_wire.SurfaceWireError as err:
            return web.json_response({"error": err.message, "error_type": "Validation"}, status=err.status)
        except HFError as err:
            return err.response()
        except _Raw as raw:
            return raw.response()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body, fault = await self._begin(request)
            if self.mode == "tgi":
                validate_tgi_chat(body)
            else:
                try:
                    validate_chat(body)
                except AzureWireError as err:
                    raise HFError(err.message, status=400) from None
            words = len(orjson.dumps(body["messages"]).split(b" "))
            if words > self.max_input_words:
                raise HFError(
                    f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= "
                    f"{self.max_input_words}. Given: {words} `inputs` tokens and 20 `max_new_tokens`"
                )
        except HFError as err:
            return err.response()
        except _Raw as raw:
            return raw.response()
        content, calls, finish = reply_for(body, self.name)
        usage = {
            "prompt_tokens": words,
            "completion_tokens": len((content or "").split()) + 5 * len(calls),
            "total_tokens": words + len((content or "").split()) + 5 * len(calls),
        }
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            return web.json_response(
                {
                    "object": "chat.completion",
                    "id": "",
                    "created": 1730000000,
                    "model": body.get("model"),
                    "system_fingerprint": "3.0.1-sha-bb9095a",
                    "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                    "usage": usage,
                }
            )
        chunks = tgi_chunks(body, content, calls, finish, usage)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if fault is not None and fault.stream_error:
            await resp.write(b"data: " + orjson.dumps(chunks[0]) + b"\n\n")
            await resp.write(
                b'data: {"error":"Request failed during generation: Server error: CUDA out of '
                b'memory","error_type":"generation"}\n\n'
            )
        else:
            await resp.write(sse(chunks))
        await resp.write_eof()
        return resp

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body, _ = await self._begin(request)
        except (HFError, _Raw) as err:
            return err.response()
        return web.json_response(
            {
                "object": "text_completion",
                "id": "",
                "created": 1,
                "model": body.get("model"),
                "choices": [{"index": 0, "text": "tgi text", "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
            }
        )

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        try:
            body, _ = await self._begin(request)
            value = body.get("input") if isinstance(body, dict) else None
            texts = value if isinstance(value, list) else [value]
            if not texts or not all(isinstance(t, str) for t in texts):
                raise HFError("Failed to deserialize the JSON body into the target type: input")
            if any(len(t.split()) > self.max_input_words for t in texts):
                raise HFError(
                    f"Input validation error: `inputs` must have less than {self.max_input_words} "
                    f"tokens. Given: {max(len(t.split()) for t in texts)}",
                    status=413,
                )
        except (HFError, _Raw) as err:
            return err.response()
        return web.json_response(
            {
                "object": "list",
                "model": body.get("model"),
                "data": [
                    {"object": "embedding", "index": i, "embedding": embedding_vector(t)}
                    for i, t in enumerate(texts)
                ],
                "usage": {"prompt_tokens": len(texts), "total_tokens": len(texts)},
            }
        )

    async def _features(self, request: web.Request) -> web.StreamResponse:
        try:
            body, _ = await self._begin(request)
            texts = validate_feature_extraction(body)
        except (HFError, _Raw) as err:
            return err.response()
        vectors: Any = [embedding_vector(t) for t in texts]
        if self.token_level:
            vectors = [[v, v] for v in vectors]
        return web.json_response(vectors)


class _Raw(Exception):
    """A queued fault answered verbatim."""

    def __init__(self, fault: Fault) -> None:
        super().__init__(fault.status)
        self.fault = fault

    def response(self) -> web.Response:
        body = self.fault.body or {"error": f"injected {self.fault.status}", "error_type": "fault"}
        return web.Response(
            status=self.fault.status or 500,
            body=orjson.dumps(body),
            content_type="application/json",
            headers=self.fault.headers,
        )
