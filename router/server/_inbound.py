"""A client request as the model endpoints see it, whichever way it arrived.

The model endpoints are served two ways: straight from the router's HTTP protocol
(:mod:`._direct`, the fast path under ``kubellm router``) and through ASGI (any other server, or
a protocol without the fast path). Both hand the endpoint an :class:`Inbound`: the headers, the
body on demand, and whether the client is still there.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable

from starlette.requests import ClientDisconnect, Request

from .._errors import InvalidRequestError, PayloadTooLargeError

__all__ = ["AsgiInbound", "ClientDisconnect", "Inbound", "ReplacedBody", "check_declared_length"]


def check_declared_length(declared: str | None, limit: int) -> None:
    """Refuse a body by its ``Content-Length`` before reading it."""
    if declared is None:
        return
    if not declared.isdigit():
        raise InvalidRequestError("invalid Content-Length header", code="invalid_header")
    if int(declared) > limit:
        raise PayloadTooLargeError(f"request body of {declared} bytes exceeds the limit of {limit} bytes")


class Inbound(ABC):
    """One client request: lower-case header names, a body read on demand, and the client's presence."""

    headers: dict[str, str]
    _gone: bool = False

    @property
    def gone(self) -> bool:
        """True once the client has disconnected; the task serving it is then cancelled."""
        return self._gone

    @abstractmethod
    async def read(self, limit: int) -> bytes:
        """The whole body; :class:`PayloadTooLargeError` past ``limit`` bytes, :class:`ClientDisconnect`
        if the client leaves while sending it."""

    @abstractmethod
    def cancel_on_disconnect(self, task: asyncio.Task[object]) -> Callable[[], None]:
        """Cancel ``task`` (setting :attr:`gone`) if the client disconnects; returns the undo."""


class AsgiInbound(Inbound):
    def __init__(self, request: Request) -> None:
        self.request = request
        # Starlette's Headers.get scans the raw list on every call; the hot path asks a dozen times.
        self.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.scope["headers"]}

    async def read(self, limit: int) -> bytes:
        declared = self.headers.get("content-length")
        check_declared_length(declared, limit)
        if declared is not None:
            return await self.request.body()
        parts: list[bytes] = []
        size = 0
        async for part in self.request.stream():
            size += len(part)
            if size > limit:
                raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
            parts.append(part)
        return b"".join(parts)

    def cancel_on_disconnect(self, task: asyncio.Task[object]) -> Callable[[], None]:
        async def watch() -> None:
            while True:
                message = await self.request.receive()
                if message["type"] == "http.disconnect":
                    self._gone = True
                    task.cancel("client disconnected")
                    return

        watcher = asyncio.get_running_loop().create_task(watch())

        def stop() -> None:
            watcher.cancel()

        return stop


class ReplacedBody(Inbound):
    """Another request's headers and client, with a body of our own (a translated request)."""

    def __init__(self, outer: Inbound, body: bytes) -> None:
        self.outer = outer
        self.body = body
        self.headers = {k: v for k, v in outer.headers.items() if k != "content-length"}

    @property
    def gone(self) -> bool:
        return self.outer.gone

    async def read(self, limit: int) -> bytes:
        if len(self.body) > limit:
            raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
        return self.body

    def cancel_on_disconnect(self, task: asyncio.Task[object]) -> Callable[[], None]:
        return self.outer.cancel_on_disconnect(task)
