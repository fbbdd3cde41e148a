"""Incremental decoders for compressed upstream bodies (``Content-Encoding``), streams included.

The client advertises exactly what it decodes, :data:`ACCEPT_ENCODING`: ``gzip`` (and its alias
``x-gzip``, RFC 9110 §8.4.1.3), ``deflate`` (zlib-wrapped as the RFC says, or raw, as some servers
send it: the first two bytes tell) and ``br``. zstd is not offered: the ``zstandard`` bindings cannot
bound the output of one decompression call, which the bomb cap below needs. Any other coding, or
more than one coding stacked, is refused before the body is read.

Against decompression bombs the decoded size of one body is capped at the larger of
:data:`MAX_DECODED_FLOOR` (64 MiB) and :data:`MAX_RATIO` (20) times the compressed bytes received so
far; each decompression call is bounded by what is still allowed, so a bomb costs at most that much
memory before it is refused. Real answers stay far below: JSON and SSE compress 3 to 20 times, and a
chat answer is a few MiB at most.

Errors are :class:`DecodeError`; the client turns them into its own.
"""

from __future__ import annotations

import zlib
from typing import Protocol

import brotli

__all__ = ["ACCEPT_ENCODING", "MAX_DECODED_FLOOR", "MAX_RATIO", "DecodeError", "Decoder", "decoder_for"]

ACCEPT_ENCODING = "gzip, deflate, br"
MAX_DECODED_FLOOR = 64 * 1024 * 1024
MAX_RATIO = 20


class DecodeError(ValueError):
    """The body's coding is not supported, or the body does not decode."""


class Decoder(Protocol):
    def feed(self, data: bytes) -> bytes:
        """The decoded bytes ``data`` completes (possibly none)."""

    def finish(self) -> None:
        """The body has ended: raise if the compressed stream did not."""


class _Budget:
    """Counts compressed and decoded bytes against the bomb cap."""

    __slots__ = ("compressed", "decoded", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.compressed = 0
        self.decoded = 0

    def allowance(self) -> int:
        return max(MAX_DECODED_FLOOR, MAX_RATIO * self.compressed) - self.decoded

    def spend(self, size: int, allowance: int) -> None:
        if size > allowance:
            raise DecodeError(
                f"the {self.name} body decodes to more than the router's cap (the larger of "
                f"{MAX_DECODED_FLOOR >> 20} MiB and {MAX_RATIO}x its compressed size)"
            )
        self.decoded += size


class _Zlib(_Budget):
    """gzip (several members allowed, RFC 1952 §2.2) and deflate."""

    __slots__ = ("_d", "_head", "_wbits")

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._wbits = 16 + zlib.MAX_WBITS if name == "gzip" else 0
        self._d = zlib.decompressobj(self._wbits) if self._wbits else None
        self._head = b""  # deflate: the first bytes, until they tell zlib from raw

    def _start_deflate(self, data: bytes) -> bytes:
        data = self._head + data
        if len(data) < 2:
            self._head = data
            return b""
        # A zlib header: compression method 8 and a 16-bit check that is a multiple of 31 (RFC 1950).
        wrapped = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
        self._d = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        return data

    def feed(self, data: bytes) -> bytes:
        self.compressed += len(data)
        if self._d is None and not (data := self._start_deflate(data)):
            return b""
        d = self._d
        assert d is not None
        out: list[bytes] = []
        while data:
            if d.eof:
                if self._wbits == 0:
                    raise DecodeError(f"the {self.name} body has data after its end")
                d = self._d = zlib.decompressobj(self._wbits)  # the next gzip member
            allowance = self.allowance()
            try:
                chunk = d.decompress(data, allowance + 1)
            except zlib.error as exc:
                raise DecodeError(f"the {self.name} body is corrupt: {exc}") from None
            self.spend(len(chunk), allowance)
            out.append(chunk)
            # Within the allowance, all input was consumed; what is left belongs to a next member.
            data = d.unused_data if d.eof else b""
        return out[0] if len(out) == 1 else b"".join(out)

    def finish(self) -> None:
        if self.compressed == 0:
            return  # no body at all (a HEAD, a 204, or an empty answer labelled compressed)
        if self._d is None or not self._d.eof:
            raise DecodeError(f"the {self.name} body ended before its compressed stream did")


class _Brotli(_Budget):
    __slots__ = ("_d",)

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._d = brotli.Decompressor()

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        self.compressed += len(data)
        if self._d.is_finished():
            raise DecodeError("the br body has data after its end")
        allowance = self.allowance()
        try:
            out: bytes = self._d.process(data, output_buffer_limit=allowance + 1)
        except brotli.error as exc:
            raise DecodeError(f"the br body is corrupt: {exc}") from None
        # Past the limit the decoder stops early and wants more calls: that is the cap reached.
        self.spend(len(out) if self._d.can_accept_more_data() else allowance + 1, allowance)
        return out

    def finish(self) -> None:
        if self.compressed and not self._d.is_finished():
            raise DecodeError("the br body ended before its compressed stream did")


_DECODERS: dict[str, type[_Zlib] | type[_Brotli]] = {
    "gzip": _Zlib,
    "x-gzip": _Zlib,
    "deflate": _Zlib,
    "br": _Brotli,
}


def decoder_for(coding: str) -> Decoder | None:
    """The decoder for a ``Content-Encoding`` value; None when the body is not encoded."""
    codings = [c for c in (part.strip().lower() for part in coding.split(",")) if c and c != "identity"]
    if not codings:
        return None
    shown = coding[:100]
    if len(codings) > 1:
        raise DecodeError(
            f"the upstream stacked several content codings ({shown!r}); one of {ACCEPT_ENCODING} is decoded"
        )
    kind = _DECODERS.get(codings[0])
    if kind is None:
        raise DecodeError(
            f"the upstream answered in an unsupported content coding {shown!r} "
            f"(the router accepts {ACCEPT_ENCODING})"
        )
    return kind("gzip" if codings[0] == "x-gzip" else codings[0])
