"""The upstream client against raw-socket servers: compressed bodies, oversized and bare-LF heads,
resets, and when a request may be sent twice (issue #12, items 2 to 6)."""

from __future__ import annotations

import asyncio
import gzip
import select
import threading
import zlib
from collections.abc import Callable, Coroutine
from typing import Any

import brotli
import pytest
import uvloop

from kubellm.router.upstream import _client as http
from kubellm.router.upstream import _decoding
from tests.support.raw_upstream import RawConnection, RawUpstream

BODY = b'{"choices":[{"message":{"content":"' + b"hello compressed world " * 200 + b'"}}]}'


def run(coro: Coroutine[Any, Any, None]) -> None:
    uvloop.run(asyncio.wait_for(coro, 30))  # the router's loop; a stuck client fails, not hangs


def url(upstream: RawUpstream) -> str:
    return upstream.base_url + "/v1/x"


def chunked(data: bytes, size: int) -> bytes:
    """``data`` in HTTP chunks of ``size`` bytes: each compressed piece arrives on its own."""
    pieces = [data[i : i + size] for i in range(0, len(data), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def serve_each(answer: Callable[[RawConnection, bytes], None]) -> RawUpstream:
    def handler(conn: RawConnection) -> None:
        while (request := conn.read_request()) is not None:
            answer(conn, request)

    return RawUpstream(handler)


def encoded(coding: bytes, body: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n" % (coding, len(body))
    return head + body


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


CODINGS = {
    "gzip": ("gzip", gzip.compress),
    "x-gzip": ("x-gzip", gzip.compress),
    "two gzip members": ("gzip", lambda b: gzip.compress(b[:100]) + gzip.compress(b[100:])),
    "deflate (zlib)": ("deflate", zlib.compress),
    "deflate (raw)": ("deflate", raw_deflate),
    "br": ("br", brotli.compress),
}


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("case", list(CODINGS))
def test_compressed_bodies_are_decoded_piece_by_piece(case: str) -> None:
    coding, compress = CODINGS[case]
    packed = compress(BODY)
    head = b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % coding.encode()

    def answer(conn: RawConnection, request: bytes) -> None:
        conn.send(head + chunked(packed, 7))

    async def main() -> None:
        with serve_each(answer) as upstream:
            pool = http.ConnectionPool()
            for _ in range(2):  # and the connection is reused after a decoded body
                resp = await pool.request("POST", url(upstream), {}, b"{}")
                assert await resp.read() == BODY
            assert upstream.connections == 1
            assert b"\r\nAccept-Encoding: gzip, deflate, br\r\n" in upstream.requests[0]
            await pool.close()

    run(main())


@pytest.mark.parametrize("case", list(CODINGS))
def test_decoders_take_any_split_of_the_compressed_bytes(case: str) -> None:
    coding, compress = CODINGS[case]
    packed = compress(BODY)
    decoder = _decoding.decoder_for(coding)
    assert decoder is not None
    out = b"".join(decoder.feed(packed[i : i + 1]) for i in range(len(packed)))  # one byte at a time
    decoder.finish()
    assert out == BODY


def test_a_compressed_stream_is_decoded_as_it_arrives() -> None:
    """The first events come out before the server sends the rest: decoding is incremental."""
    first_seen = threading.Event()
    waited: list[bool] = []
    events = [b'data: {"n": %d, "text": "%s"}\n\n' % (i, b"x" * i) for i in range(40)]
    stream = b"".join(events)

    def answer(conn: RawConnection, request: bytes) -> None:
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n")
        c = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
        split = len(events[0]) + 5  # mid-event: the second event is cut across two pieces
        part = c.compress(stream[:split]) + c.flush(zlib.Z_SYNC_FLUSH)
        conn.send(b"%x\r\n%s\r\n" % (len(part), part))
        waited.append(first_seen.wait(10))
        rest = c.compress(stream[split:]) + c.flush()
        conn.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))

    async def main() -> None:
        with serve_each(answer) as upstream:
            pool = http.ConnectionPool()
            resp = await pool.request("POST", url(upstream), {}, b"{}")
            got = b""
            async for data in resp.iter_chunks():
                got += data
                first_seen.set()
            assert got == stream
            assert waited == [True]
            await pool.close()

    run(main())


@pytest.mark.parametrize(
    ("coding", "message"),
    [
        (b"zstd", "unsupported content coding 'zstd'"),
        (b"compress", "unsupported content coding 'compress'"),
        (b"gzip, br", "stacked several content codings"),
    ],
)
def test_an_unknown_or_stacked_coding_is_refused_before_the_body(coding: bytes, message: str) -> None:
    def answer(conn: RawConnection, request: bytes) -> None:
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: 2\r\n\r\n??" % coding)

    async def main() -> None:
        with serve_each(answer) as upstream:
            pool = http.ConnectionPool()
            for _ in range(2):
                with pytest.raises(http.BadEncoding, match=message):
                    await pool.request("POST", url(upstream), {}, b"{}")
            assert upstream.connections == 2  # the body was never read: the connection was dropped
            await pool.close()

    run(main())


def test_identity_and_an_empty_compressed_body_need_no_decoding() -> None:
    answers = iter(
        [
            b"HTTP/1.1 200 OK\r\nContent-Encoding: identity\r\nContent-Length: 2\r\n\r\nhi",
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 0\r\n\r\n",
        ]
    )

    def answer(conn: RawConnection, request: bytes) -> None:
        conn.send(next(answers))

    async def main() -> None:
        with serve_each(answer) as upstream:
            pool = http.ConnectionPool()
            assert await (await pool.request("GET", url(upstream), {})).read() == b"hi"
            assert await (await pool.request("GET", url(upstream), {})).read() == b""
            await pool.close()

    run(main())


@pytest.mark.parametrize(
    ("coding", "body", "message"),
    [
        (b"gzip", gzip.compress(BODY)[:12] + b"\xff" * 40 + gzip.compress(BODY)[52:], "gzip body is corrupt"),
        (b"gzip", gzip.compress(BODY)[:-20], "ended before its compressed stream did"),
        (b"gzip", BODY, "gzip body is corrupt"),
        (b"deflate", zlib.compress(BODY) + b"junk", "data after its end"),
        (b"br", b"\xff" * 64, "br body is corrupt"),
        (b"br", brotli.compress(BODY)[:-8], "ended before its compressed stream did"),
    ],
    ids=["corrupt gzip", "cut gzip", "text labelled gzip", "deflate with junk", "corrupt br", "cut br"],
)
def test_a_body_that_does_not_decode_is_an_error(coding: bytes, body: bytes, message: str) -> None:
    def answer(conn: RawConnection, request: bytes) -> None:
        conn.send(encoded(coding, body))

    async def main() -> None:
        with serve_each(answer) as upstream:
            pool = http.ConnectionPool()
            resp = await pool.request("POST", url(upstream), {}, b"{}")
            with pytest.raises(http.BadEncoding, match=message):
                await resp.read()
            await pool.close()

    run(main())


@pytest.mark.parametrize("coding", ["gzip", "br"])
def test_a_decompression_bomb_is_refused_at_the_cap(coding: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_decoding, "MAX_DECODED_FLOOR", 1 << 20)  # 1 MiB instead of 64, to keep this quick
    zeros = b"\0" * (16 << 20)
    bomb = gzip.compress(zeros) if coding == "gzip" else brotli.compress(zeros)
    assert len(bomb) * _decoding.MAX_RATIO < 1 << 20  # far past the ratio too
    fits = gzip.compress(b"\0" * (1 << 19)) if coding == "gzip" else brotli.compress(b"\0" * (1 << 19))
    answers = iter([bomb, fits])

    def answer(conn: RawConnection, request: bytes) -> None:
        conn.send(encoded(coding.encode(), next(answers)))

    async def main() -> None:
        with serve_each(answer) as upstream:
            pool = http.ConnectionPool()
            resp = await pool.request("POST", url(upstream), {}, b"{}")
            with pytest.raises(http.BadEncoding, match="decodes to more than the router's cap"):
                await resp.read()
            resp = await pool.request("POST", url(upstream), {}, b"{}")
            assert len(await resp.read()) == 1 << 19  # under the cap: decoded whole
            await pool.close()

    run(main())


def test_the_callers_accept_encoding_is_sent_instead_of_the_clients() -> None:
    def answer(conn: RawConnection, request: bytes) -> None:
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def main() -> None:
        with serve_each(answer) as upstream:
            pool = http.ConnectionPool()
            await (await pool.request("GET", url(upstream), {"accept-encoding": "identity"})).read()
            head = upstream.requests[0].lower()
            assert head.count(b"accept-encoding") == 1 and b"\r\naccept-encoding: identity\r\n" in head
            await pool.close()

    run(main())


# --------------------------------------------------------------------------- heads


def endless_value(conn: RawConnection) -> None:
    conn.send(b"HTTP/1.1 200 OK\r\nX-Endless: ")
    while True:  # until the client hangs up (then sendall fails and the handler ends)
        conn.send(b"a" * 65536)


def many_fields(conn: RawConnection) -> None:
    fields = b"X-A: b\r\n" * (http.MAX_HEAD_FIELDS + 1)
    conn.send(b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 0\r\n\r\n")


def large_but_complete(conn: RawConnection) -> None:
    # The whole head in one write: it may arrive as one read that also ends it.
    big = b"a" * (http.MAX_HEAD_BYTES + 10)
    conn.send(b"HTTP/1.1 200 OK\r\nX-Big: " + big + b"\r\nContent-Length: 0\r\n\r\n")


def endless_interim(conn: RawConnection) -> None:
    while True:
        conn.send(b"HTTP/1.1 100 Continue\r\nX-Filler: " + b"a" * 1000 + b"\r\n\r\n")


@pytest.mark.parametrize("send", [endless_value, many_fields, large_but_complete, endless_interim])
def test_an_oversized_response_head_is_cut_off(send: Callable[[RawConnection], None]) -> None:
    """Issue #12 item 4: a 64 MiB header was read whole (7.9 s, 62 MiB of RSS)."""
    ended = threading.Event()

    def handler(conn: RawConnection) -> None:
        conn.read_request()
        try:
            send(conn)
        finally:
            ended.set()

    async def main() -> None:
        with RawUpstream(handler) as upstream:
            pool = http.ConnectionPool()
            with pytest.raises(http.HeadTooLarge, match="larger than"):
                await pool.request("GET", url(upstream), {})
            await asyncio.to_thread(ended.wait, 10)  # the endless senders stop: the connection was dropped
            assert ended.is_set()
            await pool.close()

    run(main())


def test_response_heads_with_bare_lf_line_ends_are_accepted() -> None:
    """Issue #12 item 5: RFC 9112 §2.2 lets a recipient take a bare LF as a line end; it was refused."""
    answers = iter(
        [
            b"HTTP/1.1 200 OK\nContent-Type: application/json\nContent-Length: 2\n\nhi",
            b"HTTP/1.1 200 OK\r\nX-Mixed: 1\nTransfer-Encoding: chunked\n\r\n2\r\nok\r\n0\r\n\r\n",
        ]
    )

    def answer(conn: RawConnection, request: bytes) -> None:
        conn.send(next(answers))

    async def main() -> None:
        with serve_each(answer) as upstream:
            pool = http.ConnectionPool()
            resp = await pool.request("GET", url(upstream), {})
            assert resp.headers["content-type"] == "application/json"
            assert await resp.read() == b"hi"
            resp = await pool.request("GET", url(upstream), {})
            assert resp.headers["x-mixed"] == "1"
            assert await resp.read() == b"ok"
            assert upstream.connections == 1
            await pool.close()

    run(main())


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\rContent-Length: 2\r\n\r\nhi",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nhi\n0\n\n",
    ],
    ids=["bare CR", "bare LF in chunk lines"],
)
def test_other_line_end_errors_stay_protocol_errors(answer: bytes) -> None:
    def handler(conn: RawConnection) -> None:
        conn.read_request()
        conn.send(answer)
        conn.read_request()

    async def main() -> None:
        with RawUpstream(handler) as upstream:
            pool = http.ConnectionPool()
            with pytest.raises(http.RemoteProtocolError, match="invalid HTTP") as info:
                resp = await pool.request("GET", url(upstream), {})
                await resp.read()
            assert not isinstance(info.value, http.ConnectionClosed)
            await pool.close()

    run(main())


# --------------------------------------------------------------------------- ends of connections


def test_a_reset_mid_body_of_a_close_delimited_answer_is_an_error() -> None:
    """Issue #12 item 2: a reset marked a close-delimited body complete: a truncated answer looked whole."""
    read_first = threading.Event()

    def handler(conn: RawConnection) -> None:
        conn.read_request()
        conn.send(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"choices": [')
        read_first.wait(10)
        conn.reset()

    async def main() -> None:
        with RawUpstream(handler) as upstream:
            pool = http.ConnectionPool()
            resp = await pool.request("GET", url(upstream), {})
            chunks = resp.iter_chunks()
            assert await anext(chunks) == b'{"choices": ['
            read_first.set()
            with pytest.raises(http.ConnectionClosed, match="reset the connection before the end"):
                await anext(chunks)
            await pool.close()

    run(main())


def test_a_clean_close_still_ends_a_close_delimited_body() -> None:
    def handler(conn: RawConnection) -> None:
        conn.read_request()
        conn.send(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        conn.close()

    async def main() -> None:
        with RawUpstream(handler) as upstream:
            pool = http.ConnectionPool()
            assert await (await pool.request("GET", url(upstream), {})).read() == b"all of it"
            await pool.close()

    run(main())


@pytest.mark.parametrize("end", ["close", "reset"])
def test_an_idle_connection_ended_before_the_loop_noticed_is_not_reused(end: str) -> None:
    """The server ends the idle connection; the loop is kept from processing that (it is blocked
    until the end is in the kernel), so only polling the socket can tell: one request upstream each."""
    ended = threading.Event()

    def handler(conn: RawConnection) -> None:
        if conn.read_request() is None:
            return
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        if upstream.connections == 1:
            getattr(conn, end)()
            ended.set()
            return
        while conn.read_request() is not None:
            conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    upstream = RawUpstream(handler)

    async def main() -> None:
        with upstream:
            pool = http.ConnectionPool()
            assert await (await pool.request("POST", url(upstream), {}, b"{}")).read() == b"ok"
            # Block the loop on purpose: the end reaches the socket, not the protocol.
            assert ended.wait(10)
            (idle,) = pool._idle[("http", "127.0.0.1", upstream.port)]
            assert idle.transport is not None
            waiting = select.poll()
            waiting.register(idle.transport.get_extra_info("socket").fileno(), select.POLLIN)
            assert waiting.poll(10_000)  # the end is in the kernel, and the loop has not run since
            assert not idle.closed
            resp = await pool.request("POST", url(upstream), {}, b"{}")
            assert await resp.read() == b"ok"
            assert len(upstream.requests) == 2 and upstream.connections == 2
            await pool.close()

    run(main())
