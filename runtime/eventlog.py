"""The event log client: connect to NATS, provision the streams, publish events.

Every event is published with its id as ``Nats-Msg-Id``, so JetStream drops a copy published
again within the duplicate window (a redelivered input re-running its processor). Provisioning
and consumer set-up are patient with a slow server (see ``runtime/positions.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import unquote, urlparse

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, NoStreamResponseError, NotFoundError
from nats.js.object_store import ObjectStore
from prometheus_client import Counter

from libra.contracts import (
    AUDIO_BUCKET,
    CONSUMERS,
    POSITIONS_BUCKET,
    ConsumerSpec,
    Event,
    encode_event,
    live_stream_config,
    log_stream_config,
    subject_of,
)

from .buckets import STREAM_NAME_IN_USE, ensure_key_value, ensure_object_store
from .config import Settings
from .documents import ensure_documents_bucket
from .metrics import EVENTS_PUBLISHED
from .positions import ensure_consumer, patiently

__all__ = ["EventLog", "connect_nats"]

log = logging.getLogger("libra.eventlog")
_RETRY_EVERY_S = 0.25
_running: set[asyncio.Task] = set()  # (a task that nothing holds may be collected mid-run)


async def connect_nats(
    url: str, *, name: str, reconnected: Callable[[], Awaitable[None]] | None = None
) -> NATS:
    """Connects to NATS, reconnecting for ever: a restart of the server must not end Libra.

    ``url`` may list several servers of a cluster, comma-separated. The first credentials in it
    log in to every server, those the cluster tells the client about included. ``reconnected``
    runs (as a task of its own) after each reconnection.
    """
    servers = [part.strip() for part in url.split(",") if part.strip()]
    login = next((u for u in map(urlparse, servers) if u.password is not None), None)

    async def on_error(exc: Exception) -> None:
        log.warning("nats connection error: %s", exc)

    async def on_disconnect() -> None:
        log.info("nats disconnected")

    async def on_reconnect() -> None:
        log.info("nats reconnected")
        if reconnected is not None:
            task = asyncio.create_task(reconnected())
            _running.add(task)
            task.add_done_callback(_running.discard)

    return await nats.connect(
        servers,
        user=unquote(login.username or "") if login else None,
        password=unquote(login.password) if login else None,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )


_counters: dict[type, Counter] = {}


def _published(event: Event) -> Counter:
    counter = _counters.get(type(event))
    if counter is None:
        counter = _counters[type(event)] = EVENTS_PUBLISHED.labels(
            type(event).__struct_config__.tag
        )
    return counter


class EventLog:
    """Writes events to the log and owns the connection that everything else borrows."""

    def __init__(self, nc: NATS, *, publish_timeout: float = 5.0, retry_s: float = 15.0) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(
            timeout=publish_timeout, publish_async_max_pending=4000
        )
        self.retry_s = retry_s
        self._memory_streams: dict[str, nats.js.api.StreamConfig] = {}

    @classmethod
    async def connect(cls, url: str, *, name: str) -> EventLog:
        """Connects; after a reconnection, the memory streams a restarted server lost are made
        again at once (a publish to one would wait out its timeout, as the followers of a
        reply listen on its subjects and no "no stream" answer comes)."""
        event_log: EventLog | None = None

        async def restore() -> None:
            for _ in range(20):  # JetStream may take a moment to answer after a restart
                if event_log is None or await event_log._restore_memory_streams():
                    return
                await asyncio.sleep(_RETRY_EVERY_S)

        event_log = cls(await connect_nats(url, name=name, reconnected=restore))
        return event_log

    async def publish(self, event: Event) -> int:
        """Publishes one event and waits for the stream's ack; returns its stream sequence.

        A stream whose leader died (a node of a cluster) answers no one until its replicas have
        elected another, a few seconds: the publish is tried again for up to ``retry_s``. The
        event's id makes a repeat of one that did get through a duplicate the stream drops.
        A memory stream that a restarted server lost (``LIBRA_LIVE``) is created again first.
        """
        subject, data = subject_of(event), encode_event(event)
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                ack = await self.js.publish(subject, data, headers={"Nats-Msg-Id": event.id})
                break
            except (NoStreamResponseError, nats.errors.TimeoutError):
                if time.monotonic() >= deadline:
                    raise
                await self._restore_memory_streams()
                await asyncio.sleep(_RETRY_EVERY_S)
        _published(event).inc()
        return ack.seq

    async def _restore_memory_streams(self) -> bool:
        """Creates again the memory streams this log provisioned, if the server lost them;
        returns False if JetStream did not answer."""
        for config in self._memory_streams.values():
            try:
                await self.js.stream_info(config.name)
            except NotFoundError:
                log.warning("stream %s was lost (a server restart); creating it again", config.name)
                with contextlib.suppress(nats.errors.Error):
                    await self.ensure_stream(config)
            except nats.errors.Error:
                return False
        return True

    async def publish_many(self, events: Iterable[Event], *, window: int = 1000) -> int:
        """Publishes events with at most ``window`` acks outstanding; returns how many."""
        pending: list[asyncio.Future] = []
        count = 0
        for event in events:
            pending.append(
                await self.js.publish_async(
                    subject_of(event), encode_event(event), headers={"Nats-Msg-Id": event.id}
                )
            )
            _published(event).inc()
            count += 1
            if len(pending) >= window:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        return count

    async def audio_store(self) -> ObjectStore:
        return await self.js.object_store(AUDIO_BUCKET)

    async def provision(
        self, settings: Settings, consumers: Iterable[ConsumerSpec] | None = None
    ) -> None:
        """Creates or updates the streams, the buckets and the consumers; safe to repeat."""
        await patiently(lambda: self._provision(settings, consumers), what="provisioning the log")

    async def _provision(
        self, settings: Settings, consumers: Iterable[ConsumerSpec] | None
    ) -> None:
        replicas = settings.libra_stream_replicas
        await self.ensure_stream(
            log_stream_config(
                max_age_s=settings.libra_log_max_age,
                max_bytes=settings.libra_log_max_bytes,
                duplicate_window_s=settings.libra_duplicate_window,
                replicas=replicas,
            )
        )
        await self.ensure_stream(
            live_stream_config(max_age_s=settings.libra_live_max_age, replicas=replicas)
        )
        await ensure_object_store(
            self.js,
            nats.js.api.ObjectStoreConfig(
                bucket=AUDIO_BUCKET,
                description="Audio of utterances and synthesized clips",
                ttl=settings.libra_audio_ttl or None,
                storage=nats.js.api.StorageType.FILE,
                replicas=replicas,
            ),
        )
        await self._forbid_rollups(f"OBJ_{AUDIO_BUCKET}")
        await ensure_documents_bucket(self.js, replicas=replicas)
        await ensure_key_value(
            self.js,
            nats.js.api.KeyValueConfig(
                bucket=POSITIONS_BUCKET,
                description="Each durable consumer's ack floor: where a lost one starts again",
                storage=nats.js.api.StorageType.FILE,
                replicas=replicas,
                direct=True,
            ),
        )
        if consumers is None:
            consumers = [spec for spec in CONSUMERS.values() if spec.provisioned]
        for spec in consumers:
            await self.ensure_consumer(spec)

    async def _forbid_rollups(self, stream: str) -> None:
        """A rollup header purges a stream (``Nats-Rollup: all``) and needs only the right to
        publish into it; the edges write audio, so the audio bucket takes none. Its writers do
        without (``AudioStore`` reads an object's newest metadata; the TTL drops old ones)."""
        config = (await self.js.stream_info(stream)).config
        if config.allow_rollup_hdrs:
            await self.js.update_stream(dataclasses.replace(config, allow_rollup_hdrs=False))

    async def ensure_consumer(self, spec: ConsumerSpec) -> nats.js.api.ConsumerInfo:
        """Keeps the consumer as it is, or creates it after its saved position; patiently."""
        return await patiently(
            lambda: ensure_consumer(self.js, spec), what=f"setting up consumer {spec.name}"
        )

    async def ensure_stream(self, config: nats.js.api.StreamConfig) -> None:
        """Creates the stream, or updates it to ``config``; safe to repeat."""
        try:
            await self.js.add_stream(config)
        except BadRequestError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:
                raise
            await self.js.update_stream(config)
        if config.storage == nats.js.api.StorageType.MEMORY:
            self._memory_streams[config.name] = config

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()

    async def publish_first(self, event: Event) -> bool:
        """Publishes one event once; returns False if the stream already held its id.

        Of several publishers of one id (two gateways given the same message), the one that gets
        True is the one to act on it. No retries: the caller bounds how long it waits.
        """
        ack = await self.js.publish(
            subject_of(event), encode_event(event), headers={"Nats-Msg-Id": event.id}
        )
        if not ack.duplicate:
            _published(event).inc()
        return not ack.duplicate
