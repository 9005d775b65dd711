"""The tts processor on real NATS: voice turns spoken sentence by sentence as the reply streams."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec
import numpy as np
import pytest

from libra.contracts import (
    LlmCompleted,
    LlmDelta,
    LlmFailed,
    Origin,
    TtsSynthesized,
    TurnAccepted,
    TurnRejected,
    derive,
    make,
    new_id,
)
from libra.ops.fakes.cartesia import FakeCartesia
from libra.ops.fakes.scripted import Behaviour
from libra.processors.tts.cartesia import CartesiaEngine
from libra.processors.tts.chain import TtsChain
from libra.processors.tts.espeak import EspeakEngine
from libra.processors.tts.processor import TtsProcessor
from libra.runtime.audio import AudioStore
from libra.runtime.config import Settings
from libra.runtime.consumer import ConsumerRunner
from libra.runtime.eventlog import EventLog
from libra.runtime.metrics import VOICE_PROCESSING_SECONDS

from .helpers import eventually, stream_count, stream_events
from .stack import running

ORIGIN = Origin(platform="discord", guild="1", channel="2")
ESPEAK = EspeakEngine({"ko": "ko", "en": "en-us"})


@contextlib.asynccontextmanager
async def _tts(log: EventLog, *engines) -> AsyncIterator[None]:
    chain = TtsChain(engines or (ESPEAK,), timeout_s=5)
    runner = ConsumerRunner(log, TtsProcessor(log, await AudioStore.open(log), chain))
    task = asyncio.create_task(runner.run())
    try:
        yield
    finally:
        await runner.stop()
        await asyncio.wait_for(task, 10)


def _turn(language: str = "en", modality: str = "voice") -> TurnAccepted:
    return make(
        TurnAccepted,
        conversation="discord-1-2",
        user="u1",
        text="said",
        language=language,
        modality=modality,
        origin=ORIGIN,
    )


def _delta(turn: TurnAccepted, index: int, text: str) -> LlmDelta:
    return derive(
        turn,
        LlmDelta,
        key=f"delta/{index}",
        index=index,
        text=text,
        modality=turn.modality,
        language=turn.language,
        origin=ORIGIN,
    )


def _completed(turn: TurnAccepted, text: str) -> LlmCompleted:
    return derive(
        turn,
        LlmCompleted,
        key="completed",
        text=text,
        provider="fake",
        model="fake-1",
        modality=turn.modality,
        language=turn.language,
        origin=ORIGIN,
    )


async def _clips(
    log: EventLog, turn: TurnAccepted | TurnRejected | None = None
) -> list[TtsSynthesized]:
    clips = await stream_events(log.js, "LIBRA", "libra.tts.>")
    return [c for c in clips if turn is None or c.turn == turn.turn]


async def _spoken(log: EventLog, turn: TurnAccepted | TurnRejected, timeout: float = 15) -> list:
    async def finished() -> bool:
        return any(c.final for c in await _clips(log, turn))

    await eventually(finished, timeout=timeout)
    return sorted(await _clips(log, turn), key=lambda c: c.index)


def _check_order(clips: list[TtsSynthesized]) -> None:
    assert [c.index for c in clips] == list(range(len(clips)))
    assert [c.final for c in clips] == [False] * (len(clips) - 1) + [True]


async def test_the_first_clip_is_ready_before_the_reply_is_complete(eventlog: EventLog) -> None:
    turn = _turn()
    pieces = ["Hello there. ", "This is ", "Libra speaking. ", "Goodbye for now", "."]
    timed = VOICE_PROCESSING_SECONDS.labels("tts_first_audio")._sum.get()
    async with _tts(eventlog):
        await eventlog.publish(turn)
        for i, piece in enumerate(pieces):
            await eventlog.publish(_delta(turn, i, piece))
            await asyncio.sleep(0.3)  # an llm writing slowly
        spoken_before_the_end = await stream_count(eventlog.js, "LIBRA", "libra.tts.>")
        await eventlog.publish(_completed(turn, "".join(pieces)))
        clips = await _spoken(eventlog, turn)
    assert spoken_before_the_end >= 1
    assert VOICE_PROCESSING_SECONDS.labels("tts_first_audio")._sum.get() > timed
    _check_order(clips)
    said = ["Hello there.", "This is Libra speaking.", "Goodbye for now."]
    assert [c.text for c in clips if c.text] == said
    assert all(c.causation == turn.id for c in clips)
    audio = await AudioStore.open(eventlog)
    for clip in clips:
        assert clip.audio.format == "pcm_s16le"
        assert (clip.audio.sample_rate, clip.audio.channels) == (48_000, 2)
        pcm = await audio.get(clip.audio)
        assert len(pcm) == clip.audio.size and len(pcm) % 4 == 0
        assert clip.audio.duration_ms == len(pcm) * 1000 // (48_000 * 4)
        if clip.text:  # a sentence spoken by espeak-ng: speech, not silence
            assert clip.engine == "espeak" and clip.audio.duration_ms > 500
            assert np.abs(np.frombuffer(pcm, np.int16)).max() > 1000


async def test_the_first_audio_goes_out_at_once_and_later_clips_grow(eventlog: EventLog) -> None:
    turn = _turn()
    reply = "This sentence is long enough to stream in many pieces. Short one."
    async with FakeCartesia() as cartesia:
        engine = CartesiaEngine(
            api_key="sk-car", base_url=cartesia.url, model="sonic-3", voices={"en": "v"}
        )
        async with _tts(eventlog, engine):
            await eventlog.publish(turn)
            await eventlog.publish(_delta(turn, 0, reply))
            await eventlog.publish(_completed(turn, reply))
            clips = await _spoken(eventlog, turn)
    _check_order(clips)
    first_sentence = [c for c in clips if c.index < [c.text for c in clips].index("Short one.")]
    sizes = [c.audio.duration_ms for c in first_sentence]
    assert sizes[0] == 40  # the engine's first piece, sent as it came
    assert 3 <= len(sizes) <= 8  # a handful of clips, not one per piece
    assert all(size >= sum(sizes[:i]) for i, size in enumerate(sizes[:-1]))
    assert sum(sizes) == pytest.approx(len(reply.split(". ")[0] + ".") * 60, abs=5)
    assert [c.text for c in clips if c.text] == [reply.split(" Short")[0], "Short one."]
    assert all(c.engine == "cartesia" and c.ttfb_ms > 0 for c in clips if c.audio.size)


@pytest.mark.parametrize(
    ("language", "reply", "voice"),
    [("ko", "안녕하세요. 만나서 반갑습니다.", "ko"), ("en", "Hello. Nice to meet you.", "en-us")],
)
async def test_the_voice_follows_the_language_of_the_turn(
    eventlog: EventLog, language: str, reply: str, voice: str
) -> None:
    turn = _turn(language)
    async with _tts(eventlog):
        await eventlog.publish(turn)
        await eventlog.publish(_delta(turn, 0, reply))
        await eventlog.publish(_completed(turn, reply))
        clips = await _spoken(eventlog, turn)
    spoken = [c for c in clips if c.audio.size]
    assert len([c for c in spoken if c.text]) == 2
    assert all(c.voice == voice and c.language == language for c in spoken)


async def test_text_turns_are_not_spoken(eventlog: EventLog) -> None:
    text, voice = _turn(modality="text"), _turn()
    async with _tts(eventlog):
        for turn in (text, voice):
            await eventlog.publish(turn)
            await eventlog.publish(_delta(turn, 0, "Hi there!"))
            await eventlog.publish(_completed(turn, "Hi there!"))
        await _spoken(eventlog, voice)
    assert await _clips(eventlog, text) == []


async def test_a_failed_reply_is_spoken_as_its_message(eventlog: EventLog) -> None:
    turn = _turn()
    failed = derive(
        turn,
        LlmFailed,
        key="completed",
        error="timeout",
        message="Sorry, I could not answer that.",
        modality="voice",
        origin=ORIGIN,
    )
    async with _tts(eventlog):
        await eventlog.publish(turn)
        await eventlog.publish(failed)
        clips = await _spoken(eventlog, turn)
    assert [c.text for c in clips if c.text] == ["Sorry, I could not answer that."]
    _check_order(clips)


async def test_a_refused_voice_turn_in_a_call_hears_why(eventlog: EventLog) -> None:
    def refused(platform: str, modality: str = "voice") -> TurnRejected:
        return make(
            TurnRejected,
            conversation=f"{platform}-1-2",
            user=f"{platform}:u1",
            turn=new_id(),
            reason="moderated",
            message="I can't answer that (violence).",
            modality=modality,
            origin=Origin(platform=platform, guild="1", channel="2"),
        )

    call, api, typed = refused("discord"), refused("http"), refused("discord", "text")
    async with _tts(eventlog):
        for event in (api, typed, call):
            await eventlog.publish(event)
        clips = await _spoken(eventlog, call)
    assert [c.text for c in clips if c.text] == ["I can't answer that (violence)."]
    assert all(c.turn == call.turn and c.causation == call.id for c in clips)
    _check_order(clips)
    # the HTTP voice API answers its refusals in the response; a typed message is read
    assert await _clips(eventlog, api) == [] and await _clips(eventlog, typed) == []


async def test_a_reply_that_ends_after_its_last_clip_gets_an_empty_final_clip(
    eventlog: EventLog,
) -> None:
    turn = _turn()
    async with _tts(eventlog):
        await eventlog.publish(turn)
        await eventlog.publish(_delta(turn, 0, "Hello there. "))

        async def first_clip() -> bool:
            return bool(await _clips(eventlog, turn))

        await eventually(first_clip)
        await eventlog.publish(_completed(turn, "Hello there. "))
        *spoken, end = await _spoken(eventlog, turn)
    assert spoken[0].text == "Hello there." and not any(c.final for c in spoken)
    assert end.index == len(spoken) and end.final and end.text == ""
    assert end.audio.size == 0 and end.audio.duration_ms == 0
    assert await (await AudioStore.open(eventlog)).get(end.audio) == b""


async def test_a_reply_already_in_the_log_is_spoken_at_once(eventlog: EventLog) -> None:
    turn = _turn()
    reply = "It was all written before you listened. Still, here it is."
    await eventlog.publish(_delta(turn, 0, reply))
    await eventlog.publish(_completed(turn, reply))
    async with _tts(eventlog):
        await eventlog.publish(turn)
        clips = await _spoken(eventlog, turn, timeout=5)  # not after the follower's idle time
    assert [c.text for c in clips if c.text] == [
        "It was all written before you listened.",
        "Still, here it is.",
    ]


async def test_the_engine_that_spoke_is_in_the_event(eventlog: EventLog) -> None:
    turn = _turn()
    async with FakeCartesia(reply=Behaviour.rate_limited()) as cartesia:
        engine = CartesiaEngine(
            api_key="sk-car", base_url=cartesia.url, model="sonic-3", voices={"en": "v"}
        )
        async with _tts(eventlog, engine, ESPEAK):
            await eventlog.publish(turn)
            await eventlog.publish(_delta(turn, 0, "Can you hear me?"))
            await eventlog.publish(_completed(turn, "Can you hear me?"))
            clips = await _spoken(eventlog, turn)
        assert len(cartesia.requests) == 1
    assert clips[0].engine == "espeak" and clips[0].voice == "en-us"


async def test_the_tts_component_runs_from_the_settings(
    settings: Settings, eventlog: EventLog
) -> None:
    turn = _turn("ko")
    async with running(msgspec.structs.replace(settings, tts_engines="espeak"), ["tts"]):
        await eventlog.publish(turn)
        await eventlog.publish(_delta(turn, 0, "안녕하세요."))
        await eventlog.publish(_completed(turn, "안녕하세요."))
        clips = await _spoken(eventlog, turn)
    assert clips[0].engine == "espeak" and clips[0].voice == "ko"
