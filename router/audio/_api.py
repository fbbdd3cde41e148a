"""``POST /v1/audio/speech``, ``/v1/audio/transcriptions`` and ``/v1/audio/translations`` as
inbound APIs of the core: the same auth, key access, limits, budgets, retries, fallbacks,
ledger and metrics as chat.

Speech is always dispatched as a stream: the upstream's audio bytes reach the client as they
arrive, never buffered whole. If the upstream fails part-way the response is cut off (its chunked
framing never ends), which every HTTP client reports as an incomplete body rather than a short
file. Transcriptions and translations are multipart uploads, read whole (up to
``settings.maxUploadBytes``, else a 413 naming ``file``) so that a retry or a fallback can send
them again; their answers pass through in the format the client asked for.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.responses import Response, StreamingResponse

from .._errors import InvalidRequestError
from ..core._outcome import Answer, Outcome, Stream, StreamError, StreamEvent
from ..inbound._base import JSON, SSE, InboundApi, Requested
from ..providers import Operation, Usage
from ._multipart import UploadBody, read_form

if TYPE_CHECKING:
    from ..config._schema import RouterSettings
    from ..core._dispatch import Call
    from ..server._inbound import Inbound

__all__ = ["SpeechApi", "TranscriptionApi", "audio_usage"]

#: OpenAI's speech formats and the media types its API answers them with.
SPEECH_MEDIA = {
    "mp3": "audio/mpeg",
    "opus": "audio/opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
TRANSCRIPT_FORMATS = frozenset({"json", "text", "srt", "verbose_json", "vtt", "diarized_json"})
_TEXT = "text/plain; charset=utf-8"


def _bad(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required and must be a non-empty string", "model")
    return model


class AudioStreamBroken(Exception):
    """Raised into the HTTP server mid-answer: it closes the connection, so the client sees an
    incomplete body instead of a clean end of a shorter file."""


async def _relay(events: AsyncIterator[StreamEvent]) -> AsyncIterator[bytes]:
    async for batch in events:
        if isinstance(batch, StreamError):
            raise AudioStreamBroken(batch.error.message)
        yield b"".join(p if isinstance(p, bytes) else p.data for p in batch)


class SpeechApi(InboundApi):
    """``POST /v1/audio/speech``: text in, audio relayed out."""

    operation = Operation.AUDIO_SPEECH

    def validate(self, body: dict[str, Any]) -> Requested:
        model = _model(body)
        text = body.get("input")
        if not isinstance(text, str) or not text:
            raise _bad("'input' is required and must be a non-empty string", "input")
        voice = body.get("voice")
        custom = voice.get("id") if isinstance(voice, dict) else None
        if not (isinstance(voice, str) and voice) and not (isinstance(custom, str) and custom):
            raise _bad("'voice' is required: a voice name, or an object with an 'id'", "voice")
        fmt = body.get("response_format", "mp3")
        if not isinstance(fmt, str) or fmt not in SPEECH_MEDIA:  # a dict is unhashable: no 500
            raise _bad(f"'response_format' must be one of {', '.join(SPEECH_MEDIA)}", "response_format")
        speed = body.get("speed", 1.0)
        if isinstance(speed, bool) or not isinstance(speed, int | float) or not 0.25 <= speed <= 4.0:
            raise _bad("'speed' must be a number from 0.25 to 4.0", "speed")
        if not isinstance(body.get("instructions", ""), str):
            raise _bad("'instructions' must be a string", "instructions")
        if body.get("stream_format", "audio") not in ("audio", "sse"):
            raise _bad("'stream_format' must be 'audio' or 'sse'", "stream_format")
        # A stream whatever the client asked: the answer is relayed as it arrives.
        return Requested(model=model, stream=True)

    def render(self, outcome: Outcome, call: Call) -> Response:
        sse = call.body.get("stream_format") == "sse"
        media = SSE if sse else SPEECH_MEDIA.get(str(call.body.get("response_format", "mp3")), "audio/mpeg")
        if isinstance(outcome, Stream):
            return StreamingResponse(_relay(outcome.events), media_type=media, headers=outcome.headers)
        if isinstance(outcome, Answer):
            return Response(outcome.body, media_type=media, headers=outcome.headers)
        return self.render_error(outcome.error, outcome.headers)


class TranscriptionApi(InboundApi):
    """``POST /v1/audio/transcriptions`` and ``/v1/audio/translations``: a multipart upload."""

    def __init__(self, operation: Operation) -> None:
        self.operation = operation  # type: ignore[misc]  # one instance per route

    async def read_body(self, inbound: Inbound, settings: RouterSettings) -> dict[str, Any]:
        return UploadBody.of(await read_form(inbound, settings.max_upload_bytes))

    def validate(self, body: dict[str, Any]) -> Requested:
        uploads = getattr(body, "uploads", {})
        if "file" not in uploads:
            raise _bad("'file' is required: the audio to transcribe, as a file part", "file")
        if not uploads["file"].data:
            raise _bad("'file' is empty", "file")
        model = _model(body)
        fmt = body.get("response_format", "json")
        if not isinstance(fmt, str) or fmt not in TRANSCRIPT_FORMATS:  # a repeated field is a list
            raise _bad(
                f"'response_format' must be one of {', '.join(sorted(TRANSCRIPT_FORMATS))}", "response_format"
            )
        temperature = body.get("temperature")
        if temperature is not None:
            try:
                ok = 0.0 <= float(temperature) <= 1.0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise _bad("'temperature' must be a number from 0 to 1", "temperature")
        stream = body.get("stream", "false")
        if stream != "false":
            raise _bad("'stream' is not supported on this endpoint by the router; leave it unset", "stream")
        return Requested(model=model)

    def render(self, outcome: Outcome, call: Call) -> Response:
        if isinstance(outcome, Answer):
            fmt = call.body.get("response_format", "json")
            media = JSON if fmt in ("json", "verbose_json", "diarized_json") else _TEXT
            return Response(outcome.body, media_type=media, headers=outcome.headers)
        if isinstance(outcome, Stream):  # never: uploads are not streamed
            return StreamingResponse(_relay(outcome.events), media_type=_TEXT, headers=outcome.headers)
        return self.render_error(outcome.error, outcome.headers)


def wav_seconds(data: bytes) -> float | None:
    """The duration of a PCM WAV file from its header (``fmt`` byte rate, ``data`` size), if it is one."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, byte_rate = 12, 0
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if chunk == b"fmt " and size >= 16:
            byte_rate = int.from_bytes(data[pos + 16 : pos + 20], "little")
        elif chunk == b"data":
            # A streamed WAV may declare a placeholder size: what was uploaded bounds it.
            size = min(size, len(data) - pos - 8)
            return size / byte_rate if byte_rate else None
        pos += 8 + size + (size & 1)
    return None


def audio_usage(call: Call) -> Usage:
    """What an audio request used when the upstream did not say: speech is billed by the
    characters of its input (exact, not an estimate). A transcription whose answer carries no
    duration (``text``, ``srt``, ``vtt``) is priced by the duration a WAV upload's header gives,
    marked estimated; any other is unpriced (and marked estimated)."""
    if call.operation is Operation.AUDIO_SPEECH:
        text = call.body.get("input")
        return Usage(characters=len(text) if isinstance(text, str) else 0)
    upload = getattr(call.body, "uploads", {}).get("file")
    seconds = wav_seconds(upload.data) if upload is not None else None
    return Usage(audio_seconds=seconds or 0.0, estimated=True)
