"""SSE framing and parsing, with input split at every byte boundary."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from kubellm.router._sse import DONE, SSEDecoder, frame, frame_named
from kubellm.router.providers._openai_shaped import OpenAIPassthroughTranslator

STREAM = (
    b": keep-alive comment\r\n\r\n"
    b'data: {"id":"1","choices":[{"index":0,"delta":{"content":"Hel"}}]}\r\n\r\n'
    b"event: custom\n"
    b'data: {"id":"2",\n'
    b'data: "x":1}\n\n'
    b'data:{"id":"3","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\r\r'
    b"data: [DONE]\n\n"
)


def _decode(parts: list[bytes]) -> list[tuple[str | None, bytes]]:
    decoder = SSEDecoder()
    events = []
    for part in parts:
        events += decoder.feed(part)
    events += decoder.close()
    return [(e.event, e.data) for e in events]


def test_decoder_reads_every_field_and_line_ending() -> None:
    assert _decode([STREAM]) == [
        (None, b'{"id":"1","choices":[{"index":0,"delta":{"content":"Hel"}}]}'),
        ("custom", b'{"id":"2",\n"x":1}'),
        (None, b'{"id":"3","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}'),
        (None, b"[DONE]"),
    ]


def test_decoder_at_every_single_split_point() -> None:
    whole = _decode([STREAM])
    for i in range(len(STREAM) + 1):
        assert _decode([STREAM[:i], STREAM[i:]]) == whole, i


def test_decoder_byte_by_byte() -> None:
    assert _decode([STREAM[i : i + 1] for i in range(len(STREAM))]) == _decode([STREAM])


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_decoder_at_any_set_of_split_points(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    parts = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    assert _decode(parts) == _decode([STREAM])


def test_passthrough_translator_at_every_split_point() -> None:
    def run(parts: list[bytes], include_usage: bool) -> tuple[list[bytes], int | None]:
        translator = OpenAIPassthroughTranslator(include_usage)
        out: list[bytes] = []
        for part in parts:
            out += [p for p in translator.feed(part) if isinstance(p, bytes)]
        out += [p for p in translator.finish() if isinstance(p, bytes)]
        return out, translator.usage.total_tokens if translator.usage else None

    whole, usage = run([STREAM], True)
    assert usage == 7
    assert b"[DONE]" not in b"".join(whole)
    assert len(whole) == 3
    hidden, usage_hidden = run([STREAM], False)
    assert usage_hidden == 7 and len(hidden) == 2  # the usage-only chunk is not forwarded
    for i in range(len(STREAM) + 1):
        assert run([STREAM[:i], STREAM[i:]], True) == (whole, 7), i


def test_frames() -> None:
    assert frame({"a": 1}) == b'data: {"a":1}\n\n'
    assert frame(b"{}") == b"data: {}\n\n"
    assert frame_named("ping", {"type": "ping"}) == b'event: ping\ndata: {"type":"ping"}\n\n'
    assert DONE == b"data: [DONE]\n\n"
    assert orjson.loads(frame({"x": "é"})[6:-2]) == {"x": "é"}
