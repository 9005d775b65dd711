"""The projection runtime: folds events into Postgres in batches, checkpointed.

A batch is applied in one transaction that also moves the projection's checkpoint, then acked;
a crash before the commit leaves the messages unacked and JetStream redelivers them, and since
projections upsert by event id a second application changes nothing. A batch that fails is
retried one event at a time, so one bad event is dead-lettered alone and the rest go through.
Rebuild = drop + replay from the start of the log.

The consumer's position is its ack floor, saved like every consumer's (``runtime/positions.py``),
rather than the checkpoint: a batch retried later leaves the checkpoint ahead of events not yet
applied, and a lost consumer recreated after the checkpoint would skip them. With no saved
position a lost consumer starts at the beginning: folding again by event id changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import NamedTuple, Protocol

import asyncpg
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from libra.contracts import AnyEvent, ConsumerSpec, EventDecodeError, decode_event

from .deadletter import dead_letter_for
from .eventlog import EventLog
from .feed import PullFeed
from .metrics import (
    CONSUMER_DEAD_LETTERS,
    CONSUMER_FAILED,
    CONSUMER_HANDLED,
    CONSUMER_HANDLER_SECONDS,
    CONSUMER_PENDING,
    CONSUMER_REDELIVERED,
)
from .positions import PositionKeeper

__all__ = ["Projection", "ProjectionRunner", "Recorded", "read_log", "rebuild"]

log = logging.getLogger("libra.projection")


class Recorded(NamedTuple):
    """An event as the log holds it: with its stream sequence."""

    seq: int
    event: AnyEvent


class Projection(Protocol):
    """A fold of events into tables; ``apply`` must be idempotent by event id."""

    spec: ConsumerSpec
    tables: tuple[str, ...]

    async def apply(self, conn: asyncpg.Connection, batch: Sequence[Recorded]) -> None: ...


# A live stream trickles in: a transaction per event costs a projection its CPU and steals it
# from the turns in flight. Waiting this long for company makes batches of a few events, and a
# reader of a projection (the next turn's history) is seconds away. A full batch goes at once,
# and so does a backlog's: its transactions are full enough, and the wait would only stall the
# fold (a batch short by one, or the backlog's tail, waited the whole linger).
LINGER_S = 0.05
_DATA_ERROR_ATTEMPTS = 3
_DATA_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


class _Delivery(NamedTuple):
    count: int  # deliveries of this message so far, this one included
    seq: int  # in the stream
    pending: int  # messages left for the consumer


def _delivery(reply: str) -> _Delivery:
    """What a delivery's ack subject says of it.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``, or the newer form
    with domain and account hash in front and a random token behind. Reading the numbers
    directly costs a fifth of nats-py's full metadata parse, which replay and every projection
    pay per event.
    """
    tokens = reply.split(".")
    if len(tokens) == 9:
        return _Delivery(int(tokens[4]), int(tokens[5]), int(tokens[8]))
    return _Delivery(int(tokens[6]), int(tokens[7]), int(tokens[10]))


def _trickle(first: Msg) -> bool:
    """Whether the log held nothing more for the consumer when ``first`` was delivered: a batch
    that starts that way is a live trickle, one that starts in a backlog (its tail included) is
    not."""
    return _delivery(first.reply).pending == 0


def _lock_key(name: str) -> int:
    return zlib.crc32(f"projection:{name}".encode())


# The shared lock (see ``rebuild``) and the checkpoint in one statement: the lock is taken
# first, as the checkpoint's row comes from it. A batch's transaction is the projection's
# critical path, and each statement in it is a round trip the next batch waits behind.
_LOCK_AND_CHECKPOINT = (
    "INSERT INTO projection_checkpoints (name, stream_seq, updated_at)"
    " SELECT $2, $3, now() FROM (SELECT pg_advisory_xact_lock_shared($1)) AS locked"
    " ON CONFLICT (name) DO UPDATE SET stream_seq ="
    " GREATEST(projection_checkpoints.stream_seq, EXCLUDED.stream_seq), updated_at = now()"
)


async def _apply_batch(
    conn: asyncpg.Connection, projection: Projection, batch: Sequence[Recorded]
) -> None:
    name = projection.spec.name
    async with conn.transaction():
        await conn.execute(_LOCK_AND_CHECKPOINT, _lock_key(name), name, max(r.seq for r in batch))
        await projection.apply(conn, batch)


class ProjectionRunner:
    """Runs a projection on its durable consumer, ``batch_size`` events per transaction."""

    def __init__(
        self,
        log_: EventLog,
        pool: asyncpg.Pool,
        projection: Projection,
        *,
        batch_size: int = 500,
        linger_s: float = LINGER_S,
    ) -> None:
        self.log, self.pool, self.projection = log_, pool, projection
        self.spec = projection.spec
        self.batch_size = batch_size
        self.linger_s = linger_s
        self.settled_seq = 0  # the newest event committed here (an older one may await a retry)
        self._progress = asyncio.Condition()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        await self.log.ensure_consumer(self.spec)
        feed = PullFeed(
            self.log.nc,
            self.spec.stream,
            self.spec.name,
            # room for the batch being settled and three more on their way: asked for only when
            # half of it is free, two batches' room left the next one still arriving
            capacity=self.batch_size * 4,
            on_lost=lambda _why: self.log.ensure_consumer(self.spec),
        )
        await feed.start()
        positions = PositionKeeper(self.log.js, self.spec)
        positions.start()
        # A batch is read while the one before is in Postgres, so that decoding one and writing
        # the other overlap; batches still commit and ack one at a time, in order.
        settling: asyncio.Task[None] | None = None
        try:
            while (msgs := await self._next_batch(feed)) is not None:
                good = await self._decode(msgs)
                if settling is not None:
                    await settling
                settling = asyncio.create_task(self._settle(good, feed, len(msgs)))
            if settling is not None:
                await settling
        except asyncio.CancelledError:
            if settling is not None:  # killed: the batch in Postgres is rolled back, not acked
                settling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await settling
            raise
        finally:
            for msg in await feed.stop():
                with contextlib.suppress(Exception):
                    await msg.nak()
            await positions.stop()

    async def stop(self) -> None:
        self._stopping.set()

    async def settled(self, seq: int) -> None:
        """Waits until this runner has committed the event at stream sequence ``seq`` or a
        later one."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.settled_seq >= seq)

    async def _advance(self, seq: int) -> None:
        async with self._progress:
            self.settled_seq = max(self.settled_seq, seq)
            self._progress.notify_all()

    async def _next_batch(self, feed: PullFeed) -> list[Msg] | None:
        """Up to a batch of messages, lingering for company in a trickle; None once stopping."""
        first = await feed.get_until(self._stopping)
        if first is None:
            return None
        msgs = [first, *feed.get_nowait(self.batch_size - 1)]
        if self.linger_s and len(msgs) < self.batch_size and _trickle(first):
            await asyncio.sleep(self.linger_s)
            msgs += feed.get_nowait(self.batch_size - len(msgs))
        return msgs

    async def _decode(self, msgs: list[Msg]) -> list[tuple[Msg, Recorded]]:
        """The batch's events with their messages; undecodable ones are dead-lettered."""
        name = self.spec.name
        good: list[tuple[Msg, Recorded]] = []
        redelivered = 0
        for msg in msgs:
            delivery = _delivery(msg.reply)
            redelivered += delivery.count > 1
            try:
                good.append((msg, Recorded(delivery.seq, decode_event(msg.data))))
            except EventDecodeError as exc:
                await self._dead_letter(msg, str(exc), None)
        if redelivered:
            CONSUMER_REDELIVERED.labels(name).inc(redelivered)
        CONSUMER_PENDING.labels(name).set(_delivery(msgs[-1].reply).pending)
        return good

    async def _settle(self, good: list[tuple[Msg, Recorded]], feed: PullFeed, count: int) -> None:
        """Applies a decoded batch and acks it, then makes room in the feed for ``count`` more."""
        try:
            if good:
                await self._apply(good)
        finally:
            feed.done(count)

    async def _apply(self, good: list[tuple[Msg, Recorded]]) -> None:
        name = self.spec.name
        started = time.perf_counter()
        try:
            async with self.pool.acquire() as conn:
                await _apply_batch(conn, self.projection, [r for _, r in good])
        except (TimeoutError, asyncpg.PostgresError, OSError) as exc:
            CONSUMER_FAILED.labels(name).inc()
            if len(good) == 1:
                await self._failed(good[0], exc)
                return
            log.warning("batch of %d failed (%s); applying one at a time", len(good), exc)
            for item in good:
                await self._settle_one(item)
            return
        finally:
            CONSUMER_HANDLER_SECONDS.labels(name).observe(time.perf_counter() - started)
        for msg, _ in good:
            await msg.ack()
        CONSUMER_HANDLED.labels(name).inc(len(good))
        await self._advance(max(r.seq for _, r in good))

    async def _settle_one(self, item: tuple[Msg, Recorded]) -> None:
        msg, recorded = item
        try:
            async with self.pool.acquire() as conn:
                await _apply_batch(conn, self.projection, [recorded])
        except (TimeoutError, asyncpg.PostgresError, OSError) as exc:
            await self._failed(item, exc)
            return
        await msg.ack()
        CONSUMER_HANDLED.labels(self.spec.name).inc()
        await self._advance(recorded.seq)

    async def _failed(self, item: tuple[Msg, Recorded], exc: BaseException) -> None:
        msg, recorded = item
        deliveries = msg.metadata.num_delivered
        error = f"{type(exc).__name__}: {exc}"
        # A database that is down is waited out (the consumer redelivers for ever); only an
        # event the database keeps refusing is set aside.
        if deliveries >= _DATA_ERROR_ATTEMPTS and isinstance(exc, _DATA_ERRORS):
            await self._dead_letter(msg, error, recorded.event)
            return
        delay = self.spec.backoff_s[min(deliveries, len(self.spec.backoff_s)) - 1]
        log.warning(
            "projection %s failed (delivery %d), retrying in %ss: %s",
            self.spec.name,
            deliveries,
            delay,
            error,
        )
        await msg.nak(delay=delay)

    async def _dead_letter(self, msg: Msg, error: str, event: AnyEvent | None) -> None:
        await self.log.publish(dead_letter_for(self.spec.name, msg, error, event))
        await msg.ack()
        CONSUMER_DEAD_LETTERS.labels(self.spec.name).inc()
        log.error("dead-lettered %s: %s", msg.subject, error)


async def read_log(
    log_: EventLog,
    subjects: Sequence[str],
    *,
    stream: str,
    start_seq: int = 1,
    start_time: datetime | None = None,
    end_seq: int | None = None,
    batch: int = 2048,
) -> AsyncIterator[Recorded]:
    """Yields the stream's events on ``subjects`` from ``start_seq`` (or ``start_time``) through
    ``end_seq``, in order.

    Uses an ephemeral consumer without acks: reading the log back must be fast, and it changes
    nothing on the server. Undecodable messages are skipped with a warning.
    """
    if end_seq is None:
        end_seq = (await log_.js.stream_info(stream)).state.last_seq
    if end_seq < start_seq:
        return
    by_time = start_time is not None
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME if by_time else DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=None if by_time else start_seq,
        opt_start_time=start_time.isoformat() if by_time else None,
        ack_policy=AckPolicy.NONE,
        filter_subject=subjects[0] if len(subjects) == 1 else None,
        filter_subjects=list(subjects) if len(subjects) > 1 else None,
        inactive_threshold=30.0,
        mem_storage=True,
    )
    info = await log_.js.add_consumer(stream, config)
    if info.num_pending == 0:
        await log_.js.delete_consumer(stream, info.name)
        return
    feed = PullFeed(log_.nc, stream, info.name, capacity=batch, expires_s=5.0)
    await feed.start()
    try:
        while True:
            msg = await asyncio.wait_for(feed.get(), timeout=10.0)
            msgs = [msg, *feed.get_nowait(batch)]
            feed.done(len(msgs))
            for m in msgs:
                _, seq, pending = _delivery(m.reply)
                if seq > end_seq:
                    return
                try:
                    yield Recorded(seq, decode_event(m.data))
                except EventDecodeError as exc:
                    log.warning("skipping undecodable message at seq %d: %s", seq, exc)
                if seq == end_seq or pending == 0:
                    return
    finally:
        await feed.stop()
        with contextlib.suppress(Exception):
            await log_.js.delete_consumer(stream, info.name)


async def rebuild(
    log_: EventLog, pool: asyncpg.Pool, projection: Projection, *, batch_size: int = 1000
) -> int:
    """Drops the projection's rows and replays the log into it; returns the events applied.

    The exclusive advisory lock is held while the tables are emptied and the end of the log is
    read, so a batch the live runner commits meanwhile is either dropped and replayed, or kept.
    """
    name = projection.spec.name
    async with pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(name))
            for table in projection.tables:
                await conn.execute(f"TRUNCATE {table}")
            await conn.execute("DELETE FROM projection_checkpoints WHERE name = $1", name)
            info = await log_.js.stream_info(projection.spec.stream)
        end_seq = info.state.last_seq
        if info.state.first_seq > 1:
            log.warning(
                "the log starts at seq %d: older events were removed by retention",
                info.state.first_seq,
            )
    applied = 0
    batch: list[Recorded] = []
    async with pool.acquire() as conn:
        async for recorded in read_log(
            log_, projection.spec.subjects, stream=projection.spec.stream, end_seq=end_seq
        ):
            batch.append(recorded)
            if len(batch) >= batch_size:
                await _apply_batch(conn, projection, batch)
                applied += len(batch)
                batch = []
        if batch:
            await _apply_batch(conn, projection, batch)
            applied += len(batch)
    return applied
