"""Replicate: language models run as predictions, streamed over Replicate's own SSE.

One chat request takes several HTTP round trips, so this provider overrides ``send``:

* not streamed: create the prediction in sync mode (``Prefer: wait=n``); if it has not
  finished when the wait ends, poll ``urls.get`` until its status is terminal, within
  the deployment's total timeout (then it is canceled);
* streamed: create it with ``"stream": true``, GET ``urls.stream`` (events ``output``,
  ``error``, ``done``), and after ``done`` GET ``urls.get`` once for the token counts
  in ``metrics``; a stream the client abandons cancels the prediction.

``upstreamModel`` is ``owner/name`` (an official model: ``POST /models/{owner}/{name}/predictions``)
or ``owner/name:<version id>`` / a bare 64-hex version id (``POST /predictions`` with ``version``).
Chat messages become the inputs of Replicate's LLM schema (``meta/meta-llama-3-70b-instruct``):
system messages join into ``system_prompt``; one user message is the ``prompt`` verbatim, a longer
history a ``User: …`` / ``Assistant: …`` transcript. Models of the older schema (Llama 2, Mistral 7B,
Mixtral) take ``max_new_tokens`` and a temperature of at least 0.01. ``stop`` becomes the
comma-joined ``stop_sequences``. Tools, images, ``response_format``, logprobs, ``n`` > 1 and stop
sequences containing a comma have no Replicate equivalent: 400 unless ``dropUnsupportedParams``;
``user`` is dropped (Replicate has no end-user field). Usage comes from the prediction's
``metrics.input_token_count``/``output_token_count``; without them it is left unknown.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from .._errors import (
    ContentFilterError,
    ContextLengthExceededError,
    InvalidRequestError,
    KubellmError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from .._sse import SSEDecoder, SSEEvent
from ._base import (
    Payload,
    Provider,
    ProviderResponse,
    RequestContext,
    StreamTranslator,
    UpstreamClient,
    UpstreamRequest,
    UpstreamResponse,
    Usage,
    extract_error_message,
    map_status_error,
)
from ._translate import ChunkBuilder, chat_completion, content_text, max_tokens, reject_unsupported, stop_list

PROVIDER = "replicate"
TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
_TOOLS = frozenset({"tools", "tool_choice", "functions", "function_call"})
_UNSUPPORTED = _TOOLS | {"response_format", "logprobs", "top_logprobs", "logit_bias", "audio", "modalities"}
_VERSION_ID = re.compile(r"^[0-9a-f]{64}$")
_MODEL = re.compile(r"^(?P<owner>[\w.-]+)/(?P<name>[\w.-]+)(?::(?P<version>[0-9a-f]{64}))?$")
#: Models whose input schema predates Llama 3's: ``max_new_tokens``, no presence/frequency penalty.
_LEGACY_SCHEMA = ("meta/llama-2-", "mistralai/mistral-7b-instruct", "mistralai/mixtral-8x7b-instruct")
_CONTEXT = re.compile(
    r"(input|prompt) (is )?too long|context.length|context window|maximum context|sequence length"
    r"|too many tokens"
)
_FILTER = re.compile(r"nsfw|safety|content.policy|flagged as sensitive")
_POLL_FIRST, _POLL_MAX = 0.1, 1.0


# --- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelRef:
    owner_name: str | None
    version: str | None


def parse_model_ref(ref: str) -> ModelRef:
    if _VERSION_ID.match(ref):
        return ModelRef(None, ref)
    match = _MODEL.match(ref)
    if match is None:
        raise InvalidRequestError(
            f"replicate: upstreamModel {ref!r} is not owner/name, owner/name:<version id> or a version id",
            param="model",
        )
    return ModelRef(f"{match['owner']}/{match['name']}", match["version"])


def _unsupported(ctx: RequestContext, param: str, what: str) -> None:
    if not ctx.deployment.drop_unsupported_params:
        raise InvalidRequestError(
            f"provider 'replicate' does not support {what} in {param!r} "
            f"(set dropUnsupportedParams on deployment {ctx.deployment.name!r} to drop it)",
            param=param,
            code="unsupported_parameter",
        )


def _message_text(content: Any, where: str, ctx: RequestContext) -> str:
    if isinstance(content, list):
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") != "text":
                _unsupported(ctx, f"{where}.content[{j}]", f"{part.get('type')} content")
    return content_text(content)


def openai_messages_to_replicate_prompt(
    messages: list[dict[str, Any]], ctx: RequestContext
) -> tuple[str | None, str]:
    """``system_prompt`` (None if there is no system message) and ``prompt``."""
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        role, where = message.get("role"), f"messages[{i}]"
        if role in ("system", "developer"):
            system.append(_message_text(message.get("content"), where, ctx))
        elif role in ("tool", "function"):
            _unsupported(ctx, where, "tool results")
            turns.append(("Tool", _message_text(message.get("content"), where, ctx)))
        else:
            if message.get("tool_calls") or message.get("function_call"):
                _unsupported(ctx, f"{where}.tool_calls", "tool calls")
            text = _message_text(message.get("content"), where, ctx)
            if role == "user" or text:
                turns.append(("User" if role == "user" else "Assistant", text))
    if len(turns) == 1 and turns[0][0] == "User":
        prompt = turns[0][1]
    else:
        prompt = "\n\n".join(f"{who}: {text}" for who, text in turns)
    return ("\n\n".join(system) if system else None), prompt


def openai_request_to_replicate_input(body: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
    body = dict(body)
    if body.get("logprobs") is False:
        body.pop("logprobs")
    if body.get("n") not in (None, 1):
        _unsupported(ctx, "n", "more than one choice")
    reject_unsupported(body, _UNSUPPORTED, ctx, PROVIDER)
    legacy = ctx.upstream_model.startswith(_LEGACY_SCHEMA)
    system, prompt = openai_messages_to_replicate_prompt(body["messages"], ctx)
    out: dict[str, Any] = {"prompt": prompt}
    if system is not None:
        out["system_prompt"] = system
    limit = max_tokens(body)
    if limit is not None:
        out["max_new_tokens" if legacy else "max_tokens"] = limit
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None:
            out[name] = max(value, 0.01) if legacy else value
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) is not None:
            if legacy:
                _unsupported(ctx, name, "this parameter for this model")
            else:
                out[name] = body[name]
    if body.get("seed") is not None:
        out["seed"] = body["seed"]
    stops = stop_list(body)
    if stops:
        if any("," in s for s in stops):  # Replicate takes one comma-separated string
            _unsupported(ctx, "stop", "stop sequences containing a comma")
            stops = [s for s in stops if "," not in s]
        if stops:
            out["stop_sequences"] = ",".join(stops)
    return out


# --- responses ----------------------------------------------------------------------------------


def replicate_error_to_openai(message: str) -> KubellmError:
    """A failed prediction's ``error`` string (or a stream ``error`` event) as a router error."""
    lowered = message.lower()
    if _CONTEXT.search(lowered):
        return ContextLengthExceededError(f"replicate: {message}", param="messages")
    if _FILTER.search(lowered):
        return ContentFilterError(f"replicate: {message}")
    # CUDA out of memory, a crashed worker...: another attempt may well succeed.
    return UpstreamStatusError(
        f"replicate: prediction failed: {message}", status=502, code="prediction_failed"
    )


def replicate_prediction_error(prediction: dict[str, Any]) -> KubellmError:
    status = prediction.get("status")
    if status == "failed":
        return replicate_error_to_openai(str(prediction.get("error") or "no reason given"))
    if status in ("canceled", "aborted"):
        err = f"prediction_{status}"
        return UpstreamStatusError(f"replicate: the prediction was {status}", status=502, code=err)
    return UpstreamTimeoutError(f"replicate: the prediction did not finish in time (status {status!r})")


def replicate_usage(prediction: dict[str, Any] | None) -> Usage | None:
    metrics = prediction.get("metrics") if prediction else None
    if not isinstance(metrics, dict):
        return None
    prompt, completion = metrics.get("input_token_count"), metrics.get("output_token_count")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(prompt_tokens=prompt, completion_tokens=completion)


def replicate_finish_reason(prediction: dict[str, Any] | None, usage: Usage | None) -> str:
    """``length`` when the model produced as many tokens as it was allowed; else ``stop``."""
    inputs = prediction.get("input") if prediction else None
    if usage is not None and isinstance(inputs, dict):
        limit = inputs.get("max_tokens", inputs.get("max_new_tokens"))
        if isinstance(limit, int) and usage.completion_tokens >= limit:
            return "length"
    return "stop"


def replicate_output_to_text(output: Any) -> str:
    if output is None:
        return ""
    if isinstance(output, str):
        return output
    if isinstance(output, list) and all(isinstance(piece, str) for piece in output):
        return "".join(output)
    raise UpstreamProtocolError("replicate: the model's output is not text")


def _prediction(raw: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError("replicate: upstream answered with a body that is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("status"), str):
        raise UpstreamProtocolError("replicate: upstream answered with something that is not a prediction")
    return doc


def _urls(prediction: dict[str, Any]) -> dict[str, str]:
    urls = prediction.get("urls")
    return {k: v for k, v in urls.items() if isinstance(v, str)} if isinstance(urls, dict) else {}


@dataclass(slots=True)
class _StreamSession:
    """What ``send`` learns of one streamed prediction and its translator needs."""

    prediction_id: str | None = None
    final: dict[str, Any] | None = None


class ReplicateStreamTranslator(StreamTranslator):
    """Replicate's ``output``/``error``/``done`` events to OpenAI chunks."""

    terminator = "event: done"

    def __init__(self, ctx: RequestContext, session: _StreamSession | None = None) -> None:
        self._session = session or _StreamSession()
        pid = self._session.prediction_id
        self._chunks = ChunkBuilder(ctx, f"chatcmpl-{pid}" if pid else None)
        self._decoder = SSEDecoder()
        self._emitted = False
        self._done = False

    def feed(self, data: bytes) -> list[Payload]:
        return self._events(self._decoder.feed(data))

    def flush(self) -> list[Payload]:
        out = self._events(self._decoder.close())
        self.usage = replicate_usage(self._session.final)
        if self._done and self.error is None:
            out.append(self._chunks.finish(replicate_finish_reason(self._session.final, self.usage)))
            usage = self._chunks.usage(self.usage) if self.usage is not None else None
            if usage is not None:
                out.append(usage)
        return out

    def _events(self, events: list[SSEEvent]) -> list[Payload]:
        out: list[Payload] = []
        for event in events:
            if self._done or self.error is not None:
                break
            if event.event == "output":
                if event.data:
                    out.append(self._chunks.text(event.data.decode("utf-8", "replace")))
                    self._emitted = True
            elif event.event == "error":
                self._fail(replicate_error_to_openai(_event_detail(event.data)))
            elif event.event == "done":
                reason = _event_json(event.data).get("reason")
                if reason in ("canceled", "aborted"):
                    self._fail(replicate_prediction_error({"status": reason}))
                elif reason == "error":
                    self._fail(replicate_error_to_openai("the model reported an error"))
                self._done = self.complete = True
        return out

    def _fail(self, err: KubellmError) -> None:
        if self.error is None:
            self.error = err
        if not self._emitted:  # nothing sent yet: fail the request itself (retryable, real status)
            raise err


def _event_json(data: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(data) if data else {}
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _event_detail(data: bytes) -> str:
    doc = _event_json(data)
    detail = doc.get("detail") or doc.get("error") or doc.get("message")
    text = str(detail) if detail else data.decode("utf-8", "replace").strip()
    return text or "the model reported an error"


# --- the multi-step call ------------------------------------------------------------------------


class _Buffered:
    """A finished prediction handed to the router as if it were one HTTP response."""

    def __init__(self, body: bytes) -> None:
        self.status = 200
        self.headers: Mapping[str, str] = {"Content-Type": "application/json"}
        self._body = body

    async def read(self) -> bytes:
        return self._body

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        yield self._body

    def close(self) -> None:
        pass


class _PredictionStream:
    """The ``urls.stream`` response; after ``done`` it fetches the finished prediction for its usage."""

    def __init__(
        self,
        provider: ReplicateProvider,
        client: UpstreamClient,
        ctx: RequestContext,
        inner: UpstreamResponse,
        prediction: dict[str, Any],
        session: _StreamSession,
    ) -> None:
        self.status = inner.status
        self.headers = inner.headers
        self._provider, self._client, self._ctx = provider, client, ctx
        self._inner, self._urls, self._session = inner, _urls(prediction), session
        self._done = False

    async def read(self) -> bytes:
        return b"".join([c async for c in self.iter_chunks()])

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        decoder = SSEDecoder()  # only to notice 'done': the server may keep the connection open
        try:
            async for data in self._inner.iter_chunks():
                yield data
                if any(e.event == "done" for e in decoder.feed(data)):
                    self._done = True
                    break
        finally:
            self._inner.close()
        if self._done and "get" in self._urls:
            try:
                async with asyncio.timeout(5):
                    self._session.final = await self._provider.poll(
                        self._client, self._ctx, self._urls["get"], 5
                    )
            except (KubellmError, TimeoutError):
                pass  # usage stays unknown; the router estimates it

    def close(self) -> None:
        self._inner.close()
        self._provider.sessions.pop(self._ctx.request_id, None)
        if not self._done and "cancel" in self._urls:
            self._provider.cancel_soon(self._client, self._ctx, self._urls["cancel"])


class ReplicateProvider(Provider):
    name = PROVIDER
    default_api_key_env = "REPLICATE_API_TOKEN"
    default_base_url = "https://api.replicate.com/v1"

    def __init__(self) -> None:
        self.sessions: dict[str, _StreamSession] = {}
        self._background: set[asyncio.Task[None]] = set()

    def base_url(self, ctx: RequestContext) -> str:
        url = super().base_url(ctx)
        return url + "/v1" if urlsplit(url).path in ("", "/") else url

    def _headers(self, ctx: RequestContext, **extra: str) -> dict[str, str]:
        auth = {"Authorization": f"Bearer {ctx.api_key}"} if ctx.api_key else {}
        return {**auth, **extra, **ctx.deployment.headers}

    def build_request(self, body: dict[str, Any], ctx: RequestContext) -> UpstreamRequest:
        """The prediction's create request."""
        ref = parse_model_ref(ctx.upstream_model)
        payload: dict[str, Any] = {"input": openai_request_to_replicate_input(body, ctx)}
        if ref.version is not None:
            url = self.base_url(ctx) + "/predictions"
            payload = {"version": ref.version, **payload}
        else:
            url = f"{self.base_url(ctx)}/models/{ref.owner_name}/predictions"
        headers = self._headers(ctx, **{"Content-Type": "application/json"})
        if ctx.stream:
            payload["stream"] = True
        else:
            headers["Prefer"] = f"wait={_sync_wait(ctx)}"
        return UpstreamRequest("POST", url, headers, orjson.dumps(payload))

    async def send(
        self, client: UpstreamClient, body: dict[str, Any], ctx: RequestContext
    ) -> UpstreamResponse:
        deadline = asyncio.get_running_loop().time() + ctx.total_timeout
        created = await client.send(self.build_request(body, ctx), ctx)
        if created.status >= 400:
            return created
        raw = await created.read()
        prediction = _prediction(raw)
        urls = _urls(prediction)
        if ctx.stream:
            if prediction["status"] in TERMINAL - {"succeeded"}:
                raise replicate_prediction_error(prediction)
            if "stream" not in urls:
                if "cancel" in urls:
                    self.cancel_soon(client, ctx, urls["cancel"])
                raise InvalidRequestError(
                    f"replicate: model {ctx.upstream_model!r} does not stream its output; call it unstreamed",
                    param="stream",
                )
            get = UpstreamRequest(
                "GET",
                urls["stream"],
                self._headers(ctx, Accept="text/event-stream", **{"Cache-Control": "no-store"}),
            )
            inner = await client.send(get, ctx)
            if inner.status >= 400:
                return inner
            session = _StreamSession(prediction_id=str(prediction.get("id") or "") or None)
            self.sessions[ctx.request_id] = session
            return _PredictionStream(self, client, ctx, inner, prediction, session)
        if prediction["status"] in TERMINAL:
            return _Buffered(raw)
        if "get" not in urls:
            raise UpstreamProtocolError("replicate: the unfinished prediction has no 'urls.get' to poll")
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            final = await self.poll(client, ctx, urls["get"], remaining)
        except UpstreamTimeoutError:
            if "cancel" in urls:
                self.cancel_soon(client, ctx, urls["cancel"])
            raise
        return _Buffered(orjson.dumps(final))

    async def poll(
        self, client: UpstreamClient, ctx: RequestContext, url: str, budget: float
    ) -> dict[str, Any]:
        """GET the prediction until its status is terminal; rate limits and 5xx are waited out."""
        loop = asyncio.get_running_loop()
        deadline, interval = loop.time() + budget, _POLL_FIRST
        while True:
            resp = await client.send(UpstreamRequest("GET", url, self._headers(ctx)), ctx)
            raw = await resp.read()
            wait = interval
            if resp.status >= 400:
                if resp.status != 429 and resp.status < 500:
                    raise self.map_error(resp.status, resp.headers, raw)
                wait = max(interval, _retry_after(resp.headers))
            else:
                prediction = _prediction(raw)
                if prediction["status"] in TERMINAL:
                    return prediction
            left = deadline - loop.time()
            if left <= wait:
                raise UpstreamTimeoutError(f"replicate: the prediction did not finish within {budget:.0f}s")
            await asyncio.sleep(wait)
            interval = min(_POLL_MAX, interval * 1.5)

    def cancel_soon(self, client: UpstreamClient, ctx: RequestContext, url: str) -> None:
        """Stop paying for a prediction nobody waits for any more (best effort, in the background)."""

        async def cancel() -> None:
            try:
                resp = await client.send(UpstreamRequest("POST", url, self._headers(ctx)), ctx)
                resp.close()
            except KubellmError:
                pass

        try:
            task = asyncio.get_running_loop().create_task(cancel())
        except RuntimeError:
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def parse_response(self, raw: bytes, ctx: RequestContext) -> ProviderResponse:
        prediction = _prediction(raw)
        if prediction["status"] != "succeeded":
            raise replicate_prediction_error(prediction)
        usage = replicate_usage(prediction)
        text = replicate_output_to_text(prediction.get("output"))
        pid = prediction.get("id")
        body = chat_completion(
            ctx,
            content=text,
            finish_reason=replicate_finish_reason(prediction, usage),
            usage=usage,
            response_id=f"chatcmpl-{pid}" if pid else None,
        )
        return ProviderResponse(body, usage)

    def stream_translator(self, ctx: RequestContext) -> StreamTranslator:
        return ReplicateStreamTranslator(ctx, self.sessions.pop(ctx.request_id, None))

    def map_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> KubellmError:
        """Replicate answers errors as problem details: ``{"title", "detail", "status"}``."""
        message = _problem_message(raw)
        if status in (400, 413, 422) and _CONTEXT.search(message.lower()):
            return ContextLengthExceededError(f"replicate: {message}", param="messages")
        if status == 422:
            return InvalidRequestError(f"replicate: {message}", code="invalid_input")
        return map_status_error(status, headers, (message, None), provider=self.name)


def _problem_message(raw: bytes) -> str:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict) and (doc.get("detail") or doc.get("title")):
        return str(doc.get("detail") or doc.get("title"))
    return extract_error_message(raw)[0]


def _retry_after(headers: Mapping[str, str]) -> float:
    try:
        return min(float(headers.get("Retry-After") or 0), 10.0)
    except ValueError:
        return 0.0


def _sync_wait(ctx: RequestContext) -> int:
    """Seconds for ``Prefer: wait=n`` (1 to 60), inside the client's own read timeout."""
    t = ctx.effective_timeouts
    total = ctx.total_timeout
    limit = min(total, t.idle or t.first_token or total)
    return max(1, min(60, math.floor(limit - 1) if limit >= 2 else 1))
