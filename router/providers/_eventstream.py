"""AWS event stream framing (``application/vnd.amazon.eventstream``), decoded incrementally.

Bedrock's ConverseStream answers in this binary framing rather than SSE. Each
message is::

    total length   u32 BE   (the whole message, these 4 bytes and the trailing CRC included)
    headers length u32 BE
    prelude CRC    u32 BE   CRC-32 of the 8 bytes above
    headers        name_len u8, name, value type u8, value (type-dependent)
    payload        total - headers - 16 bytes
    message CRC    u32 BE   CRC-32 of every byte before it

:class:`EventStreamDecoder` accepts input split at any byte and checks both
CRCs; a corrupt or malformed frame raises :class:`EventStreamError`.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime

from .._errors import UpstreamProtocolError

PRELUDE_LENGTH = 12
#: Prelude plus the trailing message CRC: the smallest possible message.
MIN_MESSAGE_LENGTH = 16
#: AWS caps one message at 16 MiB and its headers at 128 KiB.
MAX_MESSAGE_LENGTH = 16 * 1024 * 1024
MAX_HEADERS_LENGTH = 128 * 1024

HeaderValue = bool | int | bytes | str | datetime | uuid.UUID


class EventStreamError(UpstreamProtocolError):
    """The upstream's event stream is corrupt or not framed as the encoding requires."""


@dataclass(slots=True, frozen=True)
class EventMessage:
    headers: dict[str, HeaderValue]
    payload: bytes

    def header(self, name: str) -> str | None:
        value = self.headers.get(name)
        return value if isinstance(value, str) else None

    @property
    def message_type(self) -> str | None:
        """``event``, ``exception`` or ``error``."""
        return self.header(":message-type")

    @property
    def event_type(self) -> str | None:
        return self.header(":event-type")

    @property
    def exception_type(self) -> str | None:
        return self.header(":exception-type")


def _fixed(fmt: str) -> tuple[struct.Struct, int]:
    s = struct.Struct(fmt)
    return s, s.size


_I8, _I16, _I32, _I64 = _fixed(">b"), _fixed(">h"), _fixed(">i"), _fixed(">q")
_U16 = struct.Struct(">H")
_PRELUDE = struct.Struct(">III")
_CRC = struct.Struct(">I")


def decode_headers(data: bytes) -> dict[str, HeaderValue]:
    """Parse a message's header section (all ten value types of the encoding)."""
    headers: dict[str, HeaderValue] = {}
    pos = 0
    end = len(data)

    def need(n: int) -> None:
        if pos + n > end:
            raise EventStreamError("event stream header runs past the header section")

    while pos < end:
        name_len = data[pos]
        pos += 1
        need(name_len + 1)
        name = data[pos : pos + name_len].decode("utf-8", "replace")
        pos += name_len
        kind = data[pos]
        pos += 1
        value: HeaderValue
        if kind == 0:
            value = True
        elif kind == 1:
            value = False
        elif kind in (2, 3, 4, 5, 8):
            fmt, size = {2: _I8, 3: _I16, 4: _I32, 5: _I64, 8: _I64}[kind]
            need(size)
            number: int = fmt.unpack_from(data, pos)[0]
            pos += size
            value = datetime.fromtimestamp(number / 1000, UTC) if kind == 8 else number
        elif kind in (6, 7):
            need(2)
            length: int = _U16.unpack_from(data, pos)[0]
            pos += 2
            need(length)
            raw = bytes(data[pos : pos + length])
            pos += length
            value = raw.decode("utf-8", "replace") if kind == 7 else raw
        elif kind == 9:
            need(16)
            value = uuid.UUID(bytes=bytes(data[pos : pos + 16]))
            pos += 16
        else:
            raise EventStreamError(f"event stream header {name!r} has unknown value type {kind}")
        headers[name] = value
    return headers


class EventStreamDecoder:
    """Incremental decoder: feed it bytes as they arrive, get back whole messages."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[EventMessage]:
        self._buf += data
        buf = self._buf
        messages: list[EventMessage] = []
        start = 0
        while len(buf) - start >= PRELUDE_LENGTH:
            total, headers_len, prelude_crc = _PRELUDE.unpack_from(buf, start)
            # Checked as soon as the prelude is in, so garbage never makes us wait for a bogus length.
            if zlib.crc32(buf[start : start + 8]) != prelude_crc:
                raise EventStreamError("event stream prelude CRC mismatch")
            if not MIN_MESSAGE_LENGTH <= total <= MAX_MESSAGE_LENGTH:
                raise EventStreamError(f"event stream message length {total} is out of range")
            if headers_len > MAX_HEADERS_LENGTH or headers_len > total - MIN_MESSAGE_LENGTH:
                raise EventStreamError(f"event stream headers length {headers_len} is out of range")
            if len(buf) - start < total:
                break
            end = start + total
            (message_crc,) = _CRC.unpack_from(buf, end - 4)
            if zlib.crc32(buf[start : end - 4]) != message_crc:
                raise EventStreamError("event stream message CRC mismatch")
            body = start + PRELUDE_LENGTH
            headers = decode_headers(bytes(buf[body : body + headers_len]))
            messages.append(EventMessage(headers, bytes(buf[body + headers_len : end - 4])))
            start = end
        if start:
            del buf[:start]
        return messages

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a message."""
        return len(self._buf)

    def close(self) -> None:
        """The stream ended; a partial message left over is an error."""
        if self._buf:
            left = len(self._buf)
            self._buf.clear()
            raise EventStreamError(f"event stream ended inside a message ({left} bytes left over)")
