"""The output moderation gate: a streamed reply is released a sentence at a time, once clean.

The provider's stream is read in a task of its own, so generation goes on while the sentences
already complete are checked; each sentence's check starts the moment it is complete (the first
one too: no waiting for more text), several may be in flight at once, and sentences are released
in order, each once it and all before it are clean. Sentences are cut by the tts's splitter, as
written (every character kept: the released sentences joined are the reply). A flagged sentence
stops the reply: the provider's stream is closed, nothing after it is released, and
:attr:`ReleaseGate.stopped` says which sentence and why. The text itself is dropped here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from libra.contracts import Moderation
from libra.processors.moderation.base import Verdict
from libra.processors.moderation.policy import DEFAULT_POLICY, ServerPolicy
from libra.processors.tts.sentences import SentenceSplitter

from .chain import ChainResult

__all__ = ["ReleaseGate", "SentenceCheck", "Stopped"]


class SentenceCheck(Protocol):
    """What the gate asks (the moderation chain, which applies the fail policy itself)."""

    async def check(self, text: str) -> Verdict: ...


@dataclass(frozen=True)
class Stopped:
    """The sentence that stopped the reply: its index and the decision on it."""

    index: int
    decision: Moderation


_END = object()


@dataclass(frozen=True, slots=True)
class _Through:
    """What passes the gate unchecked, in its place among the sentences: the stream's result,
    and a tool call's events."""

    item: object


class ReleaseGate:
    """Releases one reply's stream a sentence at a time, each once its verdict is clean."""

    def __init__(self, moderator: SentenceCheck, policy: ServerPolicy = DEFAULT_POLICY) -> None:
        self.moderator = moderator
        self.policy = policy  # the server's: which categories stop a reply, at what scores
        self.stopped: Stopped | None = None
        self.engines: list[str] = []  # who answered, in the order of the sentences
        self.first_wait_ms = 0.0  # how long the first sentence waited for its verdict
        self._splitter = SentenceSplitter(as_written=True)
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._checks: list[asyncio.Task[Verdict]] = []

    async def release(self, stream: AsyncIterator[str | object]) -> AsyncIterator[str | object]:
        """Yields the stream's clean sentences in order, anything else (a tool's events) in its
        place among them, then its ChainResult; raises what the stream raised once the sentences
        before the failure are released."""
        reader = asyncio.create_task(self._read(stream))
        try:
            index = 0
            while (item := await self._queue.get()) is not _END:
                if isinstance(item, _Through):
                    yield item.item
                    continue
                sentence, check, complete = item
                if check is not None and (refused := await self._verdict(check, complete, index)):
                    self.stopped = Stopped(index, refused)
                    return
                yield sentence
                index += 1
            await reader  # the stream's own failure, if it had one
        finally:
            for task in (reader, *self._checks):
                task.cancel()
            await asyncio.gather(reader, *self._checks, return_exceptions=True)

    def record(self) -> Moderation | None:
        """What ``llm.completed`` records: the verdict that stopped the reply, or for a clean
        one the engines that answered and how long the first sentence waited; None when
        nothing was checked."""
        if self.stopped is not None:
            return self.stopped.decision
        if not self.engines:
            return None
        return Moderation(
            engine=",".join(dict.fromkeys(self.engines)),
            latency_ms=self.first_wait_ms,
            policy=self.policy.describe(),
        )

    async def _verdict(
        self, check: asyncio.Task[Verdict], complete: float, index: int
    ) -> Moderation | None:
        """Waits for a sentence's verdict; returns the decision when the server's policy
        refuses the sentence."""
        verdict = await check
        if index == 0:
            self.first_wait_ms = round((time.perf_counter() - complete) * 1000, 2)
        self.engines.append(verdict.engine)
        decision = self.policy.decide(verdict)
        return decision if decision.flagged else None

    async def _read(self, stream: AsyncIterator[str | object]) -> None:
        result = None
        try:
            async with contextlib.aclosing(stream):  # a stopped reply hangs up on the provider
                async for piece in stream:
                    if isinstance(piece, ChainResult):
                        result = piece  # passed on after the last sentence
                        continue
                    if not isinstance(piece, str):  # a tool's event: after the text before it
                        for sentence in self._splitter.flush():
                            self._check(sentence)
                        self._queue.put_nowait(_Through(piece))
                        continue
                    for sentence in self._splitter.push(piece):
                        self._check(sentence)
        finally:
            if not asyncio.current_task().cancelling():
                for sentence in self._splitter.flush():
                    self._check(sentence)
                if result is not None:
                    self._queue.put_nowait(_Through(result))
                self._queue.put_nowait(_END)

    def _check(self, sentence: str) -> None:
        check = None
        if sentence.strip():  # whitespace between sentences says nothing
            check = asyncio.create_task(self.moderator.check(sentence))
            self._checks.append(check)
        self._queue.put_nowait((sentence, check, time.perf_counter()))
