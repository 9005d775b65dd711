"""The sessions projection: chat mode per channel, settings, voice sessions.

Last writer wins by event time (then id), so replaying the log in any order gives the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from libra.contracts import CONSUMERS, SessionChat, SessionSettings, SessionVoice
from libra.runtime.projection import Recorded

__all__ = ["SessionsProjection"]

_NEWER = "WHERE ({table}.at, {table}.event_id) < (EXCLUDED.at, EXCLUDED.event_id)"


class SessionsProjection:
    """Folds ``session.*`` events into ``chat_channels``, ``settings`` and ``voice_sessions``."""

    spec = CONSUMERS["sessions"]
    tables = ("chat_channels", "settings", "voice_sessions")

    async def apply(self, conn: asyncpg.Connection, batch: Sequence[Recorded]) -> None:
        for _, event in batch:
            match event:
                case SessionChat():
                    await conn.execute(
                        "INSERT INTO chat_channels (conversation, enabled, changed_by, event_id, at)"
                        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (conversation) DO UPDATE SET"
                        " enabled = EXCLUDED.enabled, changed_by = EXCLUDED.changed_by,"
                        " event_id = EXCLUDED.event_id, at = EXCLUDED.at "
                        + _NEWER.format(table="chat_channels"),
                        event.conversation,
                        event.enabled,
                        event.user,
                        event.id,
                        event.at,
                    )
                case SessionSettings():
                    await conn.execute(
                        "INSERT INTO settings (scope, key, value, changed_by, event_id, at)"
                        " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (scope, key) DO UPDATE SET"
                        " value = EXCLUDED.value, changed_by = EXCLUDED.changed_by,"
                        " event_id = EXCLUDED.event_id, at = EXCLUDED.at "
                        + _NEWER.format(table="settings"),
                        event.scope,
                        event.key,
                        event.value,
                        event.user,
                        event.id,
                        event.at,
                    )
                case SessionVoice():
                    await conn.execute(
                        "INSERT INTO voice_sessions (conversation, state, channel, event_id, at)"
                        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (conversation) DO UPDATE SET"
                        " state = EXCLUDED.state, channel = EXCLUDED.channel,"
                        " event_id = EXCLUDED.event_id, at = EXCLUDED.at "
                        + _NEWER.format(table="voice_sessions"),
                        event.conversation,
                        event.state,
                        event.channel,
                        event.id,
                        event.at,
                    )
