"""A small HTTP/1.1 client for the upstream hot path: keep-alive pools on asyncio protocols.

Chosen by measurement. With the router pinned to one core, aiohttp's ``ClientSession.request``
cost about 65 µs of CPU per proxied request (a raw protocol server forwarding through aiohttp
managed ~11,800 req/s, a raw-socket one ~50,000). The router needs little of what aiohttp
offers: no cookies, redirects or multipart; one request per connection at a time. So this client
is a connection per in-flight request, parsed with httptools (llhttp, the parser uvicorn uses),
pooled per origin, with TCP_NODELAY, proxies from the environment (:mod:`._proxies`), and three
timeouts:

* ``connect``: opening the connection (TCP and TLS);
* ``idle``: the longest silence while waiting for the response head or the next body bytes;
* ``total``: the whole exchange, from the start of the request to the end of the body.

**A request is sent again only when it provably never left.** Before an idle connection is reused,
its socket is polled without waiting: anything readable on an idle connection (an end of stream,
a reset, or bytes nobody asked for) retires it, even when the event loop has not processed it yet,
and the request goes on another connection.
If writing the request to a reused connection fails at once, nothing of it was sent, and it is
written once more on a new connection. In every other case (notably a server that reads the
request and closes the connection without answering) the request may have reached the server and
been acted on, so it is not resent: the exchange fails with :class:`ConnectionClosed`, and the
router's configured, counted retries decide what happens next.

Bodies in ``gzip``, ``deflate`` or ``br`` are decoded as they arrive (:mod:`._decoding`, which also
caps what a decompression bomb can cost); requests say so in ``Accept-Encoding`` unless the caller
set its own; other codings are refused with :class:`BadEncoding`.

Response heads are parsed as RFC 9112 §2.2 allows: a bare LF ends a line of the head (chunk lines
and everything else stay strict). A head (with any interim 1xx heads before it) is capped at
:data:`MAX_HEAD_BYTES` and :data:`MAX_HEAD_FIELDS`; past that the connection is dropped
(:class:`HeadTooLarge`). A body delimited by the end of the connection ends only with a clean close:
a reset is :class:`ConnectionClosed`.

Errors are :class:`ClientError` subclasses; :mod:`._upstream` turns them into the router's.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import cast

import httptools

from ._decoding import DecodeError, Decoder, decoder_for
from ._proxies import Proxy, ProxyChooser, environment_proxies
from ._wire import (
    BadEncoding,
    ClientError,
    ConnectError,
    ConnectionClosed,
    ConnectTimeout,
    HeadTooLarge,
    IdleTimeout,
    RemoteProtocolError,
    ResponseHeaders,
    TotalTimeout,
    _request_head,
    _Target,
    _target,
)

__all__ = [
    "MAX_HEAD_BYTES",
    "MAX_HEAD_FIELDS",
    "BadEncoding",
    "ClientError",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionClosed",
    "ConnectionPool",
    "HeadTooLarge",
    "IdleTimeout",
    "RemoteProtocolError",
    "Response",
    "ResponseHeaders",
    "TotalTimeout",
]

#: Stop reading from the socket while this many body bytes wait for the consumer.
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024

#: Caps on a response head: status line and header fields, interim 1xx heads included.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEAD_FIELDS = 256


def _parser(protocol: _Connection) -> httptools.HttpResponseParser:
    parser = httptools.HttpResponseParser(protocol)
    # RFC 9112 §2.2: a recipient may take a bare LF as the end of a head line (aiohttp does).
    parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
    return parser


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection, carrying at most one exchange at a time."""

    def __init__(
        self, pool: ConnectionPool, origin: tuple[str, str, int], loop: asyncio.AbstractEventLoop
    ) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = _parser(self)
        #: the socket, registered for readability: polled before the idle connection is reused
        self.poller: select.poll | None = None
        self.closed = False
        self.tunnel_reply: bytearray | None = None  # a proxy's answer to CONNECT, while awaited
        self.idle = False  # in the pool, between exchanges
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.waiter: asyncio.Future[bool] | None = None
        self.received = False  # any byte of the current response
        self.status = 0
        self.head: dict[str, str] = {}
        self.head_size = 0  # of the fields parsed, and their number, against the caps
        self.head_fields = 0
        self.head_fed = 0  # bytes fed while the head is incomplete
        self.headers: ResponseHeaders | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.read_paused = False
        self.complete = False
        self.keep_alive = False
        self.error: ClientError | None = None
        self.until_close = False  # body delimited by the end of the connection
        self.interim = False
        self.overrun = False  # the server sent more than one response

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None and self.poller is None:
            # One poll object per connection: checking it costs one syscall and no allocation.
            self.poller = select.poll()
            self.poller.register(sock.fileno(), select.POLLIN)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.tunnel_reply is not None:
            self.tunnel_reply += data
            self._wake()
            return
        if self.idle:
            self.close()  # bytes nobody asked for: the connection cannot carry another exchange
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(RemoteProtocolError(f"invalid HTTP response: {exc}"))
            self.close()
            return
        if self.headers is None:
            # Every byte so far belongs to the head; an endless one never reaches on_header.
            self.head_fed += len(data)
            if self.head_fed > MAX_HEAD_BYTES:
                self._fail(HeadTooLarge(f"the response head is larger than {MAX_HEAD_BYTES} bytes"))
                self.close()

    def eof_received(self) -> bool | None:
        return None  # close the transport: the server is done with this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._lost(self)
        if self.complete:
            return
        if self.headers is not None and self.until_close and exc is None and self.error is None:
            self.complete = True  # a clean close is the end of this body (a reset is not)
            self._wake()
            return
        how = "closed the connection" if exc is None else "reset the connection"
        if not self.received:
            # The request may have reached the server: see the module docstring on resending.
            self._fail(ConnectionClosed(f"the server {how} without answering; the request was not resent"))
        else:
            part = "body" if self.headers is not None else "head"
            self._fail(ConnectionClosed(f"the server {how} before the end of the response {part}"))

    # -- parser callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            self.overrun = True
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.overrun:
            return
        self.head_size += len(name) + len(value) + 4
        self.head_fields += 1
        if self.head_size > MAX_HEAD_BYTES or self.head_fields > MAX_HEAD_FIELDS:
            error = HeadTooLarge(
                f"the response head is larger than {MAX_HEAD_BYTES} bytes or {MAX_HEAD_FIELDS} fields"
            )
            self._fail(error)
            raise error  # stops the parser; data_received drops the connection
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self.head.get(key)
        self.head[key] = text if previous is None else f"{previous}, {text}"

    def on_headers_complete(self) -> None:
        if self.overrun:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self.interim = True  # 100 Continue and friends: the real response follows
            self.head = {}
            return
        self.status = status
        head = self.head
        self.headers = ResponseHeaders(head)
        self.until_close = (
            "content-length" not in head
            and "chunked" not in head.get("transfer-encoding", "").lower()
            and status not in (204, 304)
        )
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.overrun:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.overrun:
            return
        if self.interim:
            self.interim = False
            return
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # -- the exchange ---------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def _fail(self, error: ClientError) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def take(self) -> list[bytes]:
        chunks = self.chunks
        self.chunks = []
        self.buffered = 0
        if self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()
        return chunks

    async def wait(self, idle: float | None, deadline: float) -> None:
        """Wait for progress: more bytes, the end of the message, or an error."""
        remaining = deadline - self.loop.time()
        if remaining <= 0:
            raise TotalTimeout("the total timeout passed")
        error: type[ClientError]
        if idle is not None and idle < remaining:
            limit, error = idle, IdleTimeout
        else:
            limit, error = remaining, TotalTimeout
        waiter = self.loop.create_future()
        self.waiter = waiter
        timer = self.loop.call_later(limit, _expire, waiter)
        try:
            progressed = await waiter
        finally:
            timer.cancel()
            self.waiter = None
        if not progressed:
            raise error(f"no data for {limit:.3g} s")

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def reusable(self) -> bool:
        """Whether the idle connection can carry a request: nothing waits unread, not even its end."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        # A FIN, a reset or stray bytes that the loop has not processed yet show here (nothing is
        # consumed); the descriptor is still the transport's, as it is not closing.
        return self.poller is None or not self.poller.poll(0)

    async def open_tunnel(self, target: _Target, proxy: Proxy, context: ssl.SSLContext) -> None:
        """CONNECT through the proxy, then TLS with the upstream over the tunnel."""
        assert self.transport is not None
        lines = [f"CONNECT {target.authority} HTTP/1.1\r\nHost: {target.authority}\r\n"]
        if proxy.authorization:
            lines.append(f"Proxy-Authorization: {proxy.authorization}\r\n")
        self.tunnel_reply = reply = bytearray()
        self.transport.write("".join([*lines, "\r\n"]).encode("latin-1"))
        while b"\r\n\r\n" not in reply:
            if self.error is not None or self.closed:
                raise ConnectError(f"the proxy {proxy.host}:{proxy.port} closed the connection")
            if len(reply) > MAX_HEAD_BYTES:
                raise ConnectError(f"the proxy {proxy.host}:{proxy.port} sent an endless answer to CONNECT")
            self.waiter = self.loop.create_future()
            await self.waiter
        self.tunnel_reply = None
        status_line = bytes(reply).split(b"\r\n", 1)[0].decode("latin-1", "replace")
        fields = status_line.split(" ", 2)
        if len(fields) < 2 or fields[1] != "200":
            raise ConnectError(f"the proxy {proxy.host}:{proxy.port} refused the tunnel: {status_line[:200]}")
        tls = await self.loop.start_tls(self.transport, self, context, server_hostname=target.host)
        if tls is None:
            raise ConnectError("TLS over the proxy tunnel could not start")
        self.transport = tls
        self.parser = _parser(self)


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class Response:
    """A response whose head has arrived; read the body with :meth:`read` or :meth:`iter_chunks`."""

    __slots__ = ("_conn", "_deadline", "_decoder", "_idle", "headers", "status")

    def __init__(
        self, conn: _Connection, idle: float | None, deadline: float, decoder: Decoder | None
    ) -> None:
        self._conn: _Connection | None = conn
        self._idle = idle
        self._deadline = deadline
        self._decoder = decoder
        self.status = conn.status
        assert conn.headers is not None
        self.headers: ResponseHeaders = conn.headers

    async def read(self) -> bytes:
        parts: list[bytes] = []
        while (chunks := await self._more()) is not None:
            parts.extend(chunks)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        while (chunks := await self._more()) is not None:
            yield chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _more(self) -> list[bytes] | None:
        """The body bytes received since the last call, or None once the body has ended."""
        conn = self._conn
        if conn is None:
            raise RemoteProtocolError("the response body was already consumed or closed")
        try:
            while True:
                while not conn.chunks:
                    if conn.complete:
                        if self._decoder is not None:
                            self._decoder.finish()
                        self._release()
                        return None
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(self._idle, self._deadline)
                if self._decoder is None:
                    return conn.take()
                chunks = conn.take()
                data = self._decoder.feed(chunks[0] if len(chunks) == 1 else b"".join(chunks))
                if data:
                    return [data]
        except DecodeError as exc:
            self.close()
            raise BadEncoding(str(exc)) from None
        except BaseException:
            self.close()
            raise

    def _release(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.pool._release(conn)

    def close(self) -> None:
        """Give the connection back if the body was read to its end, else drop it."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        if conn.complete and not conn.chunks:
            conn.pool._release(conn)
        else:
            conn.close()

    def __del__(self) -> None:
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.close()  # abandoned mid-body: the connection cannot be reused


class ConnectionPool:
    """Keep-alive connections per origin (scheme, host, port); unlimited in-flight requests."""

    def __init__(
        self,
        *,
        keepalive_seconds: float = 75.0,
        max_idle_per_origin: int = 512,
        ssl_context: ssl.SSLContext | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> None:
        """``proxies``: ``{"https": url, "http": url, "no": hosts}``; default: from the environment
        (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``; see :mod:`._proxies`)."""
        self._proxies = ProxyChooser(environment_proxies() if proxies is None else proxies)
        self.keepalive_seconds = keepalive_seconds
        self.max_idle_per_origin = max_idle_per_origin
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._ssl = ssl_context
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """The given context, or the system's trusted CAs (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` apply)."""
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def connections(self) -> int:
        """Open connections, idle and busy."""
        return len(self._busy) + sum(len(idle) for idle in self._idle.values())

    async def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None = None,
        *,
        connect_timeout: float | None = None,
        idle_timeout: float | None = None,
        total_timeout: float | None = None,
    ) -> Response:
        """Send a request and wait for the response head."""
        target = _target(url)
        proxy = None
        if self._proxies:
            try:
                proxy = self._proxies.choose(target.origin[0], target.host)
            except ValueError as exc:
                raise ConnectError(str(exc)) from None
        data = _request_head(method, target, headers, body, proxy if proxy and not target.tls else None)
        if body:
            data += body
        loop = self._loop
        if loop is None:
            # One pool serves one event loop; asyncio.get_running_loop() costs a getpid() per call.
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + (total_timeout if total_timeout is not None else 1e9)
        for attempt in range(2):
            conn = self._reuse(target.origin, loop.time())
            reused = conn is not None
            if conn is None:
                conn = await self._connect(loop, target, proxy, connect_timeout, deadline)
            self._busy.add(conn)
            try:
                transport = conn.transport
                assert transport is not None
                transport.write(data)
                if reused and attempt == 0 and transport.is_closing():
                    conn.close()  # the write failed at once, so no byte of it left: resend it
                    continue
                while conn.headers is None:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(idle_timeout, deadline)
                coding = conn.head.get("content-encoding")
                decoder = None if coding is None else decoder_for(coding)
            except DecodeError as exc:
                conn.close()
                raise BadEncoding(str(exc)) from None
            except BaseException:
                conn.close()
                raise
            return Response(conn, idle_timeout, deadline, decoder)
        raise AssertionError("unreachable")

    def _reuse(self, origin: tuple[str, str, int], now: float) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < self.keepalive_seconds and conn.reusable():
                conn.idle = False
                conn._reset()
                return conn
            conn.close()
        return None

    async def _connect(
        self,
        loop: asyncio.AbstractEventLoop,
        target: _Target,
        proxy: Proxy | None,
        connect_limit: float | None,
        deadline: float,
    ) -> _Connection:
        remaining = deadline - loop.time()
        limit = remaining if connect_limit is None else min(connect_limit, remaining)
        conn = _Connection(self, target.origin, loop)
        tls = self.ssl_context if target.tls else None
        try:
            async with asyncio.timeout(limit):
                if proxy is None:
                    await loop.create_connection(
                        lambda: conn,
                        target.host,
                        target.port,
                        ssl=tls,
                        server_hostname=target.host if tls else None,
                    )
                else:
                    await loop.create_connection(lambda: conn, proxy.host, proxy.port)
                    if tls is not None:
                        await conn.open_tunnel(target, proxy, tls)
        except TimeoutError:
            conn.close()
            if connect_limit is not None and connect_limit <= remaining:
                raise ConnectTimeout(f"connecting took longer than {connect_limit:.3g} s") from None
            raise TotalTimeout("the total timeout passed while connecting") from None
        except ssl.SSLError as exc:
            conn.close()
            raise ConnectError(f"TLS handshake failed: {exc.reason or exc}") from None
        except ConnectError:
            conn.close()
            raise
        except socket.gaierror as exc:
            where = target.host if proxy is None else f"the proxy {proxy.host}"
            raise ConnectError(f"cannot resolve {where!r}: {exc.strerror}") from None
        except OSError as exc:
            via = "" if proxy is None else f" (through the proxy {proxy.host}:{proxy.port})"
            raise ConnectError((exc.strerror or type(exc).__name__) + via) from None
        return conn

    def _release(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        if conn.closed or not conn.keep_alive or conn.transport is None or conn.transport.is_closing():
            conn.close()
            return
        idle = self._idle.setdefault(conn.origin, [])
        now = conn.loop.time()
        if idle and now - idle[0].idle_since >= self.keepalive_seconds:
            idle.pop(0).close()  # the oldest has idled too long; one per release keeps this cheap
        if len(idle) >= self.max_idle_per_origin:
            conn.close()
            return
        conn.idle_since = now
        conn.idle = True
        idle.append(conn)

    def _lost(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        for conn in list(self._busy):
            conn.close()
        self._busy.clear()
