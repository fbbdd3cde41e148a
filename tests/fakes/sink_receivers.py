"""Fake ingestion endpoints for the observability sinks, each enforcing its service's documented protocol.

* :class:`FakeWebhook`: any JSON-array webhook, with a required header (the ``headersEnv`` contract).
* :class:`FakeLangfuse`: ``POST /api/public/ingestion``, basic auth with public:secret key, a
  ``{"batch": [...]}`` of event envelopes (id, timestamp, type, body); like Langfuse it answers
  207 with per-event ``errors`` for invalid events instead of a 4xx.
* :class:`FakePostHog`: ``POST /batch/`` with ``api_key`` in the body; every event needs a name and
  a ``distinct_id``; ``$ai_generation`` events need ``$ai_trace_id``, ``$ai_model``, ``$ai_provider``
  and integer token counts.
* :class:`FakeMixpanel`: ``POST /import?strict=1``, basic auth with the project token as username,
  a JSON array of events with ``time``, ``distinct_id`` and a valid ``$insert_id``.
* :class:`FakeLunary`: ``POST /v1/runs/ingest``, bearer public key, ``{"events": [...]}`` of run events
  with a UUID ``runId``; an ``end`` or ``error`` must follow a ``start`` of the same run.
* :class:`FakeHelicone`: ``POST /custom/v1/log``, bearer API key, one request log per call.

Every receiver keeps the raw bodies it accepted (for the secrets test) and can be told to fail
the next requests or to hang, to exercise retries and back-pressure.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import re
import threading
import time
import uuid
from typing import Any

import orjson
from aiohttp import web

from tests.support.servers import ThreadedApp

_INSERT_ID = re.compile(r"^[A-Za-z0-9-]{1,36}$")
_TRACE_ID = re.compile(r"^[A-Za-z0-9_~.@()!':|-]+$")


def is_iso(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Receiver:
    """Shared machinery: a threaded aiohttp app, accepted bodies, injected failures."""

    path = "/"

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.events: list[dict[str, Any]] = []
        self.requests = 0
        self.fail_statuses: list[int] = []
        self.hang = 0.0
        self._released: asyncio.Event | None = None
        self._lock = threading.Lock()
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post(self.path, self._handle)
        self.server = ThreadedApp(app)

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def url(self) -> str:
        return self.server.base_url + self.path

    def release(self) -> None:
        """Stop hanging: answer the requests held so far and the next ones at once."""
        self.hang = 0
        if self._released is not None:
            self.server.loop.call_soon_threadsafe(self._released.set)

    def fail_next(self, *statuses: int) -> None:
        with self._lock:
            self.fail_statuses.extend(statuses)

    def wait_for(self, count: int, timeout: float = 15) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.events) >= count:
                    return list(self.events)
            time.sleep(0.05)
        raise AssertionError(f"{type(self).__name__}: expected {count} events, got {len(self.events)}")

    async def gate(self) -> int | None:
        """Count the request, hang if told to; the injected failure status for it, if any."""
        with self._lock:
            self.requests += 1
            fail = self.fail_statuses.pop(0) if self.fail_statuses else None
        if self.hang:
            if self._released is None:
                self._released = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.hang):
                    await self._released.wait()
        return fail

    async def _handle(self, request: web.Request) -> web.Response:
        fail = await self.gate()
        if fail is not None:
            return web.json_response({"error": "injected failure"}, status=fail)
        problem = self.authenticate(request)
        if problem:
            return web.json_response({"error": problem}, status=401)
        if request.content_type != "application/json":
            return web.json_response({"error": "Content-Type must be application/json"}, status=415)
        raw = await request.read()
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return web.json_response({"error": "invalid JSON"}, status=400)
        return self.accept(request, raw, doc)

    def authenticate(self, request: web.Request) -> str | None:
        raise NotImplementedError

    def accept(self, request: web.Request, raw: bytes, doc: Any) -> web.Response:
        raise NotImplementedError

    def keep(self, raw: bytes, events: list[dict[str, Any]]) -> None:
        with self._lock:
            self.bodies.append(raw)
            self.events.extend(events)

    def start(self) -> Receiver:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FakeWebhook(Receiver):
    path = "/hook"

    def __init__(self, header: str = "Authorization", value: str = "Bearer hook-token") -> None:
        super().__init__()
        self.header, self.value = header, value

    def authenticate(self, request: web.Request) -> str | None:
        return None if request.headers.get(self.header) == self.value else f"{self.header} required"

    def accept(self, request: web.Request, raw: bytes, doc: Any) -> web.Response:
        if not isinstance(doc, list) or not all(isinstance(e, dict) for e in doc):
            return web.json_response({"error": "expected a JSON array of objects"}, status=400)
        keys = {frozenset(e) for e in doc}
        if len(keys) > 1:  # one shape per batch, so that a bulk insert can take it as it is
            return web.json_response({"error": "events of one batch differ in keys"}, status=400)
        for event in doc:
            if event.get("type") != "kubellm.request" or not event.get("request_id"):
                return web.json_response({"error": "not a kubellm.request event"}, status=400)
            if not is_iso(event.get("timestamp")) or not is_iso(event.get("start_time")):
                return web.json_response({"error": "timestamps must be RFC 3339"}, status=400)
        self.keep(raw, doc)
        return web.json_response({"ok": True})


class FakeLangfuse(Receiver):
    path = "/api/public/ingestion"
    TYPES = frozenset(
        {
            "trace-create",
            "generation-create",
            "generation-update",
            "span-create",
            "span-update",
            "event-create",
        }
    )
    LEVELS = frozenset({"DEBUG", "DEFAULT", "WARNING", "ERROR"})

    def __init__(self, public_key: str = "pk-lf-test", secret_key: str = "sk-lf-test") -> None:
        super().__init__()
        self.auth = basic(public_key, secret_key)
        self.seen_ids: set[str] = set()

    def authenticate(self, request: web.Request) -> str | None:
        return None if request.headers.get("Authorization") == self.auth else "invalid basic auth"

    def _problem(self, event: Any) -> str | None:
        if not isinstance(event, dict):
            return "event must be an object"
        if not isinstance(event.get("id"), str) or not event["id"]:
            return "id is required"
        if event["id"] in self.seen_ids:
            return "duplicate event id"
        if not is_iso(event.get("timestamp")):
            return "timestamp must be ISO 8601"
        if event.get("type") not in self.TYPES:
            return f"unknown type {event.get('type')!r}"
        body = event.get("body")
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            return "body.id is required"
        if event["type"] == "generation-create":
            if not isinstance(body.get("traceId"), str):
                return "generation needs traceId"
            for name in ("startTime", "endTime", "completionStartTime"):
                if name in body and not is_iso(body[name]):
                    return f"{name} must be ISO 8601"
            if body.get("level", "DEFAULT") not in self.LEVELS:
                return "invalid level"
            details = body.get("usageDetails", {})
            if not isinstance(details, dict) or not all(isinstance(v, int) for v in details.values()):
                return "usageDetails must map strings to integers"
            for value in (body.get("modelParameters") or {}).values():
                ok = isinstance(value, str | int | bool) or (
                    isinstance(value, list) and all(isinstance(v, str) for v in value)
                )
                if not ok:
                    return "modelParameters values must be strings, integers, booleans or string lists"
        if event["type"] == "trace-create" and "timestamp" in body and not is_iso(body["timestamp"]):
            return "trace timestamp must be ISO 8601"
        return None

    def accept(self, request: web.Request, raw: bytes, doc: Any) -> web.Response:
        if not isinstance(doc, dict) or not isinstance(doc.get("batch"), list):
            return web.json_response({"error": "batch is required"}, status=400)
        successes, errors, good = [], [], []
        for event in doc["batch"]:
            problem = self._problem(event)
            event_id = event.get("id", "") if isinstance(event, dict) else ""
            if problem:
                errors.append({"id": event_id, "status": 400, "message": problem})
            else:
                self.seen_ids.add(event_id)
                successes.append({"id": event_id, "status": 201})
                good.append(event)
        self.keep(raw, good)
        return web.json_response({"successes": successes, "errors": errors}, status=207)


class FakePostHog(Receiver):
    path = "/batch/"

    def __init__(self, api_key: str = "phc_test") -> None:
        super().__init__()
        self.api_key = api_key

    def authenticate(self, request: web.Request) -> str | None:
        return None  # the project API key is in the body

    @staticmethod
    def _problem(event: Any) -> str | None:
        if not isinstance(event, dict) or not isinstance(event.get("event"), str):
            return "event name is required"
        props = event.get("properties", {})
        if not isinstance(props, dict):
            return "properties must be an object"
        distinct = event.get("distinct_id") or props.get("distinct_id")
        if not isinstance(distinct, str) or not distinct:
            return "distinct_id is required"
        if "timestamp" in event and not is_iso(event["timestamp"]):
            return "timestamp must be ISO 8601"
        if event["event"] in ("$ai_generation", "$ai_embedding"):
            trace = props.get("$ai_trace_id")
            if not isinstance(trace, str) or not _TRACE_ID.match(trace):
                return "$ai_trace_id is required and limited to letters, digits and -_~.@()!':|"
            for name in ("$ai_model", "$ai_provider"):
                if not isinstance(props.get(name), str):
                    return f"{name} is required"
            for name in ("$ai_input_tokens", "$ai_output_tokens"):
                if name in props and not isinstance(props[name], int):
                    return f"{name} must be an integer"
            if "$ai_latency" in props and not isinstance(props["$ai_latency"], int | float):
                return "$ai_latency must be a number of seconds"
        return None

    def accept(self, request: web.Request, raw: bytes, doc: Any) -> web.Response:
        if not isinstance(doc, dict) or doc.get("api_key") != self.api_key:
            return web.json_response(
                {
                    "type": "authentication_error",
                    "code": "invalid_api_key",
                    "detail": "Project API key invalid.",
                },
                status=401,
            )
        batch = doc.get("batch")
        if not isinstance(batch, list):
            return web.json_response({"type": "validation_error", "detail": "batch is required"}, status=400)
        for event in batch:
            problem = self._problem(event)
            if problem:
                return web.json_response({"type": "validation_error", "detail": problem}, status=400)
        self.keep(raw, batch)
        return web.json_response({"status": 1})


class FakeMixpanel(Receiver):
    path = "/import"

    def __init__(self, token: str = "mp-token-test") -> None:
        super().__init__()
        self.auth = basic(token, "")

    def authenticate(self, request: web.Request) -> str | None:
        return None if request.headers.get("Authorization") == self.auth else "invalid project token"

    def accept(self, request: web.Request, raw: bytes, doc: Any) -> web.Response:
        if request.query.get("strict") != "1":
            return web.json_response({"error": "send strict=1 to get validation errors"}, status=400)
        if not isinstance(doc, list) or not 0 < len(doc) <= 2000:
            return web.json_response({"error": "expected a JSON array of 1 to 2000 events"}, status=400)
        now_ms = time.time() * 1000
        failed = []
        for index, event in enumerate(doc):
            props = event.get("properties") if isinstance(event, dict) else None
            problem = None
            if not isinstance(event, dict) or not isinstance(event.get("event"), str):
                problem = "event name is required"
            elif not isinstance(props, dict):
                problem = "properties is required"
            elif not isinstance(props.get("time"), int) or not (
                31536000000 <= props["time"] <= now_ms + 3_600_000
            ):
                problem = "time must be milliseconds since the epoch, not in the future"
            elif not isinstance(props.get("distinct_id"), str):
                problem = "distinct_id is required"
            elif not isinstance(props.get("$insert_id"), str) or not _INSERT_ID.match(props["$insert_id"]):
                problem = "$insert_id must be 1-36 letters, digits or dashes"
            if problem:
                failed.append({"index": index, "field": "properties", "message": problem})
        if failed:
            return web.json_response(
                {
                    "code": 400,
                    "error": "some data points in the request failed validation",
                    "failed_records": failed,
                },
                status=400,
            )
        self.keep(raw, doc)
        return web.json_response({"code": 200, "num_records_imported": len(doc), "status": "OK"})


class FakeLunary(Receiver):
    path = "/v1/runs/ingest"

    def __init__(self, public_key: str = "lunary-public-test") -> None:
        super().__init__()
        self.public_key = public_key
        self.started: set[str] = set()

    def authenticate(self, request: web.Request) -> str | None:
        ok = request.headers.get("Authorization") == f"Bearer {self.public_key}"
        return None if ok else "invalid public key"

    def accept(self, request: web.Request, raw: bytes, doc: Any) -> web.Response:
        if not isinstance(doc, dict) or not isinstance(doc.get("events"), list):
            return web.json_response({"error": "events is required"}, status=400)
        started = set(self.started)
        for event in doc["events"]:
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                return web.json_response({"error": "type is required"}, status=400)
            try:
                uuid.UUID(str(event.get("runId")))
            except ValueError:
                return web.json_response({"error": "runId must be a UUID"}, status=400)
            if not is_iso(event.get("timestamp")):
                return web.json_response({"error": "timestamp must be ISO 8601"}, status=400)
            if event.get("event") == "start":
                started.add(event["runId"])
            elif event.get("event") in ("end", "error"):
                if event["runId"] not in started:
                    return web.json_response({"error": "end of a run that never started"}, status=400)
                usage = event.get("tokensUsage")
                if usage is not None and not (
                    isinstance(usage, dict)
                    and all(isinstance(usage.get(k), int) for k in ("prompt", "completion"))
                ):
                    return web.json_response({"error": "tokensUsage needs prompt and completion"}, status=400)
            else:
                return web.json_response({"error": f"unknown event {event.get('event')!r}"}, status=400)
        self.started = started
        self.keep(raw, doc["events"])
        return web.json_response({})


class FakeHelicone(Receiver):
    path = "/custom/v1/log"

    def __init__(self, api_key: str = "sk-helicone-test") -> None:
        super().__init__()
        self.api_key = api_key

    def authenticate(self, request: web.Request) -> str | None:
        return None if request.headers.get("Authorization") == f"Bearer {self.api_key}" else "invalid API key"

    def accept(self, request: web.Request, raw: bytes, doc: Any) -> web.Response:
        req = doc.get("providerRequest") if isinstance(doc, dict) else None
        resp = doc.get("providerResponse") if isinstance(doc, dict) else None
        if not isinstance(req, dict) or req.get("url") != "custom-model-nopath":
            return web.json_response({"error": "providerRequest.url must be custom-model-nopath"}, status=400)
        if not isinstance(req.get("json"), dict):
            return web.json_response({"error": "providerRequest.json is required"}, status=400)
        meta = req.get("meta", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            return web.json_response(
                {"error": "providerRequest.meta must map strings to strings"}, status=400
            )
        if not isinstance(resp, dict) or not isinstance(resp.get("status"), int):
            return web.json_response({"error": "providerResponse.status is required"}, status=400)
        if not isinstance(resp.get("headers", {}), dict):
            return web.json_response({"error": "providerResponse.headers must be an object"}, status=400)
        timing = doc.get("timing")
        if timing is not None:
            for name in ("startTime", "endTime"):
                t = timing.get(name) if isinstance(timing, dict) else None
                if not (
                    isinstance(t, dict)
                    and isinstance(t.get("seconds"), int)
                    and isinstance(t.get("milliseconds"), int)
                    and 0 <= t["milliseconds"] < 1000
                ):
                    return web.json_response(
                        {"error": f"timing.{name} needs seconds and milliseconds"}, status=400
                    )
        self.keep(raw, [doc])
        return web.json_response({"ok": True})
