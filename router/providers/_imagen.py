"""OpenAI image generation on Google's Imagen models (``{model}:predict``), for the Gemini API and
Vertex AI alike.

Request: ``{"instances": [{"prompt"}], "parameters": {"sampleCount", "aspectRatio"?,
"outputOptions": {"mimeType"}?}}``. ``n`` is ``sampleCount`` (Imagen makes 1 to 4); ``size`` becomes
the supported aspect ratio closest to it (``1:1``, ``3:4``, ``4:3``, ``9:16``, ``16:9``);
``output_format`` png or jpeg is ``outputOptions.mimeType``. Parameters Imagen has no counterpart
for (``style``, ``background``, a ``quality`` other than standard) are refused unless the
deployment sets ``dropUnsupportedParams``.

Answer: ``{"predictions": [{"bytesBase64Encoded", "mimeType", "prompt"?} | {"raiFilteredReason"}]}``
becomes OpenAI's ``{"created", "data": [{"b64_json"} | {"url": "data:..."}]}`` (Imagen returns
bytes, never links: ``response_format: url`` gets a data URL). When the safety filter removed every
image, the answer is a content-filter error.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from .._errors import ContentFilterError, InvalidRequestError, UpstreamProtocolError
from ._base import RequestContext, UpstreamResponse
from ._embeddings import LocalResponse
from ._translate import reject_unsupported

MAX_SAMPLES = 4
_RATIOS = {"1:1": 1.0, "3:4": 0.75, "4:3": 4 / 3, "9:16": 9 / 16, "16:9": 16 / 9}
_FORMATS = {"png": "image/png", "jpeg": "image/jpeg"}
_UNSUPPORTED = frozenset({"style", "background", "output_compression", "partial_images", "moderation"})


def aspect_ratio(size: str) -> str:
    """The Imagen aspect ratio nearest to an OpenAI ``WIDTHxHEIGHT`` size."""
    width, _, height = size.partition("x")
    if not (width.isdigit() and height.isdigit()) or not int(width) or not int(height):
        raise InvalidRequestError(f"'size': expected WIDTHxHEIGHT or auto, got {size!r}", param="size")
    ratio = int(width) / int(height)
    return min(_RATIOS, key=lambda name: abs(_RATIOS[name] - ratio))


def imagen_request(body: dict[str, Any], ctx: RequestContext, provider: str) -> dict[str, Any]:
    body = dict(body)
    if body.get("quality") in ("standard", "auto"):
        body.pop("quality")
    reject_unsupported(body, _UNSUPPORTED | {"quality"}, ctx, provider)
    n = body.get("n") or 1
    if n > MAX_SAMPLES:
        raise InvalidRequestError(f"'n': provider {provider!r} makes at most {MAX_SAMPLES} images", param="n")
    parameters: dict[str, Any] = {"sampleCount": n}
    size = body.get("size")
    if size not in (None, "auto"):
        parameters["aspectRatio"] = aspect_ratio(size)
    fmt = body.get("output_format")
    if fmt is not None:
        if fmt not in _FORMATS:
            raise InvalidRequestError(
                f"'output_format': provider {provider!r} makes png or jpeg images", param="output_format"
            )
        parameters["outputOptions"] = {"mimeType": _FORMATS[fmt]}
    return {"instances": [{"prompt": body["prompt"]}], "parameters": parameters}


def openai_images(doc: dict[str, Any], body: dict[str, Any], provider: str) -> dict[str, Any]:
    """An Imagen answer as OpenAI's images response."""
    predictions = doc.get("predictions") or []
    if not isinstance(predictions, list):
        raise UpstreamProtocolError(f"{provider}: the Imagen answer's 'predictions' is not an array")
    as_url = body.get("response_format") == "url"
    data: list[dict[str, Any]] = []
    reasons: list[str] = []
    for prediction in predictions:
        encoded = prediction.get("bytesBase64Encoded") if isinstance(prediction, dict) else None
        if not isinstance(encoded, str):
            reason = prediction.get("raiFilteredReason") if isinstance(prediction, dict) else None
            reasons.append(str(reason or "no image"))
            continue
        mime = prediction.get("mimeType") or "image/png"
        item: dict[str, Any] = {"url": f"data:{mime};base64,{encoded}"} if as_url else {"b64_json": encoded}
        if isinstance(prediction.get("prompt"), str):
            item["revised_prompt"] = prediction["prompt"]
        data.append(item)
    if not data:
        detail = f": {'; '.join(reasons)}" if reasons else ""
        raise ContentFilterError(f"{provider}: Imagen's safety filter withheld every image{detail}")
    return {"created": int(time.time()), "data": data}


async def finish_imagen(resp: UpstreamResponse, body: dict[str, Any], provider: str) -> UpstreamResponse:
    """Read an Imagen answer and hand over OpenAI's (errors pass as sent)."""
    raw = await resp.read()
    if resp.status >= 400:
        return LocalResponse(resp.status, resp.headers, raw)
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError(f"{provider}: upstream answered with a body that is not JSON") from None
    if not isinstance(doc, dict):
        raise UpstreamProtocolError(f"{provider}: upstream answered with a JSON {type(doc).__name__}")
    answer = orjson.dumps(openai_images(doc, body, provider))
    return LocalResponse(200, {"content-type": "application/json"}, answer)
