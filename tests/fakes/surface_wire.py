"""The wire protocols of images, moderations and rerank, as the fakes enforce them.

Each ``validate_*`` raises :class:`SurfaceWireError` with the status and message the real API
answers for a request it rejects; each answer builder returns the documented response shape:

* OpenAI ``POST /v1/images/generations`` (JSON) and ``/v1/images/edits`` (multipart: ``image`` or
  ``image[]`` PNG files, ``prompt``, optional ``mask``), ``POST /v1/moderations``;
* vLLM's (and Jina's) ``POST /v1/rerank``; Cohere's ``POST /v2/rerank`` (documents are strings);
* Bedrock InvokeModel for ``cohere.rerank-*`` (``api_version`` 2 required) and ``amazon.rerank-*``;
* Imagen ``{model}:predict`` (``instances[].prompt``, ``parameters.sampleCount`` 1 to 4);
* Azure AI Content Safety ``POST /contentsafety/text:analyze``.
"""

from __future__ import annotations

import base64
from typing import Any

from aiohttp import web

#: A 1x1 PNG: what every fake image is.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)
PNG_B64 = base64.b64encode(PNG).decode()
#: Text the fakes' moderation flags, and the Imagen fake's safety filter withholds.
VIOLENT = "kill them all"

_IMAGE_FIELDS = {
    "model", "prompt", "n", "size", "quality", "style", "response_format", "user", "background",
    "moderation", "output_compression", "output_format", "partial_images", "stream",
}  # fmt: skip
_EDIT_FIELDS = (_IMAGE_FIELDS - {"style", "moderation"}) | {"image", "image[]", "mask", "input_fidelity"}


class SurfaceWireError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def openai(self) -> web.Response:
        error = {"message": self.message, "type": "invalid_request_error", "param": self.param, "code": None}
        return web.json_response({"error": error}, status=self.status)


def _unknown(body: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise SurfaceWireError(400, f"Unrecognized request argument supplied: {extra[0]}", extra[0])


def validate_image_request(body: dict[str, Any], *, edit: bool = False) -> int:
    """OpenAI's images checks; returns ``n``."""
    _unknown(body, _EDIT_FIELDS if edit else _IMAGE_FIELDS)
    if not isinstance(body.get("model"), str):
        raise SurfaceWireError(400, "you must provide a model parameter", "model")
    if not isinstance(body.get("prompt"), str) or not body["prompt"]:
        raise SurfaceWireError(400, "Missing required parameter: 'prompt'.", "prompt")
    n = body.get("n", 1)
    if isinstance(n, str) and n.isdigit():  # multipart fields are text
        n = int(n)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10:
        raise SurfaceWireError(400, f"Invalid value for 'n': {n!r}", "n")
    if body.get("response_format") not in (None, "url", "b64_json"):
        raise SurfaceWireError(400, "Invalid value for 'response_format'", "response_format")
    return n


def image_answer(body: dict[str, Any], n: int) -> dict[str, Any]:
    """OpenAI's images response; gpt-image models report token usage, dall-e models none."""
    item = (
        {"url": "https://images.example/fake.png"}
        if body.get("response_format") == "url"
        else {"b64_json": PNG_B64}
    )
    doc: dict[str, Any] = {"created": 1_700_000_000, "data": [dict(item) for _ in range(n)]}
    if str(body.get("model", "")).startswith("gpt-image"):
        doc["usage"] = {
            "input_tokens": 50,
            "output_tokens": 1056 * n,
            "total_tokens": 50 + 1056 * n,
            "input_tokens_details": {"text_tokens": 50, "image_tokens": 0},
        }
    return doc


async def read_edit_form(request: web.Request) -> dict[str, Any]:
    """An images edit upload: text fields by name, files as ``(filename, content type, bytes)``."""
    if not request.content_type.startswith("multipart/form-data"):
        raise SurfaceWireError(400, "Expected a multipart/form-data body")
    form: dict[str, Any] = {}
    reader = await request.multipart()
    async for part in reader:
        name = part.name or ""  # type: ignore[union-attr]
        data = await part.read()  # type: ignore[union-attr]
        if part.filename:  # type: ignore[union-attr]
            value: Any = (part.filename, part.headers.get("Content-Type"), bytes(data))  # type: ignore[union-attr]
            form.setdefault(name, []).append(value)
        else:
            form[name] = data.decode()
    images = form.get("image", []) + form.get("image[]", [])
    if not images:
        raise SurfaceWireError(400, "Missing required parameter: 'image'.", "image")
    for _, content_type, data in images + form.get("mask", []):
        if not data.startswith(b"\x89PNG") or content_type != "image/png":
            raise SurfaceWireError(400, "Invalid input image - format must be in ['png'].", "image")
    return form


def validate_moderation(body: dict[str, Any]) -> list[str]:
    _unknown(body, {"model", "input"})
    value = body.get("input")
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise SurfaceWireError(400, "Missing required parameter: 'input'.", "input")
    texts = []
    for item in items:
        texts.append(item if isinstance(item, str) else str((item or {}).get("text") or ""))
    return texts


_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
    "violence/graphic",
)  # fmt: skip


def moderation_answer(model: str, texts: list[str]) -> dict[str, Any]:
    results = []
    for text in texts:
        violent = VIOLENT in text
        categories = {c: violent and c == "violence" for c in _CATEGORIES}
        scores = {c: 0.97 if categories[c] else 0.001 for c in _CATEGORIES}
        results.append(
            {
                "flagged": violent,
                "categories": categories,
                "category_scores": scores,
                "category_applied_input_types": {c: ["text"] for c in _CATEGORIES},
            }
        )
    return {"id": "modr-fake", "model": model, "results": results}


def _score(query: str, document: str) -> float:
    words = set(query.lower().split())
    return round(len(words & set(document.lower().split())) / max(1, len(words)), 6)


def _ranked(query: str, documents: list[str], top_n: Any) -> list[tuple[int, float]]:
    ranked = sorted(enumerate(_score(query, d) for d in documents), key=lambda r: -r[1])
    return ranked[:top_n] if isinstance(top_n, int) else ranked


def _rerank_common(body: Any, allowed: set[str], *, model: bool = True) -> tuple[str, list[str]]:
    if not isinstance(body, dict):
        raise SurfaceWireError(400, "body must be an object")
    _unknown(body, allowed)
    if model and not isinstance(body.get("model"), str):
        raise SurfaceWireError(400, "model is required", "model")
    query, documents = body.get("query"), body.get("documents")
    if not isinstance(query, str) or not query:
        raise SurfaceWireError(400, "query is required", "query")
    if not isinstance(documents, list) or not documents or not all(isinstance(d, str) for d in documents):
        raise SurfaceWireError(400, "documents must be a non-empty list of strings", "documents")
    top_n = body.get("top_n")
    if top_n is not None and (not isinstance(top_n, int) or top_n < 1):
        raise SurfaceWireError(400, "top_n must be a positive integer", "top_n")
    return query, documents


def vllm_rerank(body: Any) -> dict[str, Any]:
    """vLLM's ``/v1/rerank`` (Jina's shape): documents come back with their text, usage in tokens."""
    allowed = {"model", "query", "documents", "top_n", "truncate_prompt_tokens"}
    query, documents = _rerank_common(body, allowed)
    results = [
        {"index": i, "document": {"text": documents[i]}, "relevance_score": s}
        for i, s in _ranked(query, documents, body.get("top_n"))
    ]
    tokens = len(query.split()) * len(documents) + sum(len(d.split()) for d in documents)
    usage = {"total_tokens": tokens}
    return {"id": "rerank-fake", "model": body["model"], "usage": usage, "results": results}


def cohere_rerank(body: Any) -> dict[str, Any]:
    """Cohere's ``/v2/rerank``: one search unit per 100 documents."""
    query, documents = _rerank_common(body, {"model", "query", "documents", "top_n", "max_tokens_per_doc"})
    results = [{"index": i, "relevance_score": s} for i, s in _ranked(query, documents, body.get("top_n"))]
    units = -(-len(documents) // 100)
    meta = {"api_version": {"version": "2"}, "billed_units": {"search_units": units}}
    return {"id": "cohere-rerank-fake", "results": results, "meta": meta}


def bedrock_rerank(model: str, doc: Any) -> dict[str, Any]:
    """InvokeModel of a Bedrock reranker; raises for what Bedrock's ValidationException answers."""
    if "cohere." in model:
        allowed = {"query", "documents", "top_n", "max_tokens_per_doc", "api_version"}
        if not isinstance(doc, dict) or not isinstance(doc.get("api_version"), int) or doc["api_version"] < 2:
            raise SurfaceWireError(400, "Malformed input request: api_version must be an integer >= 2")
    else:
        allowed = {"query", "documents", "top_n"}
    query, documents = _rerank_common(doc, allowed, model=False)
    ranked = _ranked(query, documents, doc.get("top_n"))
    return {"results": [{"index": i, "relevance_score": s} for i, s in ranked]}


def imagen_predict(body: Any) -> dict[str, Any]:
    """Imagen ``:predict``; a prompt with :data:`VIOLENT` in it gets every image withheld."""
    if not isinstance(body, dict):
        raise SurfaceWireError(400, "body must be an object")
    _unknown(body, {"instances", "parameters"})
    instances = body.get("instances")
    one = isinstance(instances, list) and len(instances) == 1 and isinstance(instances[0], dict)
    if not one or not isinstance(instances[0].get("prompt"), str):
        raise SurfaceWireError(400, "instances: exactly one instance with a prompt is required")
    parameters = body.get("parameters") or {}
    _unknown(parameters, {"sampleCount", "aspectRatio", "outputOptions", "personGeneration", "enhancePrompt"})
    count = parameters.get("sampleCount", 4)
    if not isinstance(count, int) or not 1 <= count <= 4:
        raise SurfaceWireError(400, "sampleCount must be from 1 to 4")
    if parameters.get("aspectRatio") not in (None, "1:1", "3:4", "4:3", "9:16", "16:9"):
        raise SurfaceWireError(400, f"unsupported aspectRatio {parameters['aspectRatio']!r}")
    mime = (parameters.get("outputOptions") or {}).get("mimeType", "image/png")
    if VIOLENT in instances[0]["prompt"]:
        return {}  # Imagen answers an empty object when the filter withholds every image
    return {"predictions": [{"bytesBase64Encoded": PNG_B64, "mimeType": mime} for _ in range(count)]}


def content_safety_analyze(body: Any) -> dict[str, Any]:
    """Azure AI Content Safety's text analysis (four severity levels)."""
    if not isinstance(body, dict):
        raise SurfaceWireError(400, "body must be an object")
    _unknown(body, {"text", "categories", "blocklistNames", "haltOnBlocklistHit", "outputType"})
    text = body.get("text")
    if not isinstance(text, str) or not text or len(text) > 10_000:
        raise SurfaceWireError(400, "text must hold 1 to 10000 characters")
    if body.get("outputType") not in (None, "FourSeverityLevels", "EightSeverityLevels"):
        raise SurfaceWireError(400, "invalid outputType")
    violence = 6 if VIOLENT in text else 0
    analysis = [
        {"category": "Hate", "severity": 0},
        {"category": "SelfHarm", "severity": 0},
        {"category": "Sexual", "severity": 0},
        {"category": "Violence", "severity": violence},
    ]
    return {"blocklistsMatch": [], "categoriesAnalysis": analysis}


def tei_rerank(body: Any) -> list[dict[str, Any]]:
    """Hugging Face TEI's ``POST /rerank``: ``{"query", "texts"}`` in, ``[{"index", "score"}]`` out."""
    if not isinstance(body, dict):
        raise SurfaceWireError(422, "Failed to deserialize the JSON body into the target type")
    query, texts = body.get("query"), body.get("texts")
    if not isinstance(query, str):
        raise SurfaceWireError(422, "Failed to deserialize the JSON body: missing field `query`")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise SurfaceWireError(422, "Failed to deserialize the JSON body: missing field `texts`")
    ranked = _ranked(query, texts, None)
    if body.get("return_text"):
        return [{"index": i, "score": s, "text": texts[i]} for i, s in ranked]
    return [{"index": i, "score": s} for i, s in ranked]
