"""Every public operation of the router: its parameters, request body and each answer it gives."""

from __future__ import annotations

from typing import Any

from ._schema import (
    HEADERS,
    JSON,
    MODEL_ERRORS,
    SSE,
    Schema,
    errors,
    obj,
    ref,
)

Operation = dict[str, Any]

_TIMEOUT: Schema = {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 86400}


def header(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "header", "required": False, "schema": schema, "description": description}


def query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def path(name: str, description: str) -> Schema:
    schema = {"type": "string", "minLength": 1}
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


#: The per-request choices every model route reads (router/core/_router.py request_options).
MODEL_HEADERS = [
    header(
        "x-kubellm-fallbacks",
        {"type": "string"},
        "Model groups to fall back to, comma-separated; 'none' for none",
    ),
    # Header values are strings: the pattern says which ones the router reads.
    header("x-kubellm-num-retries", {"type": "string", "pattern": "^0*([0-9]|10)$"}, "Retries: 0 to 10"),
    header("x-kubellm-timeout", _TIMEOUT, "Seconds the whole request may take"),
    header("x-kubellm-connect-timeout", _TIMEOUT, "Seconds to connect to an upstream"),
    header("x-kubellm-first-token-timeout", _TIMEOUT, "Seconds to the first streamed token"),
    header("x-kubellm-idle-timeout", _TIMEOUT, "Seconds a stream may stay silent"),
    header(
        "cache-control",
        {"type": "string"},
        "no-cache: do not read the response cache; no-store: nor write it",
    ),
]

_BETA = header("anthropic-beta", {"type": "string"}, "Forwarded to deployments that speak Messages natively")
_DEPLOYMENT = path("deployment_id", "The model group (Azure's deployment name)")
_API_VERSION = query("api-version", {"type": "string"}, "Accepted and ignored: the router speaks one version")


def _answer(description: str, schema: str, *, stream: str | None, model_headers: bool = True) -> Schema:
    content: Schema = {JSON: {"schema": ref(schema)}}
    if stream is not None:
        content[SSE] = {"schema": ref(stream)}
    answer: Schema = {"description": description, "content": content}
    if model_headers:
        answer["headers"] = HEADERS
    return answer


def _body(schema: str) -> Schema:
    return {"required": True, "content": {JSON: {"schema": ref(schema)}}}


def _model_operation(
    operation_id: str,
    request: str,
    answer: str,
    *,
    stream: str | None,
    error: str = "Error",
    statuses: tuple[int, ...] = MODEL_ERRORS,
    extra: list[Schema] | None = None,
) -> Operation:
    return {
        "operationId": operation_id,
        "parameters": [*(extra or []), *MODEL_HEADERS],
        "requestBody": _body(request),
        "responses": {"200": _answer("The answer", answer, stream=stream), **errors(statuses, error)},
    }


def _json(description: str, schema: Schema | str, statuses: tuple[int, ...], **extra: Any) -> Operation:
    content = {JSON: {"schema": ref(schema) if isinstance(schema, str) else schema}}
    return {
        "responses": {"200": {"description": description, "content": content}, **errors(statuses)},
        **extra,
    }


def model_operations() -> dict[tuple[str, str], Operation]:
    ops: dict[tuple[str, str], Operation] = {
        ("/v1/chat/completions", "post"): _model_operation(
            "createChatCompletion", "ChatCompletionRequest", "ChatCompletion", stream="ChatCompletionEvent"
        ),
        ("/v1/completions", "post"): _model_operation(
            "createCompletion", "CompletionRequest", "TextCompletion", stream="CompletionEvent"
        ),
        ("/v1/embeddings", "post"): _model_operation(
            "createEmbedding", "EmbeddingRequest", "Embeddings", stream=None
        ),
        ("/v1/messages", "post"): _model_operation(
            "createMessage",
            "MessagesRequest",
            "Message",
            stream="MessageEvent",
            error="AnthropicError",
            extra=[_BETA],
        ),
        ("/v1/messages/count_tokens", "post"): _model_operation(
            "countMessageTokens",
            "CountTokensRequest",
            "TokenCount",
            stream=None,
            error="AnthropicError",
            statuses=(400, 401, 403, 404, 413),
            extra=[_BETA],
        ),
    }
    responses = _model_operation("createResponse", "ResponsesRequest", "Response", stream="ResponseEvent")
    # The id of a stored response, for the operations that read or delete it.
    stored = {"response_id": "$response.body#/id"}
    responses["responses"]["200"]["links"] = {
        "GetResponse": {"operationId": "getResponse", "parameters": stored},
        "DeleteResponse": {"operationId": "deleteResponse", "parameters": stored},
        "ListInputItems": {"operationId": "listInputItems", "parameters": stored},
    }
    ops[("/v1/responses", "post")] = responses
    azure = [_DEPLOYMENT, _API_VERSION]
    for suffix, name, kind, stream in (
        ("chat/completions", "ChatCompletion", "Chat", "ChatCompletionEvent"),
        ("completions", "Completion", "Text", "CompletionEvent"),
        ("embeddings", "Embedding", "", None),
    ):
        answer = {"Chat": "ChatCompletion", "Text": "TextCompletion", "": "Embeddings"}[kind]
        ops[(f"/openai/deployments/{{deployment_id}}/{suffix}", "post")] = _model_operation(
            f"azureCreate{name}", f"Azure{name}Request", answer, stream=stream, extra=azure
        )
    return ops


def _response_id() -> list[Schema]:
    return [path("response_id", "The id of a stored response")]


def other_operations() -> dict[tuple[str, str], Operation]:
    ops: dict[tuple[str, str], Operation] = {
        ("/v1/responses/{response_id}", "get"): _json(
            "The stored response",
            "Response",
            (401, 404),
            operationId="getResponse",
            parameters=_response_id(),
        ),
        ("/v1/responses/{response_id}", "delete"): _json(
            "Deleted", "DeletedResponse", (401, 404), operationId="deleteResponse", parameters=_response_id()
        ),
        ("/v1/responses/{response_id}/input_items", "get"): _json(
            "The stored response's input items",
            "InputItemList",
            (400, 401, 404),
            operationId="listInputItems",
            parameters=[
                *_response_id(),
                query("order", {"enum": ["asc", "desc"]}, "desc (the default) or asc"),
                query("after", {"type": "string"}, "List the items after this item id"),
                query("limit", {"type": "integer", "minimum": 1, "maximum": 100}, "At most this many (20)"),
            ],
        ),
        ("/v1/models", "get"): _json(
            "The model groups the key may use", "ModelList", (401,), operationId="listModels"
        ),
        ("/v1/models/{model}", "get"): _json(
            "A model group",
            "Model",
            (401, 404),
            operationId="retrieveModel",
            parameters=[path("model", "A model group")],
        ),
        ("/v1/key/info", "get"): _json(
            "The calling key's limits, usage and budget", "KeyInfo", (401,), operationId="keyInfo"
        ),
        ("/admin/spend", "get"): _json(
            "Spend and usage, grouped",
            "Spend",
            (400, 401, 403),
            operationId="spend",
            parameters=[
                query("since", ref("Instant"), "From (default: a day ago)"),
                query("until", ref("Instant"), "Until (default: now)"),
                query(
                    "by", {"enum": ["key", "team", "model_group", "deployment"]}, "Group by (default: key)"
                ),
            ],
        ),
    }
    public: list[tuple[str, Operation]] = [
        (
            "/health/liveness",
            _json("Alive", obj({"status": {"const": "alive"}}, ["status"]), (), operationId="liveness"),
        ),
        ("/health/readiness", _readiness()),
        ("/metrics", _metrics()),
    ]
    for name, op in public:
        ops[(name, "get")] = {**op, "security": []}
    return ops


def _readiness() -> Operation:
    content = {JSON: {"schema": ref("Readiness")}}
    return {
        "operationId": "readiness",
        "responses": {
            "200": {"description": "Ready", "content": content},
            "503": {"description": "Draining, or waiting for the first config", "content": content},
        },
    }


def _metrics() -> Operation:
    content = {"text/plain": {"schema": {"type": "string"}}}
    return {
        "operationId": "metrics",
        "responses": {"200": {"description": "Prometheus text exposition", "content": content}},
    }
