"""The HTTP voice routes refuse bad audio with a clear JSON error, and write nothing for it."""

from __future__ import annotations

import asyncio
import base64
import io
import time
import wave

import httpx
import jwt
import numpy as np
import pytest

from libra.ops.embedded import free_port
from libra.runtime.audio import wav_bytes
from libra.runtime.config import Settings

from .helpers import eventually, stream_events, wait_http
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
        await wait_http(base)
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
    claims = {"sub": "hana", "exp": int(time.time()) + 600}
    hana = {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}
    quiet = {"userId": "hana", "audioData": _b64(silence(500))}
    wav = {"file": ("a.wav", wav_bytes(silence(500).tobytes(), sample_rate=16_000))}
    async with running(s, ["http"]):
        await wait_http(base)
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


def test_an_unreadable_wav_is_refused_in_libras_words() -> None:
    from libra.gateway.http.voice import _BadAudio, _wav_pcm

    for data in (b"RIFF\x00\x00junk", b"RIFF" + bytes(40), _wav(SPEECH)[:30]):
        with pytest.raises(_BadAudio) as refused:
            _wav_pcm(data)
        assert refused.value.message == "the file is not a readable WAV"  # not the parser's


async def _transcribe(client: httpx.AsyncClient, user: str, samples: np.ndarray):
    wav = {"file": ("a.wav", _wav(samples))}
    return await client.post("/api/stt/transcribe", files=wav, data={"userId": user})


@pytest.mark.parametrize("redis_up", [True, False], ids=["redis", "redis-down"])
async def test_transcription_has_a_limit_per_person(settings: Settings, redis_up: bool) -> None:
    # Without Redis, the window is counted in this process (a port where nothing listens).
    redis = settings.redis_url if redis_up else f"redis://127.0.0.1:{free_port()}/0"
    s = _settings(settings, REDIS_URL=redis, STT_RATE_LIMIT="2", STT_RATE_LIMIT_WINDOW_SEC="60")
    base = f"http://127.0.0.1:{s.http_port}"
    async with running(s, ["http"]), httpx.AsyncClient(base_url=base, timeout=20) as client:
        await wait_http(base)
        quiet = silence(600)
        for _ in range(2):  # each counts, though no speech is heard in it
            assert (await _transcribe(client, "olga", quiet)).status_code == 422
        third = await _transcribe(client, "olga", quiet)
        assert third.status_code == 429 and third.json()["error"] == "rate_limited", third.text
        assert 0 < int(third.headers["Retry-After"]) <= 60 and third.json()["message"]
        spoken = await client.post(
            "/voice/process", json={"userId": "olga", "audioData": _b64(quiet)}
        )
        assert spoken.status_code == 429  # the voice route transcribes too: the same window
        assert (await _transcribe(client, "pavel", quiet)).status_code == 422  # another person


async def test_transcriptions_in_flight_are_bounded_and_a_gone_client_frees_its_place(
    settings: Settings,
) -> None:
    # No asr processor runs: a clip with speech waits for its transcript until its client goes.
    s = _settings(settings, STT_MAX_CONCURRENT="1")
    base = f"http://127.0.0.1:{s.http_port}"
    async with running(s, ["http"]) as resources:
        await wait_http(base)
        async with httpx.AsyncClient(base_url=base, timeout=20) as client:
            waiting = asyncio.create_task(_transcribe(client, "quinn", SPEECH))
            captured = "libra.voice.captured.>"
            await eventually(lambda: _counted(resources.log.js, captured), timeout=15)
            busy = await _transcribe(client, "rosa", silence(600))
            assert busy.status_code == 503 and busy.json()["error"] == "busy", busy.text
            assert int(busy.headers["Retry-After"]) > 0
            waiting.cancel()  # its client closes the connection: the slot is free again

            async def free() -> bool:
                return (await _transcribe(client, "rosa", silence(600))).status_code == 422

            await eventually(free, timeout=10)


async def _counted(js, subject: str) -> bool:
    return len(await stream_events(js, "LIBRA", subject)) > 0
