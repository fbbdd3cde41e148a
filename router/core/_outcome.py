"""What the dispatcher returns: a typed result, rendered by the inbound API the client speaks.

The core never builds HTTP responses. It answers with an :class:`Answer`, a :class:`Stream` or a
:class:`Failure`; each inbound API (OpenAI chat, completions and embeddings, OpenAI Responses,
Anthropic Messages) renders that result in its own dialect. ``wire`` says which dialect the
payloads are in: the client's own operation when the deployment spoke it natively (the renderer
passes the bytes through), :attr:`Operation.CHAT` when the core translated the request to chat.

Metering, the ledger and the access log are done by the core before a result reaches a renderer
(for a stream, before its end reaches the client): renderers only render.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from .._errors import KubellmError
from .._sse import Event
from ..providers import Operation, Usage

__all__ = ["Answer", "Batch", "Failure", "Outcome", "Stream", "StreamError", "StreamEvent"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Answer:
    """A whole (non-streamed) answer: the body the provider adapter produced, in ``wire``'s dialect."""

    headers: dict[str, str]
    body: bytes
    usage: Usage | None
    wire: Operation
    cached: bool = False
    _doc: list[Any] = field(default_factory=list, repr=False, compare=False)

    def doc(self) -> Any:
        """The body parsed, once, for renderers that translate it."""
        if not self._doc:
            self._doc.append(orjson.loads(self.body))
        return self._doc[0]


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamError:
    """The stream failed after it began: the last item a failed stream yields."""

    error: KubellmError


#: One upstream read's worth of stream events in the stream's ``wire`` dialect: JSON payloads
#: (bytes) and, for native dialects with named events, :class:`Event`\ s. Batches keep the
#: translator's grouping, so a renderer writes each batch to the client in one send.
Batch = list[bytes | Event]
StreamEvent = Batch | StreamError


@dataclass(frozen=True, kw_only=True, slots=True)
class Stream:
    """A streamed answer. Its events end after the last batch of a complete stream; a stream that
    failed part-way ends with one :class:`StreamError`. The first batch is already in hand when a
    Stream is returned, so failures before it were retried or became a :class:`Failure`."""

    headers: dict[str, str]
    events: AsyncIterator[StreamEvent]
    wire: Operation
    cached: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class Failure:
    """No answer: why, and the headers the error response carries (Retry-After among them)."""

    error: KubellmError
    headers: dict[str, str]

    @property
    def status(self) -> int:
        return self.error.status


Outcome = Answer | Stream | Failure
