"""The router's HTTP/1.1 protocol: uvicorn's httptools protocol, with limits on slow and huge requests.

uvicorn bounds neither how long a client may take to send its request nor how large the request
head may be (``h11_max_incomplete_event_size`` applies to the h11 protocol only, and
``--timeout-keep-alive`` only to the gap *between* requests). So a few clients trickling bytes
(slowloris) or sending endless headers could hold sockets, tasks and memory for ever. This
protocol adds two limits:

* **time**: the request head (request line and headers) must be complete within
  ``header_timeout`` seconds of the connection opening, or of the first byte of a later request on
  a kept-alive connection; after it, the body may pause at most ``header_timeout`` seconds between
  two reads. Otherwise the client gets ``408`` and the connection is closed.
* **size**: a request head larger than ``max_header_bytes`` gets ``431`` and the connection is closed.

Both answers are OpenAI-style JSON errors. ``kubellm router --header-timeout --max-header-bytes``
set the limits (passed to worker processes through the environment).

Deadlines (these two, and uvicorn's keep-alive timeout, which this protocol takes over) are
timestamps that a sweep checks a few times a second, so moving one is an assignment: timers
created and cancelled per request (three per request before) showed in profiles. A deadline is
enforced at most ``SWEEP_SECONDS`` late.

**Draining** (:func:`start_draining`, called on SIGTERM): every response from then on carries
``Connection: close``, so a keep-alive client closes the connection after its answer and opens its
next one to a pod that is not shutting down. Idle keep-alive connections stay open and are served
until the drain delay ends (a client picks a pooled connection at any moment, and a close racing
its request is a failed request); then uvicorn's shutdown closes those still idle, which by then
saw no request for the whole delay.

Model endpoints take the fast path of :mod:`._direct` from here; every other route goes to ASGI.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Callable
from typing import Any

from uvicorn._types import ASGI3Application
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from .._errors import error_body
from . import _direct

ENV_HEADER_TIMEOUT = "KUBELLM_HEADER_TIMEOUT"
ENV_MAX_HEADER_BYTES = "KUBELLM_MAX_HEADER_BYTES"
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_MAX_HEADER_BYTES = 64 * 1024

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
#: Longest delay between a deadline passing and the sweep acting on it.
SWEEP_SECONDS = 0.25


class _Sweep:
    """Checks the deadline of every connection of one server, every ``tick`` seconds while any is open."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float) -> None:
        self.loop = loop
        self.tick = tick
        self.connections: set[GuardedHttpToolsProtocol] = set()
        self._handle: asyncio.TimerHandle | None = None

    def add(self, connection: GuardedHttpToolsProtocol) -> None:
        self.connections.add(connection)
        if self._handle is None:
            self._handle = self.loop.call_later(self.tick, self._run)

    def _run(self) -> None:
        self._handle = None
        now = self.loop.time()
        for connection in list(self.connections):
            due = connection.due
            if due is not None and now >= due:
                connection.expired()
        if self.connections:
            self._handle = self.loop.call_later(self.tick, self._run)


_SWEEPS: weakref.WeakKeyDictionary[ServerState, _Sweep] = weakref.WeakKeyDictionary()
_draining = False


def start_draining() -> None:
    """From now on every response closes its connection (``Connection: close``), in this process.

    Requests already in progress whose response has not started close after it, too.
    """
    global _draining
    _draining = True
    for sweep in list(_SWEEPS.values()):
        for connection in list(sweep.connections):
            connection.close_after_response()


def draining() -> bool:
    return _draining


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.header_timeout = float(os.environ.get(ENV_HEADER_TIMEOUT) or DEFAULT_HEADER_TIMEOUT)
        self.max_header_bytes = int(os.environ.get(ENV_MAX_HEADER_BYTES) or DEFAULT_MAX_HEADER_BYTES)
        self._in_head = True  # a new connection owes its first request head
        self._in_body = False
        self._head_bytes = 0  # bytes received since the head began, while it is incomplete
        self._head_size = 0  # the request line and headers parsed so far
        self._refused = False
        #: When the current phase (head, body gap, or keep-alive wait) runs out, on the loop's clock.
        self.due: float | None = None
        self._keep_alive_wait = False
        sweep = _SWEEPS.get(server_state)
        if sweep is None:
            tick = min(SWEEP_SECONDS, self.header_timeout / 4, max(config.timeout_keep_alive, 0.01) / 4)
            sweep = _SWEEPS[server_state] = _Sweep(self.loop, tick)
        self._sweep = sweep
        self.fast_routes, self.find_fast_route = _fast_routes(self.app)
        self.direct_inbound: _direct.DirectInbound | None = None

    # -- the deadline ---------------------------------------------------------------------------

    def _arm(self) -> None:
        self.due = self.loop.time() + self.header_timeout
        self._keep_alive_wait = False

    def _disarm(self) -> None:
        self.due = None
        self._keep_alive_wait = False

    def expired(self) -> None:
        """The sweep found the deadline passed."""
        keep_alive_wait = self._keep_alive_wait
        self._disarm()
        if self.transport.is_closing():
            return
        if self._in_head or self._in_body:
            self._refuse(408, "the request was not received in time", "request_timeout")
        elif keep_alive_wait:
            self.timeout_keep_alive_handler()

    def _refuse(self, status: int, message: str, code: str) -> None:
        self._disarm()
        self._in_head = self._in_body = False
        self._refused = True
        if self.transport.is_closing():
            return
        body = error_body(status, message, type="invalid_request_error", code=code)
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % (
            status,
            _REASONS[status],
            len(body),
        )
        self.transport.write(head + b"connection: close\r\n\r\n" + body)
        self.transport.close()

    def close_after_response(self) -> None:
        """Answer what is in progress or queued with ``Connection: close`` (a response already started
        keeps what its head said; uvicorn's shutdown closes that connection once it is idle)."""
        cycles = [c for c, _ in self.pipeline]
        if self.cycle is not None:
            cycles.append(self.cycle)
        for cycle in cycles:
            if not cycle.response_started:
                cycle.keep_alive = False

    def send_400_response(self, msg: str) -> None:
        """uvicorn answers a request the parser refuses in plain text; clients get JSON everywhere."""
        self._refuse(400, f"malformed HTTP request: {msg}", "invalid_http_request")

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()
        self._sweep.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._sweep.connections.discard(self)
        super().connection_lost(exc)
        if self.direct_inbound is not None:
            self.direct_inbound.disconnected()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._in_head and self.due is not None and self._head_bytes:
            # The head is still incomplete after this chunk (its bytes are counted from the
            # message's first byte on: a little of a previous message may be counted too).
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._refuse(431, "the request head is too large", "request_header_fields_too_large")
        elif self._in_body:
            self._arm()  # the body keeps arriving: the gap allowed runs from here

    # -- parser callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._in_body, self._head_bytes, self._head_size = True, False, 1, 0
        if self.due is None or self._keep_alive_wait:
            self._arm()  # a kept-alive connection's next request: the head deadline starts now

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._head_size > self.max_header_bytes:
            self._refuse(431, "the request head is too large", "request_header_fields_too_large")
            return
        self._in_head, self._in_body = False, True
        self._arm()
        super().on_headers_complete()
        if _draining and self.cycle is not None:
            self.cycle.keep_alive = False
        if self.flow.read_paused:
            self._disarm()  # pipelined behind a request in progress: its body is not read yet

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._in_body = False
        self._disarm()
        super().on_message_complete()

    # -- the fast path for model endpoints ----------------------------------------------------

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        scope = cycle.scope
        endpoint = None
        if scope["method"] == "POST":
            path = scope["path"]
            endpoint = self.fast_routes.get(path) or self.find_fast_route(path)
        if endpoint is None or app is not self.app:
            super()._start_asgi_task(cycle, app)
            return
        task = self.loop.create_task(_direct.serve(self, cycle, endpoint))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    # -- closing idle TLS connections ---------------------------------------------------------

    def shutdown(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        super().shutdown()
        if idle:
            self._close_soon()

    def timeout_keep_alive_handler(self) -> None:
        super().timeout_keep_alive_handler()
        self._close_soon()

    def _close_soon(self) -> None:
        """A TLS close waits for the client's close_notify, which an idle pooled client sends only when
        it next touches the connection: until then the connection counts as open, and a shutdown
        waits for it for the whole grace period. Give the client a second, then drop it."""
        if self.scheme == "https":
            self.loop.call_later(1.0, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if self in self.connections:
            self.transport.abort()

    def on_response_complete(self) -> None:
        # uvicorn's, with the keep-alive timer replaced by a deadline for the sweep.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            if self._in_body and self.due is None:
                self._arm()  # a pipelined request's body, whose reading was paused, may arrive now
        elif not self._in_head and not self._in_body:
            self.due = self.loop.time() + self.timeout_keep_alive
            self._keep_alive_wait = True


def _no_route(path: str) -> _direct.Endpoint | None:
    return None


def _fast_routes(
    app: Any,
) -> tuple[dict[str, _direct.Endpoint], Callable[[str], _direct.Endpoint | None]]:
    """The router app's model endpoints, found under uvicorn's middleware wrappers: those at an exact
    path, and the lookup of those with a parameter in their path."""
    for _ in range(8):
        routes = getattr(app, "fast_routes", None)
        if isinstance(routes, dict):
            return routes, getattr(app, "find_fast_route", _no_route)
        app = getattr(app, "app", None)
        if app is None:
            break
    return {}, _no_route
