"""The llm processor: answers an accepted turn, streaming the reply as deltas.

The first piece of a reply is published at once (time to first token is what people feel);
later pieces are gathered for up to ``DELTA_EVERY_S`` so a fast model does not turn into
hundreds of events a second, except that a spoken reply's piece that completes a sentence goes
at once (the tts starts on the first sentence). The completed event carries the whole reply; a
failure is an ``llm.failed`` event with a message the person can read, never silence. A turn
handled again (the process stopped mid-reply) is a new ``attempt``: its deltas start again at
index 0, with ids of their own, and the edges show the reply from its start again.

A speculative turn (answered before the end of the turn is certain) is answered at once too,
its deltas streamed as usual, but its ``llm.completed`` or ``llm.failed`` waits until admission
confirms the turn, so that history, memory and the cache only ever hold replies to turns that
happened; when the turn is dropped instead, the reply stops where it is and nothing more is
published.

With output moderation on (``MODERATION_OUTPUT``; a ``moderator`` given), a generated reply
passes a :class:`~.release.ReleaseGate`: it is published a sentence at a time, each sentence as
one delta once its verdict is clean, while the provider writes on; the first sentence is
checked as soon as it is complete, so the first delta comes one sentence and one check later
than without. A flagged sentence stops the reply: the provider's stream is closed, a notice in
the turn's language is published as the last delta (the tts speaks it, the edges show it), and
``llm.completed`` carries what was delivered (the clean sentences and the notice), the verdict
and the sentence's index, with ``finish_reason`` "moderated"; provider, model and tokens are
unknown then (the stream never ended), and such a reply is not cached. The flagged text goes
nowhere: not in an event, the cache or a log line. Replies answered from the cache were cached
whole and clean by the same gate (a reply cached before moderation was on is served until
``LLM_CACHE_TTL``).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime

from prometheus_client import Counter, Gauge

from libra.contracts import (
    CONSUMERS,
    AnyEvent,
    Event,
    LlmCompleted,
    LlmDelta,
    LlmFailed,
    Moderation,
    ProviderAttempt,
    ToolUse,
    TurnAccepted,
    derive,
    new_id,
)
from libra.runtime.eventlog import EventLog

from .cache import CachedReply, ResponseCache
from .chain import AllProvidersFailed, ChainResult, ProviderChain
from .confirmation import CERTAIN, Confirmation
from .context import Prompt, PromptBuilder
from .prefetch import ContextPrefetch
from .providers import SETUP_SETTINGS
from .providers.base import ChatUsage
from .release import ReleaseGate, SentenceCheck
from .tooling import ToolBox, TurnTools, answer_with_tools

__all__ = ["DELTA_EVERY_S", "LlmProcessor"]

DELTA_EVERY_S = 0.04
_DELTA_MAX_CHARS = 400
# A sentence's end as the tts's splitter sees it: a terminator and the space after it.
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*\s|[。！？\n]")

CACHE_REQUESTS = Counter("libra_llm_cache_requests_total", "Response cache lookups", ["result"])
CACHE_HIT_RATE = Gauge(
    "redis_cache_hit_rate", "Share of LLM requests answered from the Redis cache"
)

_FAILURE = {
    "en": "Sorry — I couldn't get an answer from any language model just now."
    " Please try again in a moment.",
    "ko": "죄송해요 — 지금은 어떤 언어 모델에서도 답을 받지 못했어요. 잠시 후 다시 시도해 주세요.",
}
_STOPPED = {
    "en": "I stopped this reply: it broke this server's rules.",
    "ko": "이 답변은 서버 규칙에 어긋나서 멈췄어요.",
}
_NO_PROVIDER = {
    "en": f"No language model is configured: set {SETUP_SETTINGS}.",
    "ko": f"설정된 언어 모델이 없어요. 다음을 설정해 주세요: {SETUP_SETTINGS}.",
}


def _say(texts: dict[str, str], language: str) -> str:
    return texts.get(language, texts["en"])


class _Deltas:
    """Numbers the reply's pieces and decides when gathered text becomes a delta."""

    def __init__(self, turn: TurnAccepted, *, sentences: bool = False) -> None:
        self.turn = turn
        self.sentences = sentences  # each piece is a checked sentence: out at once
        # Each handling of the turn is an attempt of its own: a restarted processor's pieces
        # are not dropped as duplicates of the stopped one's, and the edges start over.
        self.attempt = new_id()
        self.index = 0
        self.buffer: list[str] = []
        self.buffered = 0
        self.last = 0.0
        self.first_at: datetime | None = None
        self.spoken = turn.modality == "voice"
        self._tail = ""  # the last character so far: a sentence's end may span two pieces
        self.text: list[str] = []  # every piece so far: the reply

    def hold(self, piece: str) -> None:
        """Adds a piece to the reply, to go out with the next delta."""
        self.text.append(piece)
        self.buffer.append(piece)
        self.buffered += len(piece)

    def add(self, piece: str) -> LlmDelta | None:
        self.hold(piece)
        now = time.monotonic()
        ends_sentence = self.spoken and _SENTENCE_END.search(self._tail + piece) is not None
        self._tail = piece[-1:] or self._tail
        if (
            self.index == 0
            or self.sentences
            or ends_sentence
            or now - self.last >= DELTA_EVERY_S
            or self.buffered >= _DELTA_MAX_CHARS
        ):
            return self.flush(now)
        return None

    def flush(self, now: float | None = None) -> LlmDelta | None:
        if not self.buffered:
            return None
        text = "".join(self.buffer)
        self.buffer.clear()
        self.buffered = 0
        self.last = time.monotonic() if now is None else now
        delta = derive(
            self.turn,
            LlmDelta,
            key=f"delta/{self.attempt}/{self.index}",
            index=self.index,
            text=text,
            attempt=self.attempt,
            modality=self.turn.modality,
            language=self.turn.language,
            origin=self.turn.origin,
        )
        if self.index == 0:
            self.first_at = delta.at
        self.index += 1
        return delta


class LlmProcessor:
    """Turns ``turn.accepted`` into ``llm.delta``s and ``llm.completed`` (or ``llm.failed``).

    ``log`` is where a speculative turn's confirmation is followed; without it (replaying
    recorded turns) a speculative turn is answered as if it had been confirmed. ``prefetch``
    reads a turn's prompt context while admission decides on its message or transcript.
    ``moderator``: output moderation, checking the reply a sentence at a time before release.
    ``tools``: the tools a reply may call (their calls and results are events of the turn).
    """

    spec = CONSUMERS["llm"]

    def __init__(
        self,
        chain: ProviderChain | None,
        prompts: PromptBuilder,
        *,
        cache: ResponseCache | None = None,
        max_tokens: int = 512,
        temperature: float = 0.6,
        log: EventLog | None = None,
        prefetch: ContextPrefetch | None = None,
        moderator: SentenceCheck | None = None,
        tools: ToolBox | None = None,
    ) -> None:
        self.chain, self.prompts, self.cache = chain, prompts, cache
        self.moderator, self.tools = moderator, tools
        self.max_tokens, self.temperature = max_tokens, temperature
        self.log, self.prefetch = log, prefetch
        self._hits = self._lookups = 0

    async def handle(self, event: AnyEvent) -> AsyncIterator[Event]:
        if not isinstance(event, TurnAccepted):
            return
        if not event.speculative or self.log is None:
            async for out in self._answer(event, CERTAIN):
                yield out
            return
        async with Confirmation(self.log, event) as confirmation:
            async for out in self._answer(event, confirmation):
                yield out

    async def _answer(
        self, event: TurnAccepted, confirmation: Confirmation
    ) -> AsyncIterator[Event]:
        if self.chain is None:
            if not await confirmation.confirmed():
                return
            yield self._failed(event, "no_provider", _say(_NO_PROVIDER, event.language), ())
            return
        started = time.perf_counter()
        context = None
        if self.prefetch is not None:
            context = await self.prefetch.take(event)
        prompt = await self.prompts.build(
            event, default_model=self.chain.default_model, context=context
        )
        tools = None
        if self.tools is not None:
            tools = await self.tools.for_turn(event, prompt.tools)
        key = None
        if self.cache is not None:
            key = self.cache.key(
                prompt.messages,
                models=prompt.model or self.chain.describe(),
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                tools=tuple(tools.tools) if tools is not None else (),
            )
            cached = await self._cached(key)
            if cached is not None:
                deltas = _Deltas(event)
                yield deltas.add(cached.text)
                if not await confirmation.confirmed():
                    return
                result = ChainResult(
                    provider=cached.provider,
                    model=cached.model,
                    usage=ChatUsage(
                        prompt_tokens=cached.prompt_tokens,
                        completion_tokens=cached.completion_tokens,
                        finish_reason="cached",
                    ),
                )
                yield self._completed(
                    event, cached.text, result, deltas, started, prompt, cached=True
                )
                return
        async for out in self._generate(event, prompt, key, started, confirmation, tools):
            yield out

    async def _generate(
        self,
        turn: TurnAccepted,
        prompt: Prompt,
        key: str | None,
        started: float,
        confirmation: Confirmation,
        tools: TurnTools | None = None,
    ) -> AsyncIterator[Event]:
        gate = None
        if self.moderator is not None:
            gate = ReleaseGate(self.moderator, prompt.moderation)
        deltas = _Deltas(turn, sentences=gate is not None)
        stream = answer_with_tools(
            self.chain,
            turn,
            prompt.messages,
            tools,
            attempt=deltas.attempt,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            model_override=prompt.model,
        )
        if gate is not None:
            stream = gate.release(stream)
        result: ChainResult | None = None
        try:
            async for out in self._relay(stream, deltas, gate, confirmation):
                if isinstance(out, ChainResult):
                    result = out
                else:
                    yield out
        except AllProvidersFailed as exc:
            if await confirmation.confirmed():
                yield self._failed(turn, exc.error, _say(_FAILURE, turn.language), exc.attempts)
            return
        if not await confirmation.confirmed():
            return
        if gate is not None and gate.stopped is not None:
            yield self._stopped(turn, deltas, gate, started, prompt)
            return
        reply = "".join(deltas.text)
        uses = tuple(tools.uses) if tools is not None else ()
        if not uses:  # a reply made with a tool's result (the time, a roll) is not reused
            await self._remember(key, reply, result)
        moderation = gate.record() if gate is not None else None
        yield self._completed(
            turn, reply, result, deltas, started, prompt, moderation=moderation, tools=uses
        )

    async def _relay(
        self,
        stream: AsyncIterator[str | Event | ChainResult],
        deltas: _Deltas,
        gate: ReleaseGate | None,
        confirmation: Confirmation,
    ) -> AsyncIterator[Event | ChainResult]:
        """Yields the reply's deltas as the stream (or the gate) gives text, then its result; a
        reply that the gate stopped ends with the notice instead."""
        try:
            async with contextlib.aclosing(stream):  # a dropped draft hangs up on the provider
                async for piece in stream:
                    if confirmation.abandoned:
                        return
                    if type(piece) is str:
                        if (delta := deltas.add(piece)) is not None:
                            yield delta
                        continue
                    # the result, or a tool's event: after the text written before it
                    if (delta := deltas.flush()) is not None:
                        yield delta
                    yield piece
        except AllProvidersFailed:
            if (delta := deltas.flush()) is not None:
                yield delta
            raise
        if gate is not None and gate.stopped is not None:
            notice = ("\n\n" if deltas.text else "") + _say(_STOPPED, deltas.turn.language)
            deltas.hold(notice)
        if (delta := deltas.flush()) is not None:
            yield delta

    def _stopped(
        self,
        turn: TurnAccepted,
        deltas: _Deltas,
        gate: ReleaseGate,
        started: float,
        prompt: Prompt,
    ) -> LlmCompleted:
        """The completed event of a reply that a flagged sentence stopped: what was delivered."""
        # The stream was closed before its end: who answered and what it cost are not known.
        result = ChainResult(provider="", model="", usage=ChatUsage(finish_reason="moderated"))
        reply = "".join(deltas.text)
        return self._completed(
            turn,
            reply,
            result,
            deltas,
            started,
            prompt,
            moderation=gate.record(),
            stopped_at=gate.stopped.index,
        )

    async def _remember(self, key: str | None, reply: str, result: ChainResult) -> None:
        """Caches a whole reply under its prompt's key (with the cache on, and words to keep)."""
        if key is None or not reply:
            return
        await self.cache.put(
            key,
            CachedReply(
                text=reply,
                provider=result.provider,
                model=result.model,
                prompt_tokens=result.usage.prompt_tokens,
                completion_tokens=result.usage.completion_tokens,
            ),
        )

    def _completed(
        self,
        turn: TurnAccepted,
        reply: str,
        result: ChainResult,
        deltas: _Deltas,
        started: float,
        prompt: Prompt,
        *,
        cached: bool = False,
        moderation: Moderation | None = None,
        stopped_at: int | None = None,
        tools: tuple[ToolUse, ...] = (),
    ) -> LlmCompleted:
        elapsed = (time.perf_counter() - started) * 1000
        return derive(
            turn,
            LlmCompleted,
            key="completed",
            text=reply,
            user_text=turn.text,
            provider=result.provider,
            model=result.model,
            prompt_tokens=result.usage.prompt_tokens,
            completion_tokens=result.usage.completion_tokens,
            ttft_ms=elapsed if cached else result.ttft_ms,
            total_ms=elapsed,
            cached=cached,
            finish_reason=result.usage.finish_reason,
            deltas=deltas.index,
            first_delta_at=deltas.first_at,
            attempts=result.attempts,
            modality=turn.modality,
            language=turn.language,
            origin=turn.origin,
            degraded=prompt.degraded,  # a reply written without what the database holds
            moderation=moderation,
            stopped_at=stopped_at,
            knowledge=prompt.knowledge,  # what replay gives the prompt again
            tools=tools,  # and the tools' results
        )

    def gave_up(self, event: AnyEvent, error: str) -> list[Event]:
        """The runtime gave up on a turn (after retries): the person is told, not left waiting."""
        if not isinstance(event, TurnAccepted):
            return []
        return [self._failed(event, "internal", _say(_FAILURE, event.language), ())]

    async def _cached(self, key: str) -> CachedReply | None:
        cached = await self.cache.get(key)
        self._lookups += 1
        self._hits += cached is not None
        CACHE_REQUESTS.labels("hit" if cached else "miss").inc()
        CACHE_HIT_RATE.set(self._hits / self._lookups)
        return cached

    def _failed(
        self, turn: TurnAccepted, error: str, message: str, attempts: tuple[ProviderAttempt, ...]
    ) -> LlmFailed:
        return derive(
            turn,
            LlmFailed,
            key="completed",
            error=error,
            message=message,
            attempts=tuple(attempts),
            modality=turn.modality,
            language=turn.language,
            origin=turn.origin,
        )
