"""Admission: each person's input becomes an accepted or a rejected turn.

Text is admitted when it arrives; a transcript when it arrives, unless it is speculative (cut
at the first short pause). A speculative transcript waits until ``voice.ended`` confirms the end
of the turn; transcript and confirmation meet in Redis, whichever comes second admitting the
turn, and after a ``voice.resumed`` (the person went on talking) it never will be.

With ``speculate``, a speculative transcript that passes the input checks is answered at once,
before the end of the turn is known: ``turn.accepted`` with ``speculative`` set, which the llm
starts writing and the tts starts speaking into a buffer. ``voice.ended`` then makes it
``turn.confirmed``, or ``turn.rejected`` when the rate limit refuses it (the limit counts a turn
only now, so a speculation that never became a turn costs the person nothing);
``voice.resumed`` makes it ``turn.abandoned``. In whatever order the three come, one Lua script
decides each turn's course once, for every instance of the processor (:mod:`.join`).

While Redis is down (a call failed within ``OUTAGE_RETRY_SEC``, or takes over
``REDIS_TIMEOUT_SEC``), admission goes on without it rather than leave people waiting: the rate
limit is counted in this process (:class:`.ratelimit.LocalRateLimiter`), a voice turn's parts
meet here, and the decision says so (``degraded``: ``redis``), for replay to see.

The input checks (empty, not valid UTF-8, too long with the attached files' text, a blocked
word) are :class:`.checks.InputChecks`, which the llm's prefetch runs too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

import msgspec
import redis.asyncio as aioredis

from libra.contracts import (
    CONSUMERS,
    AnyEvent,
    AsrTranscribed,
    Attachment,
    ContextMessage,
    Event,
    Origin,
    TextReceived,
    TurnAbandoned,
    TurnAccepted,
    TurnConfirmed,
    TurnRejected,
    VoiceEnded,
    VoiceResumed,
    derive,
)
from libra.runtime.outage import Breaker, Unavailable

from .checks import InputChecks
from .join import Join
from .language import detect_language
from .messages import refusal
from .ratelimit import Decision, LocalRateLimiter, RateLimiter

__all__ = ["TurnsProcessor"]


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


class TurnsProcessor:
    """Admits text and transcripts: input checks, per-user rate limit, language."""

    spec = CONSUMERS["turns"]

    def __init__(
        self,
        redis: aioredis.Redis,
        limiter: RateLimiter,
        *,
        max_chars: int = 4000,
        blocked_words: frozenset[str] = frozenset(),
        speculate: bool = False,
        breaker: Breaker | None = None,
    ) -> None:
        self.limiter = limiter
        self.local = LocalRateLimiter(limit=limiter.limit, window_s=limiter.window_ms / 1000)
        self.checks = InputChecks(max_chars=max_chars, blocked_words=blocked_words)
        self.speculate = speculate
        self.breaker = breaker or Breaker("redis")
        self._join = Join(redis, self.breaker)

    async def handle(self, event: AnyEvent) -> AsyncIterator[Event]:
        match event:
            case AsrTranscribed(reply=False):
                return  # transcribed for the speech-to-text API only: not a turn
            case TextReceived():
                yield await self._admit(
                    event,
                    event.text,
                    event.origin,
                    modality="text",
                    language=detect_language(event.text),
                    attachments=event.attachments,
                )
            case AsrTranscribed(speculative=False) if event.text.strip():
                yield await self._admit(
                    event,
                    event.text,
                    event.origin,
                    modality="voice",
                    language=event.language or detect_language(event.text),
                )
            case AsrTranscribed(speculative=True) if event.text.strip():
                early = self.speculate and self.checks.refusal(event.text) is None
                if (out := await self._meet(event, "transcript", early)) is not None:
                    yield out
            case VoiceEnded():
                if (out := await self._meet(event, "ended")) is not None:
                    yield out
            case VoiceResumed():
                if (out := await self._meet(event, "resumed")) is not None:
                    yield out

    async def _meet(self, event: AnyEvent, field: str, early: bool = False) -> Event | None:
        """Notes one part of a speculative voice turn; returns what the parts so far decide."""
        value = msgspec.json.encode(event) if field == "transcript" else event.id.encode()
        met = await self._join.meet(event.turn, field, value, early)
        if met is None:
            return None
        transcript = msgspec.json.decode(met.transcript, type=AsrTranscribed)
        language = transcript.language or detect_language(transcript.text)
        match met.action:
            case "start":
                return self._accepted(
                    transcript, "voice", language, speculative=True, degraded=met.degraded
                )
            case "admit":
                return await self._admit(
                    transcript,
                    transcript.text,
                    transcript.origin,
                    modality="voice",
                    language=language,
                )
            case "confirm":
                return await self._confirm(event, transcript, language)
        return derive(event, TurnAbandoned, key="turn", origin=transcript.origin)

    async def _confirm(self, ended: AnyEvent, transcript: AsrTranscribed, language: str) -> Event:
        """The end of a turn answered early: only the rate limit is left to decide."""
        decision, degraded = await self._limit(transcript.user, transcript.turn, transcript.at)
        if not decision.admitted:
            return self._rejected(
                ended,
                "rate_limited",
                language,
                "voice",
                transcript.origin,
                retry_after_s=decision.retry_after_s,
                degraded=degraded,
            )
        return derive(
            ended,
            TurnConfirmed,
            key="turn",
            received_at=transcript.at,
            origin=transcript.origin,
            degraded=degraded,
        )

    async def _limit(self, user: str, turn: str, at: datetime) -> tuple[Decision, tuple[str, ...]]:
        """The rate limit's decision, by Redis or, while it is down, by this process."""
        at_ms = _ms(at)
        try:
            decision = await self.breaker.call(lambda: self.limiter.admit(user, turn, at_ms))
        except Unavailable:
            return self.local.admit(user, turn, at_ms), ("redis",)
        if decision.admitted:
            self.local.note(user, turn, at_ms)
        return decision, ()

    async def _admit(
        self,
        event: TextReceived | AsrTranscribed,
        text: str,
        origin: Origin,
        *,
        modality: str,
        language: str,
        attachments: tuple[Attachment, ...] = (),
    ) -> Event:
        refused = self.checks.refusal(text, attachments)
        if refused is not None:
            reason, detail = refused
            return self._rejected(event, reason, language, modality, origin, **detail)
        decision, degraded = await self._limit(event.user, event.turn or event.id, event.at)
        if not decision.admitted:
            return self._rejected(
                event,
                "rate_limited",
                language,
                modality,
                origin,
                retry_after_s=decision.retry_after_s,
                degraded=degraded,
            )
        return self._accepted(
            event, modality, language, text=text, origin=origin, degraded=degraded
        )

    def _accepted(
        self,
        event: TextReceived | AsrTranscribed,
        modality: str,
        language: str,
        *,
        text: str | None = None,
        origin: Origin | None = None,
        speculative: bool = False,
        degraded: tuple[str, ...] = (),
    ) -> TurnAccepted:
        return derive(
            event,
            TurnAccepted,
            key="turn",
            text=(event.text if text is None else text).strip(),
            language=language,
            modality=modality,
            origin=origin or event.origin,
            received_at=event.at,
            attachments=getattr(event, "attachments", ()),
            context=self._quotable(getattr(event, "context", ())),
            speculative=speculative,
            degraded=degraded,
        )

    def _quotable(self, context: tuple[ContextMessage, ...]) -> tuple[ContextMessage, ...]:
        """The quoted messages (a reply chain) a prompt may show: a person's message that the
        input checks refuse (a blocked word, too long) stays out, as it would have as a turn."""
        return tuple(
            m for m in context if m.role == "assistant" or self.checks.refusal(m.text) is None
        )

    @staticmethod
    def _rejected(
        event: AnyEvent,
        reason: str,
        language: str,
        modality: str,
        origin: Origin,
        *,
        degraded: tuple[str, ...] = (),
        **detail: float,
    ) -> TurnRejected:
        return derive(
            event,
            TurnRejected,
            key="turn",
            reason=reason,
            language=language,
            modality=modality,
            origin=origin,
            retry_after_s=detail.get("retry_after_s"),
            message=refusal(reason, language, **detail),
            degraded=degraded,
        )
