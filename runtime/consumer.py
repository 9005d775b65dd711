"""The consumer runtime: runs a processor on a durable pull consumer.

A processor only says what it turns an event into. The runtime owns the rest: decoding, acks,
retries with back-off, ``in_progress`` for long work, dead letters, metrics and a graceful drain.

It never answers an input twice. Its consumer is kept or recreated after its saved position
(``runtime/positions.py``), and a suspect delivery (a redelivery, an input stored before the
consumer was created, a re-driven dead letter) is first looked up in the log
(``runtime/settled.py``): if its answer is there, it is acked without calling the processor.
A redelivery of an input this instance is still working on (ack_wait is short, so that a dead
process's inputs come back within seconds) joins the work in progress instead of starting it
again. A ``dead.retried`` event is unwrapped into the original message and handled as it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Iterable
from datetime import UTC, datetime, timedelta
from typing import NamedTuple, Protocol, runtime_checkable

from nats.aio.msg import Msg
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

from libra.contracts import (
    AnyEvent,
    ConsumerSpec,
    DeadRetried,
    Event,
    EventDecodeError,
    decode_event,
)

from .deadletter import dead_letter_for
from .eventlog import EventLog
from .feed import PullFeed
from .logs import bind
from .metrics import (
    CONSUMER_DEAD_LETTERS,
    CONSUMER_FAILED,
    CONSUMER_HANDLED,
    CONSUMER_HANDLER_SECONDS,
    CONSUMER_PENDING,
    CONSUMER_REDELIVERED,
)
from .positions import PositionKeeper
from .redact import describe
from .settled import SETTLED_SKIPPED, settled

__all__ = ["ConsumerRunner", "GivesUpAloud", "Processor"]

log = logging.getLogger("libra.consumer")

# Servers of a cluster disagree on the time a little: an input stored up to this long after its
# consumer was created is still looked up before it is handled.
_CLOCK_SLACK = timedelta(seconds=1)


class Processor(Protocol):
    """Turns one event into the events it causes.

    ``handle`` is either an async generator (a stream: each output is published as it is
    yielded) or a coroutine that returns the outputs, all published before the ack.
    """

    spec: ConsumerSpec

    def handle(self, event: AnyEvent) -> AsyncIterator[Event] | Awaitable[Iterable[Event]]: ...


@runtime_checkable
class GivesUpAloud(Protocol):
    """A processor whose inputs a person waits on says so when the runtime gives up on one."""

    def gave_up(self, event: AnyEvent, error: str) -> Iterable[Event]:
        """Returns the events that tell the person (e.g. ``llm.failed``), published with the
        dead letter."""
        ...


class _Input(NamedTuple):
    """What a message asks the processor to handle: the event and its place in the stream."""

    seq: int
    event: AnyEvent
    retry: tuple[DeadRetried, RawStreamMsg] | None = None


class _Unusable(Exception):
    """A re-drive whose original message cannot be read back."""


class ConsumerRunner:
    """Runs ``processor`` on its consumer with up to ``concurrency`` messages at once."""

    def __init__(self, log_: EventLog, processor: Processor, *, concurrency: int = 64) -> None:
        self.log = log_
        self.processor = processor
        self.spec = processor.spec
        self.concurrency = concurrency
        self._tasks: set[asyncio.Task] = set()
        self._slots = asyncio.Semaphore(concurrency)
        self._stopping = asyncio.Event()
        self._feed: PullFeed | None = None
        self._inflight: dict[int, _Delivery] = {}  # by stream sequence
        # Inputs stored before this may have been settled by a consumer before this one.
        self._fresh_after = datetime.max.replace(tzinfo=UTC)

    async def run(self) -> None:
        """Handles messages until :meth:`stop` is called, then drains in-flight work."""
        await self._ensure()
        self._feed = PullFeed(
            self.log.nc,
            self.spec.stream,
            self.spec.name,
            capacity=self.concurrency,
            on_lost=lambda _why: self._ensure(),
        )
        await self._feed.start()
        positions = PositionKeeper(self.log.js, self.spec)
        positions.start()
        try:
            while not self._stopping.is_set():
                msg = await self._feed.get_until(self._stopping)
                if msg is None:
                    break
                await self._slots.acquire()
                task = asyncio.create_task(self._handle(msg))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            await self._drain(self._feed)
            await positions.stop()

    async def stop(self) -> None:
        self._stopping.set()

    async def _ensure(self) -> None:
        info = await self.log.ensure_consumer(self.spec)
        self._fresh_after = info.created + _CLOCK_SLACK

    async def _drain(self, feed: PullFeed, timeout: float = 20.0) -> None:
        left = await feed.stop()
        for msg in left:  # never started: another instance (or the next start) takes them now
            with contextlib.suppress(Exception):
                await msg.nak()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:  # past the deadline: unacked, so JetStream redelivers them
                task.cancel()

    async def _handle(self, msg: Msg) -> None:
        name = self.spec.name
        try:
            meta = msg.metadata
            CONSUMER_PENDING.labels(name).set(meta.num_pending)
            if meta.num_delivered > 1:
                CONSUMER_REDELIVERED.labels(name).inc()
            seq = meta.sequence.stream
            if (held := self._inflight.get(seq)) is not None:
                held.msg = msg  # still at work on it here: the newest delivery is the one to ack
                return
            delivery = self._inflight[seq] = _Delivery(msg, self.spec.ack_wait_s)
            try:
                await self._settle(delivery)
            finally:
                delivery.cancel()
                del self._inflight[seq]
        except Exception:  # the log is unreachable: left unacked, JetStream redelivers it
            log.exception("could not settle %s on %s", msg.subject, name)
        finally:
            self._slots.release()
            if self._feed is not None:
                self._feed.done()

    async def _settle(self, delivery: _Delivery) -> None:
        meta = delivery.msg.metadata
        try:
            given = await self._input(delivery.msg)
        except (EventDecodeError, _Unusable) as exc:
            await self._dead_letter(delivery, describe(exc), None)
            return
        event = given.event
        bind(conversation=event.conversation, turn=event.turn)
        suspect = (
            given.retry is not None or meta.num_delivered > 1 or meta.timestamp < self._fresh_after
        )
        if suspect and await settled(self.log.js, self.spec, given.seq, event):
            SETTLED_SKIPPED.labels(self.spec.name).inc()
            log.info("already settled in the log: %s", delivery.msg.subject)
            await delivery.msg.ack()
            return
        await self._process(delivery, given)

    async def _input(self, msg: Msg) -> _Input:
        """The event a message carries; a re-drive's is the original message, read back."""
        event = decode_event(msg.data)
        if not isinstance(event, DeadRetried):
            return _Input(msg.metadata.sequence.stream, event)
        try:
            raw = await self.log.js.get_msg(self.spec.stream, seq=event.stream_seq, direct=True)
        except NotFoundError:
            raise _Unusable(f"seq {event.stream_seq} is no longer in the log") from None
        return _Input(raw.seq, decode_event(raw.data or b""), (event, raw))

    async def _process(self, delivery: _Delivery, given: _Input) -> None:
        name = self.spec.name
        started = time.perf_counter()
        try:
            outputs = self.processor.handle(given.event)
            if isinstance(outputs, AsyncIterator):
                async for out in outputs:
                    await self.log.publish(out)
            else:
                for out in await outputs:
                    await self.log.publish(out)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._failed(delivery, given, exc)
            return
        finally:
            CONSUMER_HANDLER_SECONDS.labels(name).observe(time.perf_counter() - started)
        await delivery.msg.ack()
        CONSUMER_HANDLED.labels(name).inc()

    async def _failed(self, delivery: _Delivery, given: _Input, exc: Exception) -> None:
        CONSUMER_FAILED.labels(self.spec.name).inc()
        error = describe(exc)  # read by anyone who reads the log: redacted
        deliveries = delivery.msg.metadata.num_delivered
        if 0 < self.spec.max_deliver <= deliveries:
            log.error("giving up after %d deliveries: %s", deliveries, error)
            if isinstance(self.processor, GivesUpAloud):
                for out in self.processor.gave_up(given.event, error):
                    await self.log.publish(out)
            await self._dead_letter(delivery, error, given.event, given.retry)
            return
        delay = self.spec.backoff_s[min(deliveries, len(self.spec.backoff_s)) - 1]
        log.warning("handler failed (delivery %d), retrying in %ss: %s", deliveries, delay, error)
        await delivery.msg.nak(delay=delay)

    async def _dead_letter(
        self,
        delivery: _Delivery,
        error: str,
        event: AnyEvent | None,
        retry: tuple[DeadRetried, RawStreamMsg] | None = None,
    ) -> None:
        letter = dead_letter_for(self.spec.name, delivery.msg, error, event, retry=retry)
        await self.log.publish(letter)
        await delivery.msg.ack()
        CONSUMER_DEAD_LETTERS.labels(self.spec.name).inc()
        log.error("dead-lettered %s seq %d: %s", letter.subject, letter.stream_seq, error)


class _Delivery:
    """The message being worked on, kept alive with ``in_progress`` so it is not redelivered.

    ``msg`` is replaced by a redelivery that arrives meanwhile: acks go to the newest one.
    """

    def __init__(self, msg: Msg, ack_wait_s: float) -> None:
        self.msg = msg
        self.every = max(ack_wait_s / 3, 0.5)
        self._handle = asyncio.get_running_loop().call_later(self.every, self._tick)
        self._task: asyncio.Task | None = None

    def _tick(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.msg.in_progress())
        self._handle = asyncio.get_running_loop().call_later(self.every, self._tick)

    def cancel(self) -> None:
        self._handle.cancel()
