"""The rest of the OpenAI surface, plus rerank: images, moderations and ``/v1/rerank``.

Each is an :class:`~.._api.InboundApi` over the same core as chat (auth, model access per key,
limits, budgets, the ledger, metrics, retries and fallbacks). None streams; every answer is the
provider adapter's JSON in the shape of the route:

* ``POST /v1/images/generations`` and ``POST /v1/images/edits`` (multipart): OpenAI's images
  response, ``{"created", "data": [{"b64_json" | "url", "revised_prompt"?}], "usage"?}``;
* ``POST /v1/moderations``: OpenAI's moderation object;
* ``POST /v1/rerank``: Cohere's v2 (and Jina's) shape, ``{"id", "model", "results": [{"index",
  "relevance_score", "document"?}], "meta"?, "usage"?}``.

A request without ``model`` (OpenAI's moderation and image APIs default it upstream) goes to the
first model group of the config that serves the route's mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from starlette.responses import Response

from .._errors import InvalidRequestError
from ..core._outcome import Answer, Failure, Outcome
from ..providers import Operation
from ._base import JSON, InboundApi, Requested
from ._multipart import form_files

if TYPE_CHECKING:
    from ..core._dispatch import Call
    from ..core._state import RouterState

__all__ = ["SURFACE_APIS", "ImageEditsApi", "ImagesApi", "ModerationsApi", "RerankApi"]

#: Largest ``n`` OpenAI accepts on the image endpoints.
MAX_IMAGES = 10
MAX_DOCUMENTS = 10_000


def _bad(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"'{param}': {message}", param=param)


def _string(body: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise _bad(name, "is required")
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise _bad(name, "must be a non-empty string" if required else "must be a string")
    return value


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = body[name] = int(value)  # multipart fields arrive as text ('²'.isdigit() too)
    elif isinstance(value, float) and value.is_integer():
        value = body[name] = int(value)  # JSON has one number type: 5.0 is 5
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _bad(name, f"must be an integer from {low} to {high}")


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if isinstance(value, str) and value in ("true", "false"):
        value = body[name] = value == "true"
    if value is not None and not isinstance(value, bool):
        raise _bad(name, "must be a boolean")
    return bool(value)


class SurfaceApi(InboundApi):
    """A JSON-in, JSON-out route of one operation; the answer passes through as the adapter wrote it."""

    #: The mode (see :mod:`..._modes`) whose groups take a request that names no model.
    mode: ClassVar[str]

    def __init__(self, state: Callable[[], RouterState]) -> None:
        self._state = state

    def _model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if model is None:
            for name, group in self._state().groups.items():
                if self.mode in group.modes:
                    body["model"] = name
                    return name
            raise _bad("model", f"is required (no model group serves {self.mode} requests by default)")
        if not isinstance(model, str) or not model:
            raise _bad("model", "must be a non-empty string")
        return model

    def validate(self, body: dict[str, Any]) -> Requested:
        if _flag(body, "stream"):
            raise InvalidRequestError(
                f"'stream': streamed answers are not supported on this route ({self.operation.value})",
                param="stream",
                code="unsupported_parameter",
            )
        model = self._model(body)
        self.check(body)
        return Requested(model=model)

    def check(self, body: dict[str, Any]) -> None:
        """Route-specific checks; raise naming the field."""

    def render(self, outcome: Outcome, call: Call) -> Response:
        if isinstance(outcome, Answer):
            return Response(outcome.body, media_type=JSON, headers=outcome.headers)
        if isinstance(outcome, Failure):
            return self.render_error(outcome.error, outcome.headers)
        raise AssertionError(f"{self.operation.value} never streams")  # validate refuses stream


class ImagesApi(SurfaceApi):
    operation = Operation.IMAGE
    mode = "image"

    def check(self, body: dict[str, Any]) -> None:
        _string(body, "prompt", required=True)
        _integer(body, "n", 1, MAX_IMAGES)
        for name in ("size", "quality", "style", "user", "background", "output_format", "moderation"):
            _string(body, name)
        fmt = _string(body, "response_format")
        if fmt is not None and fmt not in ("url", "b64_json"):
            raise _bad("response_format", "must be 'url' or 'b64_json'")


class ImageEditsApi(ImagesApi):
    operation = Operation.IMAGE_EDIT

    def check(self, body: dict[str, Any]) -> None:
        super().check(body)
        images = form_files(body.get("image")) + form_files(body.get("image[]"))
        if not images:
            raise _bad("image", "is required: upload the image to edit as a multipart file")
        if body.get("mask") is not None and not form_files(body["mask"]):
            raise _bad("mask", "must be an uploaded file")


class ModerationsApi(SurfaceApi):
    operation = Operation.MODERATION
    mode = "moderation"

    def check(self, body: dict[str, Any]) -> None:
        value = body.get("input")
        if isinstance(value, str):
            return
        if not isinstance(value, list) or not value:
            raise _bad("input", "must be a string, an array of strings, or an array of input parts")
        for i, item in enumerate(value):
            if isinstance(item, str):
                continue
            kind = item.get("type") if isinstance(item, dict) else None
            if kind not in ("text", "image_url"):
                raise _bad(f"input[{i}]", "must be a string or a part of type 'text' or 'image_url'")


class RerankApi(SurfaceApi):
    operation = Operation.RERANK
    mode = "rerank"

    def check(self, body: dict[str, Any]) -> None:
        _string(body, "query", required=True)
        documents = body.get("documents")
        if not isinstance(documents, list) or not documents:
            raise _bad("documents", "must be a non-empty array of strings")
        if len(documents) > MAX_DOCUMENTS:
            raise _bad("documents", f"must hold at most {MAX_DOCUMENTS} documents")
        for i, doc in enumerate(documents):
            text = doc.get("text") if isinstance(doc, dict) else doc
            if not isinstance(text, str):
                raise _bad(f"documents[{i}]", "must be a string or an object with a string 'text'")
        _integer(body, "top_n", 1, MAX_DOCUMENTS)
        _integer(body, "max_tokens_per_doc", 1, 1_000_000)
        _flag(body, "return_documents")


#: Route path -> API class, as :func:`~..._surface_routes.register_surface_routes` registers them.
SURFACE_APIS: dict[str, type[SurfaceApi]] = {
    "/images/generations": ImagesApi,
    "/images/edits": ImageEditsApi,
    "/moderations": ModerationsApi,
    "/rerank": RerankApi,
}
