"""The history projection: what people said to Libra and what it answered, per conversation.

Only admitted turns are history: a person's message comes from its ``turn.accepted``, never from
``text.received``, so a refused message (blocked, too long, rate-limited) is shown to its sender
and is never read back into a prompt or the history route. Its row keeps the message's own id
and time, so a deployment that folded ``text.received`` before goes on without a duplicate.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from libra.contracts import CONSUMERS, AnyEvent, LlmCompleted, TurnAccepted, id_time
from libra.runtime.projection import Recorded

__all__ = ["HistoryProjection"]

_MESSAGE_COLUMNS = (
    "event_id",
    "conversation",
    "user_id",
    "turn",
    "role",
    "content",
    "modality",
    "provider",
    "model",
    "at",
    "stream_seq",
)
# A batch's messages are new but for a redelivery: they are copied in (binary COPY costs
# Postgres about half of an insert's per-row work), and only when one is there already does the
# batch take the insert that skips what exists, the rows going as one array per column.
_INSERT_MESSAGES = (
    f"INSERT INTO messages ({', '.join(_MESSAGE_COLUMNS)})"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],"
    " $6::text[], $7::text[], $8::text[], $9::text[], $10::timestamptz[], $11::bigint[])"
    " ON CONFLICT (event_id) DO NOTHING"
)
# Each conversation appears once per batch: ON CONFLICT DO UPDATE may touch a row only once.
_UPSERT_CONVERSATIONS = (
    "INSERT INTO conversations (id, platform, started_at, last_at)"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[])"
    " ON CONFLICT (id) DO UPDATE SET"
    " started_at = LEAST(conversations.started_at, EXCLUDED.started_at),"
    " last_at = GREATEST(conversations.last_at, EXCLUDED.last_at)"
)


def _messages(event: AnyEvent) -> list[tuple[str, str, str, str | None, str | None, datetime]]:
    """The messages an event adds: (id, role, content, provider, model, time)."""
    match event:
        case TurnAccepted(modality="text", speculative=False):
            at = event.received_at or id_time(event.turn)
            return [(event.turn, "user", event.text, None, None, at)]
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
    """Folds admitted text turns and ``llm.completed`` into ``conversations`` and ``messages``
    (for a spoken turn, the completion brings the words that were said too)."""

    spec = CONSUMERS["history"]
    tables = ("messages", "conversations")

    async def apply(self, conn: asyncpg.Connection, batch: Sequence[Recorded]) -> None:
        messages: list[tuple] = []
        conversations: dict[str, tuple[str, datetime, datetime]] = {}
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
                        event.modality,
                        provider,
                        model,
                        at,
                        seq,
                    )
                )
            earliest = min(m[5] for m in said)
            known = conversations.get(event.conversation)
            if known is not None:
                earliest, latest = min(known[1], earliest), max(known[2], event.at)
            else:
                latest = event.at
            conversations[event.conversation] = (event.origin.platform, earliest, latest)
        if not messages:
            return
        try:
            async with conn.transaction():  # a savepoint: a failed copy leaves the batch whole
                await conn.copy_records_to_table(
                    "messages", records=messages, columns=_MESSAGE_COLUMNS
                )
        except asyncpg.UniqueViolationError:
            await conn.execute(_INSERT_MESSAGES, *zip(*messages, strict=True))
        rows = [(cid, *row) for cid, row in sorted(conversations.items())]
        await conn.execute(_UPSERT_CONVERSATIONS, *zip(*rows, strict=True))
