"""OpenAI chat chunks, as they arrive, into the Responses API's stream events.

One :class:`ChatToResponsesStream` per request. The event sequence is OpenAI's:
``response.created``, ``response.in_progress``; per output item ``response.output_item.added``,
then for a message ``response.content_part.added``, ``response.output_text.delta``...,
``response.output_text.done``, ``response.content_part.done``, and for a function call
``response.function_call_arguments.delta``..., ``response.function_call_arguments.done``;
``response.output_item.done``; last ``response.completed`` (``response.incomplete`` when the
answer was cut off by ``max_output_tokens`` or a content filter). A stream that fails part-way
ends with an ``error`` event and ``response.failed``. Every event carries a ``sequence_number``.
"""

from __future__ import annotations

from typing import Any

from ...providers import Usage
from ._render import (
    INCOMPLETE,
    as_dict,
    failed,
    finish,
    function_call_item,
    message_item,
    new_id,
    reasoning_item,
    response_skeleton,
    text_part,
)

Event = dict[str, Any]


def response_error_code(status: int) -> str:
    """The Responses error code (a closed list) that fits a router error's HTTP status."""
    return "rate_limit_exceeded" if status == 429 else "server_error"


class _Item:
    """The output item being streamed: a message (text or refusal part) or a function call."""

    __slots__ = ("arguments", "call_id", "id", "index", "kind", "name", "text")

    def __init__(self, kind: str, index: int, item_id: str) -> None:
        self.kind = kind  # "output_text", "refusal", "reasoning" or "function_call"
        self.index = index
        self.id = item_id
        self.text = ""
        self.call_id = ""
        self.name = ""
        self.arguments = ""

    def item(self, status: str) -> dict[str, Any]:
        if self.kind == "function_call":
            return function_call_item(self.id, self.call_id, self.name, self.arguments, status)
        if self.kind == "reasoning":
            return reasoning_item(self.id, self.text) | {"status": status}
        parts = [self.part()] if status != "in_progress" else []
        return message_item(self.id, parts, status)

    def part(self, text: str | None = None) -> dict[str, Any]:
        value = self.text if text is None else text
        return {"type": "refusal", "refusal": value} if self.kind == "refusal" else text_part(value)


class ChatToResponsesStream:
    """Per-request state machine from chat chunk documents to Responses events (dicts with ``type``)."""

    def __init__(self, body: dict[str, Any], response_id: str, created_at: int) -> None:
        self.response = response_skeleton(body, response_id, created_at)
        self.done = False
        self._seq = 0
        self._started = False
        self._item: _Item | None = None
        self._tools: dict[int, _Item] = {}  # chat tool call index -> its item
        self._output: list[dict[str, Any]] = []
        self._finish: str | None = None
        self.usage: Usage | None = None

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, **fields, "sequence_number": self._seq}
        self._seq += 1
        return event

    def _snapshot(self) -> dict[str, Any]:
        return {**self.response, "output": list(self._output)}

    def start(self, model: Any = None) -> list[Event]:
        if self._started:
            return []
        self._started = True
        if isinstance(model, str) and model:
            self.response["model"] = model
        return [
            self._event("response.created", response=self._snapshot()),
            self._event("response.in_progress", response=self._snapshot()),
        ]

    def _open(self, kind: str, item_id: str, call_id: str = "", name: str = "") -> tuple[_Item, list[Event]]:
        out = self._close_item()
        item = self._item = _Item(kind, len(self._output), item_id)
        item.call_id, item.name = call_id, name
        self._output.append(item.item("in_progress"))  # a placeholder, replaced when done
        out.append(
            self._event("response.output_item.added", output_index=item.index, item=item.item("in_progress"))
        )
        if kind in ("output_text", "refusal"):
            out.append(self._part_event("response.content_part.added", item, ""))
        return item, out

    def _part_event(self, kind: str, item: _Item, text: str | None = None) -> Event:
        where = {"item_id": item.id, "output_index": item.index, "content_index": 0}
        return self._event(kind, **where, part=item.part(text))

    def _close_item(self, status: str = "completed") -> list[Event]:
        item, self._item = self._item, None
        if item is None:
            return []
        out: list[Event] = []
        where = {"item_id": item.id, "output_index": item.index}
        if item.kind == "function_call":
            out.append(
                self._event(
                    "response.function_call_arguments.done", **where, name=item.name, arguments=item.arguments
                )
            )
        elif item.kind == "output_text":
            out.append(
                self._event(
                    "response.output_text.done", **where, content_index=0, text=item.text, logprobs=[]
                )
            )
            out.append(self._part_event("response.content_part.done", item))
        elif item.kind == "refusal":
            out.append(self._event("response.refusal.done", **where, content_index=0, refusal=item.text))
            out.append(self._part_event("response.content_part.done", item))
        elif item.kind == "reasoning":
            out.append(self._event("response.reasoning_text.done", **where, content_index=0, text=item.text))
        done = item.item(status)
        self._output[item.index] = done
        out.append(self._event("response.output_item.done", output_index=item.index, item=done))
        return out

    def _delta(self, kind: str, delta: str) -> list[Event]:
        out: list[Event] = []
        item = self._item
        if item is None or item.kind != kind:
            prefix = "rs" if kind == "reasoning" else "msg"
            item, out = self._open(kind, new_id(prefix))
        item.text += delta
        where = {"item_id": item.id, "output_index": item.index, "content_index": 0}
        if kind == "output_text":
            out.append(self._event("response.output_text.delta", **where, delta=delta, logprobs=[]))
        elif kind == "refusal":
            out.append(self._event("response.refusal.delta", **where, delta=delta))
        else:
            out.append(self._event("response.reasoning_text.delta", **where, delta=delta))
        return out

    def _tool_delta(self, call: dict[str, Any]) -> list[Event]:
        position = call.get("index", 0)
        fn = as_dict(call.get("function"))
        out: list[Event] = []
        item = self._tools.get(position)
        if item is None:
            # A new call: its id and name come in its first delta.
            call_id, name = str(call.get("id") or new_id("call")), str(fn.get("name") or "")
            item, out = self._open("function_call", new_id("fc"), call_id, name)
            self._tools[position] = item
        arguments = fn.get("arguments")
        if isinstance(arguments, str) and arguments:
            if item is not self._item:
                return out  # a late delta of a call already closed: chat streams never send one
            item.arguments += arguments
            where = {"item_id": item.id, "output_index": item.index}
            out.append(self._event("response.function_call_arguments.delta", **where, delta=arguments))
        return out

    def chunk(self, doc: dict[str, Any]) -> list[Event]:
        """One chat.completion.chunk document."""
        if self.done:
            return []
        out = self.start(doc.get("model"))
        if isinstance(doc.get("usage"), dict):
            self.usage = Usage.from_openai(doc["usage"])
        for choice in doc.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = as_dict(choice.get("delta"))
            for key, kind in (
                ("reasoning_content", "reasoning"),
                ("content", "output_text"),
                ("refusal", "refusal"),
            ):
                if isinstance(delta.get(key), str) and delta[key]:
                    out += self._delta(kind, delta[key])
            for call in delta.get("tool_calls") or []:
                if isinstance(call, dict):
                    out += self._tool_delta(call)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return out

    def close(self, usage: Usage | None = None) -> list[Event]:
        """The chat stream completed: close the open item and the response."""
        if self.done:
            return []
        self.done = True
        reason = INCOMPLETE.get(self._finish or "")
        out = [*self.start(), *self._close_item("incomplete" if reason else "completed")]
        self.response["output"] = list(self._output)
        finish(self.response, self._finish, usage or self.usage)
        kind = "response.incomplete" if reason else "response.completed"
        out.append(self._event(kind, response=self._snapshot()))
        return out

    def fail(self, status: int, code: str | None, message: str) -> list[Event]:
        """The stream failed part-way: an ``error`` event, then ``response.failed``."""
        if self.done:
            return []
        self.done = True
        out = [*self.start(), *self._close_item("incomplete")]
        out.append(self._event("error", code=code, message=message, param=None))
        self.response["output"] = list(self._output)
        failed(self.response, response_error_code(status), message)
        out.append(self._event("response.failed", response=self._snapshot()))
        return out
