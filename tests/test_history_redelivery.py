"""The history projection given a batch that is partly applied already, as after a crash
between commit and ack: the new events go in once, the old rows stay as they were."""

from __future__ import annotations

import asyncpg

from libra.contracts import LlmCompleted, TurnAccepted, derive
from libra.projections.history import HistoryProjection
from libra.runtime.eventlog import EventLog
from libra.runtime.projection import Recorded, _apply_batch, rebuild

from .factories import ORIGIN, text


def _exchange(i: int, conversation: str) -> list:
    said = text(conversation=conversation, message=f"question {i}")
    turn = derive(
        said, TurnAccepted, key="turn", text=said.text, origin=ORIGIN, received_at=said.at
    )
    answer = derive(
        turn,
        LlmCompleted,
        key="completed",
        text=f"answer {i}",
        provider="openai",
        model="gpt-test",
        origin=ORIGIN,
    )
    return [turn, answer]  # what history folds: the admitted turn and its answer


async def _rows(pool: asyncpg.Pool) -> list[tuple]:
    messages = await pool.fetch("SELECT * FROM messages ORDER BY event_id")
    conversations = await pool.fetch("SELECT * FROM conversations ORDER BY id")
    return [tuple(r) for r in messages] + [tuple(r) for r in conversations]


async def test_a_batch_partly_applied_adds_only_what_is_new(
    eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    events = [e for i in range(6) for e in _exchange(i, f"discord-1-{i % 2}")]
    await eventlog.publish_many(events)
    recorded = [Recorded(seq, event) for seq, event in enumerate(events, start=1)]
    async with pool.acquire() as conn:
        await _apply_batch(conn, HistoryProjection(), recorded[:5])
        before = await _rows(pool)
        # the first five again (a redelivery) with the rest: the copy meets rows that are there
        await _apply_batch(conn, HistoryProjection(), recorded[3:] + recorded[:3])
    incremental = await _rows(pool)
    assert await pool.fetchval("SELECT count(*) FROM messages") == 12
    assert set(before[:5]) <= set(incremental)
    assert await rebuild(eventlog, pool, HistoryProjection()) == 12
    assert await _rows(pool) == incremental
