"""Following one turn's events as they are produced.

The edges follow a reply to show it to a person; processors follow a reply they work on while
it streams (tts) or a turn's fate (llm waiting for a spoken turn to be confirmed). A follower
subscribes before the events it waits for can be published (an edge, before it publishes the
person's input), or reads back what came before with :meth:`TurnFollower.catch_up`. Core NATS
subscriptions on the conversation's subjects, filtered by turn, are the fastest path (no
consumer to create), and at-most-once: if the connection drops mid-reply, the follower reads
what it missed back from the log.

Deltas come out in order, once each, and of one attempt at a time: when the llm processor was
restarted mid-reply, the new attempt's pieces start again at index 0 (an edge shows the reply
from its start again) and the stopped attempt's late pieces are dropped. A follower that cannot
take back what it passed on (speech) sets ``restarts=False`` and keeps to the first attempt;
the completed event carries the whole reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from datetime import timedelta

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from libra.contracts import (
    LIVE_STREAM,
    LOG_STREAM,
    AnyEvent,
    EventDecodeError,
    LlmCompleted,
    LlmDelta,
    LlmFailed,
    TurnRejected,
    decode_event,
    id_time,
)
from libra.runtime.eventlog import EventLog
from libra.runtime.projection import read_log

__all__ = ["ReplyTimeout", "TurnFollower"]

TERMINAL = (LlmCompleted, LlmFailed, TurnRejected)
# An event published just before the follower subscribed reaches neither it nor, when the stream
# stores it a moment late, the catch-up's read (which stops at the stream's last sequence then):
# a quiet follower reads the log back once more this soon, rather than after a whole idle_s.
_RECHECK_S = 1.0


class ReplyTimeout(TimeoutError):
    """No reply event came for the turn in time."""


class TurnFollower:
    """Yields the events of one turn (turn, llm, and optionally asr/tts) until it is answered."""

    def __init__(
        self,
        log: EventLog,
        conversation: str,
        turn: str,
        *,
        domains: Iterable[str] = ("turn", "llm"),
        until: tuple[type, ...] = TERMINAL,
        restarts: bool = True,
    ) -> None:
        self.log, self.conversation, self.turn = log, conversation, turn
        self.subjects = [f"libra.{d}.*.{conversation}" for d in domains]
        self.until = until
        self.restarts = restarts
        self._queue: asyncio.Queue[AnyEvent] = asyncio.Queue()
        self._subs: list[Subscription] = []
        self._seen: set[str] = set()
        self._marker = f'"turn":"{turn}"'.encode()

    async def __aenter__(self) -> TurnFollower:
        for subject in self.subjects:
            self._subs.append(await self.log.nc.subscribe(subject, cb=self._on_msg))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        if self._marker not in msg.data:
            return
        with contextlib.suppress(EventDecodeError):
            self._queue.put_nowait(decode_event(msg.data))

    async def events(
        self, *, idle_s: float = 60.0, total_s: float = 600.0
    ) -> AsyncIterator[AnyEvent]:
        """Yields the turn's events in order, ending with its terminal event."""
        deadline = time.monotonic() + total_s
        pieces = _Pieces(restarts=self.restarts)
        rechecked = False
        while True:
            wait = min(idle_s, deadline - time.monotonic())
            if wait <= 0:
                raise ReplyTimeout(f"no reply for turn {self.turn} within {total_s:.0f}s")
            if not rechecked:
                wait = min(wait, _RECHECK_S)
            try:
                event = await self._next(wait)
            except TimeoutError:
                await self.catch_up()
                if self._queue.empty() and rechecked:
                    raise ReplyTimeout(f"turn {self.turn} went quiet for {idle_s:.0f}s") from None
                rechecked = True
                continue
            if event.id in self._seen:
                continue
            self._seen.add(event.id)
            if isinstance(event, LlmDelta):  # deltas and their order matter; duplicates do not
                for delta in pieces.take(event):
                    yield delta
                continue
            yield event
            if isinstance(event, self.until):
                return

    async def _next(self, wait: float) -> AnyEvent:
        """The next event, within ``wait`` seconds. No task per event, as ``wait_for`` makes on
        Python 3.11: on the edge's busy loop each one delays the reply by a loop turn or two."""
        if not self._queue.empty():
            return self._queue.get_nowait()
        async with asyncio.timeout(wait):
            return await self._queue.get()

    async def catch_up(self) -> None:
        """Reads the turn's events back from the log (both streams): what was published before
        the follower subscribed, or what a dropped connection missed."""
        start = id_time(self.turn) - timedelta(seconds=2)
        found = [
            event
            for stream in (LOG_STREAM, LIVE_STREAM)
            async for _, event in read_log(self.log, self.subjects, stream=stream, start_time=start)
            if event.turn == self.turn and event.id not in self._seen
        ]
        for event in sorted(found, key=lambda e: e.at):  # two streams: put them back in order
            self._queue.put_nowait(event)


class _Pieces:
    """Puts the deltas of one attempt at the reply in order (see the module's docstring)."""

    def __init__(self, *, restarts: bool) -> None:
        self.restarts = restarts
        self.attempt: str | None = None
        self.next = 0
        self.pending: dict[int, LlmDelta] = {}

    def take(self, delta: LlmDelta) -> list[LlmDelta]:
        """Returns the deltas that follow in order now that ``delta`` came (often none)."""
        if self.attempt is None or (self.restarts and delta.attempt > self.attempt):
            self.attempt, self.next, self.pending = delta.attempt, 0, {}  # attempt ids sort by time
        elif delta.attempt != self.attempt:
            return []
        self.pending[delta.index] = delta
        ready = []
        while self.next in self.pending:
            ready.append(self.pending.pop(self.next))
            self.next += 1
        return ready
