"""The consumer runtime: runs a processor on a durable pull consumer.

A processor only says what it turns an event into. The runtime owns the rest: decoding, acks,
retries with back-off, ``in_progress`` for long work, dead letters, metrics and a graceful drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Protocol, runtime_checkable

from nats.aio.msg import Msg

from libra.contracts import AnyEvent, ConsumerSpec, Event, EventDecodeError, decode_event

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

__all__ = ["ConsumerRunner", "GivesUpAloud", "Processor"]

log = logging.getLogger("libra.consumer")


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

    async def run(self) -> None:
        """Handles messages until :meth:`stop` is called, then drains in-flight work."""
        await self.log.ensure_consumer(self.spec)
        self._feed = PullFeed(
            self.log.nc,
            self.spec.stream,
            self.spec.name,
            capacity=self.concurrency,
            on_lost=lambda _why: self.log.ensure_consumer(self.spec),
        )
        await self._feed.start()
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

    async def stop(self) -> None:
        self._stopping.set()

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
            try:
                event = decode_event(msg.data)
            except EventDecodeError as exc:
                await self._dead_letter(msg, str(exc), None)
                return
            bind(conversation=event.conversation, turn=event.turn)
            await self._process(msg, event, meta.num_delivered)
        except Exception:  # the log is unreachable: left unacked, JetStream redelivers it
            log.exception("could not settle %s on %s", msg.subject, name)
        finally:
            self._slots.release()
            if self._feed is not None:
                self._feed.done()

    async def _process(self, msg: Msg, event: AnyEvent, deliveries: int) -> None:
        name = self.spec.name
        started = time.perf_counter()
        keepalive = _KeepAlive(msg, self.spec.ack_wait_s)
        try:
            outputs = self.processor.handle(event)
            if isinstance(outputs, AsyncIterator):
                async for out in outputs:
                    await self.log.publish(out)
            else:
                for out in await outputs:
                    await self.log.publish(out)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            CONSUMER_FAILED.labels(name).inc()
            error = f"{type(exc).__name__}: {exc}"
            if 0 < self.spec.max_deliver <= deliveries:
                log.error("giving up after %d deliveries: %s", deliveries, error)
                if isinstance(self.processor, GivesUpAloud):
                    for out in self.processor.gave_up(event, error):
                        await self.log.publish(out)
                await self._dead_letter(msg, error, event)
            else:
                delay = self.spec.backoff_s[min(deliveries, len(self.spec.backoff_s)) - 1]
                log.warning(
                    "handler failed (delivery %d), retrying in %ss: %s", deliveries, delay, error
                )
                await msg.nak(delay=delay)
            return
        finally:
            keepalive.cancel()
            CONSUMER_HANDLER_SECONDS.labels(name).observe(time.perf_counter() - started)
        await msg.ack()
        CONSUMER_HANDLED.labels(name).inc()

    async def _dead_letter(self, msg: Msg, error: str, event: AnyEvent | None) -> None:
        letter = dead_letter_for(self.spec.name, msg, error, event)
        await self.log.publish(letter)
        await msg.ack()
        CONSUMER_DEAD_LETTERS.labels(self.spec.name).inc()
        log.error("dead-lettered %s seq %d: %s", msg.subject, letter.stream_seq, error)


class _KeepAlive:
    """Tells JetStream a message is still being worked on, so long work is not redelivered."""

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
