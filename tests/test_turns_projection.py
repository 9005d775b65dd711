"""The turns projection: one row per turn, every stage's time, order-independent, rebuildable."""

from __future__ import annotations

import random

from libra.contracts import (
    AsrTranscribed,
    LlmCompleted,
    ReplyDelivered,
    TtsSynthesized,
    TurnAccepted,
    TurnRejected,
    VoiceCaptured,
    derive,
    make,
)
from libra.projections.turns import TurnsProjection
from libra.runtime.projection import Recorded, _apply_batch, rebuild

from .factories import AUDIO, ORIGIN, text


def _text_turn():
    said = text()
    accepted = derive(said, TurnAccepted, key="turn", text=said.text, language="ko", origin=ORIGIN)
    done = derive(
        accepted,
        LlmCompleted,
        key="c",
        text="네",
        provider="groq",
        model="m",
        prompt_tokens=12,
        completion_tokens=3,
        ttft_ms=80,
        total_ms=120,
        first_delta_at=accepted.at,
        origin=ORIGIN,
    )
    delivered = derive(done, ReplyDelivered, key="d", message_ids=("9",), origin=ORIGIN)
    return [said, accepted, done, delivered]


def _voice_turn():
    captured = make(
        VoiceCaptured,
        conversation="discord-1-2",
        user="discord:u1",
        audio=AUDIO,
        origin=ORIGIN,
        speech_ended_at=ORIGIN and text().at,
    )
    heard = derive(
        captured,
        AsrTranscribed,
        key="asr",
        text="hi",
        engine="whisper",
        latency_ms=250,
        origin=ORIGIN,
    )
    accepted = derive(heard, TurnAccepted, key="turn", text="hi", modality="voice", origin=ORIGIN)
    done = derive(
        accepted,
        LlmCompleted,
        key="c",
        text="hello",
        provider="openai",
        model="m",
        modality="voice",
        origin=ORIGIN,
    )
    clip = derive(
        done,
        TtsSynthesized,
        key="tts0",
        audio=AUDIO,
        index=0,
        text="hello",
        engine="espeak",
        ttfb_ms=40,
        origin=ORIGIN,
    )
    return [captured, heard, accepted, done, clip]


async def _apply(pool, events) -> None:
    async with pool.acquire() as conn:
        await _apply_batch(
            conn, TurnsProjection(), [Recorded(i + 1, e) for i, e in enumerate(events)]
        )


async def test_text_turn_row(pool) -> None:
    events = _text_turn()
    await _apply(pool, events)
    row = await pool.fetchrow("SELECT * FROM turns")
    assert row["turn"] == events[0].id and row["status"] == "delivered" and row["language"] == "ko"
    assert row["received_at"] == events[0].at and row["delivered_at"] == events[3].at
    assert (row["provider"], row["prompt_tokens"], row["completion_tokens"]) == ("groq", 12, 3)


async def test_voice_turn_row(pool) -> None:
    events = _voice_turn()
    await _apply(pool, events)
    row = await pool.fetchrow("SELECT * FROM turns")
    assert row["modality"] == "voice" and row["asr_engine"] == "whisper" and row["asr_ms"] == 250
    assert row["first_audio_at"] == events[-1].at and row["tts_engine"] == "espeak"
    assert row["received_at"] == events[0].at  # the capture, not the transcript


async def test_any_order_and_duplicates_give_the_same_row(pool) -> None:
    events = _text_turn()
    await _apply(pool, events)
    expected = dict(await pool.fetchrow("SELECT * FROM turns"))
    await pool.execute("TRUNCATE turns")
    shuffled = events * 2
    random.Random(7).shuffle(shuffled)
    for event in shuffled:
        await _apply(pool, [event])
    assert dict(await pool.fetchrow("SELECT * FROM turns")) == expected


async def test_a_rejected_turn_stays_rejected(pool) -> None:
    said = text()
    await _apply(
        pool,
        [
            derive(
                said,
                TurnRejected,
                key="turn",
                reason="rate_limited",
                message="x",
                retry_after_s=3,
                origin=ORIGIN,
            ),
            said,
        ],
    )
    row = await pool.fetchrow("SELECT status, reject_reason FROM turns")
    assert tuple(row) == ("rejected", "rate_limited")


async def test_rebuild_equals_incremental(pool, eventlog) -> None:
    events = [e for _ in range(20) for e in _text_turn() + _voice_turn()]
    await eventlog.publish_many(events)
    await _apply(pool, events)
    incremental = [dict(r) for r in await pool.fetch("SELECT * FROM turns ORDER BY turn")]
    assert await rebuild(eventlog, pool, TurnsProjection()) == len(events)
    assert [dict(r) for r in await pool.fetch("SELECT * FROM turns ORDER BY turn")] == incremental
