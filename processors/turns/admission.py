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

The rate limit is counted in this process too, from every decision any instance made
(``heard``): a person far below the limit is admitted from that count alone, without a call to
Redis on the turn's clock (``in_redis``: False on the decision, and the rate-limit view writes
it to Redis). Nearer the limit, or while the count may be short (just started, just
reconnected), Redis's script decides, told the turns this process counted that Redis may not
hold yet.

While Redis is down (a call failed within ``OUTAGE_RETRY_SEC``, or takes over
``REDIS_TIMEOUT_SEC``), admission goes on without it rather than leave people waiting: the rate
limit is counted in this process (:class:`.ratelimit.LocalRateLimiter`), a voice turn's parts
meet here, and the decision says so (``degraded``: ``redis``), for replay to see.

The input checks (empty, not valid UTF-8, too long with the attached files' text, a blocked
word) are :class:`.checks.InputChecks`, which the llm's prefetch runs too.

Moderation (``moderator``: the classifier chain) comes after the input checks and after the rate
limit: a flood of flagged input is cut off by the limit like any other, and costs no classifier
call past it (a flagged turn counts toward the limit). A Discord server's own policy
(``/moderation``: the categories it refuses, its thresholds) turns the classifier's answer into
the decision, which names the policy it applied. The decision, flagged or not, is recorded
on the turn's ``turn.accepted`` or ``turn.rejected`` (``moderated``). The llm's prefetch reads
the prompt context meanwhile, so the classifier's time overlaps it. A speculative transcript is
moderated once, when it arrives (while the silence is being confirmed), and its verdict travels
with it to whichever part admits or starts the turn.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import NamedTuple

import msgspec
import redis.asyncio as aioredis

from libra.contracts import (
    CONSUMERS,
    AnyEvent,
    AsrTranscribed,
    Attachment,
    ContextMessage,
    Event,
    Moderation,
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
from libra.processors.moderation.base import ModerationEngine
from libra.processors.moderation.policy import DEFAULT_POLICY, ServerPolicies
from libra.runtime.outage import Breaker, Unavailable

from .checks import InputChecks
from .heard import HeardDecisions
from .join import Join
from .language import detect_language
from .messages import refusal
from .ratelimit import Decision, LocalRateLimiter, RateLimiter

__all__ = ["TurnsProcessor"]


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


class _Limited(NamedTuple):
    """The rate limit's decision, with what was down and whether Redis counted the turn."""

    decision: Decision
    degraded: tuple[str, ...] = ()
    in_redis: bool = True


# MODERATION_BLOCKLIST's refusal, in the classifiers' terms.
_BLOCKED = Moderation(engine="words", flagged=True, categories=("blocked_word",))


class _Heard(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A speculative transcript as its turn's parts keep it: with its moderation, asked once."""

    transcript: AsrTranscribed
    moderation: Moderation | None = None


class TurnsProcessor:
    """Admits text and transcripts: input checks, per-user rate limit, moderation, language."""

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
        moderator: ModerationEngine | None = None,
        policies: ServerPolicies | None = None,
        heard: HeardDecisions | None = None,
    ) -> None:
        self.limiter = limiter
        self.heard = heard  # every instance's decisions, counted in ``heard.turns``
        self.local = (
            heard.turns
            if heard is not None
            else LocalRateLimiter(limit=limiter.limit, window_s=limiter.window_ms / 1000)
        )
        self.checks = InputChecks(max_chars=max_chars, blocked_words=blocked_words)
        self.speculate = speculate
        self.moderator = moderator
        self.policies = policies  # each Discord server's own (``/moderation``); else the default
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
                if (out := await self._heard(event)) is not None:
                    yield out
            case VoiceEnded():
                if (out := await self._meet(event, "ended")) is not None:
                    yield out
            case VoiceResumed():
                if (out := await self._meet(event, "resumed")) is not None:
                    yield out

    async def _heard(self, event: AsrTranscribed) -> Event | None:
        """A speculative transcript: moderated now, answered early when all lets it through."""
        passes = self.checks.refusal(event.text) is None
        moderation = await self._moderate(event.text, event.origin) if passes else None
        early = self.speculate and passes and not (moderation and moderation.flagged)
        heard = msgspec.json.encode(_Heard(transcript=event, moderation=moderation))
        return await self._meet(event, "transcript", early, heard)

    async def _meet(
        self, event: AnyEvent, field: str, early: bool = False, value: bytes | None = None
    ) -> Event | None:
        """Notes one part of a speculative voice turn; returns what the parts so far decide."""
        met = await self._join.meet(event.turn, field, value or event.id.encode(), early)
        if met is None:
            return None
        heard = msgspec.json.decode(met.transcript, type=_Heard)
        transcript = heard.transcript
        language = transcript.language or detect_language(transcript.text)
        match met.action:
            case "start":
                return self._accepted(
                    transcript,
                    "voice",
                    language,
                    speculative=True,
                    degraded=met.degraded,
                    moderation=heard.moderation,
                )
            case "admit":
                return await self._admit(
                    transcript,
                    transcript.text,
                    transcript.origin,
                    modality="voice",
                    language=language,
                    moderation=heard.moderation,
                )
            case "confirm":
                return await self._confirm(event, transcript, language)
        return derive(event, TurnAbandoned, key="turn", origin=transcript.origin)

    async def _confirm(self, ended: AnyEvent, transcript: AsrTranscribed, language: str) -> Event:
        """The end of a turn answered early: only the rate limit is left to decide."""
        limited = await self._limit(transcript.user, transcript.turn, transcript.at)
        if not limited.decision.admitted:
            return self._rejected(
                ended,
                "rate_limited",
                language,
                "voice",
                transcript.origin,
                retry_after_s=limited.decision.retry_after_s,
                degraded=limited.degraded,
            )
        return derive(
            ended,
            TurnConfirmed,
            key="turn",
            received_at=transcript.at,
            origin=transcript.origin,
            degraded=limited.degraded,
            in_redis=limited.in_redis,
        )

    async def _limit(self, user: str, turn: str, at: datetime) -> _Limited:
        """The rate limit's decision: by this process for a person far below the limit (with
        every instance's decisions heard), else by Redis, or by this process while it is down."""
        at_ms = _ms(at)
        local = self.local
        recent = local.recent(user, at_ms)
        if (
            self.heard is not None
            and len(recent) < self.limiter.limit // 2
            and self.heard.whole(at_ms)
        ):
            return _Limited(local.admit(user, turn, at_ms), in_redis=False)
        known = [(t, ms) for t, ms in recent if t != turn]
        try:
            decision = await self.breaker.call(lambda: self.limiter.admit(user, turn, at_ms, known))
        except Unavailable:
            return _Limited(local.admit(user, turn, at_ms), ("redis",), in_redis=False)
        if decision.admitted:
            local.note(user, turn, at_ms)
        return _Limited(decision)

    async def _admit(
        self,
        event: TextReceived | AsrTranscribed,
        text: str,
        origin: Origin,
        *,
        modality: str,
        language: str,
        attachments: tuple[Attachment, ...] = (),
        moderation: Moderation | None = None,
    ) -> Event:
        """Checks, then the rate limit, then moderation (unless ``moderation`` was asked)."""
        refused = self.checks.refusal(text, attachments)
        if refused is not None:
            reason, detail = refused
            blocked = _BLOCKED if reason == "moderated" else None
            return self._rejected(
                event, reason, language, modality, origin, moderation=blocked, **detail
            )
        limited = await self._limit(event.user, event.turn or event.id, event.at)
        degraded = limited.degraded
        if not limited.decision.admitted:
            return self._rejected(
                event,
                "rate_limited",
                language,
                modality,
                origin,
                retry_after_s=limited.decision.retry_after_s,
                degraded=degraded,
            )
        if moderation is None:
            moderation = await self._moderate(text, origin, attachments)
        if moderation is not None and moderation.flagged:
            return self._rejected(
                event,
                "moderated",
                language,
                modality,
                origin,
                degraded=degraded,
                moderation=moderation,
            )
        return self._accepted(
            event,
            modality,
            language,
            text=text,
            origin=origin,
            degraded=degraded,
            in_redis=limited.in_redis,
            moderation=moderation,
        )

    async def _moderate(
        self, text: str, origin: Origin, attachments: tuple[Attachment, ...] = ()
    ) -> Moderation | None:
        """The decision on the input and its files' text (the model reads both) under the
        server's policy; None without a classifier. An engine's failure is the chain's fail
        policy's to decide."""
        if self.moderator is None:
            return None
        parts = [text, *(a.text for a in attachments if a.text)]
        verdict = await self.moderator.check("\n\n".join(p for p in parts if p.strip()))
        policy = DEFAULT_POLICY if self.policies is None else await self.policies.of(origin)
        return policy.decide(verdict)

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
        in_redis: bool = True,
        moderation: Moderation | None = None,
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
            in_redis=in_redis,
            moderation=moderation,
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
        moderation: Moderation | None = None,
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
            message=refusal(
                reason, language, categories=moderation.categories if moderation else (), **detail
            ),
            degraded=degraded,
            moderation=moderation,
        )
