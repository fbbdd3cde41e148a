"""A fake Replicate HTTP API that enforces the wire protocol of the official reference.

* ``POST /v1/models/{owner}/{name}/predictions`` (official models: no ``version``) and
  ``POST /v1/predictions`` (``version`` required: a 64-hex id, ``owner/name:<id>`` or ``owner/name``);
  ``Authorization: Bearer <token>``, ``Content-Type: application/json``, a body whose ``input``
  is an object that the model's input schema accepts (Llama 3's, or Llama 2's for ``meta/llama-2-*``:
  unknown fields, wrong types and out-of-range values are a 422 as on Replicate), ``stream`` a boolean.
* ``Prefer: wait`` / ``Prefer: wait=n`` (1 to 60) holds the create request until the prediction
  finishes or the wait ends; without it the create answers at once with status ``starting``.
* ``GET /v1/predictions/{id}`` (``urls.get``), ``POST /v1/predictions/{id}/cancel`` (``urls.cancel``).
* ``GET /stream/v1/predictions/{id}`` (``urls.stream``, standing in for streaming.api.replicate.com):
  ``Accept: text/event-stream`` required; events framed as Replicate frames them, each with an
  ``event:`` and an ``id:`` line, multi-line output split over several ``data:`` lines::

      event: output
      id: 1690212292:0
      data: Once upon a time...

  then ``event: done`` with ``data: {}`` (or ``{"reason": "error"}`` after an ``event: error``).
* Errors are problem details ``{"title", "detail", "status"}`` (``application/problem+json``).

A prediction "runs" for ``run_seconds``; its output is ``reply`` split into word pieces, cut at
``max_tokens`` (one piece, one token) and at the first stop sequence.
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

TOKEN = "r8_fake_token_0123456789abcdef"  # no word a message uses: see router/_redact.py
_VERSION = re.compile(r"^[0-9a-f]{64}$")
_MODEL = re.compile(r"^[\w.-]+/[\w.-]+$")
_PREFER = re.compile(r"^wait(?:=(\d+))?$")
_TOP_LEVEL = {"input", "version", "stream", "webhook", "webhook_completed", "webhook_events_filter"}

# The input schemas of meta/meta-llama-3-70b-instruct and meta/llama-2-70b-chat: (type, min, max).
Field = tuple[type, float | None, float | None]
LLAMA3: dict[str, Field] = {
    "prompt": (str, None, None),
    "system_prompt": (str, None, None),
    "max_tokens": (int, 1, None),
    "min_tokens": (int, 0, None),
    "temperature": (float, 0, 5),
    "top_p": (float, 0, 1),
    "top_k": (int, 0, None),
    "presence_penalty": (float, None, None),
    "frequency_penalty": (float, None, None),
    "length_penalty": (float, None, None),
    "stop_sequences": (str, None, None),
    "prompt_template": (str, None, None),
    "seed": (int, None, None),
    "log_performance_metrics": (bool, None, None),
    "max_new_tokens": (int, 1, None),
    "min_new_tokens": (int, -1, None),
}
LLAMA2: dict[str, Field] = {
    "prompt": (str, None, None),
    "system_prompt": (str, None, None),
    "max_new_tokens": (int, 1, None),
    "min_new_tokens": (int, -1, None),
    "temperature": (float, 0.01, 5),
    "top_p": (float, 0.01, 1),
    "top_k": (int, 0, None),
    "repetition_penalty": (float, 0.01, 5),
    "stop_sequences": (str, None, None),
    "seed": (int, None, None),
    "debug": (bool, None, None),
}


@dataclass
class Problem:
    status: int
    title: str
    detail: str
    headers: dict[str, str] = field(default_factory=dict)

    def response(self) -> web.Response:
        body = {"title": self.title, "detail": self.detail, "status": self.status}
        return web.Response(
            status=self.status,
            body=orjson.dumps(body),
            content_type="application/problem+json",
            headers=self.headers,
        )


def schema_for(model: str | None) -> dict[str, Field]:
    return LLAMA2 if model and model.startswith("meta/llama-2-") else LLAMA3


def validate_input(inputs: Any, model: str | None) -> Problem | None:
    if not isinstance(inputs, dict):
        return Problem(422, "Input validation failed", "- input: Invalid type. Expected: object")
    schema = schema_for(model)
    errors: list[str] = []
    for name, value in inputs.items():
        if name not in schema:
            errors.append(f"- input: Additional property {name} is not allowed")
            continue
        kind, low, high = schema[name]
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok:
            errors.append(f"- input.{name}: Invalid type. Expected: {kind.__name__}")
        elif low is not None and value < low:
            errors.append(f"- input.{name}: Must be greater than or equal to {low}")
        elif high is not None and value > high:
            errors.append(f"- input.{name}: Must be less than or equal to {high}")
    if errors:
        return Problem(422, "Input validation failed", "\n".join(errors))
    return None


def validate_create(path: str, headers: Mapping[str, str], body: Any, token: str = TOKEN) -> Problem | None:
    """Everything Replicate checks on a create request; None if it would be accepted."""
    if headers.get("Authorization") != f"Bearer {token}":
        return Problem(401, "Unauthenticated", "You did not pass a valid authentication token")
    if headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
        return Problem(415, "Unsupported Media Type", "Content-Type must be application/json")
    prefer = headers.get("Prefer")
    if prefer is not None:
        match = _PREFER.match(prefer.strip())
        if match is None or (match[1] is not None and not 1 <= int(match[1]) <= 60):
            return Problem(
                400, "Invalid Prefer header", "Prefer must be 'wait' or 'wait=n' with n from 1 to 60"
            )
    if not isinstance(body, dict):
        return Problem(400, "Invalid request", "The request body must be a JSON object")
    unknown = set(body) - _TOP_LEVEL
    if unknown:
        return Problem(422, "Invalid request", f"Additional property {sorted(unknown)[0]} is not allowed")
    if "stream" in body and not isinstance(body["stream"], bool):
        return Problem(422, "Invalid request", "- stream: Invalid type. Expected: boolean")
    official = re.fullmatch(r"/v1/models/([\w.-]+)/([\w.-]+)/predictions", path)
    if official is not None:
        if "version" in body:
            return Problem(422, "Invalid request", "version is not allowed when running an official model")
        model: str | None = f"{official[1]}/{official[2]}"
    elif path == "/v1/predictions":
        version = body.get("version")
        if not isinstance(version, str) or not version:
            return Problem(422, "Invalid request", "- version: version is required")
        model_part, _, vid = version.partition(":")
        if _VERSION.match(version):
            model = None
        elif (vid and _MODEL.match(model_part) and _VERSION.match(vid)) or _MODEL.match(version):
            model = model_part
        else:
            return Problem(422, "Invalid version", f"{version!r} is not a valid version")
    else:
        return Problem(404, "Not found", "The requested resource could not be found")
    if "input" not in body:
        return Problem(422, "Invalid request", "- input: input is required")
    return validate_input(body["input"], model)


@dataclass
class Prediction:
    id: str
    model: str
    version: str
    input: dict[str, Any]
    pieces: list[str]
    created: float
    finish_at: float
    fail_with: str | None = None
    stream_error: str | None = None
    status: str = "starting"
    input_tokens: int = 0

    def refresh(self, now: float) -> None:
        if self.status in ("succeeded", "failed", "canceled"):
            return
        if now >= self.finish_at:
            self.status = "failed" if self.fail_with else "succeeded"
        elif now > self.created:
            self.status = "processing"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class FakeReplicate(FakeServer):
    def __init__(self, token: str = TOKEN, **options: Any) -> None:
        self.token = token
        self._options = options
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.reset()
        app = web.Application()
        app.router.add_post("/v1/predictions", self._create)
        app.router.add_post("/v1/models/{owner}/{name}/predictions", self._create)
        app.router.add_get("/v1/predictions/{id}", self._get)
        app.router.add_post("/v1/predictions/{id}/cancel", self._cancel)
        app.router.add_get("/stream/v1/predictions/{id}", self._stream)
        self.server = ThreadedApp(app)

    def reset(self) -> None:
        """Back to the behaviour given to the constructor; forget what was seen."""
        self.reply = "Hello from Replicate! How can I help you today?"
        #: Explicit output pieces instead of `reply` split into words.
        self.pieces: list[str] | None = None
        #: How long a prediction runs.
        self.run_seconds = 0.0
        #: Longest a `Prefer: wait` request is held, whatever it asked for (None: as asked).
        self.max_hold: float | None = None
        self.report_tokens = True
        #: Whether the model supports streaming (its predictions have `urls.stream`).
        self.streams = True
        #: Faults for the next create requests, in order: a Problem answers the create itself;
        #: a string makes the prediction fail with that error.
        self.faults: list[Problem | str] = []
        #: The stream fails with this message after `stream_error_after` output events.
        self.stream_error: str | None = None
        self.stream_error_after = 0
        self.chunk_delay = 0.0
        for name, value in self._options.items():
            assert hasattr(self, name), name
            setattr(self, name, value)
        self.seen: list[Seen] = []
        self.predictions: dict[str, Prediction] = {}

    @property
    def base_url(self) -> str:
        return self.server.base_url + "/v1"

    def requests(self, method: str, prefix: str = "") -> list[Seen]:
        return [s for s in self.seen if s.method == method and s.path.startswith(prefix)]

    # --- the prediction ---------------------------------------------------------------------------

    def _output(self, inputs: dict[str, Any]) -> list[str]:
        text = self.reply
        for stop in filter(None, str(inputs.get("stop_sequences", "")).split(",")):
            if stop in text:
                text = text[: text.index(stop)]
        pieces = list(self.pieces) if self.pieces is not None else re.findall(r"\s*\S+", text)
        limit = inputs.get("max_tokens", inputs.get("max_new_tokens"))
        return pieces[:limit] if isinstance(limit, int) else pieces

    def _json(self, request: web.Request, p: Prediction) -> dict[str, Any]:
        p.refresh(time.monotonic())
        root = f"{request.scheme}://{request.host}"
        done = p.status in ("succeeded", "failed", "canceled")
        urls = {"get": f"{root}/v1/predictions/{p.id}", "cancel": f"{root}/v1/predictions/{p.id}/cancel"}
        if self.streams:
            urls["stream"] = f"{root}/stream/v1/predictions/{p.id}"
        metrics: dict[str, Any] = {}
        if done:
            metrics["predict_time"] = round(p.finish_at - p.created, 3)
            if self.report_tokens and p.status == "succeeded":
                metrics.update(input_token_count=p.input_tokens, output_token_count=len(p.pieces))
        return {
            "id": p.id, "model": p.model, "version": p.version, "input": p.input,
            "logs": "", "output": p.pieces if p.status == "succeeded" else None,
            "error": p.fail_with if p.status == "failed" else None, "status": p.status,
            "data_removed": False, "created_at": "2024-07-01T12:00:00.000Z", "metrics": metrics, "urls": urls,
        }  # fmt: skip

    def _auth(self, request: web.Request) -> Problem | None:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return Problem(401, "Unauthenticated", "You did not pass a valid authentication token")
        return None

    async def _create(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        self.seen.append(Seen("POST", request.path, dict(request.headers), body))
        if body is None:
            return Problem(400, "Invalid JSON", "The request body is not valid JSON").response()
        problem = validate_create(request.path, request.headers, body, self.token)
        if problem is not None:
            return problem.response()
        with self._lock:
            fault = self.faults.pop(0) if self.faults else None
        if isinstance(fault, Problem):
            return fault.response()
        inputs = body["input"]
        version = body.get("version", "")
        model = request.match_info.get("owner", "") + "/" + request.match_info.get("name", "")
        if "version" in body:
            model = "someone/some-model" if _VERSION.match(version) else version.partition(":")[0]
        now = time.monotonic()
        text = f"{inputs.get('system_prompt', '')} {inputs.get('prompt', '')}"
        p = Prediction(
            id=f"fakepred{next(self._ids):06d}", model=model, version=version.rpartition(":")[2] or "0" * 64,
            input=inputs, pieces=self._output(inputs), created=now, finish_at=now + self.run_seconds,
            fail_with=fault, stream_error=self.stream_error, input_tokens=len(text.split()),
        )  # fmt: skip
        self.predictions[p.id] = p
        prefer = request.headers.get("Prefer")
        if prefer is not None:
            match = _PREFER.match(prefer.strip())
            assert match is not None
            hold = float(match[1] or 60)
            if self.max_hold is not None:
                hold = min(hold, self.max_hold)
            await asyncio.sleep(max(0.0, min(hold, p.finish_at - time.monotonic())))
        doc = self._json(request, p)
        return web.json_response(doc, status=201, headers={"Location": doc["urls"]["get"]}, dumps=_dumps)

    async def _get(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen("GET", request.path, dict(request.headers), None))
        problem = self._auth(request)
        if problem is not None:
            return problem.response()
        p = self.predictions.get(request.match_info["id"])
        if p is None:
            return Problem(404, "Not found", "The requested prediction could not be found").response()
        return web.json_response(self._json(request, p), dumps=_dumps)

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen("POST", request.path, dict(request.headers), None))
        problem = self._auth(request)
        if problem is not None:
            return problem.response()
        p = self.predictions.get(request.match_info["id"])
        if p is None:
            return Problem(404, "Not found", "The requested prediction could not be found").response()
        p.refresh(time.monotonic())
        if p.status not in ("succeeded", "failed"):
            p.status = "canceled"
        return web.json_response(self._json(request, p), dumps=_dumps)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen("GET", request.path, dict(request.headers), None))
        problem = self._auth(request)
        if problem is not None:
            return problem.response()
        if "text/event-stream" not in request.headers.get("Accept", ""):
            return Problem(406, "Not Acceptable", "Accept: text/event-stream is required").response()
        p = self.predictions.get(request.match_info["id"])
        if p is None:
            return Problem(404, "Not found", "The requested prediction could not be found").response()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        await resp.prepare(request)
        step = max(0.0, p.finish_at - time.monotonic()) / max(1, len(p.pieces))
        error, after = (p.fail_with, 0) if p.fail_with else (p.stream_error, self.stream_error_after)
        p.fail_with = error
        for event in sse_events(p.pieces, error, after):
            if p.status == "canceled":
                break
            await asyncio.sleep(max(step, self.chunk_delay))
            await resp.write(event)
        p.finish_at = min(p.finish_at, time.monotonic())
        await resp.write_eof()
        return resp


def sse_events(
    pieces: list[str], error: str | None = None, error_after: int = 0, ts: int = 1690212292
) -> list[bytes]:
    """A prediction's event stream, one bytes object per event, as Replicate frames it."""
    events: list[bytes] = []
    sent = pieces if error is None else pieces[:error_after]
    for i, piece in enumerate(sent):
        data = "".join(f"data: {line}\n" for line in piece.split("\n"))
        events.append(f"event: output\nid: {ts}:{i}\n{data}\n".encode())
    n = len(sent)
    if error is not None:
        events.append(
            f"event: error\nid: {ts}:{n}\ndata: ".encode() + orjson.dumps({"detail": error}) + b"\n\n"
        )
        events.append(f"event: done\nid: {ts}:{n + 1}\ndata: ".encode() + b'{"reason":"error"}\n\n')
    else:
        events.append(f"event: done\nid: {ts}:{n}\ndata: {{}}\n\n".encode())
    return events


def _dumps(doc: Any) -> str:
    return orjson.dumps(doc).decode()
