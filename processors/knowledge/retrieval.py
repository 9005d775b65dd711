"""What a turn's prompt is given from the knowledge bases, and, in a replay, what it was given.

:class:`KnowledgeRetrieval` searches the scopes the turn may read (global, its person's, its
Discord server's). :class:`RecordedRetrieval` is a replay's: it reads the sources recorded in the
turn's ``llm.completed`` (``knowledge``) and gives those, so that a replayed turn sees the same
sources as it did, whatever was added or removed since; it searches only for a turn that has no
recorded completion.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from datetime import timedelta
from typing import Protocol

from libra.contracts import LOG_STREAM, LlmCompleted, RetrievedChunk, TurnAccepted, derive_id
from libra.runtime.eventlog import EventLog
from libra.runtime.projection import read_log

from .scopes import turn_scopes
from .search import KnowledgeSearch

__all__ = [
    "KnowledgeRetrieval",
    "KnowledgeSource",
    "RecordedCompletions",
    "RecordedRetrieval",
    "recorded_completion",
]

log = logging.getLogger("libra.knowledge")
_CLOCK_SKEW = timedelta(seconds=5)


class KnowledgeSource(Protocol):
    async def retrieve(self, turn: TurnAccepted) -> tuple[RetrievedChunk, ...]: ...


class KnowledgeRetrieval:
    """The ``k`` best chunks for a turn, from the scopes it may read."""

    def __init__(self, search: KnowledgeSearch, *, k: int) -> None:
        self.search, self.k = search, k

    async def retrieve(self, turn: TurnAccepted) -> tuple[RetrievedChunk, ...]:
        scopes = turn_scopes(turn)
        if self.k <= 0 or not turn.text.strip() or not await self.search.has_any(scopes):
            return ()
        return tuple(await self.search.search(turn.text, scopes, k=self.k))


async def recorded_completion(log_: EventLog, turn: TurnAccepted) -> LlmCompleted | None:
    """The turn's ``llm.completed`` as the log holds it, or None."""
    wanted = derive_id(turn.id, "completed")
    async for _, event in read_log(
        log_,
        [f"libra.llm.completed.{turn.conversation}"],
        stream=LOG_STREAM,
        start_time=turn.at - _CLOCK_SKEW,
    ):
        if event.id == wanted and isinstance(event, LlmCompleted):
            return event
    return None


class RecordedCompletions:
    """Turns' recorded ``llm.completed``, each read from the log once: a replayed turn's
    sources and its tools' results both come from it, and an eval asks for every candidate."""

    def __init__(self, log_: EventLog, *, keep: int = 1024) -> None:
        self.log, self.keep = log_, keep
        self._reads: OrderedDict[str, asyncio.Future[LlmCompleted | None]] = OrderedDict()

    def seed(self, turn: TurnAccepted, completed: LlmCompleted) -> None:
        """Keeps a turn's completion that was read already (an eval reads them all at once)."""
        if completed.id == derive_id(turn.id, "completed"):  # the one ``get`` would find
            done = asyncio.get_running_loop().create_future()
            done.set_result(completed)
            self._reads[turn.id] = done

    async def get(self, turn: TurnAccepted) -> LlmCompleted | None:
        read = self._reads.get(turn.id)
        if read is None:
            read = self._reads[turn.id] = asyncio.ensure_future(recorded_completion(self.log, turn))
            while len(self._reads) > self.keep:
                self._reads.popitem(last=False)
        try:
            return await asyncio.shield(read)
        except Exception:
            self._reads.pop(turn.id, None)  # a failed read is tried again next time
            raise


class RecordedRetrieval:
    """A replay's knowledge: what the turn's recorded completion held."""

    def __init__(self, recorded: RecordedCompletions, fallback: KnowledgeSource | None) -> None:
        self.recorded, self.fallback = recorded, fallback

    async def retrieve(self, turn: TurnAccepted) -> tuple[RetrievedChunk, ...]:
        recorded = await self.recorded.get(turn)
        if recorded is not None:
            return recorded.knowledge
        log.info("turn %s has no recorded completion: searching the knowledge bases", turn.turn)
        return await self.fallback.retrieve(turn) if self.fallback is not None else ()
