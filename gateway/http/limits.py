"""How much speech the HTTP API sends to be transcribed: a window per person, a bound in flight.

Every request to a speech route pays a speech-to-text engine, before admission's turn limit
could refuse anything, so the routes have their own limits:

- ``STT_RATE_LIMIT`` requests per person in any ``STT_RATE_LIMIT_WINDOW_SEC``: the chat's
  sliding window in Redis (one script, shared by every HTTP process), kept under its own keys;
  while Redis is down it is counted in this process, as admission does (a person may then get
  up to the limit once per process).
- ``STT_MAX_CONCURRENT`` transcriptions in flight in this process, past which a request is
  answered 503 at once rather than queued. It is a per-process bound on purpose: a slot is held
  for the life of a request, which a shared counter could not release for a process that died;
  the asr processor's own concurrency bounds the engines across the cluster.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse

from libra.contracts import new_id
from libra.runtime.outage import Breaker, Unavailable

if TYPE_CHECKING:
    from libra.processors.turns.ratelimit import Decision, LocalRateLimiter, RateLimiter

__all__ = ["SpeechLimits", "SpeechRefused"]

BUSY_RETRY_S = 2  # what a 503 asks the client to wait: about one short clip's transcription


class SpeechRefused(Exception):
    """A speech request over a limit; becomes a 429 or 503 JSON error with ``Retry-After``."""

    def __init__(self, status: int, error: str, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message
        self.retry_after_s = retry_after_s

    def response(self) -> JSONResponse:
        wait = max(1, math.ceil(self.retry_after_s))
        return JSONResponse(
            {"error": self.error, "message": self.message, "retryAfter": self.retry_after_s},
            status_code=self.status,
            headers={"Retry-After": str(wait)},
        )


class SpeechLimits:
    """The speech routes' limits: ``limiter`` (per person, Redis behind ``breaker``, ``local``
    while it is down) and ``concurrent`` transcriptions in flight here (0: no bound)."""

    def __init__(
        self,
        limiter: RateLimiter,
        local: LocalRateLimiter,
        *,
        breaker: Breaker,
        concurrent: int,
    ) -> None:
        self.limiter, self.local, self.breaker = limiter, local, breaker
        self.concurrent = concurrent
        self.in_flight = 0

    @contextlib.asynccontextmanager
    async def transcribing(self, user: str) -> AsyncIterator[None]:
        """Holds a transcription slot for ``user``; raises :class:`SpeechRefused` past a limit."""
        if self.concurrent and self.in_flight >= self.concurrent:
            raise SpeechRefused(
                503,
                "busy",
                "Libra is transcribing as much speech as it can just now; try again shortly",
                BUSY_RETRY_S,
            )
        decision = await self._decide(f"stt:{user}")  # its own keys, apart from the turn limit
        if not decision.admitted:
            wait = decision.retry_after_s
            raise SpeechRefused(
                429,
                "rate_limited",
                f"too much speech to transcribe; try again in {max(1, math.ceil(wait))} s",
                wait,
            )
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def _decide(self, key: str) -> Decision:
        request, at_ms = new_id(), int(time.time() * 1000)
        try:
            decision = await self.breaker.call(lambda: self.limiter.admit(key, request, at_ms))
        except Unavailable:
            return self.local.admit(key, request, at_ms)
        if decision.admitted:
            self.local.note(key, request, at_ms)
        return decision
