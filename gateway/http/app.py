"""The HTTP API the seed documents, on FastAPI (OpenAPI docs at /docs).

- ``POST /api/chat/completions`` ``{"userId", "message", "stream"}``: the reply, or with
  ``stream`` an SSE stream of ``data: {"content": "...", "done": false}`` ending with ``done: true``
- ``GET /api/chat/history/{userId}``: that user's messages, oldest first (``alice`` is the
  HTTP user ``http:alice``; a service key may name another platform's, ``discord:123``)
- ``GET /api/health``: llm, database, redis and nats
- ``GET /metrics``: Prometheus
- ``POST /api/stt/transcribe`` and ``POST /voice/process``: speech in (:mod:`.voice`)
- ``/ws``: the WebSocket API, voice and text both ways in real time (:mod:`.ws`)
- ``/turns``, ``/turns/{turn}`` and ``/api/turns[/{turn}]``: a turn's events drawn on a time
  line, for operators (:mod:`.turns_view`)
- ``/api/knowledge``: documents Libra answers from (:mod:`.knowledge`)

While a dependency is down the routes answer within seconds (README, "When a dependency is
down"): without NATS, or when a message is neither admitted nor refused within
``decision_s``, a chat answers 503 ``unavailable`` with ``Retry-After``; so does the history
without PostgreSQL. A streamed chat opens its stream once the turn is admitted, so these come
as the same plain 503 (a reply that stalls later ends its stream with an error event).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Annotated

import asyncpg
import msgspec
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from libra.contracts import (
    AnyEvent,
    LlmCompleted,
    LlmDelta,
    LlmFailed,
    ReplyDelivered,
    TextReceived,
    TurnAccepted,
    TurnRejected,
    derive,
)
from libra.runtime.eventlog import EventLog
from libra.runtime.follow import ReplyTimeout
from libra.runtime.outage import Breaker, Unavailable

from ..chat import NoDecision, converse
from .auth import Authenticator, Principal
from .guards import CancelOnDisconnect, ConcurrencyCap, HostCheck
from .inputs import MAX_ID_CHARS, MessageText, UserId, id_problem, validation_problem
from .metrics import BodyLimit, RequestMetrics

if TYPE_CHECKING:
    from libra.processors.knowledge.documents import Limits

    from .voice import VoiceOptions

__all__ = ["ChatRequest", "create_app"]

_REJECTION_STATUS = {"rate_limited": 429, "too_long": 413, "moderated": 422}
_ERROR_NAMES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
}
_encode = msgspec.json.Encoder().encode
_HTTP_MESSAGES = {  # Starlette's own errors, in Libra's words
    400: "the body is not valid JSON in UTF-8 (or, for an upload, multipart form data)",
    404: "there is nothing at this path",
    405: "this route does not take that method",
}
RETRY_AFTER_S = 5  # what a 503 asks the client to wait: about a breaker's retry, and margin


class ChatRequest(BaseModel):
    userId: UserId = Field(min_length=1, max_length=MAX_ID_CHARS)
    message: MessageText
    stream: bool = Field(default=False, description="Stream the reply as server-sent events")


class HistoryMessage(BaseModel):
    role: str
    content: str
    conversation: str
    at: str


class History(BaseModel):
    messages: list[HistoryMessage]


def _caller(request: Request) -> Principal:
    return request.app.state.auth(request)


Caller = Annotated[Principal, Depends(_caller)]


def _error(
    status: int, error: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": error, "message": message}, status_code=status, headers=headers)


def _unavailable(message: str) -> JSONResponse:
    return _error(503, "unavailable", message, {"Retry-After": str(RETRY_AFTER_S)})


def log_down(log: EventLog) -> JSONResponse | None:
    """The 503 for a request that needs the log while NATS is unreachable, else None."""
    if log.nc.is_connected:
        return None
    return _unavailable("Libra's event log is unreachable; try again in a few seconds")


def _rejection(event: TurnRejected) -> JSONResponse:
    headers = None
    if event.retry_after_s is not None:
        headers = {"Retry-After": str(max(1, math.ceil(event.retry_after_s)))}
    body = {"error": event.reason, "message": event.message, "turn": event.turn}
    if event.retry_after_s is not None:
        body["retryAfter"] = event.retry_after_s
    if event.reason == "moderated":
        body["categories"] = list(event.moderation.categories) if event.moderation else []
    return JSONResponse(body, status_code=_REJECTION_STATUS.get(event.reason, 400), headers=headers)


def _sse(payload: dict) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"


async def _delivered(log: EventLog, completed: LlmCompleted) -> None:
    await log.publish(derive(completed, ReplyDelivered, key="delivered", origin=completed.origin))


async def _reply_stream(log: EventLog, events: AsyncIterator[AnyEvent]) -> AsyncIterator[bytes]:
    """The reply as server-sent events; ``restart`` says the content so far is void (the llm
    restarted mid-reply and writes it again from its start)."""
    streamed = False
    try:
        async for event in events:
            match event:
                case LlmDelta(text=text, index=index):
                    restart = streamed and index == 0
                    yield _sse(
                        {"content": text, "done": False} | ({"restart": True} if restart else {})
                    )
                    streamed = True
                case LlmCompleted():
                    yield _sse(
                        {
                            "content": "",
                            "done": True,
                            "model": event.model,
                            "provider": event.provider,
                            "turn": event.turn,
                        }
                    )
                    await _delivered(log, event)
                case LlmFailed():
                    yield _sse(
                        {
                            "content": "",
                            "done": True,
                            "error": event.error,
                            "message": event.message,
                            "turn": event.turn,
                        }
                    )
    except ReplyTimeout as exc:
        yield _sse({"content": "", "done": True, "error": "timeout", "message": str(exc)})
    finally:
        await events.aclose()


def create_app(
    log: EventLog,
    *,
    pool: Callable[[], Awaitable[asyncpg.Pool]],
    redis: aioredis.Redis,
    auth: Authenticator,
    llm_status: Callable[[], str],
    max_body_bytes: int,
    reply_idle_s: float = 90.0,
    decision_s: float = 4.0,
    database: Breaker | None = None,
    voice: VoiceOptions | None = None,
    host: str = "127.0.0.1",
    max_concurrent: int = 0,
    ws_idle_s: float = 300.0,
    knowledge: Limits | None = None,
) -> FastAPI:
    """Returns the API wired to the log and the read models; with ``voice``, speech too.

    ``decision_s`` bounds the wait for a message's admission; ``database`` is the breaker that
    the history's reads go through; ``max_concurrent`` the requests answered at once (0: no
    bound). An open API (``auth`` without secrets) answers only requests for loopback or
    ``host``.
    """
    app = FastAPI(
        title="Libra",
        version="0.1.0",
        description="Libra's HTTP API: chat with the bot by text or voice, read history,"
        " check health.",
    )
    app.state.auth = auth
    _install_error_handlers(app)
    _install_chat(app, log, reply_idle_s, decision_s)
    database = database or Breaker("postgres", timeout_s=2.0)
    _install_reads(app, log, pool=pool, redis=redis, llm_status=llm_status, database=database)
    from .page import install_page
    from .turns_view import install_turns_view  # (it builds on this module's helpers)

    install_page(app)
    install_turns_view(app, log, auth=auth, pool=pool, database=database)
    body_limits: dict[str, int] = {}
    if voice is not None:
        from .voice import install_voice  # (it builds on this module's helpers)

        body_limits = install_voice(app, log, voice, reply_idle_s=reply_idle_s)
    from .ws import WsOptions, install_ws  # (it builds on the voice capture)

    install_ws(
        app,
        log,
        WsOptions(
            auth=auth,
            audio=voice.audio if voice is not None else None,
            segmentation=voice.segmentation if voice is not None else None,
            reply_idle_s=reply_idle_s,
            idle_s=ws_idle_s,
        ),
    )
    if knowledge is not None:
        from .knowledge import install_knowledge  # (it builds on this module's helpers)

        body_limits.update(
            install_knowledge(app, log, auth=auth, pool=pool, database=database, limits=knowledge)
        )
    app.add_middleware(BodyLimit, limit=max_body_bytes, routes=body_limits)
    app.add_middleware(CancelOnDisconnect)
    app.add_middleware(ConcurrencyCap, limit=max_concurrent)
    if auth.open:
        app.add_middleware(HostCheck, host=host)
    app.add_middleware(RequestMetrics)  # (the last added is the outermost)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every error is JSON with ``error`` (a code) and ``message`` (for a person)."""

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [validation_problem(e) for e in exc.errors()]
        details = [{"at": at, "problem": problem} for at, problem in problems]
        message = "; ".join(f"{at} {problem}" for at, problem in problems) or "invalid request"
        return JSONResponse(
            {"error": "invalid_request", "message": message, "details": details}, status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail
        if not isinstance(detail, dict):
            error = _ERROR_NAMES.get(exc.status_code, "http_error")
            message = _HTTP_MESSAGES.get(exc.status_code, "the request cannot be answered")
            detail = {"error": error, "message": message}
        return JSONResponse(detail, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def failed(_request: Request, _exc: Exception) -> JSONResponse:
        # A bug, not the client's doing; the server logs its traceback. JSON all the same.
        message = "Libra failed to answer this request; the failure is in its log"
        return _error(500, "internal", message)


def _install_chat(app: FastAPI, log: EventLog, reply_idle_s: float, decision_s: float) -> None:
    @app.post("/api/chat/completions", summary="Talk to Libra")
    async def chat(body: ChatRequest, principal: Caller) -> Response:
        if not principal.may_act_as(body.userId):
            return _error(403, "forbidden", "this token may only chat as its own user")
        if (down := log_down(log)) is not None:
            return down
        events = converse(
            log,
            platform="http",
            user=body.userId,
            text=body.message,
            idle_s=reply_idle_s,
            decide_s=decision_s,
        )
        try:
            said = await anext(events)
            decision = await anext(events)
        except NoDecision:
            return _unavailable("Libra could not take the message just now; try again shortly")
        assert isinstance(said, TextReceived)
        if isinstance(decision, TurnRejected):
            await events.aclose()
            return _rejection(decision)
        assert isinstance(decision, TurnAccepted)
        if body.stream:  # the stream closes the follower when the reply ends or the client goes
            return StreamingResponse(
                _reply_stream(log, events),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Libra-Turn": said.id},
            )
        async with contextlib.aclosing(events):
            return await _whole_reply(log, events, said.id)


def _install_reads(
    app: FastAPI,
    log: EventLog,
    *,
    pool: Callable[[], Awaitable[asyncpg.Pool]],
    redis: aioredis.Redis,
    llm_status: Callable[[], str],
    database: Breaker,
) -> None:
    @app.get(
        "/api/chat/history/{userId}",
        response_model=History,
        summary="A user's messages, oldest first",
        responses={503: {"description": "the database is unreachable"}},
    )
    async def history(
        userId: str,
        principal: Caller,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> History | JSONResponse:
        if not principal.may_act_as(userId):
            raise HTTPException(
                403, {"error": "forbidden", "message": "this token may only read its own history"}
            )
        if (problem := id_problem(userId)) is not None:  # (PostgreSQL text holds no NUL)
            return _error(400, "invalid_request", f"userId {problem}")

        async def read() -> list[asyncpg.Record]:
            return await (await pool()).fetch(
                "SELECT role, content, conversation, at FROM messages WHERE user_id = $1"
                " ORDER BY at DESC LIMIT $2",
                principal.reads_history_of(userId),
                limit,
            )

        try:
            rows = await database.call(read)
        except Unavailable:
            return _unavailable("the history is unreachable just now; try again shortly")
        return History(
            messages=[
                HistoryMessage(
                    role=r["role"],
                    content=r["content"],
                    conversation=r["conversation"],
                    at=r["at"].isoformat(),
                )
                for r in reversed(rows)
            ]
        )

    @app.get("/api/health", summary="Is every part of Libra reachable?")
    async def health() -> JSONResponse:
        services = {
            "llm": llm_status(),
            "database": await _check(_database(pool)),
            "redis": await _check(redis.ping()),
            "nats": "ok" if log.nc.is_connected else "down",
        }
        # "unconfigured" (no language model set up) is a setup to finish, not a failure of a
        # running stack: only a dependency that is down fails the check.
        healthy = "down" not in services.values()
        return JSONResponse(
            {"status": "healthy" if healthy else "degraded", "services": services},
            status_code=200 if healthy else 503,
        )

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def _whole_reply(log: EventLog, events: AsyncIterator[AnyEvent], turn: str) -> JSONResponse:
    try:
        async for event in events:
            if isinstance(event, LlmCompleted):
                await _delivered(log, event)
                return JSONResponse(
                    {
                        "content": event.text,
                        "done": True,
                        "turn": turn,
                        "model": event.model,
                        "provider": event.provider,
                        "cached": event.cached,
                        "usage": {
                            "promptTokens": event.prompt_tokens,
                            "completionTokens": event.completion_tokens,
                        },
                    }
                )
            if isinstance(event, LlmFailed):
                return _error(502, event.error, event.message)
    except ReplyTimeout as exc:
        return _error(504, "timeout", str(exc))
    return _error(502, "no_reply", "the reply ended without an answer")


async def _database(pool: Callable[[], Awaitable[asyncpg.Pool]]) -> None:
    await (await pool()).fetchval("SELECT 1")


async def _check(probe: Awaitable[object]) -> str:
    try:
        await asyncio.wait_for(probe, 2.0)
    except Exception:
        return "down"
    return "ok"
