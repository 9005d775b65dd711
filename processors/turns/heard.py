"""The decisions admission hears: every turn admitted lately, by any instance, as the log says.

Each turns instance counts every person's rate-limit window in its own process
(:class:`.ratelimit.LocalRateLimiter`): at start it reads the last window's ``turn.accepted``
and ``turn.confirmed`` back from the log, and it hears each one as it is published (a core
subscription: no consumer to keep, every instance hears every decision). A person far below the
limit (under half of it) is then admitted from that count, without a call to Redis on the
turn's clock; nearer the limit the Lua script decides, as it always did.

The count is incomplete until the read-back is done, and again after a reconnection to NATS
(what was published meanwhile went unheard) until the log is read back once more: Redis then
decides every turn. What an instance hears a moment late (another instance's decision still on
its way) could let a person past the limit only by more than half of it arriving at once, at
two instances, within that moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from libra.contracts import LOG_STREAM, AnyEvent, EventDecodeError, decode_event
from libra.runtime.eventlog import EventLog
from libra.runtime.projection import read_log
from libra.runtime.redact import describe

from .ratelimit import LocalRateLimiter
from .view import counted_ms

__all__ = ["HeardDecisions"]

log = logging.getLogger("libra.turns.heard")

SUBJECTS = ("libra.turn.accepted.>", "libra.turn.confirmed.>")
# A turn counts at the time it was received; its decision may be stored a while later (a
# redelivery): the read-back starts this much before the window.
_SLACK = timedelta(seconds=30)
_RETRY_S = 2.0


class HeardDecisions:
    """Keeps ``turns`` counting every admitted turn, and says whether the count is whole."""

    def __init__(self, log_: EventLog, turns: LocalRateLimiter) -> None:
        self.log, self.turns = log_, turns
        self._subs: list[Subscription] = []
        self._reconnects = -1
        self._read: asyncio.Task[None] | None = None
        self._whole = False

    async def start(self) -> None:
        """Starts hearing decisions, then reads the last window back (in the background); a
        second call (the component restarted in the same process) changes nothing."""
        if self._subs:
            return
        for subject in SUBJECTS:
            self._subs.append(await self.log.nc.subscribe(subject, cb=self._on_msg))
        self._read_back()

    async def stop(self) -> None:
        if self._read is not None:
            self._read.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._read
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()

    def whole(self, at_ms: int) -> bool:
        """Whether every turn admitted in the window ending at ``at_ms`` is counted here."""
        nc = self.log.nc
        if not nc.is_connected:
            return False
        if nc.stats["reconnects"] != self._reconnects:
            self._read_back()  # the subscription missed what was published while away
            return False
        return self._whole and self.turns.complete(at_ms)

    def _read_back(self) -> None:
        self._reconnects = self.log.nc.stats["reconnects"]
        self._whole = False
        if self._read is not None:
            self._read.cancel()
        self._read = asyncio.create_task(self._read_log(), name="turns-heard-read-back")

    async def _read_log(self) -> None:
        since = datetime.now(UTC) - timedelta(milliseconds=self.turns.window_ms) - _SLACK
        while True:
            try:
                async for _, event in read_log(
                    self.log, SUBJECTS, stream=LOG_STREAM, start_time=since
                ):
                    self._count(event)
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                log.warning(
                    "could not read recent decisions back (%s); Redis decides meanwhile",
                    describe(exc),
                )
                await asyncio.sleep(_RETRY_S)
                continue
            self._whole = True
            return

    async def _on_msg(self, msg: Msg) -> None:
        try:
            self._count(decode_event(msg.data))
        except EventDecodeError as exc:
            log.debug("ignoring a decision that does not decode on %s: %s", msg.subject, exc)

    def _count(self, event: AnyEvent) -> None:
        """Counts an admitted turn, as the rate-limit view writes it (a speculative one once
        confirmed)."""
        if event.user and (at_ms := counted_ms(event)) is not None:
            self.turns.note(event.user, event.turn, at_ms)
