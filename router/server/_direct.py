"""The fast path: model endpoints served straight from the HTTP protocol, without ASGI.

Measured with the router pinned to one core, the layers between uvicorn's parser and the endpoint
(the ASGI scope and message dicts, the proxy-headers middleware, Starlette's Request, the
Response's ASGI calls and uvicorn's per-header checks on them, a task watching for disconnects)
cost more CPU per request than authenticating, routing and metering it. Model endpoints (POST to
an exact path, see ``RouterApp.fast_routes``) therefore run here, inside uvicorn's own
request/response cycle so that keep-alive, pipelining, ``Expect: 100-continue``, flow control and
graceful shutdown behave exactly as for every other route. Everything else goes through ASGI.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.responses import Response, StreamingResponse
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

from .._errors import INTERNAL_ERROR_BODY, KubellmError, PayloadTooLargeError
from ._inbound import ClientDisconnect, Inbound, check_declared_length

if TYPE_CHECKING:
    from ._protocol import GuardedHttpToolsProtocol

log = logging.getLogger("kubellm.router")

Endpoint = Callable[[Inbound], Awaitable[Response]]

# uvicorn's checks on response headers: a value with a line break would split the response.
_BAD_NAME = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')
_BAD_VALUE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")


class DirectInbound(Inbound):
    """A request read by the protocol itself; the body comes from uvicorn's cycle."""

    def __init__(self, cycle: RequestResponseCycle, flow: FlowControl) -> None:
        self.cycle = cycle
        self.flow = flow
        self.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in cycle.scope["headers"]}
        self.watched: asyncio.Task[Any] | None = None

    async def read(self, limit: int) -> bytes:
        cycle = self.cycle
        try:
            check_declared_length(self.headers.get("content-length"), limit)
        except KubellmError:
            cycle.keep_alive = False  # the body will not be read: close the connection after answering
            raise
        if cycle.waiting_for_100_continue and not cycle.transport.is_closing():
            cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        while cycle.more_body and not cycle.disconnected:
            if len(cycle.body) > limit:
                break
            self.flow.resume_reading()
            await cycle.message_event.wait()
            cycle.message_event.clear()
        if cycle.disconnected:
            raise ClientDisconnect()
        if len(cycle.body) > limit:
            cycle.keep_alive = False  # the rest of the body is not read: close after answering
            raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
        body = bytes(cycle.body)
        cycle.body = bytearray()
        return body

    def cancel_on_disconnect(self, task: asyncio.Task[Any]) -> Callable[[], None]:
        self.watched = task
        return self._unwatch

    def _unwatch(self) -> None:
        self.watched = None

    def disconnected(self) -> None:
        self._gone = True
        if self.watched is not None:
            self.watched.cancel("client disconnected")


async def serve(protocol: GuardedHttpToolsProtocol, cycle: RequestResponseCycle, endpoint: Endpoint) -> None:
    """Run one model-endpoint request on ``cycle`` (the task uvicorn would run the ASGI app in)."""
    inbound = DirectInbound(cycle, protocol.flow)
    protocol.direct_inbound = inbound
    try:
        response = await endpoint(inbound)
        if not cycle.disconnected:
            await _write(cycle, protocol.flow, inbound, response)
    except ClientDisconnect:
        pass  # the client left while sending its body: no one to answer
    except asyncio.CancelledError:
        if not inbound.gone:
            raise
    except Exception:
        log.exception("unhandled error on POST %s", cycle.scope["path"])
        if not cycle.response_started:
            _write_plain(cycle, 500, [(b"content-type", b"application/json")], INTERNAL_ERROR_BODY)
        else:
            cycle.transport.close()
    finally:
        protocol.direct_inbound = None
        cycle.on_response = lambda: None  # as uvicorn does once a cycle ends: drop the protocol


def _head(cycle: RequestResponseCycle, status: int, headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    parts = [STATUS_LINE[status]]
    for name, value in cycle.default_headers:
        parts += (name, b": ", value, b"\r\n")
    for name, value in headers:
        if name == b"connection" and b"close" in value.lower():
            cycle.keep_alive = False
        parts += (name, b": ", value, b"\r\n")
    # One search over all names, one over all values (a tab, allowed in values, separates them).
    if _BAD_NAME.search(b"".join([name for name, _ in headers])) or _BAD_VALUE.search(
        b"\t".join([value for _, value in headers])
    ):
        raise ValueError("invalid response header")
    if not cycle.keep_alive:
        parts.append(b"connection: close\r\n")
    return parts


def _complete(cycle: RequestResponseCycle) -> None:
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()


def _write_plain(
    cycle: RequestResponseCycle, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    parts = _head(cycle, status, headers)
    if not any(name == b"content-length" for name, _ in headers):
        parts += (b"content-length: ", str(len(body)).encode(), b"\r\n")
    parts += (b"\r\n", body)
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    cycle.transport.write(b"".join(parts))
    _complete(cycle)


async def _write(
    cycle: RequestResponseCycle, flow: FlowControl, inbound: DirectInbound, response: Response
) -> None:
    if not isinstance(response, StreamingResponse):
        _write_plain(cycle, response.status_code, response.raw_headers, bytes(response.body))
        return
    headers = [(k, v) for k, v in response.raw_headers if k != b"content-length"]
    parts = _head(cycle, response.status_code, headers)
    parts.append(b"transfer-encoding: chunked\r\n\r\n")
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    cycle.transport.write(b"".join(parts))
    body = response.body_iterator
    # A client that leaves mid-stream cancels the stream at once, not at its next chunk.
    unwatch = inbound.cancel_on_disconnect(_current_task())
    try:
        async for chunk in body:
            if flow.write_paused:
                await flow.drain()
            if cycle.disconnected:
                return
            if chunk:
                data = chunk.encode() if isinstance(chunk, str) else bytes(chunk)
                cycle.transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        cycle.transport.write(b"0\r\n\r\n")
        _complete(cycle)
    finally:
        unwatch()
        if isinstance(body, AsyncIterator) and hasattr(body, "aclose"):
            await body.aclose()


def _current_task() -> asyncio.Task[Any]:
    task = asyncio.current_task()
    assert task is not None
    return task
