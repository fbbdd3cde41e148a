"""The multipart codec and audio pricing, without servers."""

from __future__ import annotations

from decimal import Decimal

import pytest

from kubellm.router._errors import InvalidRequestError, PayloadTooLargeError
from kubellm.router.audio._multipart import MAX_FIELD_BYTES, Upload, UploadBody, encode_form, parse_form
from kubellm.router.config._schema import Pricing
from kubellm.router.metering._pricing import price_for, usage_cost
from kubellm.router.providers import Usage
from kubellm.router.providers._openai_audio import transcription_usage


def test_a_form_round_trips() -> None:
    upload = Upload('we"ird\r\nname.wav', "audio/wav", b"\r\n--not-a-boundary\r\n" + bytes(range(256)))
    fields = [
        ("model", "whisper-1"),
        ("timestamp_granularities[]", "word"),
        ("timestamp_granularities[]", "segment"),
    ]
    content_type, raw = encode_form(fields, {"file": upload})
    form = parse_form(raw, content_type)
    assert form.fields == fields
    assert form.files["file"].data == upload.data
    body = UploadBody.of(form)
    assert body["timestamp_granularities[]"] == ["word", "segment"]
    assert body["file"] == {
        "filename": form.files["file"].filename,
        "content_type": "audio/wav",
        "bytes": len(upload.data),
    }
    assert body.uploads["file"].data == upload.data


@pytest.mark.parametrize(
    ("raw", "content_type", "param"),
    [
        (b"", None, "Content-Type"),
        (b"{}", "application/json", "Content-Type"),
        (b"--b\r\n", "multipart/form-data", "Content-Type"),
        (
            b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\nx',
            "multipart/form-data; boundary=b",
            "file",
        ),
        (b"--b\r\nX: y\r\n\r\nx\r\n--b--\r\n", "multipart/form-data; boundary=b", "file"),
        (b"nothing here", "multipart/form-data; boundary=b", "file"),
    ],
)
def test_malformed_forms_name_the_field(raw: bytes, content_type: str | None, param: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        parse_form(raw, content_type)
    assert err.value.param == param


def test_an_oversized_text_field_is_a_413_naming_it() -> None:
    content_type, raw = encode_form([("prompt", "x" * (MAX_FIELD_BYTES + 1))], {})
    with pytest.raises(PayloadTooLargeError) as err:
        parse_form(raw, content_type)
    assert err.value.param == "prompt"


def test_audio_is_priced_per_character_and_second() -> None:
    tts = price_for("tts-1")
    assert tts is not None
    assert usage_cost(Usage(characters=1000), tts) == Decimal("0.015")
    whisper = price_for("whisper-1", Pricing(per_second=Decimal("0.0002")))
    assert whisper is not None
    assert usage_cost(Usage(audio_seconds=2.5), whisper) == Decimal("0.0005")
    custom = price_for("my-own-tts", Pricing(per_million_characters=Decimal("10")))
    assert custom is not None and usage_cost(Usage(characters=100), custom) == Decimal("0.001")
    assert price_for("my-own-tts") is None


def test_transcription_usage_shapes() -> None:
    assert transcription_usage({"text": "x", "usage": {"type": "duration", "seconds": 3}}) == Usage(
        audio_seconds=3.0
    )
    assert transcription_usage({"text": "x", "duration": 8.47}) == Usage(audio_seconds=8.47)
    tokens = {"type": "tokens", "input_tokens": 14, "output_tokens": 45, "total_tokens": 59}
    assert transcription_usage({"text": "x", "usage": tokens}) == Usage(
        prompt_tokens=14, completion_tokens=45
    )
    assert transcription_usage({"text": "x", "duration": True}) is None
    assert Usage(audio_seconds=float("nan")).audio_seconds == 0.0


def test_a_wav_header_gives_the_duration() -> None:
    from kubellm.router.audio._api import wav_seconds

    fmt = (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + (16000).to_bytes(4, "little")
    fmt += (32000).to_bytes(4, "little") + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
    pcm = b"\0" * 48000  # 1.5 s of 16 kHz 16-bit mono
    wav = b"RIFF" + (36 + len(pcm)).to_bytes(4, "little") + b"WAVE"
    wav += b"fmt " + (16).to_bytes(4, "little") + fmt + b"data" + len(pcm).to_bytes(4, "little") + pcm
    assert wav_seconds(wav) == 1.5
    assert wav_seconds(wav[:-24000]) == 0.75  # a truncated upload: what arrived
    assert wav_seconds(b"ID3 not a wav") is None
    assert wav_seconds(b"RIFF\xff\xff\xff\xffWAVE") is None
