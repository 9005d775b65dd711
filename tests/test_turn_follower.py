"""Edges follow a turn's reply: deltas in order, once each, and recovered from the log if missed."""

from __future__ import annotations

import asyncio
import time

import pytest

from libra.contracts import LlmCompleted, LlmDelta, TurnAccepted, derive, encode_event, new_id
from libra.processors.llm.processor import _Deltas
from libra.runtime.eventlog import EventLog
from libra.runtime.follow import ReplyTimeout, TurnFollower

from .factories import ORIGIN, text


def _reply(n: int = 4):
    said = text(conversation="http-alice")
    turn = derive(said, TurnAccepted, key="turn", text=said.text, origin=ORIGIN)
    deltas = [
        derive(turn, LlmDelta, key=f"d{i}", index=i, text=f"{i} ", origin=ORIGIN) for i in range(n)
    ]
    done = derive(
        turn,
        LlmCompleted,
        key="c",
        text="".join(d.text for d in deltas),
        provider="p",
        model="m",
        origin=ORIGIN,
    )
    return said, turn, deltas, done


async def _collect(follower: TurnFollower, **kw) -> list:
    return [e async for e in follower.events(**kw)]


async def test_deltas_in_order_once_then_completed(eventlog: EventLog) -> None:
    said, turn, deltas, done = _reply()
    async with TurnFollower(eventlog, said.conversation, said.id) as follower:
        task = asyncio.create_task(_collect(follower))
        other = text(conversation="http-alice")  # another turn of the same conversation
        await eventlog.publish(derive(other, TurnAccepted, key="turn", text="x", origin=ORIGIN))
        await eventlog.publish(turn)
        for delta in [deltas[2], deltas[0], deltas[1], deltas[3]]:
            await eventlog.publish(delta)
        await eventlog.nc.publish(deltas[0].subject, encode_event(deltas[0]))  # a stray copy
        await eventlog.publish(done)
        got = await asyncio.wait_for(task, 5)
    assert got[0] == turn
    assert [e.index for e in got[1:-1]] == [0, 1, 2, 3]
    assert got[-1] == done


async def test_missed_events_are_read_back_from_the_log(eventlog: EventLog) -> None:
    said, turn, deltas, done = _reply()
    for event in (turn, *deltas, done):  # published before anyone listened
        await eventlog.publish(event)
    async with TurnFollower(eventlog, said.conversation, said.id) as follower:
        got = await asyncio.wait_for(_collect(follower, idle_s=0.3), 10)
    assert [type(e).__name__ for e in got] == ["TurnAccepted"] + ["LlmDelta"] * 4 + ["LlmCompleted"]


async def test_silence_is_a_timeout(eventlog: EventLog) -> None:
    said = text(conversation="http-alice")
    async with TurnFollower(eventlog, said.conversation, said.id) as follower:
        with pytest.raises(ReplyTimeout):
            await _collect(follower, idle_s=0.2, total_s=1.0)


def _attempt(turn: TurnAccepted, at_ms: int, pieces: list[str]) -> list[LlmDelta]:
    attempt = new_id(at_ms=at_ms)
    return [
        derive(
            turn,
            LlmDelta,
            key=f"delta/{attempt}/{i}",
            index=i,
            text=piece,
            attempt=attempt,
            origin=ORIGIN,
        )
        for i, piece in enumerate(pieces)
    ]


@pytest.mark.parametrize("restarts", [True, False])
async def test_a_restarted_reply_starts_over_and_the_stopped_attempt_is_dropped(
    eventlog: EventLog, restarts: bool
) -> None:
    said, turn, _, _ = _reply()
    now_ms = int(time.time() * 1000)
    first = _attempt(turn, now_ms - 5000, ["Hello", " w"])
    second = _attempt(turn, now_ms, ["Hel", "lo", " world"])
    done = derive(
        turn, LlmCompleted, key="c", text="Hello world", provider="p", model="m", origin=ORIGIN
    )
    async with TurnFollower(eventlog, said.conversation, said.id, restarts=restarts) as follower:
        task = asyncio.create_task(_collect(follower))
        # the stopped attempt's last piece comes late, after the new attempt began
        for delta in [first[0], second[0], first[1], second[2], second[1]]:
            await eventlog.publish(delta)
        await eventlog.publish(done)
        got = await asyncio.wait_for(task, 5)
    pieces = [(e.index, e.text) for e in got if isinstance(e, LlmDelta)]
    if restarts:
        assert pieces == [(0, "Hello"), (0, "Hel"), (1, "lo"), (2, " world")]
    else:
        assert pieces == [(0, "Hello"), (1, " w")]
    assert got[-1] == done


def test_each_handling_of_a_turn_streams_an_attempt_of_its_own() -> None:
    _, turn, _, _ = _reply()
    first, second = _Deltas(turn), _Deltas(turn)
    a, b = first.add("Hello"), second.add("Hello")
    assert a.index == b.index == 0 and a.attempt != b.attempt
    assert a.id != b.id, "JetStream would drop the restarted attempt's pieces as duplicates"
