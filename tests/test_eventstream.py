"""The AWS event-stream decoder: framing, both CRCs, every header type, input split anywhere.

Frames come from the Bedrock fake's encoder, which is itself checked against botocore's
decoder and a published encoded example, so the two sides cannot share a mistake.
"""

from __future__ import annotations

import datetime as dt
import itertools
import struct
import uuid
import zlib
from typing import Any

import pytest
from botocore.eventstream import EventStreamBuffer
from hypothesis import given, settings
from hypothesis import strategies as st

from kubellm.router.providers._eventstream import EventMessage, EventStreamDecoder, EventStreamError
from tests.fakes.bedrock_upstream import encode_frame, event_frame, exception_frame

# Published in the Elixir `event_stream` package docs: {"foo": "bar"} with no headers, and with a
# content-type header (independent of both this project and botocore).
KNOWN = bytes(
    [
        0,
        0,
        0,
        30,
        0,
        0,
        0,
        0,
        186,
        242,
        246,
        138,
        123,
        34,
        102,
        111,
        111,
        34,
        58,
        32,
        34,
        98,
        97,
        114,
        34,
        125,
        174,
        114,
        88,
        228,
    ]
)
KNOWN_WITH_HEADER = bytes(
    [
        0,
        0,
        0,
        62,
        0,
        0,
        0,
        32,
        64,
        93,
        249,
        70,
        12,
        99,
        111,
        110,
        116,
        101,
        110,
        116,
        45,
        116,
        121,
        112,
        101,
        7,
        0,
        16,
        97,
        112,
        112,
        108,
        105,
        99,
        97,
        116,
        105,
        111,
        110,
        47,
        106,
        115,
        111,
        110,
        123,
        34,
        102,
        111,
        111,
        34,
        58,
        32,
        34,
        98,
        97,
        114,
        34,
        125,
        111,
        162,
        191,
        59,
    ]
)
ALL_TYPES: dict[str, Any] = {
    "t": True,
    "f": False,
    "b": ("byte", -7),
    "s": ("short", -300),
    "i": ("int", 70000),
    "l": ("long", -(2**40)),
    "bin": b"\x00\xffraw",
    "str": "héllo",
    "ts": dt.datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=dt.UTC),
    "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
}
STREAM = b"".join(
    [
        event_frame("messageStart", {"role": "assistant"}),
        event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Grüße, "}}),
        encode_frame(ALL_TYPES, b"\x00binary payload\xff"),
        event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "world"}}),
        encode_frame({}, b""),
        exception_frame("throttlingException", "Too many requests, please wait before trying again."),
    ]
)


def decode(pieces: list[bytes]) -> list[EventMessage]:
    decoder = EventStreamDecoder()
    out: list[EventMessage] = []
    for piece in pieces:
        out += decoder.feed(piece)
    decoder.close()
    return out


def test_published_examples_decode() -> None:
    assert decode([KNOWN]) == [EventMessage({}, b'{"foo": "bar"}')]
    assert decode([KNOWN_WITH_HEADER]) == [
        EventMessage({"content-type": "application/json"}, b'{"foo": "bar"}')
    ]
    # ...and the fake's encoder reproduces them byte for byte.
    assert encode_frame({}, b'{"foo": "bar"}') == KNOWN
    assert encode_frame({"content-type": "application/json"}, b'{"foo": "bar"}') == KNOWN_WITH_HEADER


def test_the_fakes_frames_agree_with_botocores_decoder() -> None:
    buffer = EventStreamBuffer()
    buffer.add_data(STREAM)
    theirs = [(dict(m.headers), m.payload) for m in buffer]
    ours = [(m.headers, m.payload) for m in decode([STREAM])]
    assert len(ours) == len(theirs) == 6
    for (our_headers, our_payload), (their_headers, their_payload) in zip(ours, theirs, strict=True):
        assert our_payload == their_payload
        assert set(our_headers) == set(their_headers)
        for name, value in their_headers.items():
            expected = our_headers[name]
            if isinstance(expected, dt.datetime):
                expected = int(expected.timestamp() * 1000)
            elif isinstance(expected, uuid.UUID):
                expected = expected.bytes
            assert expected == value, name


def test_every_header_type() -> None:
    message = decode([encode_frame(ALL_TYPES, b"x")])[0]
    assert message.headers == {
        "t": True,
        "f": False,
        "b": -7,
        "s": -300,
        "i": 70000,
        "l": -(2**40),
        "bin": b"\x00\xffraw",
        "str": "héllo",
        "ts": ALL_TYPES["ts"],
        "id": ALL_TYPES["id"],
    }
    first = decode([STREAM])[0]
    assert (first.message_type, first.event_type, first.exception_type) == ("event", "messageStart", None)
    last = decode([STREAM])[-1]
    assert (last.message_type, last.exception_type) == ("exception", "throttlingException")


def test_split_at_every_byte_boundary() -> None:
    whole = decode([STREAM])
    for i in range(len(STREAM) + 1):
        assert decode([STREAM[:i], STREAM[i:]]) == whole, f"split at byte {i}"
    assert decode([STREAM[i : i + 1] for i in range(len(STREAM))]) == whole


def test_messages_come_out_as_soon_as_they_are_complete() -> None:
    first = event_frame("messageStart", {"role": "assistant"})
    decoder = EventStreamDecoder()
    assert decoder.feed(first[:-1]) == [] and decoder.pending == len(first) - 1
    assert len(decoder.feed(first[-1:] + STREAM[:5])) == 1 and decoder.pending == 5


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_random_splits(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(STREAM)]
    assert decode([STREAM[a:b] for a, b in itertools.pairwise(points)]) == decode([STREAM])


HEADER_VALUES = st.one_of(
    st.booleans(),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.uuids(),
    st.tuples(st.just("byte"), st.integers(-128, 127)),
    st.tuples(st.just("short"), st.integers(-(2**15), 2**15 - 1)),
    st.tuples(st.just("int"), st.integers(-(2**31), 2**31 - 1)),
    st.tuples(st.just("long"), st.integers(-(2**63), 2**63 - 1)),
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=10), HEADER_VALUES, max_size=6), st.binary(max_size=300))
def test_any_message_round_trips(headers: dict[str, Any], payload: bytes) -> None:
    decoded = decode([encode_frame(headers, payload)])[0]
    assert decoded.payload == payload
    assert decoded.headers == {k: v[1] if isinstance(v, tuple) else v for k, v in headers.items()}


def test_corrupt_prelude_crc_fails_before_the_message_arrives() -> None:
    frame = bytearray(event_frame("messageStart", {"role": "assistant"}))
    frame[9] ^= 0x01
    with pytest.raises(EventStreamError, match="prelude CRC"):
        EventStreamDecoder().feed(bytes(frame[:12]))


@pytest.mark.parametrize("offset", [14, 40, -6, -1])
def test_corrupt_headers_payload_or_message_crc_fail(offset: int) -> None:
    frame = bytearray(event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "hi"}}))
    frame[offset] ^= 0x40
    with pytest.raises(EventStreamError, match="message CRC"):
        EventStreamDecoder().feed(bytes(frame))


def test_impossible_lengths_and_truncation_fail() -> None:
    for total, headers in ((8, 0), (2**30, 0), (20, 10)):
        prelude = struct.pack(">II", total, headers)
        with pytest.raises(EventStreamError):
            EventStreamDecoder().feed(prelude + struct.pack(">I", zlib.crc32(prelude)))
    decoder = EventStreamDecoder()
    decoder.feed(STREAM[:-3])
    with pytest.raises(EventStreamError, match="ended inside a message"):
        decoder.close()
    bad_type = encode_frame({"x": "y"}, b"")
    bad_type = bad_type[:14] + b"\x0a" + bad_type[15:]  # header value type 10 does not exist
    body = bad_type[:-4]
    with pytest.raises(EventStreamError, match="unknown value type"):
        EventStreamDecoder().feed(body + struct.pack(">I", zlib.crc32(body)))
