"""Answering a voice turn before its end is certain: started at the first short pause, spoken only
once the silence is confirmed, dropped without a trace when the person goes on talking."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec
import numpy as np
import pytest
import redis.asyncio as aioredis

from libra.contracts import (
    AsrTranscribed,
    LlmCompleted,
    LlmDelta,
    LlmFailed,
    Origin,
    TextReceived,
    TtsSynthesized,
    TurnAbandoned,
    TurnAccepted,
    TurnConfirmed,
    TurnRejected,
    VoiceCaptured,
    VoiceEnded,
    VoiceResumed,
    derive,
    make,
)
from libra.gateway.voice import VoiceCapture
from libra.ops.embedded import free_port
from libra.ops.fakes.groq_whisper import FakeGroqWhisper
from libra.ops.fakes.llm_wire import OPENAI_CHAT, Behaviour, FakeLlmWire
from libra.processors.llm.chain import ProviderChain
from libra.processors.llm.context import Context, PromptBuilder
from libra.processors.llm.prefetch import ContextPrefetch
from libra.processors.llm.processor import LlmProcessor
from libra.processors.tts.chain import TtsChain
from libra.processors.tts.espeak import EspeakEngine
from libra.processors.tts.processor import TtsProcessor
from libra.processors.turns.admission import TurnsProcessor
from libra.processors.turns.ratelimit import RateLimiter, key_for
from libra.processors.turns.view import RateLimitView
from libra.runtime.audio import AudioStore
from libra.runtime.config import Settings
from libra.runtime.consumer import ConsumerRunner
from libra.runtime.eventlog import EventLog

from .factories import AUDIO
from .factories import text as written
from .helpers import eventually, stream_events
from .stack import TEXT_PIPELINE, running
from .voice_samples import discord_pcm, silence, speech, speech_spans

ORIGIN = Origin(platform="discord", guild="1", channel="2")
REPLY = "Sure. I can help with that right away."


# --- admission ----------------------------------------------------------------------------


@pytest.fixture
async def redis(redis_url):
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


def _turns(redis, *, limit: int = 10, **kw) -> TurnsProcessor:
    limiter = RateLimiter(redis, limit=limit, window_s=10)
    return TurnsProcessor(redis, limiter, speculate=True, **kw)


async def _decide(processor: TurnsProcessor, event) -> list:
    return [out async for out in processor.handle(event)]


def _utterance(text: str = "what time is it", *, user: str = "u1", reply: bool = True):
    """A speculative capture, its transcript, and the two ways its turn can go."""
    capture = make(
        VoiceCaptured,
        conversation="discord-1-2",
        user=user,
        audio=AUDIO,
        origin=ORIGIN,
        speculative=True,
        reply=reply,
    )
    heard = derive(
        capture,
        AsrTranscribed,
        key="asr",
        text=text,
        language="en",
        engine="groq",
        speculative=True,
        reply=reply,
        origin=ORIGIN,
    )
    ended = derive(capture, VoiceEnded, key="ended", captured=capture.id, origin=ORIGIN)
    resumed = derive(capture, VoiceResumed, key="resumed", captured=capture.id, origin=ORIGIN)
    return capture, heard, ended, resumed


async def test_a_speculative_transcript_is_answered_at_once_then_confirmed(redis) -> None:
    processor = _turns(redis)
    capture, heard, ended, _ = _utterance()
    [started] = await _decide(processor, heard)
    assert isinstance(started, TurnAccepted) and started.speculative
    assert started.turn == capture.id and started.modality == "voice" and started.text == heard.text
    assert await redis.zcard(key_for("u1")) == 0  # not counted until it is a turn
    again = await _decide(processor, heard)  # a redelivery: the same event, the same id
    assert [(type(e), e.id) for e in again] == [(TurnAccepted, started.id)]
    [confirmed] = await _decide(processor, ended)
    assert isinstance(confirmed, TurnConfirmed) and confirmed.turn == capture.id
    assert confirmed.causation == ended.id and confirmed.received_at == heard.at
    assert await redis.zcard(key_for("u1")) == 1
    assert [e.id for e in await _decide(processor, ended)] == [confirmed.id]


async def test_talking_on_abandons_the_started_turn(redis) -> None:
    processor = _turns(redis)
    _, heard, _, resumed = _utterance()
    [started] = await _decide(processor, heard)
    [abandoned] = await _decide(processor, resumed)
    assert isinstance(abandoned, TurnAbandoned) and abandoned.turn == started.turn
    assert await redis.zcard(key_for("u1")) == 0
    # talking on before the transcript came: nothing is started at all
    _, heard2, _, resumed2 = _utterance()
    assert await _decide(processor, resumed2) == []
    assert await _decide(processor, heard2) == []


async def test_an_end_before_the_transcript_admits_it_as_usual(redis) -> None:
    processor = _turns(redis)
    _, heard, ended, _ = _utterance()
    assert await _decide(processor, ended) == []
    [accepted] = await _decide(processor, heard)
    assert isinstance(accepted, TurnAccepted) and not accepted.speculative


async def test_the_rate_limit_is_decided_at_the_confirmation(redis) -> None:
    processor = _turns(redis, limit=1)
    _, first, first_end, _ = _utterance()
    await _decide(processor, first)
    [ok] = await _decide(processor, first_end)
    assert isinstance(ok, TurnConfirmed)
    _, second, second_end, _ = _utterance()
    [started] = await _decide(processor, second)
    assert started.speculative  # started, then refused when it became a turn
    [refused] = await _decide(processor, second_end)
    assert isinstance(refused, TurnRejected) and refused.reason == "rate_limited"
    assert refused.turn == started.turn and refused.retry_after_s > 0


async def test_input_that_would_be_refused_is_not_started(redis) -> None:
    processor = _turns(redis, blocked_words=frozenset({"forbidden"}))
    _, heard, ended, _ = _utterance("say the forbidden word")
    assert await _decide(processor, heard) == []
    [refused] = await _decide(processor, ended)
    assert isinstance(refused, TurnRejected) and refused.reason == "moderated"


async def test_transcribing_only_makes_no_turn_even_with_speculation(redis) -> None:
    processor = _turns(redis)
    _, heard, ended, _ = _utterance(reply=False)
    assert await _decide(processor, heard) == []
    assert await _decide(processor, ended) == []


async def test_the_rate_limit_view_writes_confirmed_turns_redis_did_not_count(redis) -> None:
    view = RateLimitView(RateLimiter(redis, limit=10, window_s=10))
    processor = _turns(redis)
    _, heard, ended, _ = _utterance(user="u9")
    [started] = await _decide(processor, heard)
    [confirmed] = await _decide(processor, ended)
    assert confirmed.degraded == ()  # Redis decided it, and its script wrote it
    await redis.delete(key_for("u9"))
    await view.handle(confirmed)
    assert await redis.zcard(key_for("u9")) == 0  # not written a second time
    # as if admitted while Redis was down: the view writes it once Redis is back
    await view.handle(msgspec.structs.replace(started, degraded=("redis",)))
    assert await redis.zcard(key_for("u9")) == 0  # a speculation is no turn yet
    await view.handle(msgspec.structs.replace(confirmed, degraded=("redis",)))
    assert await redis.zscore(key_for("u9"), confirmed.turn) == int(heard.at.timestamp() * 1000)


# --- the llm and the tts hold a speculative turn's reply ----------------------------------


def _accepted() -> TurnAccepted:
    _, heard, _, _ = _utterance()
    return derive(
        heard,
        TurnAccepted,
        key="turn",
        text=heard.text,
        language="en",
        modality="voice",
        origin=ORIGIN,
        speculative=True,
    )


def _decision(turn: TurnAccepted, kind: type):
    return derive(turn, kind, key="decided", origin=ORIGIN)


@contextlib.asynccontextmanager
async def _consuming(log: EventLog, *processors) -> AsyncIterator[None]:
    runners = [ConsumerRunner(log, p) for p in processors]
    tasks = [asyncio.create_task(r.run()) for r in runners]
    try:
        yield
    finally:
        for runner in runners:
            await runner.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)


def _llm(log: EventLog, wire: FakeLlmWire) -> LlmProcessor:
    env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": wire.env()["OPENAI_BASE_URL"]}
    chain = ProviderChain.from_settings(Settings.from_env(env))
    return LlmProcessor(chain, PromptBuilder(None, None), log=log)


async def _deltas(log: EventLog) -> int:
    """How many deltas were written (read without waiting for the stream to go quiet)."""
    return (await log.js.stream_info("LIBRA_LIVE")).state.messages


async def _of(log: EventLog, turn: TurnAccepted, stream: str = "LIBRA") -> list:
    return [e for e in await stream_events(log.js, stream, "libra.>") if e.turn == turn.turn]


async def test_the_reply_is_written_at_once_and_completed_once_confirmed(
    eventlog: EventLog,
) -> None:
    turn = _accepted()
    async with (
        FakeLlmWire(reply=Behaviour.ok(REPLY)) as wire,
        _consuming(eventlog, _llm(eventlog, wire)),
    ):
        await eventlog.publish(turn)

        async def written() -> bool:
            return await _deltas(eventlog) >= 2

        await eventually(written)
        await asyncio.sleep(0.3)  # the provider has long finished: still nothing is recorded
        assert [type(e) for e in await _of(eventlog, turn)] == [TurnAccepted]
        confirmed = _decision(turn, TurnConfirmed)
        await eventlog.publish(confirmed)

        async def completed() -> bool:
            return any(isinstance(e, LlmCompleted) for e in await _of(eventlog, turn))

        await eventually(completed)
    (done,) = [e for e in await _of(eventlog, turn) if isinstance(e, LlmCompleted)]
    assert done.text == REPLY and done.at >= confirmed.at and done.first_delta_at < confirmed.at
    deltas = [e for e in await _of(eventlog, turn, "LIBRA_LIVE") if isinstance(e, LlmDelta)]
    assert "".join(d.text for d in sorted(deltas, key=lambda d: d.index)) == REPLY


@pytest.mark.parametrize("decision", [TurnAbandoned, TurnRejected], ids=["abandoned", "rejected"])
async def test_a_dropped_turn_stops_its_reply_and_records_nothing(
    eventlog: EventLog, decision: type
) -> None:
    turn = _accepted()
    slow = Behaviour.ok(" ".join(["word"] * 200), ttft=0.1, tokens_per_sec=20)
    async with FakeLlmWire(reply=slow) as wire, _consuming(eventlog, _llm(eventlog, wire)):
        await eventlog.publish(turn)

        async def writing() -> bool:
            return await _deltas(eventlog) > 0

        await eventually(writing)
        if decision is TurnRejected:
            dropped = derive(
                turn,
                TurnRejected,
                key="decided",
                reason="rate_limited",
                message="slow down",
                origin=ORIGIN,
            )
        else:
            dropped = _decision(turn, decision)
        await eventlog.publish(dropped)
        await asyncio.sleep(0.5)
        written = await _deltas(eventlog)
        await asyncio.sleep(0.5)
        assert await _deltas(eventlog) == written  # it stopped writing
        assert written < 50  # long before the 10 s reply's end
        assert wire.count(OPENAI_CHAT) == 1
    recorded = [type(e) for e in await _of(eventlog, turn)]
    assert LlmCompleted not in recorded and LlmFailed not in recorded


async def test_a_confirmation_that_came_first_is_read_back_from_the_log(
    eventlog: EventLog,
) -> None:
    turn = _accepted()
    await eventlog.publish(turn)
    await eventlog.publish(_decision(turn, TurnConfirmed))  # before the llm was even running
    async with (
        FakeLlmWire(reply=Behaviour.ok(REPLY)) as wire,
        _consuming(eventlog, _llm(eventlog, wire)),
    ):

        async def completed() -> bool:
            return any(isinstance(e, LlmCompleted) for e in await _of(eventlog, turn))

        await eventually(completed, timeout=10)


class _CountingPrompts(PromptBuilder):
    """A prompt builder without a database that notes each turn whose context it reads."""

    def __init__(self) -> None:
        super().__init__(None, None)
        self.read: list[str] = []

    async def context(self, turn: TurnAccepted) -> Context:
        self.read.append(turn.turn)
        return await super().context(turn)


def _said(text: str, modality: str) -> AsrTranscribed | TextReceived:
    """What admission will make a turn of: a transcript, or a written message."""
    if modality == "voice":
        return _utterance(text)[1]
    return written(message=text)


@pytest.mark.parametrize("modality", ["voice", "text"])
async def test_a_turns_context_is_read_while_admission_decides(
    eventlog: EventLog, modality: str
) -> None:
    prompts = _CountingPrompts()
    async with FakeLlmWire(reply=Behaviour.ok(REPLY)) as wire:
        env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": wire.env()["OPENAI_BASE_URL"]}
        llm = LlmProcessor(
            ProviderChain.from_settings(Settings.from_env(env)),
            prompts,
            log=eventlog,
            prefetch=ContextPrefetch(eventlog, prompts),
        )
        async with _consuming(eventlog, llm):
            turns = []
            for text, kept in [("first", "first"), ("second", "second"), ("heard", "said")]:
                said = _said(text, modality)
                turn = derive(
                    said,
                    TurnAccepted,
                    key="turn",
                    text=kept,
                    modality=modality,
                    origin=ORIGIN,
                )
                await eventlog.publish(said)  # what the llm hears ahead of admission
                await asyncio.sleep(0.2)
                await eventlog.publish(turn)

                async def answered(turn: TurnAccepted = turn) -> bool:
                    done = [e for e in await _of(eventlog, turn) if isinstance(e, LlmCompleted)]
                    return bool(done)

                await eventually(answered)
                turns.append(turn.turn)
    first, second, changed = turns
    # the first turn starts the listening; the second's context was read once, ahead; a turn
    # whose text is not what was said (admission trimmed it, say) is read again
    assert prompts.read.count(first) == 1
    assert prompts.read.count(second) == 1 and prompts.read.index(second) == 1
    assert prompts.read.count(changed) == 2


def _tts(log: EventLog, audio: AudioStore) -> TtsProcessor:
    return TtsProcessor(log, audio, TtsChain([EspeakEngine({"en": "en-us"})], timeout_s=5))


async def _reply(log: EventLog, turn: TurnAccepted) -> None:
    for i, piece in enumerate(["Hello there. ", "It is sunny today. ", "Bye."]):
        await log.publish(
            derive(
                turn,
                LlmDelta,
                key=f"delta/{i}",
                index=i,
                text=piece,
                modality="voice",
                origin=ORIGIN,
            )
        )


async def test_speech_is_made_at_once_and_published_once_confirmed(eventlog: EventLog) -> None:
    turn = _accepted()
    audio = await AudioStore.open(eventlog)
    async with _consuming(eventlog, _tts(eventlog, audio)):
        await eventlog.publish(turn)
        await _reply(eventlog, turn)
        made = await _objects(eventlog)

        async def synthesized() -> bool:  # the audio is stored while the turn is undecided
            return await _objects(eventlog) >= made + 2

        await eventually(synthesized)
        assert not [e for e in await _of(eventlog, turn) if isinstance(e, TtsSynthesized)]
        confirmed = _decision(turn, TurnConfirmed)
        await eventlog.publish(confirmed)
        await eventlog.publish(
            derive(
                turn,
                LlmCompleted,
                key="completed",
                text="Hello there. It is sunny today. Bye.",
                provider="fake",
                model="m",
                modality="voice",
                origin=ORIGIN,
            )
        )

        async def spoken() -> bool:
            clips = await _of(eventlog, turn)
            return any(isinstance(c, TtsSynthesized) and c.final for c in clips)

        await eventually(spoken, timeout=15)
    clips = sorted(
        (c for c in await _of(eventlog, turn) if isinstance(c, TtsSynthesized)),
        key=lambda c: c.index,
    )
    assert [c.index for c in clips] == list(range(len(clips)))
    assert [c.text for c in clips if c.text] == ["Hello there.", "It is sunny today.", "Bye."]
    assert all(c.at >= confirmed.at for c in clips)  # released, not made, at that moment


async def test_speech_for_an_abandoned_turn_is_never_published(eventlog: EventLog) -> None:
    turn = _accepted()
    audio = await AudioStore.open(eventlog)
    async with _consuming(eventlog, _tts(eventlog, audio)):
        await eventlog.publish(turn)
        await _reply(eventlog, turn)
        made = await _objects(eventlog)

        async def synthesized() -> bool:
            return await _objects(eventlog) > made

        await eventually(synthesized)
        await eventlog.publish(_decision(turn, TurnAbandoned))

        async def settled() -> bool:  # the turn is settled, not left waiting
            info = await eventlog.js.consumer_info("LIBRA", "tts")
            return info.num_ack_pending == 0 and info.num_pending == 0

        await eventually(settled)
    assert not [e for e in await _of(eventlog, turn) if isinstance(e, TtsSynthesized)]


async def _objects(log: EventLog) -> int:
    info = await log.js.stream_info("OBJ_libra-audio")
    return info.state.messages


# --- the whole path: a pause, talking on, then the end --------------------------------------


async def test_a_pause_then_talking_on_leaves_one_turn_in_history(settings, pool) -> None:
    said = "One moment please, what time is it?"
    async with (
        FakeGroqWhisper(transcript=said) as whisper,
        FakeLlmWire(reply=Behaviour.ok(REPLY, ttft=0.6, tokens_per_sec=50)) as wire,
    ):
        s = Settings.from_env(
            {
                "NATS_URL": settings.nats_url,
                "DATABASE_URL": settings.database_url,
                "REDIS_URL": settings.redis_url,
                "HTTP_PORT": str(free_port()),
                "LLM_CACHE_ENABLED": "0",
                "LLM_PROVIDERS": "openai",
                "OPENAI_API_KEY": "sk-test",
                "OPENAI_BASE_URL": wire.env()["OPENAI_BASE_URL"],
                "GROQ_API_KEY": "gsk-test",
                **whisper.env(),
                "ASR_ENGINES": "groq",
                "TTS_ENGINES": "espeak",
                "VOICE_SPECULATIVE_REPLY": "1",
            }
        )
        async with running(s, [*TEXT_PIPELINE, "asr", "tts"]) as resources:
            log = resources.log
            # a pause of about 400 ms (espeak's own silences and 100 ms): a speculative cut
            # (150 ms) that the silence rule (500 ms) never confirms: the person goes on talking
            parts = [
                silence(300),
                speech("One moment", "en-us"),
                silence(100),
                speech("what time is it?", "en-us"),
                silence(1000),
            ]
            (_, paused), (resumed, _) = speech_spans(parts)
            assert 300 < resumed - paused < 450
            samples = np.concatenate(parts)
            pcm = discord_pcm(samples)
            async with VoiceCapture(
                log,
                await AudioStore.open(log),
                conversation="discord-1-2",
                user="discord:u1",
                origin=ORIGIN,
            ) as capture:
                loop = asyncio.get_running_loop()
                start = loop.time()
                for i, at in enumerate(range(0, len(pcm), 3840)):  # in real time, as Discord
                    await asyncio.sleep(max(0.0, start + (i + 1) * 0.02 - loop.time()))
                    capture.feed(pcm[at : at + 3840])

            async def answered() -> bool:
                clips = await stream_events(log.js, "LIBRA", "libra.tts.>")
                return any(c.final for c in clips)

            await eventually(answered, timeout=20)

            async def recorded() -> bool:
                sql = "SELECT count(*) FROM memories WHERE user_id = 'discord:u1'"
                return await pool.fetchval(sql) >= 1

            await eventually(recorded, timeout=10)
            events = await stream_events(log.js, "LIBRA", "libra.>")
        abandoned = [e for e in events if isinstance(e, TurnAbandoned)]
        confirmed = [e for e in events if isinstance(e, TurnConfirmed)]
        assert len(abandoned) >= 1 and len(confirmed) == 1
        assert {e.turn for e in events if isinstance(e, VoiceResumed)} >= {
            a.turn for a in abandoned
        }
        (answer,) = [e for e in events if isinstance(e, LlmCompleted)]
        assert answer.turn == confirmed[0].turn and answer.text == REPLY
        spoken = {e.turn for e in events if isinstance(e, TtsSynthesized)}
        assert spoken == {answer.turn}
        assert wire.count(OPENAI_CHAT) == len(abandoned) + 1  # each drafted, only one answered
        # history, memory and the turns table hold the one turn that happened
        rows = await pool.fetch(
            "SELECT turn, role FROM messages WHERE user_id = 'discord:u1' ORDER BY at"
        )
        assert [(r["turn"], r["role"]) for r in rows] == [
            (answer.turn, "user"),
            (answer.turn, "assistant"),
        ]
        assert await pool.fetchval("SELECT count(*) FROM memories") == 1

        async def projected() -> bool:
            sql = "SELECT count(*) FROM turns WHERE status = 'abandoned'"
            return await pool.fetchval(sql) == len(abandoned)

        await eventually(projected, timeout=10)
        row = await pool.fetchrow("SELECT * FROM turns WHERE turn = $1", answer.turn)
        assert row["status"] == "completed" and row["accepted_at"] is not None
        assert row["accepted_at"] < row["first_delta_at"] < row["completed_at"]
