"""OpenAI moderations on Azure: Azure AI Content Safety's ``text:analyze``.

Azure OpenAI has no ``/moderations``; Azure's moderation service is Content Safety, a Cognitive
Services resource: ``POST {baseUrl}/contentsafety/text:analyze?api-version={apiVersion}`` (e.g.
``2024-09-01``) with the key in ``Ocp-Apim-Subscription-Key`` (an ``entra:`` credential is sent as a
bearer token), one text per call, answered with a severity (0, 2, 4 or 6) for each of ``Hate``,
``SelfHarm``, ``Sexual`` and ``Violence``.

Each input text becomes one call (sent concurrently) and one OpenAI moderation result: a category
is flagged from severity 4 (medium, where Azure OpenAI's default content filter blocks), its
score is the severity divided by 6, and the categories Content Safety does not judge are false, 0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import orjson

from .._errors import InvalidRequestError, UpstreamProtocolError
from ._base import RequestContext, UpstreamClient, UpstreamRequest, UpstreamResponse
from ._embeddings import LocalResponse

#: Severity from which a category is flagged.
FLAG_SEVERITY = 4
MAX_SEVERITY = 6
#: Content Safety's category -> OpenAI's.
CATEGORIES = {"Hate": "hate", "SelfHarm": "self-harm", "Sexual": "sexual", "Violence": "violence"}
#: Every category of OpenAI's omni-moderation answer.
OPENAI_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
    "violence/graphic",
)  # fmt: skip


def moderation_texts(body: dict[str, Any]) -> list[str]:
    """The texts to judge; image parts have no Content Safety text analysis."""
    value = body["input"]
    texts: list[str] = []
    for i, item in enumerate(value if isinstance(value, list) else [value]):
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
            texts.append(item["text"])
        else:
            raise InvalidRequestError(
                f"'input[{i}]': provider 'azure' (Content Safety) moderates text only",
                param=f"input[{i}]",
                code="unsupported_parameter",
            )
    return texts


def analyze_request(
    text: str, ctx: RequestContext, base: str, version: str, auth: Mapping[str, str]
) -> UpstreamRequest:
    url = f"{base}/contentsafety/text:analyze?api-version={quote(version, safe='')}"
    payload = orjson.dumps({"text": text, "outputType": "FourSeverityLevels"})
    headers = {"Content-Type": "application/json", **auth, **ctx.deployment.headers}
    return UpstreamRequest("POST", url, headers, payload)


def openai_result(doc: dict[str, Any]) -> dict[str, Any]:
    """One Content Safety answer as one OpenAI moderation result."""
    categories = dict.fromkeys(OPENAI_CATEGORIES, False)
    scores = dict.fromkeys(OPENAI_CATEGORIES, 0.0)
    for item in doc["categoriesAnalysis"]:
        name = CATEGORIES.get(item["category"])
        if name is None:
            continue
        severity = int(item.get("severity") or 0)
        categories[name] = severity >= FLAG_SEVERITY
        scores[name] = min(severity, MAX_SEVERITY) / MAX_SEVERITY
    return {
        "flagged": any(categories.values()),
        "categories": categories,
        "category_scores": scores,
        "category_applied_input_types": {name: ["text"] for name in OPENAI_CATEGORIES},
    }


async def moderate(
    client: UpstreamClient, body: dict[str, Any], ctx: RequestContext, requests: list[UpstreamRequest]
) -> UpstreamResponse:
    """Send one analysis per text; the first error answer is the answer, else OpenAI's object."""

    async def call(request: UpstreamRequest) -> tuple[UpstreamResponse, bytes]:
        resp = await client.send(request, ctx)
        return resp, await resp.read()

    answers = await asyncio.gather(*(call(r) for r in requests))
    results = []
    for resp, raw in answers:
        if resp.status >= 400:
            return LocalResponse(resp.status, resp.headers, raw)
        try:
            results.append(openai_result(orjson.loads(raw)))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            message = "azure: the Content Safety answer is not in the documented shape"
            raise UpstreamProtocolError(message) from None
    doc = {"id": f"modr-{ctx.request_id}", "model": ctx.public_model, "results": results}
    return LocalResponse(200, {"content-type": "application/json"}, orjson.dumps(doc))
