"""A reply that grows in Discord as it is written: posted on the first piece, then edited.

Each message is edited at most once per ``interval`` (a second by default: Discord allows five
edits per five seconds per channel, and hikari's limiter waits out whatever is left of a bucket
and survives 429s). Pieces that arrive in between are folded into the next edit. A reply longer
than a message continues in further messages, split by :func:`split_message`; the finished
reply's messages hold exactly the split of the completed text, and its footer (sources, tools)
under the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import hikari

from .split import MESSAGE_LIMIT, split_message, with_footer

__all__ = ["LiveReply"]

log = logging.getLogger("libra.discord.reply")

_NO_PINGS: dict[str, bool] = {
    "mentions_everyone": False,
    "user_mentions": False,
    "role_mentions": False,
    "mentions_reply": False,
}


@dataclass
class _Posted:
    id: int
    content: str
    written_at: float


class LiveReply:
    """The messages of one reply in one channel, kept equal to the reply's text so far."""

    def __init__(
        self,
        rest: hikari.api.RESTClient,
        channel: int,
        *,
        reply_to: int | None = None,
        interval: float = 1.0,
        limit: int = MESSAGE_LIMIT,
    ) -> None:
        self.rest = rest
        self.channel = channel
        self.reply_to = reply_to
        self.interval = interval
        self.limit = limit
        self.posted: list[_Posted] = []
        self.first_posted = asyncio.Event()
        self._text = ""
        self._footer = ""
        self._final = False
        self._changed = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    @property
    def message_ids(self) -> list[int]:
        return [p.id for p in self.posted]

    def update(self, text: str) -> None:
        """The reply so far; written to Discord now or at the next allowed edit."""
        self._text = text
        self._changed.set()
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(), name=f"reply-{self.channel}")

    async def finish(self, text: str, *, footer: str = "") -> list[int]:
        """Writes the whole reply, ``footer`` under its last message, and returns its message
        ids once Discord holds all of it."""
        self._final = True
        self._footer = footer
        self.update(text)
        assert self._writer is not None
        await self._writer
        return self.message_ids

    async def say(self, text: str) -> int:
        """Posts a short message as a reply of its own (a notice: rejected, failed, timed out)."""
        self._final = True
        self._changed.set()  # a writer waiting for more text writes what it has, then ends
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer
        message = await self._post(text, reply=not self.posted)
        return message.id

    def adopt(self, message_id: int, content: str) -> None:
        """Takes a message posted earlier (by a gateway that stopped) as the reply's first."""
        self.posted.append(_Posted(message_id, content, written_at=0.0))  # editable at once
        self.first_posted.set()

    async def close(self) -> None:
        """Stops writing (the turn ended without a reply, or the gateway is stopping)."""
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._writer

    async def _write(self) -> None:
        while True:
            self._changed.clear()
            wait = await self._sync(self._chunks())
            if self._changed.is_set():  # more text came while Discord was being written to
                continue
            if wait is None:
                if self._final:
                    return
                await self._changed.wait()
            elif self._final:
                await asyncio.sleep(wait)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), wait)

    def _chunks(self) -> list[str]:
        chunks = split_message(self._text, self.limit)
        return with_footer(chunks, self._footer, self.limit) if self._final else chunks

    async def _sync(self, chunks: list[str]) -> float | None:
        """Brings the messages towards ``chunks``; returns how long until an edit is due, if any."""
        due: float | None = None
        for index, chunk in enumerate(chunks):
            if index >= len(self.posted):
                message = await self._post(chunk, reply=index == 0)
                self.posted.append(_Posted(message.id, chunk, time.monotonic()))
                self.first_posted.set()
                continue
            posted = self.posted[index]
            if posted.content == chunk:
                continue
            wait = posted.written_at + self.interval - time.monotonic()
            if wait > 0:
                due = wait if due is None else min(due, wait)
                continue
            await self.rest.edit_message(self.channel, posted.id, chunk, **_NO_PINGS)
            posted.content, posted.written_at = chunk, time.monotonic()
        if self._final and len(self.posted) > len(chunks):
            await self._drop_extra(len(chunks))
        return due

    async def _post(self, content: str, *, reply: bool) -> hikari.Message:
        reference = self.reply_to if reply and self.reply_to else hikari.UNDEFINED
        try:
            return await self.rest.create_message(
                self.channel, content, reply=reference, **_NO_PINGS
            )
        except hikari.BadRequestError:
            if reference is hikari.UNDEFINED:
                raise
            # The person's message was deleted meanwhile: answer in the channel instead.
            return await self.rest.create_message(self.channel, content, **_NO_PINGS)

    async def _drop_extra(self, keep: int) -> None:
        """The completed text is shorter than what was streamed: remove the messages past it."""
        for posted in self.posted[keep:]:
            with contextlib.suppress(hikari.NotFoundError):
                await self.rest.delete_message(self.channel, posted.id)
        del self.posted[keep:]
