"""What providers share for images, moderations and rerank (see :mod:`...inbound.surface`).

OpenAI-shaped upstreams (OpenAI, Azure OpenAI, OpenAI-compatible servers) get image and
moderation requests as the client sent them, with ``model`` rewritten (image edits rebuilt as
multipart), and answer in the client's shape: the body passes through, read only for usage.

Rerank answers differ by backend (Cohere v2, Bedrock's InvokeModel, vLLM/Jina); each provider's
``send`` reads the upstream answer and hands over the router's own answer in Cohere's v2 shape
(:func:`rerank_answer`) as a :class:`LocalResponse`, because the answer depends on the request
(``return_documents``, ``top_n``) which ``parse_response`` cannot see.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from .._errors import UpstreamProtocolError
from ..inbound._multipart import encode_form
from ..metering._units import requested_units
from ._base import (
    Operation,
    ProviderResponse,
    RequestContext,
    UpstreamClient,
    UpstreamRequest,
    UpstreamResponse,
    Usage,
)
from ._embeddings import LocalResponse

__all__ = [
    "SURFACE",
    "RerankResult",
    "finish_rerank",
    "images_usage",
    "openai_surface_request",
    "parse_surface",
    "rerank_documents",
]

#: The operations of this module; OpenAI-shaped providers list the ones they speak.
SURFACE = frozenset({Operation.IMAGE, Operation.IMAGE_EDIT, Operation.MODERATION, Operation.RERANK})

#: (index, relevance score) per ranked document, best first, as a backend reports them.
RerankResult = list[tuple[int, float]]


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _doc(raw: bytes, provider: str) -> dict[str, Any]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError(f"{provider}: upstream answered with a body that is not JSON") from None
    if not isinstance(doc, dict):
        raise UpstreamProtocolError(f"{provider}: upstream answered with a JSON {type(doc).__name__}")
    return doc


def openai_surface_request(
    body: dict[str, Any], ctx: RequestContext, url: str, headers: dict[str, str]
) -> UpstreamRequest:
    """The upstream request of an OpenAI-shaped image, moderation or rerank call; ``headers`` are
    the auth and deployment headers."""
    body = {**body, "model": ctx.upstream_model}
    if ctx.operation is Operation.IMAGE_EDIT:
        payload, content_type = encode_form(body)
        return UpstreamRequest("POST", url, {**headers, "Content-Type": content_type}, payload)
    if ctx.operation is Operation.RERANK:
        body = {k: v for k, v in body.items() if k != "return_documents"}
        body["documents"] = rerank_documents(body)
    return UpstreamRequest("POST", url, {"Content-Type": "application/json", **headers}, orjson.dumps(body))


def images_usage(doc: dict[str, Any]) -> Usage:
    """Images generated, plus gpt-image's token usage (``input_tokens``, ``output_tokens``)."""
    data = doc.get("data")
    usage = _obj(doc.get("usage"))
    return Usage(
        prompt_tokens=int(usage.get("input_tokens") or 0),
        completion_tokens=int(usage.get("output_tokens") or 0),
        images=len(data) if isinstance(data, list) else 0,
    )


def parse_surface(raw: bytes, ctx: RequestContext, provider: str) -> ProviderResponse:
    """An image, moderation or rerank answer in the client's shape: passed through, usage read."""
    doc = _doc(raw, provider)
    if ctx.operation in (Operation.IMAGE, Operation.IMAGE_EDIT):
        if not isinstance(doc.get("data"), list):
            raise UpstreamProtocolError(f"{provider}: the images answer has no 'data' array")
        return ProviderResponse(raw, images_usage(doc))
    if ctx.operation is Operation.MODERATION:
        if not isinstance(doc.get("results"), list):
            raise UpstreamProtocolError(f"{provider}: the moderation answer has no 'results' array")
        return ProviderResponse(raw, None)  # unpriced; the router counts the input's tokens
    billed = _obj(_obj(doc.get("meta")).get("billed_units"))
    usage = _obj(doc.get("usage"))
    return ProviderResponse(
        raw,
        Usage(
            prompt_tokens=int(usage.get("total_tokens") or 0),
            search_units=int(billed.get("search_units") or 0),
        ),
    )


def rerank_documents(body: dict[str, Any]) -> list[str]:
    """The documents as texts (clients may send Jina's ``{"text": ...}`` objects)."""
    return [d["text"] if isinstance(d, dict) else d for d in body["documents"]]


def rerank_answer(
    body: dict[str, Any],
    ctx: RequestContext,
    results: RerankResult,
    *,
    answer_id: str | None = None,
    search_units: int | None = None,
    tokens: int | None = None,
) -> bytes:
    """The router's rerank answer, in Cohere's v2 shape (Jina's ``usage`` beside it)."""
    documents = rerank_documents(body)
    top_n = body.get("top_n")
    ranked = sorted(results, key=lambda r: -r[1])
    if isinstance(top_n, int):
        ranked = ranked[:top_n]
    rows: list[dict[str, Any]] = []
    for index, score in ranked:
        if not 0 <= index < len(documents):
            where = ctx.deployment.provider
            raise UpstreamProtocolError(f"{where}: rerank result index {index} is out of range")
        row: dict[str, Any] = {"index": index, "relevance_score": score}
        if body.get("return_documents"):
            row["document"] = {"text": documents[index]}
        rows.append(row)
    doc: dict[str, Any] = {
        "id": answer_id or f"rerank-{ctx.request_id}",
        "model": ctx.public_model,
        "results": rows,
    }
    if search_units is not None:
        doc["meta"] = {"billed_units": {"search_units": search_units}}
    if tokens is not None:
        doc["usage"] = {"total_tokens": tokens}
    return orjson.dumps(doc)


#: Reads a backend's rerank answer (parsed JSON): (results, answer id, search units, tokens).
RerankReader = Callable[[Any], tuple[RerankResult, str | None, int | None, int | None]]


async def finish_rerank(
    client: UpstreamClient,
    request: UpstreamRequest,
    body: dict[str, Any],
    ctx: RequestContext,
    provider: str,
    read: RerankReader,
) -> UpstreamResponse:
    """Send a rerank request and turn the backend's answer into the router's (errors pass as sent)."""
    resp = await client.send(request, ctx)
    raw = await resp.read()
    if resp.status >= 400:
        return LocalResponse(resp.status, resp.headers, raw)
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError(f"{provider}: upstream answered with a body that is not JSON") from None
    try:
        results, answer_id, units, tokens = read(doc)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UpstreamProtocolError(f"{provider}: the rerank answer is not in the documented shape") from None
    answer = rerank_answer(body, ctx, results, answer_id=answer_id, search_units=units, tokens=tokens)
    return LocalResponse(200, {"content-type": "application/json"}, answer)


def read_scored(doc: dict[str, Any]) -> RerankResult:
    """``results: [{"index", "relevance_score"}]``, the shape Cohere, Bedrock, vLLM and Jina share."""
    return [(int(r["index"]), float(r["relevance_score"])) for r in doc["results"]]


def read_openai_compatible(doc: dict[str, Any]) -> tuple[RerankResult, str | None, int | None, int | None]:
    """vLLM's and Jina's answer: the scored results and ``usage.total_tokens``."""
    usage = _obj(doc.get("usage"))
    tokens = usage.get("total_tokens", usage.get("prompt_tokens"))
    answer_id = doc.get("id") if isinstance(doc.get("id"), str) else None
    return read_scored(doc), answer_id, None, int(tokens) if isinstance(tokens, int) else None


def cohere_rerank_body(body: dict[str, Any], model: str) -> dict[str, Any]:
    """Cohere's v2 rerank request (Bedrock's Cohere rerankers take it too, with ``api_version``)."""
    payload: dict[str, Any] = {"model": model, "query": body["query"], "documents": rerank_documents(body)}
    for name in ("top_n", "max_tokens_per_doc"):
        if body.get(name) is not None:
            payload[name] = body[name]
    return payload


def read_cohere(doc: dict[str, Any]) -> tuple[RerankResult, str | None, int | None, int | None]:
    """Cohere's v2 answer: the scored results and ``meta.billed_units.search_units``."""
    billed = _obj(_obj(doc.get("meta")).get("billed_units"))
    units = billed.get("search_units")
    answer_id = doc.get("id") if isinstance(doc.get("id"), str) else None
    return read_scored(doc), answer_id, int(units) if isinstance(units, int | float) else None, None


def bedrock_rerank_body(body: dict[str, Any], model: str) -> dict[str, Any]:
    """InvokeModel's body for a Bedrock reranker: Cohere's (``api_version`` 2) or Amazon's."""
    payload = cohere_rerank_body(body, model)
    del payload["model"]  # the model is in the URL
    if "cohere." in model:
        payload["api_version"] = 2
    else:
        payload.pop("max_tokens_per_doc", None)  # Amazon Rerank has no such parameter
    return payload


def bedrock_reader(body: dict[str, Any]) -> RerankReader:
    """Bedrock's answer: scored results; it bills one query per 100 documents (its search unit)."""
    units = requested_units(Operation.RERANK, body)[1]

    def read(doc: dict[str, Any]) -> tuple[RerankResult, str | None, int | None, int | None]:
        answer_id = doc.get("id") if isinstance(doc.get("id"), str) else None
        return read_scored(doc), answer_id, units, None

    return read


def tei_rerank_body(body: dict[str, Any]) -> dict[str, Any]:
    """Hugging Face TEI's ``POST /rerank``: ``{"query", "texts"}``."""
    return {"query": body["query"], "texts": rerank_documents(body), "return_text": False}


def tei_reader(body: dict[str, Any]) -> RerankReader:
    """TEI answers a bare ``[{"index", "score"}]`` and counts no tokens: they are estimated (about
    four characters a token, the query once per document)."""
    documents = rerank_documents(body)
    tokens = sum(-(-(len(body["query"]) + len(d)) // 4) for d in documents)

    def read(doc: Any) -> tuple[RerankResult, str | None, int | None, int | None]:
        return [(int(r["index"]), float(r["score"])) for r in doc], None, None, tokens

    return read
