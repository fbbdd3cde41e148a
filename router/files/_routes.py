"""OpenAI's files and batches APIs in front of OpenAI and Azure OpenAI deployments.

``/v1/files`` (upload, list, retrieve, content, delete) and ``/v1/batches`` (create, retrieve,
list, cancel), and the same under Azure OpenAI's ``/openai/files`` and ``/openai/batches``.

Which deployment: a ``purpose: batch`` file names its model group in every line's ``body.model``
(one group per file); the file goes to that group's first OpenAI or Azure deployment, with each
line's model rewritten to the deployment's upstream model. Any other file names its group in a
``model`` form field or the ``x-kubellm-model`` header. A batch runs where its input file lives.
Who: every file and batch belongs to the key that created it; another key gets a 404, and lists
show only the caller's own. Billing: see :mod:`._settle`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .._errors import InvalidRequestError, KubellmError
from ..audio._multipart import Upload, encode_form, read_form
from ..core._router import Caller, authenticate_caller, error_response
from ..inbound._base import JSON
from ..inbound._openai_validate import parse_body
from ..server._inbound import AsgiInbound
from ._platform import call, call_json, choose_deployment, find_deployment, group_for, not_found, path_id
from ._settle import settle
from ._store import Entry, Kind

if TYPE_CHECKING:
    from ..core._router import Router
    from ..core._state import Deployment
    from ..server._app import RouterApp

Handler = Callable[[Request, Caller], Awaitable[Response]]
#: These routes do not go through the dispatcher, so they count themselves.
PLATFORM_REQUESTS = Counter(
    "kubellm_platform_requests_total",
    "Finished files and batches API requests.",
    ["operation", "status"],
)
_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


def _json(doc: Any) -> Response:
    return Response(orjson.dumps(doc), media_type=JSON)


def _batch_lines(data: bytes) -> tuple[str, list[dict[str, Any]]]:
    """The model group a batch input file names, and its lines; a 400 naming ``file`` otherwise."""
    lines: list[dict[str, Any]] = []
    models: set[str] = set()
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise InvalidRequestError(f"line {number} of the batch file is not JSON", param="file") from None
        body = doc.get("body") if isinstance(doc, dict) else None
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str) or not model:
            raise InvalidRequestError(f"line {number} of the batch file has no body.model", param="file")
        models.add(model)
        lines.append(doc)
    if len(models) != 1:
        found = ", ".join(sorted(models)) or "none"
        raise InvalidRequestError(
            f"a batch file must name exactly one model in its lines' body.model (found: {found})",
            param="file",
        )
    return models.pop(), lines


class FilesApi:
    def __init__(self, router: Router) -> None:
        self.router = router

    @property
    def store(self) -> Any:
        return self.router.services.files

    async def owned(self, kind: Kind, object_id: str, caller: Caller, param: str) -> tuple[Entry, Deployment]:
        entry = await self.store.get(kind, object_id)
        if entry is None or entry.owner != caller.label:
            raise not_found(kind, object_id, param)
        dep = find_deployment(self.router.state, entry.deployment)
        if dep is None:
            raise not_found(kind, object_id, param)  # its deployment left the config
        return entry, dep

    # -- files ---------------------------------------------------------------------------------

    async def upload(self, request: Request, caller: Caller) -> Response:
        state = self.router.state
        form = await read_form(AsgiInbound(request), state.config.settings.max_upload_bytes)
        upload = form.files.get("file")
        if upload is None:
            raise InvalidRequestError("'file' is required: the file to upload, as a file part", param="file")
        purpose = form.get("purpose")
        if not purpose:
            raise InvalidRequestError("'purpose' is required", param="purpose")
        data = upload.data
        if purpose == "batch":
            model, lines = _batch_lines(data)
            group = group_for(state, caller, model, "file")
            dep = choose_deployment(self.router, group, "file")
            upstream_model = dep.config.upstream_model or dep.config.model
            data = (
                b"\n".join(orjson.dumps({**d, "body": {**d["body"], "model": upstream_model}}) for d in lines)
                + b"\n"
            )
        else:
            named = form.get("model") or request.headers.get("x-kubellm-model")
            if not named:
                raise InvalidRequestError(
                    "name the model group the file is for: a 'model' form field or an x-kubellm-model header",
                    param="model",
                )
            group = group_for(state, caller, named, "model")
            dep = choose_deployment(self.router, group, "model")
        fields = [(k, v) for k, v in form.fields if k != "model"]
        content_type, payload = encode_form(
            fields, {"file": Upload(upload.filename, upload.content_type, data)}
        )
        doc = await call_json(
            self.router, dep, group.name, "POST", "/files", body=payload, content_type=content_type
        )
        await self._remember("file", doc, Entry(caller.label, dep.name, group.name, doc))
        return _json(doc)

    async def _remember(self, kind: Kind, doc: dict[str, Any], entry: Entry) -> None:
        object_id = doc.get("id")
        if not isinstance(object_id, str) or not object_id:
            raise InvalidRequestError(f"deployment {entry.deployment!r} answered with no {kind} id")
        await self.store.put(kind, object_id, entry)

    async def list_files(self, request: Request, caller: Caller) -> Response:
        purpose = request.query_params.get("purpose")
        docs = [e.doc for _, e in await self.store.owned("file", caller.label)]
        if purpose:
            docs = [d for d in docs if d.get("purpose") == purpose]
        return _json(_page(docs, request, 10000))

    async def retrieve_file(self, request: Request, caller: Caller) -> Response:
        file_id = request.path_params["file_id"]
        entry, dep = await self.owned("file", file_id, caller, "file_id")
        doc = await call_json(self.router, dep, entry.group, "GET", f"/files/{path_id(file_id)}")
        await self.store.put("file", file_id, Entry(entry.owner, entry.deployment, entry.group, doc))
        return _json(doc)

    async def content(self, request: Request, caller: Caller) -> Response:
        file_id = request.path_params["file_id"]
        entry, dep = await self.owned("file", file_id, caller, "file_id")
        resp = await call(self.router, dep, entry.group, "GET", f"/files/{path_id(file_id)}/content")

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.iter_chunks():
                    yield chunk
            finally:
                resp.close()

        media = resp.headers.get("Content-Type") or "application/octet-stream"
        return StreamingResponse(relay(), media_type=media)

    async def delete_file(self, request: Request, caller: Caller) -> Response:
        file_id = request.path_params["file_id"]
        entry, dep = await self.owned("file", file_id, caller, "file_id")
        doc = await call_json(self.router, dep, entry.group, "DELETE", f"/files/{path_id(file_id)}")
        await self.store.delete("file", file_id, entry.owner)
        return _json(doc)

    # -- batches -------------------------------------------------------------------------------

    async def create_batch(self, request: Request, caller: Caller) -> Response:
        limit = self.router.state.config.settings.max_request_body_bytes
        body = parse_body(await AsgiInbound(request).read(limit))
        input_id = body.get("input_file_id")
        if not isinstance(input_id, str) or not input_id:
            raise InvalidRequestError("'input_file_id' is required", param="input_file_id")
        for name in ("endpoint", "completion_window"):
            if not isinstance(body.get(name), str):
                raise InvalidRequestError(f"'{name}' is required", param=name)
        entry, dep = await self.owned("file", input_id, caller, "input_file_id")
        group_for(self.router.state, caller, entry.group, "input_file_id")  # the key may have lost it
        endpoint = body["endpoint"]
        if dep.provider.name == "openai" and not endpoint.startswith("/v1/"):
            body = {**body, "endpoint": "/v1" + endpoint}  # Azure's spelling, sent to OpenAI
        payload = orjson.dumps(body)
        doc = await call_json(
            self.router, dep, entry.group, "POST", "/batches", body=payload, content_type=JSON
        )
        await self._remember("batch", doc, Entry(caller.label, dep.name, entry.group, doc))
        return _json(doc)

    async def _refresh(self, caller: Caller, batch_id: str, entry: Entry, dep: Deployment) -> dict[str, Any]:
        """The batch as its upstream has it now; once completed, its output files become the
        owner's and its usage is billed."""
        doc = await call_json(self.router, dep, entry.group, "GET", f"/batches/{path_id(batch_id)}")
        await self.store.put("batch", batch_id, Entry(entry.owner, entry.deployment, entry.group, doc))
        if doc.get("status") == "completed":
            for field in ("output_file_id", "error_file_id"):
                file_id = doc.get(field)
                if isinstance(file_id, str) and file_id and await self.store.get("file", file_id) is None:
                    stub = {
                        "id": file_id,
                        "object": "file",
                        "purpose": "batch_output",
                        "created_at": doc.get("completed_at"),
                    }
                    await self.store.put(
                        "file", file_id, Entry(entry.owner, entry.deployment, entry.group, stub)
                    )
            await settle(self.router, caller, dep, batch_id, entry, doc)
        return doc

    async def retrieve_batch(self, request: Request, caller: Caller) -> Response:
        batch_id = request.path_params["batch_id"]
        entry, dep = await self.owned("batch", batch_id, caller, "batch_id")
        return _json(await self._refresh(caller, batch_id, entry, dep))

    async def cancel_batch(self, request: Request, caller: Caller) -> Response:
        batch_id = request.path_params["batch_id"]
        entry, dep = await self.owned("batch", batch_id, caller, "batch_id")
        doc = await call_json(self.router, dep, entry.group, "POST", f"/batches/{path_id(batch_id)}/cancel")
        await self.store.put("batch", batch_id, Entry(entry.owner, entry.deployment, entry.group, doc))
        return _json(doc)

    async def list_batches(self, request: Request, caller: Caller) -> Response:
        owned = await self.store.owned("batch", caller.label)
        page = _page([{**e.doc, "id": i} for i, e in owned], request, 20)
        fresh = []
        for doc in page["data"]:
            entry = next(e for i, e in owned if i == doc["id"])
            dep = find_deployment(self.router.state, entry.deployment)
            if dep is not None and doc.get("status") not in _TERMINAL:
                doc = await self._refresh(caller, doc["id"], entry, dep)
            fresh.append(doc)
        return _json({**page, "data": fresh})


def _page(docs: list[dict[str, Any]], request: Request, default: int) -> dict[str, Any]:
    """A cursor page: ``after`` an id, ``limit`` items (newest first, as OpenAI lists them)."""
    raw_limit = request.query_params.get("limit", str(default))
    if not (raw_limit.isascii() and raw_limit.isdigit()) or not 1 <= int(raw_limit) <= 10000:
        raise InvalidRequestError("limit: expected an integer from 1 to 10000", param="limit")
    after = request.query_params.get("after")
    if after is not None:
        ids = [d.get("id") for d in docs]
        docs = docs[ids.index(after) + 1 :] if after in ids else []
    page = docs[: int(raw_limit)]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0].get("id") if page else None,
        "last_id": page[-1].get("id") if page else None,
        "has_more": len(docs) > len(page),
    }


def _endpoint(router: Router, handler: Handler, operation: str) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            caller = await authenticate_caller(router.state, request.headers, router.identities)
            response = await handler(request, caller)
        except KubellmError as err:
            response = error_response(err)
        PLATFORM_REQUESTS.labels(operation, str(response.status_code)).inc()
        return response

    return endpoint


def register_files_routes(app: RouterApp, router: Router) -> None:
    api = FilesApi(router)
    routes: list[tuple[str, str, Handler, str]] = [
        ("/files", "POST", api.upload, "Upload a file (multipart)"),
        ("/files", "GET", api.list_files, "List the caller's files"),
        ("/files/{file_id}", "GET", api.retrieve_file, "Retrieve a file"),
        ("/files/{file_id}", "DELETE", api.delete_file, "Delete a file"),
        ("/files/{file_id}/content", "GET", api.content, "Download a file's content"),
        ("/batches", "POST", api.create_batch, "Create a batch"),
        ("/batches", "GET", api.list_batches, "List the caller's batches"),
        ("/batches/{batch_id}", "GET", api.retrieve_batch, "Retrieve a batch"),
        ("/batches/{batch_id}/cancel", "POST", api.cancel_batch, "Cancel a batch"),
    ]
    for path, method, handler, summary in routes:
        endpoint = _endpoint(router, handler, handler.__name__)
        # The endpoints read the raw request, so FastAPI cannot see the path parameters: declare them.
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in ("file_id", "batch_id")
            if "{" + name + "}" in path
        ]
        for prefix in ("/v1", "", "/openai"):
            app.add_api_route(
                prefix + path,
                endpoint,
                methods=[method],
                include_in_schema=prefix == "/v1",
                summary=summary,
                name=f"{method.lower()}_{path}{prefix}",
                openapi_extra={"parameters": params} if params else None,
            )
