"""Streams that stop before their protocol's end event: an error event, never a made-up [DONE].

The upstreams are raw sockets that answer close-delimited (no Content-Length, no chunking), send a
few events and close cleanly, so that only the missing end event tells the stream is cut short.
"""

from __future__ import annotations

import http.client
import socket
import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import orjson
import pytest

from tests.support.servers import RouterProcess

MESSAGES: Any = [{"role": "user", "content": "tell me a story"}]


def _openai_events() -> list[bytes]:
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    deltas = [{"role": "assistant", "content": ""}, {"content": "Once upon"}, {"content": " a time there"}]
    return [
        b"data: "
        + orjson.dumps({**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]})
        + b"\n\n"
        for d in deltas
    ]


def _anthropic_events() -> list[bytes]:
    def event(name: str, doc: dict[str, Any]) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **doc}) + b"\n\n"

    message = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 9, "output_tokens": 1},
    }  # fmt: skip
    return [
        event("message_start", {"message": message}),
        event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Once upon"}}),
        event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": " a time there"}}),
    ]


class CutShort:
    """A raw-socket upstream: reads one request, streams ``events`` close-delimited, closes cleanly."""

    def __init__(self, events: list[bytes]) -> None:
        self.events = events
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.calls = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> CutShort:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    piece = conn.recv(65536)
                    if not piece:
                        break
                    head += piece
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = head.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in head else b""
                while len(body) < length:
                    body += conn.recv(65536)
                self.calls += 1
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                )
                for event in self.events:
                    conn.sendall(event)
                conn.shutdown(socket.SHUT_WR)  # a clean close: FIN, no reset


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[CutShort, CutShort]]:
    with CutShort(_openai_events()) as oa, CutShort(_anthropic_events()) as an:
        yield oa, an


def _config(upstreams: tuple[CutShort, CutShort], **extra: Any) -> dict[str, Any]:
    """One OpenAI-shaped and one Anthropic deployment on the cut-short upstreams, never retried."""
    oa, an = upstreams
    base = {"apiKey": "sk-cut-0123456789abcdef", **extra}
    return {
        "deployments": [
            {
                "model": "oa",
                "provider": "openai-compatible",
                "baseUrl": f"http://127.0.0.1:{oa.port}/v1",
                **base,
            },
            {"model": "an", "provider": "anthropic", "baseUrl": f"http://127.0.0.1:{an.port}", **base},
        ],
        "settings": {"numRetries": 0, "cooldown": {"failureThreshold": 1000}},
    }


@pytest.fixture(scope="module")
def router(upstreams: tuple[CutShort, CutShort]) -> Iterator[RouterProcess]:
    pricing = {"inputPerMillion": "1", "outputPerMillion": "1"}
    with RouterProcess(_config(upstreams, pricing=pricing)) as proc:
        yield proc


def _raw_stream(router: RouterProcess, path: str, body: dict[str, Any]) -> tuple[int, bytes, str]:
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=20)
    try:
        conn.request("POST", path, orjson.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("x-request-id") or ""
    finally:
        conn.close()


def _ledger(router: RouterProcess) -> dict[str, tuple[int, int, int]]:
    """request id -> (status, prompt tokens, completion tokens), read once the router flushed it."""
    router.stop()
    db = sqlite3.connect(router.dir / "state" / "ledger.sqlite")
    try:
        rows = db.execute("SELECT request_id, status, prompt_tokens, completion_tokens FROM usage").fetchall()
    finally:
        db.close()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


@pytest.mark.parametrize("model", ["oa", "an"])
def test_a_stream_closed_before_its_end_event_is_an_error_not_done(router: RouterProcess, model: str) -> None:
    """It was the partial events plus a [DONE] the router made up, recorded as a 200."""
    client = openai.OpenAI(base_url=router.v1, api_key="x", max_retries=0)
    stream = client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
    text = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            text.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    assert "".join(text) == "Once upon a time there"
    assert info.value.code == "upstream_stream_truncated"
    status, raw, request_id = _raw_stream(
        router, "/v1/chat/completions", {"model": model, "messages": MESSAGES, "stream": True}
    )
    assert status == 200 and b"[DONE]" not in raw
    last = orjson.loads(raw.strip().split(b"\n\n")[-1].removeprefix(b"data: "))
    assert set(last["error"]) == {"message", "type", "param", "code"}
    assert last["error"]["code"] == "upstream_stream_truncated"
    assert request_id


def test_messages_endpoint_gets_an_error_event_and_no_message_stop(router: RouterProcess) -> None:
    client = anthropic.Anthropic(base_url=router.base_url, api_key="x", max_retries=0)
    for model in ("oa", "an"):
        with (
            pytest.raises(anthropic.APIStatusError),  # the SDK raises on an `event: error`
            client.messages.stream(model=model, max_tokens=50, messages=MESSAGES) as stream,
        ):
            for _ in stream:
                pass
        status, raw, _ = _raw_stream(
            router, "/v1/messages", {"model": model, "max_tokens": 50, "messages": MESSAGES, "stream": True}
        )
        assert status == 200 and b"event: error" in raw and b"event: message_stop" not in raw
        assert b"Once upon" in raw


def test_the_ledger_records_a_failure_with_the_tokens_that_flowed(
    upstreams: tuple[CutShort, CutShort],
) -> None:
    with RouterProcess(_config(upstreams)) as router:
        ids = {
            model: _raw_stream(
                router, "/v1/chat/completions", {"model": model, "messages": MESSAGES, "stream": True}
            )[2]
            for model in ("oa", "an")
        }
        records = _ledger(router)
    status, prompt, completion = records[ids["oa"]]
    assert status == 502 and prompt > 0 and completion > 0  # estimated from what was relayed
    status, prompt, completion = records[ids["an"]]
    assert status == 502 and prompt > 0 and completion > 0
