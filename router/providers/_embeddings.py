"""Shared pieces for providers whose embedding calls are not OpenAI-shaped.

Their :meth:`Provider.send` makes the upstream call (or several, for APIs that
take one input per call), reads the answers, and hands the router a
:class:`LocalResponse` holding a small neutral document (``vectors``,
``tokens``, ``estimated``, ``encoding``); ``parse_response`` then renders it with
:func:`openai_embedding_response`. That is how facts of the request the router
does not pass to ``parse_response`` (the input texts, ``encoding_format``) reach it.
"""

from __future__ import annotations

import array
import base64
import math
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from .._errors import InvalidRequestError, UpstreamProtocolError
from ._base import ProviderResponse, RequestContext, Usage


class LocalResponse:
    """An already-read response in the shape of :class:`UpstreamResponse`."""

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self.headers: Mapping[str, str] = headers
        self._body = body

    async def read(self) -> bytes:
        return self._body

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        yield self._body

    def close(self) -> None:
        pass


def embedding_inputs(body: dict[str, Any], provider: str) -> list[str]:
    """The inputs as texts; token-id inputs cannot be sent to a provider with its own tokenizer."""
    raw = body.get("input")
    items = raw if isinstance(raw, list) else [raw]
    if not items or not all(isinstance(i, str) for i in items):
        raise InvalidRequestError(
            f"'input': provider {provider!r} embeds text only, not token ids", param="input"
        )
    if not all(items):
        raise InvalidRequestError("'input': empty strings cannot be embedded", param="input")
    return list(items)


def estimate_tokens(texts: list[str]) -> int:
    """About four characters a token, the usual rule of thumb for English text."""
    return sum(max(1, math.ceil(len(t) / 4)) for t in texts)


def pack(vectors: list[list[float]], tokens: int, *, estimated: bool, body: dict[str, Any]) -> LocalResponse:
    doc = {
        "vectors": vectors,
        "tokens": tokens,
        "estimated": estimated,
        "encoding": body.get("encoding_format") or "float",
    }
    return LocalResponse(200, {"Content-Type": "application/json"}, orjson.dumps(doc))


def _base64(vector: list[float]) -> str:
    packed = array.array("f", vector)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode()


def openai_embedding_response(raw: bytes, ctx: RequestContext) -> ProviderResponse:
    """Render a document made by :func:`pack` as OpenAI's embedding list."""
    try:
        doc = orjson.loads(raw)
        vectors: list[list[float]] = doc["vectors"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise UpstreamProtocolError("embedding answer could not be read") from None
    b64 = doc.get("encoding") == "base64"
    usage = Usage(prompt_tokens=int(doc.get("tokens") or 0), estimated=bool(doc.get("estimated")))
    data = [
        {"object": "embedding", "index": i, "embedding": _base64(v) if b64 else v}
        for i, v in enumerate(vectors)
    ]
    body = {
        "object": "list",
        "data": data,
        "model": ctx.upstream_model,
        "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens},
    }
    return ProviderResponse(orjson.dumps(body), usage)
