"""Whether a turn answered before its end was certain goes ahead, as its events in the log say.

A speculative ``turn.accepted`` is answered at once, but the reply is a draft until admission
decides: ``turn.confirmed`` lets it through; ``turn.abandoned`` (the person went on talking) or
``turn.rejected`` drops it. The decision is followed on a core NATS subscription from the moment
the draft starts (no consumer to create: the usual decision comes within a few hundred
milliseconds); one published before that, for a redelivered turn or after a backlog, is read back
from the log after ``idle_s`` of quiet. No decision within ``wait_s`` drops the draft.
"""

from __future__ import annotations

import asyncio
import contextlib

from libra.contracts import TurnAbandoned, TurnAccepted, TurnConfirmed, TurnRejected
from libra.runtime.eventlog import EventLog
from libra.runtime.follow import ReplyTimeout, TurnFollower

__all__ = ["CERTAIN", "Confirmation"]

_DECIDED = (TurnConfirmed, TurnAbandoned, TurnRejected)


class _Certain:
    """A turn that was not speculative: there is nothing to wait for."""

    abandoned = False

    async def confirmed(self) -> bool:
        return True


CERTAIN = _Certain()


class Confirmation:
    """Follows a speculative turn until admission confirms or drops it."""

    def __init__(
        self, log: EventLog, turn: TurnAccepted, *, idle_s: float = 1.0, wait_s: float = 60.0
    ) -> None:
        self.follower = TurnFollower(
            log, turn.conversation, turn.turn, domains=("turn",), until=_DECIDED
        )
        self.idle_s, self.wait_s = idle_s, wait_s
        self._decision: asyncio.Task[bool] | None = None

    async def __aenter__(self) -> Confirmation:
        await self.follower.__aenter__()
        self._decision = asyncio.create_task(self._follow())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._decision is not None:
            self._decision.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._decision
        await self.follower.__aexit__(*exc)

    @property
    def abandoned(self) -> bool:
        """Whether the turn is known to have been dropped (it may still be undecided)."""
        return (
            self._decision is not None
            and self._decision.done()
            and not self._decision.cancelled()
            and not self._decision.result()
        )

    async def confirmed(self) -> bool:
        """Waits for the decision: True once confirmed, False once dropped."""
        assert self._decision is not None, "use it as an async context manager"
        return await self._decision

    async def _follow(self) -> bool:
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while True:
            try:
                async for event in self.follower.events(idle_s=self.idle_s, total_s=self.wait_s):
                    if isinstance(event, _DECIDED):
                        return isinstance(event, TurnConfirmed)
            except ReplyTimeout:  # quiet for idle_s, even after reading the log back
                if asyncio.get_running_loop().time() >= deadline:
                    return False
