"""A consumer that is lost or a process that dies never gets an input answered twice.

Real NATS, Postgres and Redis; the LLM's wire is the loopback fake, which counts requests.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter

import nats
import pytest
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from libra.contracts import (
    AUDIO_BUCKET,
    CONSUMERS,
    KNOWLEDGE_BUCKET,
    POSITIONS_BUCKET,
    ConsumerSpec,
    LlmCompleted,
    TextReceived,
    TurnAccepted,
    TurnRejected,
    derive,
)
from libra.ops.embedded import EmbeddedNats
from libra.ops.fakes.llm_wire import OPENAI_CHAT, Behaviour, FakeLlmWire
from libra.runtime.consumer import ConsumerRunner
from libra.runtime.eventlog import EventLog, connect_nats
from libra.runtime.positions import saved_position
from libra.runtime.settled import SETTLED_SKIPPED, settled

from .factories import text
from .helpers import eventually, stream_count, stream_events
from .stack import TEXT_PIPELINE, answering_with, running

REPLY = "One answer, and one only."


@pytest.fixture
async def wire():
    # A little time per reply, so that deletions land while replies are being written.
    async with FakeLlmWire(reply=Behaviour.ok(REPLY, ttft=0.05, tokens_per_sec=200)) as fake:
        yield fake


def _turn(i: int) -> TextReceived:
    return text(conversation=f"http-p{i % 7}", message=f"question {i}", user=f"http:p{i}")


async def _completed(log: EventLog, n: int) -> bool:
    return await stream_count(log.js, "LIBRA", "libra.llm.completed.>") >= n


async def _assert_each_answered_once(log: EventLog, inputs: list[TextReceived]) -> None:
    events = await stream_events(log.js, "LIBRA")
    ids = Counter(e.id for e in events)
    assert [i for i, n in ids.items() if n > 1] == []
    decided = Counter(e.causation for e in events if isinstance(e, TurnAccepted | TurnRejected))
    answered = Counter(e.turn for e in events if isinstance(e, LlmCompleted))
    assert {i.id: decided[i.id] for i in inputs} == {i.id: 1 for i in inputs}
    assert {i.id: answered[i.id] for i in inputs} == {i.id: 1 for i in inputs}


async def test_deleting_every_consumer_under_traffic_answers_nothing_twice(
    settings, wire, eventlog: EventLog, pool
) -> None:
    s = answering_with(settings, wire)
    inputs = [_turn(i) for i in range(60)]
    async with running(s, TEXT_PIPELINE):

        async def traffic() -> None:
            for said in inputs:
                await eventlog.publish(said)
                await asyncio.sleep(0.03)

        sender = asyncio.create_task(traffic())
        await eventually(lambda: _completed(eventlog, 15), timeout=30)
        names = [n for n in TEXT_PIPELINE if n in CONSUMERS]
        for name in names:  # an operator's mistake, a restored stream, a lost server
            await eventlog.js.delete_consumer("LIBRA", name)
        await sender
        await eventually(lambda: _completed(eventlog, len(inputs)), timeout=60)
        await eventually(
            lambda: _rows(pool, "SELECT count(*) FROM messages", 2 * len(inputs)), timeout=30
        )
        for name in names:  # every one is back, and has settled everything
            info = await eventlog.js.consumer_info("LIBRA", name)
            assert info.config.deliver_policy != DeliverPolicy.ALL or name in (
                "history",
                "sessions",
                "turns-projection",
            )
    assert wire.count(OPENAI_CHAT) == len(inputs)
    await _assert_each_answered_once(eventlog, inputs)


async def test_an_answered_turn_delivered_again_is_not_paid_for_again(
    settings, wire, eventlog: EventLog
) -> None:
    """Past the duplicate window only the lookup stands between a redelivery and the provider:
    the consumer is recreated with no saved position, so it starts a window back and is handed
    every answered turn again."""
    s = answering_with(settings, wire)
    inputs = [_turn(i) for i in range(5)]
    async with running(s, ["turns", "llm"]):
        await eventlog.publish_many(inputs)
        await eventually(lambda: _completed(eventlog, len(inputs)), timeout=30)
        skipped = SETTLED_SKIPPED.labels("llm")._value.get()
        await eventlog.js.publish(f"$KV.{POSITIONS_BUCKET}.llm", b"0")  # the position is lost
        await eventlog.js.delete_consumer("LIBRA", "llm")

        async def looked_up() -> bool:
            return SETTLED_SKIPPED.labels("llm")._value.get() >= skipped + len(inputs)

        await eventually(looked_up, timeout=30)
        info = await eventlog.js.consumer_info("LIBRA", "llm")
        assert info.config.deliver_policy == DeliverPolicy.BY_START_TIME
    assert wire.count(OPENAI_CHAT) == len(inputs)
    await _assert_each_answered_once(eventlog, inputs)


async def test_turns_held_by_a_killed_process_end_within_seconds(
    settings, wire, eventlog: EventLog
) -> None:
    s = answering_with(settings, wire)
    inputs = [_turn(i) for i in range(5)]
    await eventlog.publish_many(inputs)
    # A process that took the turns and was SIGKILLed: it pulled them and never acked.
    dead = await nats.connect(settings.nats_url)
    taken = await dead.jetstream().pull_subscribe_bind("turns", "LIBRA")
    assert len(await taken.fetch(len(inputs), timeout=5)) == len(inputs)
    await dead.close()
    restarted = time.monotonic()
    async with running(s, ["turns", "llm"]):
        await eventually(lambda: _completed(eventlog, len(inputs)), timeout=20)
    assert time.monotonic() - restarted < 10.0
    assert wire.count(OPENAI_CHAT) == len(inputs)


class _Echo:
    spec = ConsumerSpec(
        name="echo",
        subjects=("libra.text.received.>",),
        settled_by=("turn.accepted",),
        settled_key="turn",
    )

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def handle(self, event) -> list[TurnAccepted]:
        self.calls.append(event.id)
        return [derive(event, TurnAccepted, key="turn", text=event.text, origin=event.origin)]


async def test_a_lost_consumer_starts_after_its_saved_position(eventlog: EventLog) -> None:
    echo = _Echo()
    runner = ConsumerRunner(eventlog, echo, concurrency=8)
    task = asyncio.create_task(runner.run())
    await eventlog.publish_many([text(message=f"m{i}") for i in range(20)])
    await eventually(lambda: _accepted(eventlog, 20))
    last = (await eventlog.js.stream_info("LIBRA")).state.last_seq

    async def saved() -> bool:
        return await saved_position(eventlog.js, "echo") >= last - 20

    await eventually(saved)
    await runner.stop()
    await asyncio.wait_for(task, 10)
    position = await saved_position(eventlog.js, "echo")
    await eventlog.js.delete_consumer("LIBRA", "echo")
    info = await eventlog.ensure_consumer(echo.spec)
    assert info.config.deliver_policy == DeliverPolicy.BY_START_SEQUENCE
    assert info.config.opt_start_seq == position + 1
    assert info.num_pending == 0 and len(echo.calls) == 20
    again = await eventlog.ensure_consumer(echo.spec)  # an existing consumer is kept as it is
    assert again.created == info.created


async def test_a_projection_with_no_position_folds_from_the_start(eventlog: EventLog) -> None:
    said = text()  # history folds the admitted turn
    await eventlog.publish(
        derive(said, TurnAccepted, key="turn", text=said.text, origin=said.origin)
    )
    await eventlog.js.delete_consumer("LIBRA", "history")
    await eventlog.js.delete_consumer("LIBRA", "llm")
    history = await eventlog.ensure_consumer(CONSUMERS["history"])
    llm = await eventlog.ensure_consumer(CONSUMERS["llm"])
    assert history.config.deliver_policy == DeliverPolicy.ALL and history.num_pending == 1
    assert llm.config.deliver_policy == DeliverPolicy.BY_START_TIME


async def test_setup_waits_out_a_paused_server(nats_server: EmbeddedNats, settings) -> None:
    log = EventLog(await connect_nats(settings.nats_url, name="patient"), publish_timeout=0.5)
    try:
        await log.provision(settings)
        spec = ConsumerSpec(name="patient", subjects=("libra.text.received.>",))
        os.kill(nats_server.proc.pid, signal.SIGSTOP)
        try:
            setup = asyncio.create_task(log.ensure_consumer(spec))
            await asyncio.sleep(2.0)  # the length of the stall: several set-up calls time out
            assert not setup.done()
        finally:
            os.kill(nats_server.proc.pid, signal.SIGCONT)
        info = await asyncio.wait_for(setup, 30)
        assert info.name == "patient"
    finally:
        await log.close()


async def _accepted(log: EventLog, n: int) -> bool:
    return await stream_count(log.js, "LIBRA", "libra.turn.accepted.>") >= n


async def _rows(pool, sql: str, n: int) -> bool:
    return await pool.fetchval(sql) >= n


async def test_each_component_keeps_its_own_position_as_its_own_user(
    eventlog: EventLog, nats_server: EmbeddedNats
) -> None:
    said = text()
    seq = await eventlog.publish(said)
    for name, spec in CONSUMERS.items():
        log = await EventLog.connect(nats_server.url_for(name), name=name)
        try:
            await log.js.publish(f"$KV.{POSITIONS_BUCKET}.{name}", str(seq).encode())
            assert await saved_position(log.js, name) == seq
            assert await log.ensure_consumer(spec)
            if spec.settled_by:  # looking up answers in the log is allowed to processors
                assert not await settled(log.js, spec, seq, said)
        finally:
            await log.close()


async def test_a_bucket_made_by_another_component_meanwhile_is_taken_as_it_is(settings) -> None:
    """Every component provisions the log as it starts. One that looked for the buckets just
    before another made them (and forbade the audio bucket's rollups) goes on with those."""
    first = await EventLog.connect(settings.nats_url, name="first")
    late = await EventLog.connect(settings.nats_url, name="late")
    try:
        await first.provision(settings, consumers=())
        opened = late.js.object_store
        looked: set[str] = set()

        async def looked_a_moment_ago(bucket: str):  # the interleaving, made certain
            if bucket not in looked:
                looked.add(bucket)
                raise NotFoundError
            return await opened(bucket)

        late.js.object_store = looked_a_moment_ago
        await late.provision(settings, consumers=())
        assert looked == {AUDIO_BUCKET, KNOWLEDGE_BUCKET}
        audio = await first.js.stream_info(f"OBJ_{AUDIO_BUCKET}")
        assert not audio.config.allow_rollup_hdrs
    finally:
        await first.close()
        await late.close()
