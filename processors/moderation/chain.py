"""The moderator: moderation engines in a fallback order, each with a timeout and a breaker.

A check walks the engines in ``MODERATION_ENGINES`` order. An engine that times out
(``MODERATION_TIMEOUT_SEC``), answers an HTTP error or garbage (``ModerationUnavailable``), or
whose circuit breaker is open (after ``MODERATION_BREAKER_FAILURES`` failures in a row, for
``MODERATION_BREAKER_RESET_SEC``) is passed over. The first flagged verdict is the answer; a
clean one is the answer once the engines that answered cover every category the fail policy
keeps closed.

The fail policy (``MODERATION_FAIL``) decides for the categories no answering engine could
judge: the word list judges only ``blocked_word``, so it stands in for the classifiers only
where the policy is open.

- ``open`` (the default): nothing is flagged for want of a classifier; the word list's verdict,
  or a clean ``none`` verdict when no engine answered at all.
- ``closed``: every classifier category is flagged (engine ``none``): nothing passes unchecked.
- ``closed:sexual_minors,self_harm``: only those are flagged, so a per-server policy that acts
  on those categories refuses, and one that acts on others lets the text through.

A verdict's ``latency_ms`` is the whole check's, failed tries included: what the person waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from time import perf_counter
from typing import Any

from prometheus_client import Counter, Gauge
from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState

from libra.processors.llm.providers.groq import GROQ_URL
from libra.processors.llm.providers.openai_compat import OPENAI_URL
from libra.runtime.config import ConfigError, Settings

from .base import CATEGORIES, ModerationEngine, ModerationUnavailable, Verdict, engine_names
from .llama_guard import LlamaGuard
from .openai import OpenAIModeration
from .words import WordListEngine, parse_blocklist

__all__ = [
    "CLASSIFIED",
    "MODERATION_BREAKER_OPEN",
    "MODERATION_CALLS",
    "Moderator",
    "build_engines",
    "engine_names",
    "parse_fail_policy",
]

log = logging.getLogger("libra.moderation")

# What a classifier judges and the fail policy may keep closed; the word list cannot fail.
CLASSIFIED = tuple(c for c in CATEGORIES if c != "blocked_word")
ENGINES = ("openai", "llama_guard", "words")

MODERATION_CALLS = Counter(
    "libra_moderation_engine_calls_total",
    "Moderation engine calls, by outcome (clean, flagged, timeout, unavailable, circuit_open)",
    ["engine", "outcome"],
)
MODERATION_BREAKER_OPEN = Gauge(
    "libra_moderation_breaker_open", "1 while a moderation engine's breaker is open", ["engine"]
)


def parse_fail_policy(value: str) -> frozenset[str]:
    """The categories ``MODERATION_FAIL`` keeps closed: ``open``, ``closed``, ``closed:a,b``."""
    mode, colon, listed = value.strip().partition(":")
    mode = mode.strip().lower()
    if mode == "open" and not colon:
        return frozenset()
    if mode == "closed" and not colon:
        return frozenset(CLASSIFIED)
    names = {n.strip() for n in listed.split(",") if n.strip()}
    if mode != "closed" or not names or not names <= set(CLASSIFIED):
        raise ConfigError(
            f"MODERATION_FAIL: {value!r} is not open, closed or closed:CATEGORY,... "
            f"(categories: {', '.join(CLASSIFIED)})"
        )
    return frozenset(names)


def build_engines(settings: Settings) -> list[ModerationEngine]:
    """The engines ``engine_names`` lists, built from the settings; ConfigError if one can't be."""
    names = engine_names(settings)
    for name in names:
        if name not in ENGINES:
            raise ConfigError(f"MODERATION_ENGINES: unknown engine {name!r} ({', '.join(ENGINES)})")
        if names.count(name) > 1:
            raise ConfigError(f"MODERATION_ENGINES: {name} is named twice")
    if "openai" in names and not settings.openai_api_key:
        raise ConfigError("MODERATION_ENGINES: openai needs OPENAI_API_KEY")
    if "llama_guard" in names and not settings.groq_api_key:
        raise ConfigError("MODERATION_ENGINES: llama_guard needs GROQ_API_KEY")
    return [_engine(name, settings) for name in names]


def _engine(name: str, settings: Settings) -> ModerationEngine:
    timeout = settings.moderation_timeout_sec
    if name == "openai":
        return OpenAIModeration(
            api_key=settings.openai_api_key,
            timeout=timeout,
            base_url=settings.openai_base_url or OPENAI_URL,
        )
    if name == "llama_guard":
        return LlamaGuard(
            api_key=settings.groq_api_key,
            timeout=timeout,
            model=settings.moderation_guard_model,
            base_url=settings.groq_base_url or GROQ_URL,
        )
    return WordListEngine(parse_blocklist(settings.moderation_blocklist))


class Moderator:
    """Answers a verdict on a text from the first engines that can give one."""

    def __init__(
        self,
        engines: Sequence[ModerationEngine],
        *,
        timeout: float = 2.0,
        fail_closed: frozenset[str] = frozenset(),
        breaker_failures: int = 5,
        breaker_reset: float = 30.0,
    ) -> None:
        """Sets the policy: ``timeout`` seconds per engine, the categories flagged when no
        engine could judge them (``fail_closed``), a breaker per engine opening after
        ``breaker_failures`` failures in a row (0: no breakers) for ``breaker_reset`` seconds."""
        if not engines:
            raise ValueError("a moderator needs at least one engine")
        self.engines = tuple(engines)
        self.fail_closed = fail_closed
        self._timeout = timeout
        self._breakers: AsyncCircuitBreakerFactory | None = None
        if breaker_failures > 0:
            self._breakers = AsyncCircuitBreakerFactory(
                default_threshold=breaker_failures, default_ttl=breaker_reset
            )
            self._breakers.add_listener(_on_breaker_event)
        for engine in self.engines:
            MODERATION_BREAKER_OPEN.labels(engine.name).set(0)

    @classmethod
    def from_settings(
        cls, settings: Settings, engines: Sequence[ModerationEngine] | None = None
    ) -> Moderator:
        """The moderator the settings describe (engines from ``build_engines`` by default)."""
        return cls(
            build_engines(settings) if engines is None else engines,
            timeout=settings.moderation_timeout_sec,
            fail_closed=parse_fail_policy(settings.moderation_fail),
            breaker_failures=settings.moderation_breaker_failures,
            breaker_reset=settings.moderation_breaker_reset_sec,
        )

    async def check(self, text: str) -> Verdict:
        """The verdict on ``text``; the fail policy's when the engines cannot give one."""
        began = perf_counter()
        unjudged = set(self.fail_closed)
        for engine in self.engines:
            verdict = await self._ask(engine, text)
            if verdict is None:
                continue
            unjudged -= engine.covers
            if verdict.flagged or not unjudged:
                return replace(verdict, latency_ms=(perf_counter() - began) * 1000)
        closed = tuple(c for c in CLASSIFIED if c in unjudged)
        return Verdict(
            flagged=bool(closed),
            categories=closed,
            engine="none",
            latency_ms=(perf_counter() - began) * 1000,
        )

    def describe(self) -> str:
        """The fallback order, ``MODERATION_ENGINES``' syntax."""
        return ",".join(engine.name for engine in self.engines)

    async def aclose(self) -> None:
        """Closes the engines' SDK clients."""
        for engine in self.engines:
            close = getattr(engine, "close", None)
            if close is not None:
                await close()

    async def _ask(self, engine: ModerationEngine, text: str) -> Verdict | None:
        """The engine's verdict, or None when it failed or its breaker is open."""
        breaker: Any = contextlib.nullcontext()
        if self._breakers is not None:
            breaker = await self._breakers.get_breaker(engine.name)
        try:
            async with breaker, asyncio.timeout(self._timeout):
                verdict = await engine.check(text)
        except OpenedState:
            outcome = "circuit_open"
        except TimeoutError:
            outcome = "timeout"
            log.warning("moderation %s: no answer within %g s", engine.name, self._timeout)
        except ModerationUnavailable as exc:
            outcome = "unavailable"
            log.warning("moderation %s unavailable: %s", engine.name, exc)
        else:
            MODERATION_CALLS.labels(engine.name, "flagged" if verdict.flagged else "clean").inc()
            return verdict
        MODERATION_CALLS.labels(engine.name, outcome).inc()
        return None


def _on_breaker_event(name: str, event_type: str, event: Any) -> None:
    if event_type == "state_changed":
        MODERATION_BREAKER_OPEN.labels(name).set(1 if event.state == "opened" else 0)
