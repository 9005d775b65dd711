"""Reading a turn's prompt context while admission decides on its message or transcript.

A message or transcript becomes a turn a few milliseconds later (admission, and two hops
through the log), and only then would the llm read the conversation's settings, history and
memories. Instead it starts reading them when the message or transcript is published, heard on
core NATS subscriptions, and builds the turn's prompt from that when the turn arrives with the
same text: the reads leave the clock of the reply. Every llm instance reads for every message
(none knows which one the turn will go to); what no turn claims within ``keep_s`` is dropped.
The subscriptions start with the first turn, so an instance that answers nothing holds none.
A read while the database is down comes back at once without history or memories, marked
``degraded`` (see :mod:`.context`), and the turn uses it as it is.

Only input that admission will let through is read for. A message or transcript that fails
admission's input checks (the same ``InputChecks``), or comes from a person beyond the rate
limit (counted here, with admission's settings and no round trip, by a ``LocalRateLimiter`` of
every message heard), is never a turn: a refused flood costs no database read and no embedding
call. This count may run ahead of Redis's (a speculative transcript that never became a turn
counts here); a turn whose read was skipped reads its context itself when it comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import Counter

from libra.contracts import (
    PREFIX,
    AsrTranscribed,
    Attachment,
    EventDecodeError,
    TextReceived,
    TurnAccepted,
    decode_event,
    derive,
)
from libra.processors.turns.checks import InputChecks
from libra.processors.turns.ratelimit import LocalRateLimiter
from libra.runtime.eventlog import EventLog

from .context import Context, PromptBuilder

__all__ = ["ContextPrefetch"]

log = logging.getLogger("libra.llm")

PREFETCHES = Counter(
    "libra_llm_prefetch_total",
    "Messages and transcripts the llm heard before admission: context read, or not (refused)",
    ["outcome"],  # read, refused, rate_limited
)


class ContextPrefetch:
    """The prompt contexts being read for the messages and transcripts of the last ``keep_s``.

    ``checks`` and ``limiter``: admission's input checks and rate limit; without them every
    message is read for.
    """

    def __init__(
        self,
        log: EventLog,
        prompts: PromptBuilder,
        *,
        keep_s: float = 10.0,
        checks: InputChecks | None = None,
        limiter: LocalRateLimiter | None = None,
    ) -> None:
        self.log, self.prompts, self.keep_s = log, prompts, keep_s
        self.checks, self.limiter = checks, limiter
        self._reads: dict[str, tuple[str, asyncio.Task[Context]]] = {}
        self._subs: list[Subscription] = []
        self._starting: asyncio.Lock | None = None

    async def take(self, turn: TurnAccepted) -> Context | None:
        """Returns the context read for ``turn``'s message or transcript, if it was and the read
        worked."""
        if not self._subs:
            await self._start()
        text, read = self._reads.pop(turn.turn, ("", None))
        if read is None or text != turn.text:
            return None
        with contextlib.suppress(Exception):  # (it was logged; the turn reads it again)
            return await read
        return None

    async def _start(self) -> None:
        self._starting = self._starting or asyncio.Lock()
        async with self._starting:
            if not self._subs:
                for said in ("text.received", "asr.transcribed"):
                    subject = f"{PREFIX}.{said}.*"
                    self._subs.append(await self.log.nc.subscribe(subject, cb=self._on_msg))

    async def _on_msg(self, msg: Msg) -> None:
        with contextlib.suppress(EventDecodeError):
            match decode_event(msg.data):
                case TextReceived() as said if said.text.strip():
                    self._read(said, "text", said.attachments)
                case AsrTranscribed(reply=True) as heard if heard.text.strip():
                    self._read(heard, "voice")

    def _refused(
        self, said: TextReceived | AsrTranscribed, attachments: tuple[Attachment, ...]
    ) -> str | None:
        """Why admission will refuse ``said`` (the outcome to count), or None."""
        if self.checks is not None and self.checks.refusal(said.text, attachments) is not None:
            return "refused"
        if self.limiter is None:
            return None
        # admission's key and time: the turn's id, the message's or transcript's time
        at_ms = int(said.at.timestamp() * 1000)
        if not self.limiter.admit(said.user, said.turn or said.id, at_ms).admitted:
            return "rate_limited"
        return None

    def _read(
        self,
        said: TextReceived | AsrTranscribed,
        modality: str,
        attachments: tuple[Attachment, ...] = (),
    ) -> None:
        if (refused := self._refused(said, attachments)) is not None:
            PREFETCHES.labels(refused).inc()
            return
        PREFETCHES.labels("read").inc()
        # The turn as admission will make it, for what the reads need: conversation, server,
        # user, text and time.
        draft = derive(
            said,
            TurnAccepted,
            key="turn",
            text=said.text.strip(),
            modality=modality,
            origin=said.origin,
        )
        read = asyncio.create_task(self.prompts.context(draft))
        read.add_done_callback(_quietly)
        self._reads[draft.turn] = (draft.text, read)
        asyncio.get_running_loop().call_later(self.keep_s, self._reads.pop, draft.turn, None)


def _quietly(read: asyncio.Task[Context]) -> None:
    """Logs a failed read once, claimed or not (a claimed one is read again by its turn)."""
    if not read.cancelled() and (error := read.exception()) is not None:
        log.warning("could not read a prompt's context ahead of its turn: %s", error)
