"""Inbound APIs: the dialects clients speak, each a validator and a renderer over the core.

An :class:`InboundApi` checks a request in its dialect, says how a deployment that does not speak
that dialect natively is asked instead (:meth:`InboundApi.to_chat`), and renders the core's typed
:class:`~._outcome.Outcome` as the HTTP response its clients expect. The server layer writes what
the renderer produces; nothing downstream re-reads it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from starlette.responses import Response, StreamingResponse

from .._errors import KubellmError
from .._sse import DONE, frame
from ..core._outcome import Answer, Outcome, Stream, StreamError
from ..providers import Operation
from ._openai_validate import parse_body, validate

if TYPE_CHECKING:
    from ..config._schema import RouterSettings
    from ..core._dispatch import Call
    from ..core._router import Caller
    from ..server._inbound import Inbound

__all__ = ["JSON", "SSE", "InboundApi", "OpenAiApi", "Requested", "stream_headers"]

JSON = "application/json"
SSE = "text/event-stream"


@dataclass(frozen=True, kw_only=True, slots=True)
class Requested:
    """What the core needs to know of a validated request."""

    model: str
    stream: bool = False
    include_usage: bool = False


def stream_headers(headers: dict[str, str]) -> dict[str, str]:
    """A stream's response headers: no caching, and no buffering by proxies in between."""
    return {**headers, "cache-control": "no-cache", "x-accel-buffering": "no"}


class InboundApi(ABC):
    """One dialect clients speak, on one route."""

    operation: ClassVar[Operation]
    #: Client request headers (lower-case) a deployment speaking :attr:`operation` natively gets
    #: forwarded, such as ``anthropic-beta``; never credentials.
    forward_headers: ClassVar[frozenset[str]] = frozenset()

    async def read_body(self, inbound: Inbound, settings: RouterSettings) -> dict[str, Any]:
        """The request body as a document: JSON by default (multipart uploads override this)."""
        return parse_body(await inbound.read(settings.max_request_body_bytes))

    @abstractmethod
    def validate(self, body: dict[str, Any]) -> Requested:
        """Check ``body``; raise :class:`~._errors.InvalidRequestError` naming the field at fault."""

    def to_chat(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The OpenAI chat request a deployment that does not speak :attr:`operation` gets, or None
        when the operation has no chat form (such deployments are then skipped)."""
        return None

    async def prepare(self, body: dict[str, Any], caller: Caller) -> dict[str, Any]:
        """The request as the core should see it (after validation; may read stored state)."""
        return body

    @abstractmethod
    def render(self, outcome: Outcome, call: Call) -> Response:
        """The HTTP response for the core's result."""

    def render_error(self, err: KubellmError, headers: dict[str, str]) -> Response:
        """An error before or instead of a result; ``headers`` come first, the error's own win."""
        return Response(
            err.to_json(), status_code=err.status, media_type=JSON, headers={**headers, **err.headers}
        )


async def _openai_stream(events: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    async for batch in events:
        if isinstance(batch, StreamError):
            # The stream has begun, so the error travels as an event; no [DONE] follows it.
            yield frame(batch.error.to_dict())
            return
        yield b"".join([frame(p) for p in batch])
    yield DONE


class OpenAiApi(InboundApi):
    """OpenAI's chat completions, completions and embeddings: the core's own dialect."""

    def __init__(self, operation: Operation) -> None:
        self.operation = operation  # type: ignore[misc]  # one instance per route

    def validate(self, body: dict[str, Any]) -> Requested:
        model, stream, include_usage = validate(self.operation, body)
        return Requested(model=model, stream=stream, include_usage=include_usage)

    def render(self, outcome: Outcome, call: Call) -> Response:
        if isinstance(outcome, Answer):
            return Response(outcome.body, media_type=JSON, headers=outcome.headers)
        if isinstance(outcome, Stream):
            return StreamingResponse(
                _openai_stream(outcome.events), media_type=SSE, headers=stream_headers(outcome.headers)
            )
        return self.render_error(outcome.error, outcome.headers)
