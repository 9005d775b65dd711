"""Transcribing while the person talks: voice.partial heard early, only the tail at the pause.

Real pieces throughout: Silero VAD in VoiceCapture, NATS JetStream and its object store, and the
packaged faster-whisper tiny.en; the speech is espeak-ng's, so the words said are known.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable

import msgspec
import numpy as np
import pytest
from prometheus_client import REGISTRY

from libra.contracts import AsrTranscribed, Origin, VoiceCaptured, VoicePartial
from libra.gateway.voice import VoiceCapture, segmenter_config
from libra.processors.asr.chain import AsrChain
from libra.processors.asr.processor import AsrProcessor, build_engines
from libra.runtime.audio import AudioStore
from libra.runtime.config import Settings
from libra.runtime.consumer import ConsumerRunner
from libra.runtime.eventlog import EventLog

from .helpers import eventually, stream_events
from .voice_samples import silence, speech

ORIGIN = Origin(platform="http", channel="alice")
SENTENCE = "Please remind me to call my mother tomorrow morning before I go to work at the bakery."
# no key: the local whisper first, so auto turns the partials on
LOCAL = Settings.from_env({"WHISPER_DEVICE": "cpu", "ASR_INCREMENTAL": "auto"})


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", "", text.lower()).split()


def _wer(said: str, heard: str) -> float:
    """Word error rate: word-level Levenshtein distance over the words said."""
    ref, hyp = _words(said), _words(heard)
    row = list(range(len(hyp) + 1))
    for i, word in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, other in enumerate(hyp, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (word != other))
    return row[-1] / len(ref)


def _decodes() -> float:
    sample = "voice_processing_duration_seconds_count"
    return REGISTRY.get_sample_value(sample, {"stage": "asr_partial"}) or 0.0


@pytest.fixture(scope="module")
def chain() -> AsrChain:
    return AsrChain(build_engines(LOCAL), timeout_s=60.0)


async def _speak(log: EventLog, samples: np.ndarray, settings: Settings = LOCAL) -> list:
    """Feeds the samples through a capture, 20 ms at a time, as fast as it takes them."""
    audio = await AudioStore.open(log)
    async with VoiceCapture(
        log,
        audio,
        conversation="http-alice",
        user="http:alice",
        origin=ORIGIN,
        config=segmenter_config(settings),
        sample_rate=16_000,
        channels=1,
    ) as capture:
        pcm = samples.tobytes()
        for at in range(0, len(pcm), 640):
            capture.feed(pcm[at : at + 640])
    return await stream_events(log.js, "LIBRA", "libra.voice.>")


async def _transcribe(processor: AsrProcessor, event: VoiceCaptured) -> AsrTranscribed:
    (out,) = [e async for e in processor.handle(event)]
    assert isinstance(out, AsrTranscribed)
    return out


def _spoken() -> np.ndarray:
    return np.concatenate([silence(300), speech(SENTENCE, "en-us"), silence(900)])


async def test_partials_follow_audio_time_and_only_the_tail_is_decoded_at_the_pause(
    eventlog: EventLog, chain: AsrChain
) -> None:
    await chain.prepare()
    samples = _spoken()
    events = await _speak(eventlog, samples)
    partials = [e for e in events if isinstance(e, VoicePartial) and not e.pause]
    captured = [e for e in events if isinstance(e, VoiceCaptured)][-1]
    # one partial per second of the utterance, fed at any speed: they follow the audio's clock
    speech_s = len(speech(SENTENCE, "en-us")) / 16_000
    assert 4.0 <= speech_s <= 6.0
    assert int(speech_s) - 1 <= len(partials) <= int(speech_s) + 1
    assert all(p.audio.duration_ms == 1000 for p in partials)
    assert [p.offset_ms for p in partials] == [1000 * i for i in range(len(partials))]
    assert {p.utterance for p in partials} == {captured.utterance} and captured.utterance

    audio = await AudioStore.open(eventlog)
    whole = await _transcribe(AsrProcessor(audio, chain), captured)  # no partials: today's way
    assert whole.decoded_ms == captured.audio.duration_ms

    incremental = AsrProcessor(audio, chain, partials=True)
    for i, partial in enumerate(partials, 1):
        before = _decodes()
        assert [e async for e in incremental.handle(partial)] == []  # a partial is no event
        await eventually(lambda before=before: _async(_decodes() > before), timeout=30)
        assert i  # each second is heard before the next one is spoken (as on 2 cores)
    started = time.perf_counter()
    heard = await _transcribe(incremental, captured)
    after_pause = time.perf_counter() - started
    print(f"decoded at the pause: {heard.decoded_ms} of {heard.audio_ms} ms in {after_pause:.2f}s")
    print(f"whole: {whole.text!r}\nincremental: {heard.text!r}")
    assert heard.id == whole.id and heard.audio_ms == whole.audio_ms  # the same event, cheaper
    assert 0 < heard.decoded_ms <= 1600
    # Measured: the whole 0.0, the incremental 0.18 ("work at the bakery" heard as "the mayor":
    # tiny.en hears a second of audio alone worse), hence ASR_INCREMENTAL off by default.
    assert heard.text.startswith("Please remind me to call my mother")
    assert _wer(SENTENCE, heard.text) <= _wer(SENTENCE, whole.text) + 0.25
    assert 0.0 < heard.confidence <= 1.0


async def _async(value: bool) -> bool:
    return value


async def test_a_pause_is_transcribed_before_the_cut_and_the_capture_takes_it(
    eventlog: EventLog, chain: AsrChain
) -> None:
    await chain.prepare()
    settings = Settings.from_env({"WHISPER_DEVICE": "cpu"})  # the defaults, with no key
    assert settings.asr_early_decode_ms == 60 and not settings.asr_partials
    events = await _speak(eventlog, _spoken(), settings)
    [early] = [e for e in events if isinstance(e, VoicePartial)]
    captured = [e for e in events if isinstance(e, VoiceCaptured)][-1]
    assert early.pause and early.offset_ms == 0 and early.utterance == captured.utterance
    assert captured.speculative  # the early decode comes before the speculative cut
    # the speech ends within what was sent at the pause; the capture adds only silence
    assert 0 < captured.speech_ms <= early.audio.duration_ms < captured.audio.duration_ms

    audio = await AudioStore.open(eventlog)
    whole = await _transcribe(AsrProcessor(audio, chain), captured)
    processor = AsrProcessor(audio, chain, partials=True)
    assert [e async for e in processor.handle(early)] == []
    started = time.perf_counter()
    taken = await _transcribe(processor, captured)  # waits for the decode begun at the pause
    print(f"at the cut: {time.perf_counter() - started:.2f}s; whole: {whole.latency_ms} ms")
    assert taken.decoded_ms == 0 and whole.decoded_ms == captured.audio.duration_ms
    assert taken.id == whole.id and taken.text == whole.text
    assert taken.language == whole.language and taken.engine == "whisper"
    # a capture whose speech goes on past that audio (another pause's) is decoded itself
    later = msgspec.structs.replace(captured, speech_ms=early.audio.duration_ms + 200)
    assert (await _transcribe(processor, later)).decoded_ms == captured.audio.duration_ms


async def test_a_capture_with_no_partial_state_is_decoded_whole(
    eventlog: EventLog, chain: AsrChain
) -> None:
    events = await _speak(eventlog, _spoken())
    captured = [e for e in events if isinstance(e, VoiceCaptured)][-1]
    assert captured.utterance
    # Redelivered to another instance (or after a restart): it heard none of the partials.
    fresh = AsrProcessor(await AudioStore.open(eventlog), chain, partials=True)
    out = await _transcribe(fresh, captured)
    assert out.decoded_ms == out.audio_ms == captured.audio.duration_ms
    assert _wer(SENTENCE, out.text) <= 0.2


async def test_through_the_consumer_partials_are_heard_and_never_dead_lettered(
    eventlog: EventLog, chain: AsrChain
) -> None:
    events = await _speak(eventlog, _spoken())
    captures = {e.id for e in events if isinstance(e, VoiceCaptured)}
    runner = ConsumerRunner(eventlog, AsrProcessor(await AudioStore.open(eventlog), chain))
    task = asyncio.create_task(runner.run())

    async def transcribed() -> list:
        return await stream_events(eventlog.js, "LIBRA", "libra.asr.transcribed.>")

    try:
        await eventually(lambda: _async_len(transcribed(), len(captures)), timeout=60)
    finally:
        await runner.stop()
        await asyncio.wait_for(task, 10)
    assert {e.causation for e in await transcribed()} == captures  # partials made no event
    assert not await stream_events(eventlog.js, "LIBRA", "libra.dead.>")


async def _async_len(events: Awaitable[list], n: int) -> bool:
    return len(await events) >= n


async def test_with_a_paid_api_first_no_partials_are_sent(eventlog: EventLog) -> None:
    groq = Settings.from_env({"GROQ_API_KEY": "gsk-test", "ASR_INCREMENTAL": "auto"})
    assert not Settings.from_env({}).asr_partials  # and none unless asked for
    events = await _speak(eventlog, _spoken(), groq)
    assert not [e for e in events if isinstance(e, VoicePartial)]
    assert all(e.utterance == "" for e in events if isinstance(e, VoiceCaptured))
