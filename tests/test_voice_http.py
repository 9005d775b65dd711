"""The HTTP voice routes refuse bad audio with a clear JSON error, and write nothing for it."""

from __future__ import annotations

import base64
import io
import wave

import httpx
import jwt
import numpy as np
import pytest

from libra.ops.embedded import free_port
from libra.runtime.audio import wav_bytes
from libra.runtime.config import Settings

from .helpers import eventually, stream_events
from .stack import running
from .voice_samples import silence, speech, white_noise

MAX_AUDIO = 200_000  # bytes: 6 s of 16 kHz mono
SECRET = "jwt-secret-that-is-long-enough-456"


def _settings(settings: Settings, **extra: str) -> Settings:
    return Settings.from_env(
        {
            "NATS_URL": settings.nats_url,
            "DATABASE_URL": settings.database_url,
            "REDIS_URL": settings.redis_url,
            "HTTP_PORT": str(free_port()),
            "MAX_AUDIO_BYTES": str(MAX_AUDIO),
            **extra,
        }
    )


async def _wait_http(base: str) -> None:
    async def up() -> bool:
        try:
            async with httpx.AsyncClient() as http:
                await http.get(f"{base}/api/health", timeout=1)
            return True
        except httpx.HTTPError:
            return False

    await eventually(up, timeout=15)


def _b64(samples: np.ndarray | bytes) -> str:
    data = samples if isinstance(samples, bytes) else samples.tobytes()
    return base64.b64encode(data).decode()


def _wav(samples: np.ndarray, *, rate: int = 16_000, width: int = 2) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.tobytes() if width == 2 else (samples >> 8).astype(np.int8).tobytes())
    return out.getvalue()


SPEECH = speech("Hello there, how are you?", "en-us")

PROCESS_CASES = [
    pytest.param({"audioData": "this is not base64!"}, 400, "invalid_audio", id="bad-base64"),
    pytest.param({"audioData": _b64(b"\x01\x02\x03")}, 400, "invalid_audio", id="odd-bytes"),
    pytest.param({"audioData": ""}, 400, "empty", id="empty"),
    pytest.param(
        {"audioData": _b64(SPEECH), "sampleRate": 12_345},
        400,
        "unsupported_sample_rate",
        id="odd-rate",
    ),
    pytest.param(
        {"audioData": _b64(SPEECH), "sampleRate": 0}, 400, "unsupported_sample_rate", id="zero-rate"
    ),
    pytest.param(
        {"audioData": _b64(SPEECH), "sampleRate": "fast"}, 400, "invalid_request", id="text-rate"
    ),
    pytest.param({"audioData": _b64(silence(1500))}, 422, "no_speech", id="silence"),
    pytest.param({"audioData": _b64(white_noise(1500, 3000))}, 422, "no_speech", id="noise"),
    pytest.param(
        {"audioData": _b64(np.zeros(MAX_AUDIO // 2 + 1, np.int16))}, 413, "too_large", id="large"
    ),
    pytest.param({"sampleRate": 16_000}, 400, "invalid_request", id="no-audio"),
]

TRANSCRIBE_CASES = [
    pytest.param({"file": ("a.wav", b"RIFF\x00\x00junk")}, {}, 400, "invalid_audio", id="bad-wav"),
    pytest.param(
        {"file": ("a.wav", _wav(SPEECH, width=1))}, {}, 400, "invalid_audio", id="8-bit-wav"
    ),
    pytest.param(
        {"file": ("a.wav", _wav(SPEECH, rate=11_000))},
        {},
        400,
        "unsupported_sample_rate",
        id="wav-odd-rate",
    ),
    pytest.param(
        {"file": ("a.pcm", SPEECH.tobytes()[:-1])}, {}, 400, "invalid_audio", id="pcm-odd-bytes"
    ),
    pytest.param(
        {"file": ("a.pcm", SPEECH.tobytes())},
        {"sampleRate": "96000"},
        400,
        "unsupported_sample_rate",
        id="pcm-odd-rate",
    ),
    pytest.param({"file": ("a.wav", _wav(silence(1000)))}, {}, 422, "no_speech", id="silent-wav"),
    pytest.param({"file": ("a.pcm", b"")}, {}, 400, "empty", id="empty-file"),
    pytest.param(
        {"file": ("a.pcm", np.zeros(MAX_AUDIO // 2 + 1, np.int16).tobytes())},
        {},
        413,
        "too_large",
        id="large",
    ),
    pytest.param({}, {"sampleRate": "16000"}, 400, "invalid_request", id="no-file"),
]


@pytest.fixture
async def http(settings: Settings):
    s = _settings(settings)
    base = f"http://127.0.0.1:{s.http_port}"
    async with running(s, ["http"]) as resources:
        await _wait_http(base)
        async with httpx.AsyncClient(base_url=base, timeout=20) as client:
            yield client, resources.log


@pytest.mark.parametrize(("body", "status", "error"), PROCESS_CASES)
async def test_voice_process_refuses_bad_audio(http, body: dict, status: int, error: str) -> None:
    client, log = http
    response = await client.post("/voice/process", json={"userId": "alice", **body})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == error and response.json()["message"]
    assert await stream_events(log.js, "LIBRA", "libra.voice.>") == []  # nothing was captured


@pytest.mark.parametrize(("files", "data", "status", "error"), TRANSCRIBE_CASES)
async def test_transcribe_refuses_bad_audio(
    http, files: dict, data: dict, status: int, error: str
) -> None:
    client, log = http
    response = await client.post("/api/stt/transcribe", files=files or None, data=data)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error and response.json()["message"]
    assert await stream_events(log.js, "LIBRA", "libra.voice.>") == []


async def test_a_body_far_over_the_audio_limit_is_cut_off_unread(http) -> None:
    client, log = http

    async def endless():  # streamed, no content-length: the limit is counted as it arrives
        for _ in range(64):
            yield b"x" * 65_536

    response = await client.post(
        "/voice/process", content=endless(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and response.json()["error"] == "too_large"
    assert await stream_events(log.js, "LIBRA", "libra.voice.>") == []


async def test_voice_routes_need_the_same_credentials_as_chat(settings: Settings) -> None:
    s = _settings(settings, BFF_API_KEY="service-key-123", JWT_SECRET=SECRET)
    base = f"http://127.0.0.1:{s.http_port}"
    hana = {"Authorization": f"Bearer {jwt.encode({'sub': 'hana'}, SECRET, algorithm='HS256')}"}
    quiet = {"userId": "hana", "audioData": _b64(silence(500))}
    wav = {"file": ("a.wav", wav_bytes(silence(500).tobytes(), sample_rate=16_000))}
    async with running(s, ["http"]):
        await _wait_http(base)
        async with httpx.AsyncClient(base_url=base, timeout=20) as client:
            assert (await client.post("/voice/process", json=quiet)).status_code == 401
            assert (await client.post("/api/stt/transcribe", files=wav)).status_code == 401
            other = await client.post(
                "/voice/process", json={**quiet, "userId": "ivan"}, headers=hana
            )
            assert other.status_code == 403 and other.json()["error"] == "forbidden"
            as_ivan = await client.post(
                "/api/stt/transcribe", files=wav, data={"userId": "ivan"}, headers=hana
            )
            assert as_ivan.status_code == 403
            # past authentication, the audio itself is judged
            mine = await client.post("/voice/process", json=quiet, headers=hana)
            assert mine.status_code == 422 and mine.json()["error"] == "no_speech"
            service = await client.post(
                "/api/stt/transcribe", files=wav, headers={"X-API-Key": "service-key-123"}
            )
            assert service.status_code == 422
            spec = (await client.get("/openapi.json")).json()
            assert {"/voice/process", "/api/stt/transcribe"} <= set(spec["paths"])
