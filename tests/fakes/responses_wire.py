"""OpenAI's Responses API (``POST /v1/responses``) as the fake OpenAI and Azure servers speak it.

Requests are held to the wire protocol: the body must validate against the published
``CreateResponse`` schema (tests/support/openai_spec.py), ``previous_response_id`` must name a
response this server made (it stores none, as with ``store: false``, so any id is a 400 as from
OpenAI: the router must send the history itself), and every ``function_call_output`` must answer
a ``function_call`` of the same ``call_id`` in the input ("No tool call found ..." otherwise).

Answers are valid ``Response`` objects and, streamed, the documented event sequence with
``sequence_number``s: a function call to the first function tool when tools are offered and no
tool output came back yet, else text (JSON valid under ``text.format``'s schema when one is set).
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson
from aiohttp import web

from kubellm.router.providers._mock_json import instance_of
from tests.support.openai_spec import SPEC_PATH

_ids = itertools.count(1)


class ResponsesWireError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": "invalid_request_error",
                "param": self.param,
                "code": None,
            }
        }


def _schema_errors(body: dict[str, Any]) -> list[str]:
    if not SPEC_PATH.exists():
        return []
    from tests.support.openai_spec import _validator

    # The schema marks a function tool's `strict` required, yet OpenAI accepts a tool without it
    # (LangChain sends none): checked as if null, which the schema allows.
    tools = body.get("tools")
    if isinstance(tools, list):
        tools = [
            {"strict": None, **t} if isinstance(t, dict) and t.get("type") == "function" else t for t in tools
        ]
        body = {**body, "tools": tools}
    errors = sorted(_validator("CreateResponse").iter_errors(body), key=lambda e: list(e.path))
    return [f"{'.'.join(map(str, e.absolute_path)) or 'body'}: {e.message[:300]}" for e in errors[:3]]


def validate_request(body: dict[str, Any]) -> None:
    """Raise :class:`ResponsesWireError` where OpenAI would refuse ``body``."""
    if not isinstance(body.get("model"), str):
        raise ResponsesWireError("Missing required parameter: 'model'.", "model")
    errors = _schema_errors(body)
    if errors:
        raise ResponsesWireError(f"Invalid request: {errors}")
    if body.get("previous_response_id") is not None:
        raise ResponsesWireError(
            f"Previous response with id '{body['previous_response_id']}' not found.", "previous_response_id"
        )
    items = body["input"] if isinstance(body.get("input"), list) else []
    calls = {i.get("call_id") for i in items if isinstance(i, dict) and i.get("type") == "function_call"}
    for n, item in enumerate(items):
        if (
            isinstance(item, dict)
            and item.get("type") == "function_call_output"
            and item.get("call_id") not in calls
        ):
            raise ResponsesWireError(
                f"No tool call found for function call output with call_id {item.get('call_id')}.",
                f"input[{n}]",
            )


def _words(value: Any) -> int:
    return max(1, len(orjson.dumps(value)) // 4) if value is not None else 0


def _output(body: dict[str, Any], text: str) -> list[dict[str, Any]]:
    items = body["input"] if isinstance(body.get("input"), list) else []
    answered = any(isinstance(i, dict) and i.get("type") == "function_call_output" for i in items)
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"]
    n = next(_ids)
    if tools and not answered and body.get("tool_choice") != "none":
        arguments = orjson.dumps(instance_of(tools[0].get("parameters") or {"type": "object"})).decode()
        return [
            {
                "id": f"fc_fake{n}",
                "type": "function_call",
                "call_id": f"call_fake{n}",
                "name": tools[0]["name"],
                "arguments": arguments,
                "status": "completed",
            }
        ]
    fmt = (body.get("text") or {}).get("format") or {}
    if fmt.get("type") == "json_schema":
        text = orjson.dumps(instance_of(fmt.get("schema"))).decode()
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return [
        {
            "id": f"msg_fake{n}",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [part],
        }
    ]


def build_response(body: dict[str, Any], text: str, *, usage: bool = True) -> dict[str, Any]:
    output = _output(body, text)
    response: dict[str, Any] = {
        "id": f"resp_fake{next(_ids)}",
        "object": "response",
        "created_at": 1,
        "status": "completed",
        "completed_at": 2,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body["model"],
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "metadata": body.get("metadata") or {},
    }
    if usage:
        prompt, completion = _words(body.get("input")) + _words(body.get("instructions")), _words(output)
        response["usage"] = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }
    return response


def _item_events(index: int, item: dict[str, Any]) -> list[dict[str, Any]]:
    where = {"item_id": item["id"], "output_index": index}
    if item["type"] == "function_call":
        args = item["arguments"]
        return [
            {
                "type": "response.output_item.added",
                "output_index": index,
                "item": {**item, "arguments": "", "status": "in_progress"},
            },
            {"type": "response.function_call_arguments.delta", **where, "delta": args[: len(args) // 2]},
            {"type": "response.function_call_arguments.delta", **where, "delta": args[len(args) // 2 :]},
            {
                "type": "response.function_call_arguments.done",
                **where,
                "name": item["name"],
                "arguments": args,
            },
            {"type": "response.output_item.done", "output_index": index, "item": item},
        ]
    text = item["content"][0]["text"]
    empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    deltas = [text[i : i + 8] for i in range(0, len(text), 8)]
    return [
        {
            "type": "response.output_item.added",
            "output_index": index,
            "item": {**item, "content": [], "status": "in_progress"},
        },
        {"type": "response.content_part.added", **where, "content_index": 0, "part": empty},
        *[
            {"type": "response.output_text.delta", **where, "content_index": 0, "delta": d, "logprobs": []}
            for d in deltas
        ],
        {"type": "response.output_text.done", **where, "content_index": 0, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "content_index": 0, "part": item["content"][0]},
        {"type": "response.output_item.done", "output_index": index, "item": item},
    ]


def stream_events(response: dict[str, Any]) -> list[dict[str, Any]]:
    """The events OpenAI streams for ``response``, numbered."""
    start = {**response, "status": "in_progress", "output": [], "completed_at": None}
    start.pop("usage", None)
    events = [
        {"type": "response.created", "response": start},
        {"type": "response.in_progress", "response": start},
    ]
    for index, item in enumerate(response["output"]):
        events += _item_events(index, item)
    events.append({"type": "response.completed", "response": response})
    return [{**event, "sequence_number": n} for n, event in enumerate(events)]


async def answer(
    request: web.Request, body: dict[str, Any], text: str, *, drop_after: int | None = None
) -> web.StreamResponse:
    """Answer a Responses request (after :func:`validate_request`), streamed when it asks."""
    response = build_response(body, text)
    if not body.get("stream"):
        return web.json_response(response, dumps=lambda d: orjson.dumps(d).decode())
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for n, event in enumerate(stream_events(response)):
        if drop_after is not None and n >= drop_after:
            assert request.transport is not None
            request.transport.abort()
            return resp
        await resp.write(b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n")
    await resp.write_eof()
    return resp
