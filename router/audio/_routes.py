"""The audio routes: ``/v1/audio/{speech,transcriptions,translations}`` and Azure OpenAI's
``/openai/deployments/{deployment}/audio/...`` (the deployment in the path is the model group)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..providers import Operation
from ._api import SpeechApi, TranscriptionApi

if TYPE_CHECKING:
    from starlette.responses import Response

    from ..core._router import Router
    from ..inbound._base import InboundApi
    from ..server._app import RouterApp
    from ..server._inbound import Inbound

_JSON_BODY = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}
}
_UPLOAD = {
    "type": "object",
    "required": ["file", "model"],
    "properties": {"file": {"type": "string", "format": "binary"}, "model": {"type": "string"}},
}
_FORM_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _UPLOAD}}}}

_ROUTES: tuple[tuple[str, Operation, str, dict[str, Any]], ...] = (
    ("/audio/speech", Operation.AUDIO_SPEECH, "Generate audio from text (OpenAI format)", _JSON_BODY),
    ("/audio/transcriptions", Operation.AUDIO_TRANSCRIPTION, "Transcribe audio (OpenAI format)", _FORM_BODY),
    ("/audio/translations", Operation.AUDIO_TRANSLATION, "Translate audio into English text", _FORM_BODY),
)


def register_audio_routes(app: RouterApp, router: Router) -> None:
    for path, operation, summary, extra in _ROUTES:
        api: InboundApi = SpeechApi() if operation is Operation.AUDIO_SPEECH else TranscriptionApi(operation)
        _register(app, router, api, path, summary, extra)


def _register(
    app: RouterApp, router: Router, api: InboundApi, path: str, summary: str, extra: dict[str, Any]
) -> None:
    async def endpoint(inbound: Inbound) -> Response:
        return await router.serve(api, inbound)

    async def azure_endpoint(inbound: Inbound, model: str) -> Response:
        return await router.serve(api, inbound, model=model)

    name = api.operation.value
    app.add_fast_route(path, endpoint, summary=summary, openapi_extra=extra, name=name)
    app.add_deployment_route(
        path, azure_endpoint, summary=f"{summary} (Azure OpenAI path)", name=f"azure_{name}"
    )
