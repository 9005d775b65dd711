"""`libra replay`: recorded inputs through one processor again, isolated from the live log."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import msgspec
import numpy as np
import pytest
import redis.asyncio as aioredis

from libra.contracts import (
    AsrTranscribed,
    LlmCompleted,
    Origin,
    TextReceived,
    TurnAccepted,
    TurnRejected,
    VoiceCaptured,
    make,
)
from libra.gateway.chat import converse
from libra.ops.fakes.groq_whisper import FakeGroqWhisper
from libra.ops.fakes.llm_wire import OPENAI_CHAT, Behaviour, FakeLlmWire
from libra.ops.replay import REPLAY_STREAM, Selection, parse_moment, replay
from libra.processors.turns.ratelimit import key_for
from libra.runtime.audio import AudioStore
from libra.runtime.config import Settings
from libra.runtime.eventlog import EventLog

from .helpers import eventually, stream_count, stream_events
from .stack import TEXT_PIPELINE, running

VOICE = Origin(platform="discord", guild="5", channel="6")
FIRST = "Biscuit is a fine name for a dog."
SECOND = "Your dog is called Biscuit, and he loves the beach."


def _settings(settings: Settings, wire: FakeLlmWire) -> Settings:
    return Settings.from_env(
        {
            "NATS_URL": settings.nats_url,
            "DATABASE_URL": settings.database_url,
            "REDIS_URL": settings.redis_url,
            "OPENAI_API_KEY": "sk-test-key",
            "OPENAI_BASE_URL": wire.env()["OPENAI_BASE_URL"],
        }
    )


async def _talk(log: EventLog, user: str, texts: list[str]) -> list[str]:
    """Has ``user`` say each text in turn, waiting for each reply; returns the turns' ids."""
    turns = []
    for text in texts:
        async for event in converse(log, platform="http", user=user, text=text):
            if isinstance(event, TurnAccepted):
                turns.append(event.id)
    return turns


async def _settled(pool, messages: int, memories: int) -> None:
    async def done() -> bool:
        have = await pool.fetchval("SELECT count(*) FROM messages")
        remembered = await pool.fetchval("SELECT count(*) FROM memories")
        return have >= messages and remembered >= memories

    await eventually(done, timeout=20)


async def test_llm_replay_is_isolated_and_compares_with_the_record(
    settings, eventlog: EventLog, pool
) -> None:
    log = eventlog
    async with FakeLlmWire(reply=Behaviour.ok(FIRST)) as wire:
        s = _settings(settings, wire)
        async with running(s, TEXT_PIPELINE) as resources:
            said = ["My dog is Biscuit.", "What is my dog called?"]
            alice = await _talk(resources.log, "alice", said)
            await _talk(resources.log, "bob", ["Hello there."])
            await _settled(pool, messages=6, memories=3)
        recorded = await stream_events(log.js, "LIBRA", "libra.llm.completed.>")
        live_before = (await log.js.stream_info("LIBRA")).state.messages

        wire.reset()
        wire.always(OPENAI_CHAT, Behaviour.ok(SECOND))
        seen_live: list[str] = []

        async def note(msg) -> None:
            seen_live.append(msg.subject)

        spy = await log.nc.subscribe("libra.>", cb=note)
        lines: list[str] = []
        result = await replay(
            s,
            "llm",
            Selection(conversation="http-alice"),
            compare=True,
            run="t1",
            say=lines.append,
        )
        await spy.unsubscribe()

        assert result.inputs == 2 and result.errors == 0
        assert [item.input.id for item in result.replayed] == alice
        assert seen_live == [] and (await log.js.stream_info("LIBRA")).state.messages == live_before
        replayed = await stream_events(log.js, REPLAY_STREAM, "replay.t1.llm.completed.>")
        assert [e.text for e in replayed] == [SECOND, SECOND]
        # An output keeps the id of the recorded output it stands for.
        by_turn = {e.causation: e.id for e in recorded if isinstance(e, LlmCompleted)}
        assert [e.id for e in replayed] == [by_turn[t] for t in alice]
        assert await stream_count(log.js, REPLAY_STREAM, "replay.t1.llm.delta.http-alice") >= 2

        # The prompts were those of the turns' own time: the first turn saw no history and no
        # memory, although both hold the later exchanges now.
        calls = {call.messages[-1]["content"]: call for call in wire.calls(OPENAI_CHAT)}
        first, second = calls[said[0]], calls[said[1]]
        assert [m["role"] for m in first.messages] == ["system", "user"]
        assert "Earlier exchanges" not in first.messages[0]["content"]
        assert [m["role"] for m in second.messages] == ["system", "user", "assistant", "user"]
        assert "Earlier exchanges" in second.messages[0]["content"]

        text = "\n".join(lines)
        assert text.count("llm.completed: text ") == 2 and "«Your dog is called Biscuit" in text
        assert "model openai/gpt-4o-mini → openai/gpt-4o-mini" in text and "tokens " in text
        assert "replayed 2 input(s) through llm" in lines[-1] and "replay.t1.>" in lines[-1]


async def test_turns_replay_decides_against_a_rate_limit_of_its_own(
    settings, eventlog: EventLog, redis_url
) -> None:
    async with running(settings, ["turns"]):
        for i in range(12):  # one at a time: the recorded decisions follow the log's order
            said = make(
                TextReceived,
                conversation="http-carol",
                user="carol",
                text=f"message {i}",
                origin=Origin(platform="http"),
            )
            await eventlog.publish(said)
            await eventually(lambda n=i + 1: _decided(eventlog, n))
    live = aioredis.from_url(redis_url)
    window_before = await live.zrange(key_for("http:carol"), 0, -1)

    lines: list[str] = []
    result = await replay(
        settings, "turns", Selection(user="carol"), compare=True, run="t2", say=lines.append
    )
    assert result.inputs == 12 and result.errors == 0
    decided = [type(item.outputs[0]) for item in result.replayed]
    assert decided == [TurnAccepted] * 10 + [TurnRejected] * 2  # the recorded order, again
    assert sum("turn.accepted: text the same" in line for line in lines) == 10
    assert sum("turn.rejected: the same" in line for line in lines) == 2
    assert await live.zrange(key_for("http:carol"), 0, -1) == window_before
    await live.aclose()


async def _decided(log: EventLog, n: int) -> bool:
    return await stream_count(log.js, "LIBRA", "libra.turn.>") >= n


async def test_replay_selects_by_turn_and_time_from_the_command_line(settings, pool) -> None:
    async with FakeLlmWire(reply=Behaviour.ok(FIRST)) as wire:
        s = _settings(settings, wire)
        async with running(s, TEXT_PIPELINE) as resources:
            turns = await _talk(resources.log, "dora", ["one", "two", "three"])
        env = os.environ | {
            "NATS_URL": s.nats_url,
            "DATABASE_URL": s.database_url,
            "REDIS_URL": s.redis_url,
            "OPENAI_API_KEY": "sk-test-key",
            "OPENAI_BASE_URL": wire.env()["OPENAI_BASE_URL"],
            "LOG_FORMAT": "console",
        }

        async def libra(*args: str) -> subprocess.CompletedProcess:
            return await asyncio.to_thread(  # the fake provider answers from this event loop
                subprocess.run,
                [sys.executable, "-m", "libra.ops", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )

        picked = await libra("replay", "llm", "--turn", turns[1], "--compare")
        assert picked.returncode == 0, picked.stderr
        assert f"turn.accepted {turns[1]}" in picked.stdout and turns[0] not in picked.stdout
        assert "replayed 1 input(s) through llm" in picked.stdout
        windowed = await libra("replay", "llm", "--since", "10m", "--limit", "2")
        assert "replayed 2 input(s)" in windowed.stdout, windowed.stderr
        unknown = await libra("replay", "discord")
        assert unknown.returncode == 2 and "known: turns, llm, asr" in unknown.stderr


def test_selection_reads_times_and_narrows_subjects() -> None:
    now = datetime(2025, 5, 1, 12, tzinfo=UTC)
    assert parse_moment("90m", now=now) == now - timedelta(minutes=90)
    assert parse_moment("2025-05-01T10:00:00") == datetime(2025, 5, 1, 10, tzinfo=UTC)
    with pytest.raises(ValueError):
        parse_moment("yesterday-ish")
    inputs = ("libra.text.received.>", "libra.asr.transcribed.>")
    assert Selection(conversation="http-a").filters(inputs) == [
        "libra.text.received.http-a",
        "libra.asr.transcribed.http-a",
    ]
    assert Selection(subject="libra.text.>").filters(inputs) == ["libra.text.>"]
    assert Selection().filters(inputs) == list(inputs)


async def test_asr_replay_hears_the_recorded_audio_again(settings, eventlog: EventLog) -> None:
    tone = (np.sin(np.arange(16_000) * 2 * np.pi * 220 / 16_000) * 8000).astype(np.int16)
    async with FakeGroqWhisper(transcript="Is anyone there?") as fake:
        s = msgspec.structs.replace(
            settings, asr_engines="groq", groq_api_key="gsk-test", groq_base_url=fake.url
        )
        async with running(s, ["asr"]):
            audio = await AudioStore.open(eventlog)
            ref = await audio.put(
                "voice/t/1", tone.tobytes(), format="pcm_s16le", sample_rate=16_000
            )
            captured = make(
                VoiceCaptured, conversation="discord-5-6", user="u5", audio=ref, origin=VOICE
            )
            await eventlog.publish(captured)
            await eventually(lambda: _transcribed(eventlog))
        [recorded] = await stream_events(eventlog.js, "LIBRA", "libra.asr.>")
        fake.transcript = "Is anybody there?"
        lines: list[str] = []
        result = await replay(
            s,
            "asr",
            Selection(conversation="discord-5-6"),
            compare=True,
            run="t3",
            say=lines.append,
        )
    assert result.inputs == 1 and result.errors == 0 and len(fake.requests) == 2
    [again] = await stream_events(eventlog.js, REPLAY_STREAM, "replay.t3.asr.>")
    assert isinstance(again, AsrTranscribed) and again.id == recorded.id
    assert again.text == "Is anybody there?"
    text = "\n".join(lines)
    assert "asr.transcribed: text " in text and "«Is anybody there?»" in text and "latency " in text


async def _transcribed(log: EventLog) -> bool:
    return await stream_count(log.js, "LIBRA", "libra.asr.>") >= 1
