"""Streams, the audio bucket and every consumer: names, subjects and settings in one place.

``LIBRA`` is the durable log: file storage, synced to disk on every write by the embedded
server's ``nats.conf``, duplicates dropped within the window by ``Nats-Msg-Id``. The reply deltas
go to ``LIBRA_LIVE`` (memory storage, minutes of retention): the completed event carries the
whole reply, so losing deltas to a power cut loses nothing a person or a projection needs.
Streams may not overlap, so ``LIBRA`` lists the fact subjects one by one.
"""

from __future__ import annotations

from msgspec import Struct
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

__all__ = [
    "AUDIO_BUCKET",
    "CONSUMERS",
    "LIVE_STREAM",
    "LIVE_SUBJECTS",
    "LOG_STREAM",
    "LOG_SUBJECTS",
    "ConsumerSpec",
    "consumer_config",
    "live_stream_config",
    "log_stream_config",
]

LOG_STREAM = "LIBRA"
LIVE_STREAM = "LIBRA_LIVE"
AUDIO_BUCKET = "libra-audio"

LOG_SUBJECTS = (
    "libra.text.>",
    "libra.voice.>",
    "libra.asr.>",
    "libra.turn.>",
    "libra.llm.completed.>",
    "libra.llm.failed.>",
    "libra.tts.>",
    "libra.reply.>",
    "libra.session.>",
    "libra.dead.>",
)
LIVE_SUBJECTS = ("libra.llm.delta.>",)


def log_stream_config(
    *,
    max_age_s: float,
    max_bytes: int,
    duplicate_window_s: float,
    replicas: int = 1,
) -> StreamConfig:
    """Returns the durable log's config; retention limits come from the operator's settings."""
    return StreamConfig(
        name=LOG_STREAM,
        description="Libra's durable event log",
        subjects=list(LOG_SUBJECTS),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=max_age_s or None,
        max_bytes=max_bytes or -1,
        duplicate_window=max(duplicate_window_s, 120.0),
        num_replicas=replicas,
        allow_direct=True,
    )


def live_stream_config(*, max_age_s: float, replicas: int = 1) -> StreamConfig:
    """Returns the config of the short-lived stream of reply deltas."""
    return StreamConfig(
        name=LIVE_STREAM,
        description="Streamed reply pieces; the completed events in LIBRA carry the whole reply",
        subjects=list(LIVE_SUBJECTS),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.MEMORY,
        discard=DiscardPolicy.OLD,
        max_age=max_age_s,
        duplicate_window=min(120.0, max_age_s),
        num_replicas=replicas,
    )


class ConsumerSpec(Struct, frozen=True, kw_only=True):
    """One durable pull consumer: what it reads, and how hard it tries before dead-lettering."""

    name: str
    subjects: tuple[str, ...]
    stream: str = LOG_STREAM
    max_deliver: int = 5  # -1: for ever (projections wait out a database that is down)
    backoff_s: tuple[float, ...] = (0.5, 2.0, 5.0, 15.0)
    ack_wait_s: float = 30.0
    max_ack_pending: int = 1024
    description: str = ""


def consumer_config(spec: ConsumerSpec) -> ConsumerConfig:
    """Returns the JetStream config for a consumer spec."""
    subjects = list(spec.subjects)
    return ConsumerConfig(
        durable_name=spec.name,
        description=spec.description or None,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=spec.ack_wait_s,
        max_deliver=spec.max_deliver,
        filter_subject=subjects[0] if len(subjects) == 1 else None,
        filter_subjects=subjects if len(subjects) > 1 else None,
        max_ack_pending=spec.max_ack_pending,
        max_waiting=512,
    )


CONSUMERS: dict[str, ConsumerSpec] = {
    spec.name: spec
    for spec in (
        ConsumerSpec(
            name="turns",
            subjects=(
                "libra.text.received.>",
                "libra.asr.transcribed.>",
                "libra.voice.ended.>",
                "libra.voice.resumed.>",
            ),
            description="admission: rate limit, input checks, language",
            ack_wait_s=10.0,
        ),
        ConsumerSpec(
            name="llm",
            subjects=("libra.turn.accepted.>",),
            description="answers accepted turns, streaming deltas",
            ack_wait_s=30.0,
            max_deliver=3,
        ),
        ConsumerSpec(
            name="asr",
            subjects=("libra.voice.captured.>",),
            description="speech-to-text of captured utterances",
            max_deliver=3,
            backoff_s=(0.5, 2.0),
        ),
        ConsumerSpec(
            name="tts",
            subjects=("libra.turn.accepted.>",),
            description="speaks the replies to voice turns, sentence by sentence",
            max_deliver=3,
            backoff_s=(1.0, 5.0),
        ),
        ConsumerSpec(
            name="memory",
            subjects=("libra.llm.completed.>", "libra.session.memory_reset.>"),
            description="embeds completed exchanges into pgvector; forgets on reset",
            max_deliver=8,
            backoff_s=(1.0, 5.0, 15.0, 60.0),
        ),
        ConsumerSpec(
            name="ratelimit-view",
            subjects=("libra.turn.accepted.>", "libra.turn.confirmed.>"),
            description="the Redis rate-limit view, rebuildable from the log",
            max_ack_pending=8192,
            max_deliver=-1,
        ),
        ConsumerSpec(
            name="history",
            subjects=("libra.text.received.>", "libra.llm.completed.>"),
            description="history projection: conversations and messages in Postgres",
            max_ack_pending=8192,
            max_deliver=-1,
        ),
        ConsumerSpec(
            name="sessions",
            subjects=("libra.session.>",),
            description="sessions projection: chat mode, settings, voice sessions in Postgres",
            max_ack_pending=8192,
            max_deliver=-1,
        ),
        ConsumerSpec(
            name="turns-projection",
            subjects=(
                "libra.text.received.>",
                "libra.voice.captured.>",
                "libra.asr.transcribed.>",
                "libra.turn.>",
                "libra.llm.completed.>",
                "libra.llm.failed.>",
                "libra.tts.synthesized.>",
                "libra.reply.delivered.>",
            ),
            description="turns projection: one row per turn with each stage's time",
            max_ack_pending=8192,
            max_deliver=-1,
        ),
    )
}
