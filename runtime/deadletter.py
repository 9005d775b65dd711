"""Dead letters: the message a consumer gave up on, kept in the log with the reason."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

from nats.aio.msg import Msg

from libra.contracts import (
    AnyEvent,
    DeadLetter,
    SubjectError,
    derive_id,
    new_id,
    parse_subject,
)

__all__ = ["dead_letter_for"]

_MAX_KEPT = 512 * 1024  # the original stays in the stream at stream_seq; this is for reading


def dead_letter_for(
    consumer: str, msg: Msg, error: str, event: AnyEvent | None = None
) -> DeadLetter:
    """Returns the dead letter for ``msg``; its id is the same however often this runs."""
    meta = msg.metadata
    parent = event.id if event is not None else _message_id(msg, meta.timestamp)
    try:
        conversation = parse_subject(msg.subject).conversation
    except SubjectError:
        conversation = "unknown"
    payload, encoding = _readable(msg.data[:_MAX_KEPT])
    if len(msg.data) > _MAX_KEPT:
        error = f"{error} (payload truncated to {_MAX_KEPT} of {len(msg.data)} bytes)"
    return DeadLetter(
        id=derive_id(parent, f"dead/{consumer}"),
        at=datetime.now(UTC),
        conversation=event.conversation if event is not None else conversation,
        user=event.user if event is not None else "",
        turn=event.turn if event is not None else "",
        causation=event.id if event is not None else "",
        consumer=consumer,
        subject=msg.subject,
        stream_seq=meta.sequence.stream,
        deliveries=meta.num_delivered,
        error=error[:4000],
        payload=payload,
        payload_encoding=encoding,
    )


def _message_id(msg: Msg, timestamp: datetime) -> str:
    """An undecodable message still has a stream time: a stable id is derived from it."""
    ms = int(timestamp.timestamp() * 1000)
    base = new_id(at_ms=ms)[:10] + "0" * 16
    return derive_id(base, f"{msg.subject}/{msg.metadata.sequence.stream}")


def _readable(data: bytes) -> tuple[str, str]:
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"
