"""OpenAI's Responses API (``/v1/responses``) in front of every deployment.

Along the request's path: :mod:`._request` (a Responses request as a chat request, for
deployments that do not speak Responses), :mod:`._render` (Response objects; a chat.completion
as one), :mod:`._stream` (chat chunks as Responses stream events), :mod:`._store` (stored
responses for ``previous_response_id``, GET and DELETE).
"""

from ._api import ResponseNotFoundError, ResponsesApi, settle
from ._render import chat_completion_to_response, new_id, response_skeleton
from ._request import check_request, input_items, responses_request_to_chat
from ._store import (
    BrokenChainError,
    MemoryResponseStore,
    RedisResponseStore,
    ResponseStore,
    StoredResponse,
    history,
    responses_store,
    with_ids,
)
from ._stream import ChatToResponsesStream

__all__ = [
    "BrokenChainError",
    "ChatToResponsesStream",
    "MemoryResponseStore",
    "RedisResponseStore",
    "ResponseNotFoundError",
    "ResponseStore",
    "ResponsesApi",
    "StoredResponse",
    "chat_completion_to_response",
    "check_request",
    "history",
    "input_items",
    "new_id",
    "response_skeleton",
    "responses_request_to_chat",
    "responses_store",
    "settle",
    "with_ids",
]
