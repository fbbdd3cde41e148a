"""Claude on the fake Bedrock: InvokeModel, InvokeModelWithResponseStream and CountTokens.

What Bedrock documents for Anthropic models: the body is Anthropic's Messages request without
``model`` and ``stream`` (the URL says both: extraneous keys are refused), with the required
``anthropic_version: bedrock-2023-05-31`` and betas as an ``anthropic_beta`` list of strings; the
answer is Anthropic's message; a stream is event-stream framed, one ``chunk`` event per Anthropic
event, the event's JSON base64-encoded in ``bytes``, the last one (``message_stop``) carrying
``amazon-bedrock-invocationMetrics``. CountTokens takes ``{"input": {"invokeModel": {"body":
base64}}}`` and answers ``{"inputTokens": N}``. Everything else about the body is checked by
Anthropic's own rules (:mod:`tests.fakes.anthropic_wire`).
"""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Any

import orjson
from aiohttp import web

from tests.fakes.anthropic_upstream import FakeAnthropic, prompt_words, stream_events
from tests.fakes.anthropic_wire import WireError, validate_request

BEDROCK_VERSION = "bedrock-2023-05-31"


def is_claude(model: str) -> bool:
    return "anthropic." in model


def messages_body(model: str, doc: Any) -> dict[str, Any]:
    """Bedrock's Claude body checked, as the Messages request it stands for (raises WireError)."""
    if not isinstance(doc, dict):
        raise WireError("Malformed input request: expected an object")
    for key in ("model", "stream"):
        if key in doc:
            raise WireError(f"Malformed input request: extraneous key [{key}] is not permitted")
    if doc.get("anthropic_version") != BEDROCK_VERSION:
        raise WireError(f"Malformed input request: anthropic_version must be {BEDROCK_VERSION}")
    betas = doc.get("anthropic_beta", [])
    if not isinstance(betas, list) or not all(isinstance(b, str) and b for b in betas):
        raise WireError("Malformed input request: anthropic_beta must be a list of strings")
    body = {k: v for k, v in doc.items() if k not in ("anthropic_version", "anthropic_beta")}
    return {**body, "model": model}


def _chunk(event: dict[str, Any]) -> bytes:
    from tests.fakes.bedrock_upstream import encode_frame

    payload = orjson.dumps({"bytes": base64.b64encode(orjson.dumps(event)).decode(), "p": "abcdefgh"})
    return encode_frame(
        {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}, payload
    )


async def serve_claude(
    claude: FakeAnthropic, request: web.Request, model: str, operation: str, doc: Any
) -> web.StreamResponse:
    from tests.fakes.bedrock_upstream import aws_error, exception_frame

    try:
        if operation == "count-tokens":
            try:
                inner = orjson.loads(base64.b64decode(doc["input"]["invokeModel"]["body"], validate=True))
            except (KeyError, TypeError, binascii.Error, orjson.JSONDecodeError):
                raise WireError("input.invokeModel.body: must be a base64-encoded InvokeModel body") from None
            body = messages_body(model, inner)
            validate_request(body)
            return web.json_response({"inputTokens": prompt_words(body)})
        body = messages_body(model, doc)
        validate_request(body)
    except WireError as err:
        return aws_error(400, "ValidationException", err.message)
    fault, message = claude.answer(body, model)
    if fault is not None and fault.status is not None:
        kind = "ThrottlingException" if fault.status == 429 else "InternalServerException"
        return aws_error(fault.status, kind, "injected")
    if operation == "invoke":
        return web.json_response(message, headers={"x-amzn-RequestId": str(uuid.uuid4())})
    resp = web.StreamResponse(headers={"Content-Type": "application/vnd.amazon.eventstream"})
    await resp.prepare(request)
    for _, event in stream_events(message, fault.stream_error if fault else None):
        if event["type"] == "error":  # Bedrock reports a failure mid-stream as an exception event
            await resp.write(exception_frame("modelStreamErrorException", event["error"]["message"]))
            break
        if event["type"] == "message_stop":
            usage = message["usage"]
            event = {
                **event,
                "amazon-bedrock-invocationMetrics": {
                    "inputTokenCount": usage["input_tokens"],
                    "outputTokenCount": usage["output_tokens"],
                    "invocationLatency": 321,
                    "firstByteLatency": 123,
                },
            }
        await resp.write(_chunk(event))
    await resp.write_eof()
    return resp
