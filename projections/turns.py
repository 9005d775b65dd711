"""The turns projection: one row per turn with the time of each stage (what Grafana charts).

Each event fills in the columns it knows; the row is whole once the turn is over. Columns keep
the first value they got (so a redelivered event changes nothing), but for the status, which
only moves forward: received, speculative (answered before its end was certain), accepted or
rejected or abandoned, completed or failed, delivered. A speculative turn's ``accepted_at`` is
its confirmation; one that was abandoned keeps no more than its row with that status.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from libra.contracts import (
    CONSUMERS,
    AsrTranscribed,
    LlmCompleted,
    LlmFailed,
    ReplyDelivered,
    TextReceived,
    TtsSynthesized,
    TurnAbandoned,
    TurnAccepted,
    TurnConfirmed,
    TurnRejected,
    VoiceCaptured,
)
from libra.runtime.projection import Recorded

__all__ = ["COLUMNS", "STAGE_RANK", "TurnsProjection"]

STAGE_RANK = {
    "received": 0,
    "speculative": 1,
    "accepted": 2,
    "rejected": 2,
    "abandoned": 2,
    "completed": 3,
    "failed": 3,
    "delivered": 4,
}
_RANK = "CASE {} " + " ".join(f"WHEN '{s}' THEN {r}" for s, r in STAGE_RANK.items()) + " ELSE 0 END"


def _origin(event: Any) -> dict[str, Any]:
    return {"platform": event.origin.platform, "guild": event.origin.guild}


def _moderation(event: TurnAccepted | TurnRejected) -> dict[str, Any]:
    """The classifier's decision on the turn's input, when one was asked."""
    m = event.moderation
    if m is None:
        return {}
    return {
        "moderation_engine": m.engine,
        "moderation_categories": list(m.categories),
        "moderation_ms": m.latency_ms,
    }


# What each event knows of its turn's row.
COLUMNS: dict[type, Callable[[Any], dict[str, Any]]] = {
    TextReceived: lambda e: {
        **_origin(e),
        "modality": "text",
        "received_at": e.at,
        "status": "received",
    },
    # A capture to transcribe only (reply False) is not a turn: no row.
    VoiceCaptured: lambda e: (
        {
            **_origin(e),
            "modality": "voice",
            "received_at": e.at,
            "speech_ended_at": e.speech_ended_at,
            "status": "received",
        }
        if e.reply
        else {}
    ),
    AsrTranscribed: lambda e: (
        {"transcribed_at": e.at, "asr_ms": e.latency_ms, "asr_engine": e.engine} if e.reply else {}
    ),
    TurnAccepted: lambda e: {
        **_origin(e),
        **({} if e.speculative else {"accepted_at": e.at}),
        "language": e.language,
        "modality": e.modality,
        **_moderation(e),
        "status": "speculative" if e.speculative else "accepted",
    },
    TurnConfirmed: lambda e: {"accepted_at": e.at, "status": "accepted"},
    TurnAbandoned: lambda e: {"status": "abandoned"},
    TurnRejected: lambda e: {
        **_origin(e),
        "accepted_at": e.at,
        "reject_reason": e.reason,
        **_moderation(e),
        "status": "rejected",
    },
    LlmCompleted: lambda e: {
        "completed_at": e.at,
        "first_delta_at": e.first_delta_at,
        "provider": e.provider,
        "model": e.model,
        "prompt_tokens": e.prompt_tokens,
        "completion_tokens": e.completion_tokens,
        "ttft_ms": e.ttft_ms,
        "llm_ms": e.total_ms,
        "cached": e.cached,
        "status": "completed",
    },
    LlmFailed: lambda e: {"completed_at": e.at, "error": e.error, "status": "failed"},
    TtsSynthesized: lambda e: (
        {
            "first_audio_at": e.at,
            "tts_engine": e.engine,
            "tts_ttfb_ms": e.ttfb_ms,
        }
        if e.index == 0
        else {}
    ),
    ReplyDelivered: lambda e: {
        "delivered_at": e.at,
        "interrupted": e.interrupted,
        "status": "delivered",
    },
}


def _upsert(columns: tuple[str, ...]) -> str:
    names = ("turn", "conversation", "user_id", *columns)
    values = ", ".join(f"${i}" for i in range(1, len(names) + 1))
    updates = []
    for column in columns:
        if column == "status":
            newer = f"{_RANK.format('EXCLUDED.status')} > {_RANK.format('turns.status')}"
            updates.append(f"status = CASE WHEN {newer} THEN EXCLUDED.status ELSE turns.status END")
        elif column == "interrupted":
            updates.append("interrupted = turns.interrupted OR EXCLUDED.interrupted")
        else:
            updates.append(f"{column} = COALESCE(turns.{column}, EXCLUDED.{column})")
    return (
        f"INSERT INTO turns ({', '.join(names)}) VALUES ({values})"
        f" ON CONFLICT (turn) DO UPDATE SET {', '.join(updates)}"
    )


class TurnsProjection:
    """Folds every stage of a turn into its row of ``turns``."""

    spec = CONSUMERS["turns-projection"]
    tables = ("turns",)

    async def apply(self, conn: asyncpg.Connection, batch: Sequence[Recorded]) -> None:
        statements: dict[tuple[str, ...], list[tuple]] = {}
        for _, event in batch:
            make = COLUMNS.get(type(event))
            columns = make(event) if make else None
            if not columns:
                continue
            key = tuple(columns)
            statements.setdefault(key, []).append(
                (event.turn or event.id, event.conversation, event.user, *columns.values())
            )
        for key, rows in statements.items():
            await conn.executemany(_upsert(key), rows)
