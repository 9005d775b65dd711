"""The asr processor on real NATS: faster-whisper on a tiny model, Groq Whisper against its fake."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import numpy as np
import pytest
from faster_whisper.tokenizer import _LANGUAGE_CODES

from libra.contracts import AsrTranscribed, DeadLetter, Origin, VoiceCaptured, make, new_id
from libra.ops.fakes.groq_whisper import TRANSCRIPTIONS, FakeGroqWhisper
from libra.ops.fakes.scripted import Behaviour
from libra.ops.fakes.tiny_whisper import build_tiny_whisper
from libra.processors.asr import whisper
from libra.processors.asr.base import Transcript
from libra.processors.asr.chain import AsrChain
from libra.processors.asr.groq import GroqWhisperEngine
from libra.processors.asr.processor import AsrProcessor, build_engines
from libra.processors.asr.whisper import WhisperEngine
from libra.runtime.audio import AudioStore
from libra.runtime.config import ConfigError, Settings
from libra.runtime.consumer import ConsumerRunner
from libra.runtime.eventlog import EventLog
from libra.runtime.metrics import VOICE_PROCESSING_SECONDS

from .helpers import eventually, stream_events
from .stack import running
from .voice_samples import silence, speech

ORIGIN = Origin(platform="discord", guild="1", channel="2", locale="ko")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny")


def _whisper(model: Path) -> WhisperEngine:
    return WhisperEngine(str(model), device="cpu", beam_size=1, temperature=0.0)


def _groq(fake: FakeGroqWhisper, timeout_s: float = 5.0) -> GroqWhisperEngine:
    return GroqWhisperEngine(
        api_key="gsk-test", base_url=fake.url, model="whisper-large-v3-turbo", timeout_s=timeout_s
    )


async def _captured(
    log: EventLog, samples: np.ndarray, *, speculative: bool = True
) -> VoiceCaptured:
    audio = await AudioStore.open(log)
    event_id = new_id()
    ref = await audio.put(
        f"voice/discord-1-2/{event_id}", samples.tobytes(), format="pcm_s16le", sample_rate=16_000
    )
    event = make(
        VoiceCaptured,
        id=event_id,
        conversation="discord-1-2",
        user="u1",
        audio=ref,
        origin=ORIGIN,
        speculative=speculative,
    )
    await log.publish(event)
    return event


async def _transcripts(log: EventLog, count: int = 1) -> list[AsrTranscribed]:
    async def enough() -> bool:
        info = await log.js.stream_info("LIBRA", subjects_filter="libra.asr.>")
        return sum((info.state.subjects or {}).values()) >= count

    await eventually(enough, timeout=20)
    return await stream_events(log.js, "LIBRA", "libra.asr.>")


@contextlib.asynccontextmanager
async def _running(log: EventLog, chain: AsrChain, **kwargs) -> AsyncIterator[None]:
    runner = ConsumerRunner(log, AsrProcessor(await AudioStore.open(log), chain, **kwargs))
    task = asyncio.create_task(runner.run())
    try:
        yield
    finally:
        await runner.stop()
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def korean(eventlog: EventLog) -> VoiceCaptured:
    return await _captured(
        eventlog, np.concatenate([speech("안녕하세요, 만나서 반갑습니다.", "ko"), silence(200)])
    )


async def test_faster_whisper_transcribes_a_capture_with_the_language_hint(
    eventlog: EventLog, tiny_model: Path, korean: VoiceCaptured
) -> None:
    chain = AsrChain([_whisper(tiny_model)], timeout_s=30)
    timed = VOICE_PROCESSING_SECONDS.labels("asr")._sum.get()
    async with _running(eventlog, chain, language="ko"):
        (heard,) = await _transcripts(eventlog)
    assert VOICE_PROCESSING_SECONDS.labels("asr")._sum.get() > timed  # the seed's metric
    assert heard.causation == korean.id and heard.turn == korean.id
    assert heard.engine == "whisper" and heard.language == "ko"
    assert heard.speculative is True and heard.origin == korean.origin
    assert heard.audio_ms == korean.audio.duration_ms > 1000
    assert heard.text  # noise from random weights, but words all the same
    assert 0.0 < heard.confidence <= 1.0 and heard.latency_ms > 0


async def test_without_a_hint_the_language_is_detected(tiny_model: Path) -> None:
    pcm = speech("Hello there, nice to meet you.", "en-us").tobytes()
    transcript = await _whisper(tiny_model).transcribe(pcm, None)
    assert transcript.language in _LANGUAGE_CODES


async def test_the_model_is_loaded_once_per_process(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str] = []
    real = whisper.WhisperModel

    def counting(name: str, **kwargs):
        loads.append(name)
        return real(name, **kwargs)

    monkeypatch.setattr(whisper, "WhisperModel", counting)
    monkeypatch.setattr(whisper, "_models", {})
    pcm = speech("One.", "en-us").tobytes()
    first, second = _whisper(tiny_model), _whisper(tiny_model)
    await asyncio.gather(first.load(), second.load(), first.transcribe(pcm, "en"))
    await second.transcribe(pcm, "en")
    assert loads == [str(tiny_model)]


async def test_faster_whisper_runs_faster_than_real_time(tiny_model: Path) -> None:
    engine = _whisper(tiny_model)
    pcm = np.concatenate([speech("This is a test of the speed of transcription.", "en-us")] * 2)
    await engine.transcribe(pcm[:16000].tobytes(), "en")  # warm up
    started = time.perf_counter()
    await engine.transcribe(pcm.tobytes(), "en")
    rtf = (time.perf_counter() - started) / (len(pcm) / 16_000)
    print(f"faster-whisper tiny random model, CPU int8: real-time factor {rtf:.3f}")
    assert rtf < 1.0


async def test_groq_whisper_answers_through_the_sdk(
    eventlog: EventLog, korean: VoiceCaptured
) -> None:
    async with FakeGroqWhisper(transcript="안녕하세요", language="Korean") as fake:
        chain = AsrChain([_groq(fake)], timeout_s=5)
        async with _running(eventlog, chain):
            (heard,) = await _transcripts(eventlog)
        (request,) = fake.requests
    assert heard.text == "안녕하세요" and heard.language == "ko" and heard.engine == "groq"
    assert heard.confidence == pytest.approx(np.exp(-0.2), abs=0.01)
    assert request.path == TRANSCRIPTIONS and request.headers["authorization"] == "***"
    assert request.body["model"] == "whisper-large-v3-turbo"
    assert request.body["response_format"] == "verbose_json"
    upload = request.body["file"]
    assert upload["seconds"] == pytest.approx(korean.audio.duration_ms / 1000, abs=0.01)


@pytest.mark.parametrize(
    "failure",
    [
        Behaviour.rate_limited(),
        Behaviour.error(500),
        Behaviour.garbage(),
        Behaviour.disconnect(),
        Behaviour.hang(),
    ],
    ids=["429", "500", "garbage", "disconnect", "timeout"],
)
async def test_a_failing_groq_falls_back_to_local_whisper(
    eventlog: EventLog, tiny_model: Path, korean: VoiceCaptured, failure: Behaviour
) -> None:
    local = _whisper(tiny_model)
    await local.transcribe(speech("Warm up.", "en-us").tobytes(), "en")  # load it beforehand
    async with FakeGroqWhisper() as fake:
        fake.queue(failure)
        # Groq's request times out in the SDK after 1 s; the local model gets the chain's 10 s
        chain = AsrChain([_groq(fake, timeout_s=1.0), local], timeout_s=10)
        async with _running(eventlog, chain):
            (heard,) = await _transcripts(eventlog)
        assert fake.requests  # groq was tried first
    assert heard.engine == "whisper" and heard.causation == korean.id


async def test_the_chain_gives_up_on_an_engine_at_its_time_limit() -> None:
    class Instant:
        name = "instant"

        async def transcribe(self, pcm16k: bytes, language_hint: str | None) -> Transcript:
            return Transcript(text="ok", language="en")

    async with FakeGroqWhisper() as fake:
        fake.queue(Behaviour.hang())
        chain = AsrChain([_groq(fake, timeout_s=30), Instant()], timeout_s=0.5)
        started = time.perf_counter()
        transcript, engine = await chain.transcribe(speech("Hi.", "en-us").tobytes(), "en")
        assert time.perf_counter() - started < 2  # the chain's 0.5 s, not the SDK's 30 s
        assert fake.requests and engine.name == "instant" and transcript.text == "ok"


async def test_an_engine_that_failed_is_tried_last_for_a_while(tiny_model: Path) -> None:
    async with FakeGroqWhisper() as fake:
        fake.queue(Behaviour.error(503))
        chain = AsrChain([_groq(fake), _whisper(tiny_model)], timeout_s=5)
        pcm = speech("Hi.", "en-us").tobytes()
        _, first = await chain.transcribe(pcm, "en")
        _, second = await chain.transcribe(pcm, "en")
        assert (first.name, second.name) == ("whisper", "whisper")
        assert len(fake.requests) == 1  # not asked again during its cool-down


async def test_silence_is_an_empty_transcript(eventlog: EventLog) -> None:
    async with FakeGroqWhisper(no_speech_prob=0.9, avg_logprob=-1.5) as fake:
        await _captured(eventlog, silence(1000))
        chain = AsrChain([_groq(fake)], timeout_s=5)
        async with _running(eventlog, chain):
            (heard,) = await _transcripts(eventlog)
    assert heard.text == "" and heard.confidence == 0.0 and heard.engine == "groq"


async def test_an_empty_clip_is_heard_as_nothing_without_asking_an_engine(
    eventlog: EventLog,
) -> None:
    async with FakeGroqWhisper() as fake:
        await _captured(eventlog, silence(0), speculative=False)
        async with _running(eventlog, AsrChain([_groq(fake)], timeout_s=5)):
            (heard,) = await _transcripts(eventlog)
        assert fake.requests == []
    assert heard.text == "" and heard.engine == "none" and heard.speculative is False


async def test_when_every_engine_fails_the_capture_is_dead_lettered(
    eventlog: EventLog, korean: VoiceCaptured
) -> None:
    async with FakeGroqWhisper(reply=Behaviour.error(500)) as fake:
        async with _running(eventlog, AsrChain([_groq(fake)], timeout_s=5)):

            async def dead() -> bool:
                return bool(await stream_events(eventlog.js, "LIBRA", "libra.dead.>"))

            await eventually(dead, timeout=15)
        assert len(fake.requests) == 3  # max_deliver of the asr consumer
    (letter,) = await stream_events(eventlog.js, "LIBRA", "libra.dead.>")
    assert isinstance(letter, DeadLetter) and letter.consumer == "asr"
    assert "groq" in letter.error and await stream_events(eventlog.js, "LIBRA", "libra.asr.>") == []


def test_the_engine_order_comes_from_the_settings() -> None:
    names = [e.name for e in build_engines(Settings.from_env({"GROQ_API_KEY": "gsk-x"}))]
    assert names == ["groq", "whisper"]
    assert [e.name for e in build_engines(Settings())] == ["whisper"]
    env = {"ASR_ENGINES": "whisper,groq", "GROQ_API_KEY": "gsk-x", "WHISPER_DEVICE": "cpu"}
    engines = build_engines(Settings.from_env(env))
    assert [e.name for e in engines] == ["whisper", "groq"]
    assert (engines[0].device, engines[0].compute_type) == ("cpu", "int8")
    with pytest.raises(ConfigError):
        build_engines(Settings.from_env({"ASR_ENGINES": "groq"}))
    with pytest.raises(ConfigError):
        build_engines(Settings.from_env({"ASR_ENGINES": "siri"}))


async def test_the_asr_component_runs_from_the_settings(
    settings: Settings, eventlog: EventLog, tiny_model: Path
) -> None:
    configured = msgspec.structs.replace(
        settings, asr_engines="whisper", whisper_model=str(tiny_model), asr_language="en"
    )
    async with running(configured, ["asr"]):
        captured = await _captured(eventlog, speech("Is anyone there?", "en-us"))
        (heard,) = await _transcripts(eventlog)
    assert heard.causation == captured.id and heard.engine == "whisper" and heard.language == "en"
