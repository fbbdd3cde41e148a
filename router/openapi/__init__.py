"""The router's OpenAPI description (``GET /openapi.json``): request bodies, parameters and every
answer of each public route, errors and streams included.

The model routes read their raw request (see :class:`.._app.RouterApp`), so FastAPI cannot see
what they take or answer: their schemas are written here to mirror what the validators accept and
refuse (:mod:`.._validate`, :mod:`.._anthropic_inbound`, :mod:`..inbound.responses`), so that a body
valid under a schema is never refused as malformed and one invalid under it is refused with a 400.
``tests/test_openapi.py`` holds the router to it with schemathesis (every check).

FastAPI still lists the routes (paths, methods, summaries); each of its operations is overlaid with
the one written here. Built once per way of authenticating (the config can turn keys on or off).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ._components import components
from ._operations import model_operations, other_operations
from ._platform_ops import platform_operations, served_operations

__all__ = ["MissingOperationError", "install", "openapi_document"]

log = logging.getLogger("kubellm.router")

_SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "A router API key, or the master key"},
    "bearerJwt": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A Kubernetes ServiceAccount token (projected, bound to the configured audience, "
        "e.g. `kubellm`; checked with TokenReview) or a token of a configured OIDC issuer (checked "
        "against its JWKS), when `settings.identity` accepts them; an IdentityBinding says what the "
        "caller may do. Anthropic clients send it as `x-api-key`. An invalid, expired or "
        "wrong-audience token is a 401; a valid one no binding covers is a 403 `identity_not_bound`.",
    },
    "apiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "api-key",
        "description": "As Azure OpenAI clients send it",
    },
    "xApiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "x-api-key",
        "description": "As Anthropic clients send it",
    },
}


class MissingOperationError(RuntimeError):
    """A public route has no description here: describe it in :mod:`._operations`."""


def openapi_document(app: FastAPI, *, auth_required: bool, strict: bool = False) -> dict[str, Any]:
    """The description of ``app``'s routes. A route not described in :mod:`._operations` keeps
    FastAPI's bare operation and is logged; ``strict`` (the tests) raises instead."""
    doc = get_openapi(title=app.title, version=app.version, openapi_version="3.1.0", routes=app.routes)
    written = {**model_operations(), **served_operations(), **platform_operations(), **other_operations()}
    missing: list[str] = []
    for path, item in doc.get("paths", {}).items():
        for method, operation in item.items():
            own = written.pop((path, method), None)
            if own is None:
                missing.append(f"{method.upper()} {path}")
                continue
            summary = operation.get("summary")
            operation.clear()
            operation.update({"summary": summary, **own} if summary else own)
            if not auth_required:
                operation.pop("security", None)
            elif "security" not in own:
                operation["responses"].setdefault("401", _unauthorized(path))
    missing += [f"{method.upper()} {path} (described, not routed)" for path, method in written]
    if missing:
        if strict:
            raise MissingOperationError(", ".join(missing))
        log.warning("OpenAPI: routes without a description: %s", ", ".join(missing))
    doc["components"] = {"schemas": components()}
    if auth_required:
        doc["components"]["securitySchemes"] = _SECURITY_SCHEMES
        doc["security"] = [{name: []} for name in _SECURITY_SCHEMES]
    return doc


def _unauthorized(path: str) -> dict[str, Any]:
    schema = "AnthropicError" if path.startswith("/v1/messages") else "Error"
    return {
        "description": "No API key, or one the router does not know; or a bearer JWT that is invalid, "
        "expired or for another audience (never echoed back)",
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def install(app: FastAPI, auth_required: Any) -> None:
    """Serve the description at ``GET /openapi.json``; ``auth_required()`` tells the current mode."""
    built: dict[bool, dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        mode = bool(auth_required())
        if mode not in built:
            built[mode] = openapi_document(app, auth_required=mode)
        return built[mode]

    app.openapi = openapi  # type: ignore[method-assign]
