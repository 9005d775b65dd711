"""`libra trace TURN`: the causal chain of one turn, read from the log, with stage timings."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from datetime import timedelta

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from libra.contracts import (
    LIVE_STREAM,
    LOG_STREAM,
    AnyEvent,
    EventDecodeError,
    decode_event,
    id_time,
    is_id,
)
from libra.runtime.eventlog import EventLog
from libra.runtime.feed import PullFeed

from .tail import summary

__all__ = ["TraceError", "collect_turn", "format_trace"]


class TraceError(ValueError):
    """The turn id is not an id, or the log holds nothing of it."""


async def _scan(log: EventLog, stream: str, turn: str, window: timedelta) -> list[AnyEvent]:
    """Reads the stream from just before the turn began to ``window`` after, keeping its events."""
    start = id_time(turn) - timedelta(seconds=5)
    info = await log.js.add_consumer(
        stream,
        ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=start.isoformat(),
            ack_policy=AckPolicy.NONE,
            inactive_threshold=30.0,
            mem_storage=True,
        ),
    )
    found: list[AnyEvent] = []
    if info.num_pending == 0:
        await log.js.delete_consumer(stream, info.name)
        return found
    feed = PullFeed(log.nc, stream, info.name, capacity=2048, expires_s=5.0)
    await feed.start()
    end = id_time(turn) + window
    try:
        while True:
            msg = await feed.get()
            feed.done()
            meta = msg.metadata
            if meta.timestamp > end:
                break
            if f'"turn":"{turn}"'.encode() in msg.data:
                with contextlib.suppress(EventDecodeError):
                    found.append(decode_event(msg.data))
            if meta.num_pending == 0:
                break
    finally:
        await feed.stop()
        await log.js.delete_consumer(stream, info.name)
    return found


async def collect_turn(
    log: EventLog, turn: str, *, window: timedelta = timedelta(minutes=10)
) -> list[AnyEvent]:
    """Returns every event of ``turn`` in both streams, in time order."""
    if not is_id(turn):
        raise TraceError(f"{turn!r} is not a turn id (26 characters, e.g. from `libra tail`)")
    events = await _scan(log, LOG_STREAM, turn, window)
    events += await _scan(log, LIVE_STREAM, turn, window)
    if not events:
        raise TraceError(f"no events of turn {turn} in the log")
    return sorted(events, key=lambda e: e.at)


def format_trace(events: list[AnyEvent]) -> str:
    """The chain as an indented tree: each event under its cause, with times since the start."""
    by_id = {e.id: e for e in events}
    children: dict[str, list[AnyEvent]] = defaultdict(list)
    roots = []
    for event in events:
        if event.causation and event.causation in by_id:
            children[event.causation].append(event)
        else:
            roots.append(event)
    start = events[0].at
    lines = [f"turn {events[0].turn}  started {start.isoformat()}  ({len(events)} events)"]

    def walk(event: AnyEvent, depth: int) -> None:
        tag = type(event).__struct_config__.tag
        since = (event.at - start).total_seconds() * 1000
        cause = by_id.get(event.causation)
        took = f"+{(event.at - cause.at).total_seconds() * 1000:8.1f} ms" if cause else " " * 12
        lines.append(f"{since:9.1f} ms {took}  {'  ' * depth}{tag:<20} {summary(event, 60)}")
        deltas = [c for c in children[event.id] if type(c).__struct_config__.tag == "llm.delta"]
        for child in children[event.id]:
            if child in deltas[1:-1]:
                continue  # the first and last delta tell the story; a count says the rest
            walk(child, depth + 1)
            if len(deltas) > 2 and child is deltas[0]:
                lines.append(f"{'':>24}  {'  ' * (depth + 1)}… {len(deltas) - 2} more deltas")

    for root in roots:
        walk(root, 0)
    return "\n".join(lines)
