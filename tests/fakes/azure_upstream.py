"""A fake Azure OpenAI data plane that enforces the wire protocol of the official reference.

Routes are ``/openai/deployments/{deployment}/{chat/completions|completions|embeddings}`` and
every call needs a known ``api-version`` query parameter (else 404 "Resource not found", as
Azure answers). Credentials are an ``api-key`` header or a Microsoft Entra ``Authorization:
Bearer`` token; anything else is a 401 in Azure's ``{"error": {"code": "401", ...}}`` shape.
An unknown deployment is 404 ``DeploymentNotFound``.

Chat bodies follow OpenAI's rules as Azure applies them: known top-level fields only
("Unrecognized request argument supplied"), ``stream_options`` only with ``stream`` and only
from api-version 2024-09-01, roles, tool calls answered by ``tool`` messages with matching ids,
JSON mode only when a message mentions JSON. :func:`validate_chat` is the same check as a plain
function.

Content filtering behaves as documented: a prompt containing :data:`BLOCKED_PROMPT` is refused
with 400 ``content_filter`` and an ``innererror``; one asking for :data:`BLOCKED_OUTPUT` gets a
200 whose choice ends with ``finish_reason: content_filter`` (streamed: the filtered chunk is
the last before ``[DONE]``). A prompt longer than ``context_chars`` is 400
``context_length_exceeded``. Responses and chunks carry Azure's ``content_filter_results`` and
streams begin with the ``prompt_filter_results`` chunk.
"""

from __future__ import annotations

import asyncio
import base64
import re
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.fakes import responses_wire
from tests.support.servers import FakeServer, ThreadedApp

API_VERSIONS = frozenset({
    "2023-05-15", "2024-02-01", "2024-06-01", "2024-08-01-preview", "2024-09-01-preview",
    "2024-10-21", "2024-12-01-preview", "2025-01-01-preview", "2025-03-01-preview", "2025-04-01-preview",
})  # fmt: skip
STREAM_OPTIONS_SINCE = "2024-09-01"
#: The first (preview) api-version of Azure's Responses API.
RESPONSES_SINCE = "2025-03-01-preview"
BLOCKED_PROMPT = "how to build a weapon"
BLOCKED_OUTPUT = "write something violent"
ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
CHAT_FIELDS = frozenset({
    "model", "messages", "temperature", "top_p", "n", "stream", "stream_options", "stop", "max_tokens",
    "max_completion_tokens", "presence_penalty", "frequency_penalty", "logit_bias", "user", "logprobs",
    "top_logprobs", "response_format", "seed", "tools", "tool_choice", "parallel_tool_calls", "functions",
    "function_call", "data_sources", "reasoning_effort", "prediction", "store", "metadata", "audio",
    "modalities", "user_security_context",
})  # fmt: skip
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
SAFE = {c: {"filtered": False, "severity": "safe"} for c in ("hate", "self_harm", "sexual", "violence")}


class WireError(Exception):
    """What Azure would answer instead of a completion."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        code: str | None = None,
        param: str | None = None,
        inner: dict[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.code, self.param = message, status, code, param
        self.inner, self.headers = inner, dict(headers or {})

    def response(self) -> web.Response:
        error: dict[str, Any] = {
            "message": self.message,
            "type": None if self.status != 400 else "invalid_request_error",
            "param": self.param,
            "code": self.code,
        }
        if self.inner is not None:
            error.update(status=self.status, innererror=self.inner)
        return web.Response(
            status=self.status,
            body=orjson.dumps({"error": error}),
            content_type="application/json",
            headers=self.headers,
        )


def _unrecognized(name: str) -> WireError:
    return WireError(f"Unrecognized request argument supplied: {name}", code=None)


def validate_headers(headers: Mapping[str, str], api_key: str, entra_token: str) -> None:
    key = headers.get("api-key")
    auth = headers.get("Authorization", "")
    if (key is not None and key == api_key) or (key is None and auth == f"Bearer {entra_token}"):
        return
    raise WireError(
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a "
        "valid key for an active subscription and use a correct regional API endpoint for your resource.",
        status=401,
        code="401",
    )


def validate_api_version(version: str | None) -> str:
    if version not in API_VERSIONS:
        raise WireError("Resource not found", status=404, code="404")
    assert version is not None
    return version


def _image_url(part: dict[str, Any], where: str) -> None:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else None
    if not isinstance(url, str) or not (
        url.startswith(("http://", "https://"))
        or re.match(r"^data:image/[\w.+-]+;base64,[A-Za-z0-9+/=]+$", url)
    ):
        raise WireError(f"Invalid image URL in '{where}.image_url.url'", param=f"{where}.image_url.url")


def _content(message: dict[str, Any], where: str) -> str:
    """The text of a message, after checking its content parts; returns it for JSON-mode checks."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise WireError(f"Invalid type for '{where}.content'", param=f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and message.get("role") == "user":
            _image_url(part, f"{where}.content[{j}]")
        else:
            raise WireError(
                f"Invalid value for '{where}.content[{j}].type'", param=f"{where}.content[{j}].type"
            )
    return " ".join(texts)


def _messages(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise WireError(
            "'messages' is a required property" if messages is None else "[] is too short - 'messages'",
            param="messages",
        )
    pending: set[str] = set()
    text = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise WireError(f"Invalid value for '{where}.role'", param=f"{where}.role")
        role = m["role"]
        if pending and role != "tool":
            raise WireError(
                "An assistant message with 'tool_calls' must be followed by tool messages "
                f"responding to each 'tool_call_id'. The following tool_call_ids did not have "
                f"response messages: {', '.join(sorted(pending))}",
                param="messages",
            )
        if role == "tool":
            call_id = m.get("tool_call_id")
            if call_id not in pending:
                raise WireError(
                    "Invalid parameter: messages with role 'tool' must be a response to a preceeding "
                    "message with 'tool_calls'.",
                    param=f"{where}.role",
                )
            pending.discard(call_id)
        if role == "assistant" and m.get("tool_calls") is not None:
            calls = m["tool_calls"]
            if not isinstance(calls, list) or not calls:
                raise WireError(f"Invalid value for '{where}.tool_calls'", param=f"{where}.tool_calls")
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if (
                    not isinstance(call.get("id"), str)
                    or call.get("type") != "function"
                    or not isinstance(fn, dict)
                    or not isinstance(fn.get("name"), str)
                    or not isinstance(fn.get("arguments"), str)
                ):
                    raise WireError(
                        f"Invalid value for '{where}.tool_calls[{j}]'", param=f"{where}.tool_calls[{j}]"
                    )
                pending.add(call["id"])
        elif m.get("content") is None and role != "assistant":
            raise WireError(f"Missing required parameter: '{where}.content'.", param=f"{where}.content")
        text.append(_content(m, where))
    if pending:
        raise WireError(
            "An assistant message with 'tool_calls' must be followed by tool messages responding "
            "to each 'tool_call_id'.",
            param="messages",
        )
    return " ".join(text)


def _tools(body: dict[str, Any]) -> set[str]:
    tools = body.get("tools")
    if tools is None:
        if body.get("tool_choice") is not None:
            raise WireError(
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                param="tool_choice",
            )
        return set()
    if not isinstance(tools, list) or not tools:
        raise WireError("[] is too short - 'tools'", param="tools")
    names = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if (
            tool.get("type") != "function"
            or not isinstance(fn, dict)
            or not _TOOL_NAME.match(str(fn.get("name")))
        ):
            raise WireError(f"Invalid 'tools[{i}].function.name'", param=f"tools[{i}].function.name")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise WireError(
                f"Invalid type for 'tools[{i}].function.parameters'", param=f"tools[{i}].function"
            )
        names.add(fn["name"])
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and (choice.get("function") or {}).get("name") not in names:
        raise WireError("Invalid value for 'tool_choice': no function named in 'tools'", param="tool_choice")
    if choice is not None and not isinstance(choice, dict) and choice not in ("none", "auto", "required"):
        raise WireError("Invalid value for 'tool_choice'", param="tool_choice")
    return names


def validate_chat(body: Any, api_version: str = "2024-10-21") -> None:
    """Raise :class:`WireError` for a chat body Azure would refuse."""
    if not isinstance(body, dict):
        raise WireError("'$' is not of type 'object'")
    for name in body:
        if name not in CHAT_FIELDS:
            raise _unrecognized(name)
    text = _messages(body.get("messages"))
    _tools(body)
    if "stream_options" in body:
        if api_version[:10] < STREAM_OPTIONS_SINCE:
            raise _unrecognized("stream_options")
        if not body.get("stream"):
            raise WireError(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
            )
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise WireError("Invalid value for 'response_format.type'", param="response_format.type")
        if kind == "json_object" and "json" not in text.lower():
            raise WireError(
                "'messages' must contain the word 'json' in some form, to use 'response_format' of "
                "type 'json_object'.",
                param="messages",
            )
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise WireError(
                    "Missing required parameter: 'response_format.json_schema.name'.",
                    param="response_format.json_schema.name",
                )


def validate_embeddings(body: Any) -> list[str]:
    if not isinstance(body, dict) or "input" not in body:
        raise WireError("'input' is a required property", param="input")
    value = body["input"]
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(i, str) and i for i in items):
        raise WireError("'$.input' is invalid.", param="input")
    if body.get("encoding_format") not in (None, "float", "base64"):
        raise WireError("Invalid value for 'encoding_format'", param="encoding_format")
    return items


def sample(schema: Any) -> Any:
    """A small value that fits a JSON schema, as a model would produce."""
    if not isinstance(schema, dict):
        return "fake"
    if schema.get("type") == "object" or "properties" in schema:
        return {k: sample(v) for k, v in (schema.get("properties") or {"answer": {}}).items()}
    if schema.get("enum"):
        return schema["enum"][0]
    return {"array": [], "integer": 1, "number": 1.5, "boolean": True}.get(str(schema.get("type")), "fake")


@dataclass
class Reply:
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str = "stop"
    filtered: dict[str, Any] | None = None


@dataclass
class Fault:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict[str, Any]
    at: float


def default_reply(body: dict[str, Any], deployment: str) -> Reply:
    messages = body["messages"]
    last = messages[-1]
    prompt = " ".join(str(m.get("content")) for m in messages).lower()
    if BLOCKED_OUTPUT in prompt:
        return Reply(
            "It was a dark",
            finish_reason="content_filter",
            filtered={**SAFE, "violence": {"filtered": True, "severity": "high"}},
        )
    tools = [t["function"] for t in body.get("tools") or []]
    choice = body.get("tool_choice")
    if tools and choice != "none" and last["role"] != "tool":
        if isinstance(choice, dict):
            tools = [t for t in tools if t["name"] == choice["function"]["name"]]
        if body.get("parallel_tool_calls") is False:
            tools = tools[:1]
        calls = [
            {
                "id": f"call_{i}abc",
                "type": "function",
                "function": {
                    "name": t["name"],
                    "arguments": orjson.dumps(sample(t.get("parameters"))).decode(),
                },
            }
            for i, t in enumerate(tools[:2])
        ]
        return Reply(None, calls, "tool_calls")
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        return Reply(orjson.dumps(sample(fmt["json_schema"].get("schema"))).decode())
    if fmt.get("type") == "json_object":
        return Reply('{"answer": "azure"}')
    if last["role"] == "tool":
        return Reply(f"the tool said {last.get('content')}")
    return Reply(f"azure {deployment} says hi")


def usage_for(body: dict[str, Any], reply: Reply) -> dict[str, Any]:
    prompt = len(orjson.dumps(body.get("messages")).split(b" ")) + 7
    completion = len((reply.content or "").split()) + 9 * len(reply.tool_calls or [])
    return {
        "completion_tokens": completion,
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 2, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


def completion_doc(body: dict[str, Any], reply: Reply, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {
        "content": reply.content if not reply.filtered else None,
        "refusal": None,
        "role": "assistant",
    }
    if reply.tool_calls:
        message["tool_calls"] = reply.tool_calls
    return {
        "choices": [
            {
                "content_filter_results": reply.filtered or SAFE,
                "finish_reason": reply.finish_reason,
                "index": 0,
                "logprobs": None,
                "message": message,
            }
        ],
        "created": 1730000000,
        "id": "chatcmpl-AZfake",
        "model": model,
        "object": "chat.completion",
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": SAFE}],
        "system_fingerprint": "fp_azure01",
        "usage": usage_for(body, reply),
    }


def stream_chunks(body: dict[str, Any], reply: Reply, model: str) -> list[dict[str, Any]]:
    """The chunks Azure streams for ``reply``, in order (without ``[DONE]``)."""
    base = {
        "created": 1730000000,
        "id": "chatcmpl-AZfake",
        "model": model,
        "object": "chat.completion.chunk",
        "system_fingerprint": "fp_azure01",
    }

    def choice(delta: dict[str, Any], finish: str | None = None, filters: Any = SAFE) -> dict[str, Any]:
        return {
            **base,
            "choices": [
                {
                    "content_filter_results": filters,
                    "delta": delta,
                    "finish_reason": finish,
                    "index": 0,
                    "logprobs": None,
                }
            ],
        }

    chunks: list[dict[str, Any]] = [
        {
            "choices": [],
            "created": 0,
            "id": "",
            "model": "",
            "object": "",
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": SAFE}],
        },
        choice({"content": "", "refusal": None, "role": "assistant"}, filters={}),
    ]
    for i, word in enumerate((reply.content or "").split(" ") if reply.content else []):
        chunks.append(choice({"content": (" " if i else "") + word}))
    for index, call in enumerate(reply.tool_calls or []):
        args = call["function"]["arguments"]
        chunks.append(
            choice(
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
        for a in range(0, len(args), 4):
            chunks.append(
                choice({"tool_calls": [{"index": index, "function": {"arguments": args[a : a + 4]}}]})
            )
    chunks.append(choice({}, reply.finish_reason, reply.filtered or {}))
    if (body.get("stream_options") or {}).get("include_usage"):
        chunks.append({**base, "choices": [], "usage": usage_for(body, reply)})
    return chunks


def stream_bytes(body: dict[str, Any], reply: Reply, model: str = "gpt-4o-2024-08-06") -> bytes:
    return (
        b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in stream_chunks(body, reply, model))
        + b"data: [DONE]\n\n"
    )


def embedding_vector(text: str, dims: int = 4) -> list[float]:
    return [round((sum(map(ord, text)) % (97 + i)) / 100, 4) for i in range(dims)]


class FakeAzure(FakeServer):
    def __init__(
        self,
        api_key: str = "azure-key-test",
        entra_token: str = "entra-token-test",
        deployments: tuple[str, ...] = ("gpt4o-prod", "embed-prod"),
        context_chars: int = 4000,
        model: str = "gpt-4o-2024-08-06",
    ) -> None:
        self.api_key, self.entra_token = api_key, entra_token
        self.deployments, self.context_chars, self.model = set(deployments), context_chars, model
        self.seen: list[Seen] = []
        self.faults: list[Fault] = []
        self.replies: list[Reply] = []
        self._lock = threading.Lock()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/openai/deployments/{deployment}/{operation:.+}", self._handle)
        app.router.add_post("/openai/responses", self._responses)
        app.router.add_post("/openai/v1/responses", self._responses)
        self.server = ThreadedApp(app)

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self.replies.extend(replies)

    @property
    def last(self) -> Seen:
        return self.seen[-1]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            version = validate_api_version(request.query.get("api-version"))
            validate_headers(request.headers, self.api_key, self.entra_token)
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                raise WireError("We could not parse the JSON body of your request.") from None
            self.seen.append(
                Seen(request.path, dict(request.query), dict(request.headers), body, time.monotonic())
            )
            deployment = request.match_info["deployment"]
            if deployment not in self.deployments:
                raise WireError(
                    "The API deployment for this resource does not exist. If you created the deployment "
                    "within the last 5 minutes, please wait a moment and try again.",
                    status=404,
                    code="DeploymentNotFound",
                )
            with self._lock:
                fault = self.faults.pop(0) if self.faults else None
            if fault is not None:
                return web.Response(
                    status=fault.status,
                    body=orjson.dumps(fault.body),
                    content_type="application/json",
                    headers=fault.headers,
                )
            operation = request.match_info["operation"]
            if operation == "chat/completions":
                return await self._chat(request, body, version)
            if operation == "embeddings":
                return self._embeddings(body)
            if operation == "completions":
                if not isinstance(body.get("prompt"), str | list):
                    raise WireError("'prompt' is a required property", param="prompt")
                return web.json_response(
                    {
                        "id": "cmpl-fake",
                        "object": "text_completion",
                        "created": 1,
                        "model": self.model,
                        "choices": [
                            {"index": 0, "text": "azure text", "logprobs": None, "finish_reason": "stop"}
                        ],
                        "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
                    }
                )
            raise WireError("Resource not found", status=404, code="404")
        except WireError as err:
            return err.response()

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        """Azure's Responses API: no deployment in the path (the body's ``model`` names it); the
        dated surface ``/openai/responses`` needs an api-version of 2025-03-01-preview or later, the
        v1 surface ``/openai/v1/responses`` none (or ``preview``)."""
        try:
            version = request.query.get("api-version")
            if request.path == "/openai/responses":
                if version not in API_VERSIONS or version < RESPONSES_SINCE:
                    raise WireError("Resource not found", status=404, code="404")
            elif version not in (None, "preview"):
                raise WireError("Resource not found", status=404, code="404")
            validate_headers(request.headers, self.api_key, self.entra_token)
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                raise WireError("We could not parse the JSON body of your request.") from None
            self.seen.append(
                Seen(request.path, dict(request.query), dict(request.headers), body, time.monotonic())
            )
            if body.get("model") not in self.deployments:
                raise WireError(
                    "The API deployment for this resource does not exist.", 404, "DeploymentNotFound"
                )
            try:
                responses_wire.validate_request(body)
            except responses_wire.ResponsesWireError as err:
                raise WireError(err.message, err.status, param=err.param) from None
            return await responses_wire.answer(request, body, "azure says hi")
        except WireError as err:
            return err.response()

    async def _chat(self, request: web.Request, body: dict[str, Any], version: str) -> web.StreamResponse:
        validate_chat(body, version)
        prompt = " ".join(str(m.get("content")) for m in body["messages"])
        if BLOCKED_PROMPT in prompt.lower():
            filtered = {**SAFE, "violence": {"filtered": True, "severity": "medium"}}
            raise WireError(
                "The response was filtered due to the prompt triggering Azure OpenAI's content "
                "management policy. Please modify your prompt and retry.",
                code="content_filter",
                param="prompt",
                inner={"code": "ResponsibleAIPolicyViolation", "content_filter_result": filtered},
            )
        if len(prompt) > self.context_chars:
            raise WireError(
                f"This model's maximum context length is 128000 tokens. However, your messages "
                f"resulted in {len(prompt) * 40} tokens. Please reduce the length of the messages.",
                code="context_length_exceeded",
                param="messages",
            )
        with self._lock:
            reply = self.replies.pop(0) if self.replies else None
        reply = reply or default_reply(body, request.match_info["deployment"])
        if not body.get("stream"):
            return web.Response(
                body=orjson.dumps(completion_doc(body, reply, self.model)),
                content_type="application/json",
                headers={"apim-request-id": "fake"},
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        for chunk in stream_chunks(body, reply, self.model):
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            await asyncio.sleep(0)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _embeddings(self, body: dict[str, Any]) -> web.Response:
        texts = validate_embeddings(body)
        dims = body.get("dimensions") or 4
        data = []
        for i, text in enumerate(texts):
            vector = embedding_vector(text, dims)
            value: Any = vector
            if body.get("encoding_format") == "base64":
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(t.split()) for t in texts)
        return web.json_response(
            {
                "object": "list",
                "model": "text-embedding-3-small",
                "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )
