"""Streams, the audio bucket and every consumer: names, subjects and settings in one place.

``LIBRA`` is the durable log: file storage, synced to disk on every write by the embedded
server's ``nats.conf``, duplicates dropped within the window by ``Nats-Msg-Id``. The reply deltas
go to ``LIBRA_LIVE`` (memory storage, minutes of retention): the completed event carries the
whole reply, so losing deltas to a power cut loses nothing a person or a projection needs.
Streams may not overlap, so ``LIBRA`` lists the fact subjects one by one.

A consumer never starts over from the beginning of the log by accident: ``consumer_config``
takes where a consumer that must be (re)created starts (after its saved position in the
``libra-positions`` bucket, or a recent window), and each processor's spec says which of its
outputs settle an input, so a redelivered input already answered is not paid for twice.
``libra.retry.<consumer>.<c>`` carries a dead letter re-driven to the one consumer that gave up.
"""

from __future__ import annotations

from datetime import datetime

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
    "KNOWLEDGE_BUCKET",
    "LIVE_STREAM",
    "LIVE_SUBJECTS",
    "LOG_STREAM",
    "LOG_SUBJECTS",
    "POSITIONS_BUCKET",
    "ConsumerSpec",
    "ConsumerStart",
    "consumer_config",
    "live_stream_config",
    "log_stream_config",
]

LOG_STREAM = "LIBRA"
LIVE_STREAM = "LIBRA_LIVE"
AUDIO_BUCKET = "libra-audio"
KNOWLEDGE_BUCKET = "libra-knowledge"  # documents added to knowledge bases; kept until removed
POSITIONS_BUCKET = "libra-positions"  # each consumer's ack floor, kept apart from the consumer

LOG_SUBJECTS = (
    "libra.text.>",
    "libra.voice.>",
    "libra.asr.>",
    "libra.turn.>",
    "libra.llm.completed.>",
    "libra.llm.failed.>",
    "libra.tool.>",
    "libra.tts.>",
    "libra.reply.>",
    "libra.session.>",
    "libra.knowledge.>",
    "libra.dead.>",
    "libra.retry.>",
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
    """One durable pull consumer: what it reads, and how hard it tries before dead-lettering.

    ``settled_by`` names the outputs (``domain.event``) that settle an input, and
    ``settled_key`` the key their ids are derived with (``derive_id(input.id, key)``); with no
    key, an output caused by the input that says it is ``final``. A suspect delivery (a
    redelivery, or one older than the consumer) is looked up in the log before it is handled.
    ``start_window_s``: how far back a consumer created with no saved position starts; 0 for
    the whole log (a projection must fold everything). ``redrive``: it takes dead letters
    re-driven to it on ``libra.retry.<name>.>``.
    """

    name: str
    subjects: tuple[str, ...]
    stream: str = LOG_STREAM
    max_deliver: int = 5  # -1: for ever (projections wait out a database that is down)
    backoff_s: tuple[float, ...] = (0.5, 2.0, 5.0, 15.0)
    # Short, so an input held by a process that died comes back within seconds; the runtime
    # sends in_progress every third of it while a handler works, so long work is kept.
    ack_wait_s: float = 6.0
    max_ack_pending: int = 1024
    description: str = ""
    settled_by: tuple[str, ...] = ()
    settled_key: str = ""
    start_window_s: float = 600.0
    redrive: bool = True
    # Its ack state kept in the server's memory: with sync_interval always, a file consumer's
    # state is an O_SYNC write and a directory fsync up to ten times a second while it moves,
    # beside the log's own writes, and on the same disk as every reply's publishes. Only for a
    # fold that is idempotent by event id: a server restart loses such a consumer, and it is
    # recreated after its saved position (runtime/positions.py) like any lost one.
    memory_state: bool = False
    # Made by ``libra migrate``/``libra up`` with the rest; False: by its component when it
    # runs, for an optional edge whose consumer would otherwise fill up while it is off.
    provisioned: bool = True

    @property
    def filter_subjects(self) -> tuple[str, ...]:
        """The subjects its consumer filters: its inputs, and its re-driven dead letters."""
        if not self.redrive:
            return self.subjects
        return (*self.subjects, f"libra.retry.{self.name}.>")


class ConsumerStart(Struct, frozen=True, kw_only=True):
    """Where a consumer that is created starts: a stream sequence, a time, or the beginning."""

    seq: int = 0
    time: datetime | None = None


def consumer_config(spec: ConsumerSpec, start: ConsumerStart | None = None) -> ConsumerConfig:
    """Returns the JetStream config for a consumer spec, starting at ``start`` (default: all)."""
    subjects = list(spec.filter_subjects)
    policy, seq, at = DeliverPolicy.ALL, None, None
    if start is not None and start.seq:
        policy, seq = DeliverPolicy.BY_START_SEQUENCE, start.seq
    elif start is not None and start.time is not None:
        policy, at = DeliverPolicy.BY_START_TIME, start.time.isoformat()
    return ConsumerConfig(
        durable_name=spec.name,
        description=spec.description or None,
        deliver_policy=policy,
        opt_start_seq=seq,
        opt_start_time=at,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=spec.ack_wait_s,
        max_deliver=spec.max_deliver,
        filter_subject=subjects[0] if len(subjects) == 1 else None,
        filter_subjects=subjects if len(subjects) > 1 else None,
        max_ack_pending=spec.max_ack_pending,
        max_waiting=512,
        mem_storage=spec.memory_state or None,
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
            settled_by=("turn.accepted", "turn.rejected", "turn.confirmed", "turn.abandoned"),
            settled_key="turn",
        ),
        ConsumerSpec(
            name="llm",
            subjects=("libra.turn.accepted.>",),
            description="answers accepted turns, streaming deltas",
            max_deliver=3,
            settled_by=("llm.completed", "llm.failed"),
            settled_key="completed",
        ),
        ConsumerSpec(
            name="asr",
            # partials only warm its memory up: they are never turns, and settle nothing
            subjects=("libra.voice.captured.>", "libra.voice.partial.>"),
            description="speech-to-text of captured utterances",
            max_deliver=3,
            backoff_s=(0.5, 2.0),
            settled_by=("asr.transcribed",),
            settled_key="asr",
        ),
        ConsumerSpec(
            name="tts",
            # the replies to voice turns, and the refusals a person in a call hears
            subjects=("libra.turn.accepted.>", "libra.turn.rejected.>"),
            description="speaks the replies to voice turns (and refusals), sentence by sentence",
            max_deliver=3,
            backoff_s=(1.0, 5.0),
            settled_by=("tts.synthesized",),  # the clip that says it is the last
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
            memory_state=True,
        ),
        ConsumerSpec(
            name="history",
            # the person's words from the admitted turn: a refused message is never history
            subjects=("libra.turn.accepted.>", "libra.llm.completed.>"),
            description="history projection: conversations and messages in Postgres",
            max_ack_pending=8192,
            max_deliver=-1,
            ack_wait_s=30.0,  # a batch has no in_progress: a slow commit must not come back
            start_window_s=0,
            redrive=False,
            memory_state=True,
        ),
        ConsumerSpec(
            name="discord",
            # a server's moderation log channel: flagged messages and stopped replies
            subjects=("libra.turn.rejected.>", "libra.llm.completed.>"),
            description="reports flagged Discord turns in each server's moderation log channel",
            max_deliver=5,
            backoff_s=(1.0, 5.0, 15.0, 60.0),
            memory_state=True,  # a report is claimed in Redis: a replayed delivery posts nothing
            provisioned=False,  # Discord is optional: made by the gateway when it runs
        ),
        ConsumerSpec(
            name="sessions",
            subjects=("libra.session.>",),
            description="sessions projection: chat mode, settings, voice sessions in Postgres",
            max_ack_pending=8192,
            max_deliver=-1,
            ack_wait_s=30.0,  # a batch has no in_progress: a slow commit must not come back
            start_window_s=0,
            redrive=False,
            memory_state=True,
        ),
        ConsumerSpec(
            name="knowledge",
            subjects=("libra.knowledge.>",),
            description="knowledge projection: documents chunked and embedded into pgvector",
            max_ack_pending=256,
            max_deliver=-1,
            ack_wait_s=120.0,  # a batch embeds its documents' chunks (an API, for some)
            start_window_s=0,
            redrive=False,
            memory_state=True,
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
            ack_wait_s=30.0,  # a batch has no in_progress: a slow commit must not come back
            start_window_s=0,
            redrive=False,
            memory_state=True,
        ),
    )
}
