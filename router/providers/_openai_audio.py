"""OpenAI's audio API spoken natively (OpenAI, Azure OpenAI).

* Speech (``/audio/speech``): the JSON request passes on with ``model`` rewritten; the answer is
  audio (or, with ``stream_format: sse``, an event stream) and is relayed byte for byte as it
  arrives (:class:`AudioRelay`). It is priced by the characters of ``input``.
* Transcriptions and translations (``/audio/transcriptions``, ``/audio/translations``): the
  client's multipart upload is sent on as a new form with ``model`` rewritten; the answer (JSON,
  or text for ``text``/``srt``/``vtt``) passes through, read for its usage: ``usage.seconds``
  (``type: duration``), ``usage`` tokens (``type: tokens``), or ``verbose_json``'s ``duration``.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..audio._multipart import Upload, encode_form, form_fields
from ._base import (
    Operation,
    Payload,
    ProviderResponse,
    RequestContext,
    StreamTranslator,
    UpstreamRequest,
    Usage,
)

AUDIO_PATHS = {
    Operation.AUDIO_SPEECH: "/audio/speech",
    Operation.AUDIO_TRANSCRIPTION: "/audio/transcriptions",
    Operation.AUDIO_TRANSLATION: "/audio/translations",
}
AUDIO = frozenset(AUDIO_PATHS)
AUDIO_UPLOADS = frozenset({Operation.AUDIO_TRANSCRIPTION, Operation.AUDIO_TRANSLATION})


class AudioRelay(StreamTranslator):
    """Passes a speech answer's bytes on as they come; a body cut short fails in the HTTP client
    (a chunked body without its last chunk, a short Content-Length), which the dispatcher reports."""

    terminator = "the end of the audio body"

    def feed(self, data: bytes) -> list[Payload]:
        return [data] if data else []

    def flush(self) -> list[Payload]:
        self.complete = True  # the body ended where its framing said it would
        return []


def build_audio_request(
    url: str, headers: dict[str, str], body: dict[str, Any], ctx: RequestContext
) -> UpstreamRequest:
    """The upstream request of an audio operation; ``headers`` carry the credential already."""
    if ctx.operation is Operation.AUDIO_SPEECH:
        payload = orjson.dumps({**body, "model": ctx.upstream_model})
        return UpstreamRequest("POST", url, {"Content-Type": "application/json", **headers}, payload)
    uploads: dict[str, Upload] = getattr(body, "uploads", {})
    fields = [("model", ctx.upstream_model), *form_fields(body, frozenset(uploads) | {"model"})]
    content_type, payload = encode_form(fields, uploads)
    return UpstreamRequest("POST", url, {**headers, "Content-Type": content_type}, payload)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def transcription_usage(doc: Any) -> Usage | None:
    """What a transcription or translation answer says it used, if anything."""
    if not isinstance(doc, dict):
        return None
    usage = doc.get("usage")
    if isinstance(usage, dict):
        if usage.get("type") == "tokens":
            return Usage(
                prompt_tokens=int(_number(usage.get("input_tokens")) or 0),
                completion_tokens=int(_number(usage.get("output_tokens")) or 0),
            )
        seconds = _number(usage.get("seconds"))
        if usage.get("type") == "duration" and seconds is not None:
            return Usage(audio_seconds=seconds)
    duration = _number(doc.get("duration"))  # verbose_json
    return Usage(audio_seconds=duration) if duration is not None else None


def parse_audio_response(raw: bytes, ctx: RequestContext) -> ProviderResponse:
    """An audio answer as it came, with the usage a JSON one reports."""
    if ctx.operation not in AUDIO_UPLOADS or raw[:1] != b"{":
        return ProviderResponse(raw, None)
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ProviderResponse(raw, None)
    return ProviderResponse(raw, transcription_usage(doc))
