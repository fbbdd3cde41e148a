"""The request path: authenticate, validate, pick a deployment, call it, meter.

Everything here runs per request, so it stays lean: upstream bytes are passed
through untouched wherever the client's format matches the upstream's, and
logging happens through a queue off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from . import _metrics as metrics
from ._errors import (
    AuthenticationError,
    InvalidRequestError,
    KubellmError,
    ModelNotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    UpstreamTimeoutError,
)
from ._sse import DONE, frame
from ._state import Deployment, ModelGroup, RouterState, VirtualKey
from ._upstream import UpstreamPool
from ._validate import parse_body, validate
from .providers import Operation, Payload, RequestContext, StreamTranslator, UpstreamResponse, Usage

access_log = logging.getLogger("kubellm.access")

JSON = "application/json"


class ClientDisconnected(Exception):
    """The client went away before the answer was ready."""


@dataclass(slots=True)
class Caller:
    is_master: bool
    key: VirtualKey | None

    @property
    def label(self) -> str:
        if self.key is not None:
            return self.key.config.name
        return "master" if self.is_master else "anonymous"


def error_response(err: KubellmError, headers: dict[str, str] | None = None) -> Response:
    return Response(
        err.to_json(), status_code=err.status, media_type=JSON, headers={**err.headers, **(headers or {})}
    )


def authenticate(state: RouterState, request: Request) -> Caller:
    if not state.auth_required:
        return Caller(False, None)
    header = request.headers.get("authorization")
    if header is None:
        presented = request.headers.get("api-key") or request.headers.get("x-api-key")
        if presented is None:
            raise AuthenticationError(
                "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key"
            )
    else:
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise AuthenticationError("malformed Authorization header: expected 'Bearer <key>'")
        presented = presented.strip()
    is_master, key = state.find_key(presented)
    if not is_master and key is None:
        raise AuthenticationError("invalid API key")
    if key is not None and key.config.disabled:
        raise AuthenticationError(f"API key {key.config.name!r} is disabled", code="key_disabled")
    return Caller(is_master, key)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequestError("invalid Content-Length header", code="invalid_header")
        if int(declared) > limit:
            raise PayloadTooLargeError(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        return await request.body()
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
        parts.append(part)
    return b"".join(parts)


async def _cancel_on_disconnect(request: Request, task: asyncio.Task[Any]) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            task.cancel("client disconnected")
            return


class Router:
    """Serves requests against the current :class:`RouterState`."""

    def __init__(self, state: RouterState) -> None:
        self.state = state
        self.upstream = UpstreamPool()
        self.rng = random.Random()
        self.draining = False

    async def handle(self, operation: Operation, request: Request) -> Response:
        started = time.perf_counter()
        state = self.state  # one snapshot for the whole request, even across a reload
        request_id = uuid.uuid4().hex
        try:
            caller = authenticate(state, request)
            raw = await read_body(request, state.config.settings.max_request_body_bytes)
            body = parse_body(raw)
            model, stream, include_usage = validate(operation, body)
            group = state.groups.get(model)
            if group is None:
                raise ModelNotFoundError(f"the model {model!r} does not exist", param="model")
            if caller.key is not None and not caller.key.may_use(group.name):
                raise PermissionDeniedError(
                    f"API key {caller.key.config.name!r} may not use model {group.name!r}", param="model"
                )
        except KubellmError as err:
            metrics.ERRORS.labels("", err.type).inc()
            return error_response(err, {"x-request-id": request_id})
        ctx_args = (request_id, operation, group.name, stream, include_usage)
        current = asyncio.current_task()
        assert current is not None
        watcher = asyncio.get_running_loop().create_task(_cancel_on_disconnect(request, current))
        metrics.IN_FLIGHT.labels(group.name).inc()
        try:
            return await self._attempts(group, body, ctx_args, caller, started)
        except asyncio.CancelledError:
            if not watcher.done() or current.cancelling() == 0:
                raise
            current.uncancel()
            metrics.REQUESTS.labels(group.name, "", caller.label, "499").inc()
            return Response(status_code=499)
        finally:
            watcher.cancel()
            metrics.IN_FLIGHT.labels(group.name).dec()

    async def _attempts(
        self,
        group: ModelGroup,
        body: dict[str, Any],
        ctx_args: tuple[str, Operation, str, bool, bool],
        caller: Caller,
        started: float,
    ) -> Response:
        request_id, operation, public_model, stream, include_usage = ctx_args
        candidates = [d for d in group.ordered_candidates(self.rng) if operation in d.provider.operations]
        if not candidates:
            err: KubellmError = InvalidRequestError(
                f"no deployment of model {group.name!r} supports {operation.value} requests", param="model"
            )
            return error_response(err, {"x-request-id": request_id})
        budget = self.state.config.settings.num_retries + 1
        attempt = 0
        last: KubellmError | None = None
        while attempt < budget:
            dep = candidates[attempt % len(candidates)]
            attempt += 1
            if attempt > 1:
                metrics.RETRIES.labels(group.name).inc()
            ctx = RequestContext(
                request_id, operation, public_model, dep.config, stream, include_usage, api_key=dep.api_key
            )
            headers = {
                "x-request-id": request_id,
                "x-kubellm-model-group": group.name,
                "x-kubellm-deployment": dep.name,
                "x-kubellm-attempts": str(attempt),
            }
            dep.in_flight += 1
            handed_off = False
            try:
                resp = await dep.provider.send(self.upstream, body, ctx)
                if resp.status >= 400:
                    raw = await resp.read()
                    raise dep.provider.map_error(resp.status, resp.headers, raw)
                if stream:
                    response = await self._open_stream(dep, resp, ctx, headers, caller, started)
                    handed_off = True
                    return response
                raw = await resp.read()
                parsed = dep.provider.parse_response(raw, ctx)
                self._finish(dep, ctx, caller, started, "200", parsed.usage, None)
                return Response(parsed.body, media_type=JSON, headers=headers)
            except KubellmError as err:
                last = err
                if not err.retryable:
                    break
            finally:
                if not handed_off:
                    dep.in_flight -= 1
        assert last is not None
        metrics.ERRORS.labels(group.name, last.type).inc()
        self._finish(dep, ctx, caller, started, str(last.status), None, None)
        return error_response(last, headers)

    async def _open_stream(
        self,
        dep: Deployment,
        resp: UpstreamResponse,
        ctx: RequestContext,
        headers: dict[str, str],
        caller: Caller,
        started: float,
    ) -> Response:
        """Read until the first chunk is ready, so failures before any byte can still be retried."""
        translator = dep.provider.stream_translator(ctx)
        chunks = resp.iter_chunks().__aiter__()
        first: list[Payload] = []
        ended = False
        try:
            async with asyncio.timeout(dep.config.timeouts.first_token):
                while not first:
                    try:
                        data = await anext(chunks)
                    except StopAsyncIteration:
                        first = translator.finish()
                        ended = True
                        break
                    first = translator.feed(data)
        except TimeoutError:
            resp.close()
            raise UpstreamTimeoutError(
                f"deployment {dep.name!r} sent no first token in time", code="first_token_timeout"
            ) from None
        except BaseException:
            resp.close()
            raise
        headers["cache-control"] = "no-cache"
        headers["x-accel-buffering"] = "no"
        body = self._relay(dep, resp, chunks, translator, first, ended, ctx, caller, started)
        return StreamingResponse(body, media_type="text/event-stream", headers=headers)

    async def _relay(
        self,
        dep: Deployment,
        resp: UpstreamResponse,
        chunks: AsyncIterator[bytes],
        translator: StreamTranslator,
        first: list[Payload],
        ended: bool,
        ctx: RequestContext,
        caller: Caller,
        started: float,
    ) -> AsyncIterator[bytes]:
        status = "200"
        ttft: float | None = None
        try:
            yield b"".join(frame(p) for p in first)
            ttft = time.perf_counter() - started
            if not ended:
                async for data in chunks:
                    out = translator.feed(data)
                    if out:
                        yield b"".join(frame(p) for p in out)
                tail = translator.finish()
                if tail:
                    yield b"".join(frame(p) for p in tail)
            if translator.error is not None:
                raise translator.error
            yield DONE
        except KubellmError as err:
            status = str(err.status)
            metrics.ERRORS.labels(ctx.public_model, err.type).inc()
            # The stream has begun, so the error travels as an event; no [DONE] follows it.
            yield frame(err.to_dict())
        except BaseException:
            status = "499"
            raise
        finally:
            resp.close()
            dep.in_flight -= 1
            self._finish(dep, ctx, caller, started, status, translator.usage, ttft)

    def _finish(
        self,
        dep: Deployment,
        ctx: RequestContext,
        caller: Caller,
        started: float,
        status: str,
        usage: Usage | None,
        ttft: float | None,
    ) -> None:
        elapsed = time.perf_counter() - started
        group = ctx.public_model
        metrics.REQUESTS.labels(group, dep.name, caller.label, status).inc()
        metrics.LATENCY.labels(group, dep.name).observe(elapsed)
        if ttft is not None:
            metrics.TTFT.labels(group, dep.name).observe(ttft)
        if usage is not None:
            metrics.TOKENS.labels(group, dep.name, caller.label, "prompt").inc(usage.prompt_tokens)
            metrics.TOKENS.labels(group, dep.name, caller.label, "completion").inc(usage.completion_tokens)
        if self.state.config.settings.access_log and access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "request",
                extra={
                    "fields": {
                        "request_id": ctx.request_id,
                        "operation": ctx.operation.value,
                        "model_group": group,
                        "deployment": dep.name,
                        "key": caller.label,
                        "status": int(status),
                        "stream": ctx.stream,
                        "latency_ms": round(elapsed * 1000, 3),
                        "ttft_ms": round(ttft * 1000, 3) if ttft is not None else None,
                        "prompt_tokens": usage.prompt_tokens if usage else None,
                        "completion_tokens": usage.completion_tokens if usage else None,
                    }
                },
            )
