"""The consumer runtime on a real JetStream: acks, retries, dead letters, drain, reconnects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest

from libra.contracts import (
    ConsumerSpec,
    DeadLetter,
    LlmCompleted,
    TextReceived,
    TurnAccepted,
    derive,
    encode_event,
)
from libra.runtime.consumer import ConsumerRunner
from libra.runtime.eventlog import EventLog
from libra.runtime.positions import saved_position

from .factories import ORIGIN, text
from .helpers import eventually, stream_count, stream_events

SPEC = ConsumerSpec(
    name="echo",
    subjects=("libra.text.received.>",),
    max_deliver=3,
    backoff_s=(0.05, 0.05, 0.05),
    ack_wait_s=2.0,
)


class Echo:
    """Accepts every text turn; can be told to fail or to take its time."""

    spec = SPEC

    def __init__(
        self, *, fail_first: int = 0, fail_always: bool = False, delay: float = 0.0
    ) -> None:
        self.fail_first, self.fail_always, self.delay = fail_first, fail_always, delay
        self.calls: list[str] = []

    async def handle(self, event) -> AsyncIterator[TurnAccepted]:
        self.calls.append(event.id)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_always or self.calls.count(event.id) <= self.fail_first:
            raise RuntimeError("provider exploded")
        assert isinstance(event, TextReceived)
        yield derive(event, TurnAccepted, key="turn", text=event.text, origin=event.origin)


async def _running(log: EventLog, processor) -> tuple[ConsumerRunner, asyncio.Task]:
    runner = ConsumerRunner(log, processor, concurrency=8)
    task = asyncio.create_task(runner.run())
    return runner, task


async def _stop(runner: ConsumerRunner, task: asyncio.Task) -> None:
    await runner.stop()
    await asyncio.wait_for(task, 10)


async def test_each_input_gives_one_output(eventlog: EventLog) -> None:
    runner, task = await _running(eventlog, Echo())
    inputs = [text(message=f"m{i}") for i in range(50)]
    await eventlog.publish_many(inputs)
    await eventually(lambda: _count(eventlog, "libra.turn.accepted.>", 50))
    await _stop(runner, task)
    outputs = await stream_events(eventlog.js, "LIBRA", "libra.turn.accepted.>")
    assert sorted(o.causation for o in outputs) == sorted(i.id for i in inputs)


async def test_crash_on_first_delivery_yields_exactly_one_output(eventlog: EventLog) -> None:
    processor = Echo(fail_first=1)
    runner, task = await _running(eventlog, processor)
    event = text()
    await eventlog.publish(event)
    await eventually(lambda: _count(eventlog, "libra.turn.accepted.>", 1))
    await asyncio.sleep(0.3)
    await _stop(runner, task)
    assert processor.calls == [event.id, event.id]
    assert await stream_count(eventlog.js, "LIBRA", "libra.turn.accepted.>") == 1
    assert await stream_count(eventlog.js, "LIBRA", "libra.dead.>") == 0


async def test_redelivered_outputs_are_dropped_as_duplicates(eventlog: EventLog) -> None:
    event = text()
    out = derive(event, TurnAccepted, key="turn", text=event.text, origin=ORIGIN)
    await eventlog.publish(out)
    await eventlog.publish(derive(event, TurnAccepted, key="turn", text=event.text, origin=ORIGIN))
    assert await stream_count(eventlog.js, "LIBRA", "libra.turn.accepted.>") == 1


async def test_handler_that_always_fails_is_dead_lettered(eventlog: EventLog) -> None:
    runner, task = await _running(eventlog, Echo(fail_always=True))
    event = text()
    await eventlog.publish(event)
    await eventually(lambda: _count(eventlog, "libra.dead.echo.>", 1))
    await _stop(runner, task)
    [letter] = await stream_events(eventlog.js, "LIBRA", "libra.dead.>")
    assert isinstance(letter, DeadLetter)
    assert letter.deliveries == 3 and "provider exploded" in letter.error
    assert letter.causation == event.id and letter.payload == encode_event(event).decode()


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"{garbage", "malformed event JSON"),
        (encode_event(text()).replace(b'"v":1', b'"v":9'), "unsupported schema version 9"),
        (b'{"type":"no.such"}', "Invalid value 'no.such'"),
        (b"\xff\xfe\x00binary", "malformed event JSON"),
    ],
)
async def test_undecodable_messages_are_dead_lettered_and_the_consumer_goes_on(
    eventlog: EventLog, payload: bytes, error: str
) -> None:
    runner, task = await _running(eventlog, Echo())
    await eventlog.js.publish("libra.text.received.discord-1-2", payload)
    good = text()
    await eventlog.publish(good)
    await eventually(lambda: _count(eventlog, "libra.turn.accepted.>", 1))
    await eventually(lambda: _count(eventlog, "libra.dead.echo.discord-1-2", 1))
    await _stop(runner, task)
    [letter] = await stream_events(eventlog.js, "LIBRA", "libra.dead.>")
    assert error in letter.error and letter.deliveries == 1
    assert letter.subject == "libra.text.received.discord-1-2"
    expected_encoding = "base64" if payload.startswith(b"\xff") else "utf-8"
    assert letter.payload_encoding == expected_encoding


async def test_long_work_is_kept_alive_not_redelivered(eventlog: EventLog) -> None:
    processor = Echo(delay=2.5)  # longer than ack_wait (2 s)
    runner, task = await _running(eventlog, processor)
    event = text()
    await eventlog.publish(event)
    await eventually(lambda: _count(eventlog, "libra.turn.accepted.>", 1), timeout=8)
    await asyncio.sleep(0.5)
    await _stop(runner, task)
    assert processor.calls == [event.id]


async def test_stop_drains_in_flight_work(eventlog: EventLog) -> None:
    processor = Echo(delay=0.5)
    runner, task = await _running(eventlog, processor)
    inputs = [text(message=f"m{i}") for i in range(5)]
    await eventlog.publish_many(inputs)
    await eventually(lambda: _true(len(processor.calls) == 5))
    await _stop(runner, task)  # stop while all five are mid-handler
    assert await stream_count(eventlog.js, "LIBRA", "libra.turn.accepted.>") == 5
    info = await eventlog.js.consumer_info("LIBRA", "echo")
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_consumer_survives_a_server_restart(
    eventlog: EventLog, nats_server, settings
) -> None:
    runner, task = await _running(eventlog, Echo())
    await eventlog.publish(text(message="before"))
    await eventually(lambda: _count(eventlog, "libra.turn.accepted.>", 1))
    await nats_server.stop()
    await nats_server.start()
    await eventually(lambda: _true(eventlog.nc.is_connected), timeout=10)
    await eventlog.publish(text(message="after"))
    await eventually(lambda: _count(eventlog, "libra.turn.accepted.>", 2), timeout=15)
    await _stop(runner, task)


class Fold(Echo):
    """An Echo whose consumer keeps its ack state in memory, as the folds' consumers do."""

    spec = msgspec.structs.replace(SPEC, name="fold", memory_state=True)


async def test_a_memory_state_consumer_lost_in_a_restart_resumes_after_its_position(
    eventlog: EventLog, nats_server
) -> None:
    processor = Fold()
    runner, task = await _running(eventlog, processor)
    seqs = [await eventlog.publish(text(message=f"m{i}")) for i in range(5)]
    await eventually(lambda: _true(len(processor.calls) == 5))
    assert (await eventlog.js.consumer_info("LIBRA", "fold")).config.mem_storage

    async def saved() -> bool:
        return await saved_position(eventlog.js, "fold") >= seqs[-1]

    await eventually(saved)
    await nats_server.stop()
    await nats_server.start()
    await eventually(lambda: _true(eventlog.nc.is_connected), timeout=10)
    await eventlog.publish(text(message="after"))
    await eventually(lambda: _true(len(processor.calls) == 6), timeout=15)
    info = await eventlog.js.consumer_info("LIBRA", "fold")
    assert info.config.opt_start_seq == seqs[-1] + 1  # recreated after its saved position
    assert len(set(processor.calls)) == 6  # nothing handled twice
    await _stop(runner, task)


async def _count(log: EventLog, subject: str, n: int) -> bool:
    return await stream_count(log.js, "LIBRA", subject) >= n


async def _true(value: bool) -> bool:
    return value


async def test_llm_completed_is_not_in_the_live_stream(eventlog: EventLog) -> None:
    event = text()
    done = derive(event, LlmCompleted, key="c", text="hi", provider="p", model="m", origin=ORIGIN)
    await eventlog.publish(done)
    assert await stream_count(eventlog.js, "LIBRA", "libra.llm.completed.>") == 1
