"""``POST /v1/responses`` as an inbound API of the core, and its renderers.

:meth:`ResponsesApi.prepare` expands ``previous_response_id``: the stored turns' input and output
items come before the request's own input, and the id itself is not sent on (the router owns the
conversation; an upstream may not have it, and the next turn may go to another deployment). A
deployment that speaks Responses natively (OpenAI, Azure) gets that body; any other gets
:func:`responses_request_to_chat`'s translation, and its chat answer is rendered back as a
Response (or a Responses event stream).

A response with ``store`` (the default, as at OpenAI) is stored before the client sees its end:
the answer's body is written after the store has it (see :func:`settle`), a stream's
``response.completed`` after it too, so the client can chain the next turn at once.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from starlette.responses import Response, StreamingResponse

from ..._errors import KubellmError
from ..._sse import Event, frame
from ...core._outcome import Answer, Failure, Outcome, Stream, StreamError, StreamEvent
from ...providers import Operation
from .._base import JSON, SSE, InboundApi, Requested, stream_headers
from .._openai_validate import validate as validate_chat
from ._render import chat_completion_to_response, failed, new_id
from ._request import check_request, input_items, responses_request_to_chat
from ._store import BrokenChainError, ResponseStore, StoredResponse, as_input, history, with_ids
from ._stream import ChatToResponsesStream, response_error_code

if TYPE_CHECKING:
    from ...core._dispatch import Call
    from ...core._router import Caller


class ResponseNotFoundError(KubellmError):
    """OpenAI's 404 for a response id it does not have (or that another key stored)."""

    status = 404
    type = "invalid_request_error"


@dataclass(frozen=True, slots=True)
class Turn:
    """What the renderer needs of the client's own request, which the prepared body no longer shows."""

    owner: str
    previous: str | None
    own_input: list[dict[str, Any]]
    store: bool


class PreparedBody(dict[str, Any]):
    """The body the core sends on, carrying the :class:`Turn` it was prepared from."""

    turn: Turn


def _turn(call: Call) -> Turn:
    turn = getattr(call.body, "turn", None)
    if isinstance(turn, Turn):
        return turn
    return Turn(owner=call.caller_label, previous=None, own_input=input_items(call.body), store=False)


class StoringResponse(Response):
    """A JSON answer whose response must be stored before the client reads it (:func:`settle`)."""

    pending: Callable[[], Awaitable[None]] | None = None


async def settle(response: Response) -> Response:
    """Run what ``response`` must do before it is written (store the response it carries)."""
    pending = getattr(response, "pending", None)
    if pending is not None:
        response.pending = None  # type: ignore[attr-defined]
        await pending()
    return response


def _with_previous(data: bytes, previous: str | None) -> tuple[bytes, dict[str, Any]]:
    """A native event or answer with the client's ``previous_response_id`` put back (the upstream
    never saw it), and its document."""
    doc = orjson.loads(data)
    response = doc.get("response") if doc.get("object") != "response" else doc
    if previous is None or not isinstance(response, dict):
        return data, doc
    response["previous_response_id"] = previous
    return orjson.dumps(doc), doc


class ResponsesApi(InboundApi):
    """``POST /v1/responses``."""

    operation = Operation.RESPONSES

    def __init__(self, store: Callable[[], ResponseStore]) -> None:
        # Read per request: a router configured from a Secret adopts its services (the store with
        # them) once its first config arrives.
        self._store = store

    @property
    def store(self) -> ResponseStore:
        return self._store()

    def validate(self, body: dict[str, Any]) -> Requested:
        check_request(body)
        stream = body.get("stream") is True
        # Usage always: it fills response.completed (the chat relay drops it otherwise).
        return Requested(model=body["model"], stream=stream, include_usage=stream)

    def to_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        chat = responses_request_to_chat(body)
        # What the chat route would refuse is refused here too (a 400, never a provider's surprise).
        validate_chat(Operation.CHAT, chat)
        return chat

    async def prepare(self, body: dict[str, Any], caller: Caller) -> dict[str, Any]:
        owner = caller.label
        previous = body.get("previous_response_id")
        own = with_ids(input_items(body))
        earlier: list[dict[str, Any]] = []
        if isinstance(previous, str):
            try:
                earlier = await history(self.store, owner, previous)
            except BrokenChainError as err:
                raise ResponseNotFoundError(
                    f"Previous response with id '{err.response_id}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                ) from None
        prepared = PreparedBody({k: v for k, v in body.items() if k != "previous_response_id"})
        prepared["input"] = [*earlier, *(as_input(item) for item in own)]
        prepared.turn = Turn(
            owner=owner, previous=previous, own_input=own, store=body.get("store") is not False
        )
        return prepared

    def _echo(self, call: Call) -> dict[str, Any]:
        turn = _turn(call)
        return {**call.body, "previous_response_id": turn.previous}

    def _saver(self, turn: Turn, response: dict[str, Any]) -> Callable[[], Awaitable[None]] | None:
        if not turn.store or response.get("status") == "failed":
            return None
        stored = StoredResponse(response=response, input=turn.own_input)

        async def save() -> None:
            await self.store.put(turn.owner, stored)

        return save

    def render(self, outcome: Outcome, call: Call) -> Response:
        if isinstance(outcome, Failure):
            return self.render_error(outcome.error, outcome.headers)
        turn = _turn(call)
        if isinstance(outcome, Stream):
            if outcome.wire is Operation.RESPONSES:
                events = self._native_stream(outcome.events, turn)
            else:
                relay = ChatToResponsesStream(self._echo(call), new_id("resp"), int(time.time()))
                events = self._chat_stream(outcome.events, relay, turn)
            return StreamingResponse(events, media_type=SSE, headers=stream_headers(outcome.headers))
        return self._answer(outcome, call, turn)

    def _answer(self, outcome: Answer, call: Call, turn: Turn) -> Response:
        if outcome.wire is Operation.RESPONSES:
            body, doc = _with_previous(outcome.body, turn.previous)
        else:
            doc = chat_completion_to_response(
                outcome.doc(), self._echo(call), new_id("resp"), int(time.time()), outcome.usage
            )
            body = orjson.dumps(doc)
        response = StoringResponse(body, media_type=JSON, headers=outcome.headers)
        response.pending = self._saver(turn, doc)
        return response

    async def _chat_stream(
        self, events: AsyncIterator[StreamEvent], relay: ChatToResponsesStream, turn: Turn
    ) -> AsyncIterator[bytes]:
        async for batch in events:
            if isinstance(batch, StreamError):
                err = batch.error
                yield _frames(relay.fail(err.status, err.code or err.type, err.message))
                return
            out = [event for p in batch if isinstance(p, bytes) for event in relay.chunk(orjson.loads(p))]
            if out:
                yield _frames(out)
        last = relay.close()
        save = self._saver(turn, relay.response)
        if save is not None:
            await save()
        yield _frames(last)

    async def _native_stream(self, events: AsyncIterator[StreamEvent], turn: Turn) -> AsyncIterator[bytes]:
        """A native Responses stream, relayed; what it says is noted to store it, or to fail it."""
        seen = _NativeProgress()
        async for batch in events:
            if isinstance(batch, StreamError):
                yield _frames(seen.fail(batch.error))
                return
            out: list[bytes] = []
            for payload in batch:
                event = payload if isinstance(payload, Event) else Event("message", payload)
                data = seen.note(event, turn.previous)
                out.append(frame(Event(event.name, data)))
            if seen.final is not None and not seen.stored:
                seen.stored = True
                save = self._saver(turn, seen.final)
                if save is not None:
                    await save()  # before the client sees response.completed
            yield b"".join(out)


def _frames(events: list[dict[str, Any]]) -> bytes:
    return b"".join(frame(Event(str(e["type"]), orjson.dumps(e))) for e in events)


class _NativeProgress:
    """What a relayed native stream has said: its response so far, items, and the next number."""

    _PARSED = frozenset(
        {"response.created", "response.in_progress", "response.completed", "response.incomplete"}
    )

    def __init__(self) -> None:
        self.response: dict[str, Any] | None = None
        self.output: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None
        self.stored = False
        self.next_seq = 0

    def note(self, event: Event, previous: str | None) -> bytes:
        """``event``'s data, with the client's previous_response_id put back into responses."""
        self.next_seq += 1
        if event.name == "response.output_item.done":
            item = orjson.loads(event.data).get("item")
            if isinstance(item, dict):
                self.output.append(item)
            return event.data
        if event.name not in self._PARSED:
            return event.data
        data, doc = _with_previous(event.data, previous)
        self.next_seq = int(doc.get("sequence_number", self.next_seq - 1)) + 1
        response = doc.get("response")
        if isinstance(response, dict):
            self.response = response
            if event.name in ("response.completed", "response.incomplete"):
                self.final = response
        return data

    def fail(self, err: KubellmError) -> list[dict[str, Any]]:
        error = {"type": "error", "code": err.code or err.type, "message": err.message, "param": err.param}
        out: list[dict[str, Any]] = [{**error, "sequence_number": self.next_seq}]
        if self.response is not None:
            response = failed(
                {**self.response, "output": self.output}, response_error_code(err.status), err.message
            )
            response.pop("usage", None)
            out.append(
                {"type": "response.failed", "response": response, "sequence_number": self.next_seq + 1}
            )
        return out
