"""The history projection: what people said to Libra and what it answered, per conversation."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from libra.contracts import CONSUMERS, AnyEvent, LlmCompleted, TextReceived, id_time
from libra.runtime.projection import Recorded

__all__ = ["INSERT_MESSAGES", "HistoryProjection"]

INSERT_MESSAGES = (
    "INSERT INTO messages (event_id, conversation, user_id, turn, role, content, modality,"
    " provider, model, at, stream_seq) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    " ON CONFLICT (event_id) DO NOTHING"
)


def _messages(event: AnyEvent) -> list[tuple[str, str, str, str | None, str | None, datetime]]:
    """The messages an event adds: (id, role, content, provider, model, time)."""
    match event:
        case TextReceived():
            return [(event.id, "user", event.text, None, None, event.at)]
        case LlmCompleted(modality="voice") if event.user_text:
            # What was said aloud is in the reply's event (there is no text.received): its id and
            # time are the turn's, which is the captured utterance's.
            said = (event.turn, "user", event.user_text, None, None, id_time(event.turn))
            return [
                said,
                (event.id, "assistant", event.text, event.provider, event.model, event.at),
            ]
        case LlmCompleted():
            return [(event.id, "assistant", event.text, event.provider, event.model, event.at)]
    return []


class HistoryProjection:
    """Folds ``text.received`` and ``llm.completed`` into ``conversations`` and ``messages``
    (for a spoken turn, the completion brings the words that were said too)."""

    spec = CONSUMERS["history"]
    tables = ("messages", "conversations")

    async def apply(self, conn: asyncpg.Connection, batch: Sequence[Recorded]) -> None:
        messages = []
        conversations: dict[str, tuple[str, object, object]] = {}
        for seq, event in batch:
            said = _messages(event)
            if not said:
                continue
            for event_id, role, content, provider, model, at in said:
                messages.append(
                    (
                        event_id,
                        event.conversation,
                        event.user,
                        event.turn,
                        role,
                        content.replace("\x00", "\ufffd"),  # Postgres text cannot hold NUL
                        "text" if isinstance(event, TextReceived) else event.modality,
                        provider,
                        model,
                        at,
                        seq,
                    )
                )
            platform, earliest = event.origin.platform, min(m[5] for m in said)
            _, first, last = conversations.get(event.conversation, (platform, earliest, event.at))
            conversations[event.conversation] = (
                platform,
                min(first, earliest),
                max(last, event.at),
            )
        if not messages:
            return
        await conn.executemany(INSERT_MESSAGES, messages)
        await conn.executemany(
            "INSERT INTO conversations (id, platform, started_at, last_at) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (id) DO UPDATE SET"
            " started_at = LEAST(conversations.started_at, EXCLUDED.started_at),"
            " last_at = GREATEST(conversations.last_at, EXCLUDED.last_at)",
            [
                (cid, platform, first, last)
                for cid, (platform, first, last) in sorted(conversations.items())
            ],
        )
