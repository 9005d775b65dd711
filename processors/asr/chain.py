"""The speech-to-text fallback order, with a time limit per engine.

A transcription walks the engines in order; the first answer wins. ``ASR_TIMEOUT_SEC`` bounds
each engine's try. An engine that failed in the last ``cooldown_s`` seconds moves to the back
of the order, so a vendor that is down costs one timeout, not one per utterance.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import msgspec
from prometheus_client import Counter

from .base import AsrEngine, Transcript

__all__ = ["ASR_REQUESTS", "AllEnginesFailed", "AsrChain", "Attempt"]

log = logging.getLogger("libra.asr")

ASR_REQUESTS = Counter(
    "libra_asr_requests_total", "Transcriptions tried, by engine and outcome", ["engine", "outcome"]
)


class Attempt(msgspec.Struct, frozen=True):
    """One engine's failed try."""

    engine: str
    error: str


class AllEnginesFailed(RuntimeError):
    """Every engine in the order failed to transcribe the utterance."""

    def __init__(self, attempts: Sequence[Attempt]) -> None:
        super().__init__("; ".join(f"{a.engine}: {a.error}" for a in attempts) or "no engine")
        self.attempts = tuple(attempts)


class AsrChain:
    """Transcribes with the first engine that answers in time."""

    def __init__(
        self, engines: Sequence[AsrEngine], *, timeout_s: float, cooldown_s: float = 30.0
    ) -> None:
        if not engines:
            raise ValueError("at least one ASR engine is needed")
        self.engines = tuple(engines)
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        self._failed_at: dict[str, float] = {}

    async def prepare(self) -> None:
        """Loads local models now, so that the first utterance does not wait for them.

        An engine that cannot load is one log line saying whether voice still works.
        """
        failed: list[str] = []
        for engine in self.engines:
            load = getattr(engine, "load", None)
            if load is None:
                continue
            try:
                await load()
            except Exception as exc:  # it is tried again on use, and the chain falls back
                failed.append(engine.name)
                working = ", ".join(e.name for e in self.engines if e.name not in failed)
                outcome = f"voice uses {working}" if working else "voice will not work"
                level = logging.WARNING if working else logging.ERROR
                log.log(level, "asr engine %s cannot load: %s; %s", engine.name, exc, outcome)

    def order(self) -> list[AsrEngine]:
        """Returns the engines in the order to try now: recently failed ones last."""
        now = time.monotonic()
        return sorted(
            self.engines,
            key=lambda e: now - self._failed_at.get(e.name, -self.cooldown_s) < self.cooldown_s,
        )

    async def transcribe(
        self, pcm16k: bytes, language_hint: str | None, *, prompt: str = ""
    ) -> tuple[Transcript, AsrEngine]:
        """Returns the first engine's transcript, and that engine; raises AllEnginesFailed.

        ``prompt``: the words said before this audio (an utterance's start heard early)."""
        options = {"prompt": prompt} if prompt else {}  # a whole utterance has none
        attempts: list[Attempt] = []
        for engine in self.order():
            try:
                async with asyncio.timeout(self.timeout_s):
                    transcript = await engine.transcribe(pcm16k, language_hint, **options)
            except Exception as exc:  # any failure: the next engine may still answer
                error = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
                attempts.append(Attempt(engine.name, f"{error}: {exc}"[:300]))
                self._failed_at[engine.name] = time.monotonic()
                ASR_REQUESTS.labels(engine.name, error).inc()
                log.warning("asr engine %s failed: %s", engine.name, attempts[-1].error)
                continue
            self._failed_at.pop(engine.name, None)
            ASR_REQUESTS.labels(engine.name, "ok").inc()
            return transcript, engine
        raise AllEnginesFailed(attempts)
