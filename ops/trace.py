"""`libra trace TURN`: the causal chain of one turn, read from the log, with stage timings."""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from nats.aio.msg import Msg
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

__all__ = ["TraceError", "collect_turn", "format_trace", "resolve_turn"]

# How far back a piece of an id is looked for: `libra tail` shows what is happening now.
LOOKBACK = timedelta(days=1)
_TURN_FIELD = re.compile(rb'"turn":"([0-9A-HJKMNP-TV-Z]{26})"')
_ID_PIECE = re.compile(r"[0-9A-HJKMNP-TV-Z]{1,25}")


class TraceError(ValueError):
    """The turn id is not an id, or the log holds nothing of it."""


async def _read(
    log: EventLog, stream: str, start: datetime, end: datetime, keep: Callable[[Msg], None]
) -> None:
    """Hands ``keep`` every message of ``stream`` stored from ``start`` to ``end``."""
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
    if info.num_pending == 0:
        await log.js.delete_consumer(stream, info.name)
        return
    feed = PullFeed(log.nc, stream, info.name, capacity=2048, expires_s=5.0)
    await feed.start()
    try:
        while True:
            msg = await feed.get()
            feed.done()
            meta = msg.metadata
            if meta.timestamp > end:
                break
            keep(msg)
            if meta.num_pending == 0:
                break
    finally:
        await feed.stop()
        await log.js.delete_consumer(stream, info.name)


async def _scan(log: EventLog, stream: str, turn: str, window: timedelta) -> list[AnyEvent]:
    """Reads the stream from just before the turn began to ``window`` after, keeping its events."""
    found: list[AnyEvent] = []
    marker = f'"turn":"{turn}"'.encode()

    def keep(msg: Msg) -> None:
        if marker in msg.data:
            with contextlib.suppress(EventDecodeError):
                found.append(decode_event(msg.data))

    began = id_time(turn)
    await _read(log, stream, began - timedelta(seconds=5), began + window, keep)
    return found


async def resolve_turn(log: EventLog, given: str, *, lookback: timedelta = LOOKBACK) -> str:
    """Returns the turn id that ``given`` is, or starts or ends (the 8 characters `libra tail`
    shows), looked for in the log's last ``lookback``; raises :class:`TraceError` when none or
    several match."""
    piece = given.strip().upper()  # Crockford base32 reads either case
    if is_id(piece):
        return piece
    if not _ID_PIECE.fullmatch(piece):
        raise TraceError(
            f"{given!r} is not a turn id nor a piece of one: give the 26 characters of the id,"
            " or its first or last characters (`libra tail` shows the last 8)"
        )
    turns: set[str] = set()

    def keep(msg: Msg) -> None:
        turns.update(t.decode() for t in _TURN_FIELD.findall(msg.data))

    now = datetime.now(UTC)
    await _read(log, LOG_STREAM, now - lookback, now, keep)
    found = sorted(t for t in turns if t.startswith(piece) or t.endswith(piece))
    if not found:
        hours = lookback.total_seconds() / 3600
        raise TraceError(f"no turn of the last {hours:g} hours starts or ends with {piece}")
    if len(found) > 1:
        shown = ", ".join(found[:5]) + (", …" if len(found) > 5 else "")
        raise TraceError(
            f"{piece} matches {len(found)} turns ({shown}): give more of its characters"
        )
    return found[0]


async def collect_turn(
    log: EventLog, turn: str, *, window: timedelta = timedelta(minutes=10)
) -> list[AnyEvent]:
    """Returns every event of ``turn`` (an id, or a piece that :func:`resolve_turn` finds) in
    both streams, in time order."""
    turn = await resolve_turn(log, turn)
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
