"""The ``mock`` provider's images, moderations and rerank: deterministic answers, no network.

Images are a 1x1 PNG each; moderation flags an input containing ``mock-flag`` (as violence);
rerank scores each document by the share of the query's words it contains.
"""

from __future__ import annotations

from typing import Any

import orjson

from ._base import Operation, RequestContext
from ._content_safety import OPENAI_CATEGORIES
from ._surface import rerank_answer, rerank_documents

#: A 1x1 transparent PNG.
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
FLAG = "mock-flag"


def _texts(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [i if isinstance(i, str) else str((i or {}).get("text") or "") for i in items]


def _score(query: str, document: str) -> float:
    words = set(query.lower().split())
    return len(words & set(document.lower().split())) / max(1, len(words))


def mock_surface(body: dict[str, Any], ctx: RequestContext) -> bytes:
    """The answer to an image, moderation or rerank request, in the client's shape."""
    if ctx.operation in (Operation.IMAGE, Operation.IMAGE_EDIT):
        as_url = body.get("response_format") == "url"
        item = {"url": f"data:image/png;base64,{PNG_B64}"} if as_url else {"b64_json": PNG_B64}
        n = int(body.get("n") or 1)
        return orjson.dumps({"created": ctx.created, "data": [dict(item) for _ in range(n)]})
    if ctx.operation is Operation.MODERATION:
        results = []
        for text in _texts(body.get("input")):
            flagged = FLAG in text
            categories = {c: flagged and c == "violence" for c in OPENAI_CATEGORIES}
            results.append({
                "flagged": flagged,
                "categories": categories,
                "category_scores": {c: 1.0 if hit else 0.0 for c, hit in categories.items()},
                "category_applied_input_types": {c: ["text"] for c in OPENAI_CATEGORIES},
            })  # fmt: skip
        return orjson.dumps({"id": f"modr-{ctx.request_id}", "model": ctx.upstream_model, "results": results})
    documents = rerank_documents(body)
    scored = [(i, _score(body["query"], d)) for i, d in enumerate(documents)]
    tokens = sum(len(d.split()) + len(body["query"].split()) for d in documents)
    return rerank_answer(body, ctx, scored, tokens=tokens)


__all__ = ["FLAG", "PNG_B64", "mock_surface"]
