"""Routes of the rest of the surface: ``/v1/images/generations``, ``/v1/images/edits``,
``/v1/moderations`` and ``/v1/rerank`` (each also without ``/v1``), and the Azure OpenAI paths of
the image routes (``/openai/deployments/{deployment}/images/...``). See :mod:`.inbound.surface`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from ..inbound._base import JSON
from ..inbound._multipart import FormInbound
from ..inbound._surface import SURFACE_APIS, SurfaceApi

if TYPE_CHECKING:
    from ..core._router import Router
    from ._app import RouterApp
    from ._inbound import Inbound

_SUMMARIES = {
    "/images/generations": "Create images (OpenAI format)",
    "/images/edits": "Edit an image (OpenAI format, multipart)",
    "/moderations": "Classify text and images for policy violations (OpenAI format)",
    "/rerank": "Rerank documents by relevance to a query (Cohere/Jina format)",
}
_OBJECT = {"schema": {"type": "object", "additionalProperties": True}}
_JSON_BODY = {"content": {JSON: _OBJECT}}
_FORM_BODY = {"content": {"multipart/form-data": _OBJECT}}
#: The routes Azure OpenAI also serves under a deployment's path.
_AZURE = ("/images/generations", "/images/edits")


def register_surface_routes(app: RouterApp, router: Router) -> None:
    for path, api_class in SURFACE_APIS.items():
        api = api_class(lambda: router.state)
        body = _FORM_BODY if path == "/images/edits" else _JSON_BODY
        extra: dict[str, Any] = {"requestBody": {"required": True, **body}}
        name = api.operation.value
        summary = _SUMMARIES[path]
        app.add_fast_route(path, _endpoint(router, api), summary=summary, openapi_extra=extra, name=name)
        if path in _AZURE:
            app.add_deployment_route(
                path, _model_endpoint(router, api), summary=_SUMMARIES[path] + " (Azure OpenAI path)",
                name=f"azure_{name}", openapi_extra=dict(extra),
            )  # fmt: skip


def _endpoint(router: Router, api: SurfaceApi) -> Any:
    async def endpoint(inbound: Inbound) -> Response:
        return await router.serve(api, FormInbound(inbound))

    return endpoint


def _model_endpoint(router: Router, api: SurfaceApi) -> Any:
    async def endpoint(inbound: Inbound, model: str) -> Response:
        return await router.serve(api, FormInbound(inbound), model=model)

    return endpoint
