"""The history projection: what people said to Libra and what it answered, per conversation."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from libra.contracts import CONSUMERS, LlmCompleted, TextReceived
from libra.runtime.projection import Recorded

__all__ = ["INSERT_MESSAGES", "HistoryProjection"]

INSERT_MESSAGES = (
    "INSERT INTO messages (event_id, conversation, user_id, turn, role, content, modality,"
    " provider, model, at, stream_seq) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    " ON CONFLICT (event_id) DO NOTHING"
)


class HistoryProjection:
    """Folds ``text.received`` and ``llm.completed`` into ``conversations`` and ``messages``."""

    spec = CONSUMERS["history"]
    tables = ("messages", "conversations")

    async def apply(self, conn: asyncpg.Connection, batch: Sequence[Recorded]) -> None:
        messages = []
        conversations: dict[str, tuple[str, object, object]] = {}
        for seq, event in batch:
            match event:
                case TextReceived(text=text, origin=origin):
                    role, content, provider, model, platform = (
                        "user",
                        text,
                        None,
                        None,
                        origin.platform,
                    )
                    modality = "text"
                case LlmCompleted(text=text, provider=provider, model=model, origin=origin):
                    role, content, platform = "assistant", text, origin.platform
                    modality = event.modality
                case _:
                    continue
            content = content.replace("\x00", "\ufffd")  # Postgres text cannot hold NUL
            messages.append(
                (
                    event.id,
                    event.conversation,
                    event.user,
                    event.turn,
                    role,
                    content,
                    modality,
                    provider,
                    model,
                    event.at,
                    seq,
                )
            )
            _, first, last = conversations.get(event.conversation, (platform, event.at, event.at))
            conversations[event.conversation] = (
                platform,
                min(first, event.at),
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
