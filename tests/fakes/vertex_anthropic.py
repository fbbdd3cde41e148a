"""Claude on the fake Vertex AI: rawPredict, streamRawPredict and count-tokens:rawPredict.

What Vertex AI documents for Anthropic models: ``POST /v1/projects/{project}/locations/{location}/
publishers/anthropic/models/{model}:rawPredict`` (``:streamRawPredict``, answered as Anthropic's
SSE stream, for bodies with ``stream: true``) with an OAuth access token; the body is Anthropic's
Messages request without ``model`` (the URL names it) and with ``anthropic_version:
vertex-2023-10-16``; betas in the ``anthropic-beta`` header. ``models/count-tokens:rawPredict``
takes the body with its ``model`` and answers ``{"input_tokens": N}``. Errors of the model come in
Anthropic's shape, errors of the platform (token, project) in Google's.
"""

from __future__ import annotations

import re
import time
from typing import Any

import orjson
from aiohttp import web

from tests.fakes.anthropic_upstream import FakeAnthropic, Seen, frame, prompt_words, stream_events
from tests.fakes.anthropic_wire import WireError, validate_count_request, validate_request
from tests.fakes.gemini_upstream import FakeGemini, google_error

VERTEX_VERSION = "vertex-2023-10-16"
_BETA = re.compile(r"[a-z0-9.-]+(\s*,\s*[a-z0-9.-]+)*")


class FakeVertexClaude(FakeGemini):
    """The Vertex AI fake with Claude models published by Anthropic."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: What Claude answers (scripts, faults, the prompt cache); never served itself.
        self.claude = FakeAnthropic()
        #: Claude requests as received: (path, headers, body).
        self.claude_seen: list[tuple[str, dict[str, str], Any]] = []
        self.server.app.router.add_post(
            "/v1/projects/{project}/locations/{location}/publishers/anthropic/models/{call}", self._claude
        )

    def _denied(self, request: web.Request) -> web.Response | None:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if self.tokens.get(token, 0) < time.time():
            return google_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
        if request.match_info["project"] != self.project or request.match_info["location"] != self.location:
            return google_error(403, "PERMISSION_DENIED", "Permission denied on resource project.")
        return None

    async def _claude(self, request: web.Request) -> web.StreamResponse:
        denied = self._denied(request)
        if denied is not None:
            return denied
        model, _, method = request.match_info["call"].partition(":")
        try:
            doc = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        self.claude_seen.append((request.path, dict(request.headers), doc))
        try:
            beta = request.headers.get("anthropic-beta")
            if beta is not None and not _BETA.fullmatch(beta):
                raise WireError(f"anthropic-beta: Unexpected value(s) {beta!r}")
            if not isinstance(doc, dict) or doc.get("anthropic_version") != VERTEX_VERSION:
                raise WireError(f"anthropic_version: Input should be {VERTEX_VERSION!r}")
            body = {k: v for k, v in doc.items() if k != "anthropic_version"}
            if model == "count-tokens" and method == "rawPredict":
                validate_count_request(body)
                return web.json_response({"input_tokens": prompt_words(body)})
            if "model" in body:
                raise WireError("model: Extra inputs are not permitted")
            if method not in ("rawPredict", "streamRawPredict"):
                return google_error(404, "NOT_FOUND", f"method {method!r} not found")
            if (method == "streamRawPredict") != bool(body.get("stream")):
                raise WireError("stream: streamRawPredict takes stream: true, rawPredict does not")
            body["model"] = model
            validate_request(body)
        except WireError as err:
            return err.response()
        return await self._answer(request, body, model)

    async def _answer(self, request: web.Request, body: dict[str, Any], model: str) -> web.StreamResponse:
        self.claude.seen.append(Seen(dict(request.headers), body, time.monotonic()))
        fault, message = self.claude.answer(body, model)
        if fault is not None and fault.status is not None:
            payload = fault.body or {"type": "error", "error": {"type": "api_error", "message": "injected"}}
            return web.json_response(payload, status=fault.status)
        if not body.get("stream"):
            return web.json_response(message)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        for event, data in stream_events(message, fault.stream_error if fault else None):
            await resp.write(frame(event, data))
        await resp.write_eof()
        return resp
