"""Speech in, speech out over HTTP, on real NATS, Postgres and Redis.

The edge is Libra's own HTTP API; the vendors are loopback fakes of their wires, driven by the
real SDKs: Groq Whisper (it hears what it is told), the OpenAI chat API; the voice is espeak-ng.
"""

from __future__ import annotations

import base64
import io
import json
import wave

import httpx
import numpy as np
import pytest

from libra.contracts import (
    AsrTranscribed,
    LlmCompleted,
    ReplyDelivered,
    TtsSynthesized,
    TurnAccepted,
    VoiceCaptured,
)
from libra.ops.embedded import free_port
from libra.ops.fakes.groq_whisper import FakeGroqWhisper
from libra.ops.fakes.llm_wire import OPENAI_CHAT, Behaviour, FakeLlmWire
from libra.ops.fakes.scripted import Behaviour as VendorBehaviour
from libra.runtime.audio import resample_pcm, wav_bytes
from libra.runtime.config import Settings
from libra.runtime.eventlog import EventLog

from .helpers import eventually, stream_events
from .stack import TEXT_PIPELINE, running
from .voice_samples import silence, speech

REPLY = "It is sunny and warm today. A good day for a walk!"
KOREAN_REPLY = "오늘은 맑고 따뜻해요. 산책하기 좋은 날이에요!"
VOICE_PIPELINE = [*TEXT_PIPELINE, "asr", "tts", "http"]
STAGES = (
    "received_at",
    "transcribed_at",
    "accepted_at",
    "first_delta_at",
    "completed_at",
    "first_audio_at",
    "delivered_at",
)


@pytest.fixture
async def wire():
    async with FakeLlmWire(reply=Behaviour.ok(REPLY)) as fake:
        yield fake


@pytest.fixture
async def whisper():
    async with FakeGroqWhisper(transcript="What is the weather like today?") as fake:
        yield fake


@pytest.fixture
async def stack(settings: Settings, wire: FakeLlmWire, whisper: FakeGroqWhisper):
    s = Settings.from_env(
        {
            "NATS_URL": settings.nats_url,
            "DATABASE_URL": settings.database_url,
            "REDIS_URL": settings.redis_url,
            "HTTP_PORT": str(free_port()),
            "LLM_CACHE_ENABLED": "0",
            # the reply comes from the OpenAI wire; GROQ_* are the speech-to-text vendor's
            "LLM_PROVIDERS": "openai",
            "OPENAI_API_KEY": "sk-test-key",
            "OPENAI_BASE_URL": wire.env()["OPENAI_BASE_URL"],
            "GROQ_API_KEY": "gsk-test-key",
            **whisper.env(),
            "ASR_ENGINES": "groq",
            "TTS_ENGINES": "espeak",
        }
    )
    base = f"http://127.0.0.1:{s.http_port}"
    async with (
        running(s, VOICE_PIPELINE) as resources,
        httpx.AsyncClient(base_url=base, timeout=30) as http,
    ):

        async def up() -> bool:
            try:
                return (await http.get("/api/health")).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(up, timeout=15)
        yield http, resources.log


def _sse(body: str) -> list[dict]:
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]


def _clip(text: str, voice: str, *, rate: int = 16_000) -> str:
    samples = np.concatenate([silence(300), speech(text, voice), silence(300)])
    pcm = resample_pcm(samples.tobytes(), rate=16_000, channels=1, to_rate=rate, to_channels=1)
    return base64.b64encode(pcm).decode()


async def _events(log: EventLog, subject: str, turn: str) -> list:
    return [e for e in await stream_events(log.js, "LIBRA", subject) if e.turn == turn]


async def _idle(log: EventLog, *consumers: str) -> bool:
    """Whether the consumers have handled everything the log holds for them."""
    for name in consumers:
        info = await log.js.consumer_info("LIBRA", name)
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def test_voice_process_streams_transcript_reply_and_audio(stack, wire, whisper, pool) -> None:
    http, log = stack
    response = await http.post(
        "/voice/process",
        json={"userId": "alice", "audioData": _clip("What is the weather like today?", "en-us")},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    turn = response.headers["x-libra-turn"]
    events = _sse(response.text)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "transcript" and kinds[-1] == "done" and "error" not in kinds
    assert events[0]["text"] == "What is the weather like today?"
    assert events[0]["language"] == "en" and events[0]["turn"] == turn
    assert "".join(e["content"] for e in events if e["type"] == "llm") == REPLY
    audio = [e for e in events if e["type"] == "audio"]
    assert [e["index"] for e in audio] == list(range(len(audio)))
    assert [e["text"] for e in audio if e["text"]] == [
        "It is sunny and warm today.",
        "A good day for a walk!",
    ]
    assert events[-1] == {"type": "done", "turn": turn, "clips": len(audio)}
    for clip in audio:
        assert clip["engine"] == "espeak" and clip["voice"] == "en-us"
        with wave.open(io.BytesIO(base64.b64decode(clip["data"]))) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (48_000, 2, 2)
            samples = np.frombuffer(w.readframes(w.getnframes()), np.int16)
        assert abs(len(samples) // 2 * 1000 // 48_000 - clip["durationMs"]) <= 1
        if clip["text"]:  # a spoken sentence: loud, and as long as speech takes
            assert clip["durationMs"] > 500 and np.abs(samples).max() > 1000

    (upload,) = whisper.requests  # the 16 kHz clip the edge stored went to the vendor
    assert upload.body["file"]["seconds"] > 1.0
    (request,) = wire.calls(OPENAI_CHAT)
    assert request.messages[-1] == {"role": "user", "content": "What is the weather like today?"}

    async def delivered() -> bool:
        sql = "SELECT 1 FROM turns WHERE turn = $1 AND delivered_at IS NOT NULL"
        return await pool.fetchval(sql, turn) is not None

    await eventually(delivered, timeout=15)
    row = await pool.fetchrow("SELECT * FROM turns WHERE turn = $1", turn)
    assert row["status"] == "delivered" and row["modality"] == "voice"
    assert (row["asr_engine"], row["tts_engine"], row["provider"]) == ("groq", "espeak", "openai")
    assert row["language"] == "en" and row["platform"] == "http"
    times = {stage: row[stage] for stage in STAGES}
    assert all(times.values()), times
    assert times["received_at"] <= times["transcribed_at"] <= times["accepted_at"]
    assert times["accepted_at"] <= times["first_delta_at"] <= times["completed_at"]
    assert times["first_delta_at"] <= times["first_audio_at"] <= times["delivered_at"]
    assert times["completed_at"] <= times["delivered_at"]
    (done,) = await _events(log, "libra.reply.>", turn)
    assert isinstance(done, ReplyDelivered) and done.modality == "voice"
    assert done.clips == len(audio)


@pytest.mark.parametrize(
    ("said", "voice", "heard", "language", "reply", "spoken_as"),
    [
        ("오늘 날씨 어때요?", "ko", "오늘 날씨 어때요?", "Korean", KOREAN_REPLY, ("ko", "ko")),
        ("How is the weather?", "en-us", "How is the weather?", "English", REPLY, ("en", "en-us")),
    ],
    ids=["korean", "english"],
)
async def test_the_reply_is_spoken_in_the_language_it_was_asked_in(
    stack, wire, whisper, said, voice, heard, language, reply, spoken_as
) -> None:
    http, log = stack
    whisper.transcript, whisper.language = heard, language
    wire.queue(OPENAI_CHAT, Behaviour.ok(reply))
    response = await http.post(
        "/voice/process",
        json={"userId": "mina", "audioData": _clip(said, voice, rate=48_000), "sampleRate": 48_000},
    )
    assert response.status_code == 200, response.text
    turn = response.headers["x-libra-turn"]
    events = _sse(response.text)
    assert events[0]["text"] == heard and events[0]["language"] == spoken_as[0]
    (accepted,) = await _events(log, "libra.turn.>", turn)
    assert isinstance(accepted, TurnAccepted) and accepted.language == spoken_as[0]
    (request,) = wire.calls(OPENAI_CHAT)
    assert f"Reply in {language}" in request.messages[0]["content"]
    clips = [c for c in await _events(log, "libra.tts.>", turn) if c.text]
    assert len(clips) == 2
    assert all(isinstance(c, TtsSynthesized) for c in clips)
    assert {(c.language, c.voice, c.engine) for c in clips} == {(*spoken_as, "espeak")}


async def test_transcription_only_makes_no_turn(stack, wire, whisper, pool) -> None:
    http, log = stack
    whisper.transcript, whisper.language = "안녕하세요, 반갑습니다.", "Korean"
    samples = np.concatenate([speech("안녕하세요, 반갑습니다.", "ko"), silence(300)])
    response = await http.post(
        "/api/stt/transcribe",
        files={"file": ("hello.wav", wav_bytes(samples.tobytes(), sample_rate=16_000))},
        data={"userId": "sora"},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "text": "안녕하세요, 반갑습니다.",
        "language": "ko",
        "confidence": pytest.approx(np.exp(-0.2), abs=0.01),
    }
    (captured,) = await stream_events(log.js, "LIBRA", "libra.voice.>")
    assert isinstance(captured, VoiceCaptured) and captured.reply is False
    assert not captured.speculative and captured.user == "http:sora"
    (heard,) = await stream_events(log.js, "LIBRA", "libra.asr.>")
    assert isinstance(heard, AsrTranscribed) and heard.reply is False

    await eventually(lambda: _idle(log, "turns", "turns-projection", "asr"), timeout=10)
    assert await stream_events(log.js, "LIBRA", "libra.turn.>") == []
    assert await stream_events(log.js, "LIBRA_LIVE", "libra.llm.>") == []
    assert await stream_events(log.js, "LIBRA", "libra.llm.>") == []
    assert wire.calls(OPENAI_CHAT) == []
    assert await pool.fetchval("SELECT count(*) FROM turns") == 0


async def test_speech_the_recogniser_cannot_read_makes_no_turn(stack, wire, whisper) -> None:
    http, log = stack
    whisper.no_speech_prob, whisper.avg_logprob = 0.95, -1.5  # Whisper's "this was not speech"
    response = await http.post(
        "/voice/process", json={"userId": "tom", "audioData": _clip("Hmm, well.", "en-us")}
    )
    assert response.status_code == 422 and response.json()["error"] == "no_speech"
    await eventually(lambda: _idle(log, "turns", "asr"), timeout=10)
    assert await stream_events(log.js, "LIBRA", "libra.turn.>") == []
    assert wire.calls(OPENAI_CHAT) == []


async def test_a_transcription_that_fails_everywhere_is_a_502(stack, whisper) -> None:
    http, log = stack
    whisper.reply = VendorBehaviour.error(500)
    response = await http.post(
        "/voice/process", json={"userId": "una", "audioData": _clip("Hello?", "en-us")}
    )
    assert response.status_code == 502 and response.json()["error"] == "asr_failed"
    assert response.json()["message"] == "the speech could not be transcribed"
    assert len(whisper.requests) == 3  # every delivery of the asr consumer tried it
    assert await stream_events(log.js, "LIBRA", "libra.turn.>") == []


async def test_history_holds_what_was_said_and_the_spoken_reply(stack, whisper, pool) -> None:
    http, _ = stack
    whisper.transcript = "Good morning!"
    response = await http.post(
        "/voice/process", json={"userId": "vic", "audioData": _clip("Good morning!", "en-us")}
    )
    assert response.status_code == 200
    turn = response.headers["x-libra-turn"]

    async def recorded() -> bool:
        sql = "SELECT 1 FROM messages WHERE turn = $1 AND role = 'assistant'"
        return await pool.fetchval(sql, turn) is not None

    await eventually(recorded, timeout=10)
    history = (await http.get("/api/chat/history/vic")).json()["messages"]
    assert [(m["role"], m["content"]) for m in history] == [
        ("user", "Good morning!"),
        ("assistant", REPLY),
    ]
    rows = await pool.fetch("SELECT modality, event_id FROM messages WHERE turn = $1", turn)
    assert {r["modality"] for r in rows} == {"voice"} and turn in {r["event_id"] for r in rows}
    completed = [
        e for e in await stream_events(stack[1].js, "LIBRA", "libra.llm.>") if e.turn == turn
    ]
    assert [type(e) for e in completed] == [LlmCompleted]
