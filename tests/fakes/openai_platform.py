"""A fake of OpenAI's (or Azure OpenAI's) audio, files and batches APIs, enforcing their wire protocol.

* OpenAI flavour: ``/v1/audio/{speech,transcriptions,translations}``, ``/v1/files``, ``/v1/batches``,
  ``Authorization: Bearer``.
* Azure flavour: ``/openai/deployments/{deployment}/audio/...``, ``/openai/files``,
  ``/openai/batches``, the ``api-key`` header and a required ``api-version`` query parameter.

Uploads are parsed with aiohttp's own multipart reader (not the router's parser), and refused as
the real APIs refuse them: no ``file`` part, no ``model``/``purpose``, a non-multipart body.
Speech answers are binary, written in chunks; :attr:`FakePlatform.gate` holds the rest of the
answer back after the first chunk until the test has read that chunk through the router (so a
router that buffered the answer would be caught). Batches complete when the test says so
(:meth:`FakePlatform.complete`), with an output file whose lines carry chat usage.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.support.servers import FakeServer, ThreadedApp

SPEECH_FORMATS = {"mp3", "opus", "aac", "flac", "wav", "pcm"}
TRANSCRIPT_FORMATS = {"json", "text", "srt", "verbose_json", "vtt"}
FILE_PURPOSES = {"assistants", "batch", "fine-tune", "vision", "user_data", "evals"}
BATCH_ENDPOINTS = {"/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions"}
#: Each chunk of a speech answer: recognisable bytes that are not UTF-8.
CHUNK = bytes(range(256)) * 16


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


class WireError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        self.response = _error(status, message, param)


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    query: dict[str, str]
    #: JSON body, or the text fields of a form (file parts as ``{"filename", "content_type", "size"}``).
    body: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class StoredFile:
    doc: dict[str, Any]
    content: bytes


class FakePlatform(FakeServer):
    def __init__(
        self, api_key: str, flavour: str = "openai", name: str = "fake", seconds: float = 7.5
    ) -> None:
        assert flavour in ("openai", "azure")
        self.api_key = api_key
        self.flavour = flavour
        self.name = name
        #: The duration a transcription reports (``usage.seconds``, ``duration``).
        self.seconds = seconds
        self.seen: list[Seen] = []
        #: Requests by path, counted before any check (refused and faulted ones too).
        self.requests: dict[str, int] = {}
        self.faults: list[int] = []
        self._lock = threading.Lock()
        #: Set by the test once it has the first speech chunk; the rest waits for it (5 s at most).
        self.gate: threading.Event | None = None
        #: Whether the last gated answer's rest was released by the gate (True) or by the timeout.
        self.gate_opened: bool | None = None
        self.speech_chunks = 4
        #: Cut the speech answer off after this many chunks (a broken upstream).
        self.cut_after: int | None = None
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        #: Output-file downloads, per file id (a settled batch is read once).
        self.downloads: dict[str, int] = {}
        self._ids = itertools.count(1)
        app = web.Application(client_max_size=256 * 1024 * 1024)
        if flavour == "openai":
            prefix = "/v1"
            audio = "/v1/audio"
        else:
            prefix = "/openai"
            audio = "/openai/deployments/{deployment}/audio"
        app.router.add_post(audio + "/speech", self._speech)
        app.router.add_post(audio + "/transcriptions", self._transcription)
        app.router.add_post(audio + "/translations", self._transcription)
        app.router.add_post(prefix + "/files", self._upload)
        app.router.add_get(prefix + "/files", self._list_files)
        app.router.add_get(prefix + "/files/{file_id}", self._get_file)
        app.router.add_delete(prefix + "/files/{file_id}", self._delete_file)
        app.router.add_get(prefix + "/files/{file_id}/content", self._content)
        app.router.add_post(prefix + "/batches", self._create_batch)
        app.router.add_get(prefix + "/batches", self._list_batches)
        app.router.add_get(prefix + "/batches/{batch_id}", self._get_batch)
        app.router.add_post(prefix + "/batches/{batch_id}/cancel", self._cancel_batch)
        self.server = ThreadedApp(app)

    @property
    def base_url(self) -> str:
        root = self.server.base_url
        return root + "/v1" if self.flavour == "openai" else root

    def _id(self, prefix: str) -> str:
        return f"{prefix}-{self.name}-{next(self._ids)}"

    # -- protocol checks -------------------------------------------------------------------------

    def _check(self, request: web.Request) -> None:
        if self.flavour == "openai":
            if request.headers.get("Authorization") != f"Bearer {self.api_key}":
                raise WireError(401, "Incorrect API key provided.")
        else:
            if request.headers.get("api-key") != self.api_key:
                raise WireError(401, "Access denied due to invalid subscription key.")
            if not request.query.get("api-version"):
                raise WireError(404, "Resource not found (no api-version)", "api-version")
        with self._lock:
            if self.faults:
                raise WireError(self.faults.pop(0), f"{self.name} injected an error")

    async def _json(self, request: web.Request) -> dict[str, Any]:
        if request.content_type != "application/json":
            raise WireError(400, "Content-Type must be application/json")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise WireError(400, "We could not parse the JSON body of your request.") from None
        if not isinstance(body, dict):
            raise WireError(400, "body must be an object")
        self._record(request, body)
        return body

    async def _form(self, request: web.Request) -> tuple[dict[str, Any], dict[str, tuple[str, bytes]]]:
        if request.content_type != "multipart/form-data":
            raise WireError(400, "Invalid Content-Type header, expected multipart/form-data")
        fields: dict[str, Any] = {}
        files: dict[str, tuple[str, bytes]] = {}
        reader = await request.multipart()
        async for part in reader:
            if not hasattr(part, "read") or part.name is None:
                raise WireError(400, "malformed multipart part")
            data = await part.read()
            if part.filename is not None:
                files[part.name] = (part.filename, bytes(data))
            else:
                value = bytes(data).decode()
                if part.name.endswith("[]"):
                    fields.setdefault(part.name, []).append(value)
                else:
                    fields[part.name] = value
        body = {**fields, **{k: {"filename": f, "size": len(d)} for k, (f, d) in files.items()}}
        self._record(request, body, {k: d for k, (_, d) in files.items()})
        return fields, files

    def _record(
        self, request: web.Request, body: dict[str, Any], files: dict[str, bytes] | None = None
    ) -> None:
        seen = Seen(request.path, dict(request.headers), dict(request.query), body, files or {})
        with self._lock:
            self.seen.append(seen)

    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        with self._lock:
            self.requests[request.path] = self.requests.get(request.path, 0) + 1
        try:
            self._check(request)
            response: web.StreamResponse = await handler(request)
            return response
        except WireError as err:
            return err.response

    # -- audio ---------------------------------------------------------------------------------

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        return await self._guard(request, self._speech_answer)

    async def _speech_answer(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        for name in ("model", "input", "voice"):
            if not body.get(name):
                raise WireError(400, f"Missing required parameter: '{name}'.", name)
        fmt = body.get("response_format", "mp3")
        if fmt not in SPEECH_FORMATS:
            raise WireError(400, f"Invalid value for 'response_format': {fmt}", "response_format")
        media = {"mp3": "audio/mpeg", "wav": "audio/wav"}.get(fmt, f"audio/{fmt}")
        resp = web.StreamResponse(headers={"Content-Type": media})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(self.speech_chunks):
            if self.cut_after is not None and i >= self.cut_after:
                assert request.transport is not None
                request.transport.abort()
                return resp
            await resp.write(CHUNK)
            if i == 0 and self.gate is not None:
                gate = self.gate
                # Wait off the loop: the gate is set from the test's thread.
                opened = await asyncio.get_running_loop().run_in_executor(None, gate.wait, 5.0)
                self.gate_opened = opened
        await resp.write_eof()
        return resp

    async def _transcription(self, request: web.Request) -> web.StreamResponse:
        return await self._guard(request, self._transcript)

    async def _transcript(self, request: web.Request) -> web.StreamResponse:
        fields, files = await self._form(request)
        if "file" not in files:
            raise WireError(400, "Missing required parameter: 'file'.", "file")
        if self.flavour == "openai" and not fields.get("model"):
            raise WireError(400, "Missing required parameter: 'model'.", "model")
        fmt = fields.get("response_format", "json")
        if fmt not in TRANSCRIPT_FORMATS:
            raise WireError(400, f"Invalid value for 'response_format': {fmt}", "response_format")
        filename, data = files["file"]
        text = f"{self.name} heard {len(data)} bytes of {filename}"
        if request.path.endswith("/translations"):
            text = "translated: " + text
        if fmt == "text":
            return web.Response(text=text, content_type="text/plain")
        if fmt in ("srt", "vtt"):
            return web.Response(text=f"1\n00:00:00,000 --> 00:00:07,500\n{text}\n", content_type="text/plain")
        doc: dict[str, Any] = {"text": text}
        if fmt == "verbose_json":
            doc.update(task="transcribe", language="english", duration=self.seconds, segments=[])
        elif not request.path.endswith("/translations"):
            doc["usage"] = {"type": "duration", "seconds": self.seconds}
        return web.json_response(doc)

    # -- files ---------------------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        return await self._guard(request, self._upload_file)

    async def _upload_file(self, request: web.Request) -> web.StreamResponse:
        fields, files = await self._form(request)
        if "file" not in files:
            raise WireError(400, "Missing required parameter: 'file'.", "file")
        purpose = fields.get("purpose")
        if purpose not in FILE_PURPOSES:
            raise WireError(400, f"Invalid value for 'purpose': {purpose}", "purpose")
        filename, data = files["file"]
        if purpose == "batch":
            for n, line in enumerate(data.splitlines()):
                try:
                    doc = orjson.loads(line)
                except orjson.JSONDecodeError:
                    raise WireError(400, f"line {n + 1} of the batch file is not JSON", "file") from None
                if not isinstance(doc.get("body"), dict) or not doc["body"].get("model"):
                    raise WireError(400, f"line {n + 1} has no body.model", "file")
        return web.json_response(self._store(filename, data, purpose))

    def _store(self, filename: str, data: bytes, purpose: str) -> dict[str, Any]:
        file_id = self._id("file")
        doc = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }
        with self._lock:
            self.files[file_id] = StoredFile(doc, data)
        return doc

    def _file(self, request: web.Request) -> StoredFile:
        stored = self.files.get(request.match_info["file_id"])
        if stored is None:
            raise WireError(404, f"No such File object: {request.match_info['file_id']}", "id")
        return stored

    async def _list_files(self, request: web.Request) -> web.StreamResponse:
        async def answer(request: web.Request) -> web.StreamResponse:
            self._record(request, {})
            data = [f.doc for f in self.files.values()]
            return web.json_response({"object": "list", "data": data, "has_more": False})

        return await self._guard(request, answer)

    async def _get_file(self, request: web.Request) -> web.StreamResponse:
        async def answer(request: web.Request) -> web.StreamResponse:
            self._record(request, {})
            return web.json_response(self._file(request).doc)

        return await self._guard(request, answer)

    async def _delete_file(self, request: web.Request) -> web.StreamResponse:
        async def answer(request: web.Request) -> web.StreamResponse:
            self._record(request, {})
            stored = self._file(request)
            del self.files[stored.doc["id"]]
            return web.json_response({"id": stored.doc["id"], "object": "file", "deleted": True})

        return await self._guard(request, answer)

    async def _content(self, request: web.Request) -> web.StreamResponse:
        async def answer(request: web.Request) -> web.StreamResponse:
            self._record(request, {})
            stored = self._file(request)
            with self._lock:
                self.downloads[stored.doc["id"]] = self.downloads.get(stored.doc["id"], 0) + 1
            return web.Response(body=stored.content, content_type="application/octet-stream")

        return await self._guard(request, answer)

    # -- batches -------------------------------------------------------------------------------

    async def _create_batch(self, request: web.Request) -> web.StreamResponse:
        async def answer(request: web.Request) -> web.StreamResponse:
            body = await self._json(request)
            input_id = body.get("input_file_id")
            stored = self.files.get(input_id) if isinstance(input_id, str) else None
            if stored is None:
                raise WireError(400, f"No such File object: {input_id}", "input_file_id")
            if stored.doc["purpose"] != "batch":
                raise WireError(400, "the input file's purpose must be 'batch'", "input_file_id")
            endpoint = body.get("endpoint")
            allowed = BATCH_ENDPOINTS | {e.removeprefix("/v1") for e in BATCH_ENDPOINTS}
            if endpoint not in (allowed if self.flavour == "azure" else BATCH_ENDPOINTS):
                raise WireError(400, f"Invalid value for 'endpoint': {endpoint}", "endpoint")
            if body.get("completion_window") != "24h":
                raise WireError(400, "completion_window must be '24h'", "completion_window")
            batch = {
                "id": self._id("batch"),
                "object": "batch",
                "endpoint": endpoint,
                "input_file_id": input_id,
                "completion_window": "24h",
                "status": "validating",
                "output_file_id": None,
                "error_file_id": None,
                "created_at": int(time.time()),
                "request_counts": {"total": 0, "completed": 0, "failed": 0},
                "metadata": body.get("metadata"),
            }
            with self._lock:
                self.batches[batch["id"]] = batch
            return web.json_response(batch)

        return await self._guard(request, answer)

    def complete(self, batch_id: str) -> dict[str, int]:
        """Run the batch: one answer per input line, with usage; returns the usage summed."""
        batch = self.batches[batch_id]
        lines = self.files[batch["input_file_id"]].content.splitlines()
        out: list[bytes] = []
        total = {"prompt_tokens": 0, "completion_tokens": 0}
        for n, line in enumerate(lines):
            doc = orjson.loads(line)
            usage = {"prompt_tokens": 10 + n, "completion_tokens": 20 + n, "total_tokens": 30 + 2 * n}
            total["prompt_tokens"] += usage["prompt_tokens"]
            total["completion_tokens"] += usage["completion_tokens"]
            answer = {
                "id": f"batch_req_{n}",
                "custom_id": doc.get("custom_id"),
                "response": {
                    "status_code": 200,
                    "request_id": f"req_{n}",
                    "body": {
                        "id": f"chatcmpl-{n}",
                        "object": "chat.completion",
                        "model": doc["body"]["model"],
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                        "usage": usage,
                    },
                },
                "error": None,
            }
            out.append(orjson.dumps(answer))
        output = self._store("batch_output.jsonl", b"\n".join(out) + b"\n", "batch_output")
        batch.update(
            status="completed",
            output_file_id=output["id"],
            request_counts={"total": len(lines), "completed": len(lines), "failed": 0},
            completed_at=int(time.time()),
        )
        return total

    def _batch(self, request: web.Request) -> dict[str, Any]:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            raise WireError(404, f"No batch found with id '{request.match_info['batch_id']}'.", "batch_id")
        return batch

    async def _get_batch(self, request: web.Request) -> web.StreamResponse:
        async def answer(request: web.Request) -> web.StreamResponse:
            self._record(request, {})
            return web.json_response(self._batch(request))

        return await self._guard(request, answer)

    async def _cancel_batch(self, request: web.Request) -> web.StreamResponse:
        async def answer(request: web.Request) -> web.StreamResponse:
            self._record(request, {})
            batch = self._batch(request)
            if batch["status"] in ("completed", "failed", "expired", "cancelled"):
                raise WireError(400, f"Cannot cancel a batch with status '{batch['status']}'.")
            batch["status"] = "cancelling"
            return web.json_response(batch)

        return await self._guard(request, answer)

    async def _list_batches(self, request: web.Request) -> web.StreamResponse:
        async def answer(request: web.Request) -> web.StreamResponse:
            self._record(request, {})
            data = list(self.batches.values())
            return web.json_response({"object": "list", "data": data, "has_more": False})

        return await self._guard(request, answer)
