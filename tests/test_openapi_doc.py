"""The router's OpenAPI description, read in-process: a valid OpenAPI 3.1 document that describes
every public route's request body, parameters and answers, and is built once.

tests/test_openapi.py holds a real router to it with schemathesis.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate

from kubellm.router import parse_config
from kubellm.router.openapi import openapi_document
from kubellm.router.server._app import ConfigSource, create_app

MODEL_ROUTES = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
    "/openai/deployments/{deployment_id}/chat/completions",
    "/openai/deployments/{deployment_id}/completions",
    "/openai/deployments/{deployment_id}/embeddings",
]
STREAMING = {p for p in MODEL_ROUTES if not p.endswith(("embeddings", "count_tokens"))}


def _app(keys: bool) -> Any:
    config: dict[str, Any] = {"deployments": [{"model": "mock", "provider": "mock"}]}
    if keys:
        config["keys"] = [{"name": "k", "keyHash": "0" * 64}]
    return create_app(ConfigSource(config=parse_config(config)))


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    spec: dict[str, Any] = _app(keys=True).openapi()
    return spec


def _body_schema(doc: dict[str, Any], path: str) -> dict[str, Any]:
    """The request schema of ``path``, with the document's components, for jsonschema."""
    ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return {**doc["components"]["schemas"][ref.rsplit("/", 1)[1]], "components": doc["components"]}


def test_the_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    assert doc["openapi"] == "3.1.0"
    validate(doc)  # raises on any violation of the OpenAPI 3.1 schema


def test_every_route_is_described() -> None:
    """A route added without a description here would serve FastAPI's bare operation."""
    openapi_document(_app(keys=True), auth_required=True, strict=True)  # raises naming the route


def test_it_is_built_once() -> None:
    app = _app(keys=True)
    assert app.openapi() is app.openapi()


def test_every_model_route_declares_its_body_errors_and_streams(doc: dict[str, Any]) -> None:
    for path in MODEL_ROUTES:
        operation = doc["paths"][path]["post"]
        assert operation["requestBody"]["required"] is True, path
        responses = operation["responses"]
        assert {"200", "400", "401", "404", "413"} <= set(responses), path
        error = "AnthropicError" if "/messages" in path else "Error"
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith(error), path
        assert ("text/event-stream" in responses["200"]["content"]) == (path in STREAMING), path
        assert {"x-kubellm-num-retries", "x-kubellm-timeout"} <= {p["name"] for p in operation["parameters"]}
    azure = doc["paths"]["/openai/deployments/{deployment_id}/embeddings"]["post"]["parameters"]
    assert {("path", "deployment_id"), ("query", "api-version")} <= {(p["in"], p["name"]) for p in azure}


def test_every_route_answers_more_than_200(doc: dict[str, Any]) -> None:
    """The defect: FastAPI saw no bodies and documented only 200s."""
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if path in ("/health/liveness", "/metrics"):
                continue
            assert set(operation["responses"]) - {"200"}, (method, path)


def test_authentication_is_declared_only_when_the_router_needs_it(doc: dict[str, Any]) -> None:
    assert {"bearer", "bearerJwt", "apiKey", "xApiKey"} == set(doc["components"]["securitySchemes"])
    assert doc["components"]["securitySchemes"]["bearerJwt"]["bearerFormat"] == "JWT"
    assert doc["paths"]["/health/readiness"]["get"]["security"] == []
    open_doc = openapi_document(_app(keys=False), auth_required=False)
    assert "security" not in open_doc and "securitySchemes" not in open_doc["components"]


@pytest.mark.parametrize(
    ("path", "body", "valid"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, True),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "assistant", "content": None}]}, True),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user"}]}, False),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": ["user"], "content": "x"}]}, False),
        ("/v1/chat/completions", {"model": "m", "messages": [], "temperature": 1}, False),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "tool", "content": "x"}]}, False),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "api_base": 1},
            False,
        ),
        ("/v1/completions", {"model": "m", "prompt": [[1, 2], [3]]}, True),
        ("/v1/completions", {"model": "m", "prompt": [[True]]}, False),
        ("/v1/completions", {"model": "m", "prompt": "x", "messages": []}, False),
        ("/v1/embeddings", {"model": "m", "input": "x", "encoding_format": "base64", "dimensions": 8}, True),
        ("/v1/embeddings", {"model": "m", "input": "x", "dimensions": 0}, False),
        (
            "/v1/messages",
            {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
            True,
        ),
        ("/v1/messages", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, False),
        ("/v1/messages/count_tokens", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, True),
        ("/v1/messages/count_tokens", {"model": "m", "messages": [], "tools": 5}, False),
        ("/v1/responses", {"model": "m", "input": "hi"}, True),
        ("/v1/responses", {"model": "m", "previous_response_id": "resp_1"}, True),
        ("/v1/responses", {"model": "m"}, False),
        ("/v1/responses", {"model": "m", "input": [{"type": "reasoning"}]}, False),
        ("/v1/responses", {"model": "m", "input": "hi", "background": True}, False),
        (
            "/openai/deployments/{deployment_id}/chat/completions",
            {"messages": [{"role": "user", "content": "x"}]},
            True,
        ),
    ],
)
def test_request_schemas_say_what_the_router_takes(
    doc: dict[str, Any], path: str, body: dict[str, Any], valid: bool
) -> None:
    """Spot checks; schemathesis (tests/test_openapi.py) checks the router agrees on each."""
    errors = list(jsonschema.Draft202012Validator(_body_schema(doc, path)).iter_errors(body))
    assert (not errors) == valid, errors
