"""OpenAI's audio API through the router, with the real openai SDK: speech relayed as it arrives,
transcriptions and translations as size-limited multipart uploads, on OpenAI and Azure OpenAI
deployments, priced per character and per second in the ledger."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import MASTER_KEY, UPSTREAM_KEY
from tests.fakes.openai_platform import CHUNK, FakePlatform
from tests.support.servers import RouterProcess, http_get

AZURE_UPSTREAM_KEY = "az-upstream-key-0123456789"
KEY_A = "sk-audio-a-0123456789"
KEY_B = "sk-audio-b-0123456789"
API_VERSION = "2024-06-01"


def _wav(seconds: int) -> bytes:
    """A PCM WAV file: 16 kHz, 16-bit, mono (the fakes do not decode it; the router reads its header)."""
    fmt = (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + (16000).to_bytes(4, "little")
    fmt += (32000).to_bytes(4, "little") + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
    pcm = bytes(range(256)) * (125 * seconds)
    head = b"RIFF" + (36 + len(pcm)).to_bytes(4, "little") + b"WAVE" + b"fmt " + (16).to_bytes(4, "little")
    return head + fmt + b"data" + len(pcm).to_bytes(4, "little") + pcm


#: One second of audio.
AUDIO = _wav(1)


@pytest.fixture
def fake_oa() -> Iterator[FakePlatform]:
    with FakePlatform(UPSTREAM_KEY, "openai", name="oa") as fake:
        yield fake


@pytest.fixture
def fake_az() -> Iterator[FakePlatform]:
    with FakePlatform(AZURE_UPSTREAM_KEY, "azure", name="az", seconds=12.0) as fake:
        yield fake


@pytest.fixture
def router(
    fake_oa: FakePlatform, fake_az: FakePlatform, start_router: Callable[..., RouterProcess]
) -> RouterProcess:
    def oa(name: str, model: str, upstream: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "model": model,
            "provider": "openai",
            "upstreamModel": upstream,
            "baseUrl": fake_oa.base_url,
            "apiKeyEnv": "TEST_UPSTREAM_KEY",
            **extra,
        }

    def az(name: str, model: str, upstream: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "model": model,
            "provider": "azure",
            "upstreamModel": upstream,
            "baseUrl": fake_az.base_url,
            "apiVersion": API_VERSION,
            "apiKeyEnv": "AZ_UPSTREAM_KEY",
            **extra,
        }

    config = {
        "deployments": [
            oa("oa-tts", "tts", "tts-1"),
            oa("oa-whisper", "whisper", "whisper-1"),
            az("az-tts", "az-tts", "tts-dep", pricing={"perMillionCharacters": "20"}),
            az("az-whisper", "az-whisper", "whisper-dep", pricing={"perSecond": "0.001"}),
            {"name": "chat-only", "model": "chat-only", "provider": "mock"},
        ],
        "keys": [
            {"name": "a", "keyEnv": "KEY_A"},
            {"name": "b", "keyEnv": "KEY_B", "models": ["tts"]},
        ],
        "settings": {"numRetries": 1, "initialBackoffSeconds": 0.01, "maxUploadBytes": 64 * 1024},
    }
    env = {
        "KUBELLM_MASTER_KEY": MASTER_KEY,
        "AZ_UPSTREAM_KEY": AZURE_UPSTREAM_KEY,
        "KEY_A": KEY_A,
        "KEY_B": KEY_B,
    }
    return start_router(config, env=env)


def _client(router: RouterProcess, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.v1, api_key=key, max_retries=0)


def _azure(router: RouterProcess) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=router.base_url, api_key=KEY_A, api_version=API_VERSION, max_retries=0
    )


def _spend(router: RouterProcess) -> dict[str, Any]:
    status, body = http_get(
        router.base_url + "/admin/spend?by=deployment", {"Authorization": f"Bearer {MASTER_KEY}"}
    )
    assert status == 200, body
    groups: dict[str, Any] = orjson.loads(body)["groups"]
    return groups


@pytest.mark.covers("openai", "audio_speech")
def test_speech_is_relayed_as_it_arrives(router: RouterProcess, fake_oa: FakePlatform) -> None:
    """The fake holds back all but the first chunk until the client has read that chunk through
    the router: a router that buffered the answer would only deliver after the fake's timeout."""
    fake_oa.gate = threading.Event()
    text = "Hello from the router."
    with _client(router).audio.speech.with_streaming_response.create(
        model="tts", voice="alloy", input=text, response_format="wav"
    ) as response:
        assert response.headers["content-type"] == "audio/wav"
        assert response.headers["x-kubellm-deployment"] == "oa-tts"
        received = b""
        chunks = response.iter_bytes()
        while len(received) < len(CHUNK):
            received += next(chunks)
        fake_oa.gate.set()
        received += b"".join(chunks)
    assert fake_oa.gate_opened is True, "the first chunk reached the client only after the fake's timeout"
    assert received == CHUNK * fake_oa.speech_chunks
    seen = fake_oa.seen[-1]
    assert seen.path == "/v1/audio/speech"
    assert seen.body == {"model": "tts-1", "voice": "alloy", "input": text, "response_format": "wav"}
    # tts-1 at the shipped $15 per million characters.
    assert Decimal(_spend(router)["oa-tts"]["spendUsd"]) == Decimal(15) * len(text) / 1_000_000


def test_speech_retries_an_upstream_error(router: RouterProcess, fake_oa: FakePlatform) -> None:
    fake_oa.faults = [503]
    audio = _client(router).audio.speech.create(model="tts", voice="alloy", input="again")
    assert audio.content == CHUNK * fake_oa.speech_chunks
    assert fake_oa.requests["/v1/audio/speech"] == 2


def test_speech_cut_off_upstream_is_not_a_clean_end(router: RouterProcess, fake_oa: FakePlatform) -> None:
    """A broken upstream must not look like a shorter, complete file to the client."""
    fake_oa.cut_after = 2
    with pytest.raises((httpx.RemoteProtocolError, openai.APIConnectionError)):
        _client(router).audio.speech.create(model="tts", voice="alloy", input="cut").read()


def test_speech_validation_names_the_field(router: RouterProcess) -> None:
    client = _client(router)
    with pytest.raises(openai.BadRequestError) as err:
        client.audio.speech.create(model="tts", voice="alloy", input="x", response_format="ogg")  # type: ignore[arg-type]
    assert err.value.body["param"] == "response_format"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        client.audio.speech.create(model="tts", voice="", input="x")
    assert err.value.body["param"] == "voice"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        client.audio.speech.create(model="chat-only", voice="alloy", input="x")
    assert "no deployment" in err.value.message


def test_key_model_access_applies(router: RouterProcess) -> None:
    with pytest.raises(openai.PermissionDeniedError):
        _client(router, KEY_B).audio.transcriptions.create(model="whisper", file=("a.wav", AUDIO))
    assert _client(router, KEY_B).audio.speech.create(model="tts", voice="alloy", input="ok").content


@pytest.mark.covers("openai", "audio_transcription")
@pytest.mark.parametrize("fmt", ["json", "verbose_json", "text", "srt"])
def test_transcription_upload(router: RouterProcess, fake_oa: FakePlatform, fmt: str) -> None:
    result: Any = _client(router).audio.transcriptions.create(
        model="whisper",
        file=("talk.wav", AUDIO, "audio/wav"),
        response_format=fmt,  # type: ignore[arg-type]
        language="en",
        timestamp_granularities=["word", "segment"] if fmt == "verbose_json" else openai.NOT_GIVEN,
    )
    text = result if isinstance(result, str) else result.text
    assert f"oa heard {len(AUDIO)} bytes of talk.wav" in text
    seen = fake_oa.seen[-1]
    assert seen.path == "/v1/audio/transcriptions"
    assert seen.files["file"] == AUDIO
    assert seen.body["model"] == "whisper-1" and seen.body["language"] == "en"
    if fmt == "verbose_json":
        assert seen.body["timestamp_granularities[]"] == ["word", "segment"]
    spend = Decimal(_spend(router)["oa-whisper"]["spendUsd"])
    # whisper-1 at the shipped $0.0001 a second, for the 7.5 s the answer reports; text and srt
    # answers carry no duration, so the upload's WAV header gives it (1 s).
    assert spend == (Decimal("0.00075") if fmt in ("json", "verbose_json") else Decimal("0.0001"))


@pytest.mark.covers("openai", "audio_translation")
def test_translation_upload(router: RouterProcess, fake_oa: FakePlatform) -> None:
    result = _client(router).audio.translations.create(
        model="whisper", file=("talk.wav", AUDIO), response_format="verbose_json"
    )
    assert result.text.startswith("translated: oa heard")
    assert fake_oa.seen[-1].path == "/v1/audio/translations"
    assert Decimal(_spend(router)["oa-whisper"]["spendUsd"]) == Decimal("0.00075")


def test_upload_too_large_is_a_413_naming_the_file(router: RouterProcess, fake_oa: FakePlatform) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        _client(router).audio.transcriptions.create(model="whisper", file=("big.wav", b"\0" * (65 * 1024)))
    assert err.value.status_code == 413
    assert err.value.body["param"] == "file"  # type: ignore[index]
    assert not fake_oa.seen


def test_malformed_uploads_are_400s_naming_the_field(router: RouterProcess, fake_oa: FakePlatform) -> None:
    url = router.v1 + "/audio/transcriptions"
    auth = {"Authorization": f"Bearer {KEY_A}"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"json": {"model": "whisper"}}, "Content-Type"),
        ({"data": {"model": "whisper"}, "files": {"other": ("x.wav", AUDIO)}}, "file"),
        ({"files": {"file": ("x.wav", AUDIO)}}, "model"),
        (
            {"data": {"model": "whisper", "response_format": "mp3"}, "files": {"file": ("x.wav", AUDIO)}},
            "response_format",
        ),
        (
            {"content": b"--b\r\nno headers", "headers": {"content-type": "multipart/form-data; boundary=b"}},
            "file",
        ),
    ]
    for kwargs, param in cases:
        headers = {**auth, **kwargs.pop("headers", {})}
        response = httpx.post(url, headers=headers, **kwargs)
        assert response.status_code == 400, (param, response.text)
        assert response.json()["error"]["param"] == param, response.text
    assert not fake_oa.seen


@pytest.mark.covers("azure", "audio_speech", "audio_transcription", "audio_translation")
def test_azure_deployment_paths(router: RouterProcess, fake_az: FakePlatform) -> None:
    client = _azure(router)
    audio = client.audio.speech.create(model="az-tts", voice="nova", input="twelve chars")
    assert audio.content == CHUNK * fake_az.speech_chunks
    speech = fake_az.seen[-1]
    assert speech.path == "/openai/deployments/tts-dep/audio/speech"
    assert speech.query["api-version"] == API_VERSION and speech.headers["api-key"] == AZURE_UPSTREAM_KEY
    result = client.audio.transcriptions.create(model="az-whisper", file=("a.wav", AUDIO))
    assert "az heard" in result.text
    seen = fake_az.seen[-1]
    assert seen.path == "/openai/deployments/whisper-dep/audio/transcriptions"
    assert seen.files["file"] == AUDIO
    translated = client.audio.translations.create(
        model="az-whisper", file=("a.wav", AUDIO), response_format="verbose_json"
    )
    assert translated.text.startswith("translated: az heard")
    assert fake_az.seen[-1].path == "/openai/deployments/whisper-dep/audio/translations"
    spend = _spend(router)
    assert Decimal(spend["az-tts"]["spendUsd"]) == Decimal(20) * 12 / 1_000_000
    # 12 s transcribed, 12 s translated, at the deployment's $0.001 a second.
    assert Decimal(spend["az-whisper"]["spendUsd"]) == Decimal("0.024")


def test_speech_falls_back_to_another_group(
    router: RouterProcess, fake_oa: FakePlatform, fake_az: FakePlatform
) -> None:
    """Both attempts on the OpenAI deployment fail; the request falls back to the Azure group."""
    fake_oa.faults = [503, 503]
    raw = _client(router).audio.speech.with_raw_response.create(
        model="tts", voice="alloy", input="fall back", extra_headers={"x-kubellm-fallbacks": "az-tts"}
    )
    assert raw.headers["x-kubellm-model-group"] == "az-tts"
    assert raw.headers["x-kubellm-deployment"] == "az-tts"
    assert raw.content == CHUNK * fake_az.speech_chunks
    assert fake_oa.requests["/v1/audio/speech"] == 2
    metrics = http_get(router.base_url + "/metrics")[1].decode()
    assert any(
        line.startswith("kubellm_fallbacks_total{") and 'to="az-tts"' in line for line in metrics.splitlines()
    ), [line for line in metrics.splitlines() if "fallback" in line]
    requests = [line for line in metrics.splitlines() if line.startswith("kubellm_requests_total{")]
    assert any('model_group="tts"' in line for line in requests), requests
