"""A real router process between the `openai` SDK and raw-socket upstreams that compress, send
oversized or bare-LF heads, break HTTP, reset, or drop a request on a reused connection (issue #12,
items 2 to 6). Each failure is a 502 with its own code, and the router keeps serving."""

from __future__ import annotations

import contextlib
import gzip
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import brotli
import openai
import orjson
import pytest

from tests.support.raw_upstream import RawConnection, RawUpstream
from tests.support.servers import RouterProcess

MESSAGES: Any = [{"role": "user", "content": "hi"}]
ANSWER = "a compressed hello " * 50


def completion(content: str = ANSWER) -> bytes:
    return orjson.dumps(
        {
            "id": "c1",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        }
    )


def sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def stream_events(words: list[str]) -> list[bytes]:
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def event(delta: dict[str, str], finish: str | None = None) -> bytes:
        return sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    events = [event({"role": "assistant"}), *(event({"content": w}) for w in words), event({}, "stop")]
    return [*events, b"data: [DONE]\n\n"]


def response(body: bytes, coding: bytes | None = None, ctype: bytes = b"application/json") -> bytes:
    encoding = b"Content-Encoding: %s\r\n" % coding if coding else b""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\n%sContent-Length: %d\r\n\r\n"
    return head % (ctype, encoding, len(body)) + body


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Flusher:
    """A streaming compressor for ``coding`` whose flush ends a piece the decoder can use at once."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        if coding == "gzip":
            self._z = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
        else:
            self._br = brotli.Compressor()

    def piece(self, data: bytes) -> bytes:
        if self.coding == "gzip":
            return self._z.compress(data) + self._z.flush(zlib.Z_SYNC_FLUSH)
        return bytes(self._br.process(data)) + bytes(self._br.flush())

    def end(self) -> bytes:
        return self._z.flush() if self.coding == "gzip" else bytes(self._br.finish())


COMPRESS: dict[str, Callable[[bytes], bytes]] = {"gzip": gzip.compress, "br": brotli.compress}


@pytest.fixture
def router_for() -> Iterator[Callable[..., RouterProcess]]:
    started: list[RouterProcess] = []

    def start(upstream: RawUpstream, retries: int = 0, **deployment: Any) -> RouterProcess:
        base = {"model": "m", "provider": "openai-compatible", "baseUrl": f"{upstream.base_url}/v1"}
        config = {
            "deployments": [{**base, **deployment}, {"model": "mock", "provider": "mock"}],
            "settings": {"numRetries": retries},
        }
        proc = RouterProcess(config)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        logs = proc.logs()
        proc.stop()
        assert "unhandled error" not in logs and "Exception in ASGI application" not in logs, logs[-3000:]


def ledger(router: RouterProcess) -> list[tuple[int, int, int]]:
    """(status, prompt tokens, completion tokens) of each request to model ``m``; stops the router."""
    router.stop()  # the ledger is flushed on the way out
    with contextlib.closing(sqlite3.connect(router.dir / "state" / "ledger.sqlite")) as db:
        rows = db.execute(
            "SELECT status, prompt_tokens, completion_tokens FROM usage WHERE model_group = 'm' ORDER BY ts"
        )
        return [tuple(row) for row in rows]


def client(router: RouterProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.v1, api_key="x", max_retries=0, timeout=20)


def assert_alive(router: RouterProcess) -> None:
    assert router.proc is not None and router.proc.poll() is None, router.logs()[-2000:]
    answer = client(router).chat.completions.create(model="mock", messages=MESSAGES)
    assert answer.choices


def every_request(answer: Callable[[RawConnection, bytes], None]) -> RawUpstream:
    def handler(conn: RawConnection) -> None:
        while (request := conn.read_request()) is not None:
            answer(conn, request)

    return RawUpstream(handler)


def expect_502(router: RouterProcess, code: str, stream: bool = False) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        client(router).chat.completions.create(model="m", messages=MESSAGES, stream=stream)
    assert info.value.status_code == 502, info.value.body
    assert info.value.code == code, info.value.body
    return info.value


# --------------------------------------------------------------------------- compressed answers


@pytest.mark.parametrize("coding", ["gzip", "br"])
def test_a_compressed_answer_is_decoded(coding: str, router_for: Callable[..., RouterProcess]) -> None:
    """Issue #12 item 3: a gzip or br answer was a 502 "not JSON"."""
    with every_request(lambda c, _: c.send(response(COMPRESS[coding](completion()), coding.encode()))) as up:
        router = router_for(up)
        answer = client(router).chat.completions.create(model="m", messages=MESSAGES)
        assert answer.choices[0].message.content == ANSWER
        assert answer.usage is not None and answer.usage.completion_tokens == 4
        assert b"\r\nAccept-Encoding: gzip, deflate, br\r\n" in up.requests[0]
        assert ledger(router) == [(200, 3, 4)]


@pytest.mark.parametrize("coding", ["gzip", "br"])
def test_a_compressed_stream_is_decoded_event_by_event(
    coding: str, router_for: Callable[..., RouterProcess]
) -> None:
    """Issue #12 item 3: a compressed stream reached the client empty. The pieces here cut events in
    two, and the second half waits until the SDK has the first word: decoding must be incremental."""
    words = [f"w{i} " for i in range(30)]
    events = b"".join(stream_events(words))
    first_word = threading.Event()
    waited: list[bool] = []

    def answer(conn: RawConnection, request: bytes) -> None:
        conn.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: %s\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" % coding.encode()
        )
        flusher = Flusher(coding)
        cut = events.index(b"w1 ") - 10  # the first word whole, the second cut mid-event
        conn.send(http_chunk(flusher.piece(events[:cut])))
        waited.append(first_word.wait(10))
        for start in range(cut, len(events), 97):
            conn.send(http_chunk(flusher.piece(events[start : start + 97])))
        conn.send(http_chunk(flusher.end()) + b"0\r\n\r\n")

    with every_request(answer) as up:
        router = router_for(up)
        got: list[str] = []
        for chunk in client(router).chat.completions.create(model="m", messages=MESSAGES, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
                first_word.set()
        assert "".join(got) == "".join(words)
        assert waited == [True]
        assert [status for status, *_ in ledger(router)] == [200]


@pytest.mark.parametrize("coding", [b"zstd", b"compress", b"gzip, br"])
def test_an_unsupported_coding_is_a_502_with_its_code(
    coding: bytes, router_for: Callable[..., RouterProcess]
) -> None:
    with every_request(lambda c, _: c.send(response(b"\x28\xb5\x2f\xfd" + b"?" * 20, coding))) as up:
        router = router_for(up)
        error = expect_502(router, "upstream_bad_encoding")
        assert "content coding" in error.message
        assert_alive(router)
        assert ledger(router) == [(502, 0, 0)]


def test_a_deployment_may_set_its_own_accept_encoding(router_for: Callable[..., RouterProcess]) -> None:
    with every_request(lambda c, _: c.send(response(completion()))) as up:
        router = router_for(up, headers={"Accept-Encoding": "identity"})
        client(router).chat.completions.create(model="m", messages=MESSAGES)
        head = up.requests[0].lower()
        assert head.count(b"accept-encoding:") == 1 and b"\r\naccept-encoding: identity\r\n" in head


def test_a_corrupt_gzip_answer_is_a_502(router_for: Callable[..., RouterProcess]) -> None:
    packed = gzip.compress(completion())
    corrupt = packed[:15] + bytes(b ^ 0x5A for b in packed[15:40]) + packed[40:]
    with every_request(lambda c, _: c.send(response(corrupt, b"gzip"))) as up:
        router = router_for(up)
        expect_502(router, "upstream_bad_encoding")
        assert_alive(router)
        assert ledger(router) == [(502, 0, 0)]


def test_a_corrupt_gzip_stream_is_an_error_event(router_for: Callable[..., RouterProcess]) -> None:
    events = stream_events(["fine ", "words "])
    flusher = Flusher("gzip")
    words_seen = threading.Event()

    def answer(conn: RawConnection, request: bytes) -> None:
        conn.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        conn.send(http_chunk(flusher.piece(b"".join(events[:3]))))
        words_seen.wait(10)  # the stream has begun at the client: what follows must be an error event
        conn.send(http_chunk(b"\xff" * 64) + b"0\r\n\r\n")  # bytes that are no deflate stream

    with every_request(answer) as up:
        router = router_for(up)
        got: list[str] = []
        stream = client(router).chat.completions.create(model="m", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError) as info:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    got.append(chunk.choices[0].delta.content)
                    if len(got) == 2:
                        words_seen.set()
        assert "".join(got) == "fine words "
        assert "gzip body is corrupt" in info.value.message
        assert_alive(router)
        ((status, *_),) = ledger(router)
        assert status >= 500  # recorded as a failure, not a success


# --------------------------------------------------------------------------- heads and HTTP


def test_an_endless_upstream_head_is_a_502_and_the_router_keeps_serving(
    router_for: Callable[..., RouterProcess],
) -> None:
    """Issue #12 item 4: a 64 MiB header was read whole (7.9 s, 62 MiB more RSS)."""
    sent = [0]

    def handler(conn: RawConnection) -> None:
        conn.read_request()
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Endless: ")
        while sent[0] < 64 << 20:  # until the router hangs up (sendall then fails)
            conn.send(b"a" * 65536)
            sent[0] += 65536

    with RawUpstream(handler) as up:
        router = router_for(up)
        expect_502(router, "upstream_head_too_large")
        assert sent[0] < 64 << 20  # cut off long before the 64 MiB the issue saw accepted
        assert_alive(router)
        assert ledger(router) == [(502, 0, 0)]


def test_an_answer_with_bare_lf_line_ends_is_served(router_for: Callable[..., RouterProcess]) -> None:
    """Issue #12 item 5: RFC 9112 §2.2 lets a recipient accept a bare LF; it was refused."""
    body = completion()
    head = b"HTTP/1.1 200 OK\nContent-Type: application/json\nContent-Length: %d\n\n" % len(body)
    with every_request(lambda c, _: c.send(head + body)) as up:
        router = router_for(up)
        answer = client(router).chat.completions.create(model="m", messages=MESSAGES)
        assert answer.choices[0].message.content == ANSWER


def test_invalid_http_on_an_open_connection_is_a_protocol_error_not_a_connect_error(
    router_for: Callable[..., RouterProcess],
) -> None:
    """Issue #12 item 5: a server that answers garbage was reported as upstream_connect_error."""
    with every_request(lambda c, _: c.send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")) as up:
        router = router_for(up)
        error = expect_502(router, "upstream_protocol_error")
        assert "invalid HTTP" in error.message


# --------------------------------------------------------------------------- ends of connections


def test_a_reset_mid_close_delimited_answer_is_a_502_not_a_truncated_200(
    router_for: Callable[..., RouterProcess],
) -> None:
    """Issue #12 item 2: a reset ended a close-delimited body as if the server had finished it."""
    body = completion()

    def handler(conn: RawConnection) -> None:
        conn.read_request()
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + body[: len(body) // 2])
        time.sleep(0.3)  # the router reads the head and half the body before the reset
        conn.reset()

    with RawUpstream(handler) as up:
        router = router_for(up)
        expect_502(router, "upstream_connection_closed")
        assert_alive(router)
        assert ledger(router) == [(502, 0, 0)]


def drops_the_second_request(conn: RawConnection) -> None:
    """Answers the first request of a connection, reads the next whole, and closes without a byte."""
    if conn.read_request() is None:
        return
    conn.send(response(completion()))
    if conn.upstream.connections == 1 and conn.read_request() is not None:
        conn.close()
        return
    while conn.read_request() is not None:
        conn.send(response(completion()))


def test_a_request_dropped_on_a_reused_connection_reaches_the_upstream_once(
    router_for: Callable[..., RouterProcess],
) -> None:
    """Issue #12 item 6: the client resent it on a new connection, a second billable call."""
    with RawUpstream(drops_the_second_request) as up:
        router = router_for(up, retries=0)
        client(router).chat.completions.create(model="m", messages=MESSAGES)
        error = expect_502(router, "upstream_connection_closed")
        assert "not resent" in error.message
        assert len(up.requests) == 2  # one per call: the dropped one was not sent again
        assert ledger(router) == [(200, 3, 4), (502, 0, 0)]


def test_the_configured_retry_is_the_one_that_resends_and_it_is_counted(
    router_for: Callable[..., RouterProcess],
) -> None:
    with RawUpstream(drops_the_second_request) as up:
        router = router_for(up, retries=1)
        client(router).chat.completions.create(model="m", messages=MESSAGES)
        raw = client(router).chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
        assert raw.parse().choices[0].message.content == ANSWER
        assert raw.headers["x-kubellm-attempts"] == "2"
        assert len(up.requests) == 3
        assert ledger(router) == [(200, 3, 4), (200, 3, 4)]


def test_an_idle_connection_the_upstream_closed_is_replaced_without_an_error(
    router_for: Callable[..., RouterProcess],
) -> None:
    closed = threading.Event()

    def handler(conn: RawConnection) -> None:
        if conn.read_request() is not None:
            conn.send(response(completion()))  # keep-alive by default, then closed while idle
            conn.close()
            closed.set()

    with RawUpstream(handler) as up:
        router = router_for(up, retries=0)
        for _ in range(2):
            closed.clear()
            raw = client(router).chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
            assert raw.headers["x-kubellm-attempts"] == "1"
            assert closed.wait(10)
        assert len(up.requests) == 2 and up.connections == 2
