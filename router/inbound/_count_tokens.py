"""``POST /v1/messages/count_tokens``: Anthropic's token counting (Claude Code calls it constantly).

The request is authenticated, its model checked against the caller's key, and errors answered in
Anthropic's shape, exactly as for ``/v1/messages``. The answer is Anthropic's ``{"input_tokens": N}``.

Who counts:

* the model group's deployments that speak Messages natively and count upstream (the anthropic
  provider's ``/v1/messages/count_tokens``, Claude on Vertex AI's ``count-tokens:rawPredict``,
  Bedrock's CountTokens), in priority order, skipping those whose circuit breaker is open: the first
  that answers gives the count (``x-kubellm-token-count: upstream``), with the client's
  ``anthropic-beta`` forwarded;
* otherwise (no such deployment, or each of them failed in a way another might not), the router
  estimates (``x-kubellm-token-count: estimate``) with OpenAI's cl100k_base tokenizer
  (:func:`estimate_input_tokens`): a Claude count differs, usually by some percent.

An upstream's refusal of the request itself (400) is answered as it came. Counting is not a
completion: it takes no rate-limit slot and no budget, and writes no ledger record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from starlette.responses import Response

from .. import _redact as redact
from .._errors import InvalidRequestError, KubellmError
from ..core._router import authenticate_caller, next_request_id, request_options
from ..metering._tokens import real_count
from ..observability import _metrics as metrics
from ..providers import Operation, RequestContext
from ._anthropic import MessagesApi
from ._base import JSON
from ._openai_validate import parse_body

if TYPE_CHECKING:
    from ..core._router import Router
    from ..core._state import Deployment, ModelGroup
    from ..server._inbound import Inbound

#: Anthropic's image token formula is width * height / 750 over at most 1.15 megapixels: an image
#: of unknown size counts as the largest, and so does a PDF page we cannot see (Anthropic counts a
#: page as its text plus its image).
IMAGE_TOKENS = 1600
#: Tokens per message and per tool for the framing around them (OpenAI's chat format's overhead).
MESSAGE_TOKENS = 4
TOOL_TOKENS = 8

_API = MessagesApi()


def _block_text(block: Any) -> tuple[str, int]:
    """The countable text of one content block, and the tokens of what has no text (images)."""
    if isinstance(block, str):
        return block, 0
    if not isinstance(block, dict):
        return "", 0
    kind = block.get("type")
    if kind in ("text", "thinking"):
        return str(block.get("text") or block.get("thinking") or ""), 0
    if kind in ("tool_use", "server_tool_use"):
        return f"{block.get('name', '')} {orjson.dumps(block.get('input')).decode()}", 0
    if kind == "tool_result":
        content = block.get("content")
        parts = [_block_text(b) for b in (content if isinstance(content, list) else [content])]
        return " ".join(t for t, _ in parts), sum(n for _, n in parts)
    if kind == "document":
        found = block.get("source")
        source: dict[str, Any] = found if isinstance(found, dict) else {}
        title = str(block.get("title") or "")
        if source.get("type") == "text":
            return f"{title} {source.get('data') or ''}", 0
        if source.get("type") == "content":
            inner = source.get("content")
            parts = [_block_text(b) for b in (inner if isinstance(inner, list) else [inner])]
            return " ".join([title, *(t for t, _ in parts)]), sum(n for _, n in parts)
        return title, IMAGE_TOKENS
    if kind == "image":
        return "", IMAGE_TOKENS
    return "", 0


def _content_tokens(content: Any) -> int:
    blocks = content if isinstance(content, list) else [content]
    parts = [_block_text(b) for b in blocks]
    text = " ".join(t for t, _ in parts if t)
    return (real_count(text) if text else 0) + sum(n for _, n in parts)


def estimate_input_tokens(body: dict[str, Any]) -> int:
    """The input tokens of a Messages request as cl100k_base counts them: system, messages (text,
    tool calls and results, thinking, text documents), tool definitions, plus framing overhead and
    :data:`IMAGE_TOKENS` per image or non-text document."""
    total = 3 + _content_tokens(body.get("system"))
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            total += MESSAGE_TOKENS + _content_tokens(message.get("content"))
    for tool in body.get("tools") or []:
        if isinstance(tool, dict):
            spec = {k: tool.get(k) for k in ("name", "description", "input_schema") if tool.get(k)}
            total += TOOL_TOKENS + real_count(orjson.dumps(spec).decode())
    return total


def _validate(body: dict[str, Any]) -> str:
    model = _API.validate({**body, "stream": False}).model
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages: Field required (a non-empty list)", param="messages")
    if body.get("tools") is not None and not isinstance(body["tools"], list):
        raise InvalidRequestError("tools: expected a list", param="tools")
    return model


def _counters(router: Router, group: ModelGroup) -> list[Deployment]:
    """The group's deployments that speak Messages natively, by priority, breakers closed."""
    return [
        dep
        for tier in group.tiers
        for dep in tier
        if dep.provider.speaks(Operation.MESSAGES, dep.config) and not router.health.is_open(dep.name)
    ]


async def _upstream_count(
    router: Router,
    deps: list[Deployment],
    body: dict[str, Any],
    request_id: str,
    group: str,
    beta: str | None,
) -> tuple[int, str] | None:
    """The first upstream count, with the deployment that gave it; None when none did."""
    for dep in deps:
        ctx = RequestContext(
            request_id,
            Operation.MESSAGES,
            group,
            dep.config,
            api_key=dep.api_key,
            client_headers={"anthropic-beta": beta} if beta else {},
        )
        try:
            # The dispatcher's client: the one every upstream call of the router goes through.
            count = await dep.provider.count_tokens(router.dispatcher.upstream, body, ctx)
        except KubellmError as err:
            if not err.retryable and err.status < 500:
                raise redact.scrub_error(err) from None  # the request itself was refused
            continue
        if count is not None:
            return count, dep.name
    return None


async def handle_count_tokens(router: Router, inbound: Inbound) -> Response:
    """Serve ``POST /v1/messages/count_tokens``."""
    state = router.state
    request_id = next_request_id()
    headers = {"x-request-id": request_id}
    try:
        caller = await authenticate_caller(state, inbound.headers, router.identities)
        options = request_options(inbound.headers)
        body = parse_body(await inbound.read(state.config.settings.max_request_body_bytes))
        group = router._group(state, caller, _validate(body), options)
        headers["x-kubellm-model-group"] = group.name
        beta = inbound.headers.get("anthropic-beta")
        counted = await _upstream_count(router, _counters(router, group), body, request_id, group.name, beta)
    except KubellmError as err:
        metrics.ERRORS.labels("", err.type).inc()
        return _API.render_error(err, headers)
    if counted is None:
        tokens = estimate_input_tokens(body)
        headers["x-kubellm-token-count"] = "estimate"
    else:
        tokens, headers["x-kubellm-deployment"] = counted
        headers["x-kubellm-token-count"] = "upstream"
    return Response(orjson.dumps({"input_tokens": tokens}), media_type=JSON, headers=headers)
