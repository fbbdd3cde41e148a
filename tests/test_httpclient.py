"""The upstream HTTP/1.1 client against real loopback servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from kubellm.router.upstream import _client as http
from kubellm.router.upstream._proxies import Proxy, ProxyChooser, bypassed
from tests.support.proxy import ForwardProxy
from tests.support.tls import certificates

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def run(coro: Coroutine[Any, Any, None]) -> None:
    uvloop.run(asyncio.wait_for(coro, 30))  # the router's loop; a stuck client fails, not hangs


class Scripted:
    """A loopback server running ``handler`` per connection; counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/x"

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """One request (head and Content-Length body); b'' at the end of the connection."""
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        return head + (await reader.readexactly(length) if length else b"")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(Exception):
            await self.handler(reader, writer)
        writer.close()

    @contextlib.asynccontextmanager
    async def running(self, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Scripted]:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            self.server.close()


def ok(body: bytes = b'{"ok":true}', extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def server(
    answer: Callable[[Scripted, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> Scripted:
    holder: list[Scripted] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answer(holder[0], reader, writer)

    holder.append(Scripted(handler))
    return holder[0]


def answering(response: bytes) -> Scripted:
    async def answer(s: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await s.read_request(reader):
            writer.write(response)
            await writer.drain()

    return server(answer)


# --------------------------------------------------------------------------- pooling


def test_sequential_requests_share_one_kept_alive_connection() -> None:
    async def main() -> None:
        async with answering(ok()).running() as s:
            pool = http.ConnectionPool()
            for i in range(20):
                resp = await pool.request("POST", s.url, {"X-N": str(i)}, b"{}")
                assert resp.status == 200
                assert await resp.read() == b'{"ok":true}'
            assert s.connections == 1
            assert pool.connections() == 1
            await pool.close()

    run(main())


def test_concurrent_requests_open_one_connection_each_then_reuse_them() -> None:
    async def main() -> None:
        async with answering(ok()).running() as s:
            pool = http.ConnectionPool()

            async def one() -> bytes:
                resp = await pool.request("POST", s.url, {}, b"{}")
                return await resp.read()

            for _ in range(3):
                assert await asyncio.gather(*(one() for _ in range(8))) == [b'{"ok":true}'] * 8
            assert s.connections == 8
            await pool.close()

    run(main())


def test_request_head_names_host_port_and_length_and_keeps_header_case() -> None:
    async def main() -> None:
        async with answering(ok()).running() as s:
            pool = http.ConnectionPool()
            resp = await pool.request("POST", s.url + "?a=1", {"Authorization": "Bearer k"}, b"abc")
            await resp.read()
            head = s.heads[0].decode()
            assert head.startswith("POST /v1/x?a=1 HTTP/1.1\r\n")
            assert f"Host: 127.0.0.1:{s.port}\r\n" in head
            assert "Content-Length: 3\r\n" in head
            assert "Authorization: Bearer k\r\n" in head
            await pool.close()

    run(main())


def test_header_values_with_line_breaks_are_refused_before_sending() -> None:
    async def main() -> None:
        async with answering(ok()).running() as s:
            pool = http.ConnectionPool()
            with pytest.raises(http.ConnectError, match="line break"):
                await pool.request("POST", s.url, {"X-Evil": "a\r\nX-Injected: 1"}, b"{}")
            assert s.heads == []
            await pool.close()

    run(main())


def test_response_headers_ignore_case_and_join_repeats() -> None:
    async def main() -> None:
        extra = b"Retry-After: 3\r\nX-Multi: a\r\nx-multi: b\r\n"
        async with answering(ok(b"{}", extra)).running() as s:
            pool = http.ConnectionPool()
            resp = await pool.request("GET", s.url, {})
            assert resp.headers.get("retry-after") == "3"
            assert resp.headers["RETRY-AFTER"] == "3"
            assert resp.headers.get("X-Multi") == "a, b"
            assert "content-length" in resp.headers
            await resp.read()
            await pool.close()

    run(main())


# --------------------------------------------------------------------------- bodies


def test_chunked_body_streams_in_order_and_the_connection_is_reused() -> None:
    async def answer(s: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await s.read_request(reader):
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(5):
                part = b"data: %d\n\n" % i
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")

    async def main() -> None:
        async with server(answer).running() as s:
            pool = http.ConnectionPool()
            for _ in range(2):
                resp = await pool.request("POST", s.url, {}, b"{}")
                parts = [part async for part in resp.iter_chunks()]
                assert len(parts) >= 2  # delivered as they came, not buffered to the end
                assert b"".join(parts) == b"".join(b"data: %d\n\n" % i for i in range(5))
            assert s.connections == 1
            await pool.close()

    run(main())


def test_body_until_close_ends_with_the_connection() -> None:
    async def answer(s: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await s.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nfirst ")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"second")

    async def main() -> None:
        async with server(answer).running() as s:
            pool = http.ConnectionPool()
            resp = await pool.request("GET", s.url, {})
            assert await resp.read() == b"first second"
            assert pool.connections() == 0  # not kept: the server closed it
            await pool.close()

    run(main())


def test_large_body_survives_read_pausing() -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB, well past the client's high-water mark

    async def main() -> None:
        async with answering(ok(payload)).running() as s:
            pool = http.ConnectionPool()
            resp = await pool.request("GET", s.url, {})
            received = bytearray()
            async for part in resp.iter_chunks():
                received += part
                await asyncio.sleep(0.001)  # a slow consumer
            assert bytes(received) == payload
            resp = await pool.request("GET", s.url, {})
            assert await resp.read() == payload
            assert s.connections == 1
            await pool.close()

    run(main())


def test_interim_100_continue_is_skipped() -> None:
    async def main() -> None:
        async with answering(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"real")).running() as s:
            pool = http.ConnectionPool()
            resp = await pool.request("POST", s.url, {}, b"{}")
            assert resp.status == 200
            assert await resp.read() == b"real"
            await pool.close()

    run(main())


def test_abandoned_body_drops_the_connection() -> None:
    async def main() -> None:
        async with answering(ok(b"x" * 100_000)).running() as s:
            pool = http.ConnectionPool()
            resp = await pool.request("GET", s.url, {})
            resp.close()  # body not read: the connection cannot carry another request
            resp = await pool.request("GET", s.url, {})
            assert len(await resp.read()) == 100_000
            assert s.connections == 2
            await pool.close()

    run(main())


def test_a_second_response_nobody_asked_for_retires_the_connection() -> None:
    async def main() -> None:
        async with answering(ok(b"mine") + ok(b"extra")).running() as s:
            pool = http.ConnectionPool()
            resp = await pool.request("GET", s.url, {})
            assert await resp.read() == b"mine"
            resp = await pool.request("GET", s.url, {})
            assert await resp.read() == b"mine"
            assert s.connections == 2  # the first connection was not reused
            await pool.close()

    run(main())


def test_bytes_arriving_on_an_idle_connection_retire_it() -> None:
    async def answer(s: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await s.read_request(reader):
            writer.write(ok())
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")

    async def main() -> None:
        async with server(answer).running() as s:
            pool = http.ConnectionPool()
            assert await (await pool.request("GET", s.url, {})).read() == b'{"ok":true}'
            await asyncio.sleep(0.2)
            resp = await pool.request("GET", s.url, {})
            assert await resp.read() == b'{"ok":true}'
            assert s.connections == 2
            await pool.close()

    run(main())


# --------------------------------------------------------------------------- failures


def test_idle_connection_closed_by_the_server_is_replaced_transparently() -> None:
    closed = asyncio.Event()

    async def answer(s: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await s.read_request(reader)
        writer.write(ok())
        await writer.drain()
        # Keep-alive in the response, then close without a word: the pool still holds it.
        writer.close()
        await writer.wait_closed()
        closed.set()

    async def main() -> None:
        async with server(answer).running() as s:
            pool = http.ConnectionPool()
            for _ in range(3):
                closed.clear()
                resp = await pool.request("POST", s.url, {}, b"{}")
                assert await resp.read() == b'{"ok":true}'
                await closed.wait()  # closed before the next request: it never reaches a dead connection
            assert s.connections == 3
            assert len(s.heads) == 3
            await pool.close()

    run(main())


def test_a_reused_connection_closed_after_reading_the_request_is_an_error_not_a_resend() -> None:
    """Issue #12 item 6: the request was resent on a new connection, a second billable call if the
    server had acted on the first copy. It may have reached the server, so it is not sent again."""

    async def answer(s: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if s.connections == 1:
            await s.read_request(reader)
            writer.write(ok())
            await writer.drain()
            await s.read_request(reader)  # the second request arrives whole, and is dropped unanswered
            return
        while await s.read_request(reader):
            writer.write(ok(b"fresh"))
            await writer.drain()

    async def main() -> None:
        async with server(answer).running() as s:
            pool = http.ConnectionPool()
            await (await pool.request("POST", s.url, {}, b"{}")).read()
            with pytest.raises(http.ConnectionClosed, match="without answering; the request was not resent"):
                await pool.request("POST", s.url, {}, b"{}")
            assert len(s.heads) == 2  # each call reached the server exactly once
            assert s.connections == 1
            await pool.close()

    run(main())


def test_a_fresh_connection_closed_without_an_answer_is_an_error_not_a_retry() -> None:
    async def answer(s: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await s.read_request(reader)

    async def main() -> None:
        async with server(answer).running() as s:
            pool = http.ConnectionPool()
            with pytest.raises(http.RemoteProtocolError, match="closed"):
                await pool.request("POST", s.url, {}, b"{}")
            assert s.connections == 1
            await pool.close()

    run(main())


def test_connection_closed_mid_body_is_a_protocol_error() -> None:
    async def answer(s: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await s.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()

    async def main() -> None:
        async with server(answer).running() as s:
            pool = http.ConnectionPool()
            resp = await pool.request("GET", s.url, {})
            with pytest.raises(http.RemoteProtocolError):
                await resp.read()
            await pool.close()

    run(main())


def test_garbage_instead_of_http_is_a_protocol_error() -> None:
    async def main() -> None:
        async with answering(b"SSH-2.0-OpenSSH\r\n\r\n").running() as s:
            pool = http.ConnectionPool()
            with pytest.raises(http.RemoteProtocolError, match="invalid HTTP"):
                await pool.request("GET", s.url, {})
            await pool.close()

    run(main())


def test_silence_before_the_head_is_an_idle_timeout() -> None:
    async def answer(s: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await s.read_request(reader)
        await asyncio.sleep(5)

    async def main() -> None:
        async with server(answer).running() as s:
            pool = http.ConnectionPool()
            started = asyncio.get_running_loop().time()
            with pytest.raises(http.IdleTimeout):
                await pool.request("GET", s.url, {}, idle_timeout=0.2, total_timeout=10)
            assert asyncio.get_running_loop().time() - started < 1.5
            await pool.close()

    run(main())


def test_silence_mid_body_is_an_idle_timeout() -> None:
    async def answer(s: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await s.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        await writer.drain()
        await asyncio.sleep(5)

    async def main() -> None:
        async with server(answer).running() as s:
            pool = http.ConnectionPool()
            resp = await pool.request("GET", s.url, {}, idle_timeout=0.2)
            with pytest.raises(http.IdleTimeout):
                await resp.read()
            await pool.close()

    run(main())


def test_a_trickle_that_never_idles_still_meets_the_total_timeout() -> None:
    async def answer(s: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await s.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(100):
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)

    async def main() -> None:
        async with server(answer).running() as s:
            pool = http.ConnectionPool()
            resp = await pool.request("GET", s.url, {}, idle_timeout=1.0, total_timeout=0.5)
            started = asyncio.get_running_loop().time()
            with pytest.raises(http.TotalTimeout):
                async for _ in resp.iter_chunks():
                    pass
            assert asyncio.get_running_loop().time() - started < 1.5
            await pool.close()

    run(main())


def test_refused_connection_is_a_connect_error() -> None:
    async def main() -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]  # bound, not listening: refused
            pool = http.ConnectionPool()
            with pytest.raises(http.ConnectError, match="refused"):
                await pool.request("GET", f"http://127.0.0.1:{port}/", {})
            await pool.close()

    run(main())


def test_connect_that_hangs_is_a_connect_timeout() -> None:
    async def main() -> None:
        # A listener that never accepts, its backlog filled: further SYNs go unanswered.
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        pool = http.ConnectionPool()
        try:
            with pytest.raises(http.ConnectTimeout):
                await pool.request("GET", f"http://127.0.0.1:{port}/", {}, connect_timeout=0.3)
        finally:
            for filler in fillers:
                filler.close()
            listener.close()
            await pool.close()

    run(main())


def test_unsupported_scheme_is_refused() -> None:
    async def main() -> None:
        pool = http.ConnectionPool()
        with pytest.raises(http.ConnectError, match="scheme"):
            await pool.request("GET", "ftp://127.0.0.1/", {})

    run(main())


# --------------------------------------------------------------------------- TLS


def _tls_server_context(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    ca, cert, key = certificates(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context, ca


def test_https_verifies_the_server_against_the_trusted_cas(tmp_path: Path) -> None:
    server_context, ca = _tls_server_context(tmp_path)

    async def main() -> None:
        async with answering(ok(b"secure")).running(server_context) as s:
            trusting = http.ConnectionPool(ssl_context=ssl.create_default_context(cafile=str(ca)))
            for _ in range(2):
                resp = await trusting.request("GET", f"https://127.0.0.1:{s.port}/", {})
                assert await resp.read() == b"secure"
            assert s.connections == 1
            await trusting.close()

            untrusting = http.ConnectionPool()  # the system's CAs do not know the test CA
            with pytest.raises(http.ConnectError, match="TLS"):
                await untrusting.request("GET", f"https://127.0.0.1:{s.port}/", {})
            await untrusting.close()

    run(main())


# --------------------------------------------------------------------------- proxies


def test_https_upstream_through_a_connect_proxy_with_credentials(tmp_path: Path) -> None:
    ca, cert, key = certificates(tmp_path, "upstream.test")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    expected_auth = "Basic " + base64.b64encode(b"user:p@ss").decode()

    async def main() -> None:
        async with answering(ok(b"tunnelled")).running(server_context) as s:
            with ForwardProxy({"upstream.test": s.port}, require=expected_auth) as proxy:
                pool = http.ConnectionPool(
                    ssl_context=ssl.create_default_context(cafile=str(ca)),
                    proxies={"https": f"http://user:p%40ss@127.0.0.1:{proxy.port}"},
                )
                for _ in range(2):
                    resp = await pool.request("POST", f"https://upstream.test:{s.port}/v1/x", {}, b"{}")
                    assert await resp.read() == b"tunnelled"
                assert proxy.lines == [f"CONNECT upstream.test:{s.port} HTTP/1.1"]  # one tunnel, reused
                assert proxy.authorizations == [expected_auth]
                assert s.heads[0].startswith(b"POST /v1/x HTTP/1.1\r\n")
                assert b"Proxy-Authorization" not in s.heads[0]  # never sent inside the tunnel
                await pool.close()

    run(main())


def test_http_upstream_through_a_forward_proxy_in_absolute_form() -> None:
    async def main() -> None:
        async with answering(ok(b"forwarded")).running() as s:
            with ForwardProxy({"upstream.test": s.port}) as proxy:
                pool = http.ConnectionPool(proxies={"http": proxy.url})
                resp = await pool.request("POST", f"http://upstream.test:{s.port}/v1/x?a=1", {}, b"{}")
                assert await resp.read() == b"forwarded"
                assert proxy.lines == [f"POST http://upstream.test:{s.port}/v1/x?a=1 HTTP/1.1"]
                await pool.close()

    run(main())


def test_a_proxy_refusing_the_tunnel_is_a_connect_error_naming_its_answer(tmp_path: Path) -> None:
    async def main() -> None:
        with ForwardProxy(require="Basic secret") as proxy:
            pool = http.ConnectionPool(proxies={"https": proxy.url})
            with pytest.raises(http.ConnectError, match=r"refused the tunnel: HTTP/1\.1 407"):
                await pool.request("GET", "https://upstream.test/", {})
            await pool.close()

    run(main())


def test_loopback_and_no_proxy_hosts_are_reached_directly() -> None:
    async def main() -> None:
        async with answering(ok(b"direct")).running() as s:
            with ForwardProxy() as proxy:
                pool = http.ConnectionPool(proxies={"http": proxy.url, "https": proxy.url})
                assert await (await pool.request("GET", s.url, {})).read() == b"direct"
                assert proxy.lines == []
                await pool.close()

    run(main())
    chooser = ProxyChooser({"https": "http://proxy.corp:3128", "no": "internal.example, .svc,10.0.0.0/8"})
    assert chooser.choose("https", "api.openai.com") == Proxy("proxy.corp", 3128)
    for direct in ("internal.example", "a.internal.example", "vllm.ns.svc", "10.1.2.3", "localhost", "::1"):
        assert chooser.choose("https", direct) is None, direct
    assert chooser.choose("http", "api.openai.com") is None  # no HTTP_PROXY
    assert bypassed("anything", "*") and not bypassed("notinternal.example", "internal.example")


def test_an_unusable_proxy_url_is_a_connect_error_naming_the_variable() -> None:
    async def main() -> None:
        pool = http.ConnectionPool(proxies={"https": "socks5://127.0.0.1:1080"})
        with pytest.raises(http.ConnectError, match=r"HTTPS_PROXY: unsupported proxy URL socks5://"):
            await pool.request("GET", "https://upstream.test/", {})

    run(main())
