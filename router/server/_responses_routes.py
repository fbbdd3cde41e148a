"""The Responses API's routes: ``POST /v1/responses`` (a fast route through the core), and
``GET``/``DELETE /v1/responses/{id}`` and ``GET /v1/responses/{id}/input_items`` over the store.

The stored-response routes authenticate like every model route; a response is visible only to
the key that stored it (any other key gets the 404 an unknown id gets).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from .._errors import InvalidRequestError, KubellmError
from ..core._router import authenticate_caller, error_response
from ..inbound._base import JSON
from ..inbound.responses import ResponseNotFoundError, ResponsesApi, StoredResponse, settle

if TYPE_CHECKING:
    from ..core._router import Router
    from ._app import RouterApp
    from ._inbound import Inbound


def _json(doc: Any) -> Response:
    return Response(orjson.dumps(doc), media_type=JSON)


def _not_found(response_id: str) -> ResponseNotFoundError:
    return ResponseNotFoundError(f"Response with id '{response_id}' not found.", param="response_id")


async def _stored(router: Router, api: ResponsesApi, request: Request) -> tuple[str, StoredResponse]:
    owner = (await authenticate_caller(router.state, request.headers, router.identities)).label
    response_id = request.path_params["response_id"]
    stored = await api.store.get(owner, response_id)
    if stored is None:
        raise _not_found(response_id)
    return owner, stored


def _page(items: list[dict[str, Any]], request: Request) -> dict[str, Any]:
    """``input_items``' list: ``order`` (default desc), ``after`` an item id, ``limit`` 1 to 100."""
    query = request.query_params
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequestError("order: expected asc or desc", param="order")
    raw_limit = query.get("limit", "20")
    if not (raw_limit.isascii() and raw_limit.isdigit()) or not 1 <= int(raw_limit) <= 100:  # "²" is a digit
        raise InvalidRequestError("limit: expected an integer from 1 to 100", param="limit")
    ordered = items if order == "asc" else list(reversed(items))
    after = query.get("after")
    if after is not None:
        ids = [item.get("id") for item in ordered]
        ordered = ordered[ids.index(after) + 1 :] if after in ids else []
    page = ordered[: int(raw_limit)]
    return {
        "object": "list",
        "data": page,
        "has_more": len(ordered) > len(page),
        "first_id": page[0]["id"] if page else "",
        "last_id": page[-1]["id"] if page else "",
    }


def register_responses_routes(app: RouterApp, router: Router, api: ResponsesApi) -> None:
    async def create(inbound: Inbound) -> Response:
        return await settle(await router.serve(api, inbound))

    # What each route takes and answers is described in router/openapi (_operations, _responses).
    summary = "Create a model response (OpenAI Responses)"
    app.add_fast_route("/responses", create, summary=summary, name="responses")

    async def retrieve(request: Request) -> Response:
        try:
            _, stored = await _stored(router, api, request)
        except KubellmError as err:
            return error_response(err)
        return _json(stored.response)

    async def delete(request: Request) -> Response:
        try:
            owner, stored = await _stored(router, api, request)
            if not await api.store.delete(owner, stored.id):
                raise _not_found(stored.id)  # deleted meanwhile, by another replica
        except KubellmError as err:
            return error_response(err)
        return _json({"id": stored.id, "object": "response", "deleted": True})

    async def list_input_items(request: Request) -> Response:
        try:
            _, stored = await _stored(router, api, request)
            return _json(_page(stored.input, request))
        except KubellmError as err:
            return error_response(err)

    for prefix in ("/v1", ""):
        shown = prefix == "/v1"
        path = prefix + "/responses/{response_id}"
        app.add_api_route(
            path, retrieve, methods=["GET"], include_in_schema=shown, summary="Get a stored response",
        )  # fmt: skip
        app.add_api_route(
            path, delete, methods=["DELETE"], include_in_schema=shown, summary="Delete a stored response",
        )  # fmt: skip
        app.add_api_route(
            path + "/input_items", list_input_items, methods=["GET"], include_in_schema=shown,
            summary="List a stored response's input items",
        )  # fmt: skip
