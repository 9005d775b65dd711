"""Turns with no account at all: the packaged Whisper tiny.en hears, the embedded SmolLM2
answers and espeak-ng speaks, on real NATS, Postgres and Redis.

No provider, key or model setting is given: this is what a newcomer's `libra up` runs. The
model answers greedily (``LLM_TEMPERATURE=0``), so what it says about France is repeatable.
"""

from __future__ import annotations

import base64
import io
import json
import re
import wave
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest

from libra.contracts import AsrTranscribed, LlmCompleted, TurnAccepted
from libra.ops.embedded import free_port
from libra.processors.llm.providers.embedded import MODEL_NAME
from libra.runtime.config import Settings
from libra.runtime.eventlog import EventLog

from .helpers import eventually, stream_events
from .stack import TEXT_PIPELINE, running
from .voice_samples import silence, speech

QUESTION = "What is the capital of France?"


@pytest.fixture
async def local(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, EventLog]]:
    s = Settings.from_env(
        {
            "NATS_URL": settings.nats_url,
            "DATABASE_URL": settings.database_url,
            "REDIS_URL": settings.redis_url,
            "HTTP_PORT": str(free_port()),
            "LLM_CACHE_ENABLED": "0",
            "LLM_TEMPERATURE": "0",
            "MAX_TOKENS": "40",
        }
    )
    base = f"http://127.0.0.1:{s.http_port}"
    async with (
        running(s, [*TEXT_PIPELINE, "asr", "tts", "http"]) as resources,
        httpx.AsyncClient(base_url=base, timeout=60) as http,
    ):

        async def up() -> bool:
            try:
                return (await http.get("/api/health", timeout=1)).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(up, timeout=15)
        yield http, resources.log


def _sse(body: str) -> list[dict]:
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data:")]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def _sensible(reply: str) -> bool:
    """Names Paris, in English: under Libra's full persona this model said "Le Grand Paris,
    le Grand France." """
    return "Paris" in reply and not {"le", "la", "les", "est", "de"} & set(_words(reply))


async def _turn_events(log: EventLog, turn: str) -> list:
    """The turn's events once its reply is in the log."""

    async def read() -> list:
        return [e for e in await stream_events(log.js, "LIBRA") if e.turn == turn]

    async def completed() -> bool:
        return any(isinstance(e, LlmCompleted) for e in await read())

    await eventually(completed, timeout=15)
    return await read()


async def test_a_typed_question_gets_a_sensible_answer_from_the_embedded_model(local) -> None:
    http, log = local
    r = await http.post(
        "/api/chat/completions", json={"userId": "newcomer", "message": QUESTION, "stream": True}
    )
    chunks = _sse(r.text)
    assert chunks[-1]["done"] and "error" not in chunks[-1], chunks[-1]
    reply = "".join(c.get("content", "") for c in chunks)
    assert _sensible(reply), reply
    [accepted] = [e for e in await stream_events(log.js, "LIBRA") if isinstance(e, TurnAccepted)]
    assert accepted.language == "en"
    completed = [e for e in await _turn_events(log, accepted.turn) if isinstance(e, LlmCompleted)]
    assert (completed[0].provider, completed[0].model) == ("embedded", MODEL_NAME)


async def test_a_spoken_question_is_heard_answered_and_spoken(local) -> None:
    http, log = local
    samples = np.concatenate([silence(300), speech(QUESTION, "en-us"), silence(300)])
    response = await http.post(
        "/voice/process",
        json={"userId": "newcomer", "audioData": base64.b64encode(samples.tobytes()).decode()},
    )
    assert response.status_code == 200, response.text
    events = _sse(response.text)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "transcript" and kinds[-1] == "done" and "error" not in kinds, events
    heard = events[0]
    # tiny.en on espeak's voice: the question's words, give or take one; an English-only model
    # names no language, so the transcript carries the one its words are written in
    assert len(set(_words(QUESTION)) - set(_words(heard["text"]))) <= 1, heard
    assert heard["language"] == "en"
    reply = "".join(e["content"] for e in events if e["type"] == "llm")
    assert _sensible(reply), reply
    audio = [e for e in events if e["type"] == "audio"]
    assert audio and all(clip["engine"] == "espeak" for clip in audio)
    with wave.open(io.BytesIO(base64.b64decode(audio[0]["data"]))) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    assert np.abs(pcm).max() > 1000  # speech, not silence

    found = await _turn_events(log, response.headers["x-libra-turn"])
    [transcribed] = [e for e in found if isinstance(e, AsrTranscribed)]
    [completed] = [e for e in found if isinstance(e, LlmCompleted)]
    assert transcribed.engine == "whisper"
    assert (completed.provider, completed.model) == ("embedded", MODEL_NAME)
    assert completed.text == reply


async def test_speech_to_text_names_the_language_an_english_only_model_does_not(local) -> None:
    http, _log = local
    samples = np.concatenate([silence(300), speech(QUESTION, "en-us"), silence(300)])
    response = await http.post(
        "/api/stt/transcribe",
        files={"file": ("q.pcm", samples.tobytes(), "application/octet-stream")},
        data={"userId": "newcomer"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["language"] == "en"
