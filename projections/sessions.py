"""The sessions projection: chat mode per channel, settings, voice sessions.

Last writer wins by event time (then id), so replaying the log in any order gives the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from libra.contracts import CONSUMERS, AnyEvent, SessionChat, SessionSettings, SessionVoice
from libra.runtime.projection import Recorded

__all__ = ["SessionsProjection"]


def _row(event: AnyEvent) -> tuple[str, tuple[str, ...], dict[str, object]] | None:
    common = {"event_id": event.id, "at": event.at}
    match event:
        case SessionChat():
            return (
                "chat_channels",
                ("conversation",),
                {
                    "conversation": event.conversation,
                    "enabled": event.enabled,
                    "changed_by": event.user,
                    **common,
                },
            )
        case SessionSettings():
            return (
                "settings",
                ("scope", "key"),
                {
                    "scope": event.scope,
                    "key": event.key,
                    "value": event.value,
                    "changed_by": event.user,
                    **common,
                },
            )
        case SessionVoice():
            return (
                "voice_sessions",
                ("conversation",),
                {
                    "conversation": event.conversation,
                    "state": event.state,
                    "channel": event.channel,
                    **common,
                },
            )
    return None


def _upsert(table: str, keys: tuple[str, ...], columns: list[str]) -> str:
    values = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c not in keys)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({values})"
        f" ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}"
        f" WHERE ({table}.at, {table}.event_id) < (EXCLUDED.at, EXCLUDED.event_id)"
    )


class SessionsProjection:
    """Folds ``session.*`` events into ``chat_channels``, ``settings`` and ``voice_sessions``."""

    spec = CONSUMERS["sessions"]
    tables = ("chat_channels", "settings", "voice_sessions")

    async def apply(self, conn: asyncpg.Connection, batch: Sequence[Recorded]) -> None:
        for _, event in batch:
            found = _row(event)
            if found is not None:
                table, keys, row = found
                await conn.execute(_upsert(table, keys, list(row)), *row.values())
