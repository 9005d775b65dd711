"""Dead letters: the message a consumer gave up on, kept in the log with the reason.

A dead letter is re-driven (``libra dead retry``) with a ``dead.retried`` event on
``libra.retry.<consumer>.<c>``, which only the consumer that gave up filters: its runner handles
the original message again, after checking that the log does not hold its answer already. The
retry's id is derived from the letter's, so one letter retried twice is one retry; a retry that
fails again makes a new letter (derived from the retry), which can be retried in its turn.

Anyone who may read the log reads its dead letters: a letter's ``error`` is the error's class and
a short, redacted message (``runtime/redact.py``); its payload is the message given up on.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime

from nats.aio.msg import Msg
from nats.js.api import RawStreamMsg

from libra.contracts import (
    AnyEvent,
    DeadLetter,
    DeadRetried,
    SubjectError,
    derive,
    derive_id,
    new_id,
    parse_subject,
)

from .redact import redact

__all__ = ["dead_letter_for", "retry_of"]

_MAX_KEPT = 512 * 1024  # the original stays in the stream at stream_seq; this is for reading
_ERROR_LIMIT = 400


def dead_letter_for(
    consumer: str,
    msg: Msg,
    error: str,
    event: AnyEvent | None = None,
    *,
    retry: tuple[DeadRetried, RawStreamMsg] | None = None,
) -> DeadLetter:
    """Returns the dead letter for ``msg``; its id is the same however often this runs.

    ``error`` is redacted here whoever wrote it (``ErrorClass: message``, see ``describe``).

    ``retry``: ``msg`` was a re-drive of the original message given with it; the letter keeps
    the original (its subject, sequence and payload) and is derived from the retry.
    """
    meta = msg.metadata
    subject, data, seq = msg.subject, msg.data, meta.sequence.stream
    parent = event.id if event is not None else _message_id(msg, meta.timestamp)
    if retry is not None:
        redo, original = retry
        subject, data, seq, parent = original.subject, original.data or b"", original.seq, redo.id
    try:
        conversation = parse_subject(subject).conversation
    except SubjectError:
        conversation = "unknown"
    payload, encoding = _readable(data[:_MAX_KEPT])
    error = redact(error, limit=_ERROR_LIMIT)
    if len(data) > _MAX_KEPT:
        error = f"{error} (payload truncated to {_MAX_KEPT} of {len(data)} bytes)"
    return DeadLetter(
        id=derive_id(parent, f"dead/{consumer}"),
        at=datetime.now(UTC),
        conversation=event.conversation if event is not None else conversation,
        user=event.user if event is not None else "",
        turn=event.turn if event is not None else "",
        causation=event.id if event is not None else "",
        consumer=consumer,
        subject=subject,
        stream_seq=seq,
        deliveries=meta.num_delivered,
        error=error,
        payload=payload,
        payload_encoding=encoding,
    )


def retry_of(letter: DeadLetter) -> DeadRetried:
    """Returns the event that re-drives ``letter`` to its consumer; always the same one."""
    return derive(
        letter,
        DeadRetried,
        key="retry",
        consumer=letter.consumer,
        letter=letter.id,
        stream_seq=letter.stream_seq,
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
