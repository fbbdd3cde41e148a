"""Server-sent events: the one place that frames and parses SSE.

Providers never build SSE text. They hand OpenAI chunk payloads to
:func:`frame`, and read upstream streams through :class:`SSEDecoder`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Event:
    """A named stream event in a native (non-OpenAI-chat) dialect, such as Anthropic's."""

    name: str
    data: bytes


#: A stream or response payload: pre-serialized JSON bytes, a dict to serialize, or a named event.
Payload = bytes | dict[str, Any] | Event


def frame(payload: Payload) -> bytes:
    """One ``data:`` event carrying a JSON payload; a named :class:`Event` gets its ``event:`` line."""
    if isinstance(payload, Event):
        return b"event: " + payload.name.encode() + b"\ndata: " + payload.data + b"\n\n"
    if not isinstance(payload, bytes):
        payload = orjson.dumps(payload)
    return b"data: " + payload + b"\n\n"


def frame_named(event: str, payload: bytes | dict[str, Any]) -> bytes:
    """An event with an ``event:`` line, as Anthropic's Messages API streams use."""
    if not isinstance(payload, bytes):
        payload = orjson.dumps(payload)
    return b"event: " + event.encode() + b"\ndata: " + payload + b"\n\n"


@dataclass(slots=True)
class SSEEvent:
    data: bytes
    event: str | None = None
    id: str | None = None


class SSEDecoder:
    """Incremental SSE parser following the WHATWG event-stream rules.

    Accepts input split at any byte, including inside a ``\\r\\n`` pair, and
    dispatches an event at each blank line. Comment lines (``:``) are skipped.
    """

    __slots__ = ("_buf", "_data", "_event", "_id", "_pending_cr")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []
        self._event: str | None = None
        self._id: str | None = None
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not chunk:
            return []
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._pending_cr = False
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            # A trailing \r may be the first half of \r\n: remember to drop the \n.
            if buf.endswith(b"\r"):
                self._pending_cr = True
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events: list[SSEEvent] = []
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            self._line(buf[start:end], events)
            start = end + 1
        self._buf = buf[start:]
        return events

    def close(self) -> list[SSEEvent]:
        """Flush a final event that was not followed by a blank line."""
        events: list[SSEEvent] = []
        if self._buf:
            self._line(self._buf, events)
            self._buf = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[SSEEvent]) -> None:
        if not line:
            if self._data or self._event is not None:
                events.append(SSEEvent(b"\n".join(self._data), self._event, self._id))
            self._data = []
            self._event = None
            return
        if line[0] == 0x3A:  # ":" comment
            return
        name, sep, value = line.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            self._id = value.decode("utf-8", "replace")
