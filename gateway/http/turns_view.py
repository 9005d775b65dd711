"""Operators' view of turns: one turn's events on a time line with its stage timings, and the
recent turns; the JSON under ``/api/turns``, drawn by the pages ``/turns`` and ``/turns/{turn}``.

- ``GET /api/turns/{turn}``: the turn (an id, or a piece that ``libra trace`` accepts) as
  ``{"turn", "started", "outcome", "platform", "user", "conversation", "modality", "events",
  "stages", "attempts", "prompt"}``; its events are read from the log as ``libra trace`` reads
  them, and its stages are measured on the row the turns projection folds of them, so that the
  numbers agree with the ``turns`` table (and Grafana's panels over it)
- ``GET /api/turns?limit=50``: ``{"turns": [{"turn", "at", "platform", "user", "outcome",
  "modality", "total_ms"}]}``, newest first, from the ``turns`` table

Only a service key reads them (a person's token gets 403). The pages hold no data and are
served to anyone; their script sends the key that the page was given (``?key=``, then kept in
the browser's localStorage) as ``X-API-Key``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import asyncpg
from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from libra.contracts import (
    AnyEvent,
    LlmCompleted,
    LlmDelta,
    LlmFailed,
    TurnAccepted,
    id_time,
    is_id,
)
from libra.ops.tail import summary
from libra.ops.trace import TraceError, collect_turn

# The projection's own column mapping and status order: the same fold, so the same numbers.
from libra.projections.turns import COLUMNS, STAGE_RANK
from libra.runtime.eventlog import EventLog
from libra.runtime.outage import Breaker, Unavailable

from .app import _error, _unavailable, log_down
from .auth import Authenticator
from .page import serve_file

__all__ = ["install_turns_view", "turn_report"]

COLLECT_TIMEOUT_S = 30.0  # reading a turn scans minutes of the log; a stuck read must end


def _tag(event: AnyEvent) -> str:
    return type(event).__struct_config__.tag


def _ms(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds() * 1000, 1)


def _row(events: list[AnyEvent]) -> dict[str, Any]:
    """The turn's row as the turns projection folds it: each column keeps its first value,
    the status only moves forward."""
    row: dict[str, Any] = {}
    for event in events:
        make = COLUMNS.get(type(event))
        for column, value in (make(event) if make else {}).items():
            if column == "status":
                if STAGE_RANK[value] > STAGE_RANK.get(row.get("status", ""), -1):
                    row["status"] = value
            elif row.get(column) is None:
                row[column] = value
    return row


def _stages(row: dict[str, Any], events: list[AnyEvent]) -> dict[str, float | None]:
    """Milliseconds between the turn's stages, None where a stage is not (yet) in the log."""
    received, speech_end = row.get("received_at"), row.get("speech_ended_at")
    heard, decided = row.get("transcribed_at"), row.get("accepted_at")
    # The turn.accepted the llm answered: a speculative one is answered before it is confirmed.
    answered = next((e.at for e in events if isinstance(e, TurnAccepted)), None)
    # The completed reply's own first delta, else (still streaming) the first one in the log.
    first_delta = row.get("first_delta_at") or next(
        (e.at for e in events if isinstance(e, LlmDelta)), None
    )
    end = row.get("delivered_at") or row.get("completed_at") or decided
    return {
        "capture": _ms(speech_end, received),
        "asr": _ms(received, heard),
        "admission": _ms(heard or received, decided),
        "first_token": _ms(answered, first_delta),
        "first_audio": _ms(speech_end or answered, row.get("first_audio_at")),
        "delivered": _ms(received, row.get("delivered_at")),
        "total": _ms(received, end),  # as the list's total_ms (_RECENT), from the table
    }


def _attempts(events: list[AnyEvent]) -> list[dict[str, Any]]:
    """The providers tried for the reply, in order: those that failed, then the one that
    answered (a failed turn has only the first)."""
    tried: list[dict[str, Any]] = []
    for event in events:
        if not isinstance(event, LlmCompleted | LlmFailed):
            continue
        tried += [
            {
                "provider": a.provider,
                "model": a.model,
                "ok": False,
                "error": a.error,
                "message": a.message,
                "ms": round(a.latency_ms, 1),
                "ttft_ms": None,
                "cached": False,
                "finish_reason": None,
            }
            for a in event.attempts
        ]
        if isinstance(event, LlmCompleted):
            tried.append(
                {
                    "provider": event.provider,
                    "model": event.model,
                    "ok": True,
                    "error": None,
                    "message": None,
                    "ms": round(event.total_ms, 1),
                    "ttft_ms": round(event.ttft_ms, 1),
                    "cached": event.cached,
                    "finish_reason": event.finish_reason or None,
                }
            )
    return tried


def _prompt(events: list[AnyEvent]) -> dict[str, int | None]:
    """What the log records of the prompt: the provider's token counts (None where it reported
    none) and what the person sent with the turn."""
    accepted = next((e for e in events if isinstance(e, TurnAccepted)), None)
    completed = next((e for e in events if isinstance(e, LlmCompleted)), None)
    return {
        "tokens": (completed.prompt_tokens or None) if completed else None,
        "completion_tokens": (completed.completion_tokens or None) if completed else None,
        "input_characters": len(accepted.text) if accepted else None,
        "context_messages": len(accepted.context) if accepted else None,
        "attachments": len(accepted.attachments) if accepted else None,
    }


def turn_report(events: list[AnyEvent]) -> dict[str, Any]:
    """The JSON of one turn from its events in time order (what :func:`collect_turn` returns)."""
    start = events[0].at
    row = _row(events)
    return {
        "turn": events[0].turn or events[0].id,
        "started": start.isoformat(),
        "outcome": row.get("status"),
        "platform": row.get("platform"),
        "user": events[0].user,
        "conversation": events[0].conversation,
        "modality": row.get("modality"),
        "events": [
            {
                "id": e.id,
                "type": _tag(e),
                "at": e.at.isoformat(),
                "ms": _ms(start, e.at),
                "causation": e.causation,
                "summary": summary(e, 80),
            }
            for e in events
        ],
        "stages": _stages(row, events),
        "attempts": _attempts(events),
        "prompt": _prompt(events),
    }


def _may_exist(given: str) -> bool:
    """False for a whole id whose time is not a time a turn can have begun at (far ahead, or
    past what a date holds); a piece of an id is for :func:`resolve_turn` to judge."""
    piece = given.strip().upper()
    if not is_id(piece):
        return True
    try:
        return id_time(piece) < datetime.now(UTC) + timedelta(days=1)
    except (ValueError, OverflowError):
        return False


_RECENT = (
    "SELECT turn, received_at, platform, user_id, status, modality,"
    " (extract(epoch FROM COALESCE(delivered_at, completed_at, accepted_at) - received_at)"
    " * 1000)::float8 AS total_ms"
    " FROM turns WHERE received_at IS NOT NULL ORDER BY received_at DESC LIMIT $1"
)


def install_turns_view(
    app: FastAPI,
    log: EventLog,
    *,
    auth: Authenticator,
    pool: Callable[[], Awaitable[asyncpg.Pool]],
    database: Breaker | None = None,
) -> None:
    """Adds the turn routes and pages to ``app``; ``database`` is the breaker the list's reads
    go through (the history's, so that both see one outage)."""

    def refused(request: Request) -> JSONResponse | None:
        if auth(request).user is None:
            return None
        return _error(403, "forbidden", "turns are for operators: send the service key")

    _install_turn(app, log, refused)
    _install_recent(app, refused, pool, database or Breaker("postgres", timeout_s=2.0))
    _install_pages(app)


Refusal = Callable[[Request], JSONResponse | None]


def _install_turn(app: FastAPI, log: EventLog, refused: Refusal) -> None:
    @app.get("/api/turns/{turn}", summary="One turn's events and stage timings (service key)")
    async def one_turn(turn: str, request: Request) -> JSONResponse:
        if (answer := refused(request)) is not None or (answer := log_down(log)) is not None:
            return answer
        if not _may_exist(turn):
            return _error(404, "not_found", f"{turn!r} is no turn of this log")
        try:
            async with asyncio.timeout(COLLECT_TIMEOUT_S):
                events = await collect_turn(log, turn)
        except TraceError as exc:
            return _error(404, "not_found", str(exc))
        except TimeoutError:
            return _error(504, "timeout", "reading the turn from the log took too long")
        return JSONResponse(turn_report(events))


def _recent_json(r: asyncpg.Record) -> dict[str, Any]:
    total = r["total_ms"]
    return {
        "turn": r["turn"],
        "at": r["received_at"].isoformat(),
        "platform": r["platform"],
        "user": r["user_id"],
        "outcome": r["status"],
        "modality": r["modality"],
        "total_ms": None if total is None else round(total, 1),
    }


def _install_recent(
    app: FastAPI,
    refused: Refusal,
    pool: Callable[[], Awaitable[asyncpg.Pool]],
    database: Breaker,
) -> None:
    @app.get(
        "/api/turns",
        summary="The most recent turns, newest first (service key)",
        responses={503: {"description": "the database is unreachable"}},
    )
    async def recent(
        request: Request, limit: Annotated[int, Query(ge=1, le=500)] = 50
    ) -> JSONResponse:
        if (answer := refused(request)) is not None:
            return answer

        async def read() -> list[asyncpg.Record]:
            return await (await pool()).fetch(_RECENT, limit)

        try:
            rows = await database.call(read)
        except Unavailable:
            return _unavailable("the turns are unreachable just now; try again shortly")
        return JSONResponse({"turns": [_recent_json(r) for r in rows]})


def _install_pages(app: FastAPI) -> None:
    """The pages; their script and style are the page's files, under ``/static``."""

    async def turns() -> FileResponse:
        return serve_file("turns.html")

    async def turn(turn: str) -> FileResponse:  # (the page reads its turn from its address)
        return serve_file("turn.html")

    app.add_api_route("/turns", turns, include_in_schema=False)
    app.add_api_route("/turns/{turn}", turn, include_in_schema=False)
