"""The operations of images, moderations, rerank and audio (served by the core, like chat) and of
files and batches (served beside it, :mod:`..files._routes`)."""

from __future__ import annotations

from ..audio._api import SPEECH_MEDIA
from ._operations import MODEL_HEADERS, Operation, path, query
from ._schema import HEADERS, JSON, MODEL_ERRORS, SSE, Schema, errors, ref

FORM = "multipart/form-data"
_BINARY: Schema = {"type": "string", "format": "binary"}
_AZURE = "/openai/deployments/{deployment_id}"
_AZURE_PARAMS = [
    path("deployment_id", "The model group (Azure's deployment name)"),
    query("api-version", {"type": "string"}, "Accepted and ignored: the router speaks one version"),
]
#: What a call to a deployment's files or batches API can answer besides the route's own errors.
_UPSTREAM = (429, 502, 503, 504)


def _body(schema: str, media: str = JSON) -> Schema:
    return {"required": True, "content": {media: {"schema": ref(schema)}}}


def _served(
    operation_id: str, request: str, content: Schema, *, media: str = JSON, azure: bool = False
) -> Operation:
    """An operation of the core (auth, limits, retries, fallbacks): its headers and every error."""
    return {
        "operationId": operation_id,
        "parameters": [*(_AZURE_PARAMS if azure else []), *MODEL_HEADERS],
        "requestBody": _body(request, media),
        "responses": {
            "200": {"description": "The answer", "content": content, "headers": HEADERS},
            **errors(MODEL_ERRORS),
        },
    }


def _json_answer(schema: str) -> Schema:
    return {JSON: {"schema": ref(schema)}}


def _speech_answer() -> Schema:
    audio = {media: {"schema": _BINARY} for media in dict.fromkeys(SPEECH_MEDIA.values())}
    events = {"type": "string", "description": "stream_format: sse: the upstream's events, relayed"}
    return {**audio, SSE: {"schema": events}}


def _transcript_answer() -> Schema:
    text = {"type": "string", "description": "response_format text, srt or vtt"}
    return {**_json_answer("Transcription"), "text/plain": {"schema": text}}


def served_operations() -> dict[tuple[str, str], Operation]:
    ops: dict[tuple[str, str], Operation] = {}
    images = _json_answer("Images")
    for azure, prefix, tag in ((False, "/v1", ""), (True, _AZURE, "Azure")):
        ops[(f"{prefix}/images/generations", "post")] = _served(
            f"create{tag}Image", f"{tag}ImageRequest", images, azure=azure
        )
        ops[(f"{prefix}/images/edits", "post")] = _served(
            f"edit{tag}Image", f"{tag}ImageEditRequest", images, media=FORM, azure=azure
        )
        ops[(f"{prefix}/audio/speech", "post")] = _served(
            f"create{tag}Speech", f"{tag}SpeechRequest", _speech_answer(), azure=azure
        )
        for name, op_id in (("transcriptions", "Transcription"), ("translations", "Translation")):
            ops[(f"{prefix}/audio/{name}", "post")] = _served(
                f"create{tag}{op_id}",
                f"{tag}TranscriptionRequest",
                _transcript_answer(),
                media=FORM,
                azure=azure,
            )
    ops[("/v1/moderations", "post")] = _served(
        "createModeration", "ModerationRequest", _json_answer("Moderation")
    )
    ops[("/v1/rerank", "post")] = _served("rerank", "RerankRequest", _json_answer("Rerank"))
    return ops


def _platform(
    operation_id: str,
    description: str,
    content: Schema,
    statuses: tuple[int, ...],
    *,
    parameters: list[Schema] | None = None,
    body: Schema | None = None,
    links: Schema | None = None,
) -> Operation:
    answer: Schema = {"description": description, "content": content}
    if links:
        answer["links"] = links
    op: Operation = {
        "operationId": operation_id,
        "responses": {"200": answer, **errors(tuple(sorted({*statuses, *_UPSTREAM})))},
    }
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = body
    return op


def _page_params(default: int) -> list[Schema]:
    return [
        query("limit", {"type": "integer", "minimum": 1, "maximum": 10000}, f"At most this many ({default})"),
        query("after", {"type": "string"}, "List the objects after this id"),
    ]


def platform_operations() -> dict[tuple[str, str], Operation]:
    file_id = [path("file_id", "The id of a file the key uploaded")]
    batch_id = [path("batch_id", "The id of a batch the key created")]
    stored_file = {"file_id": "$response.body#/id"}
    stored_batch = {"batch_id": "$response.body#/id"}
    return {
        ("/v1/files", "post"): _platform(
            "uploadFile",
            "The file, as the deployment it went to describes it",
            _json_answer("File"),
            (400, 403, 404, 413),
            body=_body("FileUploadRequest", FORM),
            links={
                "GetFile": {"operationId": "getFile", "parameters": stored_file},
                "GetFileContent": {"operationId": "getFileContent", "parameters": stored_file},
                "DeleteFile": {"operationId": "deleteFile", "parameters": stored_file},
            },
        ),
        ("/v1/files", "get"): _platform(
            "listFiles",
            "The key's files, newest first",
            _json_answer("FileList"),
            (400,),
            parameters=[
                query("purpose", {"type": "string"}, "Only files of this purpose"),
                *_page_params(10000),
            ],
        ),
        ("/v1/files/{file_id}", "get"): _platform(
            "getFile", "The file", _json_answer("File"), (404,), parameters=file_id
        ),
        ("/v1/files/{file_id}", "delete"): _platform(
            "deleteFile", "Deleted", _json_answer("DeletedFile"), (404,), parameters=file_id
        ),
        ("/v1/files/{file_id}/content", "get"): _platform(
            "getFileContent",
            "The file's bytes, relayed from its deployment",
            {"application/octet-stream": {"schema": _BINARY}},
            (404,),
            parameters=file_id,
        ),
        ("/v1/batches", "post"): _platform(
            "createBatch",
            "The batch, running on the deployment of its input file",
            _json_answer("Batch"),
            (400, 403, 404, 413),
            body=_body("BatchRequest"),
            links={
                "GetBatch": {"operationId": "getBatch", "parameters": stored_batch},
                "CancelBatch": {"operationId": "cancelBatch", "parameters": stored_batch},
            },
        ),
        ("/v1/batches", "get"): _platform(
            "listBatches",
            "The key's batches, newest first (those still running refreshed)",
            _json_answer("BatchList"),
            (400,),
            parameters=_page_params(20),
        ),
        ("/v1/batches/{batch_id}", "get"): _platform(
            "getBatch",
            "The batch as its deployment has it now",
            _json_answer("Batch"),
            (404,),
            parameters=batch_id,
        ),
        ("/v1/batches/{batch_id}/cancel", "post"): _platform(
            "cancelBatch",
            "The batch, cancelling",
            _json_answer("Batch"),
            (400, 404),
            parameters=batch_id,
        ),
    }
