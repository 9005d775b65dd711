"""The history projection on real JetStream and Postgres: batched, checkpointed, rebuildable."""

from __future__ import annotations

import asyncio
import shutil

import asyncpg
import msgspec

from libra.contracts import CONSUMERS, LlmCompleted, TurnAccepted, derive
from libra.ops.embedded import EmbeddedPostgres, free_port
from libra.projections.history import HistoryProjection
from libra.runtime.database import connect_pool, migrate
from libra.runtime.eventlog import EventLog
from libra.runtime.projection import ProjectionRunner, rebuild

from .factories import ORIGIN, text
from .helpers import eventually, postgres_folder


def _exchange(i: int, conversation: str = "discord-1-2"):
    said = text(conversation=conversation, message=f"question {i}\x00")
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
    return [said, turn, answer]


class _QuickRedelivery(HistoryProjection):
    """History whose unacked messages come back after 2 s rather than 30 s."""

    spec = msgspec.structs.replace(CONSUMERS["history"], ack_wait_s=2.0)


async def _rows(pool: asyncpg.Pool) -> list[tuple]:
    async with pool.acquire() as conn:
        messages = await conn.fetch("SELECT * FROM messages ORDER BY event_id")
        conversations = await conn.fetch("SELECT * FROM conversations ORDER BY id")
    return [tuple(r) for r in messages] + [tuple(r) for r in conversations]


async def _count(pool: asyncpg.Pool) -> int:
    return await pool.fetchval("SELECT count(*) FROM messages")


async def _run(
    log: EventLog, pool: asyncpg.Pool, projection: HistoryProjection | None = None, **kw
) -> tuple[ProjectionRunner, asyncio.Task]:
    runner = ProjectionRunner(log, pool, projection or HistoryProjection(), **kw)
    return runner, asyncio.create_task(runner.run())


async def test_messages_and_conversations(eventlog: EventLog, pool: asyncpg.Pool) -> None:
    events = [e for i in range(3) for e in _exchange(i)] + _exchange(9, "http-alice")
    await eventlog.publish_many(events)
    runner, task = await _run(eventlog, pool)
    await eventually(lambda: _has(pool, 8))
    await runner.stop()
    await task
    rows = await pool.fetch(
        "SELECT role, content, provider FROM messages"
        " WHERE conversation = 'discord-1-2' ORDER BY at"
    )
    assert [r["role"] for r in rows] == ["user", "assistant"] * 3
    assert rows[0]["content"] == "question 0\ufffd" and rows[1]["provider"] == "openai"
    assert await pool.fetchval("SELECT count(*) FROM conversations") == 2
    checkpoint = await pool.fetchval(
        "SELECT stream_seq FROM projection_checkpoints WHERE name = 'history'"
    )
    assert checkpoint == (await eventlog.js.stream_info("LIBRA")).state.last_seq


async def test_settled_wakes_once_committed_and_a_lone_event_is_acked_at_once(
    eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    runner, task = await _run(eventlog, pool)
    await eventually(lambda: _consumer_ready(eventlog))
    _, turn, answer = _exchange(1)
    await eventlog.publish(turn)
    seq = await eventlog.publish(answer)
    # A committed batch is acked at once, lone or not: nothing waits for a next one.
    await asyncio.wait_for(runner.settled(seq), timeout=10)
    assert runner.settled_seq == seq and await _count(pool) == 2
    info = await eventlog.js.consumer_info("LIBRA", CONSUMERS["history"].name)
    assert info.ack_floor.stream_seq == seq and info.num_ack_pending == 0
    await runner.stop()
    await task


class _CountedBatches(HistoryProjection):
    """History that notes the size of every batch it is given."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    async def apply(self, conn: asyncpg.Connection, batch) -> None:
        self.batches.append(len(batch))
        await super().apply(conn, batch)


async def test_a_trickle_of_events_is_committed_in_few_batches(
    eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    projection = _CountedBatches()
    runner, task = await _run(eventlog, pool, projection, linger_s=0.3)
    await eventually(lambda: _consumer_ready(eventlog))
    for i in range(4):  # a live conversation: events a few milliseconds apart
        for event in _exchange(i):
            await eventlog.publish(event)
            await asyncio.sleep(0.005)
    await eventually(lambda: _has(pool, 8))
    await runner.stop()
    await task
    # history reads what was admitted and what was answered (not text.received)
    assert sum(projection.batches) == 8
    assert len(projection.batches) <= 3, projection.batches


async def test_a_backlog_does_not_wait_for_company(eventlog: EventLog, pool: asyncpg.Pool) -> None:
    await eventlog.publish_many([e for i in range(300) for e in _exchange(i)])
    projection = _CountedBatches()
    # Full batches go at once: at most a partial one lingers, where six would take 12 s.
    runner, task = await _run(eventlog, pool, projection, batch_size=100, linger_s=2.0)
    started = asyncio.get_running_loop().time()
    await eventually(lambda: _has(pool, 600), timeout=30)
    elapsed = asyncio.get_running_loop().time() - started
    await runner.stop()
    await task
    # Batches are as large as what has arrived (the feed may hand over a part of the backlog
    # first), but never one event at a time: 600 events in at most a dozen transactions.
    assert elapsed < 6.0 and len(projection.batches) <= 12, (elapsed, projection.batches)


async def _consumer_ready(log: EventLog) -> bool:
    try:
        await log.js.consumer_info("LIBRA", CONSUMERS["history"].name)
    except Exception:
        return False
    return True


async def test_redelivery_after_crash_leaves_one_row(
    eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    said, turn, answer = _exchange(1)
    await eventlog.publish_many([said, turn, answer])
    runner, task = await _run(eventlog, pool)
    await eventually(lambda: _has(pool, 2))
    await runner.stop()
    await task
    # the same events again (as after a crash between commit and ack) change nothing
    async with pool.acquire() as conn:
        from libra.runtime.projection import Recorded, _apply_batch

        await _apply_batch(conn, HistoryProjection(), [Recorded(2, turn), Recorded(3, answer)])
    assert await _count(pool) == 2


async def test_killed_mid_batch_then_restarted_equals_rebuild(
    eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    events = [e for i in range(400) for e in _exchange(i, f"discord-1-{i % 7}")]
    await eventlog.publish_many(events)
    runner, task = await _run(eventlog, pool, _QuickRedelivery(), batch_size=50)
    await eventually(lambda: _has(pool, 1), every=0.001)
    task.cancel()  # killed, in the middle of whatever batch it was in
    await asyncio.gather(task, return_exceptions=True)
    assert await _count(pool) < 800
    await asyncio.sleep(2.5)  # the unacked batch comes back after ack_wait
    runner, task = await _run(eventlog, pool, _QuickRedelivery(), batch_size=50)
    await eventually(lambda: _has(pool, 800), timeout=40)
    await runner.stop()
    await task
    incremental = await _rows(pool)
    assert await rebuild(eventlog, pool, HistoryProjection()) == 800
    assert await _rows(pool) == incremental


async def test_rebuild_while_live_runner_writes(eventlog: EventLog, pool: asyncpg.Pool) -> None:
    await eventlog.publish_many([e for i in range(200) for e in _exchange(i)])
    runner, task = await _run(eventlog, pool, batch_size=20)
    more = asyncio.create_task(
        eventlog.publish_many([e for i in range(200, 300) for e in _exchange(i)])
    )
    await rebuild(eventlog, pool, HistoryProjection(), batch_size=37)
    await more
    await eventually(lambda: _has(pool, 600), timeout=20)
    await runner.stop()
    await task
    live = await _rows(pool)
    await rebuild(eventlog, pool, HistoryProjection())
    assert await _rows(pool) == live


async def test_database_down_loses_nothing(eventlog: EventLog) -> None:
    folder = postgres_folder()
    server = EmbeddedPostgres(folder, port=free_port())
    await server.start()
    await migrate(server.url)
    pool = await connect_pool(server.url)
    try:
        runner, task = await _run(eventlog, pool, batch_size=10)
        await eventlog.publish_many(_exchange(0))
        await eventually(lambda: _has(pool, 2))
        await server.stop()
        await eventlog.publish_many([e for i in range(1, 21) for e in _exchange(i)])
        await asyncio.sleep(1.5)  # the runner meets a dead database and naks with back-off
        await server.start()
        await eventually(lambda: _has(pool, 42), timeout=40)
        dead = await eventlog.js.stream_info("LIBRA", subjects_filter="libra.dead.>")
        assert not dead.state.subjects
        await runner.stop()
        await task
    finally:
        await pool.close()
        await server.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def _has(pool: asyncpg.Pool, n: int) -> bool:
    try:
        return await _count(pool) >= n
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
