"""Durable consumers that never start over: created after their saved position, kept as they are.

A durable consumer can be lost: deleted by mistake, a stream restored from a backup, a server
gone with its state. Recreated with "deliver all", it would hand every recorded input to its
processor again (every turn answered twice, every provider paid twice). So each runner writes
its consumer's ack floor to the KV bucket ``libra-positions`` about once a second while it moves,
and whatever must create the consumer starts right after it. With no saved position a processor
starts a recent window back (``ConsumerSpec.start_window_s``) and a projection at the beginning
(it must fold everything). Inputs between the saved floor and the moment of creation may have
been settled already: the runner checks those against the log (``runtime/settled.py``).

A consumer that keeps its state in the server's memory (``ConsumerSpec.memory_state``: the
projections and the rate-limit view) is gone after every restart of the server, a clean one
included, by design: its recreation after its saved position is routine and logged at INFO. Any
other missing consumer is a warning.

Set-up calls are patient: a slow or restarting server during start (``nats: timeout``) is
waited out with back-off instead of taking the component down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, ConsumerInfo
from nats.js.errors import BadRequestError, NotFoundError, ServiceUnavailableError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from libra.contracts import POSITIONS_BUCKET, ConsumerSpec, ConsumerStart, consumer_config

__all__ = ["PositionKeeper", "ensure_consumer", "patiently", "saved_position"]

log = logging.getLogger("libra.positions")
T = TypeVar("T")

# What a busy, restarting or not yet elected server answers for a while; anything else (a
# refused permission, a bad config) is a mistake that retrying would only hide.
_TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    ServiceUnavailableError,
)
_KV_STREAM = f"KV_{POSITIONS_BUCKET}"


def _key(name: str) -> str:
    """The subject of a consumer's position in the bucket's stream."""
    return f"$KV.{POSITIONS_BUCKET}.{name}"


async def patiently(call: Callable[[], Awaitable[T]], *, what: str, within_s: float = 120.0) -> T:
    """Runs ``call``, retrying transient NATS failures with back-off for up to ``within_s``."""
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(_TRANSIENT),
        wait=wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.2),
        stop=stop_after_delay(within_s),
        before_sleep=lambda state: log.warning(
            "%s: %s; trying again", what, state.outcome.exception() if state.outcome else "?"
        ),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            result = await call()
    return result


async def saved_position(js: JetStreamContext, name: str) -> int:
    """Returns the stream sequence a consumer had settled everything up to; 0 if unknown."""
    try:
        entry = await js.get_msg(_KV_STREAM, subject=_key(name), direct=True)
        return int(entry.data or b"0")
    except (NotFoundError, ValueError):
        return 0


async def ensure_consumer(js: JetStreamContext, spec: ConsumerSpec) -> ConsumerInfo:
    """Keeps an existing consumer where it is (updating its settings); creates a missing one
    after its saved position. Returns its info."""
    try:
        info = await js.consumer_info(spec.stream, spec.name)
    except NotFoundError:
        return await _create(js, spec)
    current = info.config
    wanted = consumer_config(spec).evolve(
        deliver_policy=current.deliver_policy,
        opt_start_seq=current.opt_start_seq,
        opt_start_time=current.opt_start_time,
        mem_storage=current.mem_storage,  # the server does not change it in an update
    )
    if _same(wanted, current):
        return info
    return await js.add_consumer(spec.stream, wanted)


_COMPARED = (
    "filter_subject",
    "filter_subjects",
    "ack_wait",
    "max_deliver",
    "max_ack_pending",
    "description",
)


def _same(wanted: ConsumerConfig, current: ConsumerConfig) -> bool:
    """Whether an update would change nothing (the server answers unset fields as empty)."""
    return all((getattr(wanted, f) or None) == (getattr(current, f) or None) for f in _COMPARED)


async def _create(js: JetStreamContext, spec: ConsumerSpec) -> ConsumerInfo:
    start = await _start_of(js, spec)
    try:
        return await js.add_consumer(spec.stream, consumer_config(spec, start))
    except BadRequestError:  # another instance created it a moment ago, starting a little apart
        return await js.consumer_info(spec.stream, spec.name)


async def _start_of(js: JetStreamContext, spec: ConsumerSpec) -> ConsumerStart | None:
    state = (await js.stream_info(spec.stream)).state
    if state.last_seq == 0:
        return None  # a new log: everything there will be is new
    saved = await saved_position(js, spec.name)
    if spec.memory_state:  # routine after every server restart: said, not warned
        level, gone = logging.INFO, "kept its state in memory, which a server restart clears"
    else:
        level, gone = logging.WARNING, "is missing"
    if 0 < saved <= state.last_seq:  # past the end: a position from another life of the stream
        log.log(level, "consumer %s %s: created after its position %d", spec.name, gone, saved)
        return ConsumerStart(seq=saved + 1)
    if spec.start_window_s <= 0:
        log.log(level, "consumer %s %s and has no position: from the start", spec.name, gone)
        return None
    log.log(
        level,
        "consumer %s %s and has no position: from %.0f s back",
        spec.name,
        gone,
        spec.start_window_s,
    )
    return ConsumerStart(time=datetime.now(UTC) - timedelta(seconds=spec.start_window_s))


class PositionKeeper:
    """Writes a consumer's ack floor to ``libra-positions`` every ``every_s`` while it moves."""

    def __init__(self, js: JetStreamContext, spec: ConsumerSpec, *, every_s: float = 1.0) -> None:
        self.js, self.spec, self.every_s = js, spec, every_s
        self.saved = 0
        self._task: asyncio.Task | None = None
        self._warned = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"position-{self.spec.name}")

    async def stop(self) -> None:
        """Stops, writing the position once more (a drain has just acked the last messages)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.save(), 2.0)

    async def save(self) -> None:
        info = await self.js.consumer_info(self.spec.stream, self.spec.name)
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        if floor > self.saved:
            await self.js.publish(_key(self.spec.name), str(floor).encode())
            self.saved = floor

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.save()
            except Exception as exc:  # an outage, or no bucket: the consumer itself goes on
                log.log(
                    logging.DEBUG if self._warned else logging.WARNING,
                    "could not save the position of %s: %s",
                    self.spec.name,
                    exc,
                )
                self._warned = True
